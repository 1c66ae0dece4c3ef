//! Pages over HTTP: login, sessions, CSRF, the dashboard. (Browser tests in
//! Chromium come with the rest of the web UI.)

use aramaki::users::{self, Role};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{redirect, StatusCode};
use serde_json::json;

use crate::both;
use crate::support::TestApp;

/// An HTTP client that, like a test should, sees redirects instead of following them.
pub(crate) fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .unwrap()
}

async fn person(app: &TestApp, name: &str, role: Option<Role>, must_change: bool) {
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        name,
        &format!("{name} (person)"),
        role,
        "correct horse battery",
        must_change,
    )
    .await
    .unwrap();
}

/// Logs in; returns the session cookie ("aramaki_session=…").
async fn login(app: &TestApp, name: &str, password: &str) -> reqwest::Response {
    browser()
        .post(app.url("/login"))
        .form(&[("username", name), ("password", password), ("next", "/")])
        .send()
        .await
        .unwrap()
}

fn session_cookie(resp: &reqwest::Response) -> String {
    let set = resp
        .headers()
        .get(SET_COOKIE)
        .expect("a cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    set.split(';').next().unwrap().to_owned()
}

async fn get(app: &TestApp, path: &str, cookie: &str) -> reqwest::Response {
    browser()
        .get(app.url(path))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap()
}

pub(crate) fn csrf_of(html: &str) -> String {
    let at =
        html.find("name=\"csrf\" value=\"").expect("a csrf field") + "name=\"csrf\" value=\"".len();
    html[at..].split('"').next().unwrap().to_owned()
}

both!(login_sessions_and_the_dashboard, |app| async move {
    app.system("dc1", "infrastructure", json!({})).await;
    app.system("shop", "project", json!({})).await;
    app.event("shop", "deploy", "Deployed <b>4.2</b>", json!({}))
        .await;
    person(&app, "ada", Some(Role::Viewer), false).await;

    let anon = get(&app, "/", "").await;
    assert_eq!(anon.status(), StatusCode::SEE_OTHER);
    assert_eq!(anon.headers()[LOCATION], "/login?next=%2F");
    let form = browser()
        .get(app.url("/login?next=/systems/shop"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        form.contains("name=\"next\" value=\"/systems/shop\""),
        "{form}"
    );

    let wrong = login(&app, "ada", "not her password").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("Wrong username or password."));
    let nobody = login(&app, "nobody", "whatever").await;
    assert_eq!(nobody.status(), StatusCode::UNAUTHORIZED);

    let ok = login(&app, "ada", "correct horse battery").await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(ok.headers()[LOCATION], "/");
    let cookie = session_cookie(&ok);
    let dash = get(&app, "/", &cookie).await;
    assert_eq!(dash.status(), StatusCode::OK);
    let html = dash.text().await.unwrap();
    assert!(
        html.contains("href=\"/systems/dc1\"") && html.contains("href=\"/systems/shop\""),
        "{html}"
    );
    assert!(
        html.contains("Deployed &lt;b&gt;4.2&lt;/b&gt;"),
        "event titles are escaped: {html}"
    );
    assert!(html.contains("/assets/aramaki.css"));
    let css = browser()
        .get(app.url("/assets/aramaki.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");

    // Logging out needs the session's CSRF token.
    let csrf = csrf_of(&html);
    let forged = browser()
        .post(app.url("/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let none = browser()
        .post(app.url("/logout"))
        .header(COOKIE, &cookie)
        .form(&[("x", "y")])
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        get(&app, "/", &cookie).await.status(),
        StatusCode::OK,
        "still logged in"
    );
    let out = browser()
        .post(app.url("/logout"))
        .header(COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert!(out.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        get(&app, "/", &cookie).await.status(),
        StatusCode::SEE_OTHER,
        "the session is over"
    );

    // A login posted from another site is refused.
    let cross = browser()
        .post(app.url("/login"))
        .header("Origin", "https://evil.example")
        .form(&[("username", "ada"), ("password", "correct horse battery")])
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), StatusCode::FORBIDDEN);
    // Redirects after login stay on this site.
    let away = browser()
        .post(app.url("/login"))
        .form(&[
            ("username", "ada"),
            ("password", "correct horse battery"),
            ("next", "https://evil.example/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(away.headers()[LOCATION], "/");
});

both!(
    the_dashboard_shows_only_what_a_user_may_see,
    |app| async move {
        app.system("dc1", "infrastructure", json!({})).await;
        app.system("shop", "project", json!({})).await;
        users::create_user(
            &app.ctx,
            &crate::support::tester(),
            "sam",
            "Sam",
            None,
            "correct horse battery",
            false,
        )
        .await
        .unwrap();
        users::grant(
            &app.ctx,
            &aramaki::timeline::Actor::user("t", "T"),
            "sam",
            "shop",
            Role::Viewer,
        )
        .await
        .unwrap();
        let cookie = session_cookie(&login(&app, "sam", "correct horse battery").await);
        let html = get(&app, "/", &cookie).await.text().await.unwrap();
        assert!(html.contains("/systems/shop"));
        assert!(!html.contains("/systems/dc1"), "{html}");
    }
);

both!(
    one_time_passwords_must_be_changed_and_sessions_expire,
    |app| async move {
        person(&app, "bob", Some(Role::Operator), true).await;
        let first = login(&app, "bob", "correct horse battery").await;
        assert_eq!(first.headers()[LOCATION], "/account/password");
        let cookie = session_cookie(&first);
        let other = session_cookie(&login(&app, "bob", "correct horse battery").await);
        let page = get(&app, "/account/password", &cookie)
            .await
            .text()
            .await
            .unwrap();
        assert!(page.contains("one-time password"));
        let csrf = csrf_of(&page);
        let change = |current: &'static str, new: &'static str, confirm: &'static str| {
            browser()
                .post(app.url("/account/password"))
                .header(COOKIE, &cookie)
                .form(&[
                    ("csrf", csrf.as_str()),
                    ("current", current),
                    ("new", new),
                    ("confirm", confirm),
                ])
                .send()
        };
        let r = change("wrong", "a much longer secret", "a much longer secret")
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(r
            .text()
            .await
            .unwrap()
            .contains("The current password is wrong."));
        let r = change("correct horse battery", "short", "short")
            .await
            .unwrap();
        assert!(r.text().await.unwrap().contains("at least 12 characters"));
        let r = change(
            "correct horse battery",
            "a much longer secret",
            "a different one!",
        )
        .await
        .unwrap();
        assert!(r
            .text()
            .await
            .unwrap()
            .contains("The two new passwords differ."));
        let r = change(
            "correct horse battery",
            "a much longer secret",
            "a much longer secret",
        )
        .await
        .unwrap();
        // A one-time password replaced, the user continues where they were going.
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(r.headers()[LOCATION], "/");
        let trail = app
            .get("/api/v1/systems/aramaki/timeline?kind=user.password_changed")
            .await;
        assert_eq!(trail["items"][0]["data"]["user"], "bob", "on the record");
        assert_eq!(
            get(&app, "/", &other).await.status(),
            StatusCode::SEE_OTHER,
            "other sessions end"
        );
        assert_eq!(get(&app, "/", &cookie).await.status(), StatusCode::OK);
        assert_eq!(
            login(&app, "bob", "a much longer secret").await.headers()[LOCATION],
            "/"
        );

        // Idle expiry (12 h by default), by the instance's clock.
        app.clock.advance(jiff::SignedDuration::from_hours(13));
        assert_eq!(
            get(&app, "/", &cookie).await.status(),
            StatusCode::SEE_OTHER
        );
    }
);

both!(
    the_system_page_answers_the_3am_questions,
    |app| async move {
        app.system("dc1", "infrastructure", json!({})).await;
        app.system("shop", "project", json!({"customer": "acme"}))
            .await;
        app.system("db", "service", json!({})).await;
        app.include("dc1", "shop").await;
        app.include("shop", "db").await;
        let patch = |body: serde_json::Value| {
            app.call(reqwest::Method::PATCH, "/api/v1/systems/shop", Some(body))
        };
        let (status, _) = patch(json!({
        "handbook": "## Rules\n\nFlush the cache **any time**.\n\n<script>alert('pwned')</script>\n\n[evil](javascript:alert(1))",
        "contacts": [{"name": "Second", "escalation": 2}, {"name": "First", "escalation": 1, "reach": "+49 30 1"}],
        "links": [{"title": "Shop dashboard", "url": "https://grafana.example/d/shop", "kind": "dashboard"}]
    }))
    .await;
        assert_eq!(status, StatusCode::OK);
        let (status, _) = app
        .call(reqwest::Method::PATCH, "/api/v1/systems/dc1", Some(json!({"links": [{"title": "DC power", "url": "https://dcim.example/dc1", "kind": "dashboard"}]})))
        .await;
        assert_eq!(status, StatusCode::OK);
        app.event(
            "db",
            "state",
            "Replication lag 40 s",
            json!({"severity": "warning"}),
        )
        .await;
        app.event(
            "shop",
            "note",
            "Flushed the cache",
            json!({"body": "Because of *stale* pages"}),
        )
        .await;

        users::create_user(
            &app.ctx,
            &crate::support::tester(),
            "vic",
            "Vic",
            None,
            "correct horse battery",
            false,
        )
        .await
        .unwrap();
        users::grant(
            &app.ctx,
            &aramaki::timeline::Actor::user("t", "T"),
            "vic",
            "dc1",
            Role::Viewer,
        )
        .await
        .unwrap();
        let cookie = session_cookie(&login(&app, "vic", "correct horse battery").await);
        let resp = get(&app, "/systems/shop", &cookie).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let html = resp.text().await.unwrap();
        // Rules, rendered and inert.
        assert!(html.contains("<strong>any time</strong>"), "{html}");
        assert!(
            !html.contains("<script>alert"),
            "a script in the handbook is inert"
        );
        assert!(html.contains("&lt;script&gt;"));
        assert!(
            !html.to_lowercase().contains("href=\"javascript:"),
            "no script links"
        );
        // Contacts in escalation order; links incl. inherited ones with their origin.
        assert!(html.find("First").unwrap() < html.find("Second").unwrap());
        assert!(html.contains("Shop dashboard") && html.contains("DC power"));
        assert!(
            html.contains("inherited from <a href=\"/systems/dc1\">dc1</a>"),
            "{html}"
        );
        // Status layers expand in place; the warning below is visible from the top.
        assert!(
            html.contains("<details class=\"layer layer-top\" open>"),
            "{html}"
        );
        assert!(
            html.contains(
                "<span class=\"badge warning\">warning</span> <a href=\"/systems/shop\">"
            ),
            "{html}"
        );
        assert!(html.contains("Replication lag 40 s"));
        // What happened: the rollup with bodies; no note form for a viewer.
        assert!(html.contains("Flushed the cache") && html.contains("<em>stale</em>"));
        assert!(
            !html.contains("action=\"/systems/shop/notes\""),
            "a viewer gets no note form"
        );
        let csrf = csrf_of(&html);
        let refused = browser()
            .post(app.url("/systems/shop/notes"))
            .header(COOKIE, &cookie)
            .form(&[("csrf", csrf.as_str()), ("title", "sneaky")])
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert!(refused
            .text()
            .await
            .unwrap()
            .contains("needs the operator role"));

        // Structure, both ways; a system outside the grant is not found.
        assert!(html.contains("href=\"/systems/db\""));
        assert_eq!(
            get(&app, "/systems/nowhere", &cookie).await.status(),
            StatusCode::NOT_FOUND
        );
        app.system("secret", "project", json!({})).await;
        assert_eq!(
            get(&app, "/systems/secret", &cookie).await.status(),
            StatusCode::NOT_FOUND
        );
    }
);

both!(operators_add_notes_with_a_csrf_token, |app| async move {
    app.system("shop", "project", json!({})).await;
    person(&app, "olga", Some(Role::Operator), false).await;
    let cookie = session_cookie(&login(&app, "olga", "correct horse battery").await);
    let html = get(&app, "/systems/shop", &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("action=\"/systems/shop/notes\""));
    let csrf = csrf_of(&html);
    let post = |token: &'static str, csrf: String| {
        let cookie = cookie.clone();
        let url = app.url("/systems/shop/notes");
        async move {
            let t = if token.is_empty() {
                csrf
            } else {
                token.to_owned()
            };
            browser()
                .post(url)
                .header(COOKIE, cookie)
                .form(&[
                    ("csrf", t.as_str()),
                    ("title", "Restarted php-fpm"),
                    ("body", "on **web-2**"),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        post("forged", csrf.clone()).await.status(),
        StatusCode::FORBIDDEN
    );
    let ok = post("", csrf.clone()).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    assert_eq!(ok.headers()[LOCATION], "/systems/shop");
    let t = app.get("/api/v1/systems/shop/timeline?kind=note").await;
    assert_eq!(t["items"][0]["title"], "Restarted php-fpm");
    assert_eq!(t["items"][0]["actor"]["name"], "olga (person)");
    let html = get(&app, "/systems/shop", &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains("Restarted php-fpm") && html.contains("<strong>web-2</strong>"));
});

both!(
    search_finds_systems_and_events_the_user_may_see,
    |app| async move {
        app.system("shop", "project", json!({"customer": "acme"}))
            .await;
        app.system("billing", "project", json!({"customer": "initech"}))
            .await;
        app.event(
            "shop",
            "note",
            "Varnish flushed",
            json!({"body": "stale checkout pages"}),
        )
        .await;
        app.event("billing", "note", "Varnish config reviewed", json!({}))
            .await;
        users::create_user(
            &app.ctx,
            &crate::support::tester(),
            "sam",
            "Sam",
            None,
            "correct horse battery",
            false,
        )
        .await
        .unwrap();
        users::grant(
            &app.ctx,
            &aramaki::timeline::Actor::user("t", "T"),
            "sam",
            "shop",
            Role::Viewer,
        )
        .await
        .unwrap();
        let cookie = session_cookie(&login(&app, "sam", "correct horse battery").await);
        let html = get(&app, "/search?q=ACME", &cookie)
            .await
            .text()
            .await
            .unwrap();
        assert!(
            html.contains("href=\"/systems/shop\""),
            "labels are searched: {html}"
        );
        let html = get(&app, "/search?q=varnish", &cookie)
            .await
            .text()
            .await
            .unwrap();
        assert!(html.contains("Varnish flushed"), "{html}");
        assert!(
            !html.contains("Varnish config reviewed"),
            "billing is not sam's"
        );
        let html = get(&app, "/search?q=checkout", &cookie)
            .await
            .text()
            .await
            .unwrap();
        assert!(html.contains("Varnish flushed"), "bodies are searched");
        assert_eq!(
            get(&app, "/search?q=x", "").await.status(),
            StatusCode::SEE_OTHER
        );
    }
);

both!(the_timeline_scrolls_on_and_updates_live, |app| async move {
    app.system("shop", "project", json!({})).await;
    person(&app, "ada", Some(Role::Viewer), false).await;
    let cookie = session_cookie(&login(&app, "ada", "correct horse battery").await);
    let batch: Vec<serde_json::Value> = (0..60)
        .map(|i| json!({"system": "shop", "kind": "note", "title": format!("note {i:02}")}))
        .collect();
    assert_eq!(
        app.post("/api/v1/events/batch", json!({"events": batch}))
            .await
            .0,
        StatusCode::CREATED
    );

    let html = get(&app, "/systems/shop?kind=note", &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        html.contains("/assets/htmx.min.2.0.11.js"),
        "htmx is served from the binary"
    );
    let at = html.find("hx-get=\"").expect("an infinite-scroll link") + "hx-get=\"".len();
    let fragment_url = html[at..].split('"').next().unwrap().replace("&amp;", "&");
    assert!(
        fragment_url.starts_with("/systems/shop/events?cursor="),
        "{fragment_url}"
    );
    assert!(
        fragment_url.contains("kind=note"),
        "the filter is kept: {fragment_url}"
    );
    let fragment = get(&app, &fragment_url, &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(!fragment.contains("<html"), "a fragment, not a page");
    assert_eq!(
        fragment.matches("<li class=\"sev-info\">").count(),
        10,
        "the ten oldest notes"
    );
    assert!(
        !fragment.contains("Older events"),
        "the end of the timeline"
    );
    let js = browser()
        .get(app.url("/assets/htmx.min.2.0.11.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), StatusCode::OK);
    assert!(js.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));

    // Live: a new note arrives as a list item over server-sent events.
    let live = get(&app, "/systems/shop/live", &cookie).await;
    assert_eq!(live.status(), StatusCode::OK);
    app.event("shop", "note", "Live <note>", json!({})).await;
    let mut stream = live.bytes_stream();
    let mut buf = String::new();
    while !buf.contains("\n\n") {
        use futures_util::StreamExt;
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(20), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(buf.contains("event: event"), "{buf}");
    assert!(
        buf.contains("<li class=\"sev-info\">") && buf.contains("Live &lt;note&gt;"),
        "{buf}"
    );
    assert_eq!(
        get(&app, "/systems/nope/live", &cookie).await.status(),
        StatusCode::NOT_FOUND
    );
});

both!(
    admins_edit_create_include_and_exclude_through_forms,
    |app| async move {
        app.system("shop", "project", json!({})).await;
        app.system("db", "service", json!({})).await;
        app.include("shop", "db").await;
        person(&app, "root", Some(Role::Admin), false).await;
        person(&app, "vera", Some(Role::Viewer), false).await;
        let admin = session_cookie(&login(&app, "root", "correct horse battery").await);
        let viewer = session_cookie(&login(&app, "vera", "correct horse battery").await);

        // A viewer sees no edit link and is refused the form.
        assert!(!get(&app, "/systems/shop", &viewer)
            .await
            .text()
            .await
            .unwrap()
            .contains("id=\"edit-system\""));
        assert_eq!(
            get(&app, "/systems/shop/edit", &viewer).await.status(),
            StatusCode::FORBIDDEN
        );
        let page = get(&app, "/systems/shop", &admin)
            .await
            .text()
            .await
            .unwrap();
        assert!(page.contains("id=\"edit-system\""));
        let form = get(&app, "/systems/shop/edit", &admin)
            .await
            .text()
            .await
            .unwrap();
        let csrf = csrf_of(&form);
        let viewer_csrf = csrf_of(
            &get(&app, "/systems/shop", &viewer)
                .await
                .text()
                .await
                .unwrap(),
        );
        let refused = browser()
            .post(app.url("/systems/shop/edit"))
            .header(COOKIE, &viewer)
            .form(&[
                ("csrf", viewer_csrf.as_str()),
                ("title", "Mine now"),
                ("category", "project"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);

        let save = |fields: Vec<(&'static str, &'static str)>| {
            let mut all = vec![("csrf", csrf.clone())];
            all.extend(fields.into_iter().map(|(k, v)| (k, v.to_owned())));
            browser()
                .post(app.url("/systems/shop/edit"))
                .header(COOKIE, &admin)
                .form(&all)
                .send()
        };
        let bad = save(vec![
            ("title", "Shop"),
            ("category", "project"),
            ("links", "dashbord | Grafana | https://g.example/d"),
        ])
        .await
        .unwrap();
        assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let html = bad.text().await.unwrap();
        assert!(
            html.contains("id=\"e-links\""),
            "the error sits next to its field: {html}"
        );
        assert!(
            html.contains("line 1: unknown kind &#x27;dashbord&#x27;")
                || html.contains("line 1: unknown kind 'dashbord'"),
            "{html}"
        );
        assert!(
            html.contains("dashbord | Grafana"),
            "what was typed is kept"
        );
        let ok = save(vec![
            ("title", "Acme shop"),
            ("category", "project"),
            ("handbook", "Flush the cache any time."),
            ("labels", "customer=acme\nenv=production"),
            ("links", "dashboard | Grafana | https://g.example/d"),
            (
                "contacts",
                "Second | backup | +2 | 2\nFirst | on-call | +1 | 1",
            ),
        ])
        .await
        .unwrap();
        assert_eq!(ok.status(), StatusCode::SEE_OTHER);
        let shop = app.get("/api/v1/systems/shop").await;
        assert_eq!(shop["title"], "Acme shop");
        assert_eq!(shop["labels"]["env"], "production");
        assert_eq!(shop["links"][0]["kind"], "dashboard");
        assert_eq!(shop["contacts"][0]["name"], "First");

        // Create.
        let new = |slug: &'static str| {
            browser()
                .post(app.url("/systems/new"))
                .header(COOKIE, &admin)
                .form(&[
                    ("csrf", csrf.as_str()),
                    ("slug", slug),
                    ("title", "Cache"),
                    ("category", "service"),
                ])
                .send()
        };
        let bad = new("Not A Slug").await.unwrap();
        assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(bad.text().await.unwrap().contains("id=\"e-slug\""));
        let created = new("cache").await.unwrap();
        assert_eq!(created.headers()[LOCATION], "/systems/cache");
        assert_eq!(
            get(&app, "/systems/new", &viewer).await.status(),
            StatusCode::FORBIDDEN
        );

        // Include: a cycle is explained in place (htmx) or on a page.
        let include = |child: &'static str, parent: &'static str, htmx: bool| {
            let mut req = browser()
                .post(app.url(&format!("/systems/{parent}/include")))
                .header(COOKIE, &admin)
                .form(&[("csrf", csrf.as_str()), ("child", child)]);
            if htmx {
                req = req.header("HX-Request", "true");
            }
            req.send()
        };
        let cycle = include("shop", "db", true).await.unwrap();
        assert_eq!(cycle.status(), StatusCode::OK);
        let text = cycle.text().await.unwrap();
        assert!(
            text.contains("would close a cycle: db → shop → db"),
            "{text}"
        );
        let cycle = include("shop", "db", false).await.unwrap();
        assert_eq!(cycle.status(), StatusCode::CONFLICT);
        let ok = include("cache", "shop", true).await.unwrap();
        assert_eq!(ok.headers()["hx-redirect"], "/systems/shop");
        let subs = app.get("/api/v1/systems/shop/subsystems").await;
        assert_eq!(subs["items"].as_array().unwrap().len(), 2);
        let out = browser()
            .post(app.url("/systems/shop/exclude/cache"))
            .header(COOKIE, &admin)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(out.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            app.get("/api/v1/systems/shop/subsystems").await["items"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
);

both!(
    new_since_the_last_visit_is_marked_per_user,
    |app| async move {
        app.system("shop", "project", json!({})).await;
        app.event("shop", "note", "old news", json!({})).await;
        person(&app, "ada", Some(Role::Viewer), false).await;
        person(&app, "bob", Some(Role::Viewer), false).await;
        let ada = session_cookie(&login(&app, "ada", "correct horse battery").await);
        let bob = session_cookie(&login(&app, "bob", "correct horse battery").await);
        let first = get(&app, "/systems/shop", &ada).await.text().await.unwrap();
        assert!(
            !first.contains("id=\"last-visit\""),
            "a first visit has nothing to compare with"
        );
        app.clock.advance(jiff::SignedDuration::from_mins(5));
        app.event("shop", "deploy", "fresh deploy", json!({})).await;
        let second = get(&app, "/systems/shop", &ada).await.text().await.unwrap();
        let marker = second.find("id=\"last-visit\"").expect("a marker");
        assert!(
            second.find("fresh deploy").unwrap() < marker
                && marker < second.find("old news").unwrap(),
            "{second}"
        );
        assert!(second.contains("<li class=\"sev-info new\">"));
        let third = get(&app, "/systems/shop", &ada).await.text().await.unwrap();
        assert!(!third.contains("id=\"last-visit\""), "seen now");
        let bobs = get(&app, "/systems/shop", &bob).await.text().await.unwrap();
        assert!(
            !bobs.contains("id=\"last-visit\""),
            "per user: bob's first visit"
        );
        // The time filter narrows to recent events.
        app.clock.advance(jiff::SignedDuration::from_hours(30));
        app.event("shop", "note", "today", json!({})).await;
        let ada = session_cookie(&login(&app, "ada", "correct horse battery").await);
        let recent = get(&app, "/systems/shop?since=24", &ada)
            .await
            .text()
            .await
            .unwrap();
        assert!(
            recent.contains("today") && !recent.contains("fresh deploy"),
            "{recent}"
        );
    }
);

/// Every page route, for every kind of caller: what they get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_route_is_authorised_for_each_role() {
    for backend in crate::support::backends() {
        let app = TestApp::start(backend).await;
        person(&app, "v", Some(Role::Viewer), false).await;
        person(&app, "o", Some(Role::Operator), false).await;
        person(&app, "a", Some(Role::Admin), false).await;
        let mut sessions = vec![("anonymous", String::new(), String::new())];
        for name in ["v", "o", "a"] {
            let cookie = session_cookie(&login(&app, name, "correct horse battery").await);
            let csrf = csrf_of(
                &get(&app, "/account/password", &cookie)
                    .await
                    .text()
                    .await
                    .unwrap(),
            );
            sessions.push((name, cookie, csrf));
        }
        // (method, path, form fields, expected status for anonymous, viewer, operator, admin)
        type Row = (
            &'static str,
            &'static str,
            &'static [(&'static str, &'static str)],
            [u16; 4],
        );
        let rows: Vec<Row> = vec![
            ("GET", "/", &[], [303, 200, 200, 200]),
            ("GET", "/search?q=shop", &[], [303, 200, 200, 200]),
            ("GET", "/systems/shop", &[], [303, 200, 200, 200]),
            ("GET", "/systems/shop/events", &[], [303, 200, 200, 200]),
            ("GET", "/systems/shop/edit", &[], [303, 403, 403, 200]),
            ("GET", "/systems/new", &[], [303, 403, 403, 200]),
            ("GET", "/account/password", &[], [303, 200, 200, 200]),
            (
                "POST",
                "/systems/shop/notes",
                &[("title", "checked")],
                [303, 403, 303, 303],
            ),
            (
                "POST",
                "/systems/shop/edit",
                &[("title", "Shop"), ("category", "project")],
                [303, 403, 403, 303],
            ),
            (
                "POST",
                "/systems/new",
                &[("slug", "made"), ("title", "Made"), ("category", "host")],
                [303, 403, 403, 303],
            ),
            (
                "POST",
                "/systems/shop/include",
                &[("child", "db")],
                [303, 403, 403, 303],
            ),
            (
                "POST",
                "/systems/shop/exclude/db",
                &[],
                [303, 403, 403, 303],
            ),
        ];
        for (method, path, fields, expected) in rows {
            for ((who, cookie, csrf), want) in sessions.iter().zip(expected) {
                // Fresh fixtures for each call, so earlier changes do not interfere.
                let _ = app
                    .call(
                        reqwest::Method::DELETE,
                        "/api/v1/systems/shop?force=true",
                        None,
                    )
                    .await;
                let _ = app
                    .call(
                        reqwest::Method::DELETE,
                        "/api/v1/systems/db?force=true",
                        None,
                    )
                    .await;
                let _ = app
                    .call(
                        reqwest::Method::DELETE,
                        "/api/v1/systems/made?force=true",
                        None,
                    )
                    .await;
                app.system("shop", "project", json!({})).await;
                app.system("db", "service", json!({})).await;
                if path.contains("exclude") {
                    app.include("shop", "db").await;
                }
                let resp = if method == "GET" {
                    get(&app, path, cookie).await
                } else {
                    let mut form: Vec<(&str, &str)> = fields.to_vec();
                    form.push(("csrf", csrf.as_str()));
                    browser()
                        .post(app.url(path))
                        .header(COOKIE, cookie.as_str())
                        .form(&form)
                        .send()
                        .await
                        .unwrap()
                };
                assert_eq!(
                    resp.status().as_u16(),
                    want,
                    "{method} {path} as {who} ({backend:?})"
                );
                if *who == "anonymous" {
                    assert!(
                        resp.headers()[LOCATION]
                            .to_str()
                            .unwrap()
                            .starts_with("/login?next="),
                        "{method} {path}"
                    );
                }
            }
        }
    }
}

both!(htmx_form_posts_answer_in_place, |app| async move {
    app.system("shop", "project", json!({})).await;
    person(&app, "root", Some(Role::Admin), false).await;
    let cookie = session_cookie(&login(&app, "root", "correct horse battery").await);
    let csrf = csrf_of(
        &get(&app, "/systems/shop", &cookie)
            .await
            .text()
            .await
            .unwrap(),
    );
    let htmx = |path: &'static str, fields: Vec<(&'static str, &'static str)>| {
        let mut form = vec![("csrf", csrf.clone())];
        form.extend(fields.into_iter().map(|(k, v)| (k, v.to_owned())));
        browser()
            .post(app.url(path))
            .header(COOKIE, &cookie)
            .header("HX-Request", "true")
            .form(&form)
            .send()
    };
    let noted = htmx("/systems/shop/notes", vec![("title", "checked the disks")])
        .await
        .unwrap();
    assert_eq!(noted.status(), StatusCode::OK);
    assert!(noted.text().await.unwrap().contains("Noted."));
    let refused = htmx("/systems/shop/notes", vec![("title", " ")])
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.text().await.unwrap().contains("role=\"alert\""));
    let saved = htmx(
        "/systems/shop/edit",
        vec![("title", "Shop"), ("category", "project")],
    )
    .await
    .unwrap();
    assert_eq!(saved.headers()["hx-redirect"], "/systems/shop");
    // The CSRF token also travels as htmx's header.
    let by_header = browser()
        .post(app.url("/systems/shop/notes"))
        .header(COOKIE, &cookie)
        .header("HX-Request", "true")
        .header("X-CSRF-Token", csrf.as_str())
        .form(&[("title", "via header")])
        .send()
        .await
        .unwrap();
    assert_eq!(by_header.status(), StatusCode::OK);
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_end_at_their_absolute_limit_and_everywhere_on_request() {
    for backend in crate::support::backends() {
        let app = TestApp::start_tweaked(backend, |c| c.web.session_max_hours = 1).await;
        person(&app, "ada", Some(Role::Viewer), false).await;
        let a = session_cookie(&login(&app, "ada", "correct horse battery").await);
        // Active every 20 minutes, so never idle, yet over after an hour.
        for _ in 0..2 {
            app.clock.advance(jiff::SignedDuration::from_mins(20));
            assert_eq!(get(&app, "/", &a).await.status(), StatusCode::OK);
        }
        app.clock.advance(jiff::SignedDuration::from_mins(21));
        assert_eq!(
            get(&app, "/", &a).await.status(),
            StatusCode::SEE_OTHER,
            "absolute expiry ({backend:?})"
        );

        let laptop = session_cookie(&login(&app, "ada", "correct horse battery").await);
        let phone = session_cookie(&login(&app, "ada", "correct horse battery").await);
        let csrf = csrf_of(
            &get(&app, "/account/password", &laptop)
                .await
                .text()
                .await
                .unwrap(),
        );
        let out = browser()
            .post(app.url("/logout/everywhere"))
            .header(COOKIE, &laptop)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(out.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            get(&app, "/", &laptop).await.status(),
            StatusCode::SEE_OTHER
        );
        assert_eq!(
            get(&app, "/", &phone).await.status(),
            StatusCode::SEE_OTHER,
            "everywhere ({backend:?})"
        );
    }
}

both!(next_after_login_never_leaves_the_site, |app| async move {
    person(&app, "ada", Some(Role::Viewer), false).await;
    // Browsers drop tabs and newlines and read `\` as `/`: each of these
    // would be `//evil.example`, another host.
    for next in [
        "/\t/evil.example",
        "/\n/evil.example",
        "/\r\n/evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "//evil.example",
        "https://evil.example",
    ] {
        let form = browser()
            .get(app.url("/login"))
            .query(&[("next", next)])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            form.contains("name=\"next\" value=\"/\""),
            "{next:?}: {form}"
        );
        let ok = browser()
            .post(app.url("/login"))
            .form(&[
                ("username", "ada"),
                ("password", "correct horse battery"),
                ("next", next),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(ok.headers()[LOCATION], "/", "{next:?}");
    }
    let ok = browser()
        .post(app.url("/login"))
        .form(&[
            ("username", "ada"),
            ("password", "correct horse battery"),
            ("next", "/systems/shop"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.headers()[LOCATION], "/systems/shop");
});
