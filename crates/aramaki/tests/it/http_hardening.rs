//! The HTTP boundary: NUL characters, JSON arrays in place of objects,
//! security headers on every response, slow clients and the connection limit.

use aramaki::users::{self, Role};
use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::both;
use crate::support::TestApp;

/// A browser session for a new user with `role`: (cookie, csrf token of `page`).
async fn session(app: &TestApp, name: &str, role: Role, page: &str) -> (String, String) {
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        name,
        name,
        Some(role),
        "correct horse battery",
        false,
    )
    .await
    .unwrap();
    let resp = crate::pages::browser()
        .post(app.url("/login"))
        .form(&[
            ("username", name),
            ("password", "correct horse battery"),
            ("next", "/"),
        ])
        .send()
        .await
        .unwrap();
    let cookie = resp.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let html = crate::pages::browser()
        .get(app.url(page))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (cookie, crate::pages::csrf_of(&html))
}

async fn raw_json(app: &TestApp, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
    let resp = app
        .http
        .request(method, app.url(path))
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    if status.is_client_error() {
        assert_eq!(
            resp.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
    (status, resp.json().await.unwrap_or(Value::Null))
}

both!(
    nul_characters_are_refused_naming_the_field,
    |app| async move {
        app.system("shop", "project", json!({"env": "prod"})).await;
        let (cookie, csrf) = session(&app, "olga", Role::Admin, "/systems/shop").await;
        let before = app.counts().await;
        // JSON bodies: top-level fields, map values and list items.
        for (path, body, field) in [
            (
                "/api/v1/systems",
                r#"{"slug":"a","title":"A\u0000B","category":"host"}"#,
                "title",
            ),
            (
                "/api/v1/systems",
                r#"{"slug":"a","title":"A","category":"host","labels":{"env":"pr\u0000od"}}"#,
                "labels.env",
            ),
            (
                "/api/v1/systems",
                r#"{"slug":"a","title":"A","category":"host","links":[{"title":"x\u0000","url":"https://x.example"}]}"#,
                "links[0].title",
            ),
            (
                "/api/v1/events",
                r#"{"system":"shop","kind":"note","title":"t","body":"\u0000"}"#,
                "body",
            ),
        ] {
            let (status, p) = raw_json(&app, Method::POST, path, body).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {p}");
            assert_eq!(p["field"], field, "{body}: {p}");
            let detail = p["detail"].as_str().unwrap();
            assert!(detail.contains(field) && detail.contains("NUL"), "{detail}");
        }
        let (status, p) = raw_json(
            &app,
            Method::PATCH,
            "/api/v1/systems/shop",
            r#"{"description":"x\u0000"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
        assert_eq!(p["field"], "description");
        // Query and path parameters (PostgreSQL used to answer 500 here).
        for (path, field, what) in [
            ("/api/v1/systems?q=a%00b", "q", "query parameter"),
            (
                "/api/v1/systems/shop/timeline?q=%00",
                "q",
                "query parameter",
            ),
            ("/api/v1/systems/sh%00op", "slug", "path parameter"),
            (
                "/api/v1/systems/shop/timeline?actor=x%00",
                "actor",
                "query parameter",
            ),
        ] {
            let (status, p) = app.call(Method::GET, path, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {p}");
            assert_eq!(p["field"], field, "{path}");
            let detail = p["detail"].as_str().unwrap();
            assert!(detail.contains(what) && detail.contains("NUL"), "{detail}");
        }
        // A page's query and a page form.
        let resp = crate::pages::browser()
            .get(app.url("/search?q=%00"))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(resp.text().await.unwrap().contains("`q`"));
        let resp = crate::pages::browser()
            .post(app.url("/systems/shop/notes"))
            .header(COOKIE, &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("title", "Restarted\0 php-fpm"),
                ("body", "fine"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let html = resp.text().await.unwrap();
        assert!(
            html.contains("form field `title`") && html.contains("NUL"),
            "{html}"
        );
        // The media type's spelling does not matter to axum's Form, nor here.
        let resp = crate::pages::browser()
            .post(app.url("/systems/shop/notes"))
            .header(COOKIE, &cookie)
            .header("content-type", "Application/X-WWW-Form-URLEncoded")
            .body(format!("csrf={csrf}&title=a%00b&body=fine"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
        // A raw NUL byte, and a body that is not UTF-8 (which axum's Form
        // would quietly turn into U+FFFD), are refused too, naming the field.
        for (body, problem) in [
            (
                &b"title=a\0b&body=fine"[..],
                "form field `title` contains a NUL",
            ),
            (
                &b"title=ok&body=caf\xe9"[..],
                "form field `body` is not valid UTF-8",
            ),
            (
                &b"title=ok&body=caf%E9"[..],
                "form field `body` is not valid UTF-8",
            ),
            (
                &b"body=\xff&title=a%00b"[..],
                "form field `body` is not valid UTF-8",
            ),
        ] {
            let mut raw = format!("csrf={csrf}&").into_bytes();
            raw.extend_from_slice(body);
            let resp = crate::pages::browser()
                .post(app.url("/systems/shop/notes"))
                .header(COOKIE, &cookie)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(raw)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
            let html = resp.text().await.unwrap();
            assert!(html.contains(problem), "{html}");
        }
        // And in a query string.
        let (status, p) = app
            .call(Method::GET, "/api/v1/systems?q=caf%E9", None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{p}");
        assert_eq!(p["field"], "q");
        assert!(p["detail"].as_str().unwrap().contains("UTF-8"), "{p}");
        assert_eq!(app.counts().await, before, "nothing with a NUL was written");
        // The same form without the NUL is accepted: the check did not eat the body.
        let resp = crate::pages::browser()
            .post(app.url("/systems/shop/notes"))
            .header(COOKIE, &cookie)
            .form(&[
                ("csrf", csrf.as_str()),
                ("title", "Restarted php-fpm"),
                ("body", "fine"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    }
);

both!(json_arrays_are_not_objects, |app| async move {
    app.system("shop", "project", json!({})).await;
    app.system("web", "host", json!({})).await;
    let before = app.counts().await;
    for (method, path, body, field) in [
        (
            Method::POST,
            "/api/v1/systems",
            r#"["slug","title","service"]"#,
            "",
        ),
        (
            Method::POST,
            "/api/v1/systems",
            r#"["a","A","host",null,null,{},[],[],[],null]"#,
            "",
        ),
        (
            Method::PATCH,
            "/api/v1/systems/shop",
            r#"["New title"]"#,
            "",
        ),
        (
            Method::POST,
            "/api/v1/systems/shop/subsystems",
            r#"["web"]"#,
            "",
        ),
        (
            Method::POST,
            "/api/v1/events",
            r#"["shop","note","hello"]"#,
            "",
        ),
        (
            Method::POST,
            "/api/v1/events/batch",
            r#"[["shop","note","hello"]]"#,
            "",
        ),
        (Method::POST, "/api/v1/tokens", r#"["mine"]"#, ""),
        (Method::POST, "/api/v1/systems", r#""shop""#, ""),
        // Nested structs given as arrays, by position.
        (
            Method::POST,
            "/api/v1/systems",
            r#"{"slug":"a","title":"A","category":"host","links":[["docs","https://x.example"]]}"#,
            "links[0]",
        ),
        (
            Method::POST,
            "/api/v1/systems",
            r#"{"slug":"a","title":"A","category":"host","contacts":[["Ada","ada@example.org"]]}"#,
            "contacts[0]",
        ),
        // An internally tagged enum given as a list, tag first.
        (
            Method::POST,
            "/api/v1/checks",
            r#"{"name":"edge","probe":["tcp","127.0.0.1",22],"subscriptions":["linux"],"interval":10}"#,
            "probe",
        ),
    ] {
        let (status, p) = raw_json(&app, method.clone(), path, body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path} {body}: {p}"
        );
        let detail = p["detail"].as_str().unwrap();
        assert!(
            detail.contains("expected a JSON object"),
            "{method} {path} {body}: {detail}"
        );
        if !field.is_empty() {
            assert_eq!(p["field"], field, "{body}");
        }
    }
    assert_eq!(app.counts().await, before, "no array created anything");
    assert_eq!(app.get("/api/v1/systems/shop").await["title"], "SHOP");
    assert!(app.get("/api/v1/systems/shop/subsystems").await["items"]
        .as_array()
        .unwrap()
        .is_empty());
});

/// Asserts the security headers every response carries.
fn assert_secure_headers(resp: &reqwest::Response, what: &str) {
    let h = resp.headers();
    let csp = h
        .get("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no Content-Security-Policy"))
        .to_str()
        .unwrap();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "img-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{what}: {csp} lacks {directive}");
    }
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{what}: {csp}"
    );
    assert_eq!(h["x-frame-options"], "DENY", "{what}");
    assert_eq!(h["x-content-type-options"], "nosniff", "{what}");
    assert_eq!(h["referrer-policy"], "same-origin", "{what}");
}

both!(every_response_carries_security_headers, |app| async move {
    app.system("shop", "project", json!({})).await;
    let (cookie, _) = session(&app, "ada", Role::Admin, "/systems/shop").await;
    let b = crate::pages::browser();
    for path in [
        "/",
        "/systems/shop",
        "/systems/shop/edit",
        "/systems/new",
        "/search?q=shop",
        "/agents",
        "/federation",
        "/account/password",
        "/assets/aramaki.css",
        "/assets/aramaki.js",
        "/no-such-page",
    ] {
        let resp = b
            .get(app.url(path))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_secure_headers(&resp, path);
    }
    let resp = b.get(app.url("/login")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_secure_headers(&resp, "/login");
    let resp = b.get(app.url("/systems/shop")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::SEE_OTHER,
        "anonymous: to the login page"
    );
    assert_secure_headers(&resp, "redirect to /login");
    for (path, token) in [
        ("/api/v1/systems/shop", app.token.as_str()),
        ("/api/v1/systems/nothing", app.token.as_str()),
        ("/api/v1/systems", "ark_forged_token"),
        ("/api/v1/health", ""),
        ("/api/v1/openapi.json", ""),
    ] {
        let resp = app
            .http
            .get(app.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_secure_headers(&resp, path);
    }
    // No page leans on inline script or style, which the policy would block.
    for path in [
        "/",
        "/systems/shop",
        "/systems/shop/edit",
        "/agents",
        "/federation",
    ] {
        let html = b
            .get(app.url(path))
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            !html.contains("<script>") && !html.contains("<style"),
            "{path}"
        );
        assert!(
            !html.contains(" style=") && !html.contains("hx-on"),
            "{path}"
        );
        for script in html.split("<script").skip(1) {
            assert!(
                script.trim_start().starts_with("src=\"/assets/"),
                "{path}: <script{script}"
            );
        }
        assert!(html.contains("\"includeIndicatorStyles\": false"), "{path}");
    }
});

both!(handbook_images_from_elsewhere_are_links, |app| async move {
    app.system("shop", "project", json!({})).await;
    let (status, v) = app
        .call(
            Method::PATCH,
            "/api/v1/systems/shop",
            Some(json!({"handbook": "Restart php-fpm.\n\n![](https://tracker.example/pixel.gif?reader=1)\n\n![the diagram](/assets/shop.png)\n\n![sneaky](//tracker.example/p.gif)"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (cookie, _) = session(&app, "ada", Role::Viewer, "/systems/shop").await;
    let html = crate::pages::browser()
        .get(app.url("/systems/shop"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let handbook = html.split("class=\"handbook\"").nth(1).unwrap();
    assert!(
        !handbook.contains("<img src=\"https://tracker"),
        "{handbook}"
    );
    assert!(!handbook.contains("<img src=\"//tracker"), "{handbook}");
    assert!(
        handbook.contains("<a href=\"https://tracker.example/pixel.gif?reader=1\">"),
        "{handbook}"
    );
    assert!(
        handbook.contains("<img src=\"/assets/shop.png\" alt=\"the diagram\""),
        "{handbook}"
    );
});

/// The value of a metric line (`name{labels}`) as this process reports it.
fn metric(app: &TestApp, line: &str) -> u64 {
    let text = app.ctx.metrics.render(app.ctx.db.pool_stats());
    text.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line} in\n{text}"))
}

/// A client that sends the start of a request head and then nothing.
async fn slow_client(app: &TestApp) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = app.base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: slow\r\nX-Slow: 1")
        .await
        .unwrap();
    s
}

/// Reads until the server closes the connection, failing after `secs`.
async fn closed_within(s: &mut tokio::net::TcpStream, secs: u64, what: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    match tokio::time::timeout(
        std::time::Duration::from_secs(secs),
        s.read_to_end(&mut out),
    )
    .await
    {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => panic!("the server did not close {what} within {secs} s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_after_the_header_timeout() {
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, |c| {
        c.web.header_read_timeout_secs = 1;
    })
    .await;
    let started = std::time::Instant::now();
    let mut slow = slow_client(&app).await;
    closed_within(&mut slow, 10, "a connection that never finished its head").await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    crate::agent_e2e::eventually("the header timeout to be counted", || async {
        (metric(&app, "aramaki_http_timeouts_total{phase=\"header\"}") == 1).then_some(())
    })
    .await;
    // A client that trickles its head a byte at a time is cut as well: the
    // timeout is for the whole head, not for each read.
    let addr = app.base.trim_start_matches("http://").to_owned();
    let (mut reader, mut writer) = tokio::net::TcpStream::connect(&addr)
        .await
        .unwrap()
        .into_split();
    let trickle = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let head = b"GET /api/v1/health HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let mut pace = tokio::time::interval(std::time::Duration::from_millis(100));
        for byte in head {
            pace.tick().await;
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        reader.read_to_end(&mut out).await
    })
    .await;
    assert!(read.is_ok(), "the trickling client was not cut within 10 s");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "cut after the header timeout, before the head was complete ({:?})",
        started.elapsed()
    );
    assert!(
        !String::from_utf8_lossy(&out).contains("200 OK"),
        "the trickled request was never served"
    );
    trickle.abort();
    // A prompt client on the same server is served as usual.
    let (status, _) = app.call(Method::GET, "/api/v1/health", None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_body_is_refused_after_the_body_timeout() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, |c| {
        c.web.body_read_timeout_secs = 1;
    })
    .await;
    app.system("shop", "project", json!({})).await;
    let before = app.counts().await;
    for (path, ctype) in [
        ("/api/v1/events", "application/json"),
        ("/systems/shop/notes", "application/x-www-form-urlencoded"),
    ] {
        let addr = app.base.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: {ctype}\r\nContent-Length: 200\r\n\r\n{{\"system\":",
            app.token
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let answer = closed_within(&mut s, 10, "a connection with a slow body").await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(
            answer.contains("web.body_read_timeout_secs"),
            "{path}: {answer}"
        );
    }
    assert_eq!(
        metric(&app, "aramaki_http_timeouts_total{phase=\"body\"}"),
        2
    );
    assert_eq!(app.counts().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_when_slow_clients_fill_the_connection_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, |c| {
        c.web.max_connections = 4;
        c.web.max_long_lived_connections = Some(4);
        c.web.header_read_timeout_secs = 60;
    })
    .await;
    app.system("shop", "project", json!({})).await;
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(slow_client(&app).await);
    }
    crate::agent_e2e::eventually("four open connections", || async {
        (metric(&app, "aramaki_http_connections_open") == 4).then_some(())
    })
    .await;
    // The limit is reached by slow clients; a health check still answers,
    // at once, and the oldest slow client made room for it.
    let health = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        reqwest::Client::new().get(app.url("/api/v1/health")).send(),
    )
    .await
    .expect("health answered in time")
    .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    closed_within(&mut slow[0], 10, "the oldest slow connection").await;
    assert!(
        metric(
            &app,
            "aramaki_http_connections_refused_total{which=\"idle\"}"
        ) >= 1
    );
    assert!(metric(&app, "aramaki_http_connections_open") <= 4);
    drop(slow);
    // Connections with a request in flight are not closed for newcomers:
    // four live streams fill the limit, and a fifth connection is refused.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let addr = app.base.trim_start_matches("http://").to_owned();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "GET /api/v1/systems/shop/timeline/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
            app.token
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Wait for the stream's response head: its request is in flight.
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("the stream's response head in time")
                .unwrap();
            assert!(
                n > 0,
                "the stream was closed: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        streams.push(s);
    }
    crate::agent_e2e::eventually("four streams in flight", || async {
        (metric(&app, "aramaki_http_connections_open") == 4).then_some(())
    })
    .await;
    let refused_before = metric(
        &app,
        "aramaki_http_connections_refused_total{which=\"new\"}",
    );
    let addr = app.base.trim_start_matches("http://");
    let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = fifth
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = closed_within(&mut fifth, 10, "a connection over the limit").await;
    assert!(answer.is_empty(), "{answer}");
    assert_eq!(
        metric(
            &app,
            "aramaki_http_connections_refused_total{which=\"new\"}"
        ),
        refused_before + 1
    );
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_count_against_the_limit_until_they_close() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, |c| {
        c.web.max_connections = 1;
        c.web.max_long_lived_connections = Some(1);
    })
    .await;
    let addr = app.base.trim_start_matches("http://").to_owned();
    // An anonymous upgrade (an agent that has not said hello yet) is open.
    let ws = tokio_tungstenite::connect_async(format!(
        "ws://{addr}{}",
        aramaki_protocol::agent::CONNECT_PATH
    ))
    .await
    .unwrap()
    .0;
    crate::agent_e2e::eventually("the WebSocket to be counted", || async {
        (metric(&app, "aramaki_http_connections_open") == 1).then_some(())
    })
    .await;
    // It is neither closed for a newcomer nor forgotten: the newcomer is refused.
    let mut other = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = other
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = closed_within(&mut other, 10, "a connection over the limit").await;
    assert!(answer.is_empty(), "{answer}");
    assert_eq!(
        metric(
            &app,
            "aramaki_http_connections_refused_total{which=\"new\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &app,
            "aramaki_http_connections_refused_total{which=\"idle\"}"
        ),
        0
    );
    // Once the session closes, its place is free again.
    drop(ws);
    crate::agent_e2e::eventually("the closed WebSocket to give its place back", || async {
        (metric(&app, "aramaki_http_connections_open") == 0).then_some(())
    })
    .await;
    let health = reqwest::Client::new()
        .get(app.url("/api/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_form_is_still_too_large() {
    let app = TestApp::start(crate::support::Backend::Sqlite).await;
    app.system("shop", "project", json!({})).await;
    let (cookie, csrf) = session(&app, "olga", Role::Admin, "/systems/shop").await;
    let before = app.counts().await;
    let resp = crate::pages::browser()
        .post(app.url("/systems/shop/notes"))
        .header(COOKIE, &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("title", "big"),
            ("body", &"x".repeat(1024 * 1024 + 10)),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.counts().await, before);
}

/// Opens a WebSocket to the agents' endpoint from `from` and says nothing:
/// whether the server answered 101 (and kept the socket).
async fn silent_upgrade(app: &TestApp, from: [u8; 4]) -> (bool, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        aramaki_protocol::agent::CONNECT_PATH
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the upgrade's answer in time")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    (got.starts_with(b"HTTP/1.1 101"), s)
}

// Sockets that upgrade and then say nothing cannot take every connection:
// they have a budget of their own, in all and per source, and ordinary
// requests still answer when it is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_websockets_cannot_shut_out_ordinary_requests() {
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, |c| {
        c.web.max_connections = 8;
        c.web.max_long_lived_connections = Some(5);
        c.web.max_long_lived_per_source = 2;
    })
    .await;
    let mut held = Vec::new();
    let mut upgraded = Vec::new();
    for from in [
        [127, 0, 0, 1],
        [127, 0, 0, 2],
        [127, 0, 0, 3],
        [127, 0, 0, 4],
    ] {
        for _ in 0..3 {
            let (ok, s) = silent_upgrade(&app, from).await;
            upgraded.push((from[3], ok));
            held.push(s);
        }
    }
    let per_source = |host: u8| upgraded.iter().filter(|(h, ok)| *h == host && *ok).count();
    assert_eq!(per_source(1), 2, "two per source: {upgraded:?}");
    assert_eq!(per_source(2), 2, "{upgraded:?}");
    assert_eq!(
        upgraded.iter().filter(|(_, ok)| *ok).count(),
        5,
        "five in all: {upgraded:?}"
    );
    // Health and the login page still answer, one after another.
    let client = crate::pages::browser();
    for path in ["/api/v1/health", "/login", "/api/v1/health", "/login"] {
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.get(app.url(path)).send(),
        )
        .await
        .expect("an answer in time")
        .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    drop(held);
}
