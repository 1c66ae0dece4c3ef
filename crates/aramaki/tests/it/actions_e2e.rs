//! Actions through a real agent: flushing a real Varnish, and every way a
//! run can be refused.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use aramaki_protocol::agent::{action_transcript, ActionRequest, ServerMessage, SignedAction};
use aramaki_protocol::keys::hex;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent_e2e::{enroll, eventually, free_port, AgentHost, Proc};
use crate::monitoring::{cli, token};
use crate::support::{Backend, TestApp};

/// A backend that counts the requests reaching it; its answers may be cached.
async fn backend() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let body = format!("object fetched {n} times");
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: max-age=3600\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    (port, hits)
}

struct Varnish {
    _proc: Proc,
    port: u16,
    admin: u16,
    secret: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn varnish(backend: u16) -> Varnish {
    assert!(
        Path::new("/usr/sbin/varnishd").exists(),
        "varnishd is missing: apt-get install varnish (or run .ci/run)"
    );
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a-test-secret-for-varnishadm\n").unwrap();
    let (port, admin) = (free_port(), free_port());
    let child = Command::new("/usr/sbin/varnishd")
        .args(["-j", "none", "-F", "-s", "malloc,16m"])
        .arg("-n")
        .arg(dir.path().join("instance"))
        .args([
            "-a",
            &format!("127.0.0.1:{port}"),
            "-T",
            &format!("127.0.0.1:{admin}"),
        ])
        .arg("-S")
        .arg(&secret)
        .args(["-b", &format!("127.0.0.1:{backend}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Varnish {
        _proc: Proc(child),
        port,
        admin,
        secret,
        _dir: dir,
    }
}

async fn get(url: &str) -> Option<String> {
    let r = reqwest::get(url).await.ok()?;
    (r.status() == StatusCode::OK).then_some(())?;
    r.text().await.ok()
}

/// A command line split at blanks.
fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// Waits for a run to finish; returns it.
async fn finished(app: &TestApp, run: &Value) -> Value {
    let id = run["id"].as_str().unwrap().to_owned();
    eventually("the run to finish", || {
        let id = id.clone();
        async move {
            let v = app.get(&format!("/api/v1/actions/runs/{id}")).await;
            (v["state"] != "running").then_some(v)
        }
    })
    .await
}

async fn run(
    app: &TestApp,
    token: &str,
    system: &str,
    action: &str,
    body: Value,
) -> (StatusCode, Value) {
    app.call_as(
        token,
        Method::POST,
        &format!("/api/v1/systems/{system}/actions/{action}/runs"),
        Some(body),
    )
    .await
}

async fn kinds(app: &TestApp, system: &str, kind: &str) -> Vec<Value> {
    app.get(&format!(
        "/api/v1/systems/{system}/timeline?kind={kind}&limit=100"
    ))
    .await["items"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushing_a_real_varnish_fetches_the_object_again() {
    let (backend_port, hits) = backend().await;
    let v = varnish(backend_port);
    let url = format!("http://127.0.0.1:{}/product/42", v.port);
    let first = eventually("varnish to serve", || get(&url)).await;
    assert_eq!(first, "object fetched 1 times");
    assert_eq!(
        get(&url).await.unwrap(),
        "object fetched 1 times",
        "served from the cache"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    let app = TestApp::start(Backend::Sqlite).await;
    // The agent judges request expiry by its own (real) clock.
    app.clock.set(jiff::Timestamp::now());
    app.system("shop-cache", "service", json!({})).await;
    let host = AgentHost::new();
    host.configure(&format!(
        r#"
[actions.flush-cache]
argv = ["/usr/bin/varnishadm", "-T", "127.0.0.1:{}", "-S", "{}", "--", "ban", "req.url", "~", "{{path}}"]
params = ["path"]
allow.path = {{ pattern = "/[A-Za-z0-9/._-]*" }}
[actions.ban-list]
argv = ["/usr/bin/varnishadm", "-T", "127.0.0.1:{}", "-S", "{}", "ban.list"]
"#,
        v.admin,
        v.secret.display(),
        v.admin,
        v.secret.display()
    ));
    let t = token(&app, "shop-cache", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "cache-1").0, 0);
    let _agent = host.run();
    eventually("the agent to connect", || async {
        let a = app.get("/api/v1/agents/cache-1").await;
        (a["connected"] == true).then_some(())
    })
    .await;
    for spec in [
        json!({"name": "flush-cache", "title": "Flush the Varnish cache",
               "description": "Bans everything under **path**. Use when stale prices show.",
               "params": [{"name": "path", "type": "string", "pattern": "/[A-Za-z0-9/._-]*", "default": "/"}]}),
        json!({"name": "ban-list", "title": "List Varnish bans", "read_only": true, "confirm_within_minutes": null}),
    ] {
        let (status, body) = app.post("/api/v1/systems/shop-cache/actions", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    let (status, started) = run(&app, &app.token, "shop-cache", "flush-cache", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let done = finished(&app, &started).await;
    assert_eq!(done["state"], "succeeded", "{done}\n{}", host.log_text());
    assert_eq!(done["targets"][0]["exit_code"], 0);
    assert_eq!(
        get(&url).await.unwrap(),
        "object fetched 2 times",
        "Varnish fetched it from the backend again"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    let (_, listed) = run(&app, &app.token, "shop-cache", "ban-list", json!({})).await;
    let listed = finished(&app, &listed).await;
    assert!(
        listed["targets"][0]["output"]
            .as_str()
            .unwrap()
            .contains("req.url ~ /"),
        "{listed}"
    );

    let started_events = kinds(&app, "shop-cache", "action.started").await;
    assert_eq!(started_events.len(), 2);
    let done_events = kinds(&app, "shop-cache", "action.finished").await;
    assert_eq!(done_events.len(), 2);
    let ban_list = done_events
        .iter()
        .find(|e| e["data"]["action"] == "ban-list")
        .unwrap();
    assert!(
        ban_list["body"].as_str().unwrap().contains("req.url ~ /"),
        "the output is on the timeline: {ban_list}"
    );

    // Within 30 minutes of the flush, running it again asks for confirmation.
    let (status, ask) = run(&app, &app.token, "shop-cache", "flush-cache", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(ask["code"], "confirm");
    assert!(
        ask["detail"].as_str().unwrap().contains("Administrator"),
        "{ask}"
    );
    let (status, again) = run(
        &app,
        &app.token,
        "shop-cache",
        "flush-cache",
        json!({"confirm": true, "params": {"path": "/product"}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(finished(&app, &again).await["state"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_are_refused_for_clear_reasons_and_on_the_record() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.clock.set(jiff::Timestamp::now());
    app.system("ops-box", "host", json!({})).await;
    let host = AgentHost::new();
    host.configure(
        r#"
[actions.echo]
argv = ["/bin/echo", "{text}"]
params = ["text"]
[actions.slow]
argv = ["/bin/sh", "-c", "sleep 30 & sleep 30"]
"#,
    );
    let t = token(&app, "ops-box", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "ops-1").0, 0);
    let _agent = host.run();
    let agent_id = eventually("the agent to connect", || async {
        let a = app.get("/api/v1/agents/ops-1").await;
        (a["connected"] == true).then(|| a["id"].as_str().unwrap().to_owned())
    })
    .await;
    for spec in [
        json!({"name": "echo", "title": "Echo", "confirm_within_minutes": null, "params": [{"name": "text", "type": "string", "max_len": 100}]}),
        json!({"name": "slow", "title": "Slow", "confirm_within_minutes": null, "timeout": 60}),
        json!({"name": "reboot", "title": "Not on the agent's list", "confirm_within_minutes": null}),
        json!({"name": "windowed", "title": "Only at night", "confirm_within_minutes": null,
               "windows": [{"days": ["sun"], "from": "03:00", "to": "04:00"}], "timezone": "Europe/Berlin"}),
        json!({"name": "safe-echo", "title": "Echo a word", "confirm_within_minutes": null,
               "params": [{"name": "text", "type": "string", "pattern": "[a-z]+"}]}),
    ] {
        let (status, body) = app.post("/api/v1/systems/ops-box/actions", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let admin = app.token.clone();

    // Shell metacharacters arrive as one inert argv element.
    let text = "$(id); echo pwned `id` | cat > /tmp/x";
    let (status, r) = run(
        &app,
        &admin,
        "ops-box",
        "echo",
        json!({"params": {"text": text}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{r}");
    let r = finished(&app, &r).await;
    assert_eq!(r["targets"][0]["output"].as_str().unwrap().trim_end(), text);

    // A parameter that fails validation.
    let (status, p) = run(
        &app,
        &admin,
        "ops-box",
        "safe-echo",
        json!({"params": {"text": "a; rm -rf /"}}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(p["code"], "invalid_params");
    assert_eq!(p["field"], "params.text");

    // A viewer may not run it.
    let viewer = app.user("vic", aramaki::users::Role::Viewer).await;
    let (status, p) = run(
        &app,
        &viewer,
        "ops-box",
        "echo",
        json!({"params": {"text": "hi"}}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(p["detail"].as_str().unwrap().contains("operator"), "{p}");

    // Outside the window: refused, unless overridden with a reason, which is flagged.
    let (status, p) = run(&app, &admin, "ops-box", "windowed", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(p["code"], "outside_window");
    assert!(
        p["detail"].as_str().unwrap().contains("Europe/Berlin"),
        "{p}"
    );
    let (status, r) = run(
        &app,
        &admin,
        "ops-box",
        "windowed",
        json!({"override_reason": "checkout down, CEO on the phone"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{r}");
    let started = kinds(&app, "ops-box", "action.started").await;
    let flagged = started
        .iter()
        .find(|e| e["data"]["action"] == "windowed")
        .unwrap();
    assert_eq!(flagged["severity"], "warning");
    assert!(flagged["title"]
        .as_str()
        .unwrap()
        .contains("EMERGENCY OVERRIDE"));
    assert!(flagged["title"]
        .as_str()
        .unwrap()
        .contains("CEO on the phone"));

    // The agent refuses what its allow-list does not define.
    let (_, r) = run(&app, &admin, "ops-box", "reboot", json!({})).await;
    let r = finished(&app, &r).await;
    assert_eq!(r["targets"][0]["state"], "refused");
    assert!(
        r["targets"][0]["message"]
            .as_str()
            .unwrap()
            .contains("allow-list"),
        "{r}"
    );

    // A second run while one runs is refused with the running one's details; cancel kills it.
    let (status, slow) = run(&app, &admin, "ops-box", "slow", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    eventually("the slow run to start", || async {
        let v = app
            .get(&format!(
                "/api/v1/actions/runs/{}",
                slow["id"].as_str().unwrap()
            ))
            .await;
        (v["targets"][0]["state"] == "running").then_some(())
    })
    .await;
    let (status, busy) = run(&app, &admin, "ops-box", "slow", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(busy["code"], "busy");
    assert_eq!(busy["details"]["run"], slow["id"]);
    let (status, _) = app
        .post(
            &format!(
                "/api/v1/actions/runs/{}/cancel",
                slow["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(finished(&app, &slow).await["state"], "cancelled");

    // Requests the server did not make: bad signature, wrong audience,
    // expired, replayed. The agent refuses each and the refusal is recorded.
    let now = app.ctx.now().as_microsecond();
    let request = |id: &str, audience: &str, expires_at: i64| ActionRequest {
        run_id: id.into(),
        audience: audience.into(),
        action: "echo".into(),
        params: [("text".to_owned(), "hi".to_owned())].into(),
        expires_at,
        timeout_secs: 10,
    };
    let sign = |r: ActionRequest| {
        let signature = hex(&app.ctx.identity.sign(&action_transcript(&r)).to_bytes());
        SignedAction {
            request: r,
            signature,
        }
    };
    let forged = SignedAction {
        request: request("forged-1", &agent_id, now + 60_000_000),
        signature: "00".repeat(64),
    };
    let fresh = sign(request("replay-1", &agent_id, now + 60_000_000));
    for message in [
        forged,
        sign(request("other-1", "someone-else", now + 60_000_000)),
        sign(request("late-1", &agent_id, now - 1)),
        fresh.clone(),
        fresh,
    ] {
        assert!(app
            .ctx
            .agents
            .send(&agent_id, ServerMessage::Action(message)));
    }
    let expected = [
        "signature does not verify",
        "is for agent someone-else",
        "expired",
        "seen before (replay)",
        "allow-list",
    ];
    // Each refusal is recorded as it arrives, in no fixed order: wait for
    // every one of them, not for a count.
    eventually("every refusal on the timeline", || async {
        let events = kinds(&app, "ops-box", "action.refused").await;
        let all: String = events
            .iter()
            .filter_map(|e| e["data"]["reason"].as_str())
            .collect::<Vec<_>>()
            .join("\n");
        expected.iter().all(|x| all.contains(x)).then_some(())
    })
    .await;
    // Refusals the server made itself are on the record too.
    let server_refusals = kinds(&app, "ops-box", "action.refused").await;
    let codes: Vec<&str> = server_refusals
        .iter()
        .filter_map(|e| e["data"]["code"].as_str())
        .collect();
    for code in ["invalid_params", "forbidden", "outside_window", "busy"] {
        assert!(codes.contains(&code), "{code} not recorded: {codes:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_from_the_command_line() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.clock.set(jiff::Timestamp::now());
    app.system("cli-box", "host", json!({})).await;
    let host = AgentHost::new();
    host.configure(
        "\n[actions.greet]\nargv = [\"/bin/echo\", \"hello\", \"{who}\"]\nparams = [\"who\"]\n",
    );
    let t = token(&app, "cli-box", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "cli-1").0, 0);
    let _agent = host.run();
    eventually("the agent to connect", || async {
        (app.get("/api/v1/agents/cli-1").await["connected"] == true).then_some(())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("greet.json");
    std::fs::write(
        &spec,
        json!({"name": "greet", "title": "Say hello", "description": "Greets **someone**.",
               "params": [{"name": "who", "type": "string", "pattern": "[a-z]+", "required": true}]})
        .to_string(),
    )
    .unwrap();
    let spec = spec.display().to_string();
    let (ok, out, err) = cli(&app, &["action", "add", "cli-box", "--file", &spec]).await;
    assert!(ok && out.contains("greet"), "{out}{err}");
    let (ok, out, _) = cli(&app, &words("action list cli-box")).await;
    assert!(
        ok && out.contains("greet") && out.contains("operator"),
        "{out}"
    );
    let (ok, out, err) = cli(&app, &words("action run cli-box greet --param who=ada")).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("cli-1: succeeded")
            && out.contains("timeout 60 s")
            && out.contains("hello ada"),
        "{out}"
    );
    let (ok, _, err) = cli(&app, &words("action run cli-box greet --param who=ada")).await;
    assert!(
        !ok && err.contains("confirm"),
        "the second run asks for confirmation: {err}"
    );
    let (ok, _, err) = cli(
        &app,
        &words("action run cli-box greet --param who=Ada;ls --confirm"),
    )
    .await;
    assert!(!ok && err.contains("params.who"), "{err}");
    let (ok, out, _) = cli(&app, &words("action show cli-box greet")).await;
    assert!(ok);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["runs"].as_array().unwrap().len(), 1);
    assert_eq!(shown["runs"][0]["params"]["who"], "ada");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_discovery_groups_identical_answers() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.clock.set(jiff::Timestamp::now());
    app.system("dc-9", "infrastructure", json!({})).await;
    let answers = [
        r#"{"blockdevices": [{"name": "sda", "size": "100G"}]}"#,
        r#"{ "blockdevices" : [ {"size": "100G", "name": "sda"} ] }"#,
        r#"{"blockdevices": [{"name": "nvme0n1", "size": "1T"}]}"#,
    ];
    let mut agents = Vec::new();
    for (i, answer) in answers.iter().enumerate() {
        let slug = format!("dc-9-host-{i}");
        app.system(&slug, "host", json!({})).await;
        let (status, _) = app.include("dc-9", &slug).await;
        assert_eq!(status, StatusCode::CREATED);
        let host = AgentHost::new();
        host.configure(&format!(
            "\n[actions.lsblk]\nargv = [\"/bin/echo\", {}]\n",
            serde_json::to_string(answer).unwrap()
        ));
        let t = token(&app, &slug, json!({})).await;
        assert_eq!(
            enroll(&app.base, &t, &host.state(), &format!("disk-{i}")).0,
            0
        );
        let proc = host.run();
        agents.push((host, proc));
    }
    eventually("three agents connected", || async {
        let list = app.get("/api/v1/agents").await;
        (list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["connected"] == true)
            .count()
            == 3)
            .then_some(())
    })
    .await;
    let (status, body) = app
        .post(
            "/api/v1/systems/dc-9/actions",
            json!({"name": "lsblk", "title": "Block devices", "read_only": true, "include_subsystems": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, run1) = run(&app, &app.token, "dc-9", "lsblk", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run1}");
    assert_eq!(
        run1["targets"].as_array().unwrap().len(),
        3,
        "all hosts the data center includes"
    );
    let done = finished(&app, &run1).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let groups = done["answers"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{done}");
    assert_eq!(
        groups[0]["agents"],
        json!(["disk-0", "disk-1"]),
        "the same JSON, written differently"
    );
    assert_eq!(groups[0]["answer"]["blockdevices"][0]["name"], "sda");
    assert_eq!(groups[1]["agents"], json!(["disk-2"]));
    // Read-only: running again needs no confirmation.
    let (status, _) = run(&app, &app.token, "dc-9", "lsblk", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_checks_values_itself_and_a_replay_leaves_the_run_alone() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.clock.set(jiff::Timestamp::now());
    app.system("lab-box", "host", json!({})).await;
    let host = AgentHost::new();
    host.configure(
        r#"
[actions.show]
argv = ["/bin/echo", "{a}", "{b}"]
params = ["a", "b"]
timeout_secs = 30
[actions.dash]
argv = ["/bin/echo", "{flag}"]
params = ["flag"]
[actions.slow]
argv = ["/bin/sh", "-c", "sleep 30 & sleep 30"]
"#,
    );
    let t = token(&app, "lab-box", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "lab-1").0, 0);
    let _agent = host.run();
    let agent_id = eventually("the agent to connect", || async {
        let a = app.get("/api/v1/agents/lab-1").await;
        (a["connected"] == true).then(|| a["id"].as_str().unwrap().to_owned())
    })
    .await;
    for spec in [
        json!({"name": "show", "title": "Show", "confirm_within_minutes": null, "timeout": 600,
               "params": [{"name": "a", "type": "string"}, {"name": "b", "type": "string"}]}),
        json!({"name": "dash", "title": "Dash", "confirm_within_minutes": null,
               "params": [{"name": "flag", "type": "string", "allow_leading_dash": true}]}),
        json!({"name": "slow", "title": "Slow", "confirm_within_minutes": null, "timeout": 60}),
    ] {
        let (status, body) = app.post("/api/v1/systems/lab-box/actions", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let admin = app.token.clone();

    // One pass: a value naming another placeholder stays literal; the
    // agent's cap (30 s) is the run's timeout there, and it says so.
    let (status, r) = run(
        &app,
        &admin,
        "lab-box",
        "show",
        json!({"params": {"a": "{b}", "b": "B{a}"}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{r}");
    let r = finished(&app, &r).await;
    assert_eq!(r["state"], "succeeded", "{r}");
    assert_eq!(r["targets"][0]["output"].as_str().unwrap(), "{b} B{a}\n");
    assert_eq!(r["timeout_secs"], 600);
    assert_eq!(r["targets"][0]["timeout_secs"], 30, "{r}");

    // The server lets a dash through (the parameter opts in); the agent,
    // whose allow-list does not, refuses it: the run's outcome, not a
    // security event.
    let (status, r) = run(
        &app,
        &admin,
        "lab-box",
        "dash",
        json!({"params": {"flag": "--files0-from=/etc/passwd"}}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{r}");
    let r = finished(&app, &r).await;
    assert_eq!(r["targets"][0]["state"], "refused", "{r}");
    assert!(
        r["targets"][0]["message"]
            .as_str()
            .unwrap()
            .contains("begins with '-'"),
        "{r}"
    );
    assert!(!r["targets"][0]["output"]
        .as_str()
        .unwrap()
        .contains("root:"));

    // A replay of a live run's request: refused by the agent, recorded,
    // and the run keeps running until cancelled.
    let (status, slow) = run(&app, &admin, "lab-box", "slow", json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{slow}");
    let slow_id = slow["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/actions/runs/{slow_id}");
    eventually("the slow run to start", || async {
        (app.get(&path).await["targets"][0]["state"] == "running").then_some(())
    })
    .await;
    let request = ActionRequest {
        run_id: slow_id.clone(),
        audience: agent_id.clone(),
        action: "slow".into(),
        params: Default::default(),
        expires_at: app.ctx.now().as_microsecond() + 60_000_000,
        timeout_secs: 60,
    };
    let signature = hex(&app
        .ctx
        .identity
        .sign(&action_transcript(&request))
        .to_bytes());
    assert!(app.ctx.agents.send(
        &agent_id,
        ServerMessage::Action(SignedAction { request, signature })
    ));
    let event = eventually("the replay's refusal on the timeline", || async {
        kinds(&app, "lab-box", "action.refused")
            .await
            .into_iter()
            .find(|e| e["data"]["security"] == true && e["data"]["run"] == slow_id.as_str())
    })
    .await;
    assert_eq!(event["data"]["refusal"], "replayed", "{event}");
    assert_eq!(event["data"]["agent"], "lab-1");
    let shown = app.get(&path).await;
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["targets"][0]["state"], "running", "{shown}");
    let (status, busy) = run(&app, &admin, "lab-box", "slow", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{busy}");
    let (status, _) = app.post(&format!("{path}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let done = finished(&app, &slow).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["cancelled_by"]["name"], "Administrator");
}
