//! Talking to the server: enrollment, and sessions that authenticate both
//! ways, replay the queue in order and keep going with jittered backoff.

use std::sync::Arc;
use std::time::Duration;

use aramaki_protocol::agent::{
    agent_transcript, enroll_transcript, server_transcript, session_transcript, ActionUpdate,
    AgentMessage, CheckDefinition, EnrollToken, Handshake, Notice, RecordBody, Refusal,
    ServerMessage, AGENT_PROTOCOL_VERSION, CONNECT_PATH,
};
use aramaki_protocol::frames::{Exchange, FrameError, Opener, Sealer, SessionKeys};
use aramaki_protocol::keys::{compact_fingerprint, hex, unhex_array};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::AgentConfig;
use crate::runtime::{Scheduler, Shared};
use crate::state::{Registration, StateDir};

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Most records sent in one message.
const BATCH: usize = 500;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The server refused for a reason a retry cannot fix.
    #[error("refused by the server: {}: {message}", reason.describe())]
    Refused { reason: Refusal, message: String },
    /// The server is not who we pinned: never talk to it.
    #[error("server key does not match the pinned fingerprint ({0})")]
    WrongServer(String),
    /// A session's challenge did not prove the pinned key: another server,
    /// or anyone in the path (a relay on `ws://` can send any challenge).
    /// Not final, or one forged frame would stop the agent for good.
    #[error("the server did not prove the pinned key ({0}); someone in the path or another server: not taken as final")]
    Unproven(String),
    /// A frame of the session failed its integrity check: refused, and the
    /// session ends (a new one may be tried).
    #[error("refused a frame from the server: {0}")]
    Integrity(FrameError),
    /// Anything a reconnect may fix.
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Local(String),
}

impl SessionError {
    pub fn is_final(&self) -> bool {
        match self {
            SessionError::Refused { reason, .. } => reason.is_final(),
            SessionError::WrongServer(_) | SessionError::Local(_) => true,
            SessionError::Transient(_) | SessionError::Integrity(_) | SessionError::Unproven(_) => {
                false
            }
        }
    }
}

fn transient(e: impl std::fmt::Display) -> SessionError {
    SessionError::Transient(e.to_string())
}

/// The WebSocket URL for a server base URL; plain `ws://` only to loopback
/// unless explicitly allowed.
pub fn socket_url(server: &str, allow_plaintext: bool) -> Result<String, SessionError> {
    let base = server.trim_end_matches('/');
    let (scheme, rest) = if let Some(rest) = base.strip_prefix("https://") {
        ("wss", rest)
    } else if let Some(rest) = base.strip_prefix("http://") {
        ("ws", rest)
    } else {
        return Err(SessionError::Local(format!(
            "--server must start with https:// or http://, got {server:?}"
        )));
    };
    let host = host_of(rest);
    if scheme == "ws" && !allow_plaintext && !is_loopback(host) {
        return Err(SessionError::Local(format!(
            "refusing plain http to {host}: use https://, or --allow-plaintext if you really mean it"
        )));
    }
    Ok(format!("{scheme}://{rest}{CONNECT_PATH}"))
}

fn host_of(authority: &str) -> &str {
    let authority = authority.split('/').next().unwrap_or("");
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The TLS settings for `wss://`: the public roots, plus the CA
/// certificates in `ca_file` (PEM) for a server behind a private CA.
pub fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<tokio_rustls::rustls::ClientConfig>, SessionError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| SessionError::Local(format!("cannot read {}: {e}", path.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| {
                SessionError::Local(format!("{} is not PEM certificates: {e}", path.display()))
            })?;
            roots
                .add(cert)
                .map_err(|e| SessionError::Local(format!("{}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SessionError::Local(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub async fn open(url: &str) -> Result<Socket, SessionError> {
    open_with(url, None).await
}

/// Opens the socket; `tls` replaces the default roots for `wss://`.
pub async fn open_with(
    url: &str,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
) -> Result<Socket, SessionError> {
    let connector = tls.map(tokio_tungstenite::Connector::Rustls);
    let connecting = tokio_tungstenite::connect_async_tls_with_config(url, None, false, connector);
    let (socket, _) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| transient(format!("connecting to {url} timed out")))?
        .map_err(|e| transient(format!("cannot connect to {url}: {e}")))?;
    Ok(socket)
}

pub async fn send(socket: &mut Socket, message: &AgentMessage) -> Result<(), SessionError> {
    let text = serde_json::to_string(message).map_err(transient)?;
    socket
        .send(Message::Text(text.into()))
        .await
        .map_err(|e| transient(format!("lost the connection: {e}")))
}

/// The next text frame.
async fn next_text(socket: &mut Socket) -> Result<String, SessionError> {
    loop {
        let frame = socket
            .next()
            .await
            .ok_or_else(|| transient("the server closed the connection"))?
            .map_err(|e| transient(format!("lost the connection: {e}")))?;
        match frame {
            Message::Text(t) => return Ok(t.as_str().to_owned()),
            Message::Close(_) => return Err(transient("the server closed the connection")),
            _ => continue,
        }
    }
}

fn parse_server(text: &str) -> Result<ServerMessage, SessionError> {
    let message: ServerMessage = serde_json::from_str(text)
        .map_err(|e| transient(format!("unexpected message from the server: {e}")))?;
    if let ServerMessage::Refused { reason, message } = message {
        return Err(SessionError::Refused { reason, message });
    }
    Ok(message)
}

/// The next server message of a handshake (before frames are sealed);
/// `Refused` becomes an error.
pub async fn receive(socket: &mut Socket) -> Result<ServerMessage, SessionError> {
    parse_server(&next_text(socket).await?)
}

/// An authenticated session: every frame is sealed on the way out and must
/// open on the way in (see `aramaki_protocol::frames`).
pub struct Channel {
    socket: Socket,
    seal: Sealer,
    open: Opener,
    /// The session's name in logs.
    pub session_id: String,
}

impl Channel {
    pub async fn send(&mut self, message: &AgentMessage) -> Result<(), SessionError> {
        let body = serde_json::to_string(message).map_err(transient)?;
        let text = self.seal.seal(body);
        self.socket
            .send(Message::Text(text.into()))
            .await
            .map_err(|e| transient(format!("lost the connection: {e}")))
    }

    /// The next message; a frame that does not open is
    /// [`SessionError::Integrity`] and ends the session. (Cancel-safe: the
    /// counter moves only once a whole frame arrived.)
    pub async fn receive(&mut self) -> Result<ServerMessage, SessionError> {
        let text = next_text(&mut self.socket).await?;
        let body = self.open.open(&text).map_err(SessionError::Integrity)?;
        parse_server(&body)
    }

    async fn receive_within(&mut self) -> Result<ServerMessage, SessionError> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.receive())
            .await
            .map_err(|_| transient("the server did not answer in time"))?
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

async fn receive_within(socket: &mut Socket) -> Result<ServerMessage, SessionError> {
    tokio::time::timeout(CONNECT_TIMEOUT, receive(socket))
        .await
        .map_err(|_| transient("the server did not answer in time"))?
}

fn random_bytes() -> Result<[u8; 32], SessionError> {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).map_err(|e| SessionError::Local(e.to_string()))?;
    Ok(b)
}

fn random_nonce() -> Result<String, SessionError> {
    Ok(hex(&random_bytes()?))
}

/// Enrolls: generates a key, registers it with the token and pins the
/// server key named by the token's fingerprint. Nothing is written unless
/// the server accepted and proved to be the right one.
pub async fn enroll(
    state: &StateDir,
    server: &str,
    token: &str,
    name: &str,
    allow_plaintext: bool,
    ca_file: Option<&std::path::Path>,
) -> Result<Registration, SessionError> {
    let parsed = EnrollToken::parse(token)
        .ok_or_else(|| SessionError::Local("this is not an enrollment token (aek_…)".into()))?;
    let url = socket_url(server, allow_plaintext)?;
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| SessionError::Local(e.to_string()))?;
    let key = SigningKey::from_bytes(&seed);
    let tls = ca_file.map(|f| tls_config(Some(f))).transpose()?;
    let (agent_id, system, server_key) = register_with(&url, tls, &parsed, &key, name).await?;
    let local = |e: crate::state::StateError| SessionError::Local(e.to_string());
    state.write_key(&seed).map_err(local)?;
    state.pin_server_key(&server_key).map_err(local)?;
    let registration = Registration {
        agent_id,
        name: name.to_owned(),
        system,
        server: server.trim_end_matches('/').to_owned(),
    };
    state.save_registration(&registration).map_err(local)?;
    Ok(registration)
}

/// Trades a token for a registration of `key` and returns the agent id, its
/// system and the server key, checked against the token's fingerprint.
pub async fn register(
    url: &str,
    token: &EnrollToken,
    key: &SigningKey,
    name: &str,
) -> Result<(String, String, VerifyingKey), SessionError> {
    register_with(url, None, token, key, name).await
}

/// [`register`] with TLS settings for a private CA.
pub async fn register_with(
    url: &str,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    token: &EnrollToken,
    key: &SigningKey,
    name: &str,
) -> Result<(String, String, VerifyingKey), SessionError> {
    let mut socket = open_with(url, tls).await?;
    let public_key = hex(key.verifying_key().as_bytes());
    let nonce = random_nonce()?;
    send(
        &mut socket,
        &AgentMessage::EnrollHello {
            protocol: AGENT_PROTOCOL_VERSION,
            nonce: nonce.clone(),
            public_key: public_key.clone(),
        },
    )
    .await?;
    // The server proves the key the token names before the token leaves
    // this host: a server that cannot never sees it.
    let (server_key, server_nonce) = match receive_within(&mut socket).await? {
        ServerMessage::EnrollProof {
            nonce: server_nonce,
            server_key,
            signature,
        } => {
            let key = verify_enroll_proof(
                token,
                &nonce,
                &server_nonce,
                &public_key,
                &server_key,
                &signature,
            );
            if key.is_err() {
                let _ = socket.close(None).await;
            }
            (key?, server_nonce)
        }
        other => {
            return Err(transient(format!(
                "expected the server's proof of its key, got {other:?}"
            )))
        }
    };
    // The secret itself never leaves this host: a relay that passed the
    // proof along sees only a MAC bound to both nonces and to our key.
    let mac = aramaki_protocol::agent::enroll_mac(
        &aramaki_protocol::agent::token_secret_hash(&token.secret),
        &aramaki_protocol::agent::Enrollment {
            agent_nonce: &nonce,
            server_nonce: &server_nonce,
            agent_key: &public_key,
            server_key: &hex(server_key.as_bytes()),
            token_id: &token.id,
            name,
        },
    );
    send(
        &mut socket,
        &AgentMessage::Enroll {
            protocol: AGENT_PROTOCOL_VERSION,
            token_id: token.id.clone(),
            mac,
            public_key,
            name: name.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
    )
    .await?;
    let (agent_id, system, enrolled_key) = match receive_within(&mut socket).await? {
        ServerMessage::Enrolled {
            agent_id,
            system,
            server_key,
        } => (agent_id, system, server_key),
        other => return Err(transient(format!("unexpected answer to enroll: {other:?}"))),
    };
    let _ = socket.close(None).await;
    if enrolled_key != hex(server_key.as_bytes()) {
        return Err(SessionError::WrongServer(
            "the server enrolled with another key than it proved".into(),
        ));
    }
    Ok((agent_id, system, server_key))
}

/// The server key of an enrollment proof, if it is the one the token's
/// fingerprint names and its signature over our nonce and key verifies.
fn verify_enroll_proof(
    token: &EnrollToken,
    nonce: &str,
    server_nonce: &str,
    public_key: &str,
    server_key: &str,
    signature: &str,
) -> Result<VerifyingKey, SessionError> {
    let key = unhex_array::<32>(server_key)
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| SessionError::WrongServer("the server sent no valid key".into()))?;
    let actual = compact_fingerprint(key.as_bytes());
    if actual != token.fingerprint {
        return Err(SessionError::WrongServer(format!(
            "token says {}, server has {actual}",
            token.fingerprint
        )));
    }
    let signature = unhex_array::<64>(signature)
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| SessionError::WrongServer("the proof carries no valid signature".into()))?;
    key.verify(
        &enroll_transcript(nonce, server_nonce, public_key, server_key),
        &signature,
    )
    .map_err(|_| {
        SessionError::WrongServer(format!(
            "the server does not hold the key of {actual}: its proof does not verify"
        ))
    })?;
    Ok(key)
}

/// Everything a running agent needs.
pub struct Agent {
    /// Action run ids already accepted (replay protection).
    pub seen: crate::actions::Seen,
    /// Running actions, to cancel by run id.
    pub running: std::collections::HashMap<String, tokio::sync::oneshot::Sender<()>>,
    /// Live progress of running actions, sent while a session is open.
    pub updates: (
        tokio::sync::mpsc::UnboundedSender<ActionUpdate>,
        tokio::sync::mpsc::UnboundedReceiver<ActionUpdate>,
    ),
    pub state: StateDir,
    pub config: AgentConfig,
    pub registration: Registration,
    pub key: SigningKey,
    pub server_key: VerifyingKey,
    pub shared: Arc<Shared>,
    pub scheduler: Scheduler,
    pub allow_plaintext: bool,
}

/// Runs sessions until a final refusal; reconnects with jittered
/// exponential backoff (1 s doubling to 60 s).
pub async fn run(agent: &mut Agent) -> SessionError {
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = std::time::Instant::now();
        let err = match session(agent).await {
            Ok(()) => transient("the session ended"),
            Err(e) => e,
        };
        if err.is_final() {
            tracing::error!("{err}; not reconnecting");
            return err;
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let wait = jitter(backoff);
        tracing::warn!("{err}; reconnecting in {} ms", wait.as_millis());
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Somewhere between half and all of `d`, so that a fleet does not
/// reconnect in step after a server restart.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = getrandom::getrandom(&mut b)
        .map(|_| u16::from_le_bytes(b))
        .unwrap_or(0);
    let half = d / 2;
    half + half.mul_f64(f64::from(r) / f64::from(u16::MAX))
}

async fn session(agent: &mut Agent) -> Result<(), SessionError> {
    let url = socket_url(&agent.registration.server, agent.allow_plaintext)?;
    let tls = agent
        .config
        .ca_file
        .as_deref()
        .map(|f| tls_config(Some(f)))
        .transpose()?;
    let socket = open_with(&url, tls).await?;
    let (depth, _) = agent.shared.depth();
    let handshake = handshake_with(
        socket,
        &Credentials {
            agent_id: &agent.registration.agent_id,
            key: &agent.key,
            server_key: &agent.server_key,
        },
        agent.config.subscriptions.clone(),
        depth,
        agent.shared.spans(),
    )
    .await;
    let (welcome, mut channel) = match handshake {
        Ok(done) => done,
        Err(SessionError::Integrity(e)) => {
            // The welcome itself (with the checks) was forged or replayed.
            report_refused_frame(agent, "(handshake)", &e).await;
            return Err(SessionError::Integrity(e));
        }
        Err(SessionError::Unproven(e)) => {
            tracing::error!(error = %e, "the server's challenge does not verify against the pinned key; retrying");
            report_notice(
                agent,
                format!(
                    "agent '{}' refused the server's challenge: it does not verify against the pinned key ({e})",
                    agent.registration.name
                ),
            )
            .await;
            return Err(SessionError::Unproven(e));
        }
        Err(e) => return Err(e),
    };
    let Welcome {
        acked,
        heartbeat_secs,
        checks,
        incarnations,
    } = welcome;
    tracing::info!(server = %agent.registration.server, session = %channel.session_id, checks = checks.len(), "connected");
    renumber_if_restored(agent, acked, &incarnations).await?;
    agent.shared.ack(acked).map_err(transient)?;
    apply_checks(agent, checks);
    let outcome = exchange(agent, &mut channel, heartbeat_secs.max(1)).await;
    if let Err(SessionError::Integrity(e)) = &outcome {
        report_refused_frame(agent, &channel.session_id, e).await;
    }
    channel.close().await;
    outcome
}

/// The server committed numbers this queue never handed out: the state
/// directory was lost or restored from an older copy. Records accepted since
/// would be taken for duplicates; they are renumbered above the server's
/// mark instead, and the event is reported (log and a queued notice).
async fn renumber_if_restored(
    agent: &Agent,
    mark: u64,
    known: &[String],
) -> Result<(), SessionError> {
    let Some(done) = agent.shared.reconcile(mark, known).map_err(transient)? else {
        return Ok(());
    };
    let message = format!(
        "the queue's state was lost or restored from an older copy: the server has committed up to #{} records this queue numbered otherwise; {} unacknowledged records from #{} on were renumbered from #{}, so that none is taken for a duplicate",
        done.mark,
        done.count,
        done.first,
        done.to
    );
    tracing::warn!("{message}");
    let notice = RecordBody::Notice {
        notice: Notice::QueueRenumbered,
        message,
    };
    agent.shared.push(vec![notice]).await.map_err(transient)?;
    Ok(())
}

/// A frame that did not open: said in the log at once, and queued as a
/// notice, so the server records it on the agent's system once a session
/// works again (an attacker in the path cannot make it vanish).
async fn report_refused_frame(agent: &Agent, session: &str, e: &FrameError) {
    tracing::error!(session, error = %e, "refused a frame from the server; ending the session");
    report_notice(
        agent,
        format!(
            "agent '{}' refused a frame in session {session}: {e}",
            agent.registration.name
        ),
    )
    .await;
}

/// Queues a `frame_refused` notice with `message`.
async fn report_notice(agent: &Agent, message: String) {
    let notice = RecordBody::Notice {
        notice: Notice::FrameRefused,
        message,
    };
    if let Err(e) = agent.shared.push(vec![notice]).await {
        tracing::error!(error = %e, "cannot queue the report of a refused frame");
    }
}

/// Admits and starts an action, or queues its refusal. The final outcome
/// always goes through the disk queue.
fn start_action(agent: &mut Agent, signed: aramaki_protocol::agent::SignedAction) {
    let now = jiff::Timestamp::now().as_microsecond();
    let request = signed.request.clone();
    let admitted = crate::actions::admit(
        &signed,
        &agent.registration.agent_id,
        &agent.server_key,
        &agent.config.actions,
        &mut agent.seen,
        now,
    );
    let shared = agent.shared.clone();
    let (argv, timeout_secs) = match admitted {
        Ok(admitted) => (admitted.argv, admitted.timeout_secs),
        Err(refused) => {
            tracing::warn!(action = %request.action, run = %request.run_id, "refused an action: {refused}");
            let update = refused.update(request.run_id);
            tokio::spawn(async move { queue_final(&shared, update).await });
            return;
        }
    };
    tracing::info!(action = %request.action, run = %request.run_id, timeout_secs, "running an allow-listed action");
    let timeout = Duration::from_secs(u64::from(timeout_secs));
    let (stop, cancel) = tokio::sync::oneshot::channel();
    agent.running.retain(|_, s| !s.is_closed());
    agent.running.insert(request.run_id.clone(), stop);
    let updates = agent.updates.0.clone();
    tokio::spawn(async move {
        let done = crate::actions::run(request.run_id, argv, timeout, updates, cancel).await;
        queue_final(&shared, done).await;
    });
}

async fn queue_final(shared: &Arc<Shared>, update: ActionUpdate) {
    if let Err(e) = shared
        .push(vec![aramaki_protocol::agent::RecordBody::Action(update)])
        .await
    {
        tracing::error!(error = %e, "cannot queue an action's outcome");
    }
}

/// Who the agent is and whom it trusts.
pub struct Credentials<'a> {
    pub agent_id: &'a str,
    pub key: &'a SigningKey,
    pub server_key: &'a VerifyingKey,
}

/// What the server says once the session is authenticated.
pub struct Welcome {
    pub acked: u64,
    pub heartbeat_secs: u32,
    pub checks: Vec<CheckDefinition>,
    /// The queue incarnations the server has committed records of.
    pub incarnations: Vec<String>,
}

/// Hello, challenge (checked against the pinned key), auth, and the sealed
/// welcome; returns the welcome and the sealed channel.
pub async fn handshake(
    socket: Socket,
    me: &Credentials<'_>,
    subscriptions: Vec<String>,
    queue_depth: u64,
) -> Result<(Welcome, Channel), SessionError> {
    handshake_with(socket, me, subscriptions, queue_depth, Vec::new()).await
}

/// [`handshake`], telling the server which queue incarnations numbered the
/// waiting records.
pub async fn handshake_with(
    mut socket: Socket,
    me: &Credentials<'_>,
    subscriptions: Vec<String>,
    queue_depth: u64,
    spans: Vec<aramaki_protocol::agent::QueueSpan>,
) -> Result<(Welcome, Channel), SessionError> {
    let id = me.agent_id;
    let nonce = random_nonce()?;
    let exchange = Exchange::from_seed(random_bytes()?);
    let agent_key = hex(me.key.verifying_key().as_bytes());
    let server_key = hex(me.server_key.as_bytes());
    let agent_exchange = exchange.public_hex();
    let hello = AgentMessage::Hello {
        protocol: AGENT_PROTOCOL_VERSION,
        agent_id: id.to_owned(),
        public_key: agent_key.clone(),
        nonce: nonce.clone(),
        exchange: agent_exchange.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        subscriptions,
        queue_depth,
        spans,
    };
    // Both signatures and the frame keys cover the whole hello, as sent.
    let hello_digest = aramaki_protocol::agent::hello_digest(&hello);
    send(&mut socket, &hello).await?;
    let answer = match receive_within(&mut socket).await {
        // Unsigned: anyone in the path could have sent it. Retried, never
        // taken as final.
        Err(SessionError::Refused { reason, message }) => {
            return Err(transient(format!(
                "an unauthenticated refusal ({}: {message}); not taken as final",
                reason.describe()
            )))
        }
        other => other?,
    };
    let (server_nonce, server_exchange, signature) = match answer {
        ServerMessage::Challenge {
            nonce,
            exchange,
            signature,
        } => (nonce, exchange, signature),
        ServerMessage::SignedRefusal {
            reason,
            message,
            signature,
        } => {
            // Final only if the server refused this very hello: our id, our
            // key, our nonce and exchange key, every field as we sent it.
            let ours = aramaki_protocol::agent::RefusedHello {
                agent_id: id,
                agent_key: &agent_key,
                agent_nonce: &nonce,
                agent_exchange: &agent_exchange,
                hello: &hello_digest,
            };
            let signed = unhex_array::<64>(&signature)
                .map(|b| Signature::from_bytes(&b))
                .is_some_and(|sig| {
                    me.server_key
                        .verify(
                            &aramaki_protocol::agent::refusal_transcript(&ours, reason, &message),
                            &sig,
                        )
                        .is_ok()
                });
            return Err(if signed {
                SessionError::Refused { reason, message }
            } else {
                transient(format!(
                    "a refusal not signed for this hello ({}: {message}); not taken as final",
                    reason.describe()
                ))
            });
        }
        other => return Err(transient(format!("expected a challenge, got {other:?}"))),
    };
    let facts = Handshake {
        agent_id: id,
        agent_key: &agent_key,
        server_key: &server_key,
        agent_nonce: &nonce,
        server_nonce: &server_nonce,
        agent_exchange: &agent_exchange,
        server_exchange: &server_exchange,
        hello: &hello_digest,
    };
    let signature = unhex_array::<64>(&signature)
        .map(|b| Signature::from_bytes(&b))
        .ok_or_else(|| SessionError::Unproven("the challenge carries no valid signature".into()))?;
    me.server_key
        .verify(&server_transcript(&facts), &signature)
        .map_err(|_| {
            SessionError::Unproven(format!(
                "the challenge's signature does not verify for pinned {} over this hello",
                aramaki_protocol::keys::fingerprint(me.server_key.as_bytes())
            ))
        })?;
    let shared = exchange.agree(&server_exchange).ok_or_else(|| {
        SessionError::Unproven("the server's exchange key is not a usable key".into())
    })?;
    let keys = SessionKeys::derive(&shared, &session_transcript(&facts));
    let mine = me.key.sign(&agent_transcript(&facts));
    send(
        &mut socket,
        &AgentMessage::Auth {
            signature: hex(&mine.to_bytes()),
        },
    )
    .await?;
    let (seal, open) = keys.for_agent();
    let mut channel = Channel {
        socket,
        seal,
        open,
        session_id: keys.session_id.clone(),
    };
    // From here on everything is sealed, the welcome (with the checks) and a
    // refusal of our signature included.
    match channel.receive_within().await? {
        ServerMessage::Welcome {
            acked,
            heartbeat_secs,
            checks,
            incarnations,
        } => Ok((
            Welcome {
                acked,
                heartbeat_secs,
                checks,
                incarnations,
            },
            channel,
        )),
        other => Err(transient(format!("expected welcome, got {other:?}"))),
    }
}

fn apply_checks(agent: &mut Agent, checks: Vec<CheckDefinition>) {
    if let Err(e) = agent.state.save_checks(&checks) {
        tracing::warn!(error = %e, "cannot keep the check definitions on disk");
    }
    agent.scheduler.set(checks);
    tracing::info!(checks = ?agent.scheduler.names(), "checks scheduled");
}

/// The steady state: replay and stream records, heartbeats, and whatever
/// the server sends.
async fn exchange(
    agent: &mut Agent,
    socket: &mut Channel,
    heartbeat_secs: u32,
) -> Result<(), SessionError> {
    let beat = Duration::from_secs(u64::from(heartbeat_secs));
    let mut heartbeat = tokio::time::interval(beat);
    heartbeat.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    // Highest sequence sent and not yet acknowledged (one batch in flight).
    let mut in_flight: Option<u64> = None;
    loop {
        if in_flight.is_none() {
            let records = agent
                .shared
                .read(agent.shared.acked(), BATCH)
                .map_err(transient)?;
            if let Some(last) = records.last().map(|r| r.seq) {
                socket.send(&AgentMessage::Records { records }).await?;
                in_flight = Some(last);
            }
        }
        tokio::select! {
            _ = agent.shared.added.notified(), if in_flight.is_none() => {}
            Some(update) = agent.updates.1.recv() => {
                socket.send(&AgentMessage::ActionUpdate(update)).await?;
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > beat * 3 {
                    return Err(transient("the server went silent"));
                }
                let (queue_depth, dropped) = agent.shared.depth();
                socket.send(&AgentMessage::Heartbeat { queue_depth, dropped }).await?;
            }
            message = socket.receive() => {
                last_heard = tokio::time::Instant::now();
                match message? {
                    ServerMessage::Ack { up_to, refused } => {
                        // Refused records are handled too: sending them again
                        // would be refused again, so they leave the queue.
                        for r in &refused {
                            tracing::warn!(seq = r.seq, field = %r.field, reason = %r.message, "the server refused a record");
                        }
                        agent.shared.ack(up_to).map_err(transient)?;
                        if in_flight.is_some_and(|s| up_to >= s) {
                            in_flight = None;
                        }
                    }
                    ServerMessage::Checks { checks } => apply_checks(agent, checks),
                    ServerMessage::Heartbeat => {}
                    ServerMessage::Action(signed) => start_action(agent, signed),
                    ServerMessage::Cancel { run_id } => {
                        if let Some(stop) = agent.running.remove(&run_id) {
                            let _ = stop.send(());
                        }
                    }
                    other => {
                        return Err(transient(format!("unexpected message in a session: {other:?}")));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_to_loopback() {
        assert_eq!(
            socket_url("http://127.0.0.1:8764", false).unwrap(),
            "ws://127.0.0.1:8764/api/v1/agents/connect"
        );
        assert!(socket_url("http://localhost:1/", false).is_ok());
        assert!(socket_url("http://[::1]:8764", false).is_ok());
        assert!(socket_url("http://example.org", false).is_err());
        assert!(socket_url("http://example.org", true).is_ok());
        assert_eq!(
            socket_url("https://aramaki.example.org", false).unwrap(),
            "wss://aramaki.example.org/api/v1/agents/connect"
        );
        assert!(socket_url("ftp://x", true).is_err());
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        for _ in 0..100 {
            let j = jitter(Duration::from_secs(8));
            assert!(
                j >= Duration::from_secs(4) && j <= Duration::from_secs(8),
                "{j:?}"
            );
        }
    }
}
