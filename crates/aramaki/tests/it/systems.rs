//! Systems through the API: CRUD, N:M structure, cycles, aggregates, status.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both;

both!(
    create_read_update_records_before_and_after,
    |app| async move {
        let created = app
            .system("storage-dc1", "infrastructure", json!({"role": "storage"}))
            .await;
        assert_eq!(created["slug"], "storage-dc1");
        assert_eq!(created["instance"], app.ctx.identity.instance_id.as_str());
        assert_eq!(created["version"], 1);
        let id = created["id"].as_str().unwrap();
        assert_eq!(
            uuid::Uuid::parse_str(id).unwrap().get_version_num(),
            7,
            "ids are UUIDv7"
        );

        let (status, updated) = app
        .call(
            Method::PATCH,
            "/api/v1/systems/storage-dc1",
            Some(json!({
                "title": "Storage cluster DC1",
                "handbook": "Never reboot two nodes at once.",
                "links": [{"title": "Grafana", "url": "https://grafana.example/d/st", "kind": "dashboard"}],
                "contacts": [{"name": "Bob", "escalation": 2}, {"name": "Ada", "role": "on-call", "reach": "+49 30 1", "escalation": 1}]
            })),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{updated}");
        assert_eq!(updated["version"], 2);
        assert_eq!(
            updated["contacts"][0]["name"], "Ada",
            "contacts are kept in escalation order"
        );

        let read = app.get("/api/v1/systems/storage-dc1").await;
        assert_eq!(read["handbook"], "Never reboot two nodes at once.");
        assert_eq!(read["links"][0]["kind"], "dashboard");

        let timeline = app.get("/api/v1/systems/storage-dc1/timeline").await;
        let newest = &timeline["items"][0];
        assert_eq!(newest["kind"], "system.updated");
        assert_eq!(newest["actor"]["kind"], "user");
        assert_eq!(newest["actor"]["name"], "Administrator");
        assert_eq!(newest["data"]["before"]["title"], "STORAGE-DC1");
        assert_eq!(newest["data"]["after"]["title"], "Storage cluster DC1");
        assert!(
            newest["data"]["before"].get("labels").is_none(),
            "only changed fields are recorded"
        );
        assert_eq!(timeline["items"][1]["kind"], "system.created");

        // A patch that changes nothing records nothing.
        let before = app.counts().await;
        let (status, same) = app
            .call(
                Method::PATCH,
                "/api/v1/systems/storage-dc1",
                Some(json!({"title": "Storage cluster DC1"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(same["version"], 2);
        assert_eq!(app.counts().await, before);
    }
);

both!(
    slugs_are_unique_and_categories_must_exist,
    |app| async move {
        app.system("web", "service", json!({})).await;
        let (status, p) = app
            .post(
                "/api/v1/systems",
                json!({"slug": "web", "title": "Again", "category": "service"}),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(p["code"], "slug_taken");
        let (status, p) = app
            .post(
                "/api/v1/systems",
                json!({"slug": "db", "title": "DB", "category": "rocket"}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("unknown category 'rocket'"),
            "{p}"
        );

        let cats = app.get("/api/v1/categories").await;
        let names: Vec<&str> = cats["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "environment",
                "host",
                "infrastructure",
                "project",
                "service"
            ]
        );
        let (status, _) = app
            .post(
                "/api/v1/categories",
                json!({"name": "network", "title": "Network"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, _) = app
            .post(
                "/api/v1/categories",
                json!({"name": "network", "title": "Network"}),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        app.system("core-switch", "network", json!({})).await;
    }
);

both!(
    subsystems_are_n_to_m_and_cycles_are_refused_with_their_path,
    |app| async move {
        for s in ["dc1", "storage", "compute", "host-a"] {
            app.system(s, "infrastructure", json!({})).await;
        }
        assert_eq!(app.include("dc1", "storage").await.0, StatusCode::CREATED);
        assert_eq!(app.include("dc1", "compute").await.0, StatusCode::CREATED);
        assert_eq!(
            app.include("storage", "host-a").await.0,
            StatusCode::CREATED
        );
        assert_eq!(
            app.include("compute", "host-a").await.0,
            StatusCode::CREATED,
            "a child may have many parents"
        );
        assert_eq!(
            app.include("compute", "host-a").await.0,
            StatusCode::OK,
            "including twice changes nothing"
        );

        let before = app.counts().await;
        let (status, p) = app.include("host-a", "dc1").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(p["code"], "cycle");
        assert_eq!(p["path"], json!(["host-a", "dc1", "compute", "host-a"]));
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("host-a → dc1 → compute → host-a"),
            "{p}"
        );
        let (status, _) = app.include("host-a", "host-a").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            app.counts().await,
            before,
            "a refused include writes nothing"
        );

        let includers = app.get("/api/v1/systems/host-a/includers").await;
        let slugs: Vec<&str> = includers["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["slug"].as_str().unwrap())
            .collect();
        assert_eq!(slugs, ["compute", "storage"]);

        let (status, _) = app
            .call(
                Method::DELETE,
                "/api/v1/systems/compute/subsystems/host-a",
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, p) = app
            .call(
                Method::DELETE,
                "/api/v1/systems/compute/subsystems/host-a",
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(p["detail"], "'compute' does not include 'host-a'");
        let page = app
            .get("/api/v1/systems/compute/timeline?kind=system.included,system.excluded")
            .await;
        let kinds: Vec<&str> = page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["system.excluded", "system.included"]);
        assert_eq!(
            page["items"][0]["data"]["before"]["subsystems"],
            json!(["host-a"])
        );
        assert_eq!(page["items"][0]["data"]["after"]["subsystems"], json!([]));
        assert_eq!(
            page["items"][1]["data"]["after"]["subsystems"],
            json!(["host-a"])
        );
        assert_eq!(page["items"][0]["actor"]["name"], "Administrator");
    }
);

both!(
    anchors_are_systems_nobody_includes_grouped_by_category,
    |app| async move {
        app.system("dc1", "infrastructure", json!({})).await;
        app.system("dc2", "infrastructure", json!({})).await;
        app.system("rack-1", "infrastructure", json!({})).await;
        app.system("shop", "project", json!({})).await;
        app.include("dc1", "rack-1").await;
        let anchors = app.get("/api/v1/anchors").await;
        let groups: Vec<(String, Vec<String>)> = anchors["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                let slugs = g["systems"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["slug"].as_str().unwrap().to_owned())
                    .collect();
                (g["category"].as_str().unwrap().to_owned(), slugs)
            })
            .collect();
        assert_eq!(
            groups,
            vec![
                ("infrastructure".into(), vec!["dc1".into(), "dc2".into()]),
                ("project".into(), vec!["shop".into()]),
                ("service".into(), vec!["aramaki".into()])
            ]
        );
    }
);

both!(
    delete_is_refused_while_included_unless_forced,
    |app| async move {
        app.system("dc1", "infrastructure", json!({})).await;
        app.system("rack-1", "infrastructure", json!({})).await;
        app.include("dc1", "rack-1").await;
        let (status, p) = app
            .call(Method::DELETE, "/api/v1/systems/rack-1", None)
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(p["included_by"], json!(["dc1"]));
        let (status, _) = app
            .call(Method::DELETE, "/api/v1/systems/rack-1?force=true", None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = app.call(Method::GET, "/api/v1/systems/rack-1", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let dc = app.get("/api/v1/systems/dc1/subsystems").await;
        assert_eq!(dc["items"], json!([]));
        let t = app
            .get("/api/v1/systems/dc1/timeline?kind=system.excluded")
            .await;
        assert_eq!(t["items"][0]["data"]["reason"], "deleted");
        // The slug is free again, and the old events stay on the record.
        app.system("rack-1", "infrastructure", json!({})).await;
        let (events, _) = app.counts().await;
        assert!(events >= 6);
    }
);

both!(
    dynamic_aggregates_follow_labels_when_asked,
    |app| async move {
        app.system(
            "st-dc1",
            "infrastructure",
            json!({"role": "storage", "dc": "dc1"}),
        )
        .await;
        app.system(
            "st-dc2",
            "infrastructure",
            json!({"role": "storage", "dc": "dc2"}),
        )
        .await;
        app.system("web-dc1", "service", json!({"role": "web", "dc": "dc1"}))
            .await;
        let (status, agg) = app
        .post("/api/v1/systems", json!({"slug": "all-storage", "title": "All storage", "category": "infrastructure", "selector": "role=storage"}))
        .await;
        assert_eq!(status, StatusCode::CREATED, "{agg}");
        let (status, _) = app
        .post("/api/v1/systems", json!({"slug": "storage-dc1", "title": "Storage DC1", "category": "infrastructure", "selector": "role=storage,dc=dc1"}))
        .await;
        assert_eq!(status, StatusCode::CREATED);

        let members = |v: serde_json::Value| -> Vec<(String, String)> {
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    (
                        m["slug"].as_str().unwrap().to_owned(),
                        m["via"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        assert_eq!(
            members(app.get("/api/v1/systems/all-storage/subsystems").await),
            vec![
                ("st-dc1".into(), "selector".into()),
                ("st-dc2".into(), "selector".into())
            ]
        );
        assert_eq!(
            members(app.get("/api/v1/systems/storage-dc1/subsystems").await),
            vec![("st-dc1".into(), "selector".into())]
        );

        // Membership is computed when asked: a label change moves a system in.
        let (status, _) = app
            .call(
                Method::PATCH,
                "/api/v1/systems/web-dc1",
                Some(json!({"labels": {"role": "storage", "dc": "dc1"}})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            members(app.get("/api/v1/systems/storage-dc1/subsystems").await).len(),
            2
        );
        app.event("web-dc1", "deploy", "Deployed web", json!({}))
            .await;
        assert_eq!(
            app.titles("/api/v1/systems/all-storage/timeline?kind=deploy")
                .await,
            ["Deployed web"]
        );

        // Selector-closed cycles are refused too: st-dc1 including all-storage.
        let (status, p) = app.include("st-dc1", "all-storage").await;
        assert_eq!(status, StatusCode::CONFLICT, "{p}");
        assert_eq!(p["path"], json!(["st-dc1", "all-storage", "st-dc1"]));
        // …and so is a label change that would close one.
        app.system("group", "infrastructure", json!({})).await;
        assert_eq!(
            app.include("group", "all-storage").await.0,
            StatusCode::CREATED
        );
        let (status, p) = app
            .call(
                Method::PATCH,
                "/api/v1/systems/group",
                Some(json!({"labels": {"role": "storage"}})),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{p}");
        assert_eq!(p["code"], "cycle");

        // "selector": null turns the aggregate back into a plain system.
        let (status, plain) = app
            .call(
                Method::PATCH,
                "/api/v1/systems/storage-dc1",
                Some(json!({"selector": null})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(plain["selector"].is_null());
        assert_eq!(
            app.get("/api/v1/systems/storage-dc1/subsystems").await["items"],
            json!([])
        );
    }
);

both!(list_filters_by_category_label_and_text, |app| async move {
    app.system(
        "st-dc1",
        "infrastructure",
        json!({"role": "storage", "dc": "dc1"}),
    )
    .await;
    app.system(
        "st-dc2",
        "infrastructure",
        json!({"role": "storage", "dc": "dc2"}),
    )
    .await;
    app.system("shop", "project", json!({"customer": "acme"}))
        .await;
    let slugs = |v: serde_json::Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["slug"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        slugs(app.get("/api/v1/systems?category=project").await),
        ["shop"]
    );
    assert_eq!(
        slugs(
            app.get("/api/v1/systems?label=role%3Dstorage,dc%3Ddc2")
                .await
        ),
        ["st-dc2"]
    );
    assert_eq!(
        slugs(app.get("/api/v1/systems?label=!role").await),
        ["aramaki", "shop"],
        "the instance's own system has no role label either"
    );
    assert_eq!(slugs(app.get("/api/v1/systems?q=ACME").await), ["shop"]);
    let page = app.get("/api/v1/systems?limit=2").await;
    assert_eq!(slugs(page.clone()), ["aramaki", "shop"]);
    let next = page["next"].as_str().unwrap();
    let rest = app
        .get(&format!("/api/v1/systems?limit=2&cursor={next}"))
        .await;
    assert_eq!(slugs(rest.clone()), ["st-dc1", "st-dc2"]);
    assert!(rest["next"].is_null());
});

both!(
    status_is_decomposed_layer_by_layer_with_paths,
    |app| async move {
        for s in ["dc1", "storage", "compute", "host-a"] {
            app.system(s, "infrastructure", json!({})).await;
        }
        app.include("dc1", "storage").await;
        app.include("dc1", "compute").await;
        app.include("storage", "host-a").await;
        app.include("compute", "host-a").await;
        app.event(
            "host-a",
            "state",
            "disk almost full",
            json!({"severity": "warning", "data": {"source": "disk"}}),
        )
        .await;
        app.event(
            "host-a",
            "state",
            "load fine",
            json!({"severity": "ok", "data": {"source": "load"}}),
        )
        .await;
        app.event("compute", "state", "all good", json!({"severity": "ok"}))
            .await;

        let status = app.get("/api/v1/systems/dc1/status").await;
        assert_eq!(status["slug"], "dc1");
        assert_eq!(status["state"], "unknown", "dc1 itself has said nothing");
        assert_eq!(status["worst"], "warning");
        assert_eq!(status["path"], json!(["dc1"]));
        let layers = status["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0]["slug"], "compute");
        assert_eq!(layers[0]["state"], "ok");
        assert_eq!(layers[0]["worst"], "warning");
        let host_via_compute = &layers[0]["layers"][0];
        assert_eq!(
            host_via_compute["path"],
            json!(["dc1", "compute", "host-a"])
        );
        assert_eq!(host_via_compute["state"], "warning");
        assert_eq!(host_via_compute["sources"].as_array().unwrap().len(), 2);
        assert_eq!(
            layers[1]["layers"][0]["path"],
            json!(["dc1", "storage", "host-a"])
        );
        assert_eq!(status["truncated"], false);

        // A recovery clears the warning.
        app.event(
            "host-a",
            "state",
            "disk cleaned",
            json!({"severity": "ok", "data": {"source": "disk"}}),
        )
        .await;
        assert_eq!(app.get("/api/v1/systems/dc1/status").await["worst"], "ok");
    }
);

both!(
    excluding_answers_alike_for_missing_and_unseen_children,
    |app| async move {
        app.system("par", "service", json!({})).await;
        app.system("kid", "service", json!({})).await;
        app.system("hidden", "service", json!({})).await;
        app.include("par", "kid").await;
        let admin = app
            .user_with_grants("paradmin", &[("par", aramaki::users::Role::Admin)])
            .await;
        let exclude = |child: &'static str| {
            let app = &app;
            let admin = admin.clone();
            async move {
                app.call_as(
                    &admin,
                    Method::DELETE,
                    &format!("/api/v1/systems/par/subsystems/{child}"),
                    None,
                )
                .await
            }
        };
        let (missing, m) = exclude("nope").await;
        let (unseen, u) = exclude("hidden").await;
        assert_eq!(missing, StatusCode::NOT_FOUND, "{m}");
        assert_eq!(
            unseen,
            StatusCode::NOT_FOUND,
            "an existing system out of sight: {u}"
        );
        assert_eq!(m["code"], u["code"]);
        assert_eq!(
            m["detail"].as_str().unwrap().replace("nope", "X"),
            u["detail"].as_str().unwrap().replace("hidden", "X")
        );
        // What the caller sees still excludes, and says so when it is not included.
        let (status, v) = exclude("kid").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
        let (status, v) = exclude("kid").await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "kid is no longer below par: {v}"
        );
    }
);
