//! The real `aramaki-agent` binary against a real server: Debian's
//! monitoring plugins, the push API, refusals as an operator reads them,
//! and nothing lost when either side is killed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::monitoring::token;
use crate::support::{Backend, TestApp};

const PLUGINS: &str = "/usr/lib/nagios/plugins";

pub(crate) fn agent_bin() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_aramaki")).with_file_name("aramaki-agent");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p aramaki-agent` (cargo test --workspace does)",
        path.display()
    );
    path
}

fn plugin(name: &str) -> String {
    let path = format!("{PLUGINS}/{name}");
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: apt-get install monitoring-plugins (or run .ci/run)"
    );
    path
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub(crate) fn kill_hard(&mut self) {
        let _ = self.0.kill(); // SIGKILL: no chance to flush or say goodbye
        let _ = self.0.wait();
    }
}

fn agent() -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.env("ARAMAKI_AGENT_LOG", "info");
    cmd
}

/// Enrolls with the real binary; returns (exit code, stderr).
pub(crate) fn enroll(server: &str, token: &str, state: &Path, name: &str) -> (i32, String) {
    let out = agent()
        .args([
            "enroll",
            "--server",
            server,
            "--token",
            token,
            "--name",
            name,
            "--state-dir",
        ])
        .arg(state)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub(crate) struct AgentHost {
    dir: tempfile::TempDir,
    pub(crate) push_http: u16,
    push_tcp: u16,
}

impl AgentHost {
    pub(crate) fn new() -> AgentHost {
        let dir = tempfile::tempdir().unwrap();
        let host = AgentHost {
            dir,
            push_http: free_port(),
            push_tcp: free_port(),
        };
        std::fs::write(
            host.config(),
            format!(
                "subscriptions = [\"linux\"]\npush_http = \"127.0.0.1:{}\"\npush_tcp = \"127.0.0.1:{}\"\n",
                host.push_http, host.push_tcp
            ),
        )
        .unwrap();
        host
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub(crate) fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// Appends TOML (actions, say) to the agent's configuration.
    pub(crate) fn configure(&self, toml: &str) {
        let mut text = std::fs::read_to_string(self.config()).unwrap();
        text.push_str(toml);
        std::fs::write(self.config(), text).unwrap();
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    pub(crate) fn run(&self) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        Proc(
            agent()
                .args(["run", "--state-dir"])
                .arg(self.state())
                .arg("--config")
                .arg(self.config())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// Runs the agent and expects it to stop for good (exit 78), saying why.
    async fn runs_into_refusal(&self, why: &str) {
        let mut run = self.run();
        let status = tokio::task::spawn_blocking(move || run.0.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(78));
        assert!(self.log_text().contains(why), "{}", self.log_text());
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Pushes a Sensu 1.x result on the TCP socket; returns the answer.
    /// A connection that ends without an answer was not accepted (right
    /// after an agent restart, a check forked by the old process can hold
    /// its listening socket until it execs): like any client, try again.
    pub(crate) async fn push_tcp(&self, body: Value) -> String {
        for _ in 0..50 {
            if let Ok(answer) = self.push_tcp_once(&body).await {
                if !answer.is_empty() {
                    return answer;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the agent never answered a push")
    }

    /// Pushes the results `n=001`, `n=002`, … of check `pushed`; each must
    /// be accepted.
    pub(crate) async fn push_numbered(&self, range: std::ops::RangeInclusive<u32>) {
        for i in range {
            let body = json!({"name": "pushed", "status": 0, "output": format!("n={i:03}")});
            assert_eq!(self.push_tcp(body).await, "ok", "result n={i:03}");
        }
    }

    async fn push_tcp_once(&self, body: &Value) -> std::io::Result<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.push_tcp)).await?;
        s.write_all(body.to_string().as_bytes()).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    }
}

/// Polls `probe` until it returns Some, failing with `what` after 60 s.
pub(crate) async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn observation<'a>(obs: &'a Value, check: &str) -> Option<&'a Value> {
    obs["items"]
        .as_array()?
        .iter()
        .find(|o| o["check"] == check)
}

async fn api_get(http: &reqwest::Client, base: &str, token: &str, path: &str) -> Option<Value> {
    let r = http
        .get(format!("{base}/api/v1{path}"))
        .bearer_auth(token)
        .send()
        .await
        .ok()?;
    if r.status() != StatusCode::OK {
        return None;
    }
    r.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_plugins_run_through_a_real_agent() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("plugins-host", "host", json!({})).await;
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    let checks = [
        json!({"name": "load", "command": [plugin("check_load"), "-w", "1000,1000,1000", "-c", "2000,2000,2000"]}),
        json!({"name": "disk", "command": [plugin("check_disk"), "-w", "1%", "-c", "1%", "-p", "/"]}),
        json!({"name": "tcp", "command": [plugin("check_tcp"), "-H", "127.0.0.1", "-p", port]}),
        json!({"name": "http", "command": [plugin("check_http"), "-H", "127.0.0.1", "-p", port, "-u", "/api/v1/health"]}),
        json!({"name": "dummy", "command": [plugin("check_dummy"), "2", "broken on purpose"]}),
        json!({"name": "tcp-probe", "probe": {"probe": "tcp", "host": "127.0.0.1", "port": port.parse::<u16>().unwrap()}}),
    ];
    for mut c in checks {
        c["subscriptions"] = json!(["linux"]);
        c["interval"] = json!(1);
        c["timeout"] = json!(10);
        let (status, v) = app.post("/api/v1/checks", c).await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
    }
    let host = AgentHost::new();
    let t = token(&app, "plugins-host", json!({})).await;
    let (code, err) = enroll(&app.base, &t, &host.state(), "plugins-agent");
    assert_eq!(code, 0, "{err}");
    let _agent = host.run();

    let expect = [
        ("load", "ok"),
        ("disk", "ok"),
        ("tcp", "ok"),
        ("http", "ok"),
        ("dummy", "critical"),
        ("tcp-probe", "ok"),
    ];
    let obs = eventually("every check's first result", || async {
        let obs = app.get("/api/v1/systems/plugins-host/observations").await;
        expect
            .iter()
            .all(|(c, _)| observation(&obs, c).is_some())
            .then_some(obs)
    })
    .await;
    for (check, state) in expect {
        let o = observation(&obs, check).unwrap();
        assert_eq!(
            o["state"],
            state,
            "{check}: {o}\nagent log:\n{}",
            host.log_text()
        );
    }
    let load = observation(&obs, "load").unwrap();
    let metrics: Vec<&str> = load["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        metrics.contains(&"load1"),
        "performance data parsed: {load}"
    );
    assert!(observation(&obs, "dummy").unwrap()["output"]
        .as_str()
        .unwrap()
        .contains("broken on purpose"));

    // A changed definition reaches the running agent; the state change is recorded.
    let (status, v) = app
        .call(
            Method::PUT,
            "/api/v1/checks/dummy",
            Some(json!({"name": "dummy", "command": [plugin("check_dummy"), "0", "fixed"], "subscriptions": ["linux"], "interval": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let changes = eventually("dummy turning OK", || async {
        let v = app
            .get("/api/v1/systems/plugins-host/timeline?kind=check.state_changed&limit=100")
            .await;
        let changes: Vec<(String, String)> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .filter(|e| e["data"]["check"] == "dummy")
            .map(|e| {
                (
                    e["data"]["from"].as_str().unwrap().to_owned(),
                    e["data"]["to"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        (changes.len() >= 2).then_some(changes)
    })
    .await;
    assert_eq!(
        changes,
        [
            ("none".into(), "critical".into()),
            ("critical".into(), "ok".into())
        ]
    );

    // The push APIs: Sensu Go's event JSON over HTTP, Sensu 1.x over TCP.
    let r = app
        .http
        .post(format!("http://127.0.0.1:{}/events", host.push_http))
        .json(&json!({"check": {"metadata": {"name": "nightly-backup"}, "status": 1, "output": "BACKUP WARNING - slow"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = app
        .http
        .post(format!("http://127.0.0.1:{}/events", host.push_http))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.unwrap().contains("not JSON"));
    assert_eq!(
        host.push_tcp(json!({"name": "cron-job", "status": 2, "output": "CRON CRITICAL - failed"}))
            .await,
        "ok"
    );
    assert!(host
        .push_tcp(json!({"status": 2}))
        .await
        .starts_with("invalid"));
    let obs = eventually("pushed results", || async {
        let obs = app.get("/api/v1/systems/plugins-host/observations").await;
        (observation(&obs, "nightly-backup").is_some() && observation(&obs, "cron-job").is_some())
            .then_some(obs)
    })
    .await;
    assert_eq!(
        observation(&obs, "nightly-backup").unwrap()["state"],
        "warning"
    );
    assert_eq!(observation(&obs, "cron-job").unwrap()["state"], "critical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_told_plainly() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("refused-host", "host", json!({})).await;
    let dir = tempfile::tempdir().unwrap();

    // Reused single-use token.
    let single = token(&app, "refused-host", json!({})).await;
    assert_eq!(enroll(&app.base, &single, &dir.path().join("a"), "a").0, 0);
    let (code, err) = enroll(&app.base, &single, &dir.path().join("b"), "b");
    assert_eq!(code, 78);
    assert!(err.contains("token already used"), "{err}");

    // Expired token.
    let short = token(&app, "refused-host", json!({"ttl": "2m"})).await;
    app.clock.advance(jiff::SignedDuration::from_mins(3));
    let (code, err) = enroll(&app.base, &short, &dir.path().join("c"), "c");
    assert_eq!(code, 78);
    assert!(err.contains("token expired"), "{err}");

    // A server whose key is not the one the token names.
    let t = token(&app, "refused-host", json!({})).await;
    let (head, _) = t.rsplit_once('_').unwrap();
    let wrong = format!("{head}_AAAAAAAAAAAAAAAA");
    let (code, err) = enroll(&app.base, &wrong, &dir.path().join("d"), "d");
    assert_eq!(code, 78);
    assert!(
        err.contains("server key does not match the pinned fingerprint"),
        "{err}"
    );
    assert!(
        !dir.path().join("d/agent.key").exists(),
        "nothing kept from a refused enrollment"
    );

    // Plain http to another host needs an explicit flag.
    let (code, err) = enroll("http://192.0.2.1:8764", &t, &dir.path().join("e"), "e");
    assert_eq!(code, 78);
    assert!(err.contains("--allow-plaintext"), "{err}");

    // A changed agent key.
    let host = AgentHost::new();
    let t = token(&app, "refused-host", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "changed").0, 0);
    std::fs::write(
        host.state().join("agent.key"),
        format!("{}\n", "ab".repeat(32)),
    )
    .unwrap();
    host.runs_into_refusal("key changed").await;

    // A revoked agent.
    let host = AgentHost::new();
    let t = token(&app, "refused-host", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "revoked").0, 0);
    let (status, _) = app.post("/api/v1/agents/revoked/revoke", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    host.runs_into_refusal("agent revoked").await;
}

/// Agent sequence numbers in the history of every check: each once, none missing.
async fn assert_exactly_once(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    system: &str,
    checks: &[&str],
) {
    let mut seqs = Vec::new();
    for check in checks {
        let v = api_get(
            http,
            base,
            token,
            &format!("/systems/{system}/observations/{check}/history?limit=1000"),
        )
        .await
        .unwrap();
        for s in v["items"].as_array().unwrap() {
            if let Some(seq) = s["agent_seq"].as_i64() {
                seqs.push(seq);
            }
        }
    }
    seqs.sort_unstable();
    let n = seqs.len() as i64;
    assert!(n > 0);
    let mut dedup = seqs.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), seqs.len(), "a result arrived twice: {seqs:?}");
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "a result went missing");
}

pub(crate) async fn pushed_outputs(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    system: &str,
) -> Vec<String> {
    let v = api_get(
        http,
        base,
        token,
        &format!("/systems/{system}/observations/pushed/history?limit=1000"),
    )
    .await
    .unwrap_or(json!({"items": []}));
    let mut out: Vec<String> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["output"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

pub(crate) fn expected_outputs(n: u32) -> Vec<String> {
    let mut v: Vec<String> = (1..=n).map(|i| format!("n={i:03}")).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_stream_loses_nothing() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("steady-host", "host", json!({})).await;
    app.post(
        "/api/v1/checks",
        json!({"name": "ticker", "command": [plugin("check_dummy"), "0", "tick"], "subscriptions": ["linux"], "interval": 1}),
    )
    .await;
    let host = AgentHost::new();
    let t = token(&app, "steady-host", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "steady").0, 0);
    let mut agent = host.run();
    eventually("the push socket", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", host.push_tcp))
            .await
            .ok()
    })
    .await;
    host.push_numbered(1..=20).await;
    // Accepted means on disk: killing the agent now must not lose any.
    agent.kill_hard();
    let mut _agent = host.run();
    eventually("the push socket again", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", host.push_tcp))
            .await
            .ok()
    })
    .await;
    host.push_numbered(21..=40).await;
    let outputs = eventually("all 40 pushed results", || async {
        let out = pushed_outputs(&app.http, &app.base, &app.token, "steady-host").await;
        (out.len() >= 40).then_some(out)
    })
    .await;
    assert_eq!(outputs, expected_outputs(40));
    assert_exactly_once(
        &app.http,
        &app.base,
        &app.token,
        "steady-host",
        &["pushed", "ticker"],
    )
    .await;
}

/// A real server process on a data directory.
fn server(data: &Path, listen: &str) -> (Proc, String, Option<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_aramaki"))
        .args(["server", "--listen", listen, "--data-dir"])
        .arg(data)
        .env_remove("ARAMAKI_DATABASE__URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let mut token = None;
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(t) = line.split("API token: ").nth(1) {
            token = Some(t.trim().to_owned());
        }
        if let Some(u) = line.split("listening on ").nth(1) {
            let url = u.trim().to_owned();
            // Keep draining stdout so the server never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            return (proc, url, token);
        }
    }
    panic!("the server never said where it listens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (srv, url, token) = tokio::task::block_in_place(|| server(&data, "127.0.0.1:0"));
    let mut srv = srv;
    let token = token.unwrap();
    let http = reqwest::Client::new();
    let call = |method: Method, path: &str, body: Value| {
        http.request(method, format!("{url}/api/v1{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let r = call(
        Method::POST,
        "/systems",
        json!({"slug": "crash-host", "title": "Crash", "category": "host"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = call(
        Method::POST,
        "/checks",
        json!({"name": "ticker", "command": [plugin("check_dummy"), "0", "tick"], "subscriptions": ["linux"], "interval": 1}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = call(
        Method::POST,
        "/agents/tokens",
        json!({"system": "crash-host"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let host = AgentHost::new();
    let (code, err) = enroll(&url, v["token"].as_str().unwrap(), &host.state(), "crashy");
    assert_eq!(code, 0, "{err}");
    let _agent = host.run();
    eventually("the push socket", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", host.push_tcp))
            .await
            .ok()
    })
    .await;
    host.push_numbered(1..=20).await;
    srv.kill_hard();
    // The agent keeps accepting and running checks while the server is gone.
    host.push_numbered(21..=50).await;
    let listen = url.trim_start_matches("http://").to_owned();
    let (_srv, url2, _) = tokio::task::block_in_place(|| server(&data, &listen));
    assert_eq!(url2, url);
    let outputs = eventually("all 50 pushed results after the restart", || async {
        let out = pushed_outputs(&http, &url, &token, "crash-host").await;
        (out.len() >= 50).then_some(out)
    })
    .await;
    assert_eq!(
        outputs,
        expected_outputs(50),
        "agent log:\n{}",
        host.log_text()
    );
    assert_exactly_once(&http, &url, &token, "crash-host", &["pushed", "ticker"]).await;
    assert!(
        host.log_text().contains("reconnecting"),
        "{}",
        host.log_text()
    );
}

/// A TLS-terminating proxy in front of `backend` (as an operator would put
/// in front of Aramaki), with the test CA's certificate for 127.0.0.1.
async fn tls_proxy(backend: String) -> u16 {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, backend) = (acceptor.clone(), backend.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_speak_tls_and_check_the_certificate() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("tls-host", "host", json!({})).await;
    let port = tls_proxy(app.base.trim_start_matches("http://").to_owned()).await;
    let server = format!("https://127.0.0.1:{port}");
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls/ca.pem");
    let host = AgentHost::new();
    let t = token(&app, "tls-host", json!({"reusable": true})).await;

    // A certificate from a CA the agent does not trust is refused.
    let out = agent()
        .args([
            "enroll",
            "--server",
            &server,
            "--token",
            &t,
            "--name",
            "tls-1",
            "--state-dir",
        ])
        .arg(host.state())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(!host.state().join("agent.key").exists());

    // With the private CA, enrollment and the session run over wss://.
    let out = agent()
        .args([
            "enroll",
            "--server",
            &server,
            "--token",
            &t,
            "--name",
            "tls-1",
            "--ca-file",
        ])
        .arg(&ca)
        .arg("--state-dir")
        .arg(host.state())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    host.configure(&format!("ca_file = {:?}\n", ca.display().to_string()));
    let _agent = host.run();
    eventually("the agent to connect over TLS", || async {
        (app.get("/api/v1/agents/tls-1").await["connected"] == true).then_some(())
    })
    .await;
    assert_eq!(
        host.push_tcp(json!({"name": "over-tls", "status": 0, "output": "fine"}))
            .await,
        "ok"
    );
    eventually("the result to arrive", || async {
        let obs = app.get("/api/v1/systems/tls-host/observations").await;
        observation(&obs, "over-tls").map(|o| o["state"].clone())
    })
    .await;
}
