//! Peers over real TLS with the instance key pinned: the federation
//! listener's certificate is made from the instance key, a dialer accepts
//! only the key it pinned, and an invite pins by fingerprint.

use aramaki::federation::link::{connect_url, TlsPin};
use reqwest::StatusCode;
use serde_json::json;

use crate::federation_links::{linked, uses, wait_use};
use crate::support::{Backend, TestApp};

/// An instance with a TLS federation listener on a free loopback port.
async fn tls_instance(name: &str) -> TestApp {
    let port = crate::support::free_port();
    let name = name.to_owned();
    TestApp::start_tweaked(Backend::Sqlite, move |c| {
        c.instance.name = name;
        c.federation.listen = Some(format!("127.0.0.1:{port}"));
    })
    .await
}

fn key_of(app: &TestApp) -> [u8; 32] {
    *app.ctx.identity.public_key().as_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_link_over_tls_pinned_to_their_keys_and_refuse_an_impostor() {
    let hosting = tls_instance("hosting").await;
    let customer = tls_instance("customer").await;
    let impostor = tls_instance("impostor").await;
    let hosting_url = aramaki::federation::http::public_url(&hosting.ctx);
    let impostor_url = aramaki::federation::http::public_url(&impostor.ctx);
    assert!(
        hosting_url.starts_with("https://127.0.0.1:"),
        "{hosting_url}"
    );
    let doc = hosting.get("/.well-known/aramaki").await;
    assert_eq!(doc["document"]["tls_pinned"], true);
    assert_eq!(doc["document"]["url"], hosting_url.as_str());

    // An invite whose address leads elsewhere is refused at the TLS
    // handshake: the certificate there does not carry the invited key.
    let (status, issued) = hosting.post("/api/v1/peers/invites", json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let invite = issued["invite"].as_str().unwrap().to_owned();
    let diverted = invite.replace(&hosting_url, &impostor_url);
    assert_ne!(diverted, invite);
    let (status, v) = customer
        .post("/api/v1/peers/join", json!({"invite": diverted}))
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("pinned key"),
        "the reason is named: {v}"
    );
    assert_eq!(customer.get("/api/v1/peers").await["items"], json!([]));

    // The real invite peers both ways over TLS, then links over wss.
    let (status, v) = customer
        .post("/api/v1/peers/join", json!({"invite": invite}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(v["tls_pinned"], true, "{v}");
    let (status, v) = hosting
        .post("/api/v1/peers/customer/approve", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["tls_pinned"], true, "{v}");
    linked(&hosting, &customer).await;

    // Activity crosses the TLS link.
    hosting.system("storage", "infrastructure", json!({})).await;
    let (status, asked) = customer
        .post("/api/v1/peers/hosting/uses", json!({"system": "storage"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let id = asked["id"].as_str().unwrap().to_owned();
    wait_use(&hosting, &id, "pending").await;
    let (status, v) = hosting
        .post(&format!("/api/v1/uses/{id}/accept"), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    wait_use(&customer, &id, "accepted").await;
    assert_eq!(uses(&customer).await.len(), 1);

    // Renamed on its instance, the mirror follows.
    let (status, v) = hosting
        .call(
            reqwest::Method::PATCH,
            "/api/v1/systems/storage",
            Some(json!({"slug": "storage-eu"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    crate::agent_e2e::eventually("the mirror to be renamed", || async {
        let (status, _) = customer
            .call(reqwest::Method::GET, "/api/v1/systems/storage-eu", None)
            .await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
    let (status, _) = customer
        .call(reqwest::Method::GET, "/api/v1/systems/storage", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The transport itself: the pinned key passes, any other is refused,
    // and without the pin no CA vouches for a self-signed impostor.
    let transport = hosting.ctx.federation.transport(&hosting.ctx);
    let customer_url = connect_url(&aramaki::federation::http::public_url(&customer.ctx));
    let pinned = TlsPin {
        key: key_of(&customer),
        strict: true,
    };
    assert!(transport.dial(&customer_url, pinned).await.is_ok());
    for strict in [true, false] {
        let wrong = TlsPin {
            key: key_of(&customer),
            strict,
        };
        let refused = match transport.dial(&connect_url(&impostor_url), wrong).await {
            Ok(_) => panic!("an impostor's certificate was accepted (strict: {strict})"),
            Err(e) => e,
        };
        assert!(
            refused.contains("certificate"),
            "strict {strict}: {refused}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_is_not_sent_over_plain_http_beyond_loopback() {
    let app = TestApp::start(Backend::Sqlite).await;
    let (status, v) = app
        .post(
            "/api/v1/peers/join",
            json!({"invite": "http://192.0.2.1:8764#aip_abc_def_ghi"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("plain http"), "{v}");
}
