//! Peering: one-time invites, joining with pinned keys both ways, and the
//! admin's approval, suspension and revocation.
//!
//! A invites (`aramaki peer invite`), B joins with the invite: B's server
//! fetches A's self-signed document, checks it against the fingerprint in
//! the invite, and sends its own signed document with the invite to A. A
//! checks the invite and B's self-signature, pins B's key (pending until an
//! admin approves, unless `federation.auto_approve`), and answers with its
//! own document, which B pins.

use aramaki_protocol::federation::{document_transcript, SignedDocument, WELL_KNOWN_PATH};
use aramaki_protocol::keys::{base32, compact_fingerprint, unhex_array};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::envelope::PeerState;
use crate::context::Context;
use crate::db::{from_micros, to_micros};
use crate::timeline::Actor;
use crate::users::{audit, hash_secret, random_bytes};

#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("{0}")]
    Invite(String),
    #[error("{0}")]
    Peer(String),
    /// What is missing, such as `peer 'b'`.
    #[error("no {0}")]
    NotFound(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Internal(String),
}

/// A peer as listed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PeerInfo {
    pub instance_id: String,
    pub name: String,
    pub url: String,
    pub fingerprint: String,
    /// pending, active, unreachable, suspended or revoked.
    pub state: String,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: jiff::Timestamp,
    /// Whether a link to it is up in this process.
    pub connected: bool,
    /// Last time a link was up.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_seen_at: Option<jiff::Timestamp>,
    /// Messages waiting for it.
    pub backlog: i64,
    /// Age of the oldest message waiting for it, in seconds (its lag).
    pub lag_seconds: i64,
    /// The dialer's circuit: failures in a row, next attempt, last error.
    pub link: super::link::LinkHealth,
    /// Its TLS certificate must carry its pinned key.
    pub tls_pinned: bool,
    /// When it told us, signed, that it suspended this instance (until a
    /// link comes up again).
    #[schema(value_type = Option<String>, format = DateTime)]
    pub suspended_by_peer_at: Option<jiff::Timestamp>,
    /// The last time the numbering of messages with it was found broken
    /// (a restored backup on either side), and why; it recovered by itself.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub resynced_at: Option<jiff::Timestamp>,
    pub resync_reason: Option<String>,
}

/// The body of `POST /api/v1/federation/join`, sent by the joiner's server.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// `aip_<id>_<secret>_<fingerprint>`.
    pub invite: String,
    #[schema(value_type = Object)]
    pub document: SignedDocument,
}

/// An invite: where to join, and the secret and fingerprint that prove both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub url: String,
    pub id: String,
    pub secret: String,
    pub fingerprint: String,
}

impl Invite {
    /// `<url>#aip_<id>_<secret>_<fingerprint>`.
    pub fn parse(s: &str) -> Option<Invite> {
        let (url, token) = s.trim().split_once('#')?;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return None;
        }
        let (id, secret, fingerprint) = parse_token(token)?;
        Some(Invite {
            url: url.trim_end_matches('/').to_owned(),
            id,
            secret,
            fingerprint,
        })
    }

    pub fn token(&self) -> String {
        format!("aip_{}_{}_{}", self.id, self.secret, self.fingerprint)
    }
}

impl std::fmt::Display for Invite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.url, self.token())
    }
}

fn parse_token(token: &str) -> Option<(String, String, String)> {
    aramaki_protocol::keys::split_token("aip", token)
}

/// Checks a self-signed document; returns its key.
pub fn verify_document(signed: &SignedDocument) -> Result<VerifyingKey, FederationError> {
    let key = unhex_array::<32>(&signed.document.public_key)
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| FederationError::Peer("the document carries no valid key".into()))?;
    let signature = unhex_array::<64>(&signed.signature)
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| FederationError::Peer("the document carries no valid signature".into()))?;
    key.verify(&document_transcript(&signed.document), &signature)
        .map_err(|_| FederationError::Peer("the document's signature does not verify".into()))?;
    // People compare the fingerprint shown: it must be the key's own.
    if signed.document.fingerprint != aramaki_protocol::keys::fingerprint(key.as_bytes()) {
        return Err(FederationError::Peer(
            "the document's fingerprint is not its key's".into(),
        ));
    }
    Ok(key)
}

/// Issues a one-time invite; only its hash is kept.
pub async fn invite(
    ctx: &Context,
    actor: &Actor,
    ttl: jiff::SignedDuration,
) -> Result<Invite, FederationError> {
    let random = |e: crate::users::UserError| FederationError::Internal(e.to_string());
    let id = base32(&random_bytes::<5>().map_err(random)?).to_ascii_lowercase();
    let secret = base32(&random_bytes::<32>().map_err(random)?).to_ascii_lowercase();
    let now = ctx.now();
    let expires = now.checked_add(ttl).unwrap_or(now);
    let mut tx = ctx.db.begin_recording().await?;
    sqlx::query("INSERT INTO peer_invites (id, secret_hash, created_by, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(id.as_str())
        .bind(hash_secret(&secret))
        .bind(actor.name.as_str())
        .bind(to_micros(now))
        .bind(to_micros(expires))
        .execute(&mut *tx)
        .await?;
    audit(
        ctx,
        &mut tx,
        actor,
        "peer.invited",
        format!("Issued a peering invite (aip_{id}_…), valid until {expires}"),
        serde_json::json!({"invite": id}),
    )
    .await
    .map_err(|e| FederationError::Internal(e.to_string()))?;
    ctx.commit(tx).await?;
    Ok(Invite {
        url: super::http::public_url(ctx),
        id,
        secret,
        fingerprint: compact_fingerprint(ctx.identity.public_key().as_bytes()),
    })
}

/// On the inviter: takes a join request, pins the joiner's key.
pub async fn accept_join(
    ctx: &Context,
    req: &JoinRequest,
) -> Result<SignedDocument, FederationError> {
    let (id, secret, _) = parse_token(&req.invite)
        .ok_or_else(|| FederationError::Invite("this is not a peering invite".into()))?;
    let key = verify_document(&req.document)?;
    let theirs = &req.document.document;
    if theirs.instance_id == ctx.identity.instance_id {
        return Err(FederationError::Peer(
            "an instance cannot peer with itself".into(),
        ));
    }
    let now = to_micros(ctx.now());
    let mut tx = ctx.db.begin_recording().await?;
    let row =
        sqlx::query("SELECT secret_hash, expires_at, used_at FROM peer_invites WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| FederationError::Invite("no such invite".into()))?;
    let hash: String = row.try_get("secret_hash")?;
    if !bool::from(hash_secret(&secret).as_bytes().ct_eq(hash.as_bytes())) {
        return Err(FederationError::Invite("no such invite".into()));
    }
    if row.try_get::<Option<i64>, _>("used_at")?.is_some() {
        return Err(FederationError::Invite(
            "this invite was used already".into(),
        ));
    }
    if row.try_get::<i64, _>("expires_at")? <= now {
        return Err(FederationError::Invite("this invite has expired".into()));
    }
    if let Some(existing) = sqlx::query("SELECT public_key FROM peers WHERE instance_id = $1")
        .bind(theirs.instance_id.as_str())
        .fetch_optional(&mut *tx)
        .await?
    {
        let pinned: String = existing.try_get(0)?;
        if pinned != theirs.public_key {
            return Err(FederationError::Peer(
                "this instance is a peer already, with another key".into(),
            ));
        }
    }
    let state = if ctx.config.federation.auto_approve {
        PeerState::Active
    } else {
        PeerState::Pending
    };
    upsert_peer(&mut tx, &req.document, state, now).await?;
    sqlx::query("UPDATE peer_invites SET used_by = $2, used_at = $3 WHERE id = $1")
        .bind(id.as_str())
        .bind(theirs.instance_id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let actor = Actor::instance(&theirs.instance_id, &theirs.name);
    let fp = aramaki_protocol::keys::fingerprint(key.as_bytes());
    audit(
        ctx,
        &mut tx,
        &actor,
        "peer.joined",
        format!(
            "{} ({}) joined with fingerprint {fp}; {}",
            theirs.name,
            theirs.url,
            state.as_str()
        ),
        serde_json::json!({"peer": theirs.instance_id, "fingerprint": fp, "state": state.as_str()}),
    )
    .await
    .map_err(|e| FederationError::Internal(e.to_string()))?;
    ctx.commit(tx).await?;
    // A link from before the join runs on the old sequences.
    ctx.federation.close_peer(&theirs.instance_id);
    super::uses::end_all_with(ctx, &theirs.instance_id, "the peering started afresh").await?;
    ctx.federation.peers_changed();
    Ok(super::http::document(ctx))
}

async fn upsert_peer(
    tx: &mut crate::db::Tx,
    doc: &SignedDocument,
    state: PeerState,
    now: i64,
) -> Result<(), sqlx::Error> {
    let d = &doc.document;
    sqlx::query(
        "INSERT INTO peers (instance_id, name, url, public_key, state, created_at, updated_at, tls_pinned) VALUES ($1, $2, $3, $4, $5, $6, $6, $7) \
         ON CONFLICT (instance_id) DO UPDATE SET name = excluded.name, url = excluded.url, state = excluded.state, updated_at = excluded.updated_at, tls_pinned = excluded.tls_pinned, \
         out_seq = 0, in_seq = 0, out_epoch = '', in_epoch = '', in_mark = '', acked_seq = 0, acked_mark = '', resynced_at = NULL, resync_reason = NULL, suspended_by_peer_at = NULL",
    )
    .bind(d.instance_id.as_str())
    .bind(d.name.as_str())
    .bind(d.url.as_str())
    .bind(d.public_key.as_str())
    .bind(state.as_str())
    .bind(now)
    .bind(i64::from(d.tls_pinned))
    .execute(&mut **tx)
    .await?;
    // A join starts the relation afresh on both sides (after a revocation,
    // say): sequences from 1, nothing left over from before.
    sqlx::query("DELETE FROM federation_outbox WHERE peer_id = $1")
        .bind(d.instance_id.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What an invite points at, checked against the invite's fingerprint: shown
/// to the joining admin to compare with what the inviter told them.
#[derive(Debug, Clone)]
pub struct InvitePreview {
    pub name: String,
    pub url: String,
    pub fingerprint: String,
}

/// An HTTP client for peering: over TLS, the certificate must carry the
/// key `pin` names, or (unless `strict`) the public roots vouch for it.
fn join_client(pin: super::tls::Pin, strict: bool) -> Result<reqwest::Client, FederationError> {
    let internal = |e: &dyn std::fmt::Display| FederationError::Internal(e.to_string());
    let tls = super::tls::client_config(pin, strict).map_err(|e| internal(&e))?;
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .use_preconfigured_tls(tls)
        .build()
        .map_err(|e| internal(&e))
}

/// The invite pins the inviter's certificate by its fingerprint.
fn invite_client(invite: &Invite) -> Result<reqwest::Client, FederationError> {
    join_client(
        super::tls::Pin::Fingerprint(invite.fingerprint.clone()),
        false,
    )
}

fn parse_invite(invite: &str) -> Result<Invite, FederationError> {
    Invite::parse(invite)
        .ok_or_else(|| FederationError::Invite("this is not a peering invite (<url>#aip_…)".into()))
}

/// Fetches the inviter's document; refuses it unless its key matches the
/// fingerprint in the invite. Returns the document and its key.
async fn fetch_inviter(
    http: &reqwest::Client,
    invite: &Invite,
) -> Result<(SignedDocument, VerifyingKey), FederationError> {
    let unreachable = |e: reqwest::Error| FederationError::Unreachable {
        url: invite.url.clone(),
        reason: super::link::with_causes(&e),
    };
    let theirs: SignedDocument = http
        .get(format!("{}{WELL_KNOWN_PATH}", invite.url))
        .send()
        .await
        .map_err(unreachable)?
        .json()
        .await
        .map_err(unreachable)?;
    let key = verify_document(&theirs)?;
    if compact_fingerprint(key.as_bytes()) != invite.fingerprint {
        return Err(FederationError::Peer(format!(
            "the instance at {} has fingerprint {}, not the one in the invite",
            invite.url,
            aramaki_protocol::keys::fingerprint(key.as_bytes())
        )));
    }
    Ok((theirs, key))
}

/// On the joiner, before joining: who the invite leads to.
pub async fn preview(invite: &str) -> Result<InvitePreview, FederationError> {
    let invite = parse_invite(invite)?;
    let (theirs, key) = fetch_inviter(&invite_client(&invite)?, &invite).await?;
    Ok(InvitePreview {
        name: theirs.document.name,
        url: theirs.document.url,
        fingerprint: aramaki_protocol::keys::fingerprint(key.as_bytes()),
    })
}

/// On the joiner: fetches and checks the inviter's document, joins, pins it.
pub async fn join(ctx: &Context, actor: &Actor, invite: &str) -> Result<PeerInfo, FederationError> {
    let invite = parse_invite(invite)?;
    // The invite's secret would cross the network in clear text.
    if super::link::plaintext_refused(&invite.url, ctx.config.federation.allow_plaintext) {
        return Err(FederationError::Invite(format!(
            "refusing to join {} over plain http: use https, or set federation.allow_plaintext for development",
            invite.url
        )));
    }
    let unreachable = |e: reqwest::Error| FederationError::Unreachable {
        url: invite.url.clone(),
        reason: super::link::with_causes(&e),
    };
    let (theirs, key) = fetch_inviter(&invite_client(&invite)?, &invite).await?;
    // An inviter that serves its instance key gets our document only over
    // a connection that proves that key.
    let http = if theirs.document.tls_pinned {
        join_client(super::tls::Pin::Key(*key.as_bytes()), true)?
    } else {
        invite_client(&invite)?
    };
    let req = JoinRequest {
        invite: invite.token(),
        document: super::http::document(ctx),
    };
    let resp = http
        .post(format!("{}/api/v1/federation/join", invite.url))
        .json(&req)
        .send()
        .await
        .map_err(unreachable)?;
    if !resp.status().is_success() {
        let detail = resp
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_default();
        return Err(FederationError::Invite(format!(
            "{} refused to peer: {detail}",
            invite.url
        )));
    }
    let answer: SignedDocument = resp.json().await.map_err(unreachable)?;
    if answer.document.public_key != theirs.document.public_key {
        return Err(FederationError::Peer(
            "the inviter answered with another key".into(),
        ));
    }
    verify_document(&answer)?;
    let now = to_micros(ctx.now());
    let mut tx = ctx.db.begin_recording().await?;
    upsert_peer(&mut tx, &answer, PeerState::Active, now).await?;
    let d = &answer.document;
    audit(
        ctx,
        &mut tx,
        actor,
        "peer.added",
        format!(
            "Peered with {} ({}), fingerprint {}",
            d.name, d.url, d.fingerprint
        ),
        serde_json::json!({"peer": d.instance_id, "fingerprint": d.fingerprint}),
    )
    .await
    .map_err(|e| FederationError::Internal(e.to_string()))?;
    ctx.commit(tx).await?;
    ctx.federation.close_peer(&d.instance_id);
    super::uses::end_all_with(ctx, &d.instance_id, "the peering started afresh").await?;
    ctx.federation.peers_changed();
    find(ctx, &d.instance_id).await
}

const PEER_COLUMNS: &str =
    "instance_id, name, url, public_key, state, updated_at, last_seen_at, tls_pinned, suspended_by_peer_at, resynced_at, resync_reason";

pub async fn list(ctx: &Context) -> Result<Vec<PeerInfo>, sqlx::Error> {
    let rows = sqlx::query(&format!("SELECT {PEER_COLUMNS} FROM peers ORDER BY name"))
        .fetch_all(ctx.db.reader())
        .await?;
    let mut out = Vec::new();
    for row in &rows {
        out.push(peer_from(ctx, row).await?);
    }
    Ok(out)
}

/// A page of peers by name (then id), after the peer `after` (an instance
/// id) of the previous page; `None` if `after` names no peer.
pub async fn page(
    ctx: &Context,
    after: Option<&str>,
    limit: i64,
) -> Result<Option<Vec<PeerInfo>>, sqlx::Error> {
    let rows = match after {
        Some(id) => {
            let Some(at) = sqlx::query("SELECT name FROM peers WHERE instance_id = $1")
                .bind(id)
                .fetch_optional(ctx.db.reader())
                .await?
            else {
                return Ok(None);
            };
            let name: String = at.try_get(0)?;
            sqlx::query(&format!(
                "SELECT {PEER_COLUMNS} FROM peers WHERE name > $1 OR (name = $1 AND instance_id > $2) \
                 ORDER BY name, instance_id LIMIT $3"
            ))
            .bind(name)
            .bind(id)
            .bind(limit)
            .fetch_all(ctx.db.reader())
            .await?
        }
        None => {
            sqlx::query(&format!(
                "SELECT {PEER_COLUMNS} FROM peers ORDER BY name, instance_id LIMIT $1"
            ))
            .bind(limit)
            .fetch_all(ctx.db.reader())
            .await?
        }
    };
    let mut out = Vec::new();
    for row in &rows {
        out.push(peer_from(ctx, row).await?);
    }
    Ok(Some(out))
}

async fn peer_from(ctx: &Context, r: &sqlx::any::AnyRow) -> Result<PeerInfo, sqlx::Error> {
    let key: String = r.try_get("public_key")?;
    let id: String = r.try_get("instance_id")?;
    let (backlog, oldest) = super::outbox::backlog(ctx.db.reader(), &id).await?;
    let now = to_micros(ctx.now());
    Ok(PeerInfo {
        connected: ctx.federation.connected(&id),
        link: ctx.federation.health(&id),
        backlog,
        lag_seconds: oldest.map(|t| (now - t).max(0) / 1_000_000).unwrap_or(0),
        last_seen_at: r
            .try_get::<Option<i64>, _>("last_seen_at")?
            .map(from_micros),
        instance_id: id,
        name: r.try_get("name")?,
        url: r.try_get("url")?,
        fingerprint: aramaki_protocol::keys::unhex(&key)
            .map(|k| aramaki_protocol::keys::fingerprint(&k))
            .unwrap_or_default(),
        state: r.try_get("state")?,
        updated_at: from_micros(r.try_get("updated_at")?),
        tls_pinned: r.try_get::<i64, _>("tls_pinned")? != 0,
        suspended_by_peer_at: r
            .try_get::<Option<i64>, _>("suspended_by_peer_at")?
            .map(from_micros),
        resynced_at: r.try_get::<Option<i64>, _>("resynced_at")?.map(from_micros),
        resync_reason: r.try_get("resync_reason")?,
    })
}

/// A peer by instance id or name.
pub async fn find(ctx: &Context, key: &str) -> Result<PeerInfo, FederationError> {
    let row = sqlx::query(&format!(
        "SELECT {PEER_COLUMNS} FROM peers WHERE instance_id = $1 OR name = $1"
    ))
    .bind(key)
    .fetch_optional(ctx.db.reader())
    .await?
    .ok_or_else(|| FederationError::NotFound(format!("peer '{key}'")))?;
    Ok(peer_from(ctx, &row).await?)
}

/// Pins a peer's new key after it proved the rotation; the old key is
/// kept for history only.
pub async fn repin(
    ctx: &Context,
    peer: &super::link::LinkPeer,
    key: &VerifyingKey,
) -> Result<(), FederationError> {
    let now = to_micros(ctx.now());
    let old = aramaki_protocol::keys::hex(peer.key.as_bytes());
    let new = aramaki_protocol::keys::hex(key.as_bytes());
    let mut tx = ctx.db.begin_recording().await?;
    sqlx::query("INSERT INTO peer_keys (peer_id, public_key, retired_at) VALUES ($1, $2, $3) ON CONFLICT (peer_id, public_key) DO NOTHING")
        .bind(peer.id.as_str())
        .bind(old.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE peers SET public_key = $2, updated_at = $3 WHERE instance_id = $1")
        .bind(peer.id.as_str())
        .bind(new.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    let fp = aramaki_protocol::keys::fingerprint(key.as_bytes());
    audit(
        ctx,
        &mut tx,
        &Actor::instance(&peer.id, &peer.name),
        "peer.key_rotated",
        format!(
            "Peer {} rotated its key (signed by the old one): new fingerprint {fp}",
            peer.name
        ),
        serde_json::json!({"peer": peer.id, "old_key": old, "new_key": new, "fingerprint": fp}),
    )
    .await
    .map_err(|e| FederationError::Internal(e.to_string()))?;
    ctx.commit(tx).await?;
    Ok(())
}

/// A link came up: the peer is seen now, and reachable again if it was not.
pub async fn link_up(ctx: &Context, peer: &super::link::LinkPeer) {
    touch(ctx, &peer.id).await;
    let resumed = async {
        let mut tx = ctx.db.begin().await?;
        sqlx::query("UPDATE peers SET suspended_by_peer_at = NULL WHERE instance_id = $1")
            .bind(peer.id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    };
    if let Err(e) = resumed.await {
        tracing::warn!(error = %e, "cannot record that a peer resumed this instance");
    }
    if peer.state == PeerState::Unreachable {
        let actor = Actor::instance(&ctx.identity.instance_id, "federation");
        if let Err(e) = set_state(ctx, &actor, &peer.id, PeerState::Active).await {
            tracing::warn!(error = %e, "cannot mark a peer reachable");
        }
    }
}

/// The peer told us, signed, that it suspended this instance: shown on the
/// peer and, the first time, on the instance's timeline.
pub async fn suspended_by_peer(
    ctx: &Context,
    peer: &super::link::LinkPeer,
) -> Result<(), FederationError> {
    let mut tx = ctx.db.begin_recording().await?;
    let first = sqlx::query(
        "UPDATE peers SET suspended_by_peer_at = $2 WHERE instance_id = $1 AND suspended_by_peer_at IS NULL",
    )
    .bind(peer.id.as_str())
    .bind(to_micros(ctx.now()))
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if first {
        let actor = Actor::instance(&peer.id, &peer.name);
        audit(
            ctx,
            &mut tx,
            &actor,
            "peer.suspended_us",
            format!(
                "{} suspended this instance: nothing flows until it resumes",
                peer.name
            ),
            serde_json::json!({"peer": peer.id}),
        )
        .await
        .map_err(|e| FederationError::Internal(e.to_string()))?;
        tracing::warn!(peer = peer.name, "the peer suspended this instance");
    }
    ctx.commit(tx).await?;
    Ok(())
}

/// A link went down: remember when the peer was last seen.
pub async fn link_down(ctx: &Context, peer: &str) {
    touch(ctx, peer).await;
}

async fn touch(ctx: &Context, peer: &str) {
    let done = async {
        let mut tx = ctx.db.begin().await?;
        sqlx::query("UPDATE peers SET last_seen_at = $2 WHERE instance_id = $1")
            .bind(peer)
            .bind(to_micros(ctx.now()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    };
    if let Err(e) = done.await {
        tracing::warn!(error = %e, "cannot record when a peer was seen");
    }
}

/// Approves, suspends, reactivates or revokes a peer; revoked is final.
pub async fn set_state(
    ctx: &Context,
    actor: &Actor,
    key: &str,
    to: PeerState,
) -> Result<PeerInfo, FederationError> {
    change_state(ctx, actor, key, None, to).await
}

/// Like [`set_state`], but only from `from`: the sweep marks only active
/// peers unreachable, never one suspended meanwhile.
pub async fn change_state(
    ctx: &Context,
    actor: &Actor,
    key: &str,
    from: Option<PeerState>,
    to: PeerState,
) -> Result<PeerInfo, FederationError> {
    let mut peer = find(ctx, key).await?;
    if let Some(from) = from {
        peer.state = from.as_str().to_owned();
    }
    if peer.state == "revoked" {
        return Err(FederationError::Peer(format!(
            "{} is revoked; peer again with a new invite",
            peer.name
        )));
    }
    let mut tx = ctx.db.begin_recording().await?;
    // Only from the state read above: a suspension that lands meanwhile is
    // not overwritten (say, by the sweep marking the peer unreachable).
    let changed = sqlx::query(
        "UPDATE peers SET state = $2, updated_at = $3 WHERE instance_id = $1 AND state = $4",
    )
    .bind(peer.instance_id.as_str())
    .bind(to.as_str())
    .bind(to_micros(ctx.now()))
    .bind(peer.state.as_str())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 0 {
        return Err(FederationError::Peer(format!(
            "{} changed state meanwhile; look again and retry",
            peer.name
        )));
    }
    if to == PeerState::Revoked {
        // Standing answers end with the peering: a new one starts from none.
        sqlx::query("DELETE FROM use_policies WHERE peer_id = $1")
            .bind(peer.instance_id.as_str())
            .execute(&mut *tx)
            .await?;
    }
    audit(
        ctx,
        &mut tx,
        actor,
        &format!("peer.{}", to.as_str()),
        format!("Peer {} is now {}", peer.name, to.as_str()),
        serde_json::json!({"peer": peer.instance_id, "from": peer.state, "to": to.as_str()}),
    )
    .await
    .map_err(|e| FederationError::Internal(e.to_string()))?;
    ctx.commit(tx).await?;
    if matches!(to, PeerState::Suspended | PeerState::Revoked) {
        ctx.federation.close_peer(&peer.instance_id);
    }
    if to == PeerState::Revoked {
        super::uses::end_all_with(ctx, &peer.instance_id, "the peer was revoked").await?;
    }
    ctx.federation.peers_changed();
    find(ctx, &peer.instance_id).await
}

/// Every peer's name by instance id: how pages say where a remote system
/// or event comes from.
pub async fn names(
    ctx: &Context,
) -> Result<std::collections::HashMap<String, String>, sqlx::Error> {
    let rows = sqlx::query("SELECT instance_id, name FROM peers")
        .fetch_all(ctx.db.reader())
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("instance_id")?, r.try_get("name")?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aramaki_protocol::federation::InstanceDocument;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed(key: &SigningKey, fingerprint: String) -> SignedDocument {
        let document = InstanceDocument {
            version: 1,
            instance_id: "i".into(),
            name: "hosting".into(),
            url: "https://a.example".into(),
            public_key: aramaki_protocol::keys::hex(key.verifying_key().as_bytes()),
            fingerprint,
            retired_keys: vec![],
            issued_at: 1,
            tls_pinned: false,
        };
        let signature =
            aramaki_protocol::keys::hex(&key.sign(&document_transcript(&document)).to_bytes());
        SignedDocument {
            document,
            signature,
        }
    }

    #[test]
    fn a_document_must_show_its_own_keys_fingerprint() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let own = aramaki_protocol::keys::fingerprint(key.verifying_key().as_bytes());
        assert!(verify_document(&signed(&key, own)).is_ok());
        let other = SigningKey::from_bytes(&[6; 32]);
        let claimed = aramaki_protocol::keys::fingerprint(other.verifying_key().as_bytes());
        let refused = verify_document(&signed(&key, claimed)).unwrap_err();
        assert!(refused.to_string().contains("fingerprint"), "{refused}");
    }
}
