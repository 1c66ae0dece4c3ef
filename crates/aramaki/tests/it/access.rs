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
