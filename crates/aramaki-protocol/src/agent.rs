//! The agent protocol: what an agent and its server say to each other.
//!
//! # Transport
//!
//! One WebSocket per agent at `GET /api/v1/agents/connect`, text frames, one
//! JSON object per frame, tagged by `"type"`. Enrollment uses the same socket
//! (an agent that has no key yet has nothing else to talk to), so the agent
//! needs no HTTP client.
//!
//! # Session
//!
//! 1. agent → [`AgentMessage::Hello`] with its id, public key, a fresh nonce
//!    and a fresh exchange key (or [`AgentMessage::EnrollHello`], see
//!    below);
//! 2. server → [`ServerMessage::Challenge`]: its own nonce and exchange key
//!    and its signature over [`server_transcript`]; the agent verifies it
//!    against the server key it pinned at enrollment and hangs up if it does
//!    not match;
//! 3. agent → [`AgentMessage::Auth`]: its signature over [`agent_transcript`];
//! 4. server → [`ServerMessage::Welcome`] with the checks for this agent, or
//!    [`ServerMessage::Refused`] with a [`Refusal`] and closes.
//!
//! From the welcome on, every frame in both directions is sealed
//! ([`crate::frames`]): counted and authenticated under keys derived from
//! the exchange and [`session_transcript`].
//!
//! Enrollment: agent → [`AgentMessage::EnrollHello`] (a nonce, no token);
//! server → [`ServerMessage::EnrollProof`] (its key and a signature over
//! [`enroll_transcript`]); the agent checks the key against the token's
//! fingerprint and the signature, and only then proves the token (never
//! sending its secret) in [`AgentMessage::Enroll`], answered by
//! [`ServerMessage::Enrolled`].
//!
//! Then, in any order: results up ([`AgentMessage::Records`], acknowledged by
//! [`ServerMessage::Ack`] once committed), heartbeats both ways, check
//! definitions down whenever they change, action requests down and their
//! outcomes up.
//!
//! # Nothing is lost
//!
//! Every record carries the agent's sequence number, strictly increasing over
//! the agent's life and never reused. The agent keeps each record on disk until
//! acknowledged and replays unacknowledged ones in order after reconnecting;
//! the server commits a record and the agent's high-water mark in one
//! transaction and ignores records at or below it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of this protocol; a server refuses agents that speak another.
pub const AGENT_PROTOCOL_VERSION: u32 = 2;

/// Path of the agent endpoint on a server.
pub const CONNECT_PATH: &str = "/api/v1/agents/connect";

/// Messages from the agent to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// First message of an enrollment: asks the server to prove its key
    /// before any token leaves the host.
    EnrollHello {
        protocol: u32,
        /// 32 random bytes, hex: the server must sign them.
        nonce: String,
        /// The agent's new Ed25519 public key, 64 hex digits.
        public_key: String,
    },
    /// Second message of an enrollment, after the server proved the key the
    /// token names: trade the token for a registration.
    Enroll {
        protocol: u32,
        /// The id of the enrollment token (its visible prefix). The secret
        /// never leaves the agent: `mac` proves it.
        token_id: String,
        /// [`enroll_mac`], hex: keyed by the hash of the token's secret that
        /// the server stores, over both nonces, both keys, the token id and
        /// the name, so that a relay that saw it can neither replay it nor
        /// enroll another key with it.
        mac: String,
        /// The agent's new Ed25519 public key, 64 hex digits.
        public_key: String,
        /// A name for this agent, unique per server (the host name by default).
        name: String,
        version: String,
    },
    /// First message of a session.
    Hello {
        protocol: u32,
        agent_id: String,
        /// The key the agent holds; a different key than the registered one
        /// is refused ([`Refusal::KeyChanged`]).
        public_key: String,
        /// 32 random bytes, hex: the server must sign them.
        nonce: String,
        /// The agent's ephemeral exchange key for this session (32 bytes
        /// hex, see [`crate::frames::Exchange`]).
        exchange: String,
        version: String,
        /// Subscriptions from the agent's configuration.
        #[serde(default)]
        subscriptions: Vec<String>,
        /// Records waiting in the agent's queue.
        #[serde(default)]
        queue_depth: u64,
        /// Which queue incarnations numbered the waiting records.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        spans: Vec<QueueSpan>,
    },
    /// The agent's signature over [`agent_transcript`], hex.
    Auth { signature: String },
    /// Records in sequence order.
    Records { records: Vec<Record> },
    /// Liveness, every `heartbeat_secs`; doubles as the keepalive.
    Heartbeat {
        queue_depth: u64,
        /// Records dropped so far because the queue was full.
        #[serde(default)]
        dropped: u64,
    },
    /// What became of an [`ServerMessage::Action`] request.
    ActionUpdate(ActionUpdate),
}

/// Messages from the server to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerMessage {
    /// Answer to [`AgentMessage::EnrollHello`]: the server's key and its
    /// signature over [`enroll_transcript`].
    EnrollProof {
        /// 32 random bytes, hex: the server's nonce for this enrollment.
        nonce: String,
        server_key: String,
        signature: String,
    },
    /// Answer to a successful [`AgentMessage::Enroll`].
    Enrolled {
        agent_id: String,
        /// The system this agent is bound to.
        system: String,
        /// The server's Ed25519 public key, 64 hex digits; the agent checks it
        /// against the fingerprint in the token and pins it.
        server_key: String,
    },
    /// Answer to [`AgentMessage::Hello`].
    Challenge {
        /// 32 random bytes, hex: the agent must sign them.
        nonce: String,
        /// The server's ephemeral exchange key for this session.
        exchange: String,
        /// The server's signature over [`server_transcript`], hex.
        signature: String,
    },
    /// The session is authenticated.
    Welcome {
        /// The highest sequence number the server has committed; the agent
        /// may drop anything at or below it from its queue.
        acked: u64,
        heartbeat_secs: u32,
        checks: Vec<CheckDefinition>,
        /// The queue incarnations the server has committed records of: a
        /// waiting record at or below `acked` from another one is new, not a
        /// replay (the agent's state was restored from an older copy).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        incarnations: Vec<String>,
    },
    /// The session or enrollment is refused; the server closes the socket.
    Refused { reason: Refusal, message: String },
    /// A refusal of a `hello`, before frames are sealed: signed over
    /// [`refusal_transcript`] with the agent id, key, nonce and exchange key
    /// the server received, so that a relay cannot make an agent stop for
    /// good with a refusal of its own or one the server gave to the relay's
    /// rewritten `hello` (the agent takes anything else as a reason to
    /// retry, never as final).
    SignedRefusal {
        reason: Refusal,
        message: String,
        signature: String,
    },
    /// Every record with a sequence number up to and including `up_to` is
    /// committed, except those in `refused`: the server will not store them
    /// (an identifier holding U+0000, say) and counts them as handled, so
    /// the agent drops them from its queue instead of sending them again.
    Ack {
        up_to: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refused: Vec<RecordRefusal>,
    },
    /// The complete, current set of checks for this agent (replaces the last).
    Checks { checks: Vec<CheckDefinition> },
    /// Answer to a heartbeat.
    Heartbeat,
    /// Run a named, locally allow-listed action. The server names the action;
    /// it never sends a command line.
    Action(SignedAction),
    /// Stop a running action (its process group is killed).
    Cancel { run_id: String },
}

/// A record the server acknowledged without storing it, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordRefusal {
    pub seq: u64,
    /// The field at fault (`check`, `labels.env`, `facts`, …).
    pub field: String,
    pub message: String,
}

/// Records numbered from `first_seq` on by one incarnation of the agent's
/// queue (a random id drawn each time the queue is opened).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpan {
    pub incarnation: String,
    pub first_seq: u64,
}

/// Why a session or an enrollment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The enrollment token is past its expiry.
    TokenExpired,
    /// The single-use token was used already.
    TokenUsed,
    /// No such token, or it was revoked.
    TokenInvalid,
    /// The agent presents another key than the one it enrolled with.
    KeyChanged,
    /// An admin revoked this agent.
    Revoked,
    /// No agent with this id.
    UnknownAgent,
    /// The signature over the transcript does not verify.
    BadSignature,
    /// The agent speaks another protocol version.
    Protocol,
    /// A message that does not fit the protocol.
    Malformed,
    /// The agent name is taken by another agent.
    NameTaken,
    /// A frame failed its integrity check (forged, replayed or reordered on
    /// the way); the session ends, a new one may be tried.
    Integrity,
}

impl Refusal {
    /// The words every log line uses for this refusal.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::TokenExpired => "token expired",
            Refusal::TokenUsed => "token already used",
            Refusal::TokenInvalid => "token unknown or revoked",
            Refusal::KeyChanged => "key changed",
            Refusal::Revoked => "agent revoked",
            Refusal::UnknownAgent => "unknown agent",
            Refusal::BadSignature => "signature does not verify",
            Refusal::Protocol => "protocol version not supported",
            Refusal::Malformed => "malformed message",
            Refusal::NameTaken => "agent name taken",
            Refusal::Integrity => "a frame failed its integrity check",
        }
    }

    /// Refusals that a retry cannot fix: the agent stops instead of looping.
    pub fn is_final(self) -> bool {
        !matches!(self, Refusal::Malformed | Refusal::Integrity)
    }
}

/// One queued item, numbered by the agent. (Not `deny_unknown_fields`: serde
/// cannot combine it with `flatten`; the body's own types are strict.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    #[serde(flatten)]
    pub body: RecordBody,
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RecordBody {
    /// The outcome of a check, a probe or a pushed result.
    Result(CheckResult),
    /// The queue was full and the oldest records were dropped.
    Dropped {
        count: u64,
        first_seq: u64,
        last_seq: u64,
    },
    /// Inventory facts about the host (name → value).
    Facts { facts: BTreeMap<String, String> },
    /// The final outcome of an action run (queued like results, so that it
    /// survives a lost connection).
    Action(ActionUpdate),
    /// Something the agent noticed that belongs on its system's timeline.
    Notice { notice: Notice, message: String },
    /// A result pushed with a `ttl`: the server expects the check's next
    /// result within `ttl_secs` and marks it CRITICAL otherwise.
    Pushed { result: CheckResult, ttl_secs: u32 },
}

/// What an agent reports about itself through its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Notice {
    /// The agent refused a frame of a session (forged, replayed or
    /// reordered): someone between agent and server tampers.
    FrameRefused,
    /// The agent's queue numbered below what the server already committed
    /// (state lost or restored from a backup): its unacknowledged records
    /// were renumbered above the server's mark.
    QueueRenumbered,
}

impl Notice {
    /// The timeline kind of the event the server records.
    pub fn kind(self) -> &'static str {
        match self {
            Notice::FrameRefused => "agent.frame_refused",
            Notice::QueueRenumbered => "agent.queue_renumbered",
        }
    }
}

/// A check result in the Nagios convention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResult {
    pub check: String,
    /// The system the result belongs to; absent means the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Nagios exit code: 0 OK, 1 WARNING, 2 CRITICAL, anything else UNKNOWN.
    pub status: i32,
    /// The whole output (capped by the agent).
    pub output: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<Metric>,
    /// When the check started, µs since the Unix epoch.
    pub executed_at: i64,
    pub duration_ms: u64,
    /// Where the result came from: `check`, `probe`, `push` or `ttl`.
    pub source: String,
}

/// One performance data item (`'label'=value[UOM];warn;crit;min;max`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// The Nagios verdict of an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckState {
    Ok,
    Warning,
    Critical,
    Unknown,
}

impl CheckState {
    pub fn from_exit(code: i32) -> CheckState {
        match code {
            0 => CheckState::Ok,
            1 => CheckState::Warning,
            2 => CheckState::Critical,
            _ => CheckState::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Ok => "ok",
            CheckState::Warning => "warning",
            CheckState::Critical => "critical",
            CheckState::Unknown => "unknown",
        }
    }
}

/// A check as the agent runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckDefinition {
    pub name: String,
    pub run: Runner,
    pub schedule: Schedule,
    /// Seconds before the process group is killed and the result is UNKNOWN.
    pub timeout_secs: u32,
    /// Dead-man's switch: the server marks the check CRITICAL if no result
    /// arrives for this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u32>,
    /// The system results belong to; absent means the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Output beyond this many bytes is cut (default 64 KiB).
    #[serde(default = "default_output_limit")]
    pub output_limit: u32,
}

pub fn default_output_limit() -> u32 {
    64 * 1024
}

/// How a check produces its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Runner {
    /// A program run as argv, without a shell.
    Command {
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// A command line for `/bin/sh -c`, only when asked for explicitly.
    Shell {
        script: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
    },
    /// A probe built into the agent.
    Probe(Probe),
}

/// Probes that need no plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "probe", rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// Always OK while the agent runs.
    Keepalive,
    /// Load average against per-core thresholds.
    Load {
        #[serde(default = "default_load_warn")]
        warn: f64,
        #[serde(default = "default_load_crit")]
        crit: f64,
    },
    /// Memory in use (percent of total, counting reclaimable cache as free).
    Memory {
        #[serde(default = "default_pct_warn")]
        warn_pct: f64,
        #[serde(default = "default_pct_crit")]
        crit_pct: f64,
    },
    /// Disk usage of one mount, or of every real mount if none given.
    Disk {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mount: Option<String>,
        #[serde(default = "default_pct_warn")]
        warn_pct: f64,
        #[serde(default = "default_pct_crit")]
        crit_pct: f64,
    },
    /// A TCP connect.
    Tcp { host: String, port: u16 },
    /// An HTTP(S) GET.
    Http {
        url: String,
        #[serde(default = "default_http_status")]
        expect_status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        body_contains: Option<String>,
        /// WARNING when the certificate expires within this many days.
        #[serde(default = "default_cert_warn")]
        cert_warn_days: u32,
        #[serde(default = "default_cert_crit")]
        cert_crit_days: u32,
    },
    /// At least `min` and at most `max` processes with this name.
    Process {
        name: String,
        #[serde(default = "default_one")]
        min: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<u32>,
    },
    /// A systemd unit is active.
    Systemd { unit: String },
}

fn default_load_warn() -> f64 {
    2.0
}
fn default_load_crit() -> f64 {
    4.0
}
fn default_pct_warn() -> f64 {
    85.0
}
fn default_pct_crit() -> f64 {
    95.0
}
fn default_http_status() -> u16 {
    200
}
fn default_cert_warn() -> u32 {
    21
}
fn default_cert_crit() -> u32 {
    7
}
fn default_one() -> u32 {
    1
}

/// When a check runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// Every `secs` seconds; with `splay`, each agent starts at its own
    /// offset inside the interval so that a fleet does not fire at once.
    Interval {
        secs: u32,
        #[serde(default = "default_true")]
        splay: bool,
    },
    /// A five-field cron expression, evaluated in `timezone` (IANA name,
    /// default UTC).
    Cron {
        expr: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timezone: Option<String>,
    },
}

fn default_true() -> bool {
    true
}

/// A request to run a named, allow-listed action, as the server signs it.
///
/// The agent runs it only if the signature verifies against the pinned
/// server key, `audience` is its own agent id, `expires_at` has not passed
/// and `run_id` was never seen before (replay).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// Unique per request; echoed in every update.
    pub run_id: String,
    /// The agent id this request is for.
    pub audience: String,
    /// The name of an action in the agent's local allow-list.
    pub action: String,
    /// Values for the action's parameters, passed as argv elements.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// µs since the Unix epoch after which the agent refuses it.
    pub expires_at: i64,
    /// Seconds before the agent kills the run's process group.
    pub timeout_secs: u32,
}

/// An action request with the server's Ed25519 signature over
/// [`action_transcript`], hex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedAction {
    pub request: ActionRequest,
    pub signature: String,
}

/// What the server signs for an action request: a domain and every field,
/// length-prefixed, so that no field can be moved into another.
pub fn action_transcript(r: &ActionRequest) -> Vec<u8> {
    let mut parts: Vec<Vec<u8>> = vec![
        b"aramaki-action-v1".to_vec(),
        r.run_id.as_bytes().to_vec(),
        r.audience.as_bytes().to_vec(),
        r.action.as_bytes().to_vec(),
        r.expires_at.to_be_bytes().to_vec(),
        r.timeout_secs.to_be_bytes().to_vec(),
    ];
    for (k, v) in &r.params {
        parts.push(k.as_bytes().to_vec());
        parts.push(v.as_bytes().to_vec());
    }
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(&part);
    }
    out
}

/// Progress or outcome of an action run on one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionUpdate {
    pub run_id: String,
    pub state: ActionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// For `output`: the next chunk; for a final state: a message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// For `refused`: why, as a code (`replayed`, `bad_signature`,
    /// `not_allowed`, …), so that the server can tell a refusal of the
    /// request it sent from one of a replayed or forged copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// For `started` and the outcome: the timeout the agent applies, in
    /// seconds (the request's, capped by the agent's local configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionState {
    Started,
    /// A chunk of output while it runs.
    Output,
    Succeeded,
    Failed,
    /// Killed on the server's request.
    Cancelled,
    /// Killed after its timeout.
    TimedOut,
    /// Not run: not in the allow-list, bad signature, wrong audience,
    /// expired, replayed, or parameters the allow-list does not take.
    Refused,
}

impl ActionState {
    /// Whether the run is over on this agent.
    pub fn is_final(self) -> bool {
        !matches!(self, ActionState::Started | ActionState::Output)
    }
}

/// The public facts of one session handshake, as both sides saw them.
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    pub agent_id: &'a str,
    /// The agent's long-term public key, hex.
    pub agent_key: &'a str,
    /// The server's long-term public key, hex.
    pub server_key: &'a str,
    pub agent_nonce: &'a str,
    pub server_nonce: &'a str,
    pub agent_exchange: &'a str,
    pub server_exchange: &'a str,
    /// [`hello_digest`] of the `hello` as the server received it: binds
    /// every field of it (subscriptions, spans, queue depth, version), not
    /// only those above.
    pub hello: &'a str,
}

/// SHA-256 (hex) of a message's canonical JSON text: what both sides put
/// into the session transcript for the `hello`, so that a relay rewriting
/// any field of it makes both signatures fail.
pub fn hello_digest(hello: &AgentMessage) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_vec(hello).unwrap_or_default();
    crate::keys::hex(&Sha256::digest(&text))
}

/// What the server signs: domain, both nonces, both exchange keys and the
/// agent id, so that a signature cannot be replayed in another session or
/// for another agent, and a relay cannot swap an exchange key.
pub fn server_transcript(h: &Handshake<'_>) -> Vec<u8> {
    transcript(b"aramaki-agent-server-v2", h)
}

/// What the agent signs (a different domain than the server's, so that one
/// side's signature is never valid as the other's).
pub fn agent_transcript(h: &Handshake<'_>) -> Vec<u8> {
    transcript(b"aramaki-agent-client-v2", h)
}

/// What the frame keys are derived from (with the exchange's secret).
pub fn session_transcript(h: &Handshake<'_>) -> Vec<u8> {
    transcript(b"aramaki-agent-session-v2", h)
}

fn transcript(domain: &[u8], h: &Handshake<'_>) -> Vec<u8> {
    length_prefixed(&[
        domain,
        h.agent_id.as_bytes(),
        h.agent_key.as_bytes(),
        h.server_key.as_bytes(),
        h.agent_nonce.as_bytes(),
        h.server_nonce.as_bytes(),
        h.agent_exchange.as_bytes(),
        h.server_exchange.as_bytes(),
        h.hello.as_bytes(),
    ])
}

/// What the server signs to prove its key to an enrolling agent, before the
/// agent proves its token.
pub fn enroll_transcript(
    agent_nonce: &str,
    server_nonce: &str,
    agent_key: &str,
    server_key: &str,
) -> Vec<u8> {
    length_prefixed(&[
        b"aramaki-agent-enroll-v3",
        agent_nonce.as_bytes(),
        server_nonce.as_bytes(),
        agent_key.as_bytes(),
        server_key.as_bytes(),
    ])
}

/// The facts of one enrollment that the token's MAC covers.
#[derive(Debug, Clone, Copy)]
pub struct Enrollment<'a> {
    pub agent_nonce: &'a str,
    pub server_nonce: &'a str,
    /// The agent's new public key, hex.
    pub agent_key: &'a str,
    pub server_key: &'a str,
    pub token_id: &'a str,
    pub name: &'a str,
}

/// What the server stores of a token's secret (and so the MAC key): its
/// SHA-256, hex.
pub fn token_secret_hash(secret: &str) -> String {
    use sha2::{Digest, Sha256};
    crate::keys::hex(&Sha256::digest(secret.as_bytes()))
}

/// The agent's proof that it holds the token: HMAC-SHA256 keyed by
/// [`token_secret_hash`] over the enrollment's facts, hex.
pub fn enroll_mac(secret_hash: &str, e: &Enrollment<'_>) -> String {
    let transcript = length_prefixed(&[
        b"aramaki-agent-enroll-mac-v3",
        e.agent_nonce.as_bytes(),
        e.server_nonce.as_bytes(),
        e.agent_key.as_bytes(),
        e.server_key.as_bytes(),
        e.token_id.as_bytes(),
        e.name.as_bytes(),
    ]);
    crate::keys::hex(&crate::frames::hmac_sha256(
        secret_hash.as_bytes(),
        &[&transcript],
    ))
}

/// The `hello` a refusal answers, as the server received it.
#[derive(Debug, Clone, Copy)]
pub struct RefusedHello<'a> {
    pub agent_id: &'a str,
    pub agent_key: &'a str,
    pub agent_nonce: &'a str,
    pub agent_exchange: &'a str,
    /// [`hello_digest`] of the whole `hello`.
    pub hello: &'a str,
}

/// What the server signs to refuse a `hello` (see
/// [`ServerMessage::SignedRefusal`]): the agent id, key, nonce and exchange
/// key the server received, so that a refusal the server gave to a relay's
/// rewritten `hello` (another id, another key, the agent's nonce copied) is
/// no refusal of the agent's own.
pub fn refusal_transcript(h: &RefusedHello<'_>, reason: Refusal, message: &str) -> Vec<u8> {
    length_prefixed(&[
        b"aramaki-agent-refusal-v3",
        h.agent_id.as_bytes(),
        h.agent_key.as_bytes(),
        h.agent_nonce.as_bytes(),
        h.agent_exchange.as_bytes(),
        h.hello.as_bytes(),
        reason.describe().as_bytes(),
        message.as_bytes(),
    ])
}

fn length_prefixed(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for part in parts {
        // Length-prefixed, so that no two different inputs give the same bytes.
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// An enrollment token: `aek_<id>_<secret>_<fingerprint>`.
///
/// `id` is the short visible prefix (stored and shown in lists), `secret` is
/// stored only hashed, and `fingerprint` is the server key's fingerprint
/// without dashes, which lets the agent pin the right server on first
/// contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollToken {
    pub id: String,
    pub secret: String,
    pub fingerprint: String,
}

impl EnrollToken {
    pub fn parse(s: &str) -> Option<EnrollToken> {
        let (id, secret, fingerprint) = crate::keys::split_token("aek", s)?;
        Some(EnrollToken {
            id,
            secret,
            fingerprint,
        })
    }
}

impl std::fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "aek_{}_{}_{}", self.id, self.secret, self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_and_strict() {
        let hb = serde_json::to_string(&AgentMessage::Heartbeat {
            queue_depth: 3,
            dropped: 0,
        })
        .unwrap();
        assert_eq!(hb, r#"{"type":"heartbeat","queue_depth":3,"dropped":0}"#);
        let err =
            serde_json::from_str::<AgentMessage>(r#"{"type":"heartbeat","queue_depth":1,"x":1}"#);
        assert!(err.is_err(), "unknown fields are refused");
        let ack: ServerMessage = serde_json::from_str(r#"{"type":"ack","up_to":7}"#).unwrap();
        assert_eq!(
            ack,
            ServerMessage::Ack {
                up_to: 7,
                refused: vec![]
            }
        );
    }

    #[test]
    fn records_round_trip() {
        let rec = Record {
            seq: 5,
            body: RecordBody::Result(CheckResult {
                check: "disk".into(),
                system: None,
                labels: BTreeMap::new(),
                status: 2,
                output: "DISK CRITICAL".into(),
                metrics: vec![],
                executed_at: 1,
                duration_ms: 3,
                source: "check".into(),
            }),
        };
        let text = serde_json::to_string(&rec).unwrap();
        assert!(text.contains(r#""kind":"result""#), "{text}");
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), rec);
    }

    #[test]
    fn definitions_fill_defaults() {
        let def: CheckDefinition = serde_json::from_str(
            r#"{"name":"web","run":{"kind":"probe","probe":"http","url":"http://127.0.0.1/"},
                "schedule":{"kind":"interval","secs":10},"timeout_secs":5}"#,
        )
        .unwrap();
        assert_eq!(def.output_limit, 64 * 1024);
        assert_eq!(
            def.schedule,
            Schedule::Interval {
                secs: 10,
                splay: true
            }
        );
        let Runner::Probe(Probe::Http { expect_status, .. }) = def.run else {
            panic!("an http probe");
        };
        assert_eq!(expect_status, 200);
    }

    #[test]
    fn exit_codes_follow_nagios() {
        assert_eq!(CheckState::from_exit(0), CheckState::Ok);
        assert_eq!(CheckState::from_exit(1), CheckState::Warning);
        assert_eq!(CheckState::from_exit(2), CheckState::Critical);
        assert_eq!(CheckState::from_exit(3), CheckState::Unknown);
        assert_eq!(CheckState::from_exit(-1), CheckState::Unknown);
        assert_eq!(CheckState::from_exit(127), CheckState::Unknown);
    }

    #[test]
    fn transcripts_differ_by_side_and_input() {
        let h = Handshake {
            agent_id: "a",
            agent_key: "ak",
            server_key: "sk",
            agent_nonce: "n1",
            server_nonce: "n2",
            agent_exchange: "x1",
            server_exchange: "x2",
            hello: "h",
        };
        let s = server_transcript(&h);
        assert_ne!(s, agent_transcript(&h));
        assert_ne!(s, session_transcript(&h));
        let swapped = Handshake {
            agent_nonce: "n2",
            server_nonce: "n1",
            ..h
        };
        assert_ne!(s, server_transcript(&swapped));
        let other_exchange = Handshake {
            server_exchange: "x3",
            ..h
        };
        assert_ne!(s, server_transcript(&other_exchange));
        let other_hello = Handshake { hello: "h2", ..h };
        assert_ne!(s, server_transcript(&other_hello));
        assert_ne!(agent_transcript(&h), agent_transcript(&other_hello));
        assert_ne!(session_transcript(&h), session_transcript(&other_hello));
        let shifted = Handshake {
            agent_id: "ab",
            agent_key: "k",
            ..h
        };
        let shifted2 = Handshake {
            agent_id: "a",
            agent_key: "bk",
            ..h
        };
        assert_ne!(server_transcript(&shifted), server_transcript(&shifted2));
        assert_ne!(
            enroll_transcript("n", "m", "ak", "sk"),
            enroll_transcript("n", "m", "a", "ksk")
        );
        let e = Enrollment {
            agent_nonce: "n1",
            server_nonce: "n2",
            agent_key: "ak",
            server_key: "sk",
            token_id: "t",
            name: "web",
        };
        let mac = enroll_mac("h", &e);
        assert_ne!(mac, enroll_mac("h2", &e));
        for other in [
            Enrollment {
                agent_key: "bk",
                ..e
            },
            Enrollment {
                server_nonce: "n3",
                ..e
            },
            Enrollment {
                agent_nonce: "n3",
                ..e
            },
            Enrollment { name: "db", ..e },
        ] {
            assert_ne!(mac, enroll_mac("h", &other));
        }
    }

    #[test]
    fn hello_digests_cover_every_field() {
        let hello = AgentMessage::Hello {
            protocol: AGENT_PROTOCOL_VERSION,
            agent_id: "a".into(),
            public_key: "k".into(),
            nonce: "n".into(),
            exchange: "x".into(),
            version: "1".into(),
            subscriptions: vec!["linux".into()],
            queue_depth: 3,
            spans: vec![],
        };
        let d = hello_digest(&hello);
        assert_eq!(d.len(), 64);
        // The same message parsed back (as the server sees it) digests alike.
        let text = serde_json::to_string(&hello).unwrap();
        let parsed: AgentMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(hello_digest(&parsed), d);
        let rewritten: AgentMessage =
            serde_json::from_str(&text.replace(r#"["linux"]"#, r#"["db"]"#)).unwrap();
        assert_ne!(hello_digest(&rewritten), d, "subscriptions are covered");
        let deeper: AgentMessage =
            serde_json::from_str(&text.replace(r#""queue_depth":3"#, r#""queue_depth":4"#))
                .unwrap();
        assert_ne!(hello_digest(&deeper), d, "the queue depth is covered");
    }

    #[test]
    fn refusals_are_bound_to_the_hello_received() {
        let mine = RefusedHello {
            agent_id: "a",
            agent_key: "k",
            agent_nonce: "n",
            agent_exchange: "x",
            hello: "h",
        };
        let t = refusal_transcript(&mine, Refusal::KeyChanged, "m");
        for other in [
            RefusedHello {
                agent_id: "b",
                ..mine
            },
            RefusedHello {
                agent_key: "k2",
                ..mine
            },
            RefusedHello {
                agent_exchange: "x2",
                ..mine
            },
            RefusedHello {
                hello: "h2",
                ..mine
            },
        ] {
            assert_ne!(t, refusal_transcript(&other, Refusal::KeyChanged, "m"));
        }
    }

    #[test]
    fn action_transcripts_cover_every_field() {
        let base = ActionRequest {
            run_id: "r".into(),
            audience: "a".into(),
            action: "flush".into(),
            params: BTreeMap::from([("path".into(), "/".into())]),
            expires_at: 5,
            timeout_secs: 60,
        };
        let t = action_transcript(&base);
        let mut other = base.clone();
        other.audience = "b".into();
        assert_ne!(t, action_transcript(&other));
        let mut other = base.clone();
        other.params.insert("path".into(), "/x".into());
        assert_ne!(t, action_transcript(&other));
        let mut other = base.clone();
        other.expires_at = 6;
        assert_ne!(t, action_transcript(&other));
        assert!(ActionState::Succeeded.is_final() && !ActionState::Output.is_final());
    }

    #[test]
    fn tokens_parse_strictly() {
        let t = EnrollToken::parse("aek_ab12_SECRETsecret_ABCDEFGH").unwrap();
        assert_eq!(t.id, "ab12");
        assert_eq!(t.to_string(), "aek_ab12_SECRETsecret_ABCDEFGH");
        for bad in [
            "",
            "aek_a_b",
            "xek_a_b_c",
            "aek_a_b_c_d",
            "aek__b_c",
            "aek_a-1_b_c",
        ] {
            assert_eq!(EnrollToken::parse(bad), None, "{bad}");
        }
    }
}
