//! The agent endpoint: one WebSocket per agent, authenticated both ways.
//!
//! The route is public (an agent has no API token); the session itself is
//! the authentication: enrollment needs a valid token, and every later
//! session a signature by the enrolled key over a fresh challenge.

use std::sync::Arc;
use std::time::Duration;

use aramaki_protocol::agent::{
    agent_transcript, enroll_transcript, server_transcript, session_transcript, AgentMessage,
    Handshake, Refusal, ServerMessage, AGENT_PROTOCOL_VERSION,
};
use aramaki_protocol::frames::{Exchange, FrameError, Opener, Sealer, SessionKeys};
use aramaki_protocol::keys::{hex, unhex_array};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use ed25519_dalek::{Signature, Verifier};

use super::{store, Agent, AgentError};
use crate::context::Context;
use crate::db::to_micros;
use crate::monitoring::ingest::AgentRef;
use crate::web::AppState;

/// How long a peer may take for each step of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message accepted from an agent.
const MAX_MESSAGE: usize = 8 * 1024 * 1024;
/// Initial read buffer per socket. The WebSocket library's default (128 KiB,
/// allocated up front) would cost 1.25 GiB at 10,000 agents; the buffer
/// still grows for a large batch.
const READ_BUFFER: usize = 4 * 1024;

/// `GET /api/v1/agents/connect` (role: none; the handshake authenticates).
pub async fn connect(State(ctx): State<AppState>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| session(ctx, socket))
}

async fn send(socket: &mut WebSocket, message: &ServerMessage) -> Result<(), axum::Error> {
    let text = serde_json::to_string(message).map_err(axum::Error::new)?;
    socket.send(Message::Text(text.into())).await
}

async fn refuse(socket: &mut WebSocket, reason: Refusal, message: &str) {
    tracing::info!(
        reason = reason.describe(),
        detail = message,
        "agent refused"
    );
    let _ = send(
        socket,
        &ServerMessage::Refused {
            reason,
            message: message.to_owned(),
        },
    )
    .await;
    let _ = socket.send(Message::Close(None)).await;
}

/// The next text frame, skipping pings; None when the peer is gone.
async fn receive_text(socket: &mut WebSocket) -> Option<Result<String, String>> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(text)) => return Some(Ok(text.as_str().to_owned())),
            Ok(Message::Binary(_)) => {
                return Some(Err("binary frames are not part of the protocol".into()))
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
        }
    }
}

/// The next protocol message of a handshake (before frames are sealed).
async fn receive(socket: &mut WebSocket) -> Option<Result<AgentMessage, String>> {
    Some(
        receive_text(socket)
            .await?
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string())),
    )
}

/// What can go wrong with a frame of an authenticated session.
enum Inbound {
    Message(AgentMessage),
    /// Not valid JSON for the protocol (inside a valid seal).
    Malformed(String),
    /// The frame did not open: forged, replayed or reordered.
    Refused(FrameError),
}

/// An authenticated session's socket: frames are sealed both ways.
struct Channel {
    socket: WebSocket,
    seal: Sealer,
    open: Opener,
    session_id: String,
}

impl Channel {
    async fn send(&mut self, message: &ServerMessage) -> Result<(), axum::Error> {
        let body = serde_json::to_string(message).map_err(axum::Error::new)?;
        let text = self.seal.seal(body);
        self.socket.send(Message::Text(text.into())).await
    }

    /// The next message; None when the agent is gone. Cancel-safe: the
    /// counter moves only once a whole frame arrived.
    async fn receive(&mut self) -> Option<Inbound> {
        let text = match receive_text(&mut self.socket).await? {
            Ok(t) => t,
            Err(e) => return Some(Inbound::Malformed(e)),
        };
        Some(match self.open.open(&text) {
            Ok(body) => match serde_json::from_str(&body) {
                Ok(m) => Inbound::Message(m),
                Err(e) => Inbound::Malformed(e.to_string()),
            },
            Err(e) => Inbound::Refused(e),
        })
    }

    /// Says why (sealed, so the agent can trust it) and hangs up.
    async fn refuse(&mut self, reason: Refusal, message: &str) {
        tracing::info!(
            reason = reason.describe(),
            detail = message,
            "agent refused"
        );
        let _ = self
            .send(&ServerMessage::Refused {
                reason,
                message: message.to_owned(),
            })
            .await;
        let _ = self.socket.send(Message::Close(None)).await;
    }
}

/// A handshake message; one whose names hold U+0000 is malformed (they
/// are stored: the agent's name, version and subscriptions).
async fn receive_within(socket: &mut WebSocket) -> Option<Result<AgentMessage, String>> {
    let message = tokio::time::timeout(HANDSHAKE_TIMEOUT, receive(socket))
        .await
        .unwrap_or(None)?;
    Some(message.and_then(|m| match super::nul::in_message(&m) {
        Some(field) => Err(format!(
            "`{field}` contains a NUL character (U+0000), which is not allowed"
        )),
        None => Ok(m),
    }))
}

async fn session(ctx: Arc<Context>, mut socket: WebSocket) {
    let first = match receive_within(&mut socket).await {
        Some(Ok(m)) => m,
        Some(Err(e)) => return refuse(&mut socket, Refusal::Malformed, &e).await,
        None => return,
    };
    // Everything the agent said in its hello goes into the transcript.
    let digest = aramaki_protocol::agent::hello_digest(&first);
    match first {
        AgentMessage::EnrollHello {
            protocol,
            nonce,
            public_key,
        } => {
            if protocol != AGENT_PROTOCOL_VERSION {
                return refuse_protocol(&mut socket, protocol).await;
            }
            enrollment(&ctx, &mut socket, &nonce, &public_key).await
        }
        AgentMessage::Enroll { protocol, .. } => {
            if protocol != AGENT_PROTOCOL_VERSION {
                return refuse_protocol(&mut socket, protocol).await;
            }
            refuse(
                &mut socket,
                Refusal::Malformed,
                "an enrollment starts with 'enroll_hello': the server proves its key before the agent sends a token",
            )
            .await
        }
        AgentMessage::Hello {
            protocol,
            agent_id,
            public_key,
            nonce,
            exchange,
            version,
            subscriptions,
            queue_depth,
            spans,
        } => {
            if protocol != AGENT_PROTOCOL_VERSION {
                return refuse_protocol(&mut socket, protocol).await;
            }
            let hello = Hello {
                agent_id,
                public_key,
                nonce,
                exchange,
                version,
                subscriptions,
                queue_depth,
                spans,
                digest,
            };
            let pending = match challenge(&ctx, &mut socket, &hello).await {
                Ok(p) => p,
                Err((reason, message)) => {
                    return refuse_hello(&ctx, &mut socket, &hello, reason, &message).await
                }
            };
            // From the auth step on the server has the session's keys: a
            // refusal of the agent's signature is sealed like the welcome.
            let (seal, open) = pending.keys.for_server();
            let mut channel = Channel {
                socket,
                seal,
                open,
                session_id: pending.keys.session_id.clone(),
            };
            match authenticate(&mut channel, &pending).await {
                Ok(()) => run(ctx, channel, pending.agent, &hello).await,
                Err((reason, message)) => channel.refuse(reason, &message).await,
            }
        }
        _ => {
            refuse(
                &mut socket,
                Refusal::Malformed,
                "a session starts with 'hello' or 'enroll_hello'",
            )
            .await
        }
    }
}

/// Proves the server's key on the agent's nonce, then trades the token the
/// agent sends only after checking that proof.
async fn enrollment(ctx: &Context, socket: &mut WebSocket, nonce: &str, public_key: &str) {
    if unhex_array::<32>(nonce).is_none() {
        return refuse(socket, Refusal::Malformed, "nonce must be 32 bytes in hex").await;
    }
    let server_key = ctx.identity.public_key_hex();
    let server_nonce = match super::random::<32>() {
        Ok(b) => hex(&b),
        Err(e) => {
            let (reason, message) = internal(e);
            return refuse(socket, reason, &message).await;
        }
    };
    let signature = ctx.identity.sign(&enroll_transcript(
        nonce,
        &server_nonce,
        public_key,
        &server_key,
    ));
    let proof = ServerMessage::EnrollProof {
        nonce: server_nonce.clone(),
        server_key: server_key.clone(),
        signature: hex(&signature.to_bytes()),
    };
    if send(socket, &proof).await.is_err() {
        return;
    }
    let (token_id, mac, name, version) = match receive_within(socket).await {
        Some(Ok(AgentMessage::Enroll {
            token_id,
            mac,
            public_key: enrolling,
            name,
            version,
            ..
        })) if enrolling == public_key => (token_id, mac, name, version),
        Some(Ok(AgentMessage::Enroll { .. })) => {
            return refuse(
                socket,
                Refusal::Malformed,
                "the enrollment names another key than its 'enroll_hello'",
            )
            .await
        }
        Some(Ok(_)) => return refuse(socket, Refusal::Malformed, "expected 'enroll'").await,
        Some(Err(e)) => return refuse(socket, Refusal::Malformed, &e).await,
        None => return,
    };
    let facts = aramaki_protocol::agent::Enrollment {
        agent_nonce: nonce,
        server_nonce: &server_nonce,
        agent_key: public_key,
        server_key: &server_key,
        token_id: &token_id,
        name: &name,
    };
    let proof = super::TokenProof::Mac {
        id: &token_id,
        mac: &mac,
        facts: &facts,
    };
    match super::enroll_with(ctx, proof, public_key, &name, &version).await {
        Ok(enrolled) => {
            let _ = send(
                socket,
                &ServerMessage::Enrolled {
                    agent_id: enrolled.agent_id,
                    system: enrolled.system,
                    server_key: ctx.identity.public_key_hex(),
                },
            )
            .await;
            let _ = socket.send(Message::Close(None)).await;
        }
        Err(AgentError::Refused { reason, message }) => refuse(socket, reason, &message).await,
        Err(e) => {
            tracing::error!(error = %e, "enrollment failed");
            refuse(
                socket,
                Refusal::Malformed,
                "the server could not enroll this agent",
            )
            .await
        }
    }
}

/// Refuses a `hello`, signed over the agent id, key, nonce and exchange key
/// received, so that the agent can tell it from a relay's and from one for a
/// relay's rewritten hello (a nonce that is not one gets a plain refusal).
async fn refuse_hello(
    ctx: &Context,
    socket: &mut WebSocket,
    hello: &Hello,
    reason: Refusal,
    message: &str,
) {
    if unhex_array::<32>(&hello.nonce).is_none() {
        return refuse(socket, reason, message).await;
    }
    tracing::info!(
        reason = reason.describe(),
        detail = message,
        "agent refused"
    );
    let signature = ctx
        .identity
        .sign(&aramaki_protocol::agent::refusal_transcript(
            &aramaki_protocol::agent::RefusedHello {
                agent_id: &hello.agent_id,
                agent_key: &hello.public_key,
                agent_nonce: &hello.nonce,
                agent_exchange: &hello.exchange,
                hello: &hello.digest,
            },
            reason,
            message,
        ));
    let _ = send(
        socket,
        &ServerMessage::SignedRefusal {
            reason,
            message: message.to_owned(),
            signature: hex(&signature.to_bytes()),
        },
    )
    .await;
    let _ = socket.send(Message::Close(None)).await;
}

async fn refuse_protocol(socket: &mut WebSocket, given: u32) {
    refuse(
        socket,
        Refusal::Protocol,
        &format!("this server speaks agent protocol {AGENT_PROTOCOL_VERSION}, the agent {given}"),
    )
    .await
}

struct Hello {
    agent_id: String,
    public_key: String,
    nonce: String,
    exchange: String,
    version: String,
    subscriptions: Vec<String>,
    queue_depth: u64,
    spans: Vec<aramaki_protocol::agent::QueueSpan>,
    /// [`aramaki_protocol::agent::hello_digest`] of the hello as received.
    digest: String,
}

type Refused = (Refusal, String);

/// A challenged agent: who it claims to be and the session's keys.
struct Pending {
    agent: Agent,
    key: ed25519_dalek::VerifyingKey,
    transcript: Vec<u8>,
    keys: SessionKeys,
}

/// Looks the agent up and sends the signed challenge with the server's
/// exchange key.
async fn challenge(
    ctx: &Context,
    socket: &mut WebSocket,
    hello: &Hello,
) -> Result<Pending, Refused> {
    if unhex_array::<32>(&hello.nonce).is_none() {
        return Err((Refusal::Malformed, "nonce must be 32 bytes in hex".into()));
    }
    let exchange = Exchange::from_seed(super::random::<32>().map_err(internal)?);
    let shared = exchange.agree(&hello.exchange).ok_or((
        Refusal::Malformed,
        "exchange must be a valid 32-byte public key in hex".to_owned(),
    ))?;
    let agent = {
        let mut conn = ctx.db.reader().acquire().await.map_err(internal)?;
        store::agent_by_id(&mut conn, &hello.agent_id)
            .await
            .map_err(internal)?
    };
    let Some(agent) = agent else {
        return Err((
            Refusal::UnknownAgent,
            "no agent with this id; enroll again with a new token".into(),
        ));
    };
    if agent.revoked {
        return Err((
            Refusal::Revoked,
            "this agent was revoked by an admin".into(),
        ));
    }
    if agent.public_key != hello.public_key {
        return Err((
            Refusal::KeyChanged,
            format!(
                "agent '{}' presents another key than it enrolled with; an admin must allow re-enrollment (aramaki agent reenroll {})",
                agent.name, agent.name
            ),
        ));
    }
    let key = super::parse_key(&agent.public_key).map_err(|_| {
        (
            Refusal::KeyChanged,
            "the registered key is damaged".to_owned(),
        )
    })?;
    let server_nonce = hex(&super::random::<32>().map_err(internal)?);
    let server_key = ctx.identity.public_key_hex();
    let server_exchange = exchange.public_hex();
    let facts = Handshake {
        agent_id: &agent.id,
        agent_key: &agent.public_key,
        server_key: &server_key,
        agent_nonce: &hello.nonce,
        server_nonce: &server_nonce,
        agent_exchange: &hello.exchange,
        server_exchange: &server_exchange,
        hello: &hello.digest,
    };
    let signature = ctx.identity.sign(&server_transcript(&facts));
    let keys = SessionKeys::derive(&shared, &session_transcript(&facts));
    let transcript = agent_transcript(&facts);
    send(
        socket,
        &ServerMessage::Challenge {
            nonce: server_nonce.clone(),
            exchange: server_exchange.clone(),
            signature: hex(&signature.to_bytes()),
        },
    )
    .await
    .map_err(|e| (Refusal::Malformed, e.to_string()))?;
    Ok(Pending {
        agent,
        key,
        transcript,
        keys,
    })
}

/// Checks the agent's signature over its transcript.
async fn authenticate(channel: &mut Channel, pending: &Pending) -> Result<(), Refused> {
    let signature = match receive_within(&mut channel.socket).await {
        Some(Ok(AgentMessage::Auth { signature })) => signature,
        Some(Ok(_)) => return Err((Refusal::Malformed, "expected 'auth'".into())),
        Some(Err(e)) => return Err((Refusal::Malformed, e)),
        None => {
            return Err((
                Refusal::Malformed,
                "the agent hung up during the handshake".into(),
            ))
        }
    };
    let signature = unhex_array::<64>(&signature)
        .map(|b| Signature::from_bytes(&b))
        .ok_or((
            Refusal::BadSignature,
            "signature must be 64 bytes in hex".to_owned(),
        ))?;
    pending
        .key
        .verify(&pending.transcript, &signature)
        .map_err(|_| {
            (
                Refusal::BadSignature,
                "the agent's signature does not verify against its enrolled key".to_owned(),
            )
        })
}

fn internal(e: impl std::fmt::Display) -> Refused {
    tracing::error!(error = %e, "agent handshake failed on the server side");
    (
        Refusal::Malformed,
        "the server could not complete the handshake".into(),
    )
}

/// The authenticated session: records up, acknowledgements and checks down.
async fn run(ctx: Arc<Context>, mut socket: Channel, agent: Agent, hello: &Hello) {
    let (session, mut pushes) = ctx.agents.register(&agent.id);
    let outcome = serve(&ctx, &mut socket, &agent, hello, &mut pushes).await;
    ctx.agents.unregister(&agent.id, session);
    match outcome {
        Ok(()) => tracing::info!(agent = %agent.name, "agent session ended"),
        Err(e) => tracing::info!(agent = %agent.name, reason = %e, "agent session ended"),
    }
}

async fn serve(
    ctx: &Context,
    socket: &mut Channel,
    agent: &Agent,
    hello: &Hello,
    pushes: &mut tokio::sync::mpsc::UnboundedReceiver<super::hub::Push>,
) -> Result<(), String> {
    let me = AgentRef {
        id: agent.id.clone(),
        name: agent.name.clone(),
        system_id: agent.system_id.clone(),
        system: agent.system.clone(),
    };
    // An agent declares its plain subscriptions; `system:` and `agent:`
    // entries naming another system or agent are not its to declare.
    let (subscriptions, ignored): (Vec<String>, Vec<String>) = hello
        .subscriptions
        .iter()
        .cloned()
        .partition(|s| crate::monitoring::own_subscription(agent, s));
    if !ignored.is_empty() {
        super::subscriptions_ignored(ctx, &me, &ignored).await;
    }
    let mut tx = ctx.db.begin().await.map_err(|e| e.to_string())?;
    store::session_started(
        &mut tx,
        &agent.id,
        &hello.version,
        &subscriptions,
        i64::try_from(hello.queue_depth).unwrap_or(i64::MAX),
        to_micros(ctx.now()),
    )
    .await
    .map_err(|e| e.to_string())?;
    // The incarnations known before this session go to the agent; this
    // session's become known (its records are committed from here on).
    let seen: Vec<String> = hello.spans.iter().map(|s| s.incarnation.clone()).collect();
    let incarnations = store::queue_incarnations(&mut tx, &agent.id, &seen)
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    let agent = Agent {
        subscriptions,
        ..agent.clone()
    };
    let (checks, graph) = {
        let mut conn = ctx.db.reader().acquire().await.map_err(|e| e.to_string())?;
        let checks = crate::monitoring::store::checks(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let graph = crate::systems::store::load_graph(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        (checks, graph)
    };
    ctx.ingest
        .seen(me.clone(), hello.queue_depth, 0, to_micros(ctx.now()));
    let heartbeat_secs = ctx.config.monitoring.heartbeat;
    socket
        .send(&ServerMessage::Welcome {
            acked: u64::try_from(agent.acked_seq).unwrap_or(0),
            heartbeat_secs,
            checks: crate::monitoring::checks_for(&agent, &checks, &graph),
            incarnations,
        })
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(agent = %agent.name, system = %agent.system, "agent connected");
    // An agent that says nothing for three heartbeats is gone.
    let silence = Duration::from_secs(u64::from(heartbeat_secs) * 3);
    loop {
        tokio::select! {
            push = pushes.recv() => match push {
                Some(super::hub::Push::Send(message)) => {
                    socket.send(&message).await.map_err(|e| e.to_string())?;
                }
                Some(super::hub::Push::Close(reason, message)) => {
                    socket.refuse(reason, &message).await;
                    return Err(reason.describe().to_owned());
                }
                None => return Ok(()),
            },
            message = tokio::time::timeout(silence, socket.receive()) => {
                let message = match message {
                    Err(_) => return Err("no heartbeat".into()),
                    Ok(None) => return Ok(()),
                    Ok(Some(Inbound::Malformed(e))) => {
                        socket.refuse(Refusal::Malformed, &e).await;
                        return Err(e);
                    }
                    Ok(Some(Inbound::Refused(e))) => {
                        let detail = e.to_string();
                        super::frame_refused(ctx, &me, &socket.session_id, &detail).await;
                        socket.refuse(Refusal::Integrity, &detail).await;
                        return Err(detail);
                    }
                    Ok(Some(Inbound::Message(m))) => m,
                };
                handle(ctx, socket, &me, message).await?;
            }
        }
    }
}

async fn handle(
    ctx: &Context,
    socket: &mut Channel,
    me: &AgentRef,
    message: AgentMessage,
) -> Result<(), String> {
    match message {
        AgentMessage::Records { records } => {
            if records.windows(2).any(|w| w[0].seq >= w[1].seq) {
                socket
                    .refuse(
                        Refusal::Malformed,
                        "records must come in increasing sequence order",
                    )
                    .await;
                return Err("records out of order".into());
            }
            // U+0000 is replaced in free text and refuses a record whose
            // names hold it, before the shared batch sees it.
            let cleaned = super::nul::records(records);
            if cleaned.replaced > 0 {
                ctx.metrics.nul_replaced(cleaned.replaced);
                tracing::info!(agent = %me.name, count = cleaned.replaced, "NUL characters in agent output replaced by U+FFFD");
            }
            let up_to = ctx
                .ingest
                .records(me.clone(), cleaned.records, cleaned.refused.clone())
                .await
                .map_err(|e| e.to_string())?;
            socket
                .send(&ServerMessage::Ack {
                    up_to,
                    refused: cleaned.refused,
                })
                .await
                .map_err(|e| e.to_string())
        }
        AgentMessage::Heartbeat {
            queue_depth,
            dropped,
        } => {
            ctx.ingest
                .seen(me.clone(), queue_depth, dropped, to_micros(ctx.now()));
            socket
                .send(&ServerMessage::Heartbeat)
                .await
                .map_err(|e| e.to_string())
        }
        AgentMessage::ActionUpdate(mut update) => {
            // Live progress only; the outcome arrives as a queued record.
            match super::nul::action(&mut update) {
                Ok(0) => {}
                Ok(n) => ctx.metrics.nul_replaced(n),
                Err(field) => {
                    tracing::warn!(agent = %me.name, field, "action progress with a NUL character (U+0000) ignored");
                    return Ok(());
                }
            }
            if let Err(e) = crate::actions::runs::progress(ctx, me, &update).await {
                tracing::warn!(agent = %me.name, run = %update.run_id, error = %e, "cannot record action progress");
            }
            Ok(())
        }
        AgentMessage::EnrollHello { .. }
        | AgentMessage::Enroll { .. }
        | AgentMessage::Hello { .. }
        | AgentMessage::Auth { .. } => {
            socket
                .refuse(Refusal::Malformed, "the session is already established")
                .await;
            Err("handshake message inside a session".into())
        }
    }
}
