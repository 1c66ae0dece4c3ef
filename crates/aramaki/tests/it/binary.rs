//! The `aramaki` binary itself: first start, configuration errors, and the
//! command line as a client of the API.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::support::{backends, TestApp};

fn aramaki() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aramaki"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ARAMAKI_")) {
        cmd.env_remove(k);
    }
    cmd
}

#[test]
fn init_creates_everything_once_and_shows_secrets_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = aramaki()
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("password:"), "{text}");
    let token_line = text
        .lines()
        .find(|l| l.contains("API token:"))
        .expect("token printed");
    assert!(token_line.contains("ark_"));

    let config = std::fs::read_to_string(data.join("aramaki.toml")).unwrap();
    assert!(
        config.starts_with("# Aramaki configuration."),
        "the config is commented"
    );
    assert!(config.contains("listen = \"127.0.0.1:8764\""));
    assert!(data.join("aramaki.db").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("instance.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(&data).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the data directory is private");
    }

    let again = aramaki()
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(again.status.success());
    let text = String::from_utf8_lossy(&again.stdout);
    assert!(
        !text.contains("password:") && !text.contains("ark_"),
        "secrets are shown once: {text}"
    );
    assert!(text.contains("already initialised"));
}

#[test]
fn a_bad_configuration_value_stops_start_up_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("aramaki.toml"), "[server]\nlisten = 8764\n").unwrap();
    let out = aramaki()
        .args(["init", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.listen"), "{err}");
    assert!(err.contains("aramaki.toml"), "{err}");
    assert!(err.contains("expected"), "{err}");

    let out = aramaki()
        .args(["init", "--data-dir"])
        .arg(dir.path().join("other"))
        .env("ARAMAKI_DATABASE__URL", "mysql://nope")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database.url"));
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_starts_on_a_fresh_data_directory_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = aramaki()
        .current_dir(dir.path())
        .args(["server", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (token, url) = tokio::task::spawn_blocking(move || {
        let mut token = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(t) = line.split("API token: ").nth(1) {
                token = Some(t.trim().to_owned());
            }
            if let Some(u) = line.split("listening on ").nth(1) {
                return (token.expect("token before listening"), u.trim().to_owned());
            }
        }
        panic!("the server never said where it listens");
    })
    .await
    .unwrap();
    assert!(
        dir.path().join("aramaki-data/aramaki.toml").exists(),
        "default data dir is ./aramaki-data"
    );
    let http = reqwest::Client::new();
    let health: Value = http
        .get(format!("{url}/api/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    let (status, body) = {
        let r = http
            .post(format!("{url}/api/v1/systems"))
            .bearer_auth(&token)
            .json(&json!({"slug": "shop", "title": "Shop", "category": "project"}))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert_eq!(status, 201, "{body}");

    // Ctrl-C stops the server even while a live stream is open.
    let stream = http
        .get(format!("{url}/api/v1/systems/shop/timeline/stream"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut server = server;
    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let mut child = std::mem::replace(&mut server.0, Command::new("true").spawn().unwrap());
    let exit = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait()),
    )
    .await
    .expect("the server stops within 20 s of Ctrl-C")
    .unwrap()
    .unwrap();
    assert!(exit.success(), "{exit:?}");
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_drives_the_api() {
    for backend in backends() {
        command_line_on(TestApp::start(backend).await).await;
    }
}

async fn command_line_on(app: TestApp) {
    let base = app.base.clone();
    let token = app.token.clone();
    let run = move |args: Vec<String>| {
        let base = base.clone();
        let token = token.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = aramaki()
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
    };
    let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();

    let (ok, out, err) = run(args("system add dc1 --title DataCenter --category infrastructure --label dc=dc1 --link dashboard|Grafana|https://grafana.example/d/1 --contact Ada|on-call|+4930|1")).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("created dc1"));
    let (ok, _, _) = run(args(
        "system add rack-1 --title Rack --category infrastructure",
    ))
    .await;
    assert!(ok);
    let (ok, out, _) = run(args("system include dc1 rack-1")).await;
    assert!(ok && out.contains("dc1 now includes rack-1"), "{out}");
    let (ok, _, err) = run(args("system include rack-1 dc1")).await;
    assert!(!ok);
    assert!(
        err.contains("409") && err.contains("rack-1 → dc1 → rack-1"),
        "{err}"
    );

    let (ok, out, _) = run(args("system list")).await;
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SLUG"), "{out}");
    let dc1 = lines
        .iter()
        .find(|l| l.starts_with("dc1 "))
        .expect("dc1 listed");
    assert!(dc1.contains("dc=dc1"), "{out}");
    assert!(
        lines.iter().any(|l| l.starts_with("aramaki ")),
        "the instance itself is a system: {out}"
    );
    let (ok, out, _) = run(args("system list --json --category infrastructure")).await;
    assert!(ok);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);

    let (ok, out, err) = run(args("system edit rack-1 --label row=a --title Rack-A")).await;
    assert!(ok, "{err}");
    assert!(out.contains("version 2"), "{out}");
    let (ok, out, _) = run(args(
        "event add rack-1 --kind deploy --title Firmware-upgraded --idempotency-key fw-1",
    ))
    .await;
    assert!(ok && out.starts_with("recorded"), "{out}");
    let (ok, out, _) = run(args(
        "event add rack-1 --kind deploy --title Firmware-upgraded --idempotency-key fw-1",
    ))
    .await;
    assert!(ok && out.starts_with("already recorded"), "{out}");
    let (ok, out, _) = run(args("timeline dc1 --kind deploy")).await;
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("Firmware-upgraded") && out.contains("rack-1"),
        "{out}"
    );
    let (ok, out, _) = run(args("system status dc1")).await;
    assert!(ok && out.contains("rack-1"), "{out}");
    let (ok, out, _) = run(args("system show dc1")).await;
    assert!(
        ok && out.contains("Grafana") && out.contains("Ada"),
        "{out}"
    );
    let (ok, _, err) = run(args("system delete rack-1")).await;
    assert!(!ok && err.contains("still included by dc1"), "{err}");
    let (ok, _, _) = run(args("system delete rack-1 --force")).await;
    assert!(ok);

    let (ok, _, err) = run(vec![
        "system".into(),
        "list".into(),
        "--token".into(),
        "ark_bad_token".into(),
    ])
    .await;
    assert!(!ok && err.contains("401"), "{err}");

    // --follow prints events as they are recorded.
    let mut child = aramaki()
        .args(["timeline", "dc1", "--follow", "--kind", "note"])
        .env("ARAMAKI_URL", &app.base)
        .env("ARAMAKI_TOKEN", &app.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let follower = Server(child);
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // The stream is open once a recorded event comes through; keep recording until one does.
    let mut seen = None;
    for attempt in 0..50 {
        app.event("dc1", "note", &format!("live note {attempt}"), json!({}))
            .await;
        if let Ok(Some(line)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), lines_rx.recv()).await
        {
            seen = Some(line);
            break;
        }
    }
    let line = seen.expect("--follow printed a live event");
    assert!(
        line.contains("live note") && line.contains("dc1") && line.contains("note"),
        "{line}"
    );
    drop(follower);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_managed_on_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let run = |args: &[&str]| {
        let out = aramaki()
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(run(&["init"]).0);
    {
        let config = aramaki::config::Config::load(&data.join("aramaki.toml"), &[]).unwrap();
        let setup = aramaki::setup::init(
            &data,
            config,
            std::sync::Arc::new(aramaki::context::SystemClock),
        )
        .await
        .unwrap();
        let new = aramaki::systems::NewSystem::new(
            "shop".to_owned().try_into().unwrap(),
            "Shop",
            "project".to_owned().try_into().unwrap(),
        );
        aramaki::systems::create(
            &setup.context,
            &aramaki::timeline::Actor::user("t", "Test"),
            new,
        )
        .await
        .unwrap();
        setup.context.db.close().await;
    }
    let (ok, out, err) = run(&["user", "add", "sam", "--display-name", "Sam Vimes"]);
    assert!(ok, "{err}");
    assert!(out.contains("one-time password:"), "{out}");
    let token = out
        .lines()
        .find_map(|l| l.split("API token:").nth(1))
        .unwrap()
        .trim()
        .to_owned();
    let (ok, _, err) = run(&["user", "add", "sam"]);
    assert!(!ok && err.contains("already taken"), "{err}");
    let (ok, _, err) = run(&["user", "add", "vetinari", "--role", "root"]);
    assert!(!ok && err.contains("unknown role 'root'"), "{err}");

    let (ok, out, err) = run(&["user", "grant", "sam", "shop", "operator"]);
    assert!(ok, "{err}");
    assert!(out.contains("sam is operator on shop"));
    let (ok, _, err) = run(&["user", "grant", "sam", "nowhere", "operator"]);
    assert!(!ok && err.contains("no system 'nowhere'"), "{err}");
    let (ok, out, _) = run(&["user", "list", "--json"]);
    assert!(ok);
    let users: Value = serde_json::from_str(&out).unwrap();
    let sam = users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "sam")
        .unwrap();
    assert_eq!(sam["grants"], json!(["shop:operator"]));
    assert_eq!(sam["role"], "none");
    assert_eq!(sam["tokens"], 1);
    let (ok, out, _) = run(&["user", "passwd", "sam"]);
    assert!(ok && out.contains("new one-time password for sam"), "{out}");
    let (ok, out, _) = run(&["user", "token", "sam"]);
    assert!(ok && out.contains("ark_"), "{out}");

    // The token works with exactly the granted reach.
    {
        let config = aramaki::config::Config::load(&data.join("aramaki.toml"), &[]).unwrap();
        let setup = aramaki::setup::init(
            &data,
            config,
            std::sync::Arc::new(aramaki::context::SystemClock),
        )
        .await
        .unwrap();
        let app = aramaki::app::App::build(setup.context.clone(), "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let (addr, stop, _) = app.spawn();
        let list: Value = reqwest::Client::new()
            .get(format!("http://{addr}/api/v1/systems"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["items"][0]["slug"], "shop");
        stop.stop();
    }

    let (ok, _, _) = run(&["user", "revoke", "sam", "shop"]);
    assert!(ok);
    let (ok, _, err) = run(&["user", "revoke", "sam", "shop"]);
    assert!(!ok && err.contains("'sam' has no grant on 'shop'"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_works_on_postgresql_too() {
    let Some(url) = crate::support::fresh_postgres_schema().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        aramaki()
            .args(["init", "--data-dir"])
            .arg(dir.path())
            .env("ARAMAKI_DATABASE__URL", &url)
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("API token:"));
    assert!(
        !dir.path().join("aramaki.db").exists(),
        "no SQLite file when PostgreSQL is chosen"
    );
    let again = run();
    assert!(again.status.success());
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("API token:"),
        "the admin exists already"
    );
}
