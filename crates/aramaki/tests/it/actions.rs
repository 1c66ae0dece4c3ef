//! Actions through the API on both databases, with a protocol-level agent:
//! definitions, targets, requests as agents receive them, lost targets.

use aramaki::monitoring::watch::sweep;
use aramaki_protocol::agent::{action_transcript, ServerMessage};
use aramaki_protocol::keys::unhex_array;
use ed25519_dalek::{Signature, Verifier};
use jiff::SignedDuration;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both;
use crate::monitoring::{enrolled, SimAgent};

both!(definitions_are_validated_by_field, |app| async move {
    app.system("web", "host", json!({})).await;
    let cases = [
        (json!({"name": "Flush!", "title": "x"}), "name"),
        (json!({"name": "flush", "title": ""}), "title"),
        (
            json!({"name": "flush", "title": "x", "role": "root"}),
            "role",
        ),
        (
            json!({"name": "flush", "title": "x", "timeout": 0}),
            "timeout",
        ),
        (
            json!({"name": "flush", "title": "x", "windows": [{"days": ["someday"], "from": "1:00", "to": "2:00"}]}),
            "windows",
        ),
        (
            json!({"name": "flush", "title": "x", "timezone": "Moon/Base"}),
            "timezone",
        ),
        (
            json!({"name": "flush", "title": "x", "params": [{"name": "p", "type": "string", "pattern": "("}]}),
            "params",
        ),
        (
            json!({"name": "flush", "title": "x", "params": [{"name": "p", "type": "enum"}]}),
            "params",
        ),
    ];
    for (body, field) in cases {
        let (status, v) = app.post("/api/v1/systems/web/actions", body.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
    }
    let (status, v) = app
        .post("/api/v1/systems/web/actions", json!({"name": "flush", "title": "x", "params": [{"name": "p", "type": "string", "colour": "red"}]}))
        .await;
    assert!(
        status.is_client_error() && v["detail"].as_str().unwrap().contains("colour"),
        "{v}"
    );
    assert_eq!(
        app.get("/api/v1/actions").await["items"]
            .as_array()
            .unwrap()
            .len(),
        0,
        "nothing written"
    );
    let operator = app.user("otto", aramaki::users::Role::Operator).await;
    let (status, _) = app
        .call_as(
            &operator,
            Method::POST,
            "/api/v1/systems/web/actions",
            Some(json!({"name": "flush", "title": "x"})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "defining actions needs admin on the system"
    );
    let (status, v) = app
        .post(
            "/api/v1/systems/web/actions",
            json!({"name": "flush", "title": "Flush"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = app
        .call(
            Method::POST,
            "/api/v1/systems/web/actions/flush/runs",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(v["code"], "no_targets", "{v}");
});

both!(
    agents_get_signed_requests_and_silent_ones_are_given_up,
    |app| async move {
        let (id, k) = enrolled(&app, "edge-9", 91).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        app.post("/api/v1/systems/edge-9-host/actions", json!({"name": "purge", "title": "Purge", "timeout": 30, "params": [{"name": "scope", "type": "enum", "values": ["all", "images"], "default": "all"}]}))
        .await;
        let (status, run) = app
            .call(
                Method::POST,
                "/api/v1/systems/edge-9-host/actions/purge/runs",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let signed = match agent.next().await {
            ServerMessage::Action(signed) => signed,
            other => panic!("expected an action request, got {other:?}"),
        };
        assert_eq!(signed.request.audience, id);
        assert_eq!(signed.request.run_id, run["id"].as_str().unwrap());
        assert_eq!(
            signed.request.params["scope"], "all",
            "defaults are filled in"
        );
        assert_eq!(signed.request.timeout_secs, 30);
        let signature = Signature::from_bytes(&unhex_array::<64>(&signed.signature).unwrap());
        app.ctx
            .identity
            .public_key()
            .verify(&action_transcript(&signed.request), &signature)
            .expect("signed with the instance key");

        let stranger = app.user_with_grants("stan", &[]).await;
        let cancel = format!(
            "/api/v1/actions/runs/{}/cancel",
            run["id"].as_str().unwrap()
        );
        let (status, _) = app
            .call_as(&stranger, Method::POST, &cancel, Some(json!({})))
            .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "a run one cannot see does not exist"
        );
        let viewer = app.user("val", aramaki::users::Role::Viewer).await;
        let (status, _) = app
            .call_as(&viewer, Method::POST, &cancel, Some(json!({})))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // The agent never answers: the run is not held open for ever.
        let started = app.ctx.now();
        assert_eq!(sweep(&app.ctx, started).await.unwrap().lost_actions, 0);
        app.clock.advance(SignedDuration::from_mins(10));
        assert_eq!(sweep(&app.ctx, started).await.unwrap().lost_actions, 1);
        let v = app
            .get(&format!(
                "/api/v1/actions/runs/{}",
                run["id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(v["state"], "failed");
        assert_eq!(v["targets"][0]["state"], "lost");
        let (status, v) = app
            .call(
                Method::POST,
                "/api/v1/systems/edge-9-host/actions/purge/runs",
                Some(json!({"confirm": true, "params": {"scope": "images"}})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "no longer busy: {v}");
    }
);
