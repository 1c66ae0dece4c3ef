//! What the server believes of an agent (issue 13, follow-up): an agent
//! declares its plain subscriptions only, gets checks bound to another
//! system only when named, and reports only on systems its checks concern.

use aramaki::users::Role;
use aramaki_protocol::agent::{Record, RecordBody, ServerMessage};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::both;
use crate::monitoring::{enrolled, result, timeline_kinds, SimAgent};
use crate::support::TestApp;

fn names(checks: &[aramaki_protocol::agent::CheckDefinition]) -> Vec<String> {
    let mut names: Vec<String> = checks.iter().map(|c| c.name.clone()).collect();
    names.sort();
    names
}

async fn define(app: &TestApp, def: Value) {
    let (status, body) = app.post("/api/v1/checks", def).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

async fn check_names_as(app: &TestApp, token: &str) -> Vec<String> {
    let (status, list) = app
        .call_as(token, Method::GET, "/api/v1/checks", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// The victim's estate: a database system with its own agent, checks that
/// carry its password, and a host it includes.
async fn victim_estate(app: &TestApp) {
    app.system("victim-db", "host", json!({})).await;
    enrolled(app, "victim-agent", 31).await;
    define(
        app,
        json!({"name": "pg-victim", "command": ["/usr/lib/nagios/plugins/check_pgsql"],
               "subscriptions": ["system:victim-db"], "interval": 60,
               "env": {"PGPASSWORD": "hunter2-secret"}}),
    )
    .await;
    define(
        app,
        json!({"name": "victim-agent-only", "command": ["/bin/true"],
               "subscriptions": ["agent:victim-agent"], "interval": 60,
               "env": {"TOKEN": "agent-secret"}}),
    )
    .await;
    define(
        app,
        json!({"name": "pg-bound", "command": ["/usr/lib/nagios/plugins/check_pgsql"],
               "subscriptions": ["linux"], "system": "victim-db", "interval": 60,
               "env": {"PGPASSWORD": "bound-secret"}}),
    )
    .await;
    define(
        app,
        json!({"name": "load", "command": ["/usr/lib/nagios/plugins/check_load"],
               "subscriptions": ["linux"], "interval": 60}),
    )
    .await;
}

// A tenant's host (its agent, or root on it) names another tenant's system
// and agent in its hello: the server ignores both, records it once, sends
// no check of theirs (nor one bound to their system through `linux`), and
// the tenant's viewers do not get to list those checks either.
both!(
    hello_subscriptions_cannot_name_another_system_or_agent,
    |app| async move {
        victim_estate(&app).await;
        let (id, k) = enrolled(&app, "intruder", 32).await;
        let mut agent = SimAgent::connect_subscribed(
            &app,
            &id,
            &k,
            &[
                "linux",
                "system:victim-db",
                "agent:victim-agent",
                "system:intruder-host",
                "agent:intruder",
            ],
        )
        .await
        .unwrap();
        assert_eq!(names(&agent.checks), ["load"]);
        let sent = serde_json::to_string(&agent.checks).unwrap();
        assert!(!sent.contains("secret"), "{sent}");

        let ignored = timeline_kinds(&app, "intruder-host", "agent.subscriptions_ignored").await;
        assert_eq!(ignored.len(), 1, "{ignored:?}");
        assert_eq!(ignored[0]["severity"], "critical");
        assert_eq!(
            ignored[0]["data"]["ignored"],
            json!(["system:victim-db", "agent:victim-agent"])
        );
        let registered = app.get("/api/v1/agents/intruder").await;
        assert_eq!(
            registered["subscriptions"],
            json!(["linux", "system:intruder-host", "agent:intruder"]),
            "{registered}"
        );

        // A check defined later is pushed by the same rule.
        define(
            &app,
            json!({"name": "pg-victim-2", "command": ["/bin/true"],
                   "subscriptions": ["system:victim-db"], "interval": 60,
                   "env": {"PGPASSWORD": "later-secret"}}),
        )
        .await;
        match agent.next().await {
            ServerMessage::Checks { checks } => assert_eq!(names(&checks), ["load"]),
            other => panic!("expected the pushed checks, got {other:?}"),
        }

        // The intruding tenant's viewer lists only what concerns its host.
        let tenant = app
            .user_with_grants("tenant", &[("intruder-host", Role::Viewer)])
            .await;
        assert_eq!(check_names_as(&app, &tenant).await, ["load"]);

        // Subscriptions stored before this rule (an older database, a
        // backup) are ignored just the same.
        let mut tx = app.ctx.db.begin().await.unwrap();
        sqlx::query("UPDATE agents SET subscriptions = $1 WHERE name = 'intruder'")
            .bind(r#"["linux","system:victim-db","agent:victim-agent"]"#)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(check_names_as(&app, &tenant).await, ["load"]);
    }
);

// A check bound to a system goes through a plain subscription only to
// agents on that system or on a system it includes explicitly; an agent
// elsewhere (a poller) gets it only when the check names it.
both!(
    a_bound_check_reaches_only_its_systems_agents_or_named_ones,
    |app| async move {
        victim_estate(&app).await;
        let (victim_id, victim_key) = enrolled(&app, "victim-node", 33).await;
        let (status, body) = app.include("victim-db", "victim-node-host").await;
        assert!(status.is_success(), "{body}");
        let (id, k) = enrolled(&app, "bystander", 34).await;

        let own = SimAgent::connect(&app, &victim_id, &victim_key)
            .await
            .unwrap();
        assert_eq!(names(&own.checks), ["load", "pg-bound"]);
        let mut other = SimAgent::connect(&app, &id, &k).await.unwrap();
        assert_eq!(names(&other.checks), ["load"]);

        define(
            &app,
            json!({"name": "pg-from-poller", "command": ["/bin/true"],
                   "subscriptions": ["agent:bystander"], "system": "victim-db", "interval": 60}),
        )
        .await;
        match other.next().await {
            ServerMessage::Checks { checks } => {
                assert_eq!(names(&checks), ["load", "pg-from-poller"]);
            }
            other => panic!("expected the pushed checks, got {other:?}"),
        }
    }
);

// Any agent posting a result of a check bound to another system onto that
// system: refused for that record, acknowledged (never retried), written
// nowhere, and recorded once as a security event on the agent's system.
both!(
    results_for_another_system_are_refused_and_acknowledged,
    |app| async move {
        victim_estate(&app).await;
        let (id, k) = enrolled(&app, "intruder", 35).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let forged = |seq: u64, check: &str, system: &str| {
            let mut r = result(seq, check, 0, "OK - all fine");
            if let RecordBody::Result(res) = &mut r.body {
                res.system = Some(system.into());
            }
            r
        };
        let pushed = Record {
            seq: 3,
            body: RecordBody::Pushed {
                result: match forged(3, "pg-bound", "victim-db").body {
                    RecordBody::Result(r) => r,
                    _ => unreachable!(),
                },
                ttl_secs: 60,
            },
        };
        let up_to = agent
            .send(vec![
                forged(1, "pg-bound", "victim-db"),
                forged(2, "pg-bound", "victim-db"),
                pushed,
                forged(4, "pg-victim", "victim-db"),
                result(5, "load", 0, "LOAD OK"),
            ])
            .await;
        assert_eq!(up_to, 5, "refused records are acknowledged too");

        let victim = app.get("/api/v1/systems/victim-db/observations").await;
        assert_eq!(victim["items"], json!([]), "{victim}");
        let own = app.get("/api/v1/systems/intruder-host/observations").await;
        let mut checks: Vec<&str> = own["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["check"].as_str().unwrap())
            .collect();
        checks.sort();
        assert_eq!(checks, ["keepalive", "load"], "{own}");
        let refused = timeline_kinds(&app, "intruder-host", "agent.result_refused").await;
        let mut what: Vec<(String, String)> = refused
            .iter()
            .map(|e| {
                (
                    e["data"]["check"].as_str().unwrap().to_owned(),
                    e["data"]["system"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        what.sort();
        assert_eq!(
            what,
            [
                ("pg-bound".to_owned(), "victim-db".to_owned()),
                ("pg-victim".to_owned(), "victim-db".to_owned())
            ],
            "one event per refused (check, system), not per record"
        );
        assert!(refused.iter().all(|e| e["severity"] == "critical"));
        // Nothing about it reached the victim's timeline.
        let theirs = timeline_kinds(&app, "victim-db", "check.state_changed").await;
        assert_eq!(theirs, Vec::<Value>::new());

        // The same records again are replays: nothing new.
        let again = agent.send(vec![forged(2, "pg-bound", "victim-db")]).await;
        assert_eq!(again, 5);
    }
);
