//! Three real `aramaki server` processes on loopback: peering and use
//! relations through the command line, then partitions — the consumer
//! stopped while events happen, the provider killed while it sends — and
//! after the restarts every event arrives exactly once, in order.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use reqwest::Method;
use serde_json::{json, Value};

use crate::agent_e2e::{eventually, free_port, Proc};

/// One instance: its data directory, address and admin token.
struct Instance {
    name: &'static str,
    data: PathBuf,
    port: u16,
    token: String,
    proc: Option<Proc>,
}

impl Instance {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let (proc, token) = spawn_server(self.name, &self.data, self.port);
        if let Some(t) = token {
            self.token = t;
        }
        self.proc = Some(proc);
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill_hard();
        }
    }

    /// Runs the command line against this instance.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_aramaki"))
            .args(args)
            .env("ARAMAKI_URL", self.url())
            .env("ARAMAKI_TOKEN", &self.token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }

    async fn record(&self, system: &str, title: &str) {
        let (status, v) = self
            .call(
                Method::POST,
                "/api/v1/events",
                Some(json!({"system": system, "kind": "deploy", "title": title})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
}

fn spawn_server(name: &str, data: &Path, port: u16) -> (Proc, Option<String>) {
    use std::io::{BufRead, BufReader};
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_aramaki"))
        .args(["server", "--listen", &listen, "--data-dir"])
        .arg(data)
        .env_remove("ARAMAKI_DATABASE__URL")
        .env("ARAMAKI_INSTANCE__NAME", name)
        .env("ARAMAKI_INSTANCE__URL", format!("http://{listen}"))
        .env("ARAMAKI_FEDERATION__RETRY_INITIAL_MS", "100")
        .env("ARAMAKI_FEDERATION__RETRY_MAX_SECONDS", "1")
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
        if line.contains("listening on ") {
            std::thread::spawn(move || for _ in lines {});
            return (proc, token);
        }
    }
    panic!("{name} never said where it listens");
}

/// `joiner` peers with `inviter`, all through the command line.
fn peer(inviter: &Instance, joiner: &Instance) {
    let invite = inviter.cli(&["peer", "invite", "--ttl", "1h"]);
    joiner.cli(&["peer", "join", invite.trim(), "--yes"]);
    inviter.cli(&["peer", "approve", joiner.name]);
}

/// Titles of the deploys about `slug` on `app`, in the order it committed them.
async fn deploys(app: &Instance, slug: &str) -> Vec<String> {
    let (status, v) = app
        .call(
            Method::GET,
            &format!("/api/v1/systems/{slug}/timeline?limit=200&kind=deploy"),
            None,
        )
        .await;
    if status != 200 {
        return Vec::new();
    }
    let mut items: Vec<(i64, String)> = v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["sequence"].as_i64().unwrap_or(0),
                e["title"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    items.sort();
    items.into_iter().map(|(_, t)| t).collect()
}

/// Accepts the pending request from `who` (read from `aramaki peer uses`).
fn accept_pending(provider: &Instance, who: &str) {
    let list = provider.cli(&["peer", "uses"]);
    let line = list
        .lines()
        .find(|l| l.contains("provider") && l.contains(who) && l.contains("pending"))
        .unwrap_or_else(|| panic!("no pending request from {who}: {list}"));
    let id = line.split_whitespace().next().unwrap();
    provider.cli(&["peer", "accept", id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_deliver_every_event_once_in_order_across_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let make = |name: &'static str| Instance {
        name,
        data: dir.path().join(name),
        port: free_port(),
        token: String::new(),
        proc: None,
    };
    let (mut hosting, mut customer, mut other) = (make("hosting"), make("customer"), make("other"));
    tokio::task::block_in_place(|| {
        hosting.start();
        customer.start();
        other.start();
        peer(&hosting, &customer);
        peer(&hosting, &other);
    });
    for (slug, cat) in [("storage", "infrastructure"), ("billing", "service")] {
        let (status, v) = hosting
            .call(
                Method::POST,
                "/api/v1/systems",
                Some(json!({"slug": slug, "title": slug, "category": cat})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    tokio::task::block_in_place(|| {
        customer.cli(&["peer", "use", "hosting", "storage"]);
        other.cli(&["peer", "use", "hosting", "billing"]);
    });
    eventually("both requests to reach hosting", || async {
        let list = tokio::task::block_in_place(|| hosting.cli(&["peer", "uses"]));
        (list.matches("pending").count() == 2).then_some(())
    })
    .await;
    tokio::task::block_in_place(|| {
        accept_pending(&hosting, "customer");
        accept_pending(&hosting, "other");
    });
    eventually("the mirrors", || async {
        let a = customer
            .call(Method::GET, "/api/v1/systems/storage", None)
            .await
            .0;
        let b = other
            .call(Method::GET, "/api/v1/systems/billing", None)
            .await
            .0;
        (a == 200 && b == 200).then_some(())
    })
    .await;

    // Partition one: the customer is down while storage changes.
    customer.kill();
    for i in 0..30 {
        hosting
            .record("storage", &format!("storage change {i:03}"))
            .await;
        if i % 3 == 0 {
            hosting
                .record("billing", &format!("billing change {i:03}"))
                .await;
        }
    }
    let (_, peers) = hosting.call(Method::GET, "/api/v1/peers", None).await;
    let waiting = peers["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "customer")
        .map(|p| p["backlog"].as_i64().unwrap_or(0))
        .unwrap_or(0);
    assert!(
        waiting > 0,
        "the outbox holds the customer's messages: {peers}"
    );
    tokio::task::block_in_place(|| customer.start());

    // Partition two: the provider is killed while it sends.
    for i in 30..60 {
        hosting
            .record("storage", &format!("storage change {i:03}"))
            .await;
    }
    hosting.kill();
    tokio::task::block_in_place(|| hosting.start());

    let expected: Vec<String> = (0..60).map(|i| format!("storage change {i:03}")).collect();
    let got = eventually("every storage change on the customer", || async {
        let got = deploys(&customer, "storage").await;
        (got.len() >= expected.len()).then_some(got)
    })
    .await;
    assert_eq!(got, expected, "exactly once, in order");
    // Nothing is left to send, and nothing more arrived meanwhile.
    eventually("the provider's outboxes to drain", || async {
        let (_, peers) = hosting.call(Method::GET, "/api/v1/peers", None).await;
        peers["items"]
            .as_array()?
            .iter()
            .all(|p| p["backlog"] == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        deploys(&customer, "storage").await,
        expected,
        "no late duplicates"
    );
    let billing: Vec<String> = (0..30)
        .step_by(3)
        .map(|i| format!("billing change {i:03}"))
        .collect();
    let got = eventually("billing on the other instance", || async {
        let got = deploys(&other, "billing").await;
        (got.len() >= billing.len()).then_some(got)
    })
    .await;
    assert_eq!(got, billing);
    // Routing: neither hears about the other's system: no mirror of it
    // exists, and the systems each does use carry only their own changes
    // (the exact lists above).
    for (app, foreign) in [(&customer, "billing"), (&other, "storage")] {
        let (status, _) = app
            .call(Method::GET, &format!("/api/v1/systems/{foreign}"), None)
            .await;
        assert_eq!(status, 404, "{foreign}");
        let (_, all) = app
            .call(Method::GET, "/api/v1/systems?limit=200", None)
            .await;
        assert!(
            !all.to_string().contains(foreign),
            "no trace of {foreign}: {all}"
        );
    }
}
