//! The agents page: every agent with its health, revocation, and the
//! enrollment tokens. Instance admins only: agents run commands on hosts.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::AgentError;
use crate::monitoring::pages::{ago, forbidden, go_to, not_found};
use crate::ui::{check_form, page_error, render, Page};
use crate::users::sessions::Session;
use crate::users::Role;
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents", get(agents_page))
        .route("/agents/{id}/revoke", post(revoke))
}

const ADMINS_ONLY: &str = "Agents are managed by instance admins.";

struct AgentRow {
    name: String,
    system: String,
    version: String,
    fingerprint: String,
    subscriptions: String,
    /// (relative, exact), if the agent was ever seen.
    last_seen: Option<(String, String)>,
    connection: &'static str,
    keepalive: String,
    queue_depth: i64,
    dropped: i64,
    revoke_url: Option<String>,
}

struct TokenRow {
    prefix: String,
    system: String,
    kind: &'static str,
    uses: i64,
    expires: String,
    expired: bool,
    revoked: bool,
}

#[derive(Template)]
#[template(path = "agents/agents.html")]
struct AgentsPage {
    user: Option<String>,
    csrf: String,
    agents: Vec<AgentRow>,
    tokens: Vec<TokenRow>,
}

fn is_admin(session: &Session) -> bool {
    session.principal.may_everywhere(Role::Admin)
}

/// Role: instance admin.
async fn agents_page(State(ctx): State<AppState>, Page(session): Page) -> Response {
    if !is_admin(&session) {
        return forbidden(&session, ADMINS_ONLY);
    }
    let result = async {
        let mut conn = ctx.db.reader().acquire().await?;
        let now = ctx.now();
        let agents = super::store::agents(&mut conn)
            .await?
            .into_iter()
            .map(|a| AgentRow {
                connection: if a.revoked {
                    "revoked"
                } else if ctx.agents.is_connected(&a.id) {
                    "connected"
                } else {
                    "disconnected"
                },
                revoke_url: (!a.revoked)
                    .then(|| format!("/agents/{}/revoke", crate::cli::encode(&a.id))),
                last_seen: a.last_seen.map(|t| (ago(now, t), t.to_string())),
                subscriptions: a.subscriptions.join(", "),
                name: a.name,
                system: a.system,
                version: a.version,
                fingerprint: a.fingerprint,
                keepalive: a.keepalive,
                queue_depth: a.queue_depth,
                dropped: a.dropped,
            })
            .collect();
        let tokens = super::store::tokens(&mut conn)
            .await?
            .into_iter()
            .map(|t| TokenRow {
                prefix: format!("aek_{}_…", t.id),
                system: t.system,
                kind: if t.reusable { "reusable" } else { "single-use" },
                uses: t.uses,
                expires: t.expires_at.to_string(),
                expired: t.expires_at <= now,
                revoked: t.revoked,
            })
            .collect();
        Ok::<_, sqlx::Error>(AgentsPage {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            agents,
            tokens,
        })
    };
    match result.await {
        Ok(page) => render(StatusCode::OK, &page),
        Err(e) => page_error(&e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Revokes an agent (its session closes, its key is refused), then back to
/// the list. Role: instance admin.
async fn revoke(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    if !is_admin(&session) {
        return forbidden(&session, ADMINS_ONLY);
    }
    match super::revoke(&ctx, &session.principal.actor(), &id).await {
        Ok(_) => go_to(&headers, "/agents"),
        Err(AgentError::NotFound(_)) => not_found(&session, &format!("agent '{id}'")),
        Err(e) => page_error(&e),
    }
}
