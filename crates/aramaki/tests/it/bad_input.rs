//! Bad input gets a clear 4xx problem and writes nothing.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both;

/// method, path, content type, body, expected status, words the detail must contain.
type Case<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    Vec<u8>,
    StatusCode,
    &'a str,
);

both!(
    malformed_requests_get_problems_and_write_nothing,
    |app| async move {
        app.system("shop", "project", json!({})).await;
        let before = app.counts().await;
        let raw = |method: Method, path: &str, ctype: Option<&str>, body: Vec<u8>| {
            let mut req = app
                .http
                .request(method, app.url(path))
                .bearer_auth(&app.token)
                .body(body);
            if let Some(c) = ctype {
                req = req.header("content-type", c);
            }
            req.send()
        };
        let cases: Vec<Case> = vec![
        (Method::POST, "/api/v1/systems", Some("application/json"), b"{\"slug\": ".to_vec(), StatusCode::BAD_REQUEST, "malformed JSON"),
        (Method::POST, "/api/v1/systems", Some("application/json"), b"[1,2]".to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "invalid request body"),
        (Method::POST, "/api/v1/systems", Some("application/json"),
            br#"{"slug":"a","title":"A","category":"host","colour":"red"}"#.to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "unknown field `colour`"),
        (Method::POST, "/api/v1/systems", Some("application/json"),
            br#"{"slug":"Not A Slug","title":"A","category":"host"}"#.to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "slug 'Not A Slug'"),
        (Method::POST, "/api/v1/systems", Some("application/json"),
            br#"{"slug":"a","title":"A","category":"host","labels":{"Role":"x"}}"#.to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "label key 'Role'"),
        (Method::POST, "/api/v1/systems", Some("application/json"),
            br#"{"slug":"a","title":"A","category":"host","links":[{"title":"x","url":"javascript:alert(1)"}]}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY, "links[0].url"),
        (Method::POST, "/api/v1/systems", Some("text/plain"), br#"{"slug":"a","title":"A","category":"host"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type: application/json"),
        (Method::POST, "/api/v1/systems", None, br#"{"slug":"a","title":"A","category":"host"}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type"),
        (Method::POST, "/api/v1/events", Some("application/json"), br#"{"system":"shop","kind":"Deploy!","title":"x"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY, "kind 'Deploy!'"),
        (Method::POST, "/api/v1/events", Some("application/json"), br#"{"system":"shop","kind":"note","title":"x","severity":"fatal"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY, "severity"),
        (Method::POST, "/api/v1/events", Some("application/json"), br#"{"system":"shop","kind":"note","title":"x","occurred_at":"tuesday"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY, "occurred_at"),
        (Method::PATCH, "/api/v1/systems/shop", Some("application/json"), br#"{"title": 5}"#.to_vec(), StatusCode::UNPROCESSABLE_ENTITY, "title"),
        (Method::GET, "/api/v1/systems/UPPER", None, vec![], StatusCode::BAD_REQUEST, "invalid slug in path"),
        (Method::GET, "/api/v1/events/42", None, vec![], StatusCode::BAD_REQUEST, "expected a UUID"),
        (Method::GET, "/api/v1/systems?limit=0", None, vec![], StatusCode::BAD_REQUEST, "limit"),
        (Method::GET, "/api/v1/systems?limit=many", None, vec![], StatusCode::BAD_REQUEST, "invalid query string"),
        (Method::GET, "/api/v1/systems?colour=red", None, vec![], StatusCode::BAD_REQUEST, "unknown field `colour`"),
        (Method::GET, "/api/v1/systems?label=a%3D%3Db", None, vec![], StatusCode::BAD_REQUEST, "label selector"),
        (Method::DELETE, "/api/v1/systems/shop?force=perhaps", None, vec![], StatusCode::BAD_REQUEST, "invalid query string"),
        (Method::GET, "/api/v1/nothing-here", None, vec![], StatusCode::NOT_FOUND, "no such resource"),
        (Method::PUT, "/api/v1/systems/shop", Some("application/json"), b"{}".to_vec(), StatusCode::METHOD_NOT_ALLOWED, "method"),
    ];
        for (method, path, ctype, body, status, needle) in cases {
            let label = format!("{method} {path} {}", String::from_utf8_lossy(&body));
            let resp = raw(method, path, ctype, body).await.unwrap();
            assert_eq!(resp.status(), status, "{label}");
            assert_eq!(
                resp.headers()["content-type"],
                "application/problem+json",
                "{label}"
            );
            let p: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(p["status"], status.as_u16(), "{label}");
            let detail = p["detail"].as_str().unwrap();
            assert!(
                detail.contains(needle),
                "{label}: {detail:?} does not mention {needle:?}"
            );
        }
        assert_eq!(app.counts().await, before, "refused requests wrote nothing");
    }
);

both!(oversized_bodies_are_refused, |app| async move {
    app.system("shop", "project", json!({})).await;
    let before = app.counts().await;
    let huge = "x".repeat(1024 * 1024 + 10);
    let body = json!({"system": "shop", "kind": "note", "title": "big", "body": huge});
    let resp = app
        .http
        .post(app.url("/api/v1/events"))
        .bearer_auth(&app.token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let p: serde_json::Value = resp.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("api.body_limit"));
    assert_eq!(app.counts().await, before);
    // Just under the limit is fine, though the body text itself is capped.
    let (status, p) = app
        .post(
            "/api/v1/events",
            json!({"system": "shop", "kind": "note", "title": "big", "body": "y".repeat(200_000)}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(p["field"], "body");
});
