//! Three instances in one process, each with its own Context and database,
//! their links wired through an in-memory transport: use relations,
//! propagation, routing, revocation, key rotation, and every refusal.

use std::sync::Arc;

use aramaki::federation::link::{connect_url, MemoryNet, TlsPin, Transport};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::agent_e2e::eventually;
use crate::support::TestApp;

/// The in-memory network has no TLS: any pin will do.
pub(crate) const ANY_PIN: TlsPin = TlsPin {
    key: [0; 32],
    strict: false,
};

/// An instance on the shared in-memory network.
pub(crate) async fn instance(name: &str, net: &Arc<MemoryNet>) -> TestApp {
    let app = TestApp::start_reachable(name).await;
    app.ctx.federation.set_transport(net.clone());
    net.attach(&app.base, app.ctx.clone());
    app
}

/// `joiner` joins `inviter`, who approves.
pub(crate) async fn peer(inviter: &TestApp, joiner: &TestApp) {
    let (status, issued) = inviter.post("/api/v1/peers/invites", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let (status, v) = joiner
        .post(
            "/api/v1/peers/join",
            json!({"invite": issued["invite"].clone()}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = inviter
        .post(
            &format!("/api/v1/peers/{}/approve", joiner.ctx.identity.name),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    linked(inviter, joiner).await;
}

pub(crate) async fn linked(a: &TestApp, b: &TestApp) {
    let (aid, bid) = (
        a.ctx.identity.instance_id.clone(),
        b.ctx.identity.instance_id.clone(),
    );
    eventually("the link to come up", || async {
        (a.ctx.federation.connected(&bid) && b.ctx.federation.connected(&aid)).then_some(())
    })
    .await;
}

pub(crate) async fn uses(app: &TestApp) -> Vec<Value> {
    app.get("/api/v1/uses").await["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn use_state(app: &TestApp, id: &str) -> Option<String> {
    uses(app)
        .await
        .into_iter()
        .find(|u| u["id"] == id)
        .and_then(|u| u["state"].as_str().map(str::to_owned))
}

pub(crate) async fn wait_use(app: &TestApp, id: &str, state: &str) -> Value {
    eventually(
        &format!("use {id} to be {state} on {}", app.ctx.identity.name),
        || async {
            uses(app)
                .await
                .into_iter()
                .find(|u| u["id"] == id && u["state"] == state)
        },
    )
    .await
}

pub(crate) async fn timeline(app: &TestApp, slug: &str) -> Vec<Value> {
    let (status, v) = app
        .call(
            Method::GET,
            &format!("/api/v1/systems/{slug}/timeline?limit=200"),
            None,
        )
        .await;
    if status != StatusCode::OK {
        return Vec::new();
    }
    v["items"].as_array().cloned().unwrap_or_default()
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

pub(crate) async fn record(
    app: &TestApp,
    system: &str,
    kind: &str,
    title: &str,
    severity: &str,
) -> Value {
    let (status, v) = app
        .post(
            "/api/v1/events",
            json!({"system": system, "kind": kind, "title": title, "severity": severity}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

/// How many events on `app` came from instance `origin`.
async fn events_from(app: &TestApp, origin: &str) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM events WHERE origin = $1")
        .bind(origin)
        .fetch_one(app.ctx.db.reader())
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn using_a_remote_system_propagates_exactly_its_activity() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    let other = instance("other", &net).await;
    peer(&hosting, &customer).await;
    peer(&hosting, &other).await;
    let hosting_id = hosting.ctx.identity.instance_id.clone();

    hosting.system("storage", "infrastructure", json!({})).await;
    hosting.system("storage-node1", "host", json!({})).await;
    hosting.system("billing", "service", json!({})).await;
    assert_eq!(
        hosting.include("storage", "storage-node1").await.0,
        StatusCode::CREATED
    );
    record(
        &hosting,
        "storage",
        "deploy",
        "storage 1.0 before anyone used it",
        "info",
    )
    .await;

    // The customer asks to use storage; the hosting admin decides.
    let (status, asked) = customer
        .post(
            "/api/v1/peers/hosting/uses",
            json!({"system": "storage", "level": "timeline"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let use_id = asked["id"].as_str().unwrap().to_owned();
    assert_eq!(asked["state"], "requested");
    let (status, twice) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "storage"}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "one open request per system: {twice}"
    );
    let pending = wait_use(&hosting, &use_id, "pending").await;
    assert_eq!(pending["role"], "provider");
    assert_eq!(pending["local_system"], "storage");
    assert!(kinds(&timeline(&hosting, "storage").await)
        .contains(&"federation.use_requested".to_owned()));
    assert!(kinds(&timeline(&customer, "aramaki").await)
        .contains(&"federation.use_requested".to_owned()));

    // Rejections: by the admin, and at once for a system that is not there.
    let (_, other_ask) = other
        .post(
            "/api/v1/peers/hosting/uses",
            json!({"system": "billing", "level": "status"}),
        )
        .await;
    let billing_use = other_ask["id"].as_str().unwrap().to_owned();
    let (_, ghost) = other
        .post("/api/v1/peers/hosting/uses", json!({"system": "ghost"}))
        .await;
    let ghost_use = ghost["id"].as_str().unwrap().to_owned();
    wait_use(&other, &ghost_use, "rejected").await;
    wait_use(&hosting, &billing_use, "pending").await;
    let (status, v) = hosting
        .post(
            &format!("/api/v1/uses/{billing_use}/reject"),
            json!({"reason": "not for sale"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_use(&other, &billing_use, "rejected").await;
    let rejected = timeline(&other, "aramaki").await;
    assert!(
        rejected
            .iter()
            .any(|e| e["kind"] == "federation.use_rejected"
                && e["title"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("not for sale")),
        "the reason travels: {rejected:?}"
    );

    // Accepted: storage and what it includes appear on the customer, read-only.
    let (status, v) = hosting
        .post(&format!("/api/v1/uses/{use_id}/accept"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_use(&customer, &use_id, "accepted").await;
    let mirror = eventually("the mirror of storage", || async {
        let (status, v) = customer
            .call(Method::GET, "/api/v1/systems/storage", None)
            .await;
        (status == StatusCode::OK).then_some(v)
    })
    .await;
    assert_eq!(mirror["instance"], hosting_id, "marked with its origin");
    assert_eq!(mirror["title"], "STORAGE");
    let node = eventually("the mirror of storage-node1", || async {
        let (status, v) = customer
            .call(Method::GET, "/api/v1/systems/storage-node1", None)
            .await;
        (status == StatusCode::OK).then_some(v)
    })
    .await;
    assert_eq!(node["instance"], hosting_id);
    let subs = customer.get("/api/v1/systems/storage/subsystems").await;
    assert!(
        subs.to_string().contains("storage-node1"),
        "the structure comes along: {subs}"
    );
    let history = timeline(&customer, "storage").await;
    assert!(
        history.iter().any(|e| e["title"] == "storage 1.0 before anyone used it" && e["origin"] == hosting_id),
        "recent history comes with the snapshot: {history:?}"
    );
    let (status, v) = customer
        .call(
            Method::PATCH,
            "/api/v1/systems/storage",
            Some(json!({"title": "mine"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["code"], "remote_system");
    let (status, v) = customer
        .post(
            "/api/v1/events",
            json!({"system": "storage", "kind": "note", "title": "forged"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "only the primary records on it: {v}"
    );

    // The customer's own project includes the remote storage.
    customer.system("shop", "project", json!({})).await;
    assert_eq!(
        customer.include("shop", "storage").await.0,
        StatusCode::CREATED
    );

    // The other instance uses billing, status only (accepted by a policy).
    let (status, v) = hosting
        .call(
            Method::PUT,
            "/api/v1/peers/other/policies",
            Some(json!({"system": "billing", "level": "status"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (_, again) = other
        .post(
            "/api/v1/peers/hosting/uses",
            json!({"system": "billing", "level": "timeline"}),
        )
        .await;
    let billing_use = again["id"].as_str().unwrap().to_owned();
    let accepted = wait_use(&other, &billing_use, "accepted").await;
    assert_eq!(
        accepted["exposure"]["level"], "status",
        "the policy caps the exposure"
    );
    eventually("the mirror of billing", || async {
        let (status, _) = other
            .call(Method::GET, "/api/v1/systems/billing", None)
            .await;
        (status == StatusCode::OK).then_some(())
    })
    .await;

    // Activity: each goes to the users of its system, and nowhere else.
    let other_before = events_from(&other, &hosting_id).await;
    record(
        &hosting,
        "storage-node1",
        "state",
        "disk failing",
        "critical",
    )
    .await;
    record(&hosting, "storage", "deploy", "storage 1.1", "info").await;
    record(&hosting, "billing", "deploy", "billing 7", "info").await;
    record(&hosting, "billing", "state", "billing down", "critical").await;
    eventually("storage's activity on the customer, rolled up", || async {
        let shop = timeline(&customer, "shop").await;
        let titles: Vec<&str> = shop.iter().filter_map(|e| e["title"].as_str()).collect();
        (titles.contains(&"disk failing") && titles.contains(&"storage 1.1")).then_some(())
    })
    .await;
    let shop = timeline(&customer, "shop").await;
    let failing = shop.iter().find(|e| e["title"] == "disk failing").unwrap();
    assert_eq!(failing["origin"], hosting_id, "events show their origin");
    assert_eq!(failing["system"], "storage-node1");
    let status = customer.get("/api/v1/systems/shop/status").await;
    assert_eq!(
        status["worst"], "critical",
        "remote status rolls up: {status}"
    );
    eventually("billing's status on the other instance", || async {
        let s = other.get("/api/v1/systems/billing/status").await;
        (s["worst"] == "critical").then_some(())
    })
    .await;

    // Make sure everything queued was delivered before counting.
    eventually("the outboxes to drain", || async {
        let peers = hosting.get("/api/v1/peers").await;
        peers["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["backlog"] == 0)
            .then_some(())
    })
    .await;
    let customer_titles: Vec<String> = sqlx_titles(&customer, &hosting_id).await;
    assert!(
        !customer_titles.iter().any(|t| t.contains("billing")),
        "the customer uses only storage and hears nothing about billing: {customer_titles:?}"
    );
    assert_eq!(
        events_from(&other, &hosting_id).await,
        other_before,
        "status only: no timeline events reach the other instance"
    );
    let other_titles = sqlx_titles(&other, &hosting_id).await;
    assert!(!other_titles
        .iter()
        .any(|t| t.contains("storage") || t.contains("disk")));

    // Excluded from storage on its instance, the node is no longer mirrored.
    let (status, v) = hosting
        .call(
            Method::DELETE,
            "/api/v1/systems/storage/subsystems/storage-node1",
            None,
        )
        .await;
    assert!(status.is_success(), "{v}");
    eventually("the node's mirror to go", || async {
        let (status, _) = customer
            .call(Method::GET, "/api/v1/systems/storage-node1", None)
            .await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    let (status, _) = customer
        .call(Method::GET, "/api/v1/systems/storage", None)
        .await;
    assert_eq!(status, StatusCode::OK, "storage itself stays");

    // Undo: the relation ends on both sides, the mirrors go, activity stops.
    let (status, v) = customer
        .post(&format!("/api/v1/uses/{use_id}/undo"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["state"], "ended");
    wait_use(&hosting, &use_id, "ended").await;
    assert!(
        kinds(&timeline(&hosting, "storage").await).contains(&"federation.use_ended".to_owned())
    );
    let (status, _) = customer
        .call(Method::GET, "/api/v1/systems/storage", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let before = events_from(&customer, &hosting_id).await;
    record(&hosting, "storage", "deploy", "storage 1.2", "info").await;
    // Routing runs in order: once a later change reached the other
    // instance, storage 1.2 was routed too (to no one).
    record(&hosting, "billing", "state", "billing back", "ok").await;
    eventually("billing's recovery on the other instance", || async {
        let s = other.get("/api/v1/systems/billing/status").await;
        (s["worst"] == "ok").then_some(())
    })
    .await;
    let peers = hosting.get("/api/v1/peers").await;
    let to_customer = peers["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "customer")
        .unwrap()
        .clone();
    assert_eq!(
        to_customer["backlog"], 0,
        "nothing queued for a former user: {to_customer}"
    );
    assert_eq!(events_from(&customer, &hosting_id).await, before);
}

pub(crate) async fn sqlx_titles(app: &TestApp, origin: &str) -> Vec<String> {
    use sqlx::Row;
    sqlx::query("SELECT title FROM events WHERE origin = $1")
        .bind(origin)
        .fetch_all(app.ctx.db.reader())
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get(0).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_closes_the_link_and_revocation_ends_the_uses() {
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
    let use_id = asked["id"].as_str().unwrap().to_owned();
    wait_use(&customer, &use_id, "accepted").await;

    let customer_id = customer.ctx.identity.instance_id.clone();
    let (status, _) = hosting
        .post("/api/v1/peers/customer/suspend", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !hosting.ctx.federation.connected(&customer_id),
        "closed at once"
    );
    // While suspended, activity waits; nothing reaches the customer.
    record(
        &hosting,
        "storage",
        "deploy",
        "during the suspension",
        "info",
    )
    .await;
    let refused_before = hosting
        .ctx
        .federation
        .refusals()
        .get("peer_blocked")
        .copied()
        .unwrap_or(0);
    eventually("the customer's dial to be refused", || async {
        let now = hosting
            .ctx
            .federation
            .refusals()
            .get("peer_blocked")
            .copied()
            .unwrap_or(0);
        (now > refused_before).then_some(())
    })
    .await;
    assert!(!sqlx_titles(&customer, &hosting.ctx.identity.instance_id)
        .await
        .contains(&"during the suspension".to_owned()));
    // Resumed: the link returns and what waited is delivered.
    let (status, _) = hosting
        .post("/api/v1/peers/customer/resume", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("delivery after resuming", || async {
        sqlx_titles(&customer, &hosting.ctx.identity.instance_id)
            .await
            .contains(&"during the suspension".to_owned())
            .then_some(())
    })
    .await;

    let (status, _) = hosting
        .post("/api/v1/peers/customer/revoke", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!hosting.ctx.federation.connected(&customer_id));
    assert_eq!(use_state(&hosting, &use_id).await.as_deref(), Some("ended"));
    let (status, v) = hosting
        .post("/api/v1/peers/customer/resume", json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "revoked is final: {v}");
    // The customer, dialing again, is told (signed) and ends its side too.
    wait_use(&customer, &use_id, "ended").await;
    let peers = customer.get("/api/v1/peers").await;
    assert_eq!(peers["items"][0]["state"], "revoked", "{peers}");
    let (status, _) = customer
        .call(Method::GET, "/api/v1/systems/storage", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the mirror is gone");

    // Peering again with a new invite starts afresh on both sides: the
    // old use is over there too, and activity flows from sequence one.
    peer(&hosting, &customer).await;
    assert_eq!(
        use_state(&customer, &use_id).await.as_deref(),
        Some("ended")
    );
    let (status, asked) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "storage"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let again = asked["id"].as_str().unwrap().to_owned();
    wait_use(&hosting, &again, "pending").await;
    let (status, v) = hosting
        .post(&format!("/api/v1/uses/{again}/accept"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_use(&customer, &again, "accepted").await;
    record(&hosting, "storage", "deploy", "after peering again", "info").await;
    eventually("delivery after peering again", || async {
        sqlx_titles(&customer, &hosting.ctx.identity.instance_id)
            .await
            .contains(&"after peering again".to_owned())
            .then_some(())
    })
    .await;
}

/// Hosting, customer and a third peer; customer uses hosting's storage.
async fn using_storage(net: &Arc<MemoryNet>) -> (TestApp, TestApp, TestApp) {
    let hosting = instance("hosting", net).await;
    let customer = instance("customer", net).await;
    let third = instance("third", net).await;
    peer(&hosting, &customer).await;
    peer(&hosting, &third).await;
    hosting.system("storage", "infrastructure", json!({})).await;
    for who in ["customer", "third"] {
        let (status, v) = hosting
            .call(
                Method::PUT,
                &format!("/api/v1/peers/{who}/policies"),
                Some(json!({"system": "storage", "level": "timeline"})),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    }
    for app in [&customer, &third] {
        let (_, asked) = app
            .post("/api/v1/peers/hosting/uses", json!({"system": "storage"}))
            .await;
        wait_use(app, asked["id"].as_str().unwrap(), "accepted").await;
    }
    (hosting, customer, third)
}

fn peer_row(peers: &Value, name: &str) -> Value {
    peers["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no peer {name}: {peers}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_away_for_days_is_marked_unreachable_and_catches_up_while_others_flow() {
    let net = Arc::new(MemoryNet::default());
    let (hosting, customer, third) = using_storage(&net).await;
    let customer_id = customer.ctx.identity.instance_id.clone();

    // The customer drops off the network (it can neither be reached nor
    // reach anyone); the third peer stays.
    customer
        .ctx
        .federation
        .set_transport(Arc::new(MemoryNet::default()));
    net.cut(&customer.base);
    eventually("the link to the customer to drop", || async {
        (!hosting.ctx.federation.connected(&customer_id)).then_some(())
    })
    .await;
    linked(&hosting, &third).await;
    let titles: Vec<String> = (0..5).map(|i| format!("while away {i}")).collect();
    for t in &titles {
        record(&hosting, "storage", "deploy", t, "info").await;
    }
    // One dead peer does not hold up the others.
    eventually("the third peer to hear at once", || async {
        let seen = sqlx_titles(&third, &hosting.ctx.identity.instance_id).await;
        titles.iter().all(|t| seen.contains(t)).then_some(())
    })
    .await;

    // Three days later (by both clocks) the sweep marks it, with its lag.
    for app in [&hosting, &customer, &third] {
        app.clock.advance(jiff::SignedDuration::from_hours(73));
    }
    aramaki::federation::link::sweep(&hosting.ctx)
        .await
        .unwrap();
    let peers = hosting.get("/api/v1/peers").await;
    let away = peer_row(&peers, "customer");
    assert_eq!(away["state"], "unreachable", "{away}");
    assert!(away["backlog"].as_i64().unwrap() >= 5, "{away}");
    assert!(
        away["lag_seconds"].as_i64().unwrap() >= 72 * 3_600,
        "{away}"
    );
    assert_eq!(
        peer_row(&peers, "third")["state"],
        "active",
        "linked, so not swept"
    );

    // Back: it catches up from its cursor, in order, and is active again.
    customer.ctx.federation.set_transport(net.clone());
    net.heal(&customer.base);
    let got = eventually("the customer to catch up", || async {
        let got: Vec<String> = timeline(&customer, "storage")
            .await
            .iter()
            .rev()
            .filter_map(|e| e["title"].as_str().map(str::to_owned))
            .filter(|t| t.starts_with("while away"))
            .collect();
        (got.len() >= titles.len()).then_some(got)
    })
    .await;
    assert_eq!(got, titles, "in order, once each");
    eventually("the customer to be active again", || async {
        let peers = hosting.get("/api/v1/peers").await;
        (peer_row(&peers, "customer")["state"] == "active").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_that_leaves_by_its_labels_is_no_longer_mirrored() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    peer(&hosting, &customer).await;
    let (status, v) = hosting
        .post(
            "/api/v1/systems",
            json!({"slug": "all-storage", "title": "All storage", "category": "infrastructure", "selector": "role=storage"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    hosting
        .system("st1", "host", json!({"role": "storage"}))
        .await;
    hosting
        .system("st2", "host", json!({"role": "storage"}))
        .await;
    let (status, v) = hosting
        .call(
            Method::PUT,
            "/api/v1/peers/customer/policies",
            Some(json!({"system": "all-storage", "level": "timeline"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (_, asked) = customer
        .post(
            "/api/v1/peers/hosting/uses",
            json!({"system": "all-storage"}),
        )
        .await;
    wait_use(&customer, asked["id"].as_str().unwrap(), "accepted").await;
    let mirrored = |slug: &'static str| {
        let customer = &customer;
        async move {
            customer
                .call(Method::GET, &format!("/api/v1/systems/{slug}"), None)
                .await
                .0
                == StatusCode::OK
        }
    };
    eventually("both hosts mirrored", || async {
        (mirrored("st1").await && mirrored("st2").await).then_some(())
    })
    .await;
    let (status, v) = hosting
        .call(
            Method::PATCH,
            "/api/v1/systems/st1",
            Some(json!({"labels": {"role": "retired"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    eventually("st1's mirror to go", || async {
        (!mirrored("st1").await).then_some(())
    })
    .await;
    assert!(mirrored("st2").await, "st2 still belongs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_is_followed_by_peers_and_the_old_one_is_refused() {
    let net = Arc::new(MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    peer(&hosting, &customer).await;
    let old_key = hosting.ctx.identity.public_key_hex();
    let old_identity = aramaki::federation::identity::Identity::new(
        hosting.ctx.identity.instance_id.clone(),
        "hosting".into(),
        ed25519_dalek::SigningKey::from_bytes(
            &aramaki_protocol::keys::unhex_array::<32>(
                std::fs::read_to_string(hosting.ctx.data_dir.join("instance.key"))
                    .unwrap()
                    .trim(),
            )
            .unwrap(),
        ),
    );
    let (status, v) = hosting.post("/api/v1/instance/rotate-key", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let new_fp = v["fingerprint"].as_str().unwrap().to_owned();
    assert_eq!(new_fp, hosting.ctx.identity.fingerprint());
    assert_ne!(hosting.ctx.identity.public_key_hex(), old_key);

    let doc = hosting.get("/.well-known/aramaki").await;
    assert_eq!(doc["document"]["retired_keys"][0]["public_key"], old_key);

    // The link reopens; the customer walks the history and pins the new key.
    eventually("the customer to pin the new key", || async {
        let peers = customer.get("/api/v1/peers").await;
        (peers["items"][0]["fingerprint"] == new_fp).then_some(())
    })
    .await;
    linked(&hosting, &customer).await;
    assert!(kinds(&timeline(&customer, "aramaki").await).contains(&"peer.key_rotated".to_owned()));

    // A message signed with the old key is refused now.
    let before = customer
        .ctx
        .federation
        .refusals()
        .get("bad_signature")
        .copied()
        .unwrap_or(0);
    let forged = aramaki::federation::envelope::seal(
        &old_identity,
        &customer.ctx.identity.instance_id,
        "link.hello",
        json!({"cursor": 0, "keys": []}),
        aramaki::db::to_micros(customer.ctx.now()),
        60_000_000,
    );
    let mut conn = net
        .dial(&connect_url(&customer.base), ANY_PIN)
        .await
        .unwrap();
    conn.tx
        .send(serde_json::to_string(&forged).unwrap())
        .await
        .unwrap();
    assert!(conn.rx.recv().await.is_none(), "no welcome for the old key");
    assert_eq!(
        customer
            .ctx
            .federation
            .refusals()
            .get("bad_signature")
            .copied()
            .unwrap_or(0),
        before + 1
    );

    // And a restart keeps the rotated key and its history.
    assert!(!hosting.ctx.data_dir.join("instance.key.next").exists());
}

mod wire {
    //! The test speaks the link protocol itself, as a peer "mallory" that
    //! the customer pinned, to send what a real instance never would.

    use std::sync::Arc;
    use std::time::Duration;

    use aramaki::federation::envelope::{open, seal, Peer, PeerState};
    use aramaki::federation::identity::Identity;
    use aramaki::federation::link::{connect_url, Conn, MemoryNet, Transport};
    use aramaki_protocol::federation::Envelope;
    use ed25519_dalek::SigningKey;
    use reqwest::StatusCode;
    use serde_json::{json, Value};

    use super::{instance, timeline};
    use crate::agent_e2e::eventually;
    use crate::support::TestApp;

    const MINUTE: i64 = 60_000_000;

    fn now(app: &TestApp) -> i64 {
        aramaki::db::to_micros(app.ctx.now())
    }

    fn refusals(app: &TestApp, reason: &str) -> u64 {
        app.ctx
            .federation
            .refusals()
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    async fn dial(net: &MemoryNet, app: &TestApp) -> Conn {
        net.dial(&connect_url(&app.base), super::ANY_PIN)
            .await
            .unwrap()
    }

    async fn send(conn: &Conn, e: &Envelope) {
        conn.tx
            .send(serde_json::to_string(e).unwrap())
            .await
            .unwrap();
    }

    /// The next envelope of `kind` from the customer, checked against its key.
    async fn next(conn: &mut Conn, app: &TestApp, me: &str, kind: &str) -> Envelope {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let frame = tokio::time::timeout_at(deadline, conn.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {kind} in time"))
                .unwrap_or_else(|| panic!("the link closed while waiting for {kind}"));
            let key = app.ctx.identity.public_key();
            let id = app.ctx.identity.instance_id.clone();
            let opened = open(
                frame.as_bytes(),
                me,
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
            .expect("the customer's frames are valid");
            if opened.envelope.kind == kind {
                return opened.envelope;
            }
        }
    }

    /// A refused opening: the connection closes and the reason is counted.
    async fn refused_hello(net: &MemoryNet, app: &TestApp, e: &Envelope, reason: &str) {
        let before = refusals(app, reason);
        let mut conn = dial(net, app).await;
        send(&conn, e).await;
        assert!(conn.rx.recv().await.is_none(), "{reason}: no welcome");
        assert_eq!(refusals(app, reason), before + 1, "counted as {reason}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_sending_faster_than_allowed_is_refused_and_told_to_resend() {
        let net = Arc::new(MemoryNet::default());
        let customer = TestApp::start_reachable_with("customer", |c| {
            c.federation.max_messages_per_second = 5;
        })
        .await;
        customer.ctx.federation.set_transport(net.clone());
        net.attach(&customer.base, customer.ctx.clone());
        let to = customer.ctx.identity.instance_id.clone();
        let fast_id = uuid::Uuid::now_v7().to_string();
        let fast = Identity::new(
            fast_id.clone(),
            "fast".into(),
            SigningKey::from_bytes(&[44; 32]),
        );
        sqlx::query("INSERT INTO peers (instance_id, name, url, public_key, state, created_at, updated_at) VALUES ($1, 'fast', 'http://fast.invalid', $2, 'active', $3, $3)")
            .bind(fast_id.as_str())
            .bind(fast.public_key_hex())
            .bind(now(&customer))
            .execute(customer.ctx.db.reader())
            .await
            .unwrap();
        let mut conn = dial(&net, &customer).await;
        let hello = json!({"cursor": 0, "keys": []});
        send(
            &conn,
            &seal(&fast, &to, "link.hello", hello, now(&customer), MINUTE),
        )
        .await;
        next(&mut conn, &customer, &fast_id, "link.welcome").await;
        let status = |seq: i64| {
            seal(
                &fast,
                &to,
                "status",
                json!({"seq": seq, "data": {}}),
                now(&customer),
                MINUTE,
            )
        };
        // Five a second, ten in a burst: the rest of thirty are refused.
        let before = refusals(&customer, "rate");
        for seq in 1..=30 {
            send(&conn, &status(seq)).await;
        }
        let nack = next(&mut conn, &customer, &fast_id, "link.nack").await;
        assert!(
            nack.body["from"].as_i64().unwrap_or(0) <= 11,
            "{:?}",
            nack.body
        );
        eventually("the flood to be counted", || async {
            (refusals(&customer, "rate") >= before + 20).then_some(())
        })
        .await;
        // A second later (by the instance's clock) it may send again.
        customer.clock.advance(jiff::SignedDuration::from_secs(2));
        let resumed = refusals(&customer, "rate");
        let from = nack.body["from"].as_i64().unwrap();
        send(&conn, &status(from)).await;
        loop {
            let ack = next(&mut conn, &customer, &fast_id, "link.ack").await;
            if ack.body["upto"] == from {
                break;
            }
        }
        assert_eq!(
            refusals(&customer, "rate"),
            resumed,
            "not refused for its rate"
        );
    }

    fn system(id: &str, slug: &str, instance: &str) -> Value {
        json!({"id": id, "slug": slug, "title": slug.to_uppercase(), "category": "service", "description": "",
            "handbook": "", "labels": {}, "links": [], "contacts": [], "selector": null, "instance": instance,
            "version": 1, "created_at": "2026-11-23T08:00:00Z", "updated_at": "2026-11-23T08:00:00Z"})
    }

    fn event(id: &str, slug: &str, origin: &str, title: &str) -> Value {
        json!({"id": id, "sequence": 1, "system": slug, "occurred_at": "2026-11-23T08:00:00Z",
            "recorded_at": "2026-11-23T08:00:00Z", "kind": "deploy", "severity": "info", "title": title,
            "body": "", "actor": {"kind": "user", "id": null, "name": "ops"}, "data": {}, "origin": origin,
            "caused_by": null})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_bad_message_is_refused_and_counted() {
        let net = Arc::new(MemoryNet::default());
        let customer = instance("customer", &net).await;
        let to = customer.ctx.identity.instance_id.clone();
        let mallory_id = uuid::Uuid::now_v7().to_string();
        let mallory = Identity::new(
            mallory_id.clone(),
            "mallory".into(),
            SigningKey::from_bytes(&[42; 32]),
        );
        sqlx::query("INSERT INTO peers (instance_id, name, url, public_key, state, created_at, updated_at) VALUES ($1, 'mallory', 'http://mallory.invalid', $2, 'active', $3, $3)")
            .bind(mallory_id.as_str())
            .bind(mallory.public_key_hex())
            .bind(now(&customer))
            .execute(customer.ctx.db.reader())
            .await
            .unwrap();
        let stranger_id = uuid::Uuid::now_v7().to_string();
        let stranger = Identity::new(
            stranger_id.clone(),
            "stranger".into(),
            SigningKey::from_bytes(&[7; 32]),
        );
        let impostor = Identity::new(
            mallory_id.clone(),
            "mallory".into(),
            SigningKey::from_bytes(&[9; 32]),
        );
        let t = now(&customer);
        let hello = json!({"cursor": 0, "keys": []});

        refused_hello(
            &net,
            &customer,
            &seal(&stranger, &to, "link.hello", hello.clone(), t, MINUTE),
            "not_a_peer",
        )
        .await;
        refused_hello(
            &net,
            &customer,
            &seal(&impostor, &to, "link.hello", hello.clone(), t, MINUTE),
            "bad_signature",
        )
        .await;
        refused_hello(
            &net,
            &customer,
            &seal(
                &mallory,
                "someone-else",
                "link.hello",
                hello.clone(),
                t,
                MINUTE,
            ),
            "wrong_audience",
        )
        .await;
        refused_hello(
            &net,
            &customer,
            &seal(
                &mallory,
                &to,
                "link.hello",
                hello.clone(),
                t - 3 * MINUTE,
                MINUTE,
            ),
            "expired",
        )
        .await;
        refused_hello(
            &net,
            &customer,
            &seal(
                &mallory,
                &to,
                "link.hello",
                hello.clone(),
                t + 10 * MINUTE,
                MINUTE,
            ),
            "skewed",
        )
        .await;

        // A valid hello opens the link; the welcome is signed by the customer.
        let good = seal(&mallory, &to, "link.hello", hello.clone(), t, MINUTE);
        let mut conn = dial(&net, &customer).await;
        send(&conn, &good).await;
        let welcome = next(&mut conn, &customer, &mallory_id, "link.welcome").await;
        assert_eq!(welcome.body["hello"], good.id.as_str());
        refused_hello(&net, &customer, &good, "replayed").await;

        // The customer asks mallory for "vault"; the request arrives in order.
        let (status, asked) = customer
            .post("/api/v1/peers/mallory/uses", json!({"system": "vault"}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{asked}");
        let use_id = asked["id"].as_str().unwrap().to_owned();
        let request = next(&mut conn, &customer, &mallory_id, "use.request").await;
        assert_eq!(request.body["seq"], 1);
        assert_eq!(request.body["data"]["use"], use_id.as_str());

        let msg = |seq: i64, kind: &str, data: Value| {
            seal(
                &mallory,
                &to,
                kind,
                json!({"seq": seq, "data": data}),
                now(&customer),
                MINUTE,
            )
        };
        let vault = uuid::Uuid::now_v7().to_string();
        let elsewhere = uuid::Uuid::now_v7().to_string();
        send(
            &conn,
            &msg(
                1,
                "use.accepted",
                json!({"use": use_id, "exposure": {"level": "timeline"}}),
            ),
        )
        .await;
        let not_primary = refusals(&customer, "not_allowed");
        // A snapshot of a system that lives on another instance.
        send(&conn, &msg(2, "system.snapshot", json!({"use": use_id, "root": elsewhere,
            "systems": [{"system": system(&elsewhere, "vault", &stranger_id), "states": []}], "edges": [], "events": []}))).await;
        send(&conn, &msg(3, "system.snapshot", json!({"use": use_id, "root": vault,
            "systems": [{"system": system(&vault, "vault", &mallory_id), "states": []}], "edges": [], "events": []}))).await;
        // Activity that another instance issued, and about a system not used.
        let e1 = uuid::Uuid::now_v7().to_string();
        send(&conn, &msg(4, "activity", json!({"use": use_id, "system": vault, "event": event(&e1, "vault", &stranger_id, "relayed")}))).await;
        let e2 = uuid::Uuid::now_v7().to_string();
        send(&conn, &msg(5, "activity", json!({"use": use_id, "system": elsewhere, "event": event(&e2, "x", &mallory_id, "unused")}))).await;
        let e3 = uuid::Uuid::now_v7().to_string();
        let fine = msg(
            6,
            "activity",
            json!({"use": use_id, "system": vault, "event": event(&e3, "vault", &mallory_id, "vault 2.0")}),
        );
        send(&conn, &fine).await;
        let ack = loop {
            let ack = next(&mut conn, &customer, &mallory_id, "link.ack").await;
            if ack.body["upto"] == 6 {
                break ack;
            }
        };
        assert_eq!(ack.body["upto"], 6);
        assert_eq!(
            refusals(&customer, "not_allowed"),
            not_primary + 3,
            "three messages were not allowed"
        );
        let titles: Vec<String> = timeline(&customer, "vault")
            .await
            .iter()
            .map(|e| e["title"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert!(titles.contains(&"vault 2.0".to_owned()), "{titles:?}");
        assert!(
            !titles.contains(&"relayed".to_owned()),
            "only the primary instance issues activity"
        );
        let mirror = customer.get("/api/v1/systems/vault").await;
        assert_eq!(mirror["instance"], mallory_id.as_str());

        // Replayed, tampered and oversized frames inside the link.
        let replays = refusals(&customer, "replayed");
        send(&conn, &fine).await;
        let mut tampered = msg(
            7,
            "activity",
            json!({"use": use_id, "system": vault, "event": event(&uuid::Uuid::now_v7().to_string(), "vault", &mallory_id, "honest")}),
        );
        tampered.body["data"]["event"]["title"] = json!("tampered");
        let bad_sigs = refusals(&customer, "bad_signature");
        send(&conn, &tampered).await;
        let large = refusals(&customer, "too_large");
        conn.tx.send("x".repeat(300 * 1024)).await.unwrap();
        let nack = next(&mut conn, &customer, &mallory_id, "link.nack").await;
        assert_eq!(nack.body["from"], 7, "the sender is told where to resume");
        eventually("the refusals to be counted", || async {
            (refusals(&customer, "replayed") == replays + 1
                && refusals(&customer, "bad_signature") == bad_sigs + 1
                && refusals(&customer, "too_large") == large + 1)
                .then_some(())
        })
        .await;
        let titles = timeline(&customer, "vault").await;
        assert_eq!(
            titles.iter().filter(|e| e["title"] == "vault 2.0").count(),
            1
        );
        assert!(!titles.iter().any(|e| e["title"] == "tampered"));

        // Suspended: the link closes at once, and a new hello is refused
        // before its signature is even looked at.
        let (status, _) = customer
            .post("/api/v1/peers/mallory/suspend", json!({}))
            .await;
        assert_eq!(status, StatusCode::OK);
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while conn.rx.recv().await.is_some() {}
        })
        .await;
        assert!(closed.is_ok(), "the link closed");
        let forged = seal(&impostor, &to, "link.hello", hello, now(&customer), MINUTE);
        let blocked = refusals(&customer, "peer_blocked");
        let mut conn = dial(&net, &customer).await;
        send(&conn, &forged).await;
        // Told so, signed (at most every 10 s), then closed.
        let told = next(&mut conn, &customer, &mallory_id, "link.suspended").await;
        assert_eq!(told.issuer, to);
        assert!(conn.rx.recv().await.is_none(), "no welcome");
        assert_eq!(refusals(&customer, "peer_blocked"), blocked + 1);
        let metrics = customer
            .http
            .get(customer.url("/metrics"))
            .bearer_auth(&customer.token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("aramaki_federation_refused_total{reason=\"peer_blocked\"}"),
            "{metrics}"
        );
    }
}
