//! `/api/v1/agents`: the agent registry and enrollment tokens (instance
//! admins only: agents run commands on hosts), and the agent socket.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{store, Agent, AgentError, IssuedToken, TokenInfo};
use crate::web::{ApiJson, AppState, InstanceAdmin, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(show_agent))
        .routes(routes!(revoke_agent))
        .routes(routes!(reenroll_agent))
        .routes(routes!(list_tokens, new_token))
        .routes(routes!(revoke_token))
        .route(
            aramaki_protocol::agent::CONNECT_PATH.trim_start_matches("/api/v1"),
            axum::routing::get(super::socket::connect),
        )
}

impl From<AgentError> for Problem {
    fn from(e: AgentError) -> Problem {
        match &e {
            AgentError::NotFound(_) | AgentError::UnknownToken(_) => {
                Problem::not_found(e.to_string())
            }
            AgentError::UnknownSystem(_) => {
                Problem::unprocessable(e.to_string()).with("field", "system".into())
            }
            AgentError::Remote(_) => {
                Problem::conflict("remote_system", e.to_string()).with("field", "system".into())
            }
            AgentError::Invalid(_) | AgentError::Refused { .. } => {
                Problem::unprocessable(e.to_string())
            }
            AgentError::Db(_) | AgentError::Random(_) => Problem::internal(&e),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    pub items: Vec<Agent>,
}

fn with_connection(ctx: &crate::context::Context, mut agent: Agent) -> Agent {
    agent.connected = ctx.agents.is_connected(&agent.id);
    agent
}

/// Every enrolled agent with its connection state. Role: instance admin.
#[utoipa::path(get, path = "/agents", tag = "agents",
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = AgentList), (status = 403, body = crate::web::ProblemBody)))]
async fn list_agents(
    State(ctx): State<AppState>,
    InstanceAdmin(_): InstanceAdmin,
) -> Result<Json<AgentList>, Problem> {
    let mut conn = ctx.db.reader().acquire().await?;
    let items = store::agents(&mut conn)
        .await?
        .into_iter()
        .map(|a| with_connection(&ctx, a))
        .collect();
    Ok(Json(AgentList { items }))
}

/// One agent, by id or name. Role: instance admin.
#[utoipa::path(get, path = "/agents/{agent}", tag = "agents",
    params(("agent" = String, Path, description = "id or name")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = Agent), (status = 404, body = crate::web::ProblemBody)))]
async fn show_agent(
    State(ctx): State<AppState>,
    InstanceAdmin(_): InstanceAdmin,
    Path(key): Path<String>,
) -> Result<Json<Agent>, Problem> {
    let mut conn = ctx.db.reader().acquire().await?;
    let agent = store::find(&mut conn, &key)
        .await?
        .ok_or(AgentError::NotFound(key))?;
    Ok(Json(with_connection(&ctx, agent)))
}

/// Revoke an agent: its socket closes at once and its key is refused from
/// then on. Role: instance admin.
#[utoipa::path(post, path = "/agents/{agent}/revoke", tag = "agents",
    params(("agent" = String, Path, description = "id or name")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = Agent), (status = 404, body = crate::web::ProblemBody)))]
async fn revoke_agent(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    Path(key): Path<String>,
) -> Result<Json<Agent>, Problem> {
    Ok(Json(super::revoke(&ctx, &admin.actor(), &key).await?))
}

/// Let an agent enroll again with a new key (after a host rebuild).
/// Role: instance admin.
#[utoipa::path(post, path = "/agents/{agent}/reenroll", tag = "agents",
    params(("agent" = String, Path, description = "id or name")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = Agent), (status = 404, body = crate::web::ProblemBody)))]
async fn reenroll_agent(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    Path(key): Path<String>,
) -> Result<Json<Agent>, Problem> {
    Ok(Json(
        super::allow_reenroll(&ctx, &admin.actor(), &key).await?,
    ))
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = EnrollmentTokenList)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

/// Enrollment tokens, newest first (never their secrets). Role: instance admin.
#[utoipa::path(get, path = "/agents/tokens", tag = "agents",
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = TokenList)))]
async fn list_tokens(
    State(ctx): State<AppState>,
    InstanceAdmin(_): InstanceAdmin,
) -> Result<Json<TokenList>, Problem> {
    let mut conn = ctx.db.reader().acquire().await?;
    Ok(Json(TokenList {
        items: store::tokens(&mut conn).await?,
    }))
}

/// The body of `POST /api/v1/agents/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewEnrollmentToken)]
pub struct NewToken {
    /// The system enrolled agents are bound to.
    pub system: String,
    /// Lifetime such as `15m`, `1h`, `7d` (default 1h, at most 30 days).
    #[serde(default)]
    pub ttl: Option<String>,
    /// Let several agents enroll with it (default: single use).
    #[serde(default)]
    pub reusable: bool,
}

/// Issue an enrollment token; the secret is shown once. Role: instance admin.
#[utoipa::path(post, path = "/agents/tokens", tag = "agents", request_body = NewToken,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = IssuedToken), (status = 422, body = crate::web::ProblemBody)))]
async fn new_token(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    ApiJson(req): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<IssuedToken>), Problem> {
    let ttl = super::parse_ttl(req.ttl.as_deref().unwrap_or("1h"))
        .map_err(|e| Problem::from(e).with("field", "ttl".into()))?;
    let issued = super::issue_token(&ctx, &admin.actor(), &req.system, ttl, req.reusable).await?;
    Ok((StatusCode::CREATED, Json(issued)))
}

/// Revoke an enrollment token. Role: instance admin.
#[utoipa::path(delete, path = "/agents/tokens/{id}", tag = "agents",
    params(("id" = String, Path, description = "the token's visible prefix")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody)))]
async fn revoke_token(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    super::revoke_token(&ctx, &admin.actor(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
