//! Links between peers: one WebSocket per peer pair, either side dials.
//!
//! A link opens with a signed `link.hello` from the dialer (its cursor: the
//! last message it committed from us, and its key history) answered by a
//! signed `link.welcome` (ours). Then each side sends its outbox after the
//! other's cursor, a window at a time, and acknowledges what it committed
//! (`link.ack`); a gap or a rate refusal is answered with `link.nack`, and
//! the sender rewinds. Every frame is an envelope, opened by
//! [`super::envelope::open`].
//!
//! When both sides dial at once, the link dialed by the instance with the
//! smaller id wins. A dead peer only ever costs its own task: each peer has
//! a maintainer that redials with jittered exponential backoff (the circuit
//! stays open in between), while the outbox keeps filling in the database.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aramaki_protocol::federation::Envelope;
use ed25519_dalek::VerifyingKey;
use serde_json::json;
use sqlx::Row;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::envelope::{open, seal, Opened, Peer, PeerState, Refused};
use super::outbox;
use crate::context::Context;
use crate::db::to_micros;
use crate::timeline::subscribers::BoxFuture;

/// How long each step of the opening handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Envelopes live this long (µs): enough for a slow link, short for replays.
const MESSAGE_TTL: i64 = 120_000_000;
/// Messages sent and not yet acknowledged, at most.
const WINDOW: i64 = 2_000;
/// Messages read from the outbox at once.
const SEND_BATCH: i64 = 500;
/// Frames committed in one transaction, at most.
const APPLY_BATCH: usize = 500;

/// Text frames both ways; the transport closes when both ends drop.
#[derive(Debug)]
pub struct Conn {
    pub tx: mpsc::Sender<String>,
    pub rx: mpsc::Receiver<String>,
}

/// What TLS must show when dialing a peer.
#[derive(Debug, Clone, Copy)]
pub struct TlsPin {
    /// The peer's pinned key: its certificate may carry it.
    pub key: [u8; 32],
    /// The certificate must carry it; no CA can stand in.
    pub strict: bool,
}

/// Opens connections to peers: WebSockets in production, channels in tests.
pub trait Transport: Send + Sync + 'static {
    /// `url` is the peer's link endpoint (`ws://…` or `wss://…`).
    fn dial<'a>(&'a self, url: &'a str, pin: TlsPin) -> BoxFuture<'a, Result<Conn, String>>;
}

/// A link's end in the registry: which session holds it, who dialed.
struct Slot {
    session: u64,
    dialed_by_me: bool,
    close: watch::Sender<bool>,
}

/// How a peer's maintainer fares: shown in the peer list.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct LinkHealth {
    /// Dial attempts failed in a row (the circuit is open while > 0).
    pub failures: u32,
    /// The next dial, µs since the epoch, while the circuit is open.
    pub next_attempt_at: Option<i64>,
    pub last_error: Option<String>,
}

/// Every link of this process.
#[derive(Default)]
pub struct Federation {
    transport: Mutex<Option<Arc<dyn Transport>>>,
    slots: Mutex<HashMap<String, Slot>>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
    maintained: Mutex<HashSet<String>>,
    health: Mutex<HashMap<String, LinkHealth>>,
    seen: Mutex<HashMap<String, i64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Refusals not yet written to the log, per (peer, reason).
    refusal_log: Mutex<RefusalLog>,
    /// Numbering found broken and restarted, by direction.
    resyncs: Mutex<BTreeMap<&'static str, u64>>,
    /// When each revoked peer was last told so (at most every 10 s).
    told_revoked: Mutex<HashMap<String, Instant>>,
    /// Peers changed: the supervisor looks again.
    changed: Notify,
    next_session: AtomicU64,
    sent: AtomicU64,
    applied: AtomicU64,
}

impl fmt::Debug for Federation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Federation")
            .field("links", &lock(&self.slots).len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Federation {
    /// Replaces the transport (tests wire instances through memory).
    pub fn set_transport(&self, transport: Arc<dyn Transport>) {
        *lock(&self.transport) = Some(transport);
    }

    /// The transport links dial with: WebSockets unless a test set another.
    pub fn transport(&self, ctx: &Context) -> Arc<dyn Transport> {
        lock(&self.transport)
            .get_or_insert_with(|| {
                Arc::new(WsTransport {
                    allow_plaintext: ctx.config.federation.allow_plaintext,
                })
            })
            .clone()
    }

    /// Whether a link to `peer` is up.
    pub fn connected(&self, peer: &str) -> bool {
        lock(&self.slots).contains_key(peer)
    }

    /// Number of links up.
    pub fn links(&self) -> usize {
        lock(&self.slots).len()
    }

    pub fn health(&self, peer: &str) -> LinkHealth {
        lock(&self.health).get(peer).cloned().unwrap_or_default()
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.refused).clone()
    }

    /// Messages committed from peers so far.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    fn waker(&self, peer: &str) -> Arc<Notify> {
        lock(&self.wakers)
            .entry(peer.to_owned())
            .or_default()
            .clone()
    }

    /// New messages wait for `peer` (call after commit).
    pub fn wake(&self, peer: &str) {
        self.waker(peer).notify_one();
    }

    /// Peers were added or changed state: maintainers start or stop.
    pub fn peers_changed(&self) {
        self.changed.notify_one();
    }

    /// Closes the link to `peer` at once (suspend, revoke).
    pub fn close_peer(&self, peer: &str) {
        if let Some(slot) = lock(&self.slots).remove(peer) {
            let _ = slot.close.send(true);
        }
        self.peers_changed();
    }

    /// Closes every link (key rotation, shutdown): they reopen on their own.
    pub fn close_all(&self) {
        for (_, slot) in lock(&self.slots).drain() {
            let _ = slot.close.send(true);
        }
    }

    /// Counts a refusal and logs it: the first of a (peer, reason) at
    /// once, the rest of a burst as one line with their count.
    pub fn refuse(&self, peer: &str, reason: &'static str, detail: &str) {
        *lock(&self.refused).entry(reason).or_default() += 1;
        let logged = lock(&self.refusal_log).note(peer, reason, Instant::now());
        if let Some(count) = logged {
            tracing::warn!(peer, reason, count, detail, "federation messages refused");
        }
    }

    /// Writes the counts of refusals not logged yet (the sweep calls it).
    pub fn flush_refusals(&self) {
        for ((peer, reason), count) in lock(&self.refusal_log).flush(Instant::now()) {
            tracing::warn!(peer, reason, count, "federation messages refused");
        }
    }

    /// WARN lines written for refusals so far.
    pub fn refusal_lines(&self) -> u64 {
        lock(&self.refusal_log).lines
    }

    /// The numbering with a peer was found broken (`outbound`: ours to it,
    /// restarted here; `inbound`: its to us).
    pub fn resynced(&self, direction: &'static str) {
        *lock(&self.resyncs).entry(direction).or_default() += 1;
    }

    /// Numbering restarts so far, by direction.
    pub fn resyncs(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.resyncs).clone()
    }

    /// In-memory half of replay protection (the database holds the rest).
    fn first_time(&self, id: &str, expires_at: i64, now: i64) -> bool {
        let mut seen = lock(&self.seen);
        if seen.len() > 100_000 {
            seen.retain(|_, until| *until > now);
        }
        seen.insert(id.to_owned(), expires_at).is_none()
    }

    /// Takes the link for `peer`, unless a link the smaller instance
    /// dialed holds it already (both sides dialed at once).
    fn register(&self, me: &str, peer: &str, dialed_by_me: bool) -> Option<Session> {
        let mut slots = lock(&self.slots);
        let smaller_is_me = me < peer;
        if let Some(existing) = slots.get(peer) {
            let existing_wins = existing.dialed_by_me == smaller_is_me;
            let new_wins = dialed_by_me == smaller_is_me;
            if existing_wins && !new_wins {
                return None;
            }
            let _ = existing.close.send(true);
        }
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(false);
        slots.insert(
            peer.to_owned(),
            Slot {
                session,
                dialed_by_me,
                close,
            },
        );
        Some(Session {
            peer: peer.to_owned(),
            id: session,
            closed,
        })
    }

    fn unregister(&self, session: &Session) {
        let mut slots = lock(&self.slots);
        if slots.get(&session.peer).map(|s| s.session) == Some(session.id) {
            slots.remove(&session.peer);
        }
    }

    /// Prometheus lines.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# TYPE aramaki_federation_links gauge\naramaki_federation_links {}",
            self.links()
        );
        let _ = writeln!(
            out,
            "# TYPE aramaki_federation_sent_total counter\naramaki_federation_sent_total {}",
            self.sent.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE aramaki_federation_applied_total counter\naramaki_federation_applied_total {}",
            self.applied()
        );
        let _ = writeln!(out, "# TYPE aramaki_federation_resyncs_total counter");
        for (direction, n) in self.resyncs() {
            let _ = writeln!(
                out,
                "aramaki_federation_resyncs_total{{direction=\"{direction}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# TYPE aramaki_federation_refused_total counter");
        for (reason, n) in self.refusals() {
            let _ = writeln!(
                out,
                "aramaki_federation_refused_total{{reason=\"{reason}\"}} {n}"
            );
        }
    }
}

/// How often refusals of one (peer, reason) are written to the log.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(30);

/// Refusals of one (peer, reason) are logged once per interval, with how
/// many there were: a burst of thousands is one line, and the metric
/// counts each.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// Last line written, and refusals since then, per (peer, reason).
    open: HashMap<(String, &'static str), (Instant, u64)>,
    /// Lines written so far.
    pub lines: u64,
}

impl RefusalLog {
    /// Notes one refusal; `Some(count)` when a line is due now.
    pub fn note(&mut self, peer: &str, reason: &'static str, now: Instant) -> Option<u64> {
        if self.open.len() > 10_000 {
            self.open
                .retain(|_, (at, pending)| *pending > 0 || now - *at < REFUSAL_LOG_EVERY);
        }
        match self.open.get_mut(&(peer.to_owned(), reason)) {
            Some((at, pending)) if now - *at < REFUSAL_LOG_EVERY => {
                *pending += 1;
                None
            }
            Some((at, pending)) => {
                let count = *pending + 1;
                *at = now;
                *pending = 0;
                self.lines += 1;
                Some(count)
            }
            None => {
                self.open.insert((peer.to_owned(), reason), (now, 0));
                self.lines += 1;
                Some(1)
            }
        }
    }

    /// The counts whose interval is over and that no line told yet.
    pub fn flush(&mut self, now: Instant) -> Vec<((String, &'static str), u64)> {
        let mut out = Vec::new();
        for (key, (at, pending)) in self.open.iter_mut() {
            if *pending > 0 && now - *at >= REFUSAL_LOG_EVERY {
                out.push((key.clone(), *pending));
                *at = now;
                *pending = 0;
                self.lines += 1;
            }
        }
        out
    }
}

/// A registered link; dropping it does not close anything by itself.
struct Session {
    peer: String,
    id: u64,
    closed: watch::Receiver<bool>,
}

/// A peer as a link needs it.
#[derive(Debug, Clone)]
pub struct LinkPeer {
    pub id: String,
    pub name: String,
    pub url: String,
    pub state: PeerState,
    pub key: VerifyingKey,
    pub in_seq: i64,
    /// The peer's epoch `in_seq` counts in, and the mark of that message.
    pub in_epoch: String,
    pub in_mark: String,
    /// Ours for the messages we send it, and the last number given.
    pub out_epoch: String,
    pub out_seq: i64,
    /// It serves TLS with its instance key: no other certificate will do.
    pub tls_pinned: bool,
}

impl LinkPeer {
    fn as_peer(&self) -> Peer {
        Peer {
            instance_id: self.id.clone(),
            state: self.state,
            key: self.key,
        }
    }
}

pub fn parse_state(s: &str) -> PeerState {
    match s {
        "active" => PeerState::Active,
        "unreachable" => PeerState::Unreachable,
        "suspended" => PeerState::Suspended,
        "revoked" => PeerState::Revoked,
        _ => PeerState::Pending,
    }
}

pub async fn load_peer(ctx: &Context, id: &str) -> Result<Option<LinkPeer>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT instance_id, name, url, public_key, state, in_seq, in_epoch, in_mark, out_epoch, out_seq, tls_pinned FROM peers WHERE instance_id = $1",
    )
    .bind(id)
    .fetch_optional(ctx.db.reader())
    .await?
    else {
        return Ok(None);
    };
    let key: String = row.try_get("public_key")?;
    let Some(key) = aramaki_protocol::keys::unhex_array::<32>(&key)
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
    else {
        return Ok(None);
    };
    Ok(Some(LinkPeer {
        id: row.try_get("instance_id")?,
        name: row.try_get("name")?,
        url: row.try_get("url")?,
        state: parse_state(&row.try_get::<String, _>("state")?),
        key,
        in_seq: row.try_get("in_seq")?,
        in_epoch: row.try_get("in_epoch")?,
        in_mark: row.try_get("in_mark")?,
        out_epoch: row.try_get("out_epoch")?,
        out_seq: row.try_get("out_seq")?,
        tls_pinned: row.try_get::<i64, _>("tls_pinned")? != 0,
    }))
}

/// The link endpoint of a peer's base URL.
pub fn connect_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    };
    format!("{ws}/api/v1/federation/connect")
}

/// Opens a frame from `peer`; counts and logs a refusal.
async fn open_frame(ctx: &Context, peer: &LinkPeer, raw: &str) -> Option<Opened> {
    let now = to_micros(ctx.now());
    let result = open(
        raw.as_bytes(),
        &ctx.identity.instance_id,
        now,
        |id| (id == peer.id).then(|| peer.as_peer()),
        |id, until| ctx.federation.first_time(id, until, now),
    );
    match result {
        Ok(opened) => Some(opened),
        Err(refused) => {
            ctx.federation
                .refuse(&peer.name, refused.key(), &refused.to_string());
            None
        }
    }
}

/// Records an envelope id durably, until the envelope expires (and the
/// clock skew allowed); false if it was seen before.
pub async fn remember(tx: &mut crate::db::Tx, e: &Envelope, now: i64) -> Result<bool, sqlx::Error> {
    let until = e
        .expires_at
        .max(now)
        .saturating_add(super::envelope::MAX_SKEW_MICROS);
    let done = sqlx::query(
        "INSERT INTO federation_seen (id, issuer, expires_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
    )
    .bind(e.id.as_str())
    .bind(e.issuer.as_str())
    .bind(until)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

async fn remember_now(ctx: &Context, e: &Envelope) -> Result<bool, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let first = remember(&mut tx, e, to_micros(ctx.now())).await?;
    tx.commit().await?;
    Ok(first)
}

/// What each side says when a link opens: its cursor (the last message it
/// committed from the other, in the other's epoch `cursor_epoch`) and its
/// own numbering (`epoch`, and `head`, the last number it gave).
fn hello_body(ctx: &Context, peer: &LinkPeer, epoch: &str, head: i64) -> serde_json::Value {
    json!({"cursor": peer.in_seq, "cursor_epoch": peer.in_epoch, "cursor_mark": peer.in_mark,
        "epoch": epoch, "head": head,
        "keys": ctx.identity.rotations()})
}

/// The other side's numbering as it opens the link: in the epoch we know,
/// a head below our cursor means its numbers went back (it was restored
/// from a backup). It restarts its epoch when it sees our cursor; we say so.
async fn note_their_numbering(ctx: &Context, peer: &LinkPeer, body: &serde_json::Value) {
    let epoch = body["epoch"].as_str().unwrap_or_default();
    let Some(head) = body["head"].as_i64() else {
        return;
    };
    if epoch != peer.in_epoch || head >= peer.in_seq {
        return;
    }
    let reason = format!(
        "the numbering of messages from {} went back from {} to {head}: it was restored from a backup or lost its state",
        peer.name, peer.in_seq
    );
    if let Err(e) = super::inbox::note_broken(ctx, peer, "inbound", &reason, None).await {
        tracing::warn!(error = %e, "cannot record a broken numbering");
    }
}

fn seal_to(ctx: &Context, peer: &str, kind: &str, body: serde_json::Value) -> String {
    let e = seal(
        &ctx.identity,
        peer,
        kind,
        body,
        to_micros(ctx.now()),
        MESSAGE_TTL,
    );
    serde_json::to_string(&e).unwrap_or_default()
}

/// Checks the first frame of a link: a fresh, valid envelope of `kind`
/// from an active peer. Pins a rotated key.
async fn opening(
    ctx: &Context,
    raw: &str,
    kind: &str,
    expected: Option<&str>,
) -> Option<(LinkPeer, Envelope)> {
    // The issuer is read before the signature is checked, only to find
    // the key to check it with.
    let issuer = serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| v["issuer"].as_str().map(str::to_owned))
        .unwrap_or_default();
    if expected.is_some_and(|e| e != issuer) {
        ctx.federation.refuse(
            &issuer,
            "not_a_peer",
            "the link was answered by another instance",
        );
        return None;
    }
    let peer = match load_peer(ctx, &issuer).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            ctx.federation.refuse(
                &issuer,
                "not_a_peer",
                &format!("{issuer} is not a peer of this instance"),
            );
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read peers");
            return None;
        }
    };
    let opened = open_frame(ctx, &peer, raw).await?;
    if let Some(field) = super::inbox::nul_field(&opened.envelope) {
        ctx.federation.refuse(
            &peer.name,
            "nul",
            &format!("`{field}` contains a NUL character (U+0000), which is not allowed"),
        );
        return None;
    }
    if opened.envelope.kind != kind {
        ctx.federation.refuse(
            &peer.name,
            "malformed",
            &format!("expected {kind}, got {}", opened.envelope.kind),
        );
        return None;
    }
    match remember_now(ctx, &opened.envelope).await {
        Ok(true) => {}
        Ok(false) => {
            let r = Refused::Replayed(opened.envelope.id.clone());
            ctx.federation.refuse(&peer.name, r.key(), &r.to_string());
            return None;
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record an envelope id");
            return None;
        }
    }
    let mut peer = peer;
    if let Some(key) = opened.rotated_to {
        if let Err(e) = super::peers::repin(ctx, &peer, &key).await {
            tracing::error!(error = %e, "cannot pin a peer's rotated key");
            return None;
        }
        peer.key = key;
    }
    Some((peer, opened.envelope))
}

fn cursor_of_body(body: &serde_json::Value) -> i64 {
    body["cursor"].as_i64().unwrap_or(0).max(0)
}

/// The accepting side of a link (the WebSocket route hands it over).
pub async fn accept(ctx: Arc<Context>, mut conn: Conn) {
    let Ok(Some(first)) = tokio::time::timeout(HANDSHAKE, conn.rx.recv()).await else {
        return;
    };
    tell_if_blocked(&ctx, &conn, &first).await;
    let Some((peer, hello)) = opening(&ctx, &first, "link.hello", None).await else {
        return;
    };
    let Some(session) = ctx
        .federation
        .register(&ctx.identity.instance_id, &peer.id, false)
    else {
        tracing::debug!(
            peer = peer.name,
            "a link is up already; refusing the second"
        );
        return;
    };
    if !still_allowed(&ctx, &peer.id).await {
        ctx.federation.unregister(&session);
        return;
    }
    note_their_numbering(&ctx, &peer, &hello.body).await;
    let Some((cursor, epoch, head)) = resume_point(&ctx, &peer, &hello.body).await else {
        ctx.federation.unregister(&session);
        return;
    };
    let mut body = hello_body(&ctx, &peer, &epoch, head);
    body["hello"] = json!(hello.id);
    let welcome = seal_to(&ctx, &peer.id, "link.welcome", body);
    if conn.tx.send(welcome).await.is_err() {
        ctx.federation.unregister(&session);
        return;
    }
    run(&ctx, peer, conn, cursor, epoch, session).await;
}

/// Where to resume sending to `peer` after its opening `body`: its cursor
/// in our epoch, our epoch (new if the numbering was broken), our head.
async fn resume_point(
    ctx: &Context,
    peer: &LinkPeer,
    body: &serde_json::Value,
) -> Option<(i64, String, i64)> {
    let cursor_epoch = body["cursor_epoch"].as_str().unwrap_or_default();
    let cursor_mark = body["cursor_mark"].as_str().unwrap_or_default();
    match outbox::reconcile(ctx, peer, cursor_of_body(body), cursor_epoch, cursor_mark).await {
        Ok((cursor, epoch)) => {
            let head = match load_peer(ctx, &peer.id).await {
                Ok(Some(p)) => p.out_seq,
                _ => peer.out_seq,
            };
            Some((cursor, epoch, head))
        }
        Err(e) => {
            tracing::warn!(peer = peer.name, error = %e, "cannot check the numbering with a peer");
            None
        }
    }
}

/// Dials `peer` and runs the link until it ends.
async fn dial(ctx: &Context, peer: &LinkPeer) -> Result<(), String> {
    let transport = ctx.federation.transport(ctx);
    let pin = TlsPin {
        key: *peer.key.as_bytes(),
        strict: peer.tls_pinned,
    };
    let mut conn = transport.dial(&connect_url(&peer.url), pin).await?;
    // The cursor and numbering as they are now, not as when the dial began
    // (the database may have changed meanwhile: a restore, say).
    let fresh = match load_peer(ctx, &peer.id).await {
        Ok(Some(p)) => p,
        _ => return Err("the peer is gone".into()),
    };
    let peer = &fresh;
    let hello = seal(
        &ctx.identity,
        &peer.id,
        "link.hello",
        hello_body(ctx, peer, &peer.out_epoch, peer.out_seq),
        to_micros(ctx.now()),
        MESSAGE_TTL,
    );
    conn.tx
        .send(serde_json::to_string(&hello).unwrap_or_default())
        .await
        .map_err(|_| "the connection closed".to_owned())?;
    let first = tokio::time::timeout(HANDSHAKE, conn.rx.recv())
        .await
        .map_err(|_| "no welcome in time".to_owned())?
        .ok_or_else(|| "the peer closed the link (refused?)".to_owned())?;
    if let Some(why) = blocked_by(ctx, peer, &first).await {
        return Err(why);
    }
    let (peer, welcome) = opening(ctx, &first, "link.welcome", Some(&peer.id))
        .await
        .ok_or_else(|| "the welcome was refused".to_owned())?;
    if welcome.body["hello"].as_str() != Some(hello.id.as_str()) {
        return Err("the welcome answers another hello".into());
    }
    let session = ctx
        .federation
        .register(&ctx.identity.instance_id, &peer.id, true)
        .ok_or_else(|| "a link is up already".to_owned())?;
    if !still_allowed(ctx, &peer.id).await {
        ctx.federation.unregister(&session);
        return Err("the peer was suspended or revoked meanwhile".into());
    }
    note_their_numbering(ctx, &peer, &welcome.body).await;
    let Some((cursor, epoch, _)) = resume_point(ctx, &peer, &welcome.body).await else {
        ctx.federation.unregister(&session);
        return Err("cannot check the numbering with the peer".into());
    };
    run(ctx, peer, conn, cursor, epoch, session).await;
    Ok(())
}

/// Read again once the link is registered: a suspension committed while
/// the handshake ran closed nothing yet, so it is honoured here.
async fn still_allowed(ctx: &Context, peer: &str) -> bool {
    matches!(
        load_peer(ctx, peer).await,
        Ok(Some(p)) if matches!(p.state, PeerState::Active | PeerState::Unreachable)
    )
}

/// A revoked or suspended peer that dials is told so, signed, so that it
/// can end its side too (its uses, its mirrors) or show that it waits; at
/// most every 10 s per peer.
async fn tell_if_blocked(ctx: &Context, conn: &Conn, first: &str) {
    let issuer = serde_json::from_str::<serde_json::Value>(first)
        .ok()
        .and_then(|v| v["issuer"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let Ok(Some(peer)) = load_peer(ctx, &issuer).await else {
        return;
    };
    let kind = match peer.state {
        PeerState::Revoked => "link.revoked",
        PeerState::Suspended => "link.suspended",
        _ => return,
    };
    {
        let mut told = lock(&ctx.federation.told_revoked);
        if told
            .get(&peer.id)
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        told.insert(peer.id.clone(), Instant::now());
    }
    let notice = seal_to(ctx, &peer.id, kind, json!({}));
    let _ = conn.tx.send(notice).await;
}

/// The peer told us, signed, that it revoked this instance (our side
/// ends) or suspended it (we show it, and keep trying at a slow pace).
async fn blocked_by(ctx: &Context, peer: &LinkPeer, raw: &str) -> Option<String> {
    let kind = serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned));
    if kind.as_deref() == Some("link.suspended") {
        opening(ctx, raw, "link.suspended", Some(&peer.id)).await?;
        if let Err(e) = super::peers::suspended_by_peer(ctx, peer).await {
            tracing::warn!(error = %e, "cannot record a suspension by the peer");
        }
        return Some(format!("{} suspended this instance", peer.name));
    }
    if kind.as_deref() != Some("link.revoked") {
        return None;
    }
    opening(ctx, raw, "link.revoked", Some(&peer.id)).await?;
    let actor = crate::timeline::Actor::instance(&peer.id, &peer.name);
    match super::peers::set_state(ctx, &actor, &peer.id, PeerState::Revoked).await {
        Ok(_) => tracing::warn!(peer = peer.name, "the peer revoked this instance"),
        Err(e) => tracing::warn!(error = %e, "cannot record a revocation by the peer"),
    }
    Some(format!("{} revoked this instance", peer.name))
}

/// A token bucket on the Context's clock.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: i64,
}

impl Bucket {
    fn new(rate: u32, now: i64) -> Bucket {
        let rate = f64::from(rate.max(1));
        Bucket {
            rate,
            tokens: rate * 2.0,
            at: now,
        }
    }

    fn refill(&mut self, now: i64) {
        let elapsed = (now - self.at).max(0) as f64 / 1e6;
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate * 2.0);
    }

    /// Spends `n` after the fact (it may run into debt).
    fn charge(&mut self, n: u64, now: i64) {
        self.refill(now);
        self.tokens -= n as f64;
    }

    /// Whether anything is left to spend.
    fn ready(&mut self, now: i64) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    fn take(&mut self, now: i64) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What one side of a link keeps while it runs.
struct Link<'a> {
    ctx: &'a Context,
    peer: LinkPeer,
    out: mpsc::Sender<String>,
    /// Our epoch for this link: acks and nacks of another are stale.
    epoch: String,
    /// Highest sequence sent, and acknowledged, to the peer.
    sent: i64,
    acked: i64,
    paused_until: Option<Instant>,
    bucket: Bucket,
    /// What applying its messages cost, in rows.
    work: Bucket,
    last_nack: Option<(i64, Instant)>,
}

async fn run(
    ctx: &Context,
    peer: LinkPeer,
    conn: Conn,
    their_cursor: i64,
    epoch: String,
    mut session: Session,
) {
    let Conn {
        tx: out,
        rx: mut inbound,
    } = conn;
    super::peers::link_up(ctx, &peer).await;
    let now = to_micros(ctx.now());
    let mut link = Link {
        ctx,
        bucket: Bucket::new(ctx.config.federation.max_messages_per_second, now),
        work: Bucket::new(ctx.config.federation.max_work_per_second, now),
        peer,
        out,
        epoch,
        sent: their_cursor,
        acked: their_cursor,
        paused_until: None,
        last_nack: None,
    };
    tracing::info!(
        peer = link.peer.name,
        cursor = their_cursor,
        "federation link up"
    );
    if let Err(e) = outbox::acknowledged(&ctx.db, &link.peer.id, their_cursor).await {
        tracing::warn!(error = %e, "cannot trim the outbox");
    }
    let waker = ctx.federation.waker(&link.peer.id);
    loop {
        if *session.closed.borrow() {
            break;
        }
        let more = match link.send_some().await {
            Ok(more) => more,
            Err(()) => break,
        };
        let pause = link.paused_until;
        tokio::select! {
            biased;
            _ = session.closed.changed() => break,
            frame = inbound.recv() => match frame {
                Some(first) => {
                    let mut frames = vec![first];
                    while frames.len() < APPLY_BATCH {
                        match inbound.try_recv() {
                            Ok(f) => frames.push(f),
                            Err(_) => break,
                        }
                    }
                    if link.receive(frames).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            _ = waker.notified() => {}
            _ = async {
                match pause {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None if more => {}
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
    ctx.federation.unregister(&session);
    super::peers::link_down(ctx, &link.peer.id).await;
    tracing::info!(peer = link.peer.name, "federation link down");
}

impl Link<'_> {
    /// Sends queued messages while the window allows; Ok(true) if more wait.
    async fn send_some(&mut self) -> Result<bool, ()> {
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            return Ok(false);
        }
        self.paused_until = None;
        let room = WINDOW - (self.sent - self.acked);
        if room <= 0 {
            return Ok(false);
        }
        let limit = room.min(SEND_BATCH);
        let queued =
            match outbox::after(self.ctx.db.reader(), &self.peer.id, self.sent, limit).await {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the outbox");
                    self.paused_until = Some(Instant::now() + Duration::from_secs(1));
                    return Ok(false);
                }
            };
        let full = queued.len() as i64 == limit;
        for q in queued {
            let frame = seal_to(
                self.ctx,
                &self.peer.id,
                &q.kind,
                json!({"seq": q.seq, "epoch": self.epoch, "mark": q.mark, "data": q.body}),
            );
            self.out.send(frame).await.map_err(|_| ())?;
            self.sent = q.seq;
            self.ctx.federation.sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(full)
    }

    /// Handles frames that arrived together: acks, nacks, and messages
    /// committed in one transaction, then acknowledged.
    async fn receive(&mut self, frames: Vec<String>) -> Result<(), ()> {
        let mut messages = Vec::new();
        let mut dropped = false;
        for raw in frames {
            if raw.len() > super::envelope::MAX_ENVELOPE_BYTES {
                self.ctx.federation.refuse(
                    &self.peer.name,
                    "too_large",
                    "frame over the size limit",
                );
                dropped = true;
                continue;
            }
            if !self.bucket.take(to_micros(self.ctx.now())) {
                self.ctx.federation.refuse(
                    &self.peer.name,
                    "rate",
                    "more messages per second than allowed",
                );
                dropped = true;
                continue;
            }
            let Some(opened) = open_frame(self.ctx, &self.peer, &raw).await else {
                dropped = true;
                continue;
            };
            let e = opened.envelope;
            match e.kind.as_str() {
                // An ack of another epoch is stale: it counts nothing of ours.
                "link.ack" if e.body["epoch"].as_str().unwrap_or_default() != self.epoch => {}
                "link.ack" => {
                    let upto = e.body["upto"].as_i64().unwrap_or(0);
                    if upto > self.acked {
                        self.acked = upto.min(self.sent);
                        if let Err(err) =
                            outbox::acknowledged(&self.ctx.db, &self.peer.id, self.acked).await
                        {
                            tracing::warn!(error = %err, "cannot trim the outbox");
                        }
                    }
                }
                "link.nack" => {
                    // A nack in another epoch: the peer has nothing of ours yet.
                    let from = if e.body["epoch"].as_str().unwrap_or_default() == self.epoch {
                        e.body["from"].as_i64().unwrap_or(1).max(1)
                    } else {
                        1
                    };
                    let wait = e.body["retry_ms"].as_u64().unwrap_or(100).min(60_000);
                    if from - 1 < self.sent {
                        self.sent = (from - 1).max(self.acked);
                    }
                    self.paused_until = Some(Instant::now() + Duration::from_millis(wait));
                }
                _ if e.body["seq"].is_i64() => {
                    // Its cost is known before it is applied: once the
                    // budget is spent, the rest waits (nacked) until the
                    // clock refills it.
                    let now = to_micros(self.ctx.now());
                    if !self.work.ready(now) {
                        self.ctx.federation.refuse(
                            &self.peer.name,
                            "work",
                            "messages that cost more work per second than allowed (federation.max_work_per_second)",
                        );
                        dropped = true;
                        continue;
                    }
                    self.work
                        .charge(super::uses::work_of(&e.kind, &e.body["data"]), now);
                    messages.push(e);
                }
                other => self.ctx.federation.refuse(
                    &self.peer.name,
                    "malformed",
                    &format!("unknown message {other}"),
                ),
            }
        }
        if messages.is_empty() && !dropped {
            return Ok(());
        }
        let applied = super::inbox::apply(self.ctx, &self.peer, messages).await;
        let (cursor, epoch, gap) = match applied {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(peer = self.peer.name, error = %e, "cannot commit messages from a peer");
                (self.peer.in_seq, self.peer.in_epoch.clone(), true)
            }
        };
        let new_epoch = epoch != self.peer.in_epoch;
        if cursor > self.peer.in_seq || new_epoch {
            let before = if new_epoch { 0 } else { self.peer.in_seq };
            self.ctx
                .federation
                .applied
                .fetch_add((cursor - before).max(0) as u64, Ordering::Relaxed);
            self.peer.in_seq = cursor;
            self.peer.in_epoch = epoch;
            let ack = seal_to(
                self.ctx,
                &self.peer.id,
                "link.ack",
                json!({"upto": cursor, "epoch": self.peer.in_epoch}),
            );
            self.out.send(ack).await.map_err(|_| ())?;
        }
        if gap || dropped {
            let now = Instant::now();
            let recent = self.last_nack.is_some_and(|(from, at)| {
                from == cursor + 1 && now - at < Duration::from_millis(200)
            });
            if !recent {
                self.last_nack = Some((cursor + 1, now));
                let nack = seal_to(
                    self.ctx,
                    &self.peer.id,
                    "link.nack",
                    json!({"from": cursor + 1, "epoch": self.peer.in_epoch, "retry_ms": if dropped { 250 } else { 20 }}),
                );
                self.out.send(nack).await.map_err(|_| ())?;
            }
        }
        Ok(())
    }
}

/// Starts the supervisor: one maintainer per active or unreachable peer,
/// and the sweep that marks peers unreachable and forgets old envelope ids.
pub fn spawn(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut stop = stop;
        let mut next_sweep = Instant::now();
        loop {
            if *stop.borrow() {
                ctx.federation.close_all();
                return;
            }
            match live_peers(&ctx).await {
                Ok(peers) => {
                    for peer in peers {
                        if lock(&ctx.federation.maintained).insert(peer.clone()) {
                            tokio::spawn(maintain(ctx.clone(), peer, stop.clone()));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list peers"),
            }
            if Instant::now() >= next_sweep {
                ctx.federation.flush_refusals();
                if let Err(e) = sweep(&ctx).await {
                    tracing::warn!(error = %e, "federation sweep failed");
                }
                next_sweep = Instant::now() + Duration::from_secs(60);
            }
            tokio::select! {
                _ = ctx.federation.changed.notified() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}

async fn live_peers(ctx: &Context) -> Result<Vec<String>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT instance_id FROM peers WHERE state IN ('active', 'unreachable')")
            .fetch_all(ctx.db.reader())
            .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

/// A fraction in [0.5, 1.0) from the system's randomness.
fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    0.5 + f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX) / 2.0
}

/// The delay before the next dial after `failures` failures in a row.
pub fn backoff(initial_ms: u64, max_secs: u64, failures: u32) -> Duration {
    let max = max_secs.saturating_mul(1_000).max(1);
    let base = initial_ms
        .max(1)
        .saturating_mul(1u64 << failures.min(30).saturating_sub(1))
        .min(max);
    Duration::from_millis((base as f64 * jitter()) as u64)
}

/// A link shorter than this did not really come up.
const SHORT_LINK: Duration = Duration::from_secs(5);

/// Keeps one peer linked until it stops being active or unreachable.
async fn maintain(ctx: Arc<Context>, peer_id: String, mut stop: watch::Receiver<bool>) {
    let cfg = ctx.config.federation.clone();
    let mut failures: u32 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        let peer = match load_peer(&ctx, &peer_id).await {
            Ok(Some(p)) if matches!(p.state, PeerState::Active | PeerState::Unreachable) => p,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a peer");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if ctx.federation.connected(&peer.id) {
            // The peer dialed us; look again when that link may have ended.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        if ctx.identity.instance_id > peer.id && failures == 0 {
            // The smaller id dials first; give its link a moment.
            tokio::time::sleep(Duration::from_millis((200.0 * jitter()) as u64)).await;
            if ctx.federation.connected(&peer.id) {
                continue;
            }
        }
        let started = Instant::now();
        // A link that ends at once (a message it cannot get past, a peer
        // that drops it) counts as a failure, or this would redial in a
        // tight loop.
        let outcome = dial(&ctx, &peer).await.and_then(|()| {
            let lasted = started.elapsed();
            if lasted < SHORT_LINK {
                Err(format!("the link ended after {} ms", lasted.as_millis()))
            } else {
                Ok(())
            }
        });
        match outcome {
            Ok(()) => {
                failures = 0;
                lock(&ctx.federation.health).remove(&peer.id);
                continue;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(cfg.retry_initial_ms, cfg.retry_max_seconds, failures);
                let next = to_micros(ctx.now()) + wait.as_micros() as i64;
                tracing::info!(
                    peer = peer.name,
                    failures,
                    error = e,
                    wait_ms = wait.as_millis() as u64,
                    "cannot link to peer; will retry"
                );
                lock(&ctx.federation.health).insert(
                    peer.id.clone(),
                    LinkHealth {
                        failures,
                        next_attempt_at: Some(next),
                        last_error: Some(e),
                    },
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    lock(&ctx.federation.maintained).remove(&peer_id);
}

/// Marks peers no link reached for `unreachable_after_hours` unreachable,
/// and forgets envelope ids whose envelopes expired.
pub async fn sweep(ctx: &Context) -> Result<(), super::peers::FederationError> {
    let now = to_micros(ctx.now());
    let limit =
        now - (ctx.config.federation.unreachable_after_hours as i64).saturating_mul(3_600_000_000);
    let rows = sqlx::query(
        "SELECT instance_id FROM peers WHERE state = 'active' AND COALESCE(last_seen_at, updated_at) < $1",
    )
    .bind(limit)
    .fetch_all(ctx.db.reader())
    .await?;
    for row in rows {
        let id: String = row.try_get(0)?;
        if ctx.federation.connected(&id) {
            continue;
        }
        let actor = crate::timeline::Actor::instance(&ctx.identity.instance_id, "federation");
        let to = PeerState::Unreachable;
        match super::peers::change_state(ctx, &actor, &id, Some(PeerState::Active), to).await {
            // Someone changed it meanwhile (suspended, say): theirs stands.
            Ok(_) | Err(super::peers::FederationError::Peer(_)) => {}
            Err(e) => return Err(e),
        }
    }
    let mut tx = ctx.db.begin().await?;
    sqlx::query("DELETE FROM federation_seen WHERE expires_at < $1")
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// WebSockets with rustls: the peer's certificate carries its pinned key
/// (or, for a peer behind a proxy, the public roots vouch for it); plain
/// `ws://` only to loopback unless the configuration allows it.
struct WsTransport {
    allow_plaintext: bool,
}

/// Plain `ws://` or `http://` is for loopback, or for development when
/// `federation.allow_plaintext` says so; anything else must be TLS.
pub(crate) fn plaintext_refused(url: &str, allow_plaintext: bool) -> bool {
    let plain = url.starts_with("ws://") || url.starts_with("http://");
    plain && !allow_plaintext && !is_loopback_url(url)
}

fn is_loopback_url(url: &str) -> bool {
    let rest = url.split("://").nth(1).unwrap_or("");
    let host = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Transport for WsTransport {
    fn dial<'a>(&'a self, url: &'a str, pin: TlsPin) -> BoxFuture<'a, Result<Conn, String>> {
        Box::pin(async move {
            if plaintext_refused(url, self.allow_plaintext) {
                return Err(format!(
                    "refusing plain ws:// to {url}: use https, or set federation.allow_plaintext for development"
                ));
            }
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(TRANSPORT_LIMIT))
                .max_frame_size(Some(TRANSPORT_LIMIT));
            let tls = super::tls::client_config(super::tls::Pin::Key(pin.key), pin.strict)
                .map_err(|e| format!("TLS configuration: {e}"))?;
            let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls));
            let (stream, _) = tokio::time::timeout(
                HANDSHAKE,
                tokio_tungstenite::connect_async_tls_with_config(
                    url,
                    Some(config),
                    false,
                    Some(connector),
                ),
            )
            .await
            .map_err(|_| format!("connecting to {url} timed out"))?
            .map_err(|e| format!("cannot connect to {url}: {}", with_causes(&e)))?;
            Ok(pump_tungstenite(stream))
        })
    }
}

/// An error with the errors beneath it: "cannot connect" alone does not say
/// that the certificate was refused.
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The largest WebSocket message taken in. Larger than an envelope may be,
/// so that an oversized frame is refused by the link (counted, logged, the
/// sender told where to resume) rather than closing the connection; beyond
/// it the transport closes, and says why.
pub const TRANSPORT_LIMIT: usize = 4 * super::envelope::MAX_ENVELOPE_BYTES;

/// Why a link's connection ended, for the log.
fn closed_because(e: Option<&dyn std::error::Error>, silent: bool) {
    match e {
        Some(e) => tracing::warn!(error = with_causes(e), "federation connection closed"),
        None if silent => tracing::warn!(
            seconds = (PING_EVERY * 3).as_secs(),
            "federation connection closed: the peer was silent"
        ),
        None => tracing::debug!("federation connection closed by the peer"),
    }
}

/// Heartbeat: a ping this often; a link silent for three of them is dead.
const PING_EVERY: Duration = Duration::from_secs(15);

fn pump_tungstenite<S>(stream: tokio_tungstenite::WebSocketStream<S>) -> Conn
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut sink, mut stream) = stream.split();
    let (out_tx, mut out_rx) = mpsc::channel::<String>(4_096);
    let (in_tx, in_rx) = mpsc::channel::<String>(4_096);
    tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                text = out_rx.recv() => match text {
                    Some(t) => if sink.send(Message::Text(t.into())).await.is_err() { break },
                    None => break,
                },
                _ = ping.tick() => if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break },
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(PING_EVERY * 3, stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if in_tx.send(t.to_string()).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)))) => {}
                Ok(Some(Ok(Message::Binary(_)))) => {
                    tracing::warn!(
                        "federation connection closed: a binary frame (only text is spoken)"
                    );
                    break;
                }
                Ok(Some(Ok(Message::Close(_))) | None) => {
                    closed_because(None, false);
                    break;
                }
                Ok(Some(Err(e))) => {
                    closed_because(Some(&e), false);
                    break;
                }
                Err(_) => {
                    closed_because(None, true);
                    break;
                }
            }
        }
    });
    Conn {
        tx: out_tx,
        rx: in_rx,
    }
}

/// The server end of a WebSocket, as a [`Conn`].
pub fn pump_axum(socket: axum::extract::ws::WebSocket) -> Conn {
    use axum::extract::ws::Message;
    use futures_util::{SinkExt, StreamExt};
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<String>(4_096);
    let (in_tx, in_rx) = mpsc::channel::<String>(4_096);
    tokio::spawn(async move {
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                text = out_rx.recv() => match text {
                    Some(t) => if sink.send(Message::Text(t.into())).await.is_err() { break },
                    None => break,
                },
                _ = ping.tick() => if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break },
            }
        }
        let _ = sink.send(Message::Close(None)).await;
    });
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(PING_EVERY * 3, stream.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if in_tx.send(t.to_string()).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(Some(Ok(Message::Binary(_)))) => {
                    tracing::warn!(
                        "federation connection closed: a binary frame (only text is spoken)"
                    );
                    break;
                }
                Ok(Some(Ok(Message::Close(_))) | None) => {
                    closed_because(None, false);
                    break;
                }
                Ok(Some(Err(e))) => {
                    closed_because(Some(&e), false);
                    break;
                }
                Err(_) => {
                    closed_because(None, true);
                    break;
                }
            }
        }
    });
    Conn {
        tx: out_tx,
        rx: in_rx,
    }
}

/// Instances in one process, linked through channels: the transport of
/// the in-process federation tests. `cut` partitions an instance (its
/// links drop and dials fail) until `heal`.
#[derive(Default)]
pub struct MemoryNet {
    routes: Mutex<HashMap<String, Arc<Context>>>,
    cuts: Mutex<HashMap<String, watch::Sender<bool>>>,
}

impl MemoryNet {
    /// Makes `ctx` reachable at its base URL.
    pub fn attach(&self, url: &str, ctx: Arc<Context>) {
        let endpoint = connect_url(url);
        lock(&self.routes).insert(endpoint.clone(), ctx);
        lock(&self.cuts).insert(endpoint, watch::channel(false).0);
    }

    pub fn cut(&self, url: &str) {
        if let Some(c) = lock(&self.cuts).get(&connect_url(url)) {
            let _ = c.send(true);
        }
    }

    pub fn heal(&self, url: &str) {
        if let Some(c) = lock(&self.cuts).get(&connect_url(url)) {
            let _ = c.send(false);
        }
    }
}

/// Copies frames from `from` to `to` until either ends or the cut flag rises.
fn relay(
    mut from: mpsc::Receiver<String>,
    to: mpsc::Sender<String>,
    mut cut: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            if *cut.borrow() {
                break;
            }
            tokio::select! {
                frame = from.recv() => match frame {
                    Some(f) => if to.send(f).await.is_err() { break },
                    None => break,
                },
                _ = cut.changed() => {}
            }
        }
    });
}

impl Transport for MemoryNet {
    fn dial<'a>(&'a self, url: &'a str, _pin: TlsPin) -> BoxFuture<'a, Result<Conn, String>> {
        Box::pin(async move {
            let target = lock(&self.routes).get(url).cloned();
            let cut = lock(&self.cuts).get(url).map(|c| c.subscribe());
            let (Some(target), Some(cut)) = (target, cut) else {
                return Err(format!("nothing listens at {url}"));
            };
            if *cut.borrow() {
                return Err(format!("{url} is cut off"));
            }
            let (client_out, relay_in) = mpsc::channel(4_096);
            let (relay_out, server_in) = mpsc::channel(4_096);
            let (server_out, relay_back) = mpsc::channel(4_096);
            let (relay_back_out, client_in) = mpsc::channel(4_096);
            relay(relay_in, relay_out, cut.clone());
            relay(relay_back, relay_back_out, cut);
            tokio::spawn(accept(
                target,
                Conn {
                    tx: server_out,
                    rx: server_in,
                },
            ));
            Ok(Conn {
                tx: client_out,
                rx: client_in,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_loopback() {
        assert_eq!(
            connect_url("https://a.example/"),
            "wss://a.example/api/v1/federation/connect"
        );
        assert_eq!(
            connect_url("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/api/v1/federation/connect"
        );
        assert!(is_loopback_url("ws://127.0.0.1:80/x"));
        assert!(is_loopback_url("ws://[::1]:80/x"));
        assert!(is_loopback_url("ws://localhost:1/x"));
        assert!(!is_loopback_url("ws://10.0.0.1:80/x"));
        assert!(!is_loopback_url("ws://example.org/x"));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        for failures in 1..40 {
            let d = backoff(1_000, 3_600, failures);
            let base = (1_000u64 << (failures - 1).min(30)).min(3_600_000);
            assert!(d.as_millis() as u64 >= base / 2, "{failures}: {d:?}");
            assert!(d.as_millis() as u64 <= base, "{failures}: {d:?}");
        }
    }

    #[test]
    fn refusals_of_a_burst_are_one_line_with_their_count() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(
            log.note("mallory", "too_large", t0),
            Some(1),
            "the first at once"
        );
        for _ in 0..4_745 {
            assert_eq!(log.note("mallory", "too_large", t0), None);
        }
        assert_eq!(
            log.note("mallory", "rate", t0),
            Some(1),
            "another reason is another line"
        );
        assert_eq!(
            log.note("other", "too_large", t0),
            Some(1),
            "another peer too"
        );
        assert!(log.flush(t0 + Duration::from_secs(1)).is_empty(), "not yet");
        let later = t0 + REFUSAL_LOG_EVERY;
        assert_eq!(
            log.flush(later),
            vec![(("mallory".to_owned(), "too_large"), 4_745)],
            "the rest of the burst, counted"
        );
        assert!(log.flush(later + REFUSAL_LOG_EVERY).is_empty(), "told once");
        assert_eq!(
            log.note("mallory", "too_large", later + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            log.note("mallory", "too_large", later + REFUSAL_LOG_EVERY),
            Some(2),
            "the next interval's line counts what came since"
        );
        assert_eq!(log.lines, 5);
    }

    #[test]
    fn the_bucket_refills_with_the_clock() {
        let mut b = Bucket::new(2, 0);
        assert!((0..4).all(|_| b.take(0)));
        assert!(!b.take(0));
        assert!(b.take(500_000));
        assert!(!b.take(500_000));
    }
}
