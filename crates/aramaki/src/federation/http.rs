//! `GET /.well-known/aramaki`: the instance's self-signed description, so
//! that a peer can compare the fingerprint a person read out to it.

use aramaki_protocol::federation::{
    document_transcript, InstanceDocument, SignedDocument, FEDERATION_VERSION, WELL_KNOWN_PATH,
};
use aramaki_protocol::keys::hex;
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::context::Context;
use crate::db::to_micros;
use crate::web::{AppState, InstanceAdmin, Problem};

pub fn routes() -> Router<AppState> {
    Router::new().route(WELL_KNOWN_PATH, get(well_known))
}

/// The URL peers reach this instance at.
pub fn public_url(ctx: &Context) -> String {
    ctx.config
        .instance
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", ctx.config.server.listen))
}

/// The signed instance document.
pub fn document(ctx: &Context) -> SignedDocument {
    let document = InstanceDocument {
        version: FEDERATION_VERSION,
        instance_id: ctx.identity.instance_id.clone(),
        name: ctx.identity.name.clone(),
        url: public_url(ctx),
        public_key: ctx.identity.public_key_hex(),
        fingerprint: ctx.identity.fingerprint(),
        // Key rotation arrives with peering; no key was retired yet.
        retired_keys: Vec::new(),
        issued_at: to_micros(ctx.now()),
    };
    let signature = hex(&ctx
        .identity
        .sign(&document_transcript(&document))
        .to_bytes());
    SignedDocument {
        document,
        signature,
    }
}

/// Role: public (it is what peers read before they trust anything).
async fn well_known(State(ctx): State<AppState>) -> Json<SignedDocument> {
    Json(document(&ctx))
}

/// The federation API (`/api/v1/peers…`, and the join endpoint peers call).
pub fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(join_from_peer))
        .routes(routes!(list_peers))
        .routes(routes!(new_invite))
        .routes(routes!(join_peer))
        .routes(routes!(change_peer))
}

impl From<super::peers::FederationError> for Problem {
    fn from(e: super::peers::FederationError) -> Problem {
        use super::peers::FederationError as E;
        match &e {
            E::Invite(_) => Problem::new(
                axum::http::StatusCode::FORBIDDEN,
                "invite_refused",
                e.to_string(),
            ),
            E::Peer(_) => Problem::conflict("peer_refused", e.to_string()),
            E::NotFound(_) => Problem::not_found(e.to_string()),
            E::Unreachable { .. } => Problem::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "peer_unreachable",
                e.to_string(),
            ),
            E::Db(_) | E::Internal(_) => Problem::internal(&e),
        }
    }
}

/// A joining instance presents its invite and its signed document; answers
/// with this instance's document. Role: public (the invite authenticates).
#[utoipa::path(post, path = "/federation/join", tag = "federation",
    request_body = super::peers::JoinRequest,
    extensions(("x-aramaki-role" = json!("public"))),
    responses((status = 200, body = Object), (status = 403, body = crate::web::ProblemBody), (status = 409, body = crate::web::ProblemBody)))]
async fn join_from_peer(
    State(ctx): State<AppState>,
    crate::web::ApiJson(req): crate::web::ApiJson<super::peers::JoinRequest>,
) -> Result<Json<SignedDocument>, Problem> {
    Ok(Json(super::peers::accept_join(&ctx, &req).await?))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PeerList {
    pub items: Vec<super::peers::PeerInfo>,
}

/// Peers with their fingerprints and states. Role: instance admin.
#[utoipa::path(get, path = "/peers", tag = "federation",
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = PeerList)))]
async fn list_peers(
    State(ctx): State<AppState>,
    InstanceAdmin(_): InstanceAdmin,
) -> Result<Json<PeerList>, Problem> {
    Ok(Json(PeerList {
        items: super::peers::list(&ctx).await?,
    }))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteRequest {
    /// Lifetime such as `1h` or `7d` (default 24h, at most 30 days).
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct IssuedInvite {
    /// Give this to the other instance's admin (`aramaki peer join`); shown once.
    pub invite: String,
    pub fingerprint: String,
}

/// Issue a one-time peering invite. Role: instance admin.
#[utoipa::path(post, path = "/peers/invites", tag = "federation", request_body = InviteRequest,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = IssuedInvite), (status = 422, body = crate::web::ProblemBody)))]
async fn new_invite(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    crate::web::ApiJson(req): crate::web::ApiJson<InviteRequest>,
) -> Result<(axum::http::StatusCode, Json<IssuedInvite>), Problem> {
    let ttl = crate::agents::parse_ttl(req.ttl.as_deref().unwrap_or("24h"))
        .map_err(|e| Problem::unprocessable(e.to_string()).with("field", "ttl".into()))?;
    let invite = super::peers::invite(&ctx, &admin.actor(), ttl).await?;
    Ok((
        axum::http::StatusCode::CREATED,
        Json(IssuedInvite {
            invite: invite.to_string(),
            fingerprint: ctx.identity.fingerprint(),
        }),
    ))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinWith {
    /// The invite the other instance issued (`<url>#aip_…`).
    pub invite: String,
}

/// Join another instance with its invite: its key is checked against the
/// invite's fingerprint and pinned. Role: instance admin.
#[utoipa::path(post, path = "/peers/join", tag = "federation", request_body = JoinWith,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = super::peers::PeerInfo), (status = 403, body = crate::web::ProblemBody), (status = 502, body = crate::web::ProblemBody)))]
async fn join_peer(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    crate::web::ApiJson(req): crate::web::ApiJson<JoinWith>,
) -> Result<(axum::http::StatusCode, Json<super::peers::PeerInfo>), Problem> {
    let peer = super::peers::join(&ctx, &admin.actor(), &req.invite).await?;
    Ok((axum::http::StatusCode::CREATED, Json(peer)))
}

/// Approve (`active`), `suspend` or `revoke` a peer. Role: instance admin.
#[utoipa::path(post, path = "/peers/{peer}/{change}", tag = "federation",
    params(("peer" = String, Path, description = "instance id or name"), ("change" = String, Path, description = "approve, suspend, resume or revoke")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = super::peers::PeerInfo), (status = 404, body = crate::web::ProblemBody)))]
async fn change_peer(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    axum::extract::Path((peer, change)): axum::extract::Path<(String, String)>,
) -> Result<Json<super::peers::PeerInfo>, Problem> {
    use super::envelope::PeerState;
    let to = match change.as_str() {
        "approve" | "resume" => PeerState::Active,
        "suspend" => PeerState::Suspended,
        "revoke" => PeerState::Revoked,
        other => {
            return Err(Problem::not_found(format!(
                "no change '{other}': use approve, suspend, resume or revoke"
            )))
        }
    };
    Ok(Json(
        super::peers::set_state(&ctx, &admin.actor(), &peer, to).await?,
    ))
}
