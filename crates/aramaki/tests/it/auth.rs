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
                ["public", "user", "viewer", "operator", "admin"].contains(&role),
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
    assert_eq!(p["detail"], "recording on 'shop' needs the operator role");
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
    let recorded = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("aramaki_events_recorded_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap()
    };
    app.event("shop", "note", "one more", json!({})).await;
    let after = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        recorded(&after),
        recorded(&text) + 1,
        "each recorded event is counted"
    );
    assert!(text.contains("aramaki_http_request_duration_seconds_bucket{method=\"POST\",route=\"/api/v1/systems\",le=\"+Inf\"} 1"));
    assert!(text.contains("aramaki_db_pool_connections"));
});

/// dc1 → storage → host-a; shop stands apart.
async fn estate(app: &TestApp) {
    for (s, c) in [
        ("dc1", "infrastructure"),
        ("storage", "infrastructure"),
        ("host-a", "host"),
        ("shop", "project"),
    ] {
        app.system(s, c, json!({})).await;
    }
    app.include("dc1", "storage").await;
    app.include("storage", "host-a").await;
}

both!(
    a_grant_holds_on_everything_below_and_nothing_else,
    |app| async move {
        estate(&app).await;
        let ops = app
            .user_with_grants("sam", &[("storage", Role::Operator)])
            .await;
        let get = |path: &'static str| app.call_as(&ops, Method::GET, path, None);

        assert_eq!(get("/api/v1/systems/storage").await.0, StatusCode::OK);
        assert_eq!(
            get("/api/v1/systems/host-a/timeline").await.0,
            StatusCode::OK,
            "inherited downwards"
        );
        let (status, p) = get("/api/v1/systems/dc1").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "not upwards: {p}");
        assert_eq!(
            p["detail"], "no system 'dc1'",
            "invisible systems read as absent"
        );
        assert_eq!(
            get("/api/v1/systems/shop/status").await.0,
            StatusCode::NOT_FOUND
        );

        let list = get("/api/v1/systems").await.1;
        let slugs: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["slug"].as_str().unwrap())
            .collect();
        assert_eq!(slugs, ["host-a", "storage"]);
        let anchors = get("/api/v1/anchors").await.1;
        assert_eq!(
            anchors["items"][0]["systems"][0]["slug"], "storage",
            "{anchors}"
        );
        assert_eq!(anchors["items"].as_array().unwrap().len(), 1);
        let includers = get("/api/v1/systems/storage/includers").await.1;
        assert_eq!(includers["items"], json!([]), "dc1 is not shown to sam");

        // Operator: may record below, not elsewhere, and may not change structure.
        let note = |system: &str| json!({"system": system, "kind": "note", "title": "checked"});
        assert_eq!(
            app.call_as(&ops, Method::POST, "/api/v1/events", Some(note("host-a")))
                .await
                .0,
            StatusCode::CREATED
        );
        let (status, p) = app
            .call_as(&ops, Method::POST, "/api/v1/events", Some(note("dc1")))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(p["field"], "system");
        let (status, _) = app
            .call_as(
                &ops,
                Method::POST,
                "/api/v1/events/batch",
                Some(json!({"events": [note("storage"), note("shop")]})),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "a batch is all or none"
        );
        let (status, p) = app
            .call_as(
                &ops,
                Method::PATCH,
                "/api/v1/systems/storage",
                Some(json!({"title": "x"})),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(p["detail"], "this needs the admin role on 'storage'");
        let (status, _) = app
            .call_as(
                &ops,
                Method::POST,
                "/api/v1/systems",
                Some(json!({"slug": "new", "title": "New", "category": "host"})),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "creating systems is for the instance admin"
        );

        // An event on an invisible system cannot be read by id.
        let secret = app.event("shop", "note", "private", json!({})).await;
        let path = format!("/api/v1/events/{}", secret["id"].as_str().unwrap());
        assert_eq!(
            app.call_as(&ops, Method::GET, &path, None).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(app.call(Method::GET, &path, None).await.0, StatusCode::OK);

        // The grant is on the record, on the system it was granted on.
        let t = app
            .get("/api/v1/systems/storage/timeline?kind=user.granted")
            .await;
        assert_eq!(t["items"][0]["data"]["user"], "sam");
        assert_eq!(t["items"][0]["data"]["after"]["role"], "operator");
    }
);

both!(an_admin_grant_allows_changes_below_only, |app| async move {
    estate(&app).await;
    let boss = app
        .user_with_grants("bea", &[("storage", Role::Admin), ("shop", Role::Viewer)])
        .await;
    let (status, _) = app
        .call_as(
            &boss,
            Method::PATCH,
            "/api/v1/systems/host-a",
            Some(json!({"title": "Host A"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, p) = app
        .call_as(
            &boss,
            Method::POST,
            "/api/v1/systems/storage/subsystems",
            Some(json!({"slug": "shop"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a viewer on shop cannot pull it under storage and so become its admin"
    );
    assert_eq!(p["detail"], "this needs the admin role on 'shop'");
    let (status, _) = app
        .call_as(
            &boss,
            Method::POST,
            "/api/v1/systems/storage/subsystems",
            Some(json!({"slug": "dc1"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "dc1 is invisible to bea");
    app.system("disk-1", "host", json!({})).await;
    let (status, _) = app
        .call_as(
            &boss,
            Method::POST,
            "/api/v1/systems/host-a/subsystems",
            Some(json!({"slug": "disk-1"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "disk-1 is not below anything bea administers"
    );
    app.include("host-a", "disk-1").await;
    let (status, _) = app
        .call_as(
            &boss,
            Method::PATCH,
            "/api/v1/systems/disk-1",
            Some(json!({"title": "Disk 1"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "once included below storage, bea administers it"
    );
    let nobody = app.user_with_grants("ned", &[]).await;
    let (status, list) = app
        .call_as(&nobody, Method::GET, "/api/v1/systems", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list["items"],
        json!([]),
        "deny by default: no grant, nothing to see"
    );
});

both!(
    tokens_are_shown_once_listed_with_last_use_revoked_and_expire,
    |app| async move {
        let vera = app.user("vera", Role::Viewer).await;
        let (status, created) = app
            .call_as(
                &vera,
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"name": "grafana", "expires_in_days": 1})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let secret = created["token"].as_str().unwrap().to_owned();
        assert!(secret.starts_with(&format!("ark_{}_", created["prefix"].as_str().unwrap())));
        assert_eq!(
            app.call_as(&secret, Method::GET, "/api/v1/systems", None)
                .await
                .0,
            StatusCode::OK
        );

        let (_, list) = app
            .call_as(&vera, Method::GET, "/api/v1/tokens", None)
            .await;
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        let grafana = items.iter().find(|t| t["name"] == "grafana").unwrap();
        assert!(
            grafana.get("token").is_none(),
            "the secret is never shown again"
        );
        assert!(
            grafana["last_used_at"].is_string(),
            "last use is kept: {grafana}"
        );

        // Another user cannot revoke it; its owner can, and it stops at once.
        let otto = app.user("otto", Role::Operator).await;
        let path = format!("/api/v1/tokens/{}", created["id"].as_str().unwrap());
        assert_eq!(
            app.call_as(&otto, Method::DELETE, &path, None).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            app.call_as(&vera, Method::DELETE, &path, None).await.0,
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            app.call_as(&secret, Method::GET, "/api/v1/systems", None)
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            app.call_as(&vera, Method::DELETE, &path, None).await.0,
            StatusCode::NOT_FOUND
        );

        // An expiring token stops working when its day is over.
        let (_, short) = app
            .call_as(
                &vera,
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"name": "short", "expires_in_days": 1})),
            )
            .await;
        let short = short["token"].as_str().unwrap().to_owned();
        assert_eq!(
            app.call_as(&short, Method::GET, "/api/v1/systems", None)
                .await
                .0,
            StatusCode::OK
        );
        app.clock.advance(jiff::SignedDuration::from_hours(25));
        assert_eq!(
            app.call_as(&short, Method::GET, "/api/v1/systems", None)
                .await
                .0,
            StatusCode::UNAUTHORIZED
        );

        let (status, p) = app
            .call_as(
                &vera,
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"name": "x", "expires_in_days": 0})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(p["field"], "expires_in_days");
    }
);

/// Every API route for anonymous, viewer, operator and admin callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_is_authorised_for_each_role() {
    for backend in backends() {
        let app = TestApp::start(backend).await;
        let tokens = [
            String::new(),
            app.user("v", Role::Viewer).await,
            app.user("o", Role::Operator).await,
            app.token.clone(),
        ];
        let note = json!({"system": "shop", "kind": "note", "title": "t"});
        // (method, path, body, expected status for anonymous, viewer, operator, admin)
        let rows: Vec<(Method, &str, Option<Value>, [u16; 4])> = vec![
            (Method::GET, "/api/v1/systems", None, [401, 200, 200, 200]),
            (
                Method::POST,
                "/api/v1/systems",
                Some(json!({"slug": "made", "title": "M", "category": "host"})),
                [401, 403, 403, 201],
            ),
            (
                Method::GET,
                "/api/v1/systems/shop",
                None,
                [401, 200, 200, 200],
            ),
            (
                Method::PATCH,
                "/api/v1/systems/shop",
                Some(json!({"title": "Shop 2"})),
                [401, 403, 403, 200],
            ),
            (
                Method::DELETE,
                "/api/v1/systems/made",
                None,
                [401, 403, 403, 204],
            ),
            (
                Method::GET,
                "/api/v1/systems/shop/subsystems",
                None,
                [401, 200, 200, 200],
            ),
            (
                Method::POST,
                "/api/v1/systems/shop/subsystems",
                Some(json!({"slug": "db"})),
                [401, 403, 403, 201],
            ),
            (
                Method::DELETE,
                "/api/v1/systems/shop/subsystems/db",
                None,
                [401, 403, 403, 204],
            ),
            (
                Method::GET,
                "/api/v1/systems/shop/includers",
                None,
                [401, 200, 200, 200],
            ),
            (
                Method::GET,
                "/api/v1/systems/shop/status",
                None,
                [401, 200, 200, 200],
            ),
            (
                Method::GET,
                "/api/v1/systems/shop/timeline",
                None,
                [401, 200, 200, 200],
            ),
            (Method::GET, "/api/v1/anchors", None, [401, 200, 200, 200]),
            (
                Method::GET,
                "/api/v1/categories",
                None,
                [401, 200, 200, 200],
            ),
            (
                Method::POST,
                "/api/v1/categories",
                Some(json!({"name": "rack", "title": "Rack"})),
                [401, 403, 403, 201],
            ),
            (
                Method::POST,
                "/api/v1/events",
                Some(note.clone()),
                [401, 403, 201, 201],
            ),
            (
                Method::POST,
                "/api/v1/events/batch",
                Some(json!({"events": [note]})),
                [401, 403, 201, 201],
            ),
            (Method::GET, "/api/v1/tokens", None, [401, 200, 200, 200]),
            (
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"name": "t"})),
                [401, 201, 201, 201],
            ),
            (Method::GET, "/api/v1/health", None, [200, 200, 200, 200]),
            (Method::GET, "/metrics", None, [401, 200, 200, 200]),
        ];
        for (method, path, body, expected) in rows {
            for (token, want) in tokens.iter().zip(expected) {
                let _ = app
                    .call(Method::DELETE, "/api/v1/systems/shop?force=true", None)
                    .await;
                let _ = app
                    .call(Method::DELETE, "/api/v1/systems/db?force=true", None)
                    .await;
                app.system("shop", "project", json!({})).await;
                app.system("db", "service", json!({})).await;
                if path.ends_with("/subsystems/db") {
                    app.include("shop", "db").await;
                }
                if method == Method::DELETE && path.ends_with("/made") {
                    let _ = app
                        .post(
                            "/api/v1/systems",
                            json!({"slug": "made", "title": "M", "category": "host"}),
                        )
                        .await;
                }
                let _ = sqlx::query("DELETE FROM categories WHERE name = 'rack'")
                    .execute(app.ctx.db.reader())
                    .await;
                let mut req = app.http.request(method.clone(), app.url(path));
                if !token.is_empty() {
                    req = req.bearer_auth(token);
                }
                if let Some(b) = &body {
                    req = req.json(b);
                }
                let status = req.send().await.unwrap().status().as_u16();
                assert_eq!(
                    status,
                    want,
                    "{method} {path} as caller #{} ({backend:?})",
                    tokens.iter().position(|t| t == token).unwrap()
                );
                if method == Method::POST && path == "/api/v1/systems" && status == 201 {
                    let _ = app.call(Method::DELETE, "/api/v1/systems/made", None).await;
                }
            }
        }
    }
}

both!(
    accounts_and_tokens_leave_an_audit_trail_on_the_instance,
    |app| async move {
        let vera = app.user("vera", Role::Viewer).await;
        let (_, created) = app
            .call_as(
                &vera,
                Method::POST,
                "/api/v1/tokens",
                Some(json!({"name": "grafana"})),
            )
            .await;
        let path = format!("/api/v1/tokens/{}", created["id"].as_str().unwrap());
        assert_eq!(
            app.call_as(&vera, Method::DELETE, &path, None).await.0,
            StatusCode::NO_CONTENT
        );
        let trail = app
            .get("/api/v1/systems/aramaki/timeline?kind=user.*,token.*&limit=50")
            .await;
        let kinds: Vec<(String, String)> = trail["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap().to_owned(),
                    e["actor"]["name"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            kinds[0],
            ("token.revoked".to_owned(), "vera".to_owned()),
            "{kinds:?}"
        );
        assert_eq!(kinds[1].0, "token.created");
        assert!(kinds.iter().any(|(k, _)| k == "user.created"), "{kinds:?}");
        let created_event = &trail["items"][1];
        assert_eq!(created_event["data"]["prefix"], created["prefix"]);
        assert!(
            !created_event
                .to_string()
                .contains(created["token"].as_str().unwrap()),
            "the secret is never on the record"
        );
        // Grant-only users do not see the instance's trail.
        let sam = app.user_with_grants("sam", &[]).await;
        assert_eq!(
            app.call_as(&sam, Method::GET, "/api/v1/systems/aramaki/timeline", None)
                .await
                .0,
            StatusCode::NOT_FOUND
        );
    }
);
