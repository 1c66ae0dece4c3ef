//! Access control where features meet: selectors and grants, the instance's
//! own system, check definitions and their secrets, one-time passwords,
//! refused attempts and login throttling.

use aramaki::users::Role;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::both;
use crate::support::TestApp;

/// Slugs of the layers of a status, recursively.
fn layer_slugs(layer: &Value, out: &mut Vec<String>) {
    if let Some(s) = layer["slug"].as_str() {
        out.push(s.to_owned());
    }
    for l in layer["layers"].as_array().into_iter().flatten() {
        layer_slugs(l, out);
    }
}

/// What `token` sees of `slug`: its timeline's system slugs, its status
/// layers and its subsystems.
async fn seen_below(
    app: &TestApp,
    token: &str,
    slug: &str,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (status, timeline) = app
        .call_as(
            token,
            Method::GET,
            &format!("/api/v1/systems/{slug}/timeline?limit=200"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{timeline}");
    let mut systems: Vec<String> = timeline["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["system"].as_str().unwrap().to_owned())
        .collect();
    systems.sort();
    systems.dedup();
    let (status, st) = app
        .call_as(
            token,
            Method::GET,
            &format!("/api/v1/systems/{slug}/status"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{st}");
    let mut layers = Vec::new();
    layer_slugs(&st, &mut layers);
    layers.sort();
    let (status, subs) = app
        .call_as(
            token,
            Method::GET,
            &format!("/api/v1/systems/{slug}/subsystems"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{subs}");
    let subs = subs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["slug"].as_str().unwrap().to_owned())
        .collect();
    (systems, layers, subs)
}

async fn denied_everything_on(app: &TestApp, token: &str, slug: &str) {
    for (method, path, body) in [
        (Method::GET, format!("/api/v1/systems/{slug}"), None),
        (
            Method::GET,
            format!("/api/v1/systems/{slug}/timeline"),
            None,
        ),
        (Method::GET, format!("/api/v1/systems/{slug}/status"), None),
        (
            Method::PATCH,
            format!("/api/v1/systems/{slug}"),
            Some(json!({"title": "Taken over"})),
        ),
        (Method::DELETE, format!("/api/v1/systems/{slug}"), None),
    ] {
        let (status, body) = app.call_as(token, method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {body}");
    }
}

// A project admin points their aggregate's selector at another customer's
// systems, and then at everything (`!owner` reaches the instance system):
// they gain nothing there, and the aggregate shows nothing of them.
both!(a_selector_gives_its_definer_no_rights, |app| async move {
    app.system("proj-x", "project", json!({"owner": "x"})).await;
    app.system("web-x", "host", json!({"owner": "x"})).await;
    app.system("db-y", "host", json!({"owner": "y"})).await;
    app.event("db-y", "note", "PGPASSWORD rotated on db-y", json!({}))
        .await;
    app.event("web-x", "note", "deployed web-x", json!({}))
        .await;
    let xavier = app
        .user_with_grants(
            "xavier",
            &[("proj-x", Role::Admin), ("web-x", Role::Viewer)],
        )
        .await;
    for selector in ["owner=y", "!owner", "owner"] {
        let (status, body) = app
            .call_as(
                &xavier,
                Method::PATCH,
                "/api/v1/systems/proj-x",
                Some(json!({"selector": selector})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{selector}: {body}");
        denied_everything_on(&app, &xavier, "db-y").await;
        denied_everything_on(&app, &xavier, "aramaki").await;
        let (timeline, layers, subs) = seen_below(&app, &xavier, "proj-x").await;
        for hidden in ["db-y", "aramaki"] {
            assert!(
                !timeline.contains(&hidden.to_owned()),
                "{selector}: {timeline:?}"
            );
            assert!(
                !layers.contains(&hidden.to_owned()),
                "{selector}: {layers:?}"
            );
            assert!(!subs.contains(&hidden.to_owned()), "{selector}: {subs:?}");
        }
        if selector == "owner" {
            // A member they may see anyway does appear, as viewer still.
            assert!(subs.contains(&"web-x".to_owned()), "{subs:?}");
            assert!(timeline.contains(&"web-x".to_owned()), "{timeline:?}");
            let (status, _) = app
                .call_as(
                    &xavier,
                    Method::PATCH,
                    "/api/v1/systems/web-x",
                    Some(json!({"title": "not via the selector"})),
                )
                .await;
            assert_eq!(status, StatusCode::FORBIDDEN, "the selector lends no admin");
        }
    }
    let (_, list) = app
        .call_as(&xavier, Method::GET, "/api/v1/systems", None)
        .await;
    let mut slugs: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["slug"].as_str().unwrap())
        .collect();
    slugs.sort();
    assert_eq!(slugs, ["proj-x", "web-x"]);
    let (status, _) = app
        .call_as(
            &xavier,
            Method::GET,
            "/api/v1/systems/aramaki/timeline",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // db-y is untouched.
    let db = app.get("/api/v1/systems/db-y").await;
    assert_eq!(db["title"], "DB-Y");
});

// The other direction: an admin of one system relabels it so that it joins
// someone else's aggregate. Neither side gains anything.
both!(
    a_label_change_joins_an_aggregate_without_rights,
    |app| async move {
        app.system("all-y", "project", json!({})).await;
        let (status, _) = app
            .call(
                Method::PATCH,
                "/api/v1/systems/all-y",
                Some(json!({"selector": "owner=y"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        app.system("db-y", "host", json!({"owner": "y"})).await;
        app.system("box-z", "host", json!({"owner": "z"})).await;
        app.event("box-z", "note", "z's secret note", json!({}))
            .await;
        let yara = app
            .user_with_grants("yara", &[("all-y", Role::Admin)])
            .await;
        let zeno = app
            .user_with_grants("zeno", &[("box-z", Role::Admin)])
            .await;
        // Before: all-y's members are not yara's through the selector.
        let (_, _, subs) = seen_below(&app, &yara, "all-y").await;
        assert!(subs.is_empty(), "{subs:?}");
        denied_everything_on(&app, &yara, "db-y").await;
        // zeno makes box-z match all-y.
        let (status, body) = app
            .call_as(
                &zeno,
                Method::PATCH,
                "/api/v1/systems/box-z",
                Some(json!({"labels": {"owner": "y"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // yara gains nothing on box-z, and sees nothing of it in all-y.
        denied_everything_on(&app, &yara, "box-z").await;
        let (timeline, layers, subs) = seen_below(&app, &yara, "all-y").await;
        assert_eq!(timeline, ["all-y"], "{timeline:?}");
        assert_eq!(layers, ["all-y"], "{layers:?}");
        assert!(subs.is_empty(), "{subs:?}");
        // zeno gains nothing on all-y or its other members.
        denied_everything_on(&app, &zeno, "all-y").await;
        denied_everything_on(&app, &zeno, "db-y").await;
        let (status, includers) = app
            .call_as(&zeno, Method::GET, "/api/v1/systems/box-z/includers", None)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(includers["items"], json!([]), "all-y stays out of sight");
        // The instance admin sees the membership as it is.
        let all = app.get("/api/v1/systems/all-y/subsystems").await;
        let mut slugs: Vec<&str> = all["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["slug"].as_str().unwrap())
            .collect();
        slugs.sort();
        assert_eq!(slugs, ["box-z", "db-y"]);
    }
);

// An explicit include still extends a grant, and only with admin on both
// ends; an include cannot reach the instance system either.
both!(
    only_an_include_by_an_admin_of_both_extends_a_grant,
    |app| async move {
        app.system("team", "project", json!({})).await;
        app.system("svc", "service", json!({})).await;
        app.system("other", "service", json!({})).await;
        let tess = app
            .user_with_grants("tess", &[("team", Role::Admin), ("svc", Role::Admin)])
            .await;
        for child in ["other", "aramaki"] {
            let (status, body) = app
                .call_as(
                    &tess,
                    Method::POST,
                    "/api/v1/systems/team/subsystems",
                    Some(json!({"slug": child})),
                )
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{child}: {body}");
        }
        let (status, body) = app
            .call_as(
                &tess,
                Method::POST,
                "/api/v1/systems/team/subsystems",
                Some(json!({"slug": "svc"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        // A viewer of team now sees svc through the include.
        let vic = app.user_with_grants("vic", &[("team", Role::Viewer)]).await;
        let (status, _) = app
            .call_as(&vic, Method::GET, "/api/v1/systems/svc", None)
            .await;
        assert_eq!(status, StatusCode::OK);
        let (timeline, layers, subs) = seen_below(&app, &vic, "team").await;
        assert_eq!(subs, ["svc"]);
        assert!(layers.contains(&"svc".to_owned()));
        assert!(timeline.contains(&"team".to_owned()), "{timeline:?}");
        let (status, _) = app
            .call_as(&vic, Method::GET, "/api/v1/systems/other", None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
);

// The instance's own system holds the audit trail: nobody deletes it, not
// even the instance admin, and the trail stays readable afterwards.
both!(the_instance_system_cannot_be_deleted, |app| async move {
    for path in [
        "/api/v1/systems/aramaki",
        "/api/v1/systems/aramaki?force=true",
    ] {
        let (status, body) = app.call(Method::DELETE, path, None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {body}");
        assert_eq!(body["code"], "instance_system");
        assert!(
            body["detail"].as_str().unwrap().contains("audit trail"),
            "{body}"
        );
    }
    // Renamed, it is still the instance system and still undeletable.
    let (status, body) = app
        .call(
            Method::PATCH,
            "/api/v1/systems/aramaki",
            Some(json!({"slug": "audit"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = app
        .call(Method::DELETE, "/api/v1/systems/audit", None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    app.user("late", Role::Viewer).await;
    let titles = app.titles("/api/v1/systems/audit/timeline").await;
    assert!(
        titles.iter().any(|t| t.starts_with("Created user late")),
        "{titles:?}"
    );
});

// Check definitions are read only by those who may see a system they
// concern, and their secrets (the environment, credentials in a probe's
// URL) never come back: not in the API, the audit trail or a page.
both!(
    checks_are_scoped_and_their_secrets_write_only,
    |app| async move {
        app.system("web-a", "host", json!({})).await;
        app.system("db-b", "host", json!({})).await;
        crate::monitoring::enrolled(&app, "ag1", 7).await;
        let defs = [
            json!({"name": "pg-b", "command": ["/usr/lib/nagios/plugins/check_pgsql", "-H", "db-b"],
               "subscriptions": ["linux"], "system": "db-b", "interval": 60,
               "env": {"PGPASSWORD": "hunter2-secret"}, "annotations": {"owner": "b"}}),
            json!({"name": "disk-a", "command": ["/bin/true"], "subscriptions": ["system:web-a"], "interval": 60}),
            json!({"name": "on-agent", "command": ["/bin/true"], "subscriptions": ["agent:ag1"], "interval": 60}),
            json!({"name": "site-b", "probe": {"probe": "http", "url": "https://bob:pw-secret@db-b.example/health"},
               "subscriptions": ["system:db-b"], "interval": 60}),
        ];
        for d in &defs {
            let (status, body) = app.post("/api/v1/checks", d.clone()).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            assert!(!body.to_string().contains("secret"), "{body}");
        }
        let alma = app
            .user_with_grants(
                "alma",
                &[("web-a", Role::Viewer), ("ag1-host", Role::Viewer)],
            )
            .await;
        let (status, list) = app
            .call_as(&alma, Method::GET, "/api/v1/checks", None)
            .await;
        assert_eq!(status, StatusCode::OK);
        let mut names: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["disk-a", "on-agent"]);
        for hidden in ["pg-b", "site-b", "no-such-check"] {
            let (status, body) = app
                .call_as(
                    &alma,
                    Method::GET,
                    &format!("/api/v1/checks/{hidden}"),
                    None,
                )
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{hidden}: {body}");
            assert_eq!(body["detail"], format!("no check '{hidden}'"));
        }
        // The admin sees every check, secrets only as set.
        let all = app.get("/api/v1/checks").await;
        assert!(!all.to_string().contains("secret"), "{all}");
        let pg = app.get("/api/v1/checks/pg-b").await;
        assert_eq!(pg["env"], json!({"PGPASSWORD": "(set)"}));
        assert_eq!(pg["annotations"]["owner"], "b");
        let site = app.get("/api/v1/checks/site-b").await;
        assert_eq!(site["probe"]["url"], "https://(set)@db-b.example/health");
        // What was read, sent back, keeps the secrets stored.
        for (name, mut body) in [("pg-b", pg), ("site-b", site)] {
            let o = body.as_object_mut().unwrap();
            for k in ["id", "created_at", "updated_at"] {
                o.remove(k);
            }
            o.insert("timeout".into(), json!(30));
            let (status, v) = app
                .call(Method::PUT, &format!("/api/v1/checks/{name}"), Some(body))
                .await;
            assert_eq!(status, StatusCode::OK, "{v}");
        }
        let mut conn = app.ctx.db.reader().acquire().await.unwrap();
        let stored = aramaki::monitoring::store::check(&mut conn, "pg-b")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.spec.env["PGPASSWORD"], "hunter2-secret");
        assert_eq!(stored.spec.timeout, 30);
        let stored = aramaki::monitoring::store::check(&mut conn, "site-b")
            .await
            .unwrap()
            .unwrap();
        drop(conn);
        assert_eq!(
            serde_json::to_value(&stored.spec.probe).unwrap()["url"],
            "https://bob:pw-secret@db-b.example/health"
        );
        // `(set)` for a name with no stored value is refused, naming it.
        let (status, v) = app
        .call(
            Method::PUT,
            "/api/v1/checks/disk-a",
            Some(json!({"name": "disk-a", "command": ["/bin/true"], "subscriptions": ["system:web-a"],
                        "interval": 60, "env": {"TOKEN": "(set)"}})),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(v["detail"].as_str().unwrap().contains("'TOKEN'"), "{v}");
        // The audit trail of the changes holds no secret either.
        let audit = app.get("/api/v1/systems/aramaki/timeline?limit=200").await;
        let kinds: Vec<&str> = audit["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert!(kinds.contains(&"check.updated"), "{kinds:?}");
        assert!(!audit.to_string().contains("secret"), "{audit}");
    }
);

mod browser_helpers {
    use reqwest::header::{COOKIE, SET_COOKIE};
    use reqwest::redirect;

    use crate::support::TestApp;

    pub fn browser() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(redirect::Policy::none())
            .build()
            .unwrap()
    }

    pub async fn login(app: &TestApp, name: &str, password: &str, next: &str) -> reqwest::Response {
        browser()
            .post(app.url("/login"))
            .form(&[("username", name), ("password", password), ("next", next)])
            .send()
            .await
            .unwrap()
    }

    pub fn cookie(resp: &reqwest::Response) -> String {
        let set = resp.headers().get(SET_COOKIE).expect("a cookie");
        set.to_str().unwrap().split(';').next().unwrap().to_owned()
    }

    pub async fn get(app: &TestApp, path: &str, cookie: &str) -> reqwest::Response {
        browser()
            .get(app.url(path))
            .header(COOKIE, cookie)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(
        app: &TestApp,
        path: &str,
        cookie: &str,
        form: &[(&str, &str)],
    ) -> reqwest::Response {
        browser()
            .post(app.url(path))
            .header(COOKIE, cookie)
            .form(form)
            .send()
            .await
            .unwrap()
    }

    pub fn location(resp: &reqwest::Response) -> String {
        resp.headers()[reqwest::header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned()
    }

    pub fn csrf_of(html: &str) -> String {
        let marker = "name=\"csrf\" value=\"";
        let at = html.find(marker).expect("a csrf field") + marker.len();
        html[at..].split('"').next().unwrap().to_owned()
    }
}

async fn person(app: &TestApp, name: &str, must_change: bool) {
    aramaki::users::create_user(
        &app.ctx,
        &crate::support::tester(),
        name,
        name,
        Some(Role::Admin),
        "correct horse battery",
        must_change,
    )
    .await
    .unwrap();
}

// A one-time password opens the password page and nothing else, then the
// change continues to where the user was going; unchanged, it expires.
both!(
    a_one_time_password_opens_only_the_password_page,
    |app| async move {
        use browser_helpers::*;
        app.system("shop", "project", json!({})).await;
        person(&app, "otto", true).await;
        let first = login(&app, "otto", "correct horse battery", "/systems/shop").await;
        assert_eq!(first.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&first), "/account/password?next=%2Fsystems%2Fshop");
        let c = cookie(&first);
        for path in ["/", "/systems/shop", "/systems/new", "/search?q=shop"] {
            let r = get(&app, path, &c).await;
            assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
            assert!(
                location(&r).starts_with("/account/password"),
                "{path}: {}",
                location(&r)
            );
        }
        let page = get(&app, "/account/password?next=/systems/shop", &c).await;
        assert_eq!(page.status(), StatusCode::OK);
        let html = page.text().await.unwrap();
        assert!(html.contains("one-time password"));
        assert!(
            html.contains(r#"name="next" value="/systems/shop""#),
            "{html}"
        );
        let csrf = csrf_of(&html);
        // Forms are refused too: creating a system with the one-time password
        // is sent to the password page and creates nothing.
        let (_, systems_before) = app.counts().await;
        let r = post(
            &app,
            "/systems/new",
            &c,
            &[
                ("csrf", &csrf),
                ("slug", "sneaky"),
                ("title", "Sneaky"),
                ("category", "project"),
            ],
        )
        .await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert!(location(&r).starts_with("/account/password"));
        assert_eq!(app.counts().await.1, systems_before);
        // The change continues to where otto was going.
        let done = post(
            &app,
            "/account/password",
            &c,
            &[
                ("csrf", &csrf),
                ("current", "correct horse battery"),
                ("new", "otto's own long password"),
                ("confirm", "otto's own long password"),
                ("next", "/systems/shop"),
            ],
        )
        .await;
        assert_eq!(done.status(), StatusCode::SEE_OTHER);
        assert_eq!(location(&done), "/systems/shop");
        assert_eq!(
            get(&app, "/systems/shop", &c).await.status(),
            StatusCode::OK
        );
    }
);

both!(a_one_time_password_expires, |app| async move {
    use browser_helpers::*;
    person(&app, "late", true).await;
    person(&app, "early", true).await;
    // A session opened with it ends when it expires.
    let opened = login(&app, "early", "correct horse battery", "/").await;
    let c = cookie(&opened);
    for _ in 0..2 {
        // Within the sessions' idle limit (12 h), up to 22 h in all.
        app.clock.advance(jiff::SignedDuration::from_hours(11));
        assert_eq!(
            get(&app, "/account/password", &c).await.status(),
            StatusCode::OK
        );
    }
    app.clock.advance(jiff::SignedDuration::from_hours(3));
    let r = get(&app, "/account/password", &c).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(location(&r).starts_with("/login"), "{}", location(&r));
    let r = login(&app, "late", "correct horse battery", "/").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("one-time password has expired"));
    // A new one from the command line works again, for another day.
    aramaki::users::commands::run(
        &app.ctx,
        aramaki::users::commands::UserCommand::Passwd {
            username: "late".into(),
        },
    )
    .await
    .unwrap();
    let hash: String =
        sqlx::query_scalar("SELECT password_expires_at FROM users WHERE username = 'late'")
            .fetch_one(app.ctx.db.reader())
            .await
            .map(|t: i64| t.to_string())
            .unwrap();
    let expected = (app.ctx.now().as_microsecond() + 24 * 3_600_000_000).to_string();
    assert_eq!(hash, expected);
});

// A one-time password set before expiry times were recorded (the upgrade
// left `password_expires_at` NULL) counts from the account's creation.
both!(
    a_one_time_password_from_before_the_upgrade_expires,
    |app| async move {
        use browser_helpers::*;
        person(&app, "old", true).await;
        person(&app, "older", true).await;
        let opened = login(&app, "old", "correct horse battery", "/").await;
        let c = cookie(&opened);
        let mut tx = app.ctx.db.begin().await.unwrap();
        sqlx::query(
            "UPDATE users SET password_expires_at = NULL WHERE username IN ('old', 'older')",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        app.clock.advance(jiff::SignedDuration::from_hours(11));
        assert_eq!(
            get(&app, "/account/password", &c).await.status(),
            StatusCode::OK,
            "still within its day"
        );
        app.clock.advance(jiff::SignedDuration::from_hours(11));
        let r = login(&app, "older", "correct horse battery", "/").await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "still within its day");
        app.clock.advance(jiff::SignedDuration::from_hours(3));
        let r = get(&app, "/account/password", &c).await;
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert!(location(&r).starts_with("/login"), "{}", location(&r));
        let r = login(&app, "older", "correct horse battery", "/").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r
            .text()
            .await
            .unwrap()
            .contains("one-time password has expired"));
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_time_password_lifetime_is_configurable() {
    use browser_helpers::*;
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, |c| {
        c.auth.one_time_password_hours = 1
    })
    .await;
    person(&app, "brief", true).await;
    app.clock.advance(jiff::SignedDuration::from_mins(61));
    let r = login(&app, "brief", "correct horse battery", "/").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// A login from a given loopback address (all of 127/8 is this host).
async fn login_from(
    app: &TestApp,
    from: [u8; 4],
    name: &str,
    password: &str,
) -> (StatusCode, Option<String>, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap();
    let r = client
        .post(app.url("/login"))
        .form(&[("username", name), ("password", password), ("next", "/")])
        .send()
        .await
        .unwrap();
    let retry = r
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status(), retry, r.text().await.unwrap())
}

const HOME: [u8; 4] = [127, 0, 0, 1];
const RIGHT: &str = "correct horse battery";

// After three failures each attempt waits, doubling; meanwhile even the
// right password is refused with 429 and Retry-After, without blocking.
both!(failed_logins_wait_longer_and_longer, |app| async move {
    person(&app, "vic", false).await;
    for _ in 0..3 {
        let (status, retry, _) = login_from(&app, HOME, "vic", "wrong").await;
        assert_eq!((status, retry), (StatusCode::UNAUTHORIZED, None));
    }
    let (status, retry, body) = login_from(&app, HOME, "vic", RIGHT).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the right password waits too"
    );
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(body.contains("try again in 1 s"), "{body}");
    app.clock.advance(jiff::SignedDuration::from_secs(1));
    let (status, _, _) = login_from(&app, HOME, "vic", "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, retry, _) = login_from(&app, HOME, "vic", RIGHT).await;
    assert_eq!(
        (status, retry.as_deref()),
        (StatusCode::TOO_MANY_REQUESTS, Some("2"))
    );
    // Another address is held back for vic as well (per account)…
    let (status, _, _) = login_from(&app, [127, 0, 0, 2], "vic", RIGHT).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // …but not for someone else.
    person(&app, "wes", false).await;
    let (status, _, _) = login_from(&app, [127, 0, 0, 2], "wes", RIGHT).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    app.clock.advance(jiff::SignedDuration::from_secs(2));
    let (status, _, _) = login_from(&app, HOME, "vic", RIGHT).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "after the wait, the right password works"
    );
    // A success starts the account afresh.
    let (status, _, _) = login_from(&app, [127, 0, 0, 3], "vic", "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
});

// From one address, failures against many accounts (password spraying) are
// throttled too; and unknown usernames behave exactly like known ones.
both!(an_address_is_throttled_across_accounts, |app| async move {
    person(&app, "known", false).await;
    let mut seen = Vec::new();
    // Ten free failures per address (auth.login_address_free_failures).
    for i in 0..10 {
        let name = if i == 0 {
            "known".to_owned()
        } else {
            format!("nobody-{i}")
        };
        let (status, _, body) = login_from(&app, [127, 0, 0, 9], &name, "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {i}");
        assert!(body.contains("Wrong username or password."));
        seen.push(status);
    }
    let (status, retry, _) = login_from(&app, [127, 0, 0, 9], "nobody-99", "wrong").await;
    assert_eq!(
        (status, retry.as_deref()),
        (StatusCode::TOO_MANY_REQUESTS, Some("1"))
    );
    // Unknown and known users go through the same steps.
    person(&app, "kim", false).await;
    for (name, from) in [("ghost", [127, 0, 0, 10]), ("kim", [127, 0, 0, 11])] {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(login_from(&app, from, name, "wrong").await.0);
        }
        assert_eq!(
            statuses,
            [
                StatusCode::UNAUTHORIZED,
                StatusCode::UNAUTHORIZED,
                StatusCode::UNAUTHORIZED,
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::TOO_MANY_REQUESTS
            ],
            "{name}"
        );
    }
    assert_eq!(seen.len(), 10);
});

// Failures that arrive at once are all counted: of many parallel wrong
// attempts only the free ones are checked at all.
both!(parallel_failed_logins_are_all_counted, |app| async move {
    person(&app, "par", false).await;
    let attempts = (0..12).map(|i| {
        let app = &app;
        async move { login_from(app, [127, 0, 1, i], "par", "wrong").await.0 }
    });
    let statuses = futures_util::future::join_all(attempts).await;
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert!(
        checked <= 3,
        "at most the three free failures were checked: {statuses:?}"
    );
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::UNAUTHORIZED || *s == StatusCode::TOO_MANY_REQUESTS));
});

// Enough failures lock the account until the lockout ends or an admin
// lifts it; both are audit events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_locked_and_an_admin_unlocks_it() {
    for backend in crate::support::backends() {
        let app = TestApp::start_tweaked(backend, |c| {
            c.auth.login_free_failures = 1;
            c.auth.login_max_delay_seconds = 1;
            c.auth.login_lockout_failures = 4;
            c.auth.login_lockout_minutes = 30;
        })
        .await;
        person(&app, "lou", false).await;
        for i in 0..4u8 {
            let (status, _, _) = login_from(&app, [127, 0, 2, i], "lou", "wrong").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {i}");
            app.clock.advance(jiff::SignedDuration::from_secs(1));
        }
        app.clock.advance(jiff::SignedDuration::from_mins(10));
        let (status, retry, body) = login_from(&app, [127, 0, 2, 9], "lou", RIGHT).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(body.contains("locked"), "{body}");
        let retry: u64 = retry.unwrap().parse().unwrap();
        assert!((19 * 60..=20 * 60).contains(&retry), "{retry}");
        let audit = app
            .get("/api/v1/systems/aramaki/timeline?kind=user.locked_out")
            .await;
        assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");
        assert_eq!(audit["items"][0]["data"]["user"], "lou");
        aramaki::users::commands::run(
            &app.ctx,
            aramaki::users::commands::UserCommand::Unlock {
                username: "lou".into(),
            },
        )
        .await
        .unwrap();
        let (status, _, _) = login_from(&app, [127, 0, 2, 9], "lou", RIGHT).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "unlocked by the admin");
        let titles = app
            .titles("/api/v1/systems/aramaki/timeline?kind=user.unlocked")
            .await;
        assert_eq!(titles, ["Logins as lou unlocked"]);
        // Without an admin, the lockout ends by itself.
        for i in 0..4u8 {
            login_from(&app, [127, 0, 3, i], "lou", "wrong").await;
            app.clock.advance(jiff::SignedDuration::from_secs(1));
        }
        let (status, _, _) = login_from(&app, [127, 0, 3, 9], "lou", RIGHT).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        app.clock.advance(jiff::SignedDuration::from_mins(31));
        let (status, _, _) = login_from(&app, [127, 0, 3, 9], "lou", RIGHT).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
    }
}

/// The `access.refused` events on the instance's audit trail.
async fn refusals(app: &TestApp) -> Vec<Value> {
    app.get("/api/v1/systems/aramaki/timeline?kind=access.refused&limit=200")
        .await["items"]
        .as_array()
        .unwrap()
        .clone()
}

// An operator of one system trying to run an action on (or change) a
// system they cannot see gets the same 404 as for a missing one, and the
// attempt is on the record — once per window, however many were made.
both!(refused_attempts_are_recorded_aggregated, |app| async move {
    app.system("mine", "service", json!({})).await;
    app.system("theirs", "service", json!({})).await;
    let opal = app
        .user_with_grants("opal", &[("mine", Role::Operator)])
        .await;
    let run = |slug: &'static str| {
        let (app, opal) = (&app, opal.clone());
        async move {
            app.call_as(
                &opal,
                Method::POST,
                &format!("/api/v1/systems/{slug}/actions/restart/runs"),
                Some(json!({})),
            )
            .await
        }
    };
    let (hidden_status, hidden) = run("theirs").await;
    let (missing_status, missing) = run("nowhere").await;
    assert_eq!(hidden_status, StatusCode::NOT_FOUND);
    assert_eq!(missing_status, StatusCode::NOT_FOUND);
    assert_eq!(
        hidden.to_string().replace("theirs", "X"),
        missing.to_string().replace("nowhere", "X"),
        "the caller cannot tell a hidden system from a missing one"
    );
    let events = refusals(&app).await;
    assert_eq!(
        events.len(),
        2,
        "one event per caller, kind, target and window: {events:?}"
    );
    let mut targets: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["target"].as_str().unwrap())
        .collect();
    targets.sort_unstable();
    assert_eq!(targets, ["nowhere", "theirs"], "each target is named");
    for e in &events {
        assert_eq!(e["data"]["kind"], "action.run");
        assert_eq!(e["actor"]["name"], "opal");
    }
    // A flood is counted, not written out.
    for _ in 0..25 {
        assert_eq!(run("theirs").await.0, StatusCode::NOT_FOUND);
    }
    assert_eq!(refusals(&app).await.len(), 2);
    let opal_id: String = sqlx::query_scalar("SELECT id FROM users WHERE username = 'opal'")
        .fetch_one(app.ctx.db.reader())
        .await
        .unwrap();
    let now = app.ctx.now().as_microsecond();
    assert_eq!(
        aramaki::users::refusals::count(&app.ctx, &opal_id, "action.run", now)
            .await
            .unwrap(),
        27
    );
    // System changes are refused and recorded the same way.
    let (status, _) = app
        .call_as(
            &opal,
            Method::PATCH,
            "/api/v1/systems/theirs",
            Some(json!({"title": "mine now"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .call_as(&opal, Method::DELETE, "/api/v1/systems/theirs", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let kinds: Vec<String> = refusals(&app)
        .await
        .iter()
        .map(|e| e["data"]["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["system.change", "action.run", "action.run"]);
    // The next window starts with one event that carries the last count.
    app.clock.advance(jiff::SignedDuration::from_mins(10));
    run("theirs").await;
    let events = refusals(&app).await;
    assert_eq!(events.len(), 4);
    assert_eq!(events[0]["data"]["previous_window_attempts"], 27);
    // The record is for the instance's viewers, not for the caller.
    let (status, _) = app
        .call_as(&opal, Method::GET, "/api/v1/systems/aramaki/timeline", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Allowed work is not recorded.
    let (status, _) = app
        .call_as(&opal, Method::GET, "/api/v1/systems/mine", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        refusals(&app).await.len(),
        5,
        "the GET of aramaki was refused too"
    );
});

// A probe of a harmless slug first does not hide the real target, and a
// scan of many slugs stays bounded: each distinct target of a window is
// named up to a cap, the rest are counted together with one more event.
both!(
    a_scan_of_many_slugs_names_each_target_up_to_a_cap,
    |app| async move {
        app.system("mine", "service", json!({})).await;
        app.system("theirs", "service", json!({})).await;
        let opal = app
            .user_with_grants("opal", &[("mine", Role::Operator)])
            .await;
        let cap = aramaki::users::refusals::TARGETS_PER_WINDOW as usize;
        let mut slugs: Vec<String> = (0..cap + 5).map(|i| format!("probe-{i}")).collect();
        slugs.insert(1, "theirs".to_owned());
        for slug in &slugs {
            let (status, _) = app
                .call_as(
                    &opal,
                    Method::POST,
                    &format!("/api/v1/systems/{slug}/actions/restart/runs"),
                    Some(json!({})),
                )
                .await;
            assert_eq!(status, StatusCode::NOT_FOUND);
        }
        let events = refusals(&app).await;
        let targets: Vec<&str> = events
            .iter()
            .map(|e| e["data"]["target"].as_str().unwrap())
            .collect();
        assert_eq!(events.len(), cap + 1, "{targets:?}");
        assert!(targets.contains(&"theirs"), "the real target is named");
        assert_eq!(
            targets.iter().filter(|t| **t == "*").count(),
            1,
            "the rest are one event: {targets:?}"
        );
        let opal_id: String = sqlx::query_scalar("SELECT id FROM users WHERE username = 'opal'")
            .fetch_one(app.ctx.db.reader())
            .await
            .unwrap();
        let now = app.ctx.now().as_microsecond();
        assert_eq!(
            aramaki::users::refusals::count(&app.ctx, &opal_id, "action.run", now)
                .await
                .unwrap(),
            slugs.len() as i64,
            "every attempt is counted"
        );
    }
);

// A selector or label change that would close a cycle through systems out
// of the caller's sight is refused without naming them.
both!(a_refused_cycle_names_no_hidden_system, |app| async move {
    app.system("all-y", "project", json!({})).await;
    app.system("mid-z", "service", json!({"owner": "z"})).await;
    let (status, _) = app.include("mid-z", "all-y").await;
    assert_eq!(status, StatusCode::CREATED);
    let yara = app
        .user_with_grants("yara", &[("all-y", Role::Admin)])
        .await;
    let (status, body) = app
        .call_as(
            &yara,
            Method::PATCH,
            "/api/v1/systems/all-y",
            Some(json!({"selector": "owner=z"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "cycle");
    assert_eq!(body["path"], json!(["all-y", "…", "all-y"]));
    assert!(!body.to_string().contains("mid-z"), "{body}");
    // The instance admin is told the whole path.
    let (status, body) = app
        .call(
            Method::PATCH,
            "/api/v1/systems/all-y",
            Some(json!({"selector": "owner=z"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["path"], json!(["all-y", "mid-z", "all-y"]));
});

// The system page of an aggregate shows its viewer nothing of members they
// may not see.
both!(
    an_aggregate_page_shows_only_visible_members,
    |app| async move {
        use browser_helpers::*;
        app.system("all-y", "project", json!({})).await;
        app.call(
            Method::PATCH,
            "/api/v1/systems/all-y",
            Some(json!({"selector": "owner=y"})),
        )
        .await;
        app.system("box-z", "host", json!({"owner": "y"})).await;
        app.event("box-z", "note", "z's private note", json!({}))
            .await;
        aramaki::users::create_user(
            &app.ctx,
            &crate::support::tester(),
            "yara",
            "yara",
            None,
            RIGHT,
            false,
        )
        .await
        .unwrap();
        aramaki::users::grant(
            &app.ctx,
            &crate::support::tester(),
            "yara",
            "all-y",
            Role::Viewer,
        )
        .await
        .unwrap();
        let c = cookie(&login(&app, "yara", RIGHT, "/").await);
        let page = get(&app, "/systems/all-y", &c).await;
        assert_eq!(page.status(), StatusCode::OK);
        let html = page.text().await.unwrap();
        assert!(!html.contains("box-z"), "{html}");
        assert!(!html.contains("private note"), "{html}");
        assert_eq!(
            get(&app, "/systems/box-z", &c).await.status(),
            StatusCode::NOT_FOUND
        );
    }
);

/// A login through a proxy that says who the client is.
async fn login_via(app: &TestApp, forwarded_for: &str, name: &str) -> StatusCode {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(app.url("/login"))
        .header("X-Forwarded-For", forwarded_for)
        .form(&[("username", name), ("password", "wrong"), ("next", "/")])
        .send()
        .await
        .unwrap()
        .status()
}

// Behind a trusted proxy the forwarded client address is throttled; from
// anyone else the header is ignored, so it cannot be used to dodge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_addresses_count_only_from_trusted_proxies() {
    let tweak = |trust: bool| {
        move |c: &mut aramaki::config::Config| {
            c.auth.login_address_free_failures = 2;
            if trust {
                c.auth.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
            }
        }
    };
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, tweak(true)).await;
    for i in 0..2 {
        assert_eq!(
            login_via(&app, "203.0.113.5", &format!("u{i}")).await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        login_via(&app, "203.0.113.5", "u9").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        login_via(&app, "198.51.100.1, 203.0.113.6", "u9").await,
        StatusCode::UNAUTHORIZED,
        "another client behind the proxy is not held back"
    );
    let app = TestApp::start_tweaked(crate::support::Backend::Sqlite, tweak(false)).await;
    for i in 0..2 {
        login_via(&app, &format!("203.0.113.{i}"), &format!("u{i}")).await;
    }
    assert_eq!(
        login_via(&app, "203.0.113.77", "u9").await,
        StatusCode::TOO_MANY_REQUESTS,
        "an untrusted peer's header changes nothing"
    );
}

// An operator of an aggregate runs an action on its subsystems: only on
// those they hold the role on, never on a member its selector matched.
both!(an_action_reaches_no_selector_member, |app| async move {
    let (own, _) = crate::monitoring::enrolled(&app, "ag-own", 50).await;
    let (other, _) = crate::monitoring::enrolled(&app, "ag-other", 51).await;
    for host in ["ag-own-host", "ag-other-host"] {
        let (status, _) = app
            .call(
                Method::PATCH,
                &format!("/api/v1/systems/{host}"),
                Some(json!({"labels": {"owner": "y"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    app.system("fleet", "project", json!({})).await;
    app.call(
        Method::PATCH,
        "/api/v1/systems/fleet",
        Some(json!({"selector": "owner=y"})),
    )
    .await;
    let (status, _) = app.include("fleet", "ag-own-host").await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, v) = app
        .post(
            "/api/v1/systems/fleet/actions",
            json!({"name": "restart", "title": "Restart", "include_subsystems": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let opal = app
        .user_with_grants("opal", &[("fleet", Role::Operator)])
        .await;
    let (status, run) = app
        .call_as(
            &opal,
            Method::POST,
            "/api/v1/systems/fleet/actions/restart/runs",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let targets = run["targets"].to_string();
    assert!(targets.contains(&own), "{run}");
    assert!(
        !targets.contains(&other),
        "the selector member is not opal's: {run}"
    );
});

// The same record for refusals through the pages.
both!(refused_page_attempts_are_recorded_too, |app| async move {
    use browser_helpers::*;
    app.system("theirs", "service", json!({})).await;
    app.system("mine", "service", json!({})).await;
    aramaki::users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "pia",
        "pia",
        None,
        RIGHT,
        false,
    )
    .await
    .unwrap();
    aramaki::users::grant(
        &app.ctx,
        &crate::support::tester(),
        "pia",
        "mine",
        Role::Operator,
    )
    .await
    .unwrap();
    let c = cookie(&login(&app, "pia", RIGHT, "/").await);
    let html = get(&app, "/systems/mine", &c).await.text().await.unwrap();
    let csrf = csrf_of(&html);
    let r = post(
        &app,
        "/systems/theirs/actions/restart/run",
        &c,
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = post(
        &app,
        "/systems/theirs/edit",
        &c,
        &[
            ("csrf", &csrf),
            ("title", "pia's now"),
            ("category", "service"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let mut kinds: Vec<String> = refusals(&app)
        .await
        .iter()
        .map(|e| e["data"]["kind"].as_str().unwrap().to_owned())
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["action.run", "system.change"]);
});

// A database from before the rule (or such a backup restored) may hold the
// instance system deleted: start-up brings it back, under another slug if
// its own was taken meanwhile, and the audit trail is readable again.
both!(
    a_deleted_instance_system_comes_back_at_start,
    |app| async move {
        let id: String = sqlx::query_scalar("SELECT system_id FROM instance")
            .fetch_one(app.ctx.db.reader())
            .await
            .unwrap();
        sqlx::query("UPDATE systems SET deleted_at = 1 WHERE id = $1")
            .bind(id.as_str())
            .execute(app.ctx.db.reader())
            .await
            .unwrap();
        app.system("aramaki", "service", json!({})).await;
        aramaki::setup::revive_instance_system(&app.ctx, &id)
            .await
            .unwrap();
        app.user("after", Role::Viewer).await;
        let titles = app.titles("/api/v1/systems/aramaki-audit/timeline").await;
        assert!(
            titles.iter().any(|t| t.starts_with("Created user after")),
            "{titles:?}"
        );
        let (status, _) = app
            .call(Method::DELETE, "/api/v1/systems/aramaki-audit", None)
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        // Running it again on a live system changes nothing.
        aramaki::setup::revive_instance_system(&app.ctx, &id)
            .await
            .unwrap();
        assert_eq!(
            app.get("/api/v1/systems/aramaki-audit").await["slug"],
            "aramaki-audit"
        );
    }
);

// The current password cannot be guessed on the password page either.
both!(
    the_password_page_is_throttled_like_the_login,
    |app| async move {
        use browser_helpers::*;
        person(&app, "pat", false).await;
        let c = cookie(&login(&app, "pat", RIGHT, "/").await);
        let html = get(&app, "/account/password", &c)
            .await
            .text()
            .await
            .unwrap();
        let csrf = csrf_of(&html);
        let attempt = |current: &'static str| {
            let (app, c, csrf) = (&app, c.clone(), csrf.clone());
            async move {
                post(
                    app,
                    "/account/password",
                    &c,
                    &[
                        ("csrf", &csrf),
                        ("current", current),
                        ("new", "a brand new long password"),
                        ("confirm", "a brand new long password"),
                    ],
                )
                .await
            }
        };
        for _ in 0..3 {
            assert_eq!(
                attempt("guess").await.status(),
                StatusCode::UNPROCESSABLE_ENTITY
            );
        }
        let r = attempt(RIGHT).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(r.text().await.unwrap().contains("try again in 1 s"));
        app.clock.advance(jiff::SignedDuration::from_secs(1));
        assert_eq!(attempt(RIGHT).await.status(), StatusCode::OK);
    }
);
