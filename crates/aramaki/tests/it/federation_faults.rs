//! Federation faults from outside (issue 13): forged snapshots, history
//! after peering again, restored backups, floods, refusals and suspension.

use std::sync::Arc;
use std::time::Duration;

use aramaki::federation::envelope::{open, seal, Peer, PeerState};
use aramaki::federation::identity::Identity;
use aramaki::federation::link::{connect_url, Conn, MemoryNet, Transport};
use aramaki_protocol::federation::Envelope;
use ed25519_dalek::SigningKey;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::agent_e2e::eventually;
use crate::both;
use crate::federation_links::{instance, peer, record, timeline, wait_use, ANY_PIN};
use crate::support::TestApp;

const MINUTE: i64 = 60_000_000;

pub(crate) fn now(app: &TestApp) -> i64 {
    aramaki::db::to_micros(app.ctx.now())
}

pub(crate) fn refusals(app: &TestApp, reason: &str) -> u64 {
    app.ctx
        .federation
        .refusals()
        .get(reason)
        .copied()
        .unwrap_or(0)
}

/// A peer the test speaks for, pinned by `app` as active, with a link open.
pub(crate) struct Mallory {
    pub(crate) id: String,
    me: Identity,
    to: String,
    pub(crate) conn: Conn,
}

impl Mallory {
    pub(crate) async fn link(net: &MemoryNet, app: &TestApp, seed: u8) -> Mallory {
        let id = uuid::Uuid::now_v7().to_string();
        let me = Identity::new(
            id.clone(),
            "mallory".into(),
            SigningKey::from_bytes(&[seed; 32]),
        );
        sqlx::query("INSERT INTO peers (instance_id, name, url, public_key, state, created_at, updated_at) VALUES ($1, 'mallory', 'http://mallory.invalid', $2, 'active', $3, $3)")
            .bind(id.as_str())
            .bind(me.public_key_hex())
            .bind(now(app))
            .execute(app.ctx.db.reader())
            .await
            .unwrap();
        let to = app.ctx.identity.instance_id.clone();
        let conn = net.dial(&connect_url(&app.base), ANY_PIN).await.unwrap();
        let mut m = Mallory { id, me, to, conn };
        let hello = seal(
            &m.me,
            &m.to,
            "link.hello",
            json!({"cursor": 0, "keys": []}),
            now(app),
            MINUTE,
        );
        m.send_raw(serde_json::to_string(&hello).unwrap()).await;
        m.next(app, "link.welcome").await;
        m
    }

    async fn send_raw(&self, frame: String) {
        self.conn.tx.send(frame).await.unwrap();
    }

    async fn send(&self, app: &TestApp, seq: i64, kind: &str, data: Value) {
        self.send_raw(self.frame(app, seq, kind, data)).await;
    }

    /// A sealed, numbered message, not yet sent.
    pub(crate) fn frame(&self, app: &TestApp, seq: i64, kind: &str, data: Value) -> String {
        let e = seal(
            &self.me,
            &self.to,
            kind,
            json!({"seq": seq, "data": data}),
            now(app),
            MINUTE,
        );
        serde_json::to_string(&e).unwrap()
    }

    /// The next envelope of `kind` from `app`, checked against its key.
    pub(crate) async fn next(&mut self, app: &TestApp, kind: &str) -> Envelope {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let frame = tokio::time::timeout_at(deadline, self.conn.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {kind} in time"))
                .unwrap_or_else(|| panic!("the link closed while waiting for {kind}"));
            let key = app.ctx.identity.public_key();
            let id = app.ctx.identity.instance_id.clone();
            let opened = open(
                frame.as_bytes(),
                &self.id,
                now(app),
                |issuer| {
                    (issuer == id).then(|| Peer {
                        instance_id: id.clone(),
                        state: PeerState::Active,
                        key,
                    })
                },
                |_, _| true,
            )
            .expect("the instance's frames are valid");
            if opened.envelope.kind == kind {
                return opened.envelope;
            }
        }
    }

    /// Waits until `app` acknowledged everything up to `seq`.
    async fn acked(&mut self, app: &TestApp, seq: i64) {
        loop {
            let ack = self.next(app, "link.ack").await;
            if ack.body["upto"].as_i64().unwrap_or(0) >= seq {
                return;
            }
        }
    }
}

fn system(id: &str, slug: &str, instance: &str) -> Value {
    json!({"id": id, "slug": slug, "title": slug.to_uppercase(), "category": "service", "description": "",
        "handbook": "", "labels": {}, "links": [], "contacts": [], "selector": null, "instance": instance,
        "version": 1, "created_at": "2026-11-23T08:00:00Z", "updated_at": "2026-11-23T08:00:00Z"})
}

fn snapshot(use_id: &str, root: &str, systems: &[Value], edges: Value) -> Value {
    let systems: Vec<Value> = systems
        .iter()
        .map(|s| json!({"system": s, "states": []}))
        .collect();
    json!({"use": use_id, "root": root, "systems": systems, "edges": edges, "events": []})
}

async fn mirrors_of(app: &TestApp, peer: &str) -> Vec<(String, String)> {
    use sqlx::Row;
    sqlx::query(
        "SELECT s.slug, r.remote_id FROM remote_systems r JOIN systems s ON s.id = r.system_id \
         WHERE r.peer_id = $1 AND s.deleted_at IS NULL ORDER BY s.slug",
    )
    .bind(peer)
    .fetch_all(app.ctx.db.reader())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_must_answer_its_use_with_its_root_and_what_lies_below() {
    let net = Arc::new(MemoryNet::default());
    let customer = instance("customer", &net).await;
    let payroll = customer.system("payroll", "service", json!({})).await;
    let payroll_id = payroll["id"].as_str().unwrap().to_owned();
    let mut m = Mallory::link(&net, &customer, 51).await;
    let (status, asked) = customer
        .post("/api/v1/peers/mallory/uses", json!({"system": "vault"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let use_id = asked["id"].as_str().unwrap().to_owned();
    m.next(&customer, "use.request").await;
    m.send(
        &customer,
        1,
        "use.accepted",
        json!({"use": use_id, "exposure": {"level": "timeline"}}),
    )
    .await;
    let refused = refusals(&customer, "not_allowed");

    // The first snapshot's root must be the system asked for.
    let other = uuid::Uuid::now_v7().to_string();
    m.send(
        &customer,
        2,
        "system.snapshot",
        snapshot(
            &use_id,
            &other,
            &[system(&other, "ledger", &m.id)],
            json!([]),
        ),
    )
    .await;
    // The real one.
    let vault = uuid::Uuid::now_v7().to_string();
    let node = uuid::Uuid::now_v7().to_string();
    m.send(
        &customer,
        3,
        "system.snapshot",
        snapshot(
            &use_id,
            &vault,
            &[
                system(&vault, "vault", &m.id),
                system(&node, "vault-node", &m.id),
            ],
            json!([[vault, node]]),
        ),
    )
    .await;
    m.acked(&customer, 3).await;
    assert_eq!(
        refusals(&customer, "not_allowed"),
        refused + 1,
        "the ledger snapshot is refused"
    );
    let real = vec![
        ("vault".to_owned(), vault.clone()),
        ("vault-node".to_owned(), node.clone()),
    ];
    assert_eq!(mirrors_of(&customer, &m.id).await, real);

    // Forgeries: a root that is one of the customer's own systems; another
    // root with the same slug; a member not below the root; a member
    // carrying one of the customer's ids. Each is refused whole.
    let stray = uuid::Uuid::now_v7().to_string();
    let forged = [
        snapshot(
            &use_id,
            &payroll_id,
            &[system(&payroll_id, "vault", &m.id)],
            json!([]),
        ),
        snapshot(
            &use_id,
            &other,
            &[system(&other, "vault", &m.id)],
            json!([]),
        ),
        snapshot(
            &use_id,
            &vault,
            &[
                system(&vault, "vault", &m.id),
                system(&stray, "stray", &m.id),
            ],
            json!([]),
        ),
        snapshot(
            &use_id,
            &vault,
            &[
                system(&vault, "vault", &m.id),
                system(&payroll_id, "payroll", &m.id),
            ],
            json!([[vault, payroll_id]]),
        ),
    ];
    for (i, s) in forged.into_iter().enumerate() {
        m.send(&customer, 4 + i as i64, "system.snapshot", s).await;
    }
    m.acked(&customer, 7).await;
    assert_eq!(
        refusals(&customer, "not_allowed"),
        refused + 5,
        "every forgery is refused"
    );
    assert_eq!(
        mirrors_of(&customer, &m.id).await,
        real,
        "the real mirror stays, no forged one"
    );
    let own = customer.get("/api/v1/systems/payroll").await;
    assert_eq!(
        own["instance"],
        customer.ctx.identity.instance_id.as_str(),
        "payroll is still ours"
    );
    let (status, _) = customer
        .call(Method::GET, "/api/v1/systems/stray", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peering_again_after_a_revocation_brings_the_history_back() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    peer(&hosting, &customer).await;
    hosting.system("storage", "infrastructure", json!({})).await;
    let (status, v) = hosting
        .call(
            Method::PUT,
            "/api/v1/peers/customer/policies",
            Some(json!({"system": "storage", "level": "timeline"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (_, asked) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "storage"}))
        .await;
    wait_use(&customer, asked["id"].as_str().unwrap(), "accepted").await;
    record(
        &hosting,
        "storage",
        "deploy",
        "storage 2.0 before the revocation",
        "info",
    )
    .await;
    eventually("the deploy on the mirror", || async {
        timeline(&customer, "storage")
            .await
            .iter()
            .any(|e| e["title"] == "storage 2.0 before the revocation")
            .then_some(())
    })
    .await;

    let (status, _) = hosting
        .post("/api/v1/peers/customer/revoke", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("the mirror to go", || async {
        let (status, _) = customer
            .call(Method::GET, "/api/v1/systems/storage", None)
            .await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;

    peer(&hosting, &customer).await;
    let (status, asked) = customer
        .post(
            "/api/v1/peers/hosting/uses",
            json!({"system": "storage", "level": "timeline"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let again = asked["id"].as_str().unwrap().to_owned();
    wait_use(&hosting, &again, "pending").await;
    let (status, v) = hosting
        .post(&format!("/api/v1/uses/{again}/accept"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_use(&customer, &again, "accepted").await;
    let events = eventually("the new mirror", || async {
        let t = timeline(&customer, "storage").await;
        t.iter()
            .any(|e| e["kind"] == "federation.mirrored")
            .then_some(t)
    })
    .await;
    let deploys: Vec<&Value> = events
        .iter()
        .filter(|e| e["title"] == "storage 2.0 before the revocation")
        .collect();
    assert_eq!(
        deploys.len(),
        1,
        "the history is on the new mirror, once: {events:?}"
    );
}

/// The federation state of `app` towards `peer` as a backup holds it: the
/// peer's row (numbering, cursors) and the outbox.
struct Backup {
    row: Vec<Value>,
    outbox: Vec<(i64, String, String, String, i64)>,
}

const NUMBERING: [&str; 7] = [
    "out_seq",
    "in_seq",
    "out_epoch",
    "in_epoch",
    "in_mark",
    "acked_seq",
    "acked_mark",
];

async fn backup(app: &TestApp, peer: &str) -> Backup {
    use sqlx::Row;
    let pool = app.ctx.db.reader();
    let r = sqlx::query(&format!(
        "SELECT {} FROM peers WHERE instance_id = $1",
        NUMBERING.join(", ")
    ))
    .bind(peer)
    .fetch_one(pool)
    .await
    .unwrap();
    let row = NUMBERING
        .iter()
        .map(|c| match r.try_get::<i64, _>(*c) {
            Ok(n) => json!(n),
            Err(_) => json!(r.get::<String, _>(*c)),
        })
        .collect();
    let outbox = sqlx::query(
        "SELECT seq, mark, kind, body, created_at FROM federation_outbox WHERE peer_id = $1",
    )
    .bind(peer)
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect();
    Backup { row, outbox }
}

/// Puts the backup back, as restoring the database would.
async fn restore(app: &TestApp, peer: &str, b: &Backup) {
    let pool = app.ctx.db.reader();
    for (column, value) in NUMBERING.iter().zip(&b.row) {
        let q = format!("UPDATE peers SET {column} = $2 WHERE instance_id = $1");
        let q = sqlx::query(&q).bind(peer);
        let q = match value.as_i64() {
            Some(n) => q.bind(n),
            None => q.bind(value.as_str().unwrap().to_owned()),
        };
        q.execute(pool).await.unwrap();
    }
    sqlx::query("DELETE FROM federation_outbox WHERE peer_id = $1")
        .bind(peer)
        .execute(pool)
        .await
        .unwrap();
    for (seq, mark, kind, body, at) in &b.outbox {
        sqlx::query("INSERT INTO federation_outbox (peer_id, seq, mark, kind, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(peer)
            .bind(*seq)
            .bind(mark.as_str())
            .bind(kind.as_str())
            .bind(body.as_str())
            .bind(*at)
            .execute(pool)
            .await
            .unwrap();
    }
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

async fn peer_info(app: &TestApp, name: &str) -> Value {
    app.get("/api/v1/peers").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no peer {name}"))
}

/// SQLite only (the in-memory network's instances are): the restore puts
/// back the numbering and the outbox as a backup holds them; the detection
/// itself is plain SQL on both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_restored_from_a_backup_is_detected_on_both_sides_and_recovers() {
    use crate::federation_links::sqlx_titles;
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    peer(&hosting, &customer).await;
    let (hosting_id, customer_id) = (
        hosting.ctx.identity.instance_id.clone(),
        customer.ctx.identity.instance_id.clone(),
    );
    hosting.system("storage", "infrastructure", json!({})).await;
    hosting.system("billing", "service", json!({})).await;
    let (status, v) = hosting
        .call(
            Method::PUT,
            "/api/v1/peers/customer/policies",
            Some(json!({"system": "storage", "level": "timeline"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (_, asked) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "storage"}))
        .await;
    wait_use(&customer, asked["id"].as_str().unwrap(), "accepted").await;
    record(&hosting, "storage", "deploy", "before the backup", "info").await;
    let arrived = |title: &'static str| {
        let (customer, hosting_id) = (&customer, hosting_id.clone());
        async move {
            eventually(&format!("'{title}' on the customer"), || async {
                sqlx_titles(customer, &hosting_id)
                    .await
                    .contains(&title.to_owned())
                    .then_some(())
            })
            .await
        }
    };
    arrived("before the backup").await;
    let saved = backup(&customer, &hosting_id).await;

    // After the backup, messages flow both ways.
    let (_, ghost) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "ghost"}))
        .await;
    wait_use(&customer, ghost["id"].as_str().unwrap(), "rejected").await;
    record(&hosting, "storage", "deploy", "after the backup", "info").await;
    arrived("after the backup").await;

    // The customer goes down and comes back from the backup.
    net.cut(&customer.base);
    eventually("the link to drop", || async {
        (!hosting.ctx.federation.connected(&customer_id)
            && !customer.ctx.federation.connected(&hosting_id))
        .then_some(())
    })
    .await;
    restore(&customer, &hosting_id, &saved).await;
    // Its next message takes the number the ghost request had.
    let (status, billing) = customer
        .post(
            "/api/v1/peers/hosting/uses",
            json!({"system": "billing", "level": "status"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{billing}");
    record(&hosting, "storage", "deploy", "while apart", "info").await;
    net.heal(&customer.base);

    // Nothing is skipped either way.
    wait_use(&hosting, billing["id"].as_str().unwrap(), "pending").await;
    arrived("while apart").await;
    record(&hosting, "storage", "deploy", "after the restore", "info").await;
    arrived("after the restore").await;
    let (status, v) = customer
        .call(Method::GET, "/api/v1/systems/storage", None)
        .await;
    assert_eq!(status, StatusCode::OK, "the mirror is still there: {v}");

    // Said loudly, on both sides: the peer, the timeline, the metric.
    for (app, other) in [(&hosting, "customer"), (&customer, "hosting")] {
        let p = peer_info(app, other).await;
        assert!(
            p["resync_reason"]
                .as_str()
                .is_some_and(|r| r.contains("from a backup")),
            "{}: {p}",
            app.ctx.identity.name
        );
        assert!(p["resynced_at"].is_string(), "{p}");
        let audit = timeline(app, "aramaki").await;
        assert!(
            audit.iter().any(|e| e["kind"] == "federation.resynced"),
            "{}: {audit:?}",
            app.ctx.identity.name
        );
        let m = metrics(app).await;
        assert!(
            m.contains("aramaki_federation_resyncs_total{direction=\"outbound\"} 1"),
            "{}: {m}",
            app.ctx.identity.name
        );
        assert!(
            m.contains("aramaki_federation_resyncs_total{direction=\"inbound\"}"),
            "{}: {m}",
            app.ctx.identity.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_peer_is_told_so_and_shows_it_until_resumed() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    peer(&hosting, &customer).await;
    let (status, _) = hosting
        .post("/api/v1/peers/customer/suspend", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let shown = eventually("the customer to know it is suspended", || async {
        let p = peer_info(&customer, "hosting").await;
        p["suspended_by_peer_at"].is_string().then_some(p)
    })
    .await;
    assert_eq!(
        shown["state"], "active",
        "the customer did not suspend anyone: {shown}"
    );
    let audit = timeline(&customer, "aramaki").await;
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["kind"] == "peer.suspended_us")
            .count(),
        1,
        "on the timeline once, however often it dials: {audit:?}"
    );
    let (status, _) = hosting
        .post("/api/v1/peers/customer/resume", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    crate::federation_links::linked(&hosting, &customer).await;
    eventually("the suspension to be over on the customer", || async {
        peer_info(&customer, "hosting").await["suspended_by_peer_at"]
            .is_null()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_oversized_frames_is_counted_logged_once_and_keeps_the_link() {
    let net = Arc::new(MemoryNet::default());
    let customer = instance("customer", &net).await;
    let mut m = Mallory::link(&net, &customer, 52).await;
    let large = refusals(&customer, "too_large");
    let lines = customer.ctx.federation.refusal_lines();
    let frame = "x".repeat(aramaki::federation::envelope::MAX_ENVELOPE_BYTES + 1);
    for _ in 0..60 {
        m.send_raw(frame.clone()).await;
    }
    let nack = m.next(&customer, "link.nack").await;
    assert_eq!(nack.body["from"], 1, "told where to resume");
    eventually("every refused frame to be counted", || async {
        (refusals(&customer, "too_large") == large + 60).then_some(())
    })
    .await;
    assert_eq!(
        customer.ctx.federation.refusal_lines(),
        lines + 1,
        "one WARN line for the burst"
    );
    // The link is still up: a good message is committed and acknowledged.
    m.send(&customer, 1, "status", json!({})).await;
    m.acked(&customer, 1).await;
}

/// Over a real WebSocket: a frame over the envelope limit (but not over
/// the transport's) is refused by the link, which stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_on_a_websocket_is_refused_without_closing_the_link() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let customer = TestApp::start_reachable("customer").await;
    let id = uuid::Uuid::now_v7().to_string();
    let me = Identity::new(
        id.clone(),
        "mallory".into(),
        SigningKey::from_bytes(&[53; 32]),
    );
    sqlx::query("INSERT INTO peers (instance_id, name, url, public_key, state, created_at, updated_at) VALUES ($1, 'mallory', 'http://mallory.invalid', $2, 'active', $3, $3)")
        .bind(id.as_str())
        .bind(me.public_key_hex())
        .bind(now(&customer))
        .execute(customer.ctx.db.reader())
        .await
        .unwrap();
    let to = customer.ctx.identity.instance_id.clone();
    let (mut ws, _) = tokio_tungstenite::connect_async(connect_url(&customer.base))
        .await
        .unwrap();
    let hello = seal(
        &me,
        &to,
        "link.hello",
        json!({"cursor": 0, "keys": []}),
        now(&customer),
        MINUTE,
    );
    ws.send(Message::Text(serde_json::to_string(&hello).unwrap().into()))
        .await
        .unwrap();
    let kind_of = |m: Message| -> String {
        let v: Value = serde_json::from_str(m.to_text().unwrap_or("{}")).unwrap_or_default();
        v["type"].as_str().unwrap_or_default().to_owned()
    };
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains(&"link.welcome".to_owned()) {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a welcome in time");
        seen.push(kind_of(m.expect("open").expect("a frame")));
    }
    let large = refusals(&customer, "too_large");
    ws.send(Message::Text(
        "x".repeat(aramaki::federation::envelope::MAX_ENVELOPE_BYTES + 4096)
            .into(),
    ))
    .await
    .unwrap();
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a nack in time")
            .expect("the link stays open")
            .expect("a frame");
        if kind_of(m) == "link.nack" {
            break;
        }
    }
    assert_eq!(refusals(&customer, "too_large"), large + 1);
}

async fn instance_with(
    name: &str,
    net: &Arc<MemoryNet>,
    tweak: impl FnOnce(&mut aramaki::config::Config),
) -> TestApp {
    let app = TestApp::start_reachable_with(name, tweak).await;
    app.ctx.federation.set_transport(net.clone());
    net.attach(&app.base, app.ctx.clone());
    app
}

async fn count(app: &TestApp, sql: &str, peer: &str) -> i64 {
    use sqlx::Row;
    sqlx::query(sql)
        .bind(peer)
        .fetch_one(app.ctx.db.reader())
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_requests_beyond_the_quota_are_refused_signed_and_store_nothing() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance_with("hosting", &net, |c| {
        c.federation.max_use_requests_per_hour = 5;
        c.federation.max_open_uses_per_peer = 3;
    })
    .await;
    let mut m = Mallory::link(&net, &hosting, 54).await;
    let request = |n: usize| json!({"use": uuid::Uuid::now_v7().to_string(), "system": format!("missing-{n}"), "level": "status"});
    for seq in 1..=12 {
        m.send(&hosting, seq, "use.request", request(seq as usize))
            .await;
    }
    let mut answers = Vec::new();
    while answers.len() < 12 {
        answers.push(m.next(&hosting, "use.rejected").await);
    }
    let over: Vec<&Envelope> = answers
        .iter()
        .filter(|a| a.body["data"]["quota"] == true)
        .collect();
    assert_eq!(over.len(), 7, "every request is answered, signed");
    assert!(
        over[0].body["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 5 (federation.max_use_requests_per_hour)"),
        "{:?}",
        over[0].body
    );
    let stored = "SELECT COUNT(*) FROM uses WHERE peer_id = $1";
    assert_eq!(
        count(&hosting, stored, &m.id).await,
        5,
        "only those within the quota are kept"
    );
    let audited =
        "SELECT COUNT(*) FROM events WHERE kind = 'federation.use_rejected' AND actor_id = $1";
    assert_eq!(count(&hosting, audited, &m.id).await, 5, "and audited");
    assert_eq!(refusals(&hosting, "quota"), 7);

    // An hour later (by the instance's clock) more are taken, as many as
    // may be open at once (requests for a system that lives here wait).
    hosting.system("storage", "service", json!({})).await;
    hosting
        .clock
        .advance(jiff::SignedDuration::from_secs(3_601));
    for seq in 13..=17 {
        let ask = json!({"use": uuid::Uuid::now_v7().to_string(), "system": "storage", "level": "status"});
        m.send(&hosting, seq, "use.request", ask).await;
    }
    m.acked(&hosting, 17).await;
    let open = "SELECT COUNT(*) FROM uses WHERE peer_id = $1 AND state = 'pending'";
    assert_eq!(
        count(&hosting, open, &m.id).await,
        3,
        "at most max_open_uses_per_peer"
    );
    assert_eq!(count(&hosting, stored, &m.id).await, 8);
    assert_eq!(refusals(&hosting, "quota"), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_charged_by_their_work_until_the_clock_refills_it() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance_with("hosting", &net, |c| {
        c.federation.max_work_per_second = 10;
    })
    .await;
    let mut m = Mallory::link(&net, &hosting, 55).await;
    // Each request costs four rows: the burst (twice the rate) takes five,
    // though twenty frames are well within the message rate.
    for seq in 1..=20 {
        let data = json!({"use": uuid::Uuid::now_v7().to_string(), "system": format!("missing-{seq}"), "level": "status"});
        m.send(&hosting, seq, "use.request", data).await;
    }
    let nack = m.next(&hosting, "link.nack").await;
    let from = nack.body["from"].as_i64().unwrap();
    assert!((2..=7).contains(&from), "{:?}", nack.body);
    eventually("the costly rest to be refused", || async {
        (refusals(&hosting, "work") >= 1).then_some(())
    })
    .await;
    assert_eq!(
        refusals(&hosting, "rate"),
        0,
        "not for the number of frames"
    );
    let stored = "SELECT COUNT(*) FROM uses WHERE peer_id = $1";
    assert_eq!(count(&hosting, stored, &m.id).await, from - 1);
    hosting.clock.advance(jiff::SignedDuration::from_secs(10));
    let data = json!({"use": uuid::Uuid::now_v7().to_string(), "system": "missing-again", "level": "status"});
    m.send(&hosting, from, "use.request", data).await;
    m.acked(&hosting, from).await;
}

/// Every item of a federation list, read `limit` at a time through `next`.
async fn all_pages(
    app: &TestApp,
    path: &str,
    limit: usize,
    key: impl Fn(&Value) -> String,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut url = format!("{path}{sep}limit={limit}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page = app.get(&url).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit, "{page}");
        out.extend(items.iter().map(&key));
        match page["next"].as_str() {
            Some(n) => cursor = Some(n.to_owned()),
            None => return out,
        }
    }
    panic!("no last page");
}

both!(federation_lists_come_in_pages, |app| async move {
    let t = aramaki::db::to_micros(app.ctx.now());
    let storage = app.system("storage", "service", json!({})).await;
    let billing = app.system("billing", "service", json!({})).await;
    let mut peers = Vec::new();
    for (i, name) in ["delta", "alpha", "echo", "bravo", "charlie"]
        .iter()
        .enumerate()
    {
        let id = uuid::Uuid::now_v7().to_string();
        let key = Identity::new(
            id.clone(),
            (*name).into(),
            SigningKey::from_bytes(&[60 + i as u8; 32]),
        );
        sqlx::query("INSERT INTO peers (instance_id, name, url, public_key, state, created_at, updated_at) VALUES ($1, $2, 'http://p.invalid', $3, 'active', $4, $4)")
            .bind(id.as_str())
            .bind(*name)
            .bind(key.public_key_hex())
            .bind(t)
            .execute(app.ctx.db.reader())
            .await
            .unwrap();
        peers.push(id);
    }
    let mut uses = Vec::new();
    for n in 0..7i64 {
        let id = uuid::Uuid::now_v7().to_string();
        let peer = &peers[n as usize % 5];
        let state = if n % 2 == 0 { "pending" } else { "rejected" };
        // Two uses at the same time: the page order still holds.
        sqlx::query("INSERT INTO uses (peer_id, id, role, system_slug, state, level, requested_by, created_at, updated_at) VALUES ($1, $2, 'provider', 'storage', $3, 'status', 'x', $4, $4)")
            .bind(peer.as_str())
            .bind(id.as_str())
            .bind(state)
            .bind(t + n / 2)
            .execute(app.ctx.db.reader())
            .await
            .unwrap();
        uses.push(id);
    }
    for (system, peer) in [
        (&storage, &peers[0]),
        (&storage, &peers[1]),
        (&billing, &peers[2]),
    ] {
        sqlx::query("INSERT INTO use_policies (system_id, peer_id, level, created_at) VALUES ($1, $2, 'status', $3)")
            .bind(system["id"].as_str().unwrap())
            .bind(peer.as_str())
            .bind(t)
            .execute(app.ctx.db.reader())
            .await
            .unwrap();
    }

    let names = all_pages(&app, "/api/v1/peers", 2, |p| {
        p["name"].as_str().unwrap().to_owned()
    })
    .await;
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta", "echo"]);
    let mut listed = all_pages(&app, "/api/v1/uses", 3, |u| {
        u["id"].as_str().unwrap().to_owned()
    })
    .await;
    assert_eq!(listed.len(), 7, "each once: {listed:?}");
    listed.sort();
    let mut expected = uses.clone();
    expected.sort();
    assert_eq!(listed, expected);
    let pending = all_pages(&app, "/api/v1/uses?state=pending", 1, |u| {
        u["state"].as_str().unwrap().to_owned()
    })
    .await;
    assert_eq!(pending, vec!["pending"; 4]);
    let policies = all_pages(&app, "/api/v1/policies", 2, |p| {
        format!(
            "{} {}",
            p["system"].as_str().unwrap(),
            p["peer_name"].as_str().unwrap()
        )
    })
    .await;
    assert_eq!(policies.len(), 3, "{policies:?}");
    assert_eq!(policies[0], "billing echo");

    for (path, problem) in [
        ("/api/v1/peers?limit=0", "limit must be between 1 and 500"),
        ("/api/v1/uses?limit=501", "limit must be between 1 and 500"),
        ("/api/v1/peers?cursor=nobody", "invalid cursor 'nobody'"),
        ("/api/v1/uses?cursor=nobody", "invalid cursor 'nobody'"),
        ("/api/v1/uses?cursor=a/b", "invalid cursor 'a/b'"),
        ("/api/v1/policies?cursor=nobody", "invalid cursor 'nobody'"),
        ("/api/v1/uses?state=sleeping", "state 'sleeping' is none of"),
    ] {
        let (status, v) = app.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or_default().contains(problem),
            "{path}: {v}"
        );
    }
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_ids_are_kept_until_their_envelope_expires_and_no_longer() {
    let net = Arc::new(MemoryNet::default());
    let customer = instance("customer", &net).await;
    let mut m = Mallory::link(&net, &customer, 56).await;
    let t = now(&customer);
    // A message meant to live a day (its id would be kept a day) is refused.
    let lasting = seal(
        &m.me,
        &m.to,
        "status",
        json!({"seq": 1, "data": {}}),
        t,
        24 * 60 * MINUTE,
    );
    m.send_raw(serde_json::to_string(&lasting).unwrap()).await;
    let nack = m.next(&customer, "link.nack").await;
    assert_eq!(nack.body["from"], 1);
    assert_eq!(refusals(&customer, "lifetime"), 1);
    m.send(&customer, 1, "status", json!({})).await;
    m.acked(&customer, 1).await;
    let longest = "SELECT MAX(expires_at) FROM federation_seen WHERE issuer = $1";
    let kept = count(&customer, longest, &m.id).await;
    let skew = aramaki::federation::envelope::MAX_SKEW_MICROS;
    assert!(kept <= t + MINUTE + skew, "kept until {kept}, sent at {t}");
    // Once they expired, the sweep forgets them.
    customer
        .clock
        .advance(jiff::SignedDuration::from_secs(3_600));
    aramaki::federation::link::sweep(&customer.ctx)
        .await
        .unwrap();
    let left = "SELECT COUNT(*) FROM federation_seen WHERE issuer = $1";
    assert_eq!(count(&customer, left, &m.id).await, 0);
}

/// SQLite only, like the test above: restored, the customer has not sent
/// anything yet, so only the hosting's cursor (beyond the customer's last
/// number) shows that its numbering went back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_instance_is_detected_by_a_cursor_beyond_its_numbers() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    peer(&hosting, &customer).await;
    let (hosting_id, customer_id) = (
        hosting.ctx.identity.instance_id.clone(),
        customer.ctx.identity.instance_id.clone(),
    );
    hosting.system("billing", "service", json!({})).await;
    let saved = backup(&customer, &hosting_id).await;
    let (_, ghost) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "ghost"}))
        .await;
    wait_use(&customer, ghost["id"].as_str().unwrap(), "rejected").await;
    net.cut(&customer.base);
    eventually("the link to drop", || async {
        (!hosting.ctx.federation.connected(&customer_id)
            && !customer.ctx.federation.connected(&hosting_id))
        .then_some(())
    })
    .await;
    restore(&customer, &hosting_id, &saved).await;
    net.heal(&customer.base);
    crate::federation_links::linked(&hosting, &customer).await;
    let p = eventually("the customer to notice", || async {
        let p = peer_info(&customer, "hosting").await;
        p["resync_reason"].is_string().then_some(p)
    })
    .await;
    assert!(
        p["resync_reason"]
            .as_str()
            .unwrap()
            .contains("which numbered only 0"),
        "{p}"
    );
    // What it sends now is not taken for a redelivery.
    let (status, billing) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "billing"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{billing}");
    wait_use(&hosting, billing["id"].as_str().unwrap(), "pending").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_mirror_more_systems_here_than_allowed() {
    let net = Arc::new(MemoryNet::default());
    let customer = instance_with("customer", &net, |c| {
        c.federation.max_mirrors_per_peer = 2;
    })
    .await;
    let mut m = Mallory::link(&net, &customer, 57).await;
    let (_, asked) = customer
        .post("/api/v1/peers/mallory/uses", json!({"system": "vault"}))
        .await;
    let use_id = asked["id"].as_str().unwrap().to_owned();
    m.next(&customer, "use.request").await;
    m.send(
        &customer,
        1,
        "use.accepted",
        json!({"use": use_id, "exposure": {"level": "status"}}),
    )
    .await;
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let three = [
        system(&ids[0], "vault", &m.id),
        system(&ids[1], "vault-a", &m.id),
        system(&ids[2], "vault-b", &m.id),
    ];
    let edges = json!([[ids[0], ids[1]], [ids[0], ids[2]]]);
    m.send(
        &customer,
        2,
        "system.snapshot",
        snapshot(&use_id, &ids[0], &three, edges),
    )
    .await;
    m.send(
        &customer,
        3,
        "system.snapshot",
        snapshot(&use_id, &ids[0], &three[..2], json!([[ids[0], ids[1]]])),
    )
    .await;
    m.acked(&customer, 3).await;
    assert_eq!(
        refusals(&customer, "not_allowed"),
        1,
        "the snapshot of three is refused whole"
    );
    assert_eq!(
        mirrors_of(&customer, &m.id).await,
        vec![
            ("vault".to_owned(), ids[0].clone()),
            ("vault-a".to_owned(), ids[1].clone())
        ]
    );
}
