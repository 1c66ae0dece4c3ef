//! What an instance publishes about itself.

use aramaki_protocol::federation::{document_transcript, SignedDocument};
use aramaki_protocol::keys::{fingerprint, unhex_array};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::monitoring::cli;
use crate::support::{Backend, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_document_is_public_and_self_signed() {
    let app = TestApp::start_tweaked(Backend::Sqlite, |c| {
        c.instance.name = "hosting-berlin".into();
        c.instance.url = Some("https://aramaki.hosting.example".into());
    })
    .await;
    // No token: peers read it before they trust anything.
    let resp = app
        .http
        .get(app.url("/.well-known/aramaki"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let signed: SignedDocument = resp.json().await.unwrap();
    let d = &signed.document;
    assert_eq!(d.name, "hosting-berlin");
    assert_eq!(d.url, "https://aramaki.hosting.example");
    assert_eq!(d.public_key, app.ctx.identity.public_key_hex());
    let key = VerifyingKey::from_bytes(&unhex_array::<32>(&d.public_key).unwrap()).unwrap();
    assert_eq!(
        d.fingerprint,
        fingerprint(key.as_bytes()),
        "the fingerprint people compare"
    );
    let sig = Signature::from_bytes(&unhex_array::<64>(&signed.signature).unwrap());
    key.verify(&document_transcript(d), &sig)
        .expect("signed by its own key");
    let mut forged = d.clone();
    forged.url = "https://evil.example".into();
    assert!(
        key.verify(&document_transcript(&forged), &sig).is_err(),
        "a changed document does not verify"
    );
}

async fn peers_of(app: &TestApp) -> Vec<Value> {
    app.get("/api/v1/peers").await["items"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_peer_with_an_invite_and_an_approval() {
    let hosting = TestApp::start_reachable("hosting").await;
    let customer = TestApp::start_reachable("customer").await;
    let (status, issued) = hosting
        .post("/api/v1/peers/invites", json!({"ttl": "1h"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let invite = issued["invite"].as_str().unwrap().to_owned();
    assert!(
        invite.starts_with(&hosting.base),
        "the invite says where to join: {invite}"
    );
    assert!(
        invite.ends_with(&hosting.ctx.identity.fingerprint().replace('-', "")),
        "and whom to expect"
    );

    // A tampered fingerprint is caught before anything is sent.
    let (head, _) = invite.rsplit_once('_').unwrap();
    let (status, v) = customer
        .post(
            "/api/v1/peers/join",
            json!({"invite": format!("{head}_AAAAAAAAAAAAAAAA")}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("not the one in the invite"),
        "{v}"
    );
    assert!(peers_of(&hosting).await.is_empty());

    let (status, peer) = customer
        .post("/api/v1/peers/join", json!({"invite": invite}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{peer}");
    assert_eq!(peer["name"], "hosting");
    assert_eq!(
        peer["fingerprint"],
        hosting.ctx.identity.fingerprint(),
        "the inviter's key is pinned"
    );
    assert_eq!(peer["state"], "active");
    let joined = peers_of(&hosting).await;
    assert_eq!(joined.len(), 1);
    assert_eq!(joined[0]["name"], "customer");
    assert_eq!(
        joined[0]["fingerprint"],
        customer.ctx.identity.fingerprint(),
        "the joiner's key is pinned"
    );
    assert_eq!(
        joined[0]["state"], "pending",
        "waiting for the inviter's admin"
    );

    // The invite is single-use.
    let (status, v) = customer
        .post("/api/v1/peers/join", json!({"invite": invite}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("used already"),
        "{v}"
    );

    for (change, state) in [
        ("approve", "active"),
        ("suspend", "suspended"),
        ("resume", "active"),
        ("revoke", "revoked"),
    ] {
        let (status, v) = hosting
            .post(&format!("/api/v1/peers/customer/{change}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{change}: {v}");
        assert_eq!(v["state"], state);
    }
    let (status, _) = hosting
        .post("/api/v1/peers/customer/approve", json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "revoked is final");
    let trail = hosting
        .get("/api/v1/systems/aramaki/timeline?kind=peer.*&limit=20")
        .await;
    let kinds: Vec<&str> = trail["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "peer.invited",
        "peer.joined",
        "peer.active",
        "peer.suspended",
        "peer.revoked",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }

    // Peering needs the instance admin; the join endpoint needs a valid invite.
    let viewer = hosting.user("vic", aramaki::users::Role::Viewer).await;
    let (status, _) = hosting
        .call_as(&viewer, Method::GET, "/api/v1/peers", None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = hosting
        .call_as("", Method::POST, "/api/v1/federation/join", Some(json!({"invite": "aip_x_y_z", "document": aramaki::federation::http::document(&customer.ctx)})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peering_from_the_command_line() {
    let hosting = TestApp::start_reachable("hosting").await;
    let customer = TestApp::start_reachable("customer").await;
    let (ok, invite, err) = cli(&hosting, &["peer", "invite", "--ttl", "1h"]).await;
    assert!(ok, "{err}");
    assert!(err.contains(&hosting.ctx.identity.fingerprint()), "{err}");
    let invite = invite.trim().to_owned();
    let (ok, out, err) = cli(&customer, &["peer", "join", &invite, "--yes"]).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&hosting.ctx.identity.fingerprint()),
        "the fingerprint is shown to compare: {out}"
    );
    assert!(out.contains("peered with hosting"), "{out}");
    let (ok, out, _) = cli(&hosting, &["peer", "list"]).await;
    assert!(
        ok && out.contains("customer") && out.contains("pending"),
        "{out}"
    );
    let (ok, out, _) = cli(&hosting, &["peer", "approve", "customer"]).await;
    assert!(ok && out.contains("customer is now active"), "{out}");
    let (ok, _, err) = cli(&customer, &["peer", "join", "not-an-invite", "--yes"]).await;
    assert!(!ok && err.contains("not a peering invite"), "{err}");
}
