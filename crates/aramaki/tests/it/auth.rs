//! Deny by default: every route states its role, and anonymous or
//! under-privileged callers are refused.

use aramaki::users::Role;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::both;
use crate::support::{backends, Backend, TestApp};

/// Every operation in the OpenAPI document names its role, and every
/// operation that is not public refuses a caller without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_states_its_role_and_denies_anonymous_callers() {
    for backend in backends() {
        every_operation_on(TestApp::start(backend).await).await;
    }
}

async fn every_operation_on(app: TestApp) {
    app.system("shop", "project", json!({})).await;
    let doc: Value = app
        .http
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"].as_str().unwrap().chars().next(), Some('3'));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 12, "{:?}", paths.keys());
    let mut checked = 0;
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let role = op["x-aramaki-role"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} states no role"));
            assert!(
                ["public", "viewer", "operator", "admin"].contains(&role),
                "{method} {path}: {role}"
            );
            let concrete = path
                .replace("{slug}", "shop")
                .replace("{child}", "shop")
                .replace("{id}", "01900000-0000-7000-8000-000000000000");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = app
                .http
                .request(m, app.url(&concrete))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            if role == "public" {
                assert_ne!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path}");
            } else {
                assert_eq!(
                    resp.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} must refuse anonymous callers"
                );
                assert_eq!(resp.headers()["content-type"], "application/problem+json");
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} operations");
}

both!(roles_limit_what_a_token_may_do, |app| async move {
    app.system("shop", "project", json!({})).await;
    let viewer = app.user("vera", Role::Viewer).await;
    let operator = app.user("otto", Role::Operator).await;

    let (status, _) = app
        .call_as(&viewer, Method::GET, "/api/v1/systems/shop", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, p) = app
        .call_as(
            &viewer,
            Method::POST,
            "/api/v1/events",
            Some(json!({"system": "shop", "kind": "note", "title": "hi"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(p["detail"], "this needs the operator role");
    let (status, _) = app
        .call_as(
            &operator,
            Method::POST,
            "/api/v1/events",
            Some(json!({"system": "shop", "kind": "note", "title": "hi"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = app
        .call_as(
            &operator,
            Method::PATCH,
            "/api/v1/systems/shop",
            Some(json!({"title": "x"})),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    for bad in ["nonsense", "ark_aaaaaaaa_wrong", &format!("{}x", app.token)] {
        let (status, p) = app.call_as(bad, Method::GET, "/api/v1/systems", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(p["code"], "unauthorized");
    }
    let resp = app
        .http
        .get(app.url("/api/v1/systems"))
        .header("Authorization", "Basic YWRtaW46YWRtaW4=")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"aramaki\""
    );
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_read_opens_reads_only() {
    for backend in backends() {
        public_read_on(TestApp::start_tweaked(backend, |c| c.api.public_read = true).await).await;
    }
}

async fn public_read_on(app: TestApp) {
    app.system("shop", "project", json!({})).await;
    let anon = |m: Method, path: &str| {
        app.http
            .request(m, app.url(path))
            .json(&json!({"system": "shop", "kind": "note", "title": "x"}))
            .send()
    };
    assert_eq!(
        anon(Method::GET, "/api/v1/systems/shop/timeline")
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        anon(Method::POST, "/api/v1/events").await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        anon(Method::GET, "/metrics").await.unwrap().status(),
        StatusCode::UNAUTHORIZED,
        "metrics have their own switch"
    );
}

both!(health_and_metrics, |app| async move {
    let health: Value = app
        .http
        .get(app.url("/api/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["ready"], true);
    assert_eq!(
        health["backend"],
        if app.backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    app.system("shop", "project", json!({})).await;
    app.event("shop", "note", "hello", json!({})).await;
    let resp = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.contains("aramaki_http_requests_total{method=\"POST\",route=\"/api/v1/events\",status=\"201\"} 1"), "{text}");
    assert!(text.contains("aramaki_events_recorded_total 2"), "{text}");
    assert!(text.contains("aramaki_http_request_duration_seconds_bucket{method=\"POST\",route=\"/api/v1/systems\",le=\"+Inf\"} 1"));
    assert!(text.contains("aramaki_db_pool_connections"));
});
