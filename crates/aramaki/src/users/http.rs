//! `/api/v1/tokens`: a user's own API tokens — listed with their last use,
//! created (the secret is shown once) and revoked.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{create_token_expiring, store, Role};
use crate::db::{from_micros, to_micros};
use crate::systems::model::check_text;
use crate::web::{needs_token, ApiJson, AppState, Caller, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tokens, new_token))
        .routes(routes!(revoke_token))
}

/// An API token, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// The visible part: tokens look like `ark_<prefix>_…`.
    pub prefix: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_used_at: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<Timestamp>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub revoked_at: Option<Timestamp>,
}

impl From<store::TokenListing> for TokenInfo {
    fn from(t: store::TokenListing) -> TokenInfo {
        TokenInfo {
            id: t.id,
            name: t.name,
            prefix: t.prefix,
            created_at: from_micros(t.created_at),
            last_used_at: t.last_used_at.map(from_micros),
            expires_at: t.expires_at.map(from_micros),
            revoked_at: t.revoked_at.map(from_micros),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
    pub next: Option<String>,
}

/// Your API tokens, newest first. Role: any user.
#[utoipa::path(get, path = "/tokens", tag = "users",
    extensions(("x-aramaki-role" = json!("user"))), security(("token" = [])),
    responses((status = 200, body = TokenList), (status = 401, body = crate::web::ProblemBody)))]
async fn list_tokens(
    State(ctx): State<AppState>,
    Caller(access): Caller,
) -> Result<Json<TokenList>, Problem> {
    let p = access.principal().ok_or_else(needs_token)?;
    let items = store::tokens_of(ctx.db.reader(), &p.user_id)
        .await?
        .into_iter()
        .map(TokenInfo::from)
        .collect();
    Ok(Json(TokenList { items, next: None }))
}

/// The body of `POST /api/v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// What the token is for, such as "CI deploy markers".
    pub name: String,
    /// Days until it expires (1 to 3650); default: never.
    pub expires_in_days: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// The whole token. Shown this once; only its hash is kept.
    pub token: String,
}

/// Issue yourself a new API token; the secret is shown once. Role: any user.
#[utoipa::path(post, path = "/tokens", tag = "users", request_body = NewToken,
    extensions(("x-aramaki-role" = json!("user"))), security(("token" = [])),
    responses((status = 201, body = CreatedToken), (status = 422, body = crate::web::ProblemBody)))]
async fn new_token(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    ApiJson(req): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<CreatedToken>), Problem> {
    let p = access.principal().ok_or_else(needs_token)?;
    check_text("name", &req.name, 1, 200)?;
    let expires_at = match req.expires_in_days {
        None => None,
        Some(days) if (1..=3650).contains(&days) => {
            let at = ctx
                .now()
                .checked_add(SignedDuration::from_hours(24 * days))
                .map_err(|e| Problem::internal(&e))?;
            Some(to_micros(at))
        }
        Some(_) => {
            return Err(
                Problem::unprocessable("expires_in_days must be between 1 and 3650")
                    .with("field", "expires_in_days".into()),
            )
        }
    };
    let (id, secret) =
        create_token_expiring(&ctx, &p.actor(), &p.user_id, req.name.trim(), expires_at)
            .await
            .map_err(|e| Problem::internal(&e))?;
    let listing = store::tokens_of(ctx.db.reader(), &p.user_id)
        .await?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| Problem::internal(&"the new token is missing"))?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            info: listing.into(),
            token: secret.expose().to_owned(),
        }),
    ))
}

/// Revoke one of your tokens (the instance admin may revoke anyone's); it
/// stops working at once. Role: any user.
#[utoipa::path(delete, path = "/tokens/{id}", tag = "users", params(("id" = String, Path, description = "the token's id")),
    extensions(("x-aramaki-role" = json!("user"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody)))]
async fn revoke_token(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let p = access.principal().ok_or_else(needs_token)?;
    let owner = if p.may_everywhere(Role::Admin) {
        None
    } else {
        Some(p.user_id.as_str())
    };
    let mut tx = ctx.db.begin().await?;
    if !store::revoke_token(&mut tx, &id, owner, to_micros(ctx.now())).await? {
        return Err(Problem::not_found(format!(
            "no token {id} of yours that is still valid"
        )));
    }
    let data = serde_json::json!({"token_id": id, "by": p.username});
    super::audit(
        &ctx,
        &mut tx,
        &p.actor(),
        "token.revoked",
        format!("Revoked API token {id}"),
        data,
    )
    .await
    .map_err(|e| Problem::internal(&e))?;
    ctx.commit(tx).await?;
    Ok(StatusCode::NO_CONTENT)
}
