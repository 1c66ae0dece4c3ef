//! The agent's promise — the server can name an action, never send a
//! command — tried from the places where features meet: a relay on a plain
//! connection injecting and replaying frames, a fake server at the
//! enrollment URL, checks the agent's own policy refuses, a queue restored
//! from a backup.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aramaki_protocol::agent::{AgentMessage, Notice, Record, RecordBody, Refusal, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::agent_e2e::{enroll, eventually, AgentHost};
use crate::both;
use crate::monitoring::{enrolled, result, token, SimAgent};
use crate::support::{Backend, TestApp};

const DUMMY: &str = "/usr/lib/nagios/plugins/check_dummy";

async fn events(app: &TestApp, system: &str, kind: &str) -> Vec<Value> {
    app.get(&format!(
        "/api/v1/systems/{system}/timeline?kind={kind}&limit=100"
    ))
    .await["items"]
        .as_array()
        .unwrap()
        .clone()
}

async fn metrics(app: &TestApp) -> String {
    app.http
        .get(app.url("/metrics"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

both!(
    forged_replayed_and_unsealed_frames_end_the_session_on_the_record,
    |app| async move {
        let (id, k) = enrolled(&app, "relay-1", 71).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        assert_eq!(agent.send(vec![result(1, "disk", 0, "DISK OK")]).await, 1);

        // A replay of the agent's own first frame (a valid MAC, an old counter).
        let first = agent.sent[0].clone();
        agent.raw(&first).await;
        match agent.next().await {
            ServerMessage::Refused { reason, message } => {
                assert_eq!(reason, Refusal::Integrity);
                assert!(message.contains("replayed"), "{message}");
            }
            other => panic!("expected a sealed refusal, got {other:?}"),
        }

        // An unsealed message, as a relay would inject it.
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let injected = AgentMessage::Records {
            records: vec![result(2, "disk", 2, "DISK CRITICAL - injected")],
        };
        agent.raw(&serde_json::to_string(&injected).unwrap()).await;
        assert!(matches!(
            agent.next().await,
            ServerMessage::Refused {
                reason: Refusal::Integrity,
                ..
            }
        ));

        // A frame with the right shape and counter but a made-up MAC.
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let forged = json!({"n": 0, "mac": "00".repeat(32), "body": serde_json::to_string(&injected).unwrap()});
        agent.raw(&forged.to_string()).await;
        assert!(matches!(
            agent.next().await,
            ServerMessage::Refused {
                reason: Refusal::Integrity,
                ..
            }
        ));

        let refused = events(&app, "relay-1-host", "agent.frame_refused").await;
        assert_eq!(refused.len(), 3, "{refused:?}");
        assert!(refused
            .iter()
            .all(|e| e["severity"] == "critical" && e["data"]["side"] == "server"));
        assert!(metrics(&app)
            .await
            .contains("aramaki_agent_frames_refused_total 3"));
        // Nothing the forged frames carried was committed.
        let history = app
            .get("/api/v1/systems/relay-1-host/observations/disk/history?limit=10")
            .await;
        assert_eq!(history["items"].as_array().unwrap().len(), 1, "{history}");
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        assert_eq!(agent.acked, 1, "the forged record 2 was never committed");

        // What an agent reports about itself lands on its timeline.
        agent
            .send(vec![
                Record {
                    seq: 2,
                    body: RecordBody::Notice {
                        notice: Notice::FrameRefused,
                        message:
                            "refused a frame in session abc: frame 1 fails its integrity check"
                                .into(),
                    },
                },
                Record {
                    seq: 3,
                    body: RecordBody::Notice {
                        notice: Notice::QueueRenumbered,
                        message: "renumbered 4 records".into(),
                    },
                },
            ])
            .await;
        let refused = events(&app, "relay-1-host", "agent.frame_refused").await;
        assert_eq!(refused.len(), 4);
        assert_eq!(refused[0]["data"]["side"], "agent");
        let renumbered = events(&app, "relay-1-host", "agent.queue_renumbered").await;
        assert_eq!(renumbered.len(), 1);
        assert_eq!(renumbered[0]["severity"], "warning");
    }
);

both!(
    an_enrollment_must_start_with_the_servers_proof,
    |app| async move {
        app.system("old-host", "host", json!({})).await;
        let t = token(&app, "old-host", json!({})).await;
        let url = format!(
            "{}{}",
            app.base.replace("http://", "ws://"),
            aramaki_protocol::agent::CONNECT_PATH
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let direct = AgentMessage::Enroll {
            protocol: aramaki_protocol::agent::AGENT_PROTOCOL_VERSION,
            token_id: t.split('_').nth(1).unwrap().to_owned(),
            mac: "00".repeat(32),
            public_key: "ab".repeat(32),
            name: "old".into(),
            version: "test".into(),
        };
        ws.send(Message::Text(
            serde_json::to_string(&direct).unwrap().into(),
        ))
        .await
        .unwrap();
        let answer = loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                break serde_json::from_str::<ServerMessage>(t.as_str()).unwrap();
            }
        };
        match answer {
            ServerMessage::Refused { reason, message } => {
                assert_eq!(reason, Refusal::Malformed);
                assert!(message.contains("enroll_hello"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The token was not spent by the refused attempt.
        crate::monitoring::enroll(&app, &t, &crate::monitoring::key(81), "old")
            .await
            .unwrap();
    }
);

/// What a relay does to one connection.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Tamper {
    Nothing,
    /// After the welcome, a `checks` frame carrying a shell script, as the
    /// protocol had it before frames were sealed.
    InjectChecks,
    /// The same, shaped like a sealed frame (the next counter) with a
    /// made-up MAC.
    ForgeChecks,
    /// After the welcome, the welcome again.
    ReplayWelcome,
    /// The welcome itself, its checks swapped for the shell script (counter
    /// and MAC kept).
    ForgeWelcome,
    /// The challenge replaced by a refusal ("revoked") of the relay's own,
    /// which would stop the agent for good if it were believed.
    FakeRevoked,
    /// The challenge's signature replaced by one that does not verify.
    ForgeChallenge,
    /// The hello's key swapped for another, so that the server signs a
    /// `key_changed` refusal over the agent's nonce, which the relay passes on.
    ForeignRefusal,
    /// The hello's subscriptions rewritten on the way to the server.
    RewriteSubscriptions,
}

/// A transparent WebSocket relay in front of the server's agent endpoint,
/// as anyone on a plain `ws://` path could run; connection `i` is tampered
/// with as `plan[i]` says.
async fn relay(backend: String, plan: Vec<Tamper>, script: String) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tampered = Arc::new(AtomicUsize::new(0));
    let done = tampered.clone();
    tokio::spawn(async move {
        for i in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let tamper = plan.get(i).copied().unwrap_or(Tamper::Nothing);
            let (backend, script, done) = (backend.clone(), script.clone(), done.clone());
            tokio::spawn(async move {
                let Ok(agent) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let url = format!("{backend}{}", aramaki_protocol::agent::CONNECT_PATH);
                let Ok((server, _)) = tokio_tungstenite::connect_async(url).await else {
                    return;
                };
                let (mut to_agent, mut from_agent) = agent.split();
                let (mut to_server, mut from_server) = server.split();
                let mut down = 0usize;
                let mut up = 0usize;
                loop {
                    tokio::select! {
                        m = from_agent.next() => match m {
                            Some(Ok(Message::Text(t))) => {
                                up += 1;
                                let mut text = t.as_str().to_owned();
                                // Frame 0 up is the hello.
                                if up == 1 && matches!(tamper, Tamper::ForeignRefusal | Tamper::RewriteSubscriptions) {
                                    let mut hello: Value = serde_json::from_str(&text).unwrap();
                                    if tamper == Tamper::ForeignRefusal {
                                        hello["public_key"] = Value::String("ab".repeat(32));
                                    } else {
                                        hello["subscriptions"] = json!(["rewritten"]);
                                    }
                                    text = hello.to_string();
                                    done.fetch_add(1, Ordering::SeqCst);
                                }
                                if to_server.send(Message::Text(text.into())).await.is_err() { return; }
                            }
                            Some(Ok(m)) => { if to_server.send(m).await.is_err() { return; } }
                            _ => return,
                        },
                        m = from_server.next() => match m {
                            Some(Ok(Message::Text(t))) => {
                                let mut text = t.as_str().to_owned();
                                down += 1;
                                let pwned = json!([{
                                    "name": "pwned",
                                    "run": {"kind": "shell", "script": script},
                                    "schedule": {"kind": "interval", "secs": 1, "splay": false},
                                    "timeout_secs": 5
                                }]);
                                // Frame 0 is the challenge, frame 1 the (sealed) welcome.
                                if down == 1 && tamper == Tamper::FakeRevoked {
                                    text = json!({"type": "refused", "reason": "revoked", "message": "this agent was revoked by an admin"}).to_string();
                                    done.fetch_add(1, Ordering::SeqCst);
                                }
                                if down == 1 && tamper == Tamper::ForgeChallenge {
                                    let mut challenge: Value = serde_json::from_str(&text).unwrap();
                                    challenge["signature"] = Value::String("00".repeat(64));
                                    text = challenge.to_string();
                                    done.fetch_add(1, Ordering::SeqCst);
                                }
                                if down == 2 && tamper == Tamper::ForgeWelcome {
                                    let mut sealed: Value = serde_json::from_str(&text).unwrap();
                                    let mut body: Value = serde_json::from_str(sealed["body"].as_str().unwrap()).unwrap();
                                    body["checks"] = pwned.clone();
                                    sealed["body"] = Value::String(body.to_string());
                                    text = sealed.to_string();
                                    done.fetch_add(1, Ordering::SeqCst);
                                }
                                if to_agent.send(Message::Text(text.clone().into())).await.is_err() { return; }
                                if down == 2 && !matches!(tamper, Tamper::Nothing | Tamper::ForgeWelcome | Tamper::FakeRevoked) {
                                    let checks = json!({"type": "checks", "checks": pwned});
                                    let frame = match tamper {
                                        Tamper::InjectChecks => checks.to_string(),
                                        Tamper::ForgeChecks => json!({"n": 1, "mac": "00".repeat(32), "body": checks.to_string()}).to_string(),
                                        _ => text,
                                    };
                                    let _ = to_agent.send(Message::Text(frame.into())).await;
                                    done.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Some(Ok(m)) => { if to_agent.send(m).await.is_err() { return; } }
                            _ => return,
                        },
                    }
                }
            });
        }
    });
    (port, tampered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_inject_or_replay_frames() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("relayed-host", "host", json!({})).await;
    let host = AgentHost::new();
    // Shell checks allowed here, so that only the frames' integrity stands
    // between the injected script and a root shell.
    host.configure("\n[check_policy]\nallow_shell = true\n");
    let injected = host.state().with_file_name("pwned");
    let control = host.state().with_file_name("control");
    for (name, script) in [("control", format!("touch {}", control.display()))] {
        let (status, v) = app
            .post(
                "/api/v1/checks",
                json!({"name": name, "shell": script, "subscriptions": ["linux"], "interval": 1}),
            )
            .await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{v}");
    }
    let (status, v) = app
        .post(
            "/api/v1/checks",
            json!({"name": "ticker", "command": [DUMMY, "0", "tick"], "subscriptions": ["linux"], "interval": 1}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{v}");
    let plan = vec![
        Tamper::Nothing, // the enrollment
        Tamper::FakeRevoked,
        Tamper::InjectChecks,
        Tamper::ForgeChecks,
        Tamper::ReplayWelcome,
        Tamper::ForgeWelcome,
    ];
    let (port, tampered) = relay(
        app.base.replace("http://", "ws://"),
        plan,
        format!("touch {}", injected.display()),
    )
    .await;
    let relayed = format!("http://127.0.0.1:{port}");
    let t = token(&app, "relayed-host", json!({})).await;
    let (code, err) = enroll(&relayed, &t, &host.state(), "relayed");
    assert_eq!(code, 0, "{err}");
    let mut agent = host.run();

    // The four tamperings are refused by the agent and reported once a clean
    // session carries the agent's notices to the server.
    let refused = eventually("the agent's four reports of refused frames", || async {
        let e = events(&app, "relayed-host", "agent.frame_refused").await;
        (e.len() >= 4).then_some(e)
    })
    .await;
    assert_eq!(tampered.load(Ordering::SeqCst), 5);
    assert_eq!(refused.len(), 4, "each reported once: {refused:?}");
    let details: Vec<String> = refused
        .iter()
        .map(|e| {
            assert_eq!(e["data"]["side"], "agent", "{e}");
            e["data"]["detail"].as_str().unwrap().to_owned()
        })
        .collect();
    assert!(
        details.iter().any(|d| d.contains("without a valid seal")),
        "the unsealed frame is refused: {details:?}"
    );
    assert_eq!(
        details
            .iter()
            .filter(|d| d.contains("integrity check"))
            .count(),
        2,
        "the forged frame and the forged welcome fail their MAC: {details:?}"
    );
    assert!(
        details.iter().any(|d| d.contains("replayed")),
        "the replayed welcome fails its counter: {details:?}"
    );
    // Sessions go on after the attack; checks the server really sent run
    // (the shell is allowed: the control check's file appears) ...
    eventually("the server's own shell check running", || async {
        control.exists().then_some(())
    })
    .await;
    let ticks = |v: Value| v["items"].as_array().map_or(0, Vec::len);
    let before = ticks(
        app.get("/api/v1/systems/relayed-host/observations/ticker/history?limit=1000")
            .await,
    );
    eventually("three more results after the reports", || async {
        let now = ticks(
            app.get("/api/v1/systems/relayed-host/observations/ticker/history?limit=1000")
                .await,
        );
        (now >= before + 3).then_some(())
    })
    .await;
    // ... and the injected one never did.
    assert!(
        !injected.exists(),
        "the injected shell check ran; agent log:\n{}",
        host.log_text()
    );
    let log = host.log_text();
    assert!(log.contains("refused a frame from the server"), "{log}");
    assert!(
        !log.contains("pwned"),
        "the injected check was never scheduled: {log}"
    );
    // The relay's refusal was not believed: the agent is still running.
    assert!(
        log.contains("an unauthenticated refusal (agent revoked"),
        "{log}"
    );
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent stopped: {log}"
    );
}

/// A relay on a plain path meddles with the handshake: a forged challenge,
/// a refusal the server really signed for the relay's rewritten hello, and
/// rewritten subscriptions. None stops the agent, none gets a session, and
/// the agent connects as soon as the relay stops meddling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_stop_the_agent_or_rewrite_its_hello() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("meddled-host", "host", json!({})).await;
    let host = AgentHost::new();
    host.configure("\n[check_policy]\nallow_shell = true\n");
    let rewritten = host.state().with_file_name("rewritten");
    let (status, v) = app
        .post(
            "/api/v1/checks",
            json!({"name": "relays-pick", "shell": format!("touch {}", rewritten.display()), "subscriptions": ["rewritten"], "interval": 1}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{v}");
    let (status, v) = app
        .post(
            "/api/v1/checks",
            json!({"name": "ticker", "command": [DUMMY, "0", "tick"], "subscriptions": ["linux"], "interval": 1}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{v}");
    let plan = vec![
        Tamper::Nothing, // the enrollment
        Tamper::RewriteSubscriptions,
        Tamper::ForgeChallenge,
        Tamper::ForeignRefusal,
    ];
    let (port, tampered) = relay(app.base.replace("http://", "ws://"), plan, String::new()).await;
    let relayed = format!("http://127.0.0.1:{port}");
    let t = token(&app, "meddled-host", json!({})).await;
    let (code, err) = enroll(&relayed, &t, &host.state(), "meddled");
    assert_eq!(code, 0, "{err}");
    let mut agent = host.run();

    let ticks = |v: Value| v["items"].as_array().map_or(0, Vec::len);
    eventually("results once the relay stops meddling", || async {
        let now = ticks(
            app.get("/api/v1/systems/meddled-host/observations/ticker/history?limit=1000")
                .await,
        );
        (now >= 2).then_some(())
    })
    .await;
    assert_eq!(tampered.load(Ordering::SeqCst), 3);
    let log = host.log_text();
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent stopped: {log}"
    );
    // The rewritten hello and the forged challenge both fail the challenge's
    // signature; the server's refusal of the relay's hello is not ours.
    assert_eq!(
        log.matches("the server's challenge does not verify against the pinned key")
            .count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("a refusal not signed for this hello (key changed"),
        "{log}"
    );
    assert!(
        !rewritten.exists(),
        "a session ran with the relay's subscriptions: {log}"
    );
    // Both refused challenges reach the server as the agent's reports.
    let refused = eventually("the agent's reports of refused challenges", || async {
        let e = events(&app, "meddled-host", "agent.frame_refused").await;
        (e.len() >= 2).then_some(e)
    })
    .await;
    assert!(
        refused.iter().all(|e| e["data"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("refused the server's challenge"))),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_policy_decides_what_checks_execute() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("policy-host", "host", json!({})).await;
    let host = AgentHost::new();
    let dir = host.state().with_file_name("markers");
    std::fs::create_dir_all(&dir).unwrap();
    let marker = |n: &str| dir.join(n);
    let escape = "/usr/lib/nagios/plugins/../../../bin/sh";
    let checks = [
        json!({"name": "plugin", "command": [DUMMY, "0", "plugin ran"]}),
        json!({"name": "shell", "shell": format!("touch {}", marker("shell").display())}),
        json!({"name": "elsewhere", "command": ["/usr/bin/touch", marker("elsewhere")]}),
        json!({"name": "escape", "command": [escape, "-c", format!("touch {}", marker("escape").display())]}),
        json!({"name": "preload", "command": [DUMMY, "0", "x"], "env": {"LD_PRELOAD": "/tmp/evil.so"}}),
        json!({"name": "probe", "probe": {"probe": "keepalive"}}),
    ];
    for mut c in checks {
        c["subscriptions"] = json!(["linux"]);
        c["interval"] = json!(1);
        let (status, v) = app.post("/api/v1/checks", c.clone()).await;
        assert_eq!(status, reqwest::StatusCode::CREATED, "{c}: {v}");
    }
    let t = token(&app, "policy-host", json!({})).await;
    let (code, err) = enroll(&app.base, &t, &host.state(), "policy");
    assert_eq!(code, 0, "{err}");
    let _agent = host.run();
    let names = ["plugin", "shell", "elsewhere", "escape", "preload", "probe"];
    let obs = eventually("a result of every check", || async {
        let obs = app.get("/api/v1/systems/policy-host/observations").await;
        let items = obs["items"].as_array().cloned().unwrap_or_default();
        names
            .iter()
            .all(|n| items.iter().any(|o| o["check"] == *n))
            .then_some(items)
    })
    .await;
    let of = |name: &str| {
        obs.iter()
            .find(|o| o["check"] == name)
            .unwrap_or_else(|| panic!("{name}"))
            .clone()
    };
    assert_eq!(of("plugin")["state"], "ok", "{}", host.log_text());
    assert_eq!(of("probe")["state"], "ok");
    for (name, why) in [
        ("shell", "allow_shell"),
        (
            "elsewhere",
            "'/usr/bin/touch' is neither in check_policy.allow_commands",
        ),
        ("escape", "(that is /usr/bin/"),
        ("preload", "LD_PRELOAD"),
    ] {
        let o = of(name);
        assert_eq!(o["state"], "unknown", "{o}");
        let output = o["output"].as_str().unwrap();
        assert!(
            output.contains("refused by this agent's check policy"),
            "{o}"
        );
        assert!(output.contains(why), "{name}: {output}");
    }
    for m in ["shell", "elsewhere", "escape"] {
        assert!(!marker(m).exists(), "the refused check '{m}' ran");
    }
    // The refusal and its reason show on the system page.
    let admin =
        crate::monitoring_pages::logged_in(&app, "ada", Some(aramaki::users::Role::Admin)).await;
    let (status, html) = crate::monitoring_pages::get(&app, "/systems/policy-host", &admin).await;
    assert_eq!(status, reqwest::StatusCode::OK);
    assert!(
        html.contains("UNKNOWN - refused by this agent&#x27;s check policy")
            || html.contains("UNKNOWN - refused by this agent's check policy"),
        "{html}"
    );
}

type Proof = dyn Fn(&str, &str) -> ServerMessage + Send + Sync;

/// A server that is not the one the token names, at the enrollment URL: it
/// answers the first message with `proof` (made from the agent's nonce and
/// key) and keeps everything the agent sends.
async fn fake_server(
    proof: impl Fn(&str, &str) -> ServerMessage + Send + Sync + 'static,
) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = heard.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                continue;
            };
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                kept.lock().unwrap().push(t.as_str().to_owned());
                if let Ok(AgentMessage::EnrollHello {
                    nonce, public_key, ..
                }) = serde_json::from_str(t.as_str())
                {
                    let answer = serde_json::to_string(&proof(&nonce, &public_key)).unwrap();
                    let _ = ws.send(Message::Text(answer.into())).await;
                }
            }
        }
    });
    (url, heard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_server_never_receives_the_enrollment_token() {
    use aramaki_protocol::agent::enroll_transcript;
    use aramaki_protocol::keys::hex;
    use ed25519_dalek::Signer;

    let app = TestApp::start(Backend::Sqlite).await;
    app.system("target-host", "host", json!({})).await;
    let real_key = app.ctx.identity.public_key_hex();
    let fake = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let fake_key = hex(fake.verifying_key().as_bytes());
    let own = {
        let (fake, fake_key) = (fake.clone(), fake_key.clone());
        move |nonce: &str, agent: &str| ServerMessage::EnrollProof {
            nonce: "11".repeat(32),
            signature: hex(&fake
                .sign(&enroll_transcript(
                    nonce,
                    &"11".repeat(32),
                    agent,
                    &fake_key,
                ))
                .to_bytes()),
            server_key: fake_key.clone(),
        }
    };
    // The real server's key is public; the fake cannot sign for it.
    let borrowed = move |nonce: &str, agent: &str| ServerMessage::EnrollProof {
        nonce: "11".repeat(32),
        signature: hex(&fake
            .sign(&enroll_transcript(
                nonce,
                &"11".repeat(32),
                agent,
                &real_key,
            ))
            .to_bytes()),
        server_key: real_key.clone(),
    };
    let cases: [(Box<Proof>, &str); 2] = [
        (Box::new(own), "token says"),
        (Box::new(borrowed), "its proof does not verify"),
    ];
    for (i, (proof, why)) in cases.into_iter().enumerate() {
        let (url, heard) = fake_server(proof).await;
        let t = token(&app, "target-host", json!({})).await;
        let secret = t.split('_').nth(2).unwrap().to_owned();
        let state = tempfile::tempdir().unwrap();
        let (code, err) =
            tokio::task::block_in_place(|| enroll(&url, &t, &state.path().join("s"), "victim"));
        assert_eq!(code, 78, "{err}");
        assert!(err.contains("server key does not match"), "{err}");
        assert!(err.contains(why), "{err}");
        let heard = heard.lock().unwrap().clone();
        assert!(!heard.is_empty(), "the agent did talk to the fake");
        assert!(
            heard.iter().all(|m| !m.contains(&secret)),
            "the token reached a server that had not proven its key: {heard:?}"
        );
        assert!(!state.path().join("s/agent.key").exists());
        // The token still works at the real server.
        let host = AgentHost::new();
        let (code, err) = enroll(&app.base, &t, &host.state(), &format!("real-{i}"));
        assert_eq!(code, 0, "{err}");
    }
}

/// A relay between an agent and the real server keeps every enrollment
/// message it passed on: the secret is not among them, and neither the
/// captured MAC with the relay's own key nor a replay of the whole exchange
/// enrolls anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_enroll_with_what_it_saw() {
    use aramaki_protocol::agent::AGENT_PROTOCOL_VERSION;
    use aramaki_protocol::keys::hex;

    let app = TestApp::start(Backend::Sqlite).await;
    app.system("watched-host", "host", json!({})).await;
    // Reusable, so that a refusal below is not just "used already".
    let t = token(&app, "watched-host", json!({"reusable": true})).await;
    let secret = t.split('_').nth(2).unwrap().to_owned();
    let url = format!(
        "{}{}",
        app.base.replace("http://", "ws://"),
        aramaki_protocol::agent::CONNECT_PATH
    );
    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
    async fn talk(ws: &mut Ws, m: &AgentMessage) -> Result<(), impl std::fmt::Debug> {
        let text = serde_json::to_string(m).unwrap();
        ws.send(Message::Text(text.into())).await
    }
    async fn answer(ws: &mut Ws) -> ServerMessage {
        loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                break serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }
    // The victim's enrollment, as the relay sees it (the real agent does
    // the same: crate::monitoring::enroll speaks its protocol).
    let victim = crate::monitoring::key(91);
    let victim_key = hex(victim.verifying_key().as_bytes());
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let nonce = hex(&[9u8; 32]);
    let hello = AgentMessage::EnrollHello {
        protocol: AGENT_PROTOCOL_VERSION,
        nonce: nonce.clone(),
        public_key: victim_key.clone(),
    };
    talk(&mut ws, &hello).await.unwrap();
    let ServerMessage::EnrollProof {
        nonce: server_nonce,
        server_key,
        ..
    } = answer(&mut ws).await
    else {
        panic!("expected a proof")
    };
    let enroll = AgentMessage::Enroll {
        protocol: AGENT_PROTOCOL_VERSION,
        token_id: t.split('_').nth(1).unwrap().to_owned(),
        mac: aramaki_protocol::agent::enroll_mac(
            &aramaki_protocol::agent::token_secret_hash(&secret),
            &aramaki_protocol::agent::Enrollment {
                agent_nonce: &nonce,
                server_nonce: &server_nonce,
                agent_key: &victim_key,
                server_key: &server_key,
                token_id: t.split('_').nth(1).unwrap(),
                name: "victim",
            },
        ),
        public_key: victim_key.clone(),
        name: "victim".into(),
        version: "test".into(),
    };
    let captured = serde_json::to_string(&enroll).unwrap();
    assert!(!captured.contains(&secret), "{captured}");
    talk(&mut ws, &enroll).await.unwrap();
    assert!(matches!(
        answer(&mut ws).await,
        ServerMessage::Enrolled { .. }
    ));

    // The relay enrolls its own key with the captured MAC ...
    let relay_key = hex(crate::monitoring::key(92).verifying_key().as_bytes());
    let AgentMessage::Enroll { token_id, mac, .. } = enroll.clone() else {
        unreachable!()
    };
    for (key, name) in [(relay_key.clone(), "relay"), (victim_key.clone(), "victim")] {
        // ... or replays the victim's whole enrollment (same nonce, same key).
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        talk(
            &mut ws,
            &AgentMessage::EnrollHello {
                protocol: AGENT_PROTOCOL_VERSION,
                nonce: nonce.clone(),
                public_key: key.clone(),
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            answer(&mut ws).await,
            ServerMessage::EnrollProof { .. }
        ));
        let forged = AgentMessage::Enroll {
            protocol: AGENT_PROTOCOL_VERSION,
            token_id: token_id.clone(),
            mac: mac.clone(),
            public_key: key,
            name: name.into(),
            version: "test".into(),
        };
        talk(&mut ws, &forged).await.unwrap();
        match answer(&mut ws).await {
            ServerMessage::Refused { reason, .. } => assert_eq!(reason, Refusal::TokenInvalid),
            other => panic!("the captured MAC enrolled {name}: {other:?}"),
        }
    }
    let agents = app.get("/api/v1/agents").await;
    let names: Vec<&str> = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["victim"], "{agents}");
}

/// A TCP proxy in front of the server that can be switched off: "the server
/// is away" for an agent that reaches it through here.
async fn switchable_proxy(backend: String) -> (u16, tokio::sync::watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (up, watch) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut watch = watch.clone();
            if !*watch.borrow() {
                continue; // dropped: connection refused, in effect
            }
            let backend = backend.clone();
            tokio::spawn(async move {
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut tcp, &mut upstream) => {}
                    _ = watch.wait_for(|up| !*up) => {}
                }
            });
        }
    });
    (port, up)
}

/// The agent's queue acknowledgement, as its state file says.
fn queue_acked(host: &AgentHost) -> u64 {
    std::fs::read_to_string(host.state().join("queue/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["acked"].as_u64())
        .unwrap_or(0)
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_restored_from_a_backup_loses_nothing() {
    use crate::agent_e2e::{expected_outputs, pushed_outputs};
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("restored-host", "host", json!({})).await;
    let backend = app.base.trim_start_matches("http://").to_owned();
    let (port, up) = switchable_proxy(backend).await;
    let via = format!("http://127.0.0.1:{port}");
    let host = AgentHost::new();
    let t = token(&app, "restored-host", json!({})).await;
    let (code, err) = enroll(&via, &t, &host.state(), "restored");
    assert_eq!(code, 0, "{err}");
    let committed = |n: usize| {
        let (http, base, token) = (app.http.clone(), app.base.clone(), app.token.clone());
        async move {
            let out = pushed_outputs(&http, &base, &token, "restored-host").await;
            (out.len() >= n).then_some(out)
        }
    };

    // Five results, committed and acknowledged; then a backup of the state.
    let mut agent = host.run();
    host.push_numbered(1..=5).await;
    eventually("5 results committed", || committed(5)).await;
    eventually("the agent's queue acknowledging 5", || async {
        (queue_acked(&host) >= 5).then_some(())
    })
    .await;
    agent.kill_hard();
    let backup = host.state().with_file_name("backup");
    copy_tree(&host.state(), &backup);

    // Five more, committed: the server's mark moves past the backup.
    let mut agent = host.run();
    host.push_numbered(6..=10).await;
    eventually("10 results committed", || committed(10)).await;
    eventually("the agent's queue acknowledging 10", || async {
        (queue_acked(&host) >= 10).then_some(())
    })
    .await;
    agent.kill_hard();

    // While the server is away, the state comes back from the backup and
    // ten new results are accepted under numbers the server has used.
    up.send(false).unwrap();
    std::fs::remove_dir_all(host.state()).unwrap();
    copy_tree(&backup, &host.state());
    let _agent = host.run();
    host.push_numbered(11..=20).await;
    up.send(true).unwrap();

    let outputs = eventually("all 20 results", || committed(20)).await;
    assert_eq!(
        outputs,
        expected_outputs(20),
        "each result exactly once; agent log:\n{}",
        host.log_text()
    );
    let renumbered = eventually("the renumbering on the timeline", || async {
        let e = events(&app, "restored-host", "agent.queue_renumbered").await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(renumbered.len(), 1, "{renumbered:?}");
    let detail = renumbered[0]["data"]["detail"].as_str().unwrap();
    assert!(detail.contains("10 unacknowledged records"), "{detail}");
    assert!(
        host.log_text().contains("restored from an older copy"),
        "{}",
        host.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_in_a_pushed_event_is_a_dead_mans_switch() {
    use aramaki::monitoring::watch::sweep;
    let app = TestApp::start(Backend::Sqlite).await;
    let started = app.ctx.now();
    app.system("cron-host", "host", json!({})).await;
    let host = AgentHost::new();
    let t = token(&app, "cron-host", json!({})).await;
    let (code, err) = enroll(&app.base, &t, &host.state(), "cron");
    assert_eq!(code, 0, "{err}");
    let _agent = host.run();
    // Sensu 1.x on the TCP socket, Sensu Go on HTTP, both with a ttl.
    assert_eq!(
        host.push_tcp(json!({"name": "nightly", "status": 0, "output": "NIGHTLY OK", "ttl": 300}))
            .await,
        "ok"
    );
    let r = eventually("the HTTP push API", || async {
        app.http
            .post(format!("http://127.0.0.1:{}/events", host.push_http))
            .json(&json!({"check": {"metadata": {"name": "hourly"}, "status": 0, "output": "HOURLY OK", "ttl": 300}}))
            .send()
            .await
            .ok()
    })
    .await;
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    // A bad ttl is refused with the reason.
    assert!(host
        .push_tcp(json!({"name": "nightly", "status": 0, "output": "x", "ttl": -1}))
        .await
        .contains("ttl must be"));
    let state_of = |check: &'static str| {
        let app = &app;
        async move {
            let obs = app.get("/api/v1/systems/cron-host/observations").await;
            obs["items"]
                .as_array()?
                .iter()
                .find(|o| o["check"] == check)
                .map(|o| {
                    (
                        o["state"].as_str().unwrap_or("").to_owned(),
                        o["output"].as_str().unwrap_or("").to_owned(),
                    )
                })
        }
    };
    eventually("both pushed results", || async {
        match (state_of("nightly").await, state_of("hourly").await) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        }
    })
    .await;
    app.clock.advance(jiff::SignedDuration::from_secs(299));
    assert_eq!(
        sweep(&app.ctx, started).await.unwrap().ttls,
        0,
        "within the ttl"
    );
    app.clock.advance(jiff::SignedDuration::from_secs(2));
    assert_eq!(sweep(&app.ctx, started).await.unwrap().ttls, 2);
    assert_eq!(
        sweep(&app.ctx, started).await.unwrap().ttls,
        0,
        "fires once"
    );
    for check in ["nightly", "hourly"] {
        let (state, output) = state_of(check).await.unwrap();
        assert_eq!(state, "critical", "{check}: {output}");
        assert!(output.contains("TTL CRITICAL"), "{check}: {output}");
    }
}
