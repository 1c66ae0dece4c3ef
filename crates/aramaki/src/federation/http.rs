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
    Router::new()
        .route(WELL_KNOWN_PATH, get(well_known))
        .route("/api/v1/federation/connect", get(connect))
}

/// `GET /api/v1/federation/connect`: a peer's link. Role: public — the
/// first frame must be a `link.hello` signed by an active peer's pinned key.
async fn connect(
    State(ctx): State<AppState>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> axum::response::Response {
    let limit = super::link::TRANSPORT_LIMIT;
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| super::link::accept(ctx, super::link::pump_axum(socket)))
}

/// The URL peers reach this instance at: the federation listener's when
/// there is one, else the instance's.
pub fn public_url(ctx: &Context) -> String {
    let f = &ctx.config.federation;
    if let Some(url) = &f.url {
        return url.trim_end_matches('/').to_owned();
    }
    if let Some(listen) = &f.listen {
        return format!("https://{listen}");
    }
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
        retired_keys: ctx.identity.retired_keys(),
        issued_at: to_micros(ctx.now()),
        tls_pinned: ctx.config.federation.listen.is_some(),
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
        .routes(routes!(list_uses))
        .routes(routes!(request_use))
        .routes(routes!(decide_use))
        .routes(routes!(allow_use))
        .routes(routes!(disallow_use))
        .routes(routes!(list_policies))
        .routes(routes!(rotate_key))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct UseList {
    pub items: Vec<super::uses::UseInfo>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

/// A page of a federation list.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// From the previous page's `next`.
    cursor: Option<String>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<i64>,
}

/// Use relations in one state: requested, pending (requests waiting for
/// an admin here), accepted, rejected or ended.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsePageQuery {
    /// From the previous page's `next`.
    cursor: Option<String>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<i64>,
    /// Only uses in this state.
    state: Option<String>,
}

fn page_limit(limit: Option<i64>) -> Result<i64, Problem> {
    let limit = limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 500"));
    }
    Ok(limit)
}

fn bad_cursor(c: &str) -> Problem {
    Problem::bad_request(format!(
        "invalid cursor '{c}': use the previous page's 'next'"
    ))
}

/// The rest of a page one longer than asked: the cursor of what follows.
fn cut<T>(items: &mut Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> Option<String> {
    if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(cursor)
    } else {
        None
    }
}

/// Use relations, both ways, newest first, a page at a time. Role: instance admin.
#[utoipa::path(get, path = "/uses", tag = "federation", params(UsePageQuery),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = UseList), (status = 400, body = crate::web::ProblemBody)))]
async fn list_uses(
    State(ctx): State<AppState>,
    InstanceAdmin(_): InstanceAdmin,
    crate::web::ApiQuery(q): crate::web::ApiQuery<UsePageQuery>,
) -> Result<Json<UseList>, Problem> {
    let limit = page_limit(q.limit)?;
    const STATES: [&str; 5] = ["requested", "pending", "accepted", "rejected", "ended"];
    if let Some(state) = q.state.as_deref().filter(|s| !STATES.contains(s)) {
        return Err(Problem::bad_request(format!(
            "state '{state}' is none of requested, pending, accepted, rejected, ended"
        )));
    }
    let after = match q.cursor.as_deref() {
        Some(c) => Some(c.split_once('/').ok_or_else(|| bad_cursor(c))?),
        None => None,
    };
    let mut items = super::uses::page(&ctx, q.state.as_deref(), after, limit + 1)
        .await?
        .ok_or_else(|| bad_cursor(q.cursor.as_deref().unwrap_or_default()))?;
    let next = cut(&mut items, limit, |u| format!("{}/{}", u.peer, u.id));
    Ok(Json(UseList { items, next }))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UseRequest {
    /// The slug of the system on the peer.
    pub system: String,
    /// `status` or `timeline` (default).
    #[serde(default)]
    pub level: Option<super::uses::Level>,
}

/// Ask a peer to use one of its systems. Role: instance admin.
#[utoipa::path(post, path = "/peers/{peer}/uses", tag = "federation", request_body = UseRequest,
    params(("peer" = String, Path, description = "instance id or name")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = super::uses::UseInfo), (status = 404, body = crate::web::ProblemBody), (status = 409, body = crate::web::ProblemBody)))]
async fn request_use(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    axum::extract::Path(peer): axum::extract::Path<String>,
    crate::web::ApiJson(req): crate::web::ApiJson<UseRequest>,
) -> Result<(axum::http::StatusCode, Json<super::uses::UseInfo>), Problem> {
    let level = req.level.unwrap_or(super::uses::Level::Timeline);
    let u = super::uses::request(&ctx, &admin.actor(), &peer, &req.system, level).await?;
    Ok((axum::http::StatusCode::CREATED, Json(u)))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    /// Accept: what the consumer sees (default: what it asked for, with
    /// subsystems, no handbook, no contacts).
    #[serde(default)]
    pub level: Option<super::uses::Level>,
    #[serde(default)]
    pub subsystems: Option<bool>,
    #[serde(default)]
    pub handbook: bool,
    #[serde(default)]
    pub contacts: bool,
    /// Reject: why (sent to the consumer).
    #[serde(default)]
    pub reason: String,
}

/// `accept` or `reject` a request to use a system here, or `undo` a use
/// (either side). Role: instance admin.
#[utoipa::path(post, path = "/uses/{id}/{decision}", tag = "federation", request_body = Decision,
    params(("id" = String, Path), ("decision" = String, Path, description = "accept, reject or undo")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = super::uses::UseInfo), (status = 404, body = crate::web::ProblemBody), (status = 409, body = crate::web::ProblemBody)))]
async fn decide_use(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    axum::extract::Path((id, decision)): axum::extract::Path<(String, String)>,
    crate::web::ApiJson(d): crate::web::ApiJson<Decision>,
) -> Result<Json<super::uses::UseInfo>, Problem> {
    use super::uses::Exposure;
    let actor = admin.actor();
    let u = match decision.as_str() {
        "accept" => {
            let asked = super::uses::get(&ctx, &id).await?.exposure.level;
            let exposure = Exposure {
                level: d.level.unwrap_or(asked),
                subsystems: d.subsystems.unwrap_or(true),
                handbook: d.handbook,
                contacts: d.contacts,
            };
            super::uses::decide(&ctx, &actor, &id, Some(exposure), "").await?
        }
        "reject" => super::uses::decide(&ctx, &actor, &id, None, &d.reason).await?,
        "undo" => super::uses::undo(&ctx, &actor, &id).await?,
        other => {
            return Err(Problem::not_found(format!(
                "no decision '{other}': use accept, reject or undo"
            )))
        }
    };
    Ok(Json(u))
}

#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsePolicy {
    /// The system here.
    pub system: String,
    pub level: super::uses::Level,
    /// Share the systems it includes (default true).
    #[serde(default)]
    pub subsystems: Option<bool>,
    #[serde(default)]
    pub handbook: bool,
    #[serde(default)]
    pub contacts: bool,
}

/// Accept this peer's requests to use a system at once, with this
/// exposure. Role: instance admin.
#[utoipa::path(put, path = "/peers/{peer}/policies", tag = "federation", request_body = UsePolicy,
    params(("peer" = String, Path, description = "instance id or name")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody)))]
async fn allow_use(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    axum::extract::Path(peer): axum::extract::Path<String>,
    crate::web::ApiJson(req): crate::web::ApiJson<UsePolicy>,
) -> Result<axum::http::StatusCode, Problem> {
    let exposure = super::uses::Exposure {
        level: req.level,
        subsystems: req.subsystems.unwrap_or(true),
        handbook: req.handbook,
        contacts: req.contacts,
    };
    super::uses::allow(&ctx, &admin.actor(), &peer, &req.system, exposure).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// Withdraw a standing policy: the peer's requests for the system wait for
/// an admin again. Role: instance admin.
#[utoipa::path(delete, path = "/peers/{peer}/policies/{system}", tag = "federation",
    params(("peer" = String, Path, description = "instance id or name"), ("system" = String, Path)),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody)))]
async fn disallow_use(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    axum::extract::Path((peer, system)): axum::extract::Path<(String, String)>,
) -> Result<axum::http::StatusCode, Problem> {
    super::uses::disallow(&ctx, &admin.actor(), &peer, &system).await?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PolicyList {
    pub items: Vec<super::uses::Policy>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

/// Standing policies, by system then peer, a page at a time. Role: instance admin.
#[utoipa::path(get, path = "/policies", tag = "federation", params(PageQuery),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = PolicyList), (status = 400, body = crate::web::ProblemBody)))]
async fn list_policies(
    State(ctx): State<AppState>,
    InstanceAdmin(_): InstanceAdmin,
    crate::web::ApiQuery(q): crate::web::ApiQuery<PageQuery>,
) -> Result<Json<PolicyList>, Problem> {
    let limit = page_limit(q.limit)?;
    let after = match q.cursor.as_deref() {
        Some(c) => Some(c.split_once('/').ok_or_else(|| bad_cursor(c))?),
        None => None,
    };
    let mut items = super::uses::policies_page(&ctx, after, limit + 1).await?;
    let next = cut(&mut items, limit, |p| format!("{}/{}", p.system, p.peer));
    Ok(Json(PolicyList { items, next }))
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Rotated {
    pub fingerprint: String,
}

/// Rotate the instance key: the new key is announced to peers signed by
/// the old one, which then only verifies history. Role: instance admin.
#[utoipa::path(post, path = "/instance/rotate-key", tag = "federation",
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = Rotated)))]
async fn rotate_key(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
) -> Result<Json<Rotated>, Problem> {
    Ok(Json(Rotated {
        fingerprint: super::rotation::rotate_key(&ctx, &admin.actor()).await?,
    }))
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
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

/// Peers with their fingerprints and states, by name, a page at a time.
/// Role: instance admin.
#[utoipa::path(get, path = "/peers", tag = "federation", params(PageQuery),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = PeerList), (status = 400, body = crate::web::ProblemBody)))]
async fn list_peers(
    State(ctx): State<AppState>,
    InstanceAdmin(_): InstanceAdmin,
    crate::web::ApiQuery(q): crate::web::ApiQuery<PageQuery>,
) -> Result<Json<PeerList>, Problem> {
    let limit = page_limit(q.limit)?;
    let mut items = super::peers::page(&ctx, q.cursor.as_deref(), limit + 1)
        .await?
        .ok_or_else(|| bad_cursor(q.cursor.as_deref().unwrap_or_default()))?;
    let next = cut(&mut items, limit, |p| p.instance_id.clone());
    Ok(Json(PeerList { items, next }))
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
    let to = PeerState::after_change(&change).ok_or_else(|| {
        Problem::not_found(format!(
            "no change '{change}': use approve, suspend, resume or revoke"
        ))
    })?;
    Ok(Json(
        super::peers::set_state(&ctx, &admin.actor(), &peer, to).await?,
    ))
}
