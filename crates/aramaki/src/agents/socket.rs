//! The agent endpoint: one WebSocket per agent, authenticated both ways.
//!
//! The route is public (an agent has no API token); the session itself is
//! the authentication: enrollment needs a valid token, and every later
//! session a signature by the enrolled key over a fresh challenge.

use std::sync::Arc;
use std::time::Duration;

use aramaki_protocol::agent::{
    agent_transcript, server_transcript, AgentMessage, Refusal, ServerMessage,
    AGENT_PROTOCOL_VERSION,
};
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

/// The next protocol message, skipping pings; None when the peer is gone.
async fn receive(socket: &mut WebSocket) -> Option<Result<AgentMessage, String>> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(text)) => {
                return Some(serde_json::from_str(text.as_str()).map_err(|e| e.to_string()))
            }
            Ok(Message::Binary(_)) => {
                return Some(Err("binary frames are not part of the protocol".into()))
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
        }
    }
}

async fn receive_within(socket: &mut WebSocket) -> Option<Result<AgentMessage, String>> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, receive(socket))
        .await
        .unwrap_or(None)
}

async fn session(ctx: Arc<Context>, mut socket: WebSocket) {
    let first = match receive_within(&mut socket).await {
        Some(Ok(m)) => m,
        Some(Err(e)) => return refuse(&mut socket, Refusal::Malformed, &e).await,
        None => return,
    };
    match first {
        AgentMessage::Enroll {
            protocol,
            token,
            public_key,
            name,
            version,
        } => {
            if protocol != AGENT_PROTOCOL_VERSION {
                return refuse_protocol(&mut socket, protocol).await;
            }
            match super::enroll(&ctx, &token, &public_key, &name, &version).await {
                Ok(enrolled) => {
                    let _ = send(
                        &mut socket,
                        &ServerMessage::Enrolled {
                            agent_id: enrolled.agent_id,
                            system: enrolled.system,
                            server_key: ctx.identity.public_key_hex(),
                        },
                    )
                    .await;
                    let _ = socket.send(Message::Close(None)).await;
                }
                Err(AgentError::Refused { reason, message }) => {
                    refuse(&mut socket, reason, &message).await
                }
                Err(e) => {
                    tracing::error!(error = %e, "enrollment failed");
                    refuse(
                        &mut socket,
                        Refusal::Malformed,
                        "the server could not enroll this agent",
                    )
                    .await
                }
            }
        }
        AgentMessage::Hello {
            protocol,
            agent_id,
            public_key,
            nonce,
            version,
            subscriptions,
            queue_depth,
        } => {
            if protocol != AGENT_PROTOCOL_VERSION {
                return refuse_protocol(&mut socket, protocol).await;
            }
            let hello = Hello {
                agent_id,
                public_key,
                nonce,
                version,
                subscriptions,
                queue_depth,
            };
            match handshake(&ctx, &mut socket, &hello).await {
                Ok(agent) => run(ctx, socket, agent, &hello).await,
                Err((reason, message)) => refuse(&mut socket, reason, &message).await,
            }
        }
        _ => {
            refuse(
                &mut socket,
                Refusal::Malformed,
                "a session starts with 'hello' or 'enroll'",
            )
            .await
        }
    }
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
    version: String,
    subscriptions: Vec<String>,
    queue_depth: u64,
}

type Refused = (Refusal, String);

/// Challenge and response; returns the authenticated agent.
async fn handshake(ctx: &Context, socket: &mut WebSocket, hello: &Hello) -> Result<Agent, Refused> {
    if unhex_array::<32>(&hello.nonce).is_none() {
        return Err((Refusal::Malformed, "nonce must be 32 bytes in hex".into()));
    }
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
    let signature = ctx
        .identity
        .sign(&server_transcript(&agent.id, &hello.nonce, &server_nonce));
    send(
        socket,
        &ServerMessage::Challenge {
            nonce: server_nonce.clone(),
            signature: hex(&signature.to_bytes()),
        },
    )
    .await
    .map_err(|e| (Refusal::Malformed, e.to_string()))?;
    let signature = match receive_within(socket).await {
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
    key.verify(
        &agent_transcript(&agent.id, &hello.nonce, &server_nonce),
        &signature,
    )
    .map_err(|_| {
        (
            Refusal::BadSignature,
            "the agent's signature does not verify against its enrolled key".to_owned(),
        )
    })?;
    Ok(agent)
}

fn internal(e: impl std::fmt::Display) -> Refused {
    tracing::error!(error = %e, "agent handshake failed on the server side");
    (
        Refusal::Malformed,
        "the server could not complete the handshake".into(),
    )
}

/// The authenticated session: records up, acknowledgements and checks down.
async fn run(ctx: Arc<Context>, mut socket: WebSocket, agent: Agent, hello: &Hello) {
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
    socket: &mut WebSocket,
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
    let mut tx = ctx.db.begin().await.map_err(|e| e.to_string())?;
    store::session_started(
        &mut tx,
        &agent.id,
        &hello.version,
        &hello.subscriptions,
        i64::try_from(hello.queue_depth).unwrap_or(i64::MAX),
        to_micros(ctx.now()),
    )
    .await
    .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    let agent = Agent {
        subscriptions: hello.subscriptions.clone(),
        ..agent.clone()
    };
    let checks = {
        let mut conn = ctx.db.reader().acquire().await.map_err(|e| e.to_string())?;
        crate::monitoring::store::checks(&mut conn)
            .await
            .map_err(|e| e.to_string())?
    };
    ctx.ingest
        .seen(me.clone(), hello.queue_depth, 0, to_micros(ctx.now()));
    let heartbeat_secs = ctx.config.monitoring.heartbeat;
    send(
        socket,
        &ServerMessage::Welcome {
            acked: u64::try_from(agent.acked_seq).unwrap_or(0),
            heartbeat_secs,
            checks: crate::monitoring::checks_for(&agent, &checks),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(agent = %agent.name, system = %agent.system, "agent connected");
    // An agent that says nothing for three heartbeats is gone.
    let silence = Duration::from_secs(u64::from(heartbeat_secs) * 3);
    loop {
        tokio::select! {
            push = pushes.recv() => match push {
                Some(super::hub::Push::Send(message)) => {
                    send(socket, &message).await.map_err(|e| e.to_string())?;
                }
                Some(super::hub::Push::Close(reason, message)) => {
                    refuse(socket, reason, &message).await;
                    return Err(reason.describe().to_owned());
                }
                None => return Ok(()),
            },
            message = tokio::time::timeout(silence, receive(socket)) => {
                let message = match message {
                    Err(_) => return Err("no heartbeat".into()),
                    Ok(None) => return Ok(()),
                    Ok(Some(Err(e))) => {
                        refuse(socket, Refusal::Malformed, &e).await;
                        return Err(e);
                    }
                    Ok(Some(Ok(m))) => m,
                };
                handle(ctx, socket, &me, message).await?;
            }
        }
    }
}

async fn handle(
    ctx: &Context,
    socket: &mut WebSocket,
    me: &AgentRef,
    message: AgentMessage,
) -> Result<(), String> {
    match message {
        AgentMessage::Records { records } => {
            if records.windows(2).any(|w| w[0].seq >= w[1].seq) {
                refuse(
                    socket,
                    Refusal::Malformed,
                    "records must come in increasing sequence order",
                )
                .await;
                return Err("records out of order".into());
            }
            let up_to = ctx
                .ingest
                .records(me.clone(), records)
                .await
                .map_err(|e| e.to_string())?;
            send(socket, &ServerMessage::Ack { up_to })
                .await
                .map_err(|e| e.to_string())
        }
        AgentMessage::Heartbeat {
            queue_depth,
            dropped,
        } => {
            ctx.ingest
                .seen(me.clone(), queue_depth, dropped, to_micros(ctx.now()));
            send(socket, &ServerMessage::Heartbeat)
                .await
                .map_err(|e| e.to_string())
        }
        AgentMessage::ActionUpdate(update) => {
            // Live progress only; the outcome arrives as a queued record.
            if let Err(e) = crate::actions::runs::progress(ctx, me, &update).await {
                tracing::warn!(agent = %me.name, run = %update.run_id, error = %e, "cannot record action progress");
            }
            Ok(())
        }
        AgentMessage::Enroll { .. } | AgentMessage::Hello { .. } | AgentMessage::Auth { .. } => {
            refuse(
                socket,
                Refusal::Malformed,
                "the session is already established",
            )
            .await;
            Err("handshake message inside a session".into())
        }
    }
}
