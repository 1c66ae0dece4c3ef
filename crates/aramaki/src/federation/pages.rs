//! The federation page: this instance's identity, its peers with their
//! links, invites and joins, use requests both ways, and standing policies.
//! Instance admins only: peering decides what leaves this instance.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::envelope::PeerState;
use super::peers::{FederationError, PeerInfo};
use super::uses::{Exposure, Level, Policy, UseInfo};
use crate::monitoring::pages::{ago, forbidden, go_to, span};
use crate::ui::{check_form, page_error, render, Page};
use crate::users::sessions::Session;
use crate::users::Role;
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/federation", get(federation_page))
        .route("/federation/invite", post(invite))
        .route("/federation/join", post(join))
        .route("/federation/peers/{peer}/{change}", post(change_peer))
        .route("/federation/uses", post(ask))
        .route("/federation/uses/{id}/{decision}", post(decide))
        .route("/federation/policies", post(allow))
        .route("/federation/policies/withdraw", post(disallow))
        .route("/federation/rotate-key", post(rotate_key))
}

const ADMINS_ONLY: &str = "Federation is managed by instance admins.";

struct PeerRow {
    id: String,
    name: String,
    url: String,
    fingerprint: String,
    state: String,
    /// How far behind it is, for an unreachable peer or a backlog.
    lag: Option<String>,
    connected: bool,
    /// Its certificate must carry its pinned key.
    tls_pinned: bool,
    /// (relative, exact).
    last_seen: Option<(String, String)>,
    backlog: i64,
    failures: u32,
    next_attempt: Option<String>,
    last_error: Option<String>,
    /// It told us, signed, that it suspended this instance (since when).
    suspended_us: Option<String>,
    /// The numbering with it was last found broken and restarted: (when, why).
    resynced: Option<(String, String)>,
    /// (change, button label, confirmation).
    changes: Vec<(&'static str, &'static str, String)>,
}

struct UseRow {
    id: String,
    peer_name: String,
    system: String,
    local_system: Option<String>,
    state: String,
    exposure: String,
    requested_by: String,
    updated: (String, String),
}

#[derive(Template)]
#[template(path = "federation/federation.html")]
struct FederationPage {
    user: Option<String>,
    csrf: String,
    /// A failed form's reason, shown at the top.
    error: Option<String>,
    /// What the last form did.
    notice: Option<String>,
    /// An invite just issued: shown this once.
    issued: Option<String>,
    name: String,
    url: String,
    fingerprint: String,
    retired_keys: usize,
    peers: Vec<PeerRow>,
    /// Peers a use may be asked of: (name, label).
    askable: Vec<(String, String)>,
    /// Systems of this instance a policy may name.
    own_systems: Vec<String>,
    incoming: Vec<UseRow>,
    ours: Vec<UseRow>,
    theirs: Vec<UseRow>,
    past: Vec<UseRow>,
    policies: Vec<Policy>,
    /// (value, label) of what a use may share.
    levels: [(&'static str, &'static str); 2],
}

#[derive(Template)]
#[template(path = "federation/join.html")]
struct JoinPage {
    user: Option<String>,
    csrf: String,
    invite: String,
    name: String,
    url: String,
    fingerprint: String,
}

fn is_admin(session: &Session) -> bool {
    session.principal.may_everywhere(Role::Admin)
}

/// What a page shows besides the state: an error, a notice, a new invite.
#[derive(Default)]
struct Flash {
    error: Option<String>,
    notice: Option<String>,
    issued: Option<String>,
}

fn exposure_words(e: &Exposure) -> String {
    let mut words = vec![match e.level {
        Level::Status => "status",
        Level::Timeline => "status and timeline",
    }];
    if e.subsystems {
        words.push("subsystems");
    }
    if e.handbook {
        words.push("handbook");
    }
    if e.contacts {
        words.push("contacts");
    }
    words.join(", ")
}

/// The buttons a peer in `state` offers.
fn changes_for(p: &PeerInfo) -> Vec<(&'static str, &'static str, String)> {
    let revoke = (
        "revoke",
        "Revoke",
        format!(
            "Revoke {}? Its link closes now, every use with it ends, and peering again needs a new invite.",
            p.name
        ),
    );
    let suspend = (
        "suspend",
        "Suspend",
        format!(
            "Suspend {}? Its link closes now and its messages are refused until resumed.",
            p.name
        ),
    );
    match p.state.as_str() {
        "pending" => vec![
            (
                "approve",
                "Approve",
                format!("Approve {} with fingerprint {}?", p.name, p.fingerprint),
            ),
            revoke,
        ],
        "active" | "unreachable" => vec![suspend, revoke],
        "suspended" => vec![
            (
                "resume",
                "Resume",
                format!("Resume peering with {}?", p.name),
            ),
            revoke,
        ],
        _ => Vec::new(),
    }
}

fn peer_row(now: jiff::Timestamp, p: PeerInfo) -> PeerRow {
    let lag = (p.state == "unreachable" || p.backlog > 0)
        .then(|| span(p.lag_seconds))
        .filter(|_| p.lag_seconds > 0);
    PeerRow {
        changes: changes_for(&p),
        id: p.instance_id,
        name: p.name,
        url: p.url,
        fingerprint: p.fingerprint,
        state: p.state,
        lag,
        connected: p.connected,
        tls_pinned: p.tls_pinned,
        last_seen: p.last_seen_at.map(|t| (ago(now, t), t.to_string())),
        backlog: p.backlog,
        failures: p.link.failures,
        next_attempt: p
            .link
            .next_attempt_at
            .map(|t| crate::db::from_micros(t).to_string()),
        last_error: p.link.last_error,
        suspended_us: p.suspended_by_peer_at.map(|t| t.to_string()),
        resynced: p
            .resynced_at
            .map(|t| (t.to_string(), p.resync_reason.unwrap_or_default())),
    }
}

fn use_row(now: jiff::Timestamp, u: UseInfo) -> UseRow {
    UseRow {
        exposure: exposure_words(&u.exposure),
        updated: (ago(now, u.updated_at), u.updated_at.to_string()),
        id: u.id,
        peer_name: u.peer_name,
        system: u.system,
        local_system: u.local_system,
        state: u.state,
        requested_by: u.requested_by,
    }
}

async fn build(
    ctx: &crate::context::Context,
    session: &Session,
    flash: Flash,
) -> Result<FederationPage, FederationError> {
    let now = ctx.now();
    let peers = super::peers::list(ctx).await?;
    let askable = peers
        .iter()
        .filter(|p| matches!(p.state.as_str(), "active" | "unreachable"))
        .map(|p| (p.name.clone(), format!("{} ({})", p.name, p.url)))
        .collect();
    let own_systems: Vec<String> = sqlx::query_scalar(
        "SELECT slug FROM systems WHERE deleted_at IS NULL AND instance_id = $1 ORDER BY slug",
    )
    .bind(ctx.identity.instance_id.as_str())
    .fetch_all(ctx.db.reader())
    .await?;
    let (mut incoming, mut ours, mut theirs, mut past) = (vec![], vec![], vec![], vec![]);
    for u in super::uses::list(ctx).await? {
        let provider = u.role == "provider";
        match u.state.as_str() {
            "pending" if provider => incoming.push(use_row(now, u)),
            "requested" | "accepted" if !provider => ours.push(use_row(now, u)),
            "accepted" if provider => theirs.push(use_row(now, u)),
            _ => past.push(use_row(now, u)),
        }
    }
    past.truncate(50);
    Ok(FederationPage {
        user: Some(session.principal.display_name.clone()),
        csrf: session.csrf.clone(),
        error: flash.error,
        notice: flash.notice,
        issued: flash.issued,
        name: ctx.identity.name.clone(),
        url: super::http::public_url(ctx),
        fingerprint: ctx.identity.fingerprint(),
        retired_keys: ctx.identity.retired_keys().len(),
        peers: peers.into_iter().map(|p| peer_row(now, p)).collect(),
        askable,
        own_systems,
        incoming,
        ours,
        theirs,
        past,
        policies: super::uses::policies(ctx).await?,
        levels: [
            ("timeline", "status and timeline"),
            ("status", "status only"),
        ],
    })
}

/// The page, with what a form just did. A failed form answers with its
/// status and the reason on top of the page, so nothing typed is a mystery.
async fn show(
    ctx: &crate::context::Context,
    session: &Session,
    status: StatusCode,
    flash: Flash,
) -> Response {
    match build(ctx, session, flash).await {
        Ok(page) => render(status, &page),
        Err(e) => page_error(&e),
    }
}

/// A refused form: the page again, with the reason and a fitting status.
async fn refused(ctx: &crate::context::Context, session: &Session, e: FederationError) -> Response {
    let status = match &e {
        FederationError::Db(_) | FederationError::Internal(_) => return page_error(&e),
        FederationError::NotFound(_) => StatusCode::NOT_FOUND,
        FederationError::Invite(_) => StatusCode::FORBIDDEN,
        FederationError::Peer(_) => StatusCode::CONFLICT,
        FederationError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
    };
    let flash = Flash {
        error: Some(e.to_string()),
        ..Flash::default()
    };
    show(ctx, session, status, flash).await
}

/// Role: instance admin.
async fn federation_page(State(ctx): State<AppState>, Page(session): Page) -> Response {
    if !is_admin(&session) {
        return forbidden(&session, ADMINS_ONLY);
    }
    show(&ctx, &session, StatusCode::OK, Flash::default()).await
}

/// Checks the form's token, then that an instance admin sent it; the
/// refusal if not.
fn refusal(session: &Session, headers: &HeaderMap, csrf: &str) -> Option<Response> {
    if let Err(refused) = check_form(session, headers, Some(csrf)) {
        return Some(refused.into_response());
    }
    (!is_admin(session)).then(|| forbidden(session, ADMINS_ONLY))
}

#[derive(Deserialize)]
struct InviteForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    ttl: String,
}

/// Issues an invite and shows it once. Role: instance admin.
async fn invite(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<InviteForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    let ttl = if form.ttl.trim().is_empty() {
        "24h"
    } else {
        form.ttl.trim()
    };
    let ttl = match crate::agents::parse_ttl(ttl) {
        Ok(ttl) => ttl,
        Err(e) => {
            let flash = Flash {
                error: Some(format!("Invite lifetime: {e}")),
                ..Flash::default()
            };
            return show(&ctx, &session, StatusCode::UNPROCESSABLE_ENTITY, flash).await;
        }
    };
    match super::peers::invite(&ctx, &session.principal.actor(), ttl).await {
        Ok(issued) => {
            let flash = Flash {
                issued: Some(issued.to_string()),
                ..Flash::default()
            };
            show(&ctx, &session, StatusCode::OK, flash).await
        }
        Err(e) => refused(&ctx, &session, e).await,
    }
}

#[derive(Deserialize)]
struct JoinForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    invite: String,
    /// Set by the confirmation page: the admin compared the fingerprint.
    #[serde(default)]
    confirm: String,
}

/// First shows whom the invite leads to and its fingerprint; joins once
/// the admin confirms it is the one they were told. Role: instance admin.
async fn join(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<JoinForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    let invite = form.invite.trim();
    if form.confirm != "yes" {
        return match super::peers::preview(invite).await {
            Ok(p) => render(
                StatusCode::OK,
                &JoinPage {
                    user: Some(session.principal.display_name.clone()),
                    csrf: session.csrf.clone(),
                    invite: invite.to_owned(),
                    name: p.name,
                    url: p.url,
                    fingerprint: p.fingerprint,
                },
            ),
            Err(e) => refused(&ctx, &session, e).await,
        };
    }
    match super::peers::join(&ctx, &session.principal.actor(), invite).await {
        Ok(peer) => {
            let flash = Flash {
                notice: Some(format!(
                    "Peered with {} ({}); it is {}.",
                    peer.name, peer.url, peer.state
                )),
                ..Flash::default()
            };
            show(&ctx, &session, StatusCode::OK, flash).await
        }
        Err(e) => refused(&ctx, &session, e).await,
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Approve, suspend, resume or revoke a peer. Role: instance admin.
async fn change_peer(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path((peer, change)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    let Some(to) = PeerState::after_change(&change) else {
        let unknown = FederationError::NotFound(format!("change '{change}'"));
        return refused(&ctx, &session, unknown).await;
    };
    match super::peers::set_state(&ctx, &session.principal.actor(), &peer, to).await {
        Ok(_) => go_to(&headers, "/federation"),
        Err(e) => refused(&ctx, &session, e).await,
    }
}

#[derive(Deserialize)]
struct AskForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    peer: String,
    #[serde(default)]
    system: String,
    #[serde(default)]
    level: String,
}

fn level_of(s: &str) -> Result<Level, FederationError> {
    match s {
        "" => Ok(Level::Timeline),
        s => Level::parse(s).ok_or_else(|| {
            FederationError::Peer(format!("no level '{s}': use status or timeline"))
        }),
    }
}

/// Asks a peer to use one of its systems. Role: instance admin.
async fn ask(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<AskForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    let result = async {
        let level = level_of(&form.level)?;
        super::uses::request(
            &ctx,
            &session.principal.actor(),
            &form.peer,
            form.system.trim(),
            level,
        )
        .await
    };
    match result.await {
        Ok(_) => go_to(&headers, "/federation"),
        Err(e) => refused(&ctx, &session, e).await,
    }
}

#[derive(Deserialize)]
struct DecisionForm {
    #[serde(default)]
    csrf: String,
    #[serde(flatten)]
    shared: SharedFields,
    #[serde(default)]
    reason: String,
}

/// What a use may see, as the accept and policy forms ask it.
#[derive(Deserialize)]
struct SharedFields {
    #[serde(default)]
    level: String,
    /// Checkboxes: present when ticked.
    #[serde(default)]
    subsystems: Option<String>,
    #[serde(default)]
    handbook: Option<String>,
    #[serde(default)]
    contacts: Option<String>,
}

impl SharedFields {
    fn exposure(&self) -> Result<Exposure, FederationError> {
        Ok(Exposure {
            level: level_of(&self.level)?,
            subsystems: self.subsystems.is_some(),
            handbook: self.handbook.is_some(),
            contacts: self.contacts.is_some(),
        })
    }
}

/// Accept (with the exposure chosen), reject (with a reason) or undo a
/// use. Role: instance admin.
async fn decide(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path((id, decision)): Path<(String, String)>,
    Form(form): Form<DecisionForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    let actor = session.principal.actor();
    let result = async {
        match decision.as_str() {
            "accept" => {
                let exposure = form.shared.exposure()?;
                super::uses::decide(&ctx, &actor, &id, Some(exposure), "").await
            }
            "reject" => super::uses::decide(&ctx, &actor, &id, None, form.reason.trim()).await,
            "undo" => super::uses::undo(&ctx, &actor, &id).await,
            other => Err(FederationError::NotFound(format!("decision '{other}'"))),
        }
    };
    match result.await {
        Ok(_) => go_to(&headers, "/federation"),
        Err(e) => refused(&ctx, &session, e).await,
    }
}

#[derive(Deserialize)]
struct PolicyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    peer: String,
    #[serde(default)]
    system: String,
    #[serde(flatten)]
    shared: SharedFields,
}

/// A standing policy: a peer's requests for a system are accepted at once.
/// Role: instance admin.
async fn allow(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<PolicyForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    let result = async {
        let exposure = form.shared.exposure()?;
        super::uses::allow(
            &ctx,
            &session.principal.actor(),
            &form.peer,
            &form.system,
            exposure,
        )
        .await
    };
    match result.await {
        Ok(()) => go_to(&headers, "/federation"),
        Err(e) => refused(&ctx, &session, e).await,
    }
}

/// Withdraws a standing policy. Role: instance admin.
async fn disallow(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<PolicyForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    match super::uses::disallow(&ctx, &session.principal.actor(), &form.peer, &form.system).await {
        Ok(()) => go_to(&headers, "/federation"),
        Err(e) => refused(&ctx, &session, e).await,
    }
}

/// Rotates the instance key; peers follow. Role: instance admin.
async fn rotate_key(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refusal) = refusal(&session, &headers, &form.csrf) {
        return refusal;
    }
    match super::rotation::rotate_key(&ctx, &session.principal.actor()).await {
        Ok(fingerprint) => {
            let flash = Flash {
                notice: Some(format!(
                    "The instance key is rotated; the new fingerprint is {fingerprint}. Peers follow when their link next opens."
                )),
                ..Flash::default()
            };
            show(&ctx, &session, StatusCode::OK, flash).await
        }
        Err(e) => refused(&ctx, &session, e).await,
    }
}
