//! Agents and monitoring through the real agent protocol: enrollment and its
//! refusals, results with deduplication, state changes, keepalives, TTLs,
//! check definitions reaching agents. The agent here is a small protocol
//! client written against `aramaki-protocol`; `agent_e2e` runs the real one.

use std::collections::BTreeMap;

use aramaki::monitoring::watch::sweep;
use aramaki_protocol::agent::{
    agent_transcript, enroll_transcript, server_transcript, session_transcript, AgentMessage,
    CheckResult, Handshake, Record, RecordBody, Refusal, ServerMessage, AGENT_PROTOCOL_VERSION,
    CONNECT_PATH,
};
use aramaki_protocol::frames::{Exchange, Opener, Sealer, SessionKeys};
use aramaki_protocol::keys::{hex, unhex_array};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use futures_util::{SinkExt, StreamExt};
use jiff::SignedDuration;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::both;
use crate::support::{start_time, TestApp};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct SimAgent {
    pub ws: Ws,
    pub checks: Vec<aramaki_protocol::agent::CheckDefinition>,
    pub acked: u64,
    /// The records the last acknowledgement said were refused.
    pub refused: Vec<aramaki_protocol::agent::RecordRefusal>,
    seal: Sealer,
    open: Opener,
    /// Every frame sent so far, as it went on the wire (to replay one).
    pub sent: Vec<String>,
}

async fn open(app: &TestApp) -> Ws {
    let url = format!("{}{CONNECT_PATH}", app.base.replace("http://", "ws://"));
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

async fn send(ws: &mut Ws, m: &AgentMessage) {
    ws.send(Message::Text(serde_json::to_string(m).unwrap().into()))
        .await
        .unwrap();
}

async fn recv_text(ws: &mut Ws) -> String {
    loop {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("the server answers within 10 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(t) = frame {
            return t.as_str().to_owned();
        }
    }
}

async fn recv(ws: &mut Ws) -> ServerMessage {
    serde_json::from_str(&recv_text(ws).await).unwrap()
}

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// Issues a token for `system` through the API.
pub async fn token(app: &TestApp, system: &str, extra: Value) -> String {
    let mut body = json!({"system": system});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, v) = app.post("/api/v1/agents/tokens", body).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v["token"].as_str().unwrap().to_owned()
}

/// Enrolls; returns the agent id or the refusal.
pub async fn enroll(
    app: &TestApp,
    token: &str,
    key: &SigningKey,
    name: &str,
) -> Result<(String, String), (Refusal, String)> {
    enroll_as(app, token, key, name, "test").await
}

/// [`enroll`] with the agent version it reports.
pub async fn enroll_as(
    app: &TestApp,
    token: &str,
    key: &SigningKey,
    name: &str,
    version: &str,
) -> Result<(String, String), (Refusal, String)> {
    let mut ws = open(app).await;
    let nonce = hex(&[5u8; 32]);
    let public_key = hex(key.verifying_key().as_bytes());
    send(
        &mut ws,
        &AgentMessage::EnrollHello {
            protocol: AGENT_PROTOCOL_VERSION,
            nonce: nonce.clone(),
            public_key: public_key.clone(),
        },
    )
    .await;
    let proof = match recv(&mut ws).await {
        ServerMessage::EnrollProof {
            nonce: server_nonce,
            server_key,
            signature,
        } => {
            let key = VerifyingKey::from_bytes(&unhex_array::<32>(&server_key).unwrap()).unwrap();
            let sig = Signature::from_bytes(&unhex_array::<64>(&signature).unwrap());
            key.verify(
                &enroll_transcript(&nonce, &server_nonce, &public_key, &server_key),
                &sig,
            )
            .expect("the server proves its key before the token is sent");
            (server_nonce, server_key)
        }
        ServerMessage::Refused { reason, message } => return Err((reason, message)),
        other => panic!("unexpected {other:?}"),
    };
    let parsed = aramaki_protocol::agent::EnrollToken::parse(token);
    let (token_id, secret) = parsed.map_or((String::new(), String::new()), |t| (t.id, t.secret));
    let mac = aramaki_protocol::agent::enroll_mac(
        &aramaki_protocol::agent::token_secret_hash(&secret),
        &aramaki_protocol::agent::Enrollment {
            agent_nonce: &nonce,
            server_nonce: &proof.0,
            agent_key: &public_key,
            server_key: &proof.1,
            token_id: &token_id,
            name,
        },
    );
    send(
        &mut ws,
        &AgentMessage::Enroll {
            protocol: AGENT_PROTOCOL_VERSION,
            token_id,
            mac,
            public_key,
            name: name.to_owned(),
            version: version.to_owned(),
        },
    )
    .await;
    match recv(&mut ws).await {
        ServerMessage::Enrolled {
            agent_id,
            server_key,
            ..
        } => Ok((agent_id, server_key)),
        ServerMessage::Refused { reason, message } => Err((reason, message)),
        other => panic!("unexpected {other:?}"),
    }
}

impl SimAgent {
    /// Opens an authenticated session, checking the server's signature.
    pub async fn connect(
        app: &TestApp,
        id: &str,
        key: &SigningKey,
    ) -> Result<SimAgent, (Refusal, String)> {
        SimAgent::connect_subscribed(app, id, key, &["linux"]).await
    }

    /// Opens a session whose hello declares `subscriptions`.
    pub async fn connect_subscribed(
        app: &TestApp,
        id: &str,
        key: &SigningKey,
        subscriptions: &[&str],
    ) -> Result<SimAgent, (Refusal, String)> {
        let mut ws = open(app).await;
        let nonce = hex(&[7u8; 32]);
        let exchange = Exchange::from_seed([8u8; 32]);
        let agent_key = hex(key.verifying_key().as_bytes());
        let hello = AgentMessage::Hello {
            protocol: AGENT_PROTOCOL_VERSION,
            agent_id: id.to_owned(),
            public_key: agent_key.clone(),
            nonce: nonce.clone(),
            exchange: exchange.public_hex(),
            version: "test".into(),
            subscriptions: subscriptions.iter().map(|s| s.to_string()).collect(),
            queue_depth: 0,
            spans: vec![],
        };
        let hello_digest = aramaki_protocol::agent::hello_digest(&hello);
        send(&mut ws, &hello).await;
        let (server_nonce, server_exchange, signature) = match recv(&mut ws).await {
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
                let server_key =
                    VerifyingKey::from_bytes(app.ctx.identity.public_key().as_bytes()).unwrap();
                let sig = Signature::from_bytes(&unhex_array::<64>(&signature).unwrap());
                server_key
                    .verify(
                        &aramaki_protocol::agent::refusal_transcript(
                            &aramaki_protocol::agent::RefusedHello {
                                agent_id: id,
                                agent_key: &agent_key,
                                agent_nonce: &nonce,
                                agent_exchange: &exchange.public_hex(),
                                hello: &hello_digest,
                            },
                            reason,
                            &message,
                        ),
                        &sig,
                    )
                    .expect("a refusal of a hello is signed over the agent's nonce");
                return Err((reason, message));
            }
            ServerMessage::Refused { reason, message } => return Err((reason, message)),
            other => panic!("unexpected {other:?}"),
        };
        let server_key_hex = app.ctx.identity.public_key_hex();
        let agent_exchange = exchange.public_hex();
        let facts = Handshake {
            agent_id: id,
            agent_key: &agent_key,
            server_key: &server_key_hex,
            agent_nonce: &nonce,
            server_nonce: &server_nonce,
            agent_exchange: &agent_exchange,
            server_exchange: &server_exchange,
            hello: &hello_digest,
        };
        let server_key =
            VerifyingKey::from_bytes(app.ctx.identity.public_key().as_bytes()).unwrap();
        let sig = Signature::from_bytes(&unhex_array::<64>(&signature).unwrap());
        server_key
            .verify(&server_transcript(&facts), &sig)
            .expect("the server signs the challenge with its instance key");
        let keys = SessionKeys::derive(
            &exchange.agree(&server_exchange).unwrap(),
            &session_transcript(&facts),
        );
        let mine = key.sign(&agent_transcript(&facts));
        send(
            &mut ws,
            &AgentMessage::Auth {
                signature: hex(&mine.to_bytes()),
            },
        )
        .await;
        let (seal, open) = keys.for_agent();
        let mut agent = SimAgent {
            ws,
            checks: Vec::new(),
            acked: 0,
            refused: Vec::new(),
            seal,
            open,
            sent: Vec::new(),
        };
        match agent.next().await {
            ServerMessage::Welcome { acked, checks, .. } => {
                agent.acked = acked;
                agent.checks = checks;
                Ok(agent)
            }
            ServerMessage::Refused { reason, message } => Err((reason, message)),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends one message, sealed.
    pub async fn say(&mut self, m: &AgentMessage) {
        let frame = self.seal.seal(serde_json::to_string(m).unwrap());
        self.sent.push(frame.clone());
        self.raw(&frame).await;
    }

    /// Sends a frame as it is (to inject or replay one).
    pub async fn raw(&mut self, frame: &str) {
        self.ws
            .send(Message::Text(frame.to_owned().into()))
            .await
            .unwrap();
    }

    /// Sends records and waits for their acknowledgement.
    pub async fn send(&mut self, records: Vec<Record>) -> u64 {
        self.say(&AgentMessage::Records { records }).await;
        loop {
            match self.next().await {
                ServerMessage::Ack { up_to, refused } => {
                    self.acked = up_to;
                    self.refused = refused;
                    return up_to;
                }
                ServerMessage::Checks { checks } => self.checks = checks,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// The next server message; every frame must open.
    pub async fn next(&mut self) -> ServerMessage {
        let text = recv_text(&mut self.ws).await;
        let body = self
            .open
            .open(&text)
            .expect("every server frame is sealed and in order");
        serde_json::from_str(&body).unwrap()
    }
}

pub fn result(seq: u64, check: &str, status: i32, output: &str) -> Record {
    Record {
        seq,
        body: RecordBody::Result(CheckResult {
            check: check.into(),
            system: None,
            labels: BTreeMap::new(),
            status,
            output: output.into(),
            metrics: vec![],
            executed_at: start_time().as_microsecond() + seq as i64,
            duration_ms: 1,
            source: "check".into(),
        }),
    }
}

/// A host system with one enrolled agent.
pub async fn enrolled(app: &TestApp, name: &str, seed: u8) -> (String, SigningKey) {
    if app
        .call(Method::GET, &format!("/api/v1/systems/{name}-host"), None)
        .await
        .0
        != StatusCode::OK
    {
        app.system(&format!("{name}-host"), "host", json!({})).await;
    }
    let t = token(app, &format!("{name}-host"), json!({})).await;
    let k = key(seed);
    let (id, _) = enroll(app, &t, &k, name).await.unwrap();
    (id, k)
}

/// The latest result of `check` on `system`.
async fn observation_of(app: &TestApp, system: &str, check: &str) -> Value {
    let obs = app
        .get(&format!("/api/v1/systems/{system}/observations"))
        .await;
    obs["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["check"] == check)
        .unwrap_or_else(|| panic!("no observation of {check} on {system}: {obs}"))
        .clone()
}

/// Waits until the server noticed that the agent's session ended.
async fn disconnected(app: &TestApp, agent_id: &str) {
    for _ in 0..200 {
        if !app.ctx.agents.is_connected(agent_id) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the server still counts agent {agent_id} as connected");
}

pub async fn timeline_kinds(app: &TestApp, system: &str, kind: &str) -> Vec<Value> {
    let v = app
        .get(&format!(
            "/api/v1/systems/{system}/timeline?kind={kind}&limit=100"
        ))
        .await;
    v["items"].as_array().unwrap().clone()
}

both!(enrollment_refusals_name_the_reason, |app| async move {
    app.system("web-host", "host", json!({})).await;
    let single = token(&app, "web-host", json!({})).await;
    let (id, server_key) = enroll(&app, &single, &key(1), "web-1").await.unwrap();
    assert_eq!(
        server_key,
        app.ctx.identity.public_key_hex(),
        "the agent learns the key to pin"
    );
    assert!(
        single.ends_with(&app.ctx.identity.fingerprint().replace('-', "")),
        "the token carries the fingerprint"
    );

    // A single-use token works once.
    let err = enroll(&app, &single, &key(2), "web-2").await.unwrap_err();
    assert_eq!(err.0, Refusal::TokenUsed, "{}", err.1);

    // Expired tokens are refused.
    let short = token(&app, "web-host", json!({"ttl": "5m"})).await;
    app.clock.advance(SignedDuration::from_mins(6));
    let err = enroll(&app, &short, &key(3), "web-3").await.unwrap_err();
    assert_eq!(err.0, Refusal::TokenExpired, "{}", err.1);
    assert!(err.1.contains("expired"));

    // A wrong secret, and a revoked token.
    let good = token(&app, "web-host", json!({"reusable": true})).await;
    let forged = good.replacen('_', "_x", 2);
    assert_eq!(
        enroll(&app, &forged, &key(4), "web-4").await.unwrap_err().0,
        Refusal::TokenInvalid
    );
    let prefix = good.split('_').nth(1).unwrap();
    let (status, _) = app
        .call(
            Method::DELETE,
            &format!("/api/v1/agents/tokens/{prefix}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(
        enroll(&app, &good, &key(4), "web-4").await.unwrap_err().0,
        Refusal::TokenInvalid
    );

    // The enrolled agent connects; with another key it is refused.
    SimAgent::connect(&app, &id, &key(1)).await.unwrap();
    let err = SimAgent::connect(&app, &id, &key(9)).await.err().unwrap();
    assert_eq!(err.0, Refusal::KeyChanged);
    assert!(err.1.contains("reenroll"), "{}", err.1);
    // Enrolling the same name with a new key is refused until an admin allows it.
    let again = token(&app, "web-host", json!({"reusable": true})).await;
    assert_eq!(
        enroll(&app, &again, &key(9), "web-1").await.unwrap_err().0,
        Refusal::KeyChanged
    );
    let (status, _) = app.post("/api/v1/agents/web-1/reenroll", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (same_id, _) = enroll(&app, &again, &key(9), "web-1").await.unwrap();
    assert_eq!(same_id, id, "re-enrollment keeps the agent's identity");
    SimAgent::connect(&app, &id, &key(9)).await.unwrap();
    assert_eq!(
        SimAgent::connect(&app, &id, &key(1)).await.err().unwrap().0,
        Refusal::KeyChanged
    );

    // Unknown agents and bad signatures.
    assert_eq!(
        SimAgent::connect(&app, "nobody", &key(1))
            .await
            .err()
            .unwrap()
            .0,
        Refusal::UnknownAgent
    );
});

both!(a_revoked_agent_is_cut_off_at_once, |app| async move {
    let (id, k) = enrolled(&app, "db-1", 11).await;
    let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
    let agents = app.get("/api/v1/agents").await;
    assert_eq!(agents["items"][0]["connected"], true);
    let (status, v) = app.post("/api/v1/agents/db-1/revoke", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    match agent.next().await {
        ServerMessage::Refused { reason, .. } => assert_eq!(reason, Refusal::Revoked),
        other => panic!("expected the socket to close with a refusal, got {other:?}"),
    }
    let err = SimAgent::connect(&app, &id, &k).await.err().unwrap();
    assert_eq!(err.0, Refusal::Revoked);
    let events = timeline_kinds(&app, "db-1-host", "agent.revoked").await;
    assert_eq!(events.len(), 1);
});

both!(results_are_deduplicated_by_sequence, |app| async move {
    let (id, k) = enrolled(&app, "app-1", 21).await;
    let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
    assert_eq!(agent.acked, 0);
    let up_to = agent
        .send(
            (1..=5)
                .map(|s| result(s, "disk", 0, &format!("DISK OK - run {s}")))
                .collect(),
        )
        .await;
    assert_eq!(up_to, 5);
    // The acknowledgement was "lost": the agent replays from 3.
    drop(agent);
    let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
    assert_eq!(agent.acked, 5, "the welcome carries the high-water mark");
    let up_to = agent
        .send(
            (3..=8)
                .map(|s| result(s, "disk", 0, &format!("DISK OK - run {s}")))
                .collect(),
        )
        .await;
    assert_eq!(up_to, 8);
    let history = app
        .get("/api/v1/systems/app-1-host/observations/disk/history?limit=100")
        .await;
    let seqs: Vec<i64> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["agent_seq"].as_i64().unwrap())
        .collect();
    assert_eq!(
        seqs,
        vec![8, 7, 6, 5, 4, 3, 2, 1],
        "each result exactly once"
    );
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aramaki_agent_records_committed_total 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aramaki_agent_records_duplicate_total 3"),
        "{metrics}"
    );
    assert!(metrics.contains("aramaki_agents_connected 1"), "{metrics}");
    // Out-of-order batches are refused.
    agent
        .say(&AgentMessage::Records {
            records: vec![result(10, "disk", 0, "x"), result(9, "disk", 0, "y")],
        })
        .await;
    assert!(matches!(
        agent.next().await,
        ServerMessage::Refused {
            reason: Refusal::Malformed,
            ..
        }
    ));
});

both!(state_changes_reach_the_timeline_once, |app| async move {
    let (id, k) = enrolled(&app, "mq-1", 31).await;
    let (status, v) = app
        .post(
            "/api/v1/checks",
            json!({"name": "queue", "command": ["/bin/true"], "subscriptions": ["linux"], "interval": 10, "occurrences": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
    assert_eq!(
        agent.checks.len(),
        1,
        "the welcome carries the agent's checks"
    );
    let statuses = [0, 0, 0, 2, 0, 2, 2, 2, 1, 1, 0];
    let records = statuses
        .iter()
        .enumerate()
        .map(|(i, s)| result(i as u64 + 1, "queue", *s, &format!("QUEUE {s}")))
        .collect();
    agent.send(records).await;
    let events = timeline_kinds(&app, "mq-1-host", "check.state_changed").await;
    let changes: Vec<(String, String)> = events
        .iter()
        .rev()
        .filter(|e| e["data"]["check"] == "queue")
        .map(|e| {
            (
                e["data"]["from"].as_str().unwrap().to_owned(),
                e["data"]["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    // One CRITICAL is not enough (occurrences 2); repeats are not news.
    let expect = [
        ("none", "ok"),
        ("ok", "critical"),
        ("critical", "warning"),
        ("warning", "ok"),
    ];
    let expect: Vec<(String, String)> = expect
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    assert_eq!(changes, expect);
    let queue = observation_of(&app, "mq-1-host", "queue").await;
    assert_eq!(queue["state"], "ok");
    assert_eq!(queue["output"], "QUEUE 0");
    // The system's status comes from the observations.
    agent
        .send(vec![
            result(12, "queue", 2, "QUEUE 2"),
            result(13, "queue", 2, "QUEUE 2"),
        ])
        .await;
    let status = app.get("/api/v1/systems/mq-1-host/status").await;
    assert_eq!(status["state"], "critical", "{status}");
    let history = app
        .get("/api/v1/systems/mq-1-host/observations/queue/history?limit=5")
        .await;
    assert_eq!(history["items"].as_array().unwrap().len(), 5);
    assert!(history["next"].is_string(), "more history pages");
});

both!(checks_reach_connected_agents_at_once, |app| async move {
    let (id, k) = enrolled(&app, "edge-1", 41).await;
    let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
    assert!(agent.checks.is_empty());
    let (status, v) = app
        .post(
            "/api/v1/checks",
            json!({"name": "edge-tcp", "probe": {"probe": "tcp", "host": "127.0.0.1", "port": 22},
                   "subscriptions": ["agent:edge-1"], "cron": "*/5 * * * *", "timezone": "Europe/Berlin"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    match agent.next().await {
        ServerMessage::Checks { checks } => {
            assert_eq!(checks.len(), 1);
            assert_eq!(checks[0].name, "edge-tcp");
        }
        other => panic!("expected checks, got {other:?}"),
    }
    // Another agent's subscription does not match.
    app.post(
        "/api/v1/checks",
        json!({"name": "other", "command": ["/bin/true"], "subscriptions": ["windows"], "interval": 60}),
    )
    .await;
    match agent.next().await {
        ServerMessage::Checks { checks } => {
            assert_eq!(checks.len(), 1, "'other' is not for this agent")
        }
        other => panic!("expected checks, got {other:?}"),
    }
    let (status, _) = app
        .call(Method::DELETE, "/api/v1/checks/edge-tcp", None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    match agent.next().await {
        ServerMessage::Checks { checks } => assert!(checks.is_empty()),
        other => panic!("expected checks, got {other:?}"),
    }
});

both!(
    bad_check_definitions_are_refused_by_field,
    |app| async move {
        let cases = [
            (
                json!({"name": "Bad Name", "command": ["/bin/true"], "subscriptions": ["a"], "interval": 10}),
                "name",
            ),
            (
                json!({"name": "x", "subscriptions": ["a"], "interval": 10}),
                "command",
            ),
            (
                json!({"name": "x", "command": ["/bin/true"], "shell": "true", "subscriptions": ["a"], "interval": 10}),
                "command",
            ),
            (
                json!({"name": "x", "command": ["/bin/true"], "subscriptions": ["a"]}),
                "interval",
            ),
            (
                json!({"name": "x", "command": ["/bin/true"], "subscriptions": ["a"], "cron": "61 * * * *"}),
                "cron",
            ),
            (
                json!({"name": "x", "command": ["/bin/true"], "subscriptions": ["a"], "cron": "* * * * *", "timezone": "Mars/Olympus"}),
                "timezone",
            ),
            (
                json!({"name": "x", "command": ["/bin/true"], "subscriptions": [], "interval": 10}),
                "subscriptions",
            ),
            (
                json!({"name": "x", "command": ["/bin/true"], "subscriptions": ["a"], "interval": 10, "ttl": 5}),
                "ttl",
            ),
            (
                json!({"name": "x", "command": ["/bin/true"], "subscriptions": ["a"], "interval": 10, "system": "nope"}),
                "system",
            ),
        ];
        for (body, field) in cases {
            let (status, v) = app.post("/api/v1/checks", body.clone()).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
            assert_eq!(v["field"], field, "{body}: {v}");
        }
        let (status, v) = app
        .post("/api/v1/checks", json!({"name": "x", "command": ["/bin/true"], "subscriptions": ["a"], "interval": 10, "bogus": 1}))
        .await;
        assert!(status.is_client_error(), "{v}");
        assert!(v["detail"].as_str().unwrap().contains("bogus"), "{v}");
        assert_eq!(
            app.get("/api/v1/checks").await["items"]
                .as_array()
                .unwrap()
                .len(),
            0,
            "nothing written"
        );
    }
);

both!(
    missed_keepalives_turn_the_system_warning_then_critical,
    |app| async move {
        let (id, k) = enrolled(&app, "cache-1", 51).await;
        let started = app.ctx.now();
        let agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        drop(agent);
        disconnected(&app, &id).await;
        app.clock.advance(SignedDuration::from_secs(60));
        assert_eq!(
            sweep(&app.ctx, started).await.unwrap().keepalives,
            0,
            "within the timeout"
        );
        app.clock.advance(SignedDuration::from_secs(70));
        assert_eq!(sweep(&app.ctx, started).await.unwrap().keepalives, 1);
        assert_eq!(
            sweep(&app.ctx, started).await.unwrap().keepalives,
            0,
            "no repeats"
        );
        app.clock.advance(SignedDuration::from_secs(200));
        assert_eq!(sweep(&app.ctx, started).await.unwrap().keepalives, 1);
        let changes: Vec<String> = timeline_kinds(&app, "cache-1-host", "check.state_changed")
            .await
            .iter()
            .rev()
            .map(|e| e["data"]["to"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(changes, ["ok", "warning", "critical"]);
        assert_eq!(
            app.get("/api/v1/agents/cache-1").await["keepalive"],
            "critical"
        );

        // After a server restart, silence counts from the restart: agents get
        // the warning period to come back, then are judged.
        let (id2, k2) = enrolled(&app, "cache-2", 52).await;
        drop(SimAgent::connect(&app, &id2, &k2).await.unwrap());
        disconnected(&app, &id2).await;
        app.clock.advance(SignedDuration::from_secs(600));
        let restarted = app.ctx.now();
        assert_eq!(
            sweep(&app.ctx, restarted).await.unwrap().keepalives,
            0,
            "grace after the restart"
        );
        app.clock.advance(SignedDuration::from_secs(121));
        assert_eq!(
            sweep(&app.ctx, restarted).await.unwrap().keepalives,
            1,
            "detected after the restart"
        );
        assert_eq!(
            app.get("/api/v1/agents/cache-2").await["keepalive"],
            "warning"
        );

        // Coming back turns it OK.
        let mut back = SimAgent::connect(&app, &id2, &k2).await.unwrap();
        back.send(vec![result(1, "disk", 0, "fine")]).await;
        assert_eq!(app.get("/api/v1/agents/cache-2").await["keepalive"], "ok");
    }
);

both!(a_silent_check_trips_its_ttl, |app| async move {
    let (id, k) = enrolled(&app, "batch-1", 61).await;
    app.post(
        "/api/v1/checks",
        json!({"name": "backup", "command": ["/bin/true"], "subscriptions": ["linux"], "interval": 60, "ttl": 300}),
    )
    .await;
    let started = app.ctx.now();
    let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
    agent.send(vec![result(1, "backup", 0, "BACKUP OK")]).await;
    app.clock.advance(SignedDuration::from_secs(299));
    assert_eq!(sweep(&app.ctx, started).await.unwrap().ttls, 0);
    app.clock.advance(SignedDuration::from_secs(2));
    assert_eq!(sweep(&app.ctx, started).await.unwrap().ttls, 1);
    assert_eq!(
        sweep(&app.ctx, started).await.unwrap().ttls,
        0,
        "fires once"
    );
    let backup = observation_of(&app, "batch-1-host", "backup").await;
    assert_eq!(backup["state"], "critical");
    assert!(
        backup["output"].as_str().unwrap().contains("TTL"),
        "{backup}"
    );
    agent.send(vec![result(2, "backup", 0, "BACKUP OK")]).await;
    let backup = observation_of(&app, "batch-1-host", "backup").await;
    assert_eq!(backup["state"], "ok");

    // History is kept for the retention period (30 days), not a fixed count.
    let path = "/api/v1/systems/batch-1-host/observations/backup/history?limit=1000";
    assert_eq!(app.get(path).await["items"].as_array().unwrap().len(), 3);
    app.clock.advance(SignedDuration::from_hours(24 * 29));
    // Nothing arrived for 29 days: the TTL fires again; nothing is old enough to go.
    let swept = sweep(&app.ctx, started).await.unwrap();
    assert_eq!((swept.ttls, swept.purged), (1, 0), "{swept:?}");
    app.clock.advance(SignedDuration::from_hours(24 * 2));
    // Past 30 days the three early results (and the agent's first keepalive) go.
    let swept = sweep(&app.ctx, started).await.unwrap();
    assert_eq!(swept.purged, 4, "{swept:?}");
    let left = app.get(path).await;
    let left = left["items"].as_array().unwrap();
    assert_eq!(left.len(), 1, "only the recent TTL result is left");
    assert!(left[0]["output"].as_str().unwrap().contains("TTL"));
});

both!(monitoring_routes_state_their_roles, |app| async move {
    let viewer = app.user("vera", aramaki::users::Role::Viewer).await;
    let (status, _) = app
        .call_as(&viewer, Method::POST, "/api/v1/checks", Some(json!({"name": "x", "command": ["/bin/true"], "subscriptions": ["a"], "interval": 10})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = app
        .call_as(&viewer, Method::GET, "/api/v1/agents", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "agents are for admins");
    let (status, _) = app
        .call_as(&viewer, Method::GET, "/api/v1/checks", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .call_as(
            &viewer,
            Method::POST,
            "/api/v1/agents/tokens",
            Some(json!({"system": "aramaki"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let anonymous = app
        .http
        .get(app.url("/api/v1/observations"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    // Garbage on the agent socket is refused, not a crash.
    let mut ws = open(&app).await;
    ws.send(Message::Text("{\"type\":\"hello\"}".into()))
        .await
        .unwrap();
    assert!(matches!(
        recv(&mut ws).await,
        ServerMessage::Refused {
            reason: Refusal::Malformed,
            ..
        }
    ));
    let (status, v) = app
        .post(
            "/api/v1/agents/tokens",
            json!({"system": "aramaki", "ttl": "100y"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["field"], "ttl");
});

/// Runs the `aramaki` command line against the app.
pub(crate) async fn cli(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    let (base, token) = (app.base.clone(), app.token.clone());
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aramaki"))
            .args(&args)
            .env("ARAMAKI_URL", base)
            .env("ARAMAKI_TOKEN", token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

both!(checks_and_agents_from_the_command_line, |app| async move {
    app.system("cli-host", "host", json!({})).await;
    let (ok, out, err) = cli(
        &app,
        &[
            "check",
            "add",
            "load",
            "--subscriptions",
            "linux,web",
            "--interval",
            "30",
            "--ttl",
            "120",
            "--label",
            "team=ops",
            "--",
            "/usr/lib/nagios/plugins/check_load",
            "-w",
            "5,4,3",
            "-c",
            "10,8,6",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    let (ok, out, _) = cli(&app, &["check", "list"]).await;
    assert!(
        ok && out.contains("load")
            && out.contains("check_load -w 5,4,3")
            && out.contains("linux,web"),
        "{out}"
    );
    let (ok, out, _) = cli(&app, &["check", "show", "load"]).await;
    assert!(ok);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["ttl"], 120);
    assert_eq!(shown["labels"]["team"], "ops");
    let (ok, _, err) = cli(
        &app,
        &[
            "check",
            "add",
            "load",
            "--subscriptions",
            "x",
            "--interval",
            "30",
            "--",
            "/bin/true",
        ],
    )
    .await;
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, _, err) = cli(
        &app,
        &[
            "check",
            "add",
            "bad",
            "--subscriptions",
            "x",
            "--interval",
            "0",
            "--",
            "/bin/true",
        ],
    )
    .await;
    assert!(!ok && err.contains("interval"), "{err}");
    let (ok, out, _) = cli(&app, &["check", "delete", "load"]).await;
    assert!(ok && out.contains("deleted"));

    let (ok, token, err) = cli(
        &app,
        &["agent", "token", "--system", "cli-host", "--ttl", "15m"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(token.trim().starts_with("aek_"));
    assert!(err.contains("shown once"));
    let (ok, out, _) = cli(&app, &["agent", "tokens"]).await;
    assert!(
        ok && out.contains("cli-host") && out.contains("single use"),
        "{out}"
    );
    assert!(!out.contains(token.trim()), "secrets are never listed");
    enroll(&app, token.trim(), &key(77), "cli-agent")
        .await
        .unwrap();
    let (ok, out, _) = cli(&app, &["agent", "list"]).await;
    assert!(
        ok && out.contains("cli-agent") && out.contains("disconnected"),
        "{out}"
    );
    let (ok, out, _) = cli(&app, &["agent", "revoke", "cli-agent"]).await;
    assert!(ok && out.contains("revoked"), "{out}");
});

both!(a_sensu_dump_is_imported_with_a_report, |app| async move {
    app.system("www-example-com", "service", json!({})).await;
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sensu-dump.yaml"
    );
    let (ok, out, err) = cli(&app, &["import", "sensu", fixture, "--dry-run"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("would create"), "{out}");
    for unmapped in [
        "handlers",
        "high_flap_threshold",
        "runtime_assets",
        "check_hooks",
    ] {
        assert!(
            out.contains(unmapped),
            "the report names the unmapped field {unmapped}: {out}"
        );
    }
    assert!(
        out.contains("Handler") && out.contains("Entity"),
        "skipped resources are listed: {out}"
    );
    assert_eq!(
        app.get("/api/v1/checks").await["items"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "a dry run changes nothing"
    );

    let (_, out, err) = cli(&app, &["import", "sensu", fixture]).await;
    let checks = app.get("/api/v1/checks").await;
    let names: Vec<&str> = checks["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(names.len() >= 5, "{names:?}\n{out}{err}");
    assert!(names.contains(&"check-website"), "{names:?}");
    // A command with Sensu token substitution is refused in the report,
    // never run through the shell as a pipeline.
    assert!(!names.contains(&"check-postgres"), "{names:?}");
    assert!(
        out.contains("check-postgres") && out.contains("token substitution"),
        "{out}{err}"
    );
    let website = checks["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "check-website")
        .unwrap();
    assert_eq!(
        website["system"], "www-example-com",
        "proxy_entity_name became the system"
    );

    let (_, out, _) = cli(&app, &["import", "sensu", fixture, "--dry-run"]).await;
    assert!(
        out.contains(&format!("{} unchanged", names.len())),
        "importing again changes nothing: {out}"
    );
});

both!(
    proxy_results_and_drops_land_where_they_belong,
    |app| async move {
        let (id, k) = enrolled(&app, "poller-1", 81).await;
        app.system("router-7", "host", json!({})).await;
        app.system("secret-db", "host", json!({})).await;
        app.post(
        "/api/v1/checks",
        json!({"name": "router-ping", "command": ["/bin/true"], "subscriptions": ["agent:poller-1"], "interval": 60, "system": "router-7"}),
    )
    .await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let mut proxied = result(1, "router-ping", 2, "PING CRITICAL - 100% loss");
        let mut sneaky = result(2, "disk", 2, "DISK CRITICAL");
        for (r, system) in [(&mut proxied, "router-7"), (&mut sneaky, "secret-db")] {
            if let RecordBody::Result(res) = &mut r.body {
                res.system = Some(system.into());
            }
        }
        let dropped = Record {
            seq: 3,
            body: RecordBody::Dropped {
                count: 120,
                first_seq: 100,
                last_seq: 219,
            },
        };
        agent.send(vec![proxied, sneaky, dropped]).await;

        // A check definition naming the system, sent to this agent, makes it
        // a proxy check.
        let router = app.get("/api/v1/systems/router-7/observations").await;
        assert_eq!(router["items"][0]["check"], "router-ping");
        assert_eq!(router["items"][0]["state"], "critical");
        // An agent cannot report on a system no check of its points at: the
        // result is refused (and acknowledged), written nowhere.
        let secret = app.get("/api/v1/systems/secret-db/observations").await;
        assert_eq!(secret["items"].as_array().unwrap().len(), 0);
        let own = app.get("/api/v1/systems/poller-1-host/observations").await;
        assert!(
            own["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|o| o["check"] != "disk"),
            "{own}"
        );
        let refused = timeline_kinds(&app, "poller-1-host", "agent.result_refused").await;
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0]["data"]["system"], "secret-db");
        // Drops are counted and told on the timeline.
        let events = timeline_kinds(&app, "poller-1-host", "agent.results_dropped").await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["severity"], "warning");
        assert_eq!(events[0]["data"]["count"], 120);
        assert_eq!(app.get("/api/v1/agents/poller-1").await["dropped"], 120);
    }
);
