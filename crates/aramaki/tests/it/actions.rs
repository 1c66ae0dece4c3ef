//! Actions through the API on both databases, with a protocol-level agent:
//! definitions, targets, requests as agents receive them, lost targets.

use aramaki::monitoring::watch::sweep;
use aramaki_protocol::agent::{
    action_transcript, ActionState, ActionUpdate, AgentMessage, Record, RecordBody, ServerMessage,
};
use aramaki_protocol::keys::unhex_array;
use ed25519_dalek::{Signature, Verifier};
use jiff::SignedDuration;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::agent_e2e::eventually;
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

/// Sends `body` to the runs endpoint `n` times at once (real concurrent
/// HTTP requests); returns the answers.
async fn run_at_once(
    app: &crate::support::TestApp,
    path: &str,
    body: serde_json::Value,
    n: usize,
) -> Vec<(StatusCode, serde_json::Value)> {
    futures_util::future::join_all((0..n).map(|_| app.call(Method::POST, path, Some(body.clone()))))
        .await
}

async fn count_runs(app: &crate::support::TestApp) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM action_runs")
        .fetch_one(app.ctx.db.reader())
        .await
        .unwrap()
        .get(0)
}

both!(
    simultaneous_run_requests_start_no_more_than_the_rules_allow,
    |app| async move {
        let (id, k) = enrolled(&app, "edge-4", 94).await;
        let _agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let (status, v) = app
            .post(
                "/api/v1/systems/edge-4-host/actions",
                json!({"name": "once", "title": "One at a time", "confirm_within_minutes": null}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let answers = run_at_once(
            &app,
            "/api/v1/systems/edge-4-host/actions/once/runs",
            json!({}),
            4,
        )
        .await;
        let started = answers
            .iter()
            .filter(|(s, _)| *s == StatusCode::ACCEPTED)
            .count();
        assert_eq!(started, 1, "exactly one starts: {answers:?}");
        for (status, v) in answers.iter().filter(|(s, _)| *s != StatusCode::ACCEPTED) {
            assert_eq!(*status, StatusCode::CONFLICT, "{v}");
            assert_eq!(v["code"], "busy", "{v}");
            assert!(
                v["detail"].as_str().unwrap().contains("already running"),
                "{v}"
            );
        }
        assert_eq!(count_runs(&app).await, 1);

        // Two at once allowed, but a recent run asks for confirmation: of
        // four unconfirmed requests one starts, three are asked.
        let (status, v) = app
            .post("/api/v1/systems/edge-4-host/actions", json!({"name": "twice", "title": "Two at a time", "concurrency": 2, "confirm_within_minutes": 30}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let path = "/api/v1/systems/edge-4-host/actions/twice/runs";
        let answers = run_at_once(&app, path, json!({}), 4).await;
        let codes: Vec<&str> = answers
            .iter()
            .map(|(s, v)| {
                if *s == StatusCode::ACCEPTED {
                    "started"
                } else {
                    v["code"].as_str().unwrap_or("?")
                }
            })
            .collect();
        assert_eq!(
            codes.iter().filter(|c| **c == "started").count(),
            1,
            "{answers:?}"
        );
        assert_eq!(
            codes.iter().filter(|c| **c == "confirm").count(),
            3,
            "{answers:?}"
        );
        // Confirmed: only one more fits beside the running one.
        let answers = run_at_once(&app, path, json!({"confirm": true}), 4).await;
        let started = answers
            .iter()
            .filter(|(s, _)| *s == StatusCode::ACCEPTED)
            .count();
        assert_eq!(started, 1, "{answers:?}");
        assert!(
            answers
                .iter()
                .filter(|(s, _)| *s != StatusCode::ACCEPTED)
                .all(|(_, v)| v["code"] == "busy"),
            "{answers:?}"
        );
        assert_eq!(count_runs(&app).await, 3);
        // Every busy refusal is on the record.
        let refused = app
            .get("/api/v1/systems/edge-4-host/timeline?kind=action.refused&limit=100")
            .await;
        let busy = refused["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"]["code"] == "busy")
            .count();
        assert_eq!(busy, 6);
    }
);

/// Sends a live update over the agent's session.
async fn live(agent: &mut SimAgent, update: ActionUpdate) {
    agent.say(&AgentMessage::ActionUpdate(update)).await;
}

fn update(run_id: &str, state: ActionState, output: &str) -> ActionUpdate {
    ActionUpdate {
        run_id: run_id.into(),
        state,
        exit_code: None,
        output: output.into(),
        refusal: None,
        timeout_secs: None,
    }
}

fn refusal(run_id: &str, code: Option<&str>, output: &str) -> ActionUpdate {
    ActionUpdate {
        refusal: code.map(str::to_owned),
        ..update(run_id, ActionState::Refused, output)
    }
}

/// The next action request the agent receives.
async fn next_request(agent: &mut SimAgent) -> aramaki_protocol::agent::SignedAction {
    loop {
        match agent.next().await {
            ServerMessage::Action(signed) => return signed,
            ServerMessage::Checks { .. } | ServerMessage::Heartbeat => {}
            other => panic!("expected an action request, got {other:?}"),
        }
    }
}

async fn security_events(app: &crate::support::TestApp, system: &str) -> Vec<serde_json::Value> {
    app.get(&format!(
        "/api/v1/systems/{system}/timeline?kind=action.refused&limit=100"
    ))
    .await["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["security"] == true)
        .cloned()
        .collect()
}

both!(
    a_refused_replay_is_recorded_and_leaves_the_live_run_alone,
    |app| async move {
        let (id, k) = enrolled(&app, "edge-5", 95).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let (status, v) = app
            .post("/api/v1/systems/edge-5-host/actions", json!({"name": "slow", "title": "Slow", "timeout": 600, "confirm_within_minutes": null}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let runs = "/api/v1/systems/edge-5-host/actions/slow/runs";
        let (status, run) = app.call(Method::POST, runs, Some(json!({}))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let run_id = run["id"].as_str().unwrap().to_owned();
        assert_eq!(run["timeout_secs"], 600);
        let signed = next_request(&mut agent).await;
        assert_eq!(signed.request.timeout_secs, 600);
        // The agent starts it, capped by its own configuration at 20 s.
        live(
            &mut agent,
            ActionUpdate {
                timeout_secs: Some(20),
                ..update(&run_id, ActionState::Started, "")
            },
        )
        .await;
        let path = format!("/api/v1/actions/runs/{run_id}");
        eventually("the run to be running on the agent", || async {
            let v = app.get(&path).await;
            (v["targets"][0]["state"] == "running").then_some(v)
        })
        .await;
        let shown = app.get(&path).await;
        assert_eq!(shown["targets"][0]["timeout_secs"], 20, "{shown}");

        // A replayed copy reaches the agent, which refuses it.
        agent
            .send(vec![Record {
                seq: 1,
                body: RecordBody::Action(refusal(
                    &run_id,
                    Some("replayed"),
                    &format!("run id {run_id} was seen before (replay)"),
                )),
            }])
            .await;
        let shown = app.get(&path).await;
        assert_eq!(shown["state"], "running", "{shown}");
        assert_eq!(shown["targets"][0]["state"], "running", "{shown}");
        let events = security_events(&app, "edge-5-host").await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["data"]["agent"], "edge-5");
        assert_eq!(events[0]["data"]["run"], run_id.as_str());
        assert_eq!(events[0]["data"]["refusal"], "replayed");
        assert!(events[0]["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("replay"));
        assert_eq!(events[0]["severity"], "warning");

        // The guard still holds, and Cancel still reaches the agent.
        let (status, busy) = app.call(Method::POST, runs, Some(json!({}))).await;
        assert_eq!(status, StatusCode::CONFLICT, "{busy}");
        assert_eq!(busy["code"], "busy");
        let operator = app.user("olga", aramaki::users::Role::Operator).await;
        let (status, cancelled) = app
            .call_as(
                &operator,
                Method::POST,
                &format!("{path}/cancel"),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
        assert_eq!(cancelled["cancelled_by"]["name"], "olga");
        loop {
            match agent.next().await {
                ServerMessage::Cancel { run_id: r } => {
                    assert_eq!(r, run_id);
                    break;
                }
                ServerMessage::Checks { .. } | ServerMessage::Heartbeat => {}
                other => panic!("expected the cancel, got {other:?}"),
            }
        }
        agent
            .send(vec![Record {
                seq: 2,
                body: RecordBody::Action(update(
                    &run_id,
                    ActionState::Cancelled,
                    "cancelled; process group killed",
                )),
            }])
            .await;
        let shown = app.get(&path).await;
        assert_eq!(shown["state"], "cancelled", "{shown}");
        assert_eq!(shown["cancelled_by"]["name"], "olga");
        let timeline = |kind: &'static str| {
            let app = &app;
            async move {
                app.get(&format!("/api/v1/systems/edge-5-host/timeline?kind={kind}"))
                    .await["items"][0]
                    .clone()
            }
        };
        let asked = timeline("action.cancelled").await;
        assert_eq!(asked["actor"]["name"], "olga", "{asked}");
        assert_eq!(asked["data"]["run"], run_id.as_str());
        let finished = timeline("action.finished").await;
        assert_eq!(
            finished["data"]["cancelled_by"]["name"], "olga",
            "{finished}"
        );
        assert!(
            finished["title"].as_str().unwrap().contains("olga"),
            "{finished}"
        );
        // Cancelling what no longer runs is refused, not recorded again.
        let (status, v) = app
            .call(Method::POST, &format!("{path}/cancel"), Some(json!({})))
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{v}");
        assert_eq!(v["code"], "not_running");
    }
);

both!(
    only_a_refusal_of_the_request_sent_closes_a_target,
    |app| async move {
        let (id, k) = enrolled(&app, "edge-6", 96).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        app.post("/api/v1/systems/edge-6-host/actions", json!({"name": "job", "title": "Job", "confirm_within_minutes": null, "concurrency": 5}))
            .await;
        let runs = "/api/v1/systems/edge-6-host/actions/job/runs";
        let (_, first) = app.call(Method::POST, runs, Some(json!({}))).await;
        let first = first["id"].as_str().unwrap().to_owned();
        next_request(&mut agent).await;
        // Not yet started on the agent: a forged copy, one for another
        // agent, and a refusal without a code change nothing.
        agent
            .send(vec![
                Record {
                    seq: 1,
                    body: RecordBody::Action(refusal(
                        &first,
                        Some("bad_signature"),
                        "the request's signature does not verify",
                    )),
                },
                Record {
                    seq: 2,
                    body: RecordBody::Action(refusal(
                        &first,
                        Some("wrong_audience"),
                        "the request is for agent x",
                    )),
                },
                Record {
                    seq: 3,
                    body: RecordBody::Action(refusal(&first, None, "refused")),
                },
            ])
            .await;
        let path = format!("/api/v1/actions/runs/{first}");
        let shown = app.get(&path).await;
        assert_eq!(shown["state"], "running", "{shown}");
        assert_eq!(shown["targets"][0]["state"], "sent", "{shown}");
        assert_eq!(security_events(&app, "edge-6-host").await.len(), 3);
        // The agent refusing the request it was sent is the run's outcome.
        agent
            .send(vec![Record {
                seq: 4,
                body: RecordBody::Action(refusal(
                    &first,
                    Some("not_allowed"),
                    "action 'job' is not in this agent's allow-list",
                )),
            }])
            .await;
        let shown = app.get(&path).await;
        assert_eq!(shown["state"], "failed", "{shown}");
        assert_eq!(shown["targets"][0]["state"], "refused", "{shown}");
        assert_eq!(security_events(&app, "edge-6-host").await.len(), 3);
        // A refusal arriving for a finished run is on the record too.
        agent
            .send(vec![Record {
                seq: 5,
                body: RecordBody::Action(refusal(&first, Some("expired"), "the request expired")),
            }])
            .await;
        assert_eq!(app.get(&path).await["targets"][0]["state"], "refused");
        let events = security_events(&app, "edge-6-host").await;
        assert_eq!(events.len(), 4);
        assert_eq!(events[0]["data"]["run_state"], "failed", "{:?}", events[0]);
    }
);

both!(
    values_beginning_with_a_dash_are_refused_by_field,
    |app| async move {
        let (id, k) = enrolled(&app, "edge-7", 97).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let (status, v) = app
            .post("/api/v1/systems/edge-7-host/actions", json!({"name": "du", "title": "Disk usage", "confirm_within_minutes": null, "concurrency": 10,
                "params": [{"name": "path", "type": "string"}, {"name": "label", "type": "string", "max_len": 4},
                           {"name": "flags", "type": "string", "allow_leading_dash": true}]}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let runs = "/api/v1/systems/edge-7-host/actions/du/runs";
        let (status, v) = app
            .call(
                Method::POST,
                runs,
                Some(json!({"params": {"path": "--files0-from=/etc/shadow"}})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["code"], "invalid_params");
        assert_eq!(v["field"], "params.path");
        assert!(v["detail"].as_str().unwrap().contains("'-'"), "{v}");
        // Lengths are characters, as the message says.
        let (status, v) = app
            .call(
                Method::POST,
                runs,
                Some(json!({"params": {"path": "/srv", "label": "ÄÖÜß"}})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "four characters: {v}");
        let (status, v) = app
            .call(
                Method::POST,
                runs,
                Some(json!({"params": {"path": "/srv", "label": "ÄÖÜßa"}})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("at most 4 characters"),
            "{v}"
        );
        // An explicit opt-in lets a dash through to the agent.
        let (status, v) = app
            .call(
                Method::POST,
                runs,
                Some(json!({"params": {"path": "/srv", "flags": "-x"}})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        next_request(&mut agent).await;
        let signed = next_request(&mut agent).await;
        assert_eq!(signed.request.params["flags"], "-x");
        // An enum value or default that begins with '-' needs it too.
        let (status, v) = app
            .post(
                "/api/v1/systems/edge-7-host/actions",
                json!({"name": "rm", "title": "Remove",
                "params": [{"name": "mode", "type": "enum", "values": ["-rf", "-i"]}]}),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert_eq!(v["field"], "params");
        assert!(
            v["detail"].as_str().unwrap().contains("allow_leading_dash"),
            "{v}"
        );
    }
);

both!(
    the_applied_timeout_is_kept_whichever_update_comes_first,
    |app| async move {
        let (id, k) = enrolled(&app, "edge-8", 98).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        app.post("/api/v1/systems/edge-8-host/actions", json!({"name": "quick", "title": "Quick", "timeout": 300, "confirm_within_minutes": null}))
            .await;
        let (_, run) = app
            .call(
                Method::POST,
                "/api/v1/systems/edge-8-host/actions/quick/runs",
                Some(json!({})),
            )
            .await;
        let run_id = run["id"].as_str().unwrap().to_owned();
        next_request(&mut agent).await;
        // The outcome (queued) overtakes the live `started`.
        agent
            .send(vec![Record {
                seq: 1,
                body: RecordBody::Action(ActionUpdate {
                    timeout_secs: Some(15),
                    exit_code: Some(0),
                    ..update(&run_id, ActionState::Succeeded, "")
                }),
            }])
            .await;
        let path = format!("/api/v1/actions/runs/{run_id}");
        let shown = app.get(&path).await;
        assert_eq!(shown["state"], "succeeded", "{shown}");
        assert_eq!(shown["targets"][0]["timeout_secs"], 15, "{shown}");
        live(
            &mut agent,
            ActionUpdate {
                timeout_secs: Some(15),
                ..update(&run_id, ActionState::Started, "")
            },
        )
        .await;
        // A heartbeat round trip: the late `started` has been handled.
        agent
            .say(&AgentMessage::Heartbeat {
                queue_depth: 0,
                dropped: 0,
            })
            .await;
        loop {
            if let ServerMessage::Heartbeat = agent.next().await {
                break;
            }
        }
        let shown = app.get(&path).await;
        assert_eq!(shown["targets"][0]["state"], "succeeded", "{shown}");
        assert_eq!(shown["targets"][0]["timeout_secs"], 15);
    }
);

both!(
    a_run_is_given_up_by_the_timeout_it_asked_for,
    |app| async move {
        let (id, k) = enrolled(&app, "edge-3", 93).await;
        let _agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let spec = |timeout: u32| json!({"name": "long", "title": "Long", "timeout": timeout, "confirm_within_minutes": null});
        app.post("/api/v1/systems/edge-3-host/actions", spec(1200))
            .await;
        let (_, run) = app
            .call(
                Method::POST,
                "/api/v1/systems/edge-3-host/actions/long/runs",
                Some(json!({})),
            )
            .await;
        // The admin shortens the action while it runs: this run keeps the
        // 20 minutes it was sent with.
        let (status, v) = app
            .call(
                Method::PUT,
                "/api/v1/systems/edge-3-host/actions/long",
                Some(spec(1)),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let started = app.ctx.now();
        app.clock.advance(SignedDuration::from_mins(10));
        assert_eq!(sweep(&app.ctx, started).await.unwrap().lost_actions, 0);
        app.clock.advance(SignedDuration::from_mins(20));
        assert_eq!(sweep(&app.ctx, started).await.unwrap().lost_actions, 1);
        let v = app
            .get(&format!(
                "/api/v1/actions/runs/{}",
                run["id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(v["targets"][0]["state"], "lost");
    }
);

both!(
    a_run_shows_only_the_targets_its_viewer_may_see,
    |app| async move {
        // "w-host" aggregates every web host by selector; "t1-host" is
        // another customer's web host, out of w-host's admin's grants.
        let (status, v) = app
            .post(
                "/api/v1/systems",
                json!({"slug": "w-host", "title": "W", "category": "host", "selector": "role=web"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        app.system("t1-host", "host", json!({"role": "web"})).await;
        enrolled(&app, "w", 111).await;
        enrolled(&app, "t1", 112).await;
        let (status, v) = app
            .post(
                "/api/v1/systems/w-host/actions",
                json!({"name": "probe", "title": "Probe", "include_subsystems": true}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let (status, run) = app
            .call(
                Method::POST,
                "/api/v1/systems/w-host/actions/probe/runs",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let agents = |run: &serde_json::Value| -> Vec<String> {
            run["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["agent"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            agents(&run),
            ["t1", "w"],
            "the instance admin ran it on both"
        );

        let wadmin = app
            .user_with_grants("wadmin", &[("w-host", aramaki::users::Role::Admin)])
            .await;
        let path = format!("/api/v1/actions/runs/{}", run["id"].as_str().unwrap());
        let (status, shown) = app.call_as(&wadmin, Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{shown}");
        assert_eq!(agents(&shown), ["w"], "{shown}");
        let (status, list) = app
            .call_as(
                &wadmin,
                Method::GET,
                "/api/v1/systems/w-host/actions/probe/runs",
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{list}");
        assert_eq!(agents(&list["items"][0]), ["w"], "{list}");
        assert!(!list.to_string().contains("t1"), "{list}");
    }
);

both!(
    a_system_that_takes_a_deleted_systems_slug_does_not_inherit_its_events_or_runs,
    |app| async move {
        app.system("old", "host", json!({})).await;
        app.system("mine", "host", json!({})).await;
        enrolled(&app, "old", 113).await; // binds an agent to "old-host"
        let (status, v) = app
            .post(
                "/api/v1/systems/old-host/actions",
                json!({"name": "probe", "title": "Probe"}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let (status, run) = app
            .call(
                Method::POST,
                "/api/v1/systems/old-host/actions/probe/runs",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let event = app
            .event("old-host", "note", "the old host's secret", json!({}))
            .await;
        let (status, v) = app
            .call(Method::DELETE, "/api/v1/systems/old-host", None)
            .await;
        assert!(status.is_success(), "delete: {status} {v}");

        let bob = app
            .user_with_grants("bob", &[("mine", aramaki::users::Role::Admin)])
            .await;
        let (status, v) = app
            .call_as(
                &bob,
                Method::PATCH,
                "/api/v1/systems/mine",
                Some(json!({"slug": "old-host"})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "rename: {v}");
        let (status, v) = app
            .call_as(
                &bob,
                Method::GET,
                &format!("/api/v1/events/{}", event["id"].as_str().unwrap()),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        let run_path = format!("/api/v1/actions/runs/{}", run["id"].as_str().unwrap());
        let (status, v) = app.call_as(&bob, Method::GET, &run_path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        let (status, v) = app
            .call_as(
                &bob,
                Method::POST,
                &format!("{run_path}/cancel"),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
        // The instance admin still reads both.
        let (status, _) = app.call(Method::GET, &run_path, None).await;
        assert_eq!(status, StatusCode::OK);
    }
);

both!(
    an_agent_cannot_speak_for_a_run_it_is_not_a_target_of,
    |app| async move {
        let (id_a, k_a) = enrolled(&app, "own", 114).await;
        let (id_b, k_b) = enrolled(&app, "intruder", 115).await;
        let mut a = SimAgent::connect(&app, &id_a, &k_a).await.unwrap();
        let mut b = SimAgent::connect(&app, &id_b, &k_b).await.unwrap();
        let (status, v) = app
            .post(
                "/api/v1/systems/own-host/actions",
                json!({"name": "secret-deploy", "title": "Deploy", "timeout": 600}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let (status, run) = app
            .call(
                Method::POST,
                "/api/v1/systems/own-host/actions/secret-deploy/runs",
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{run}");
        let run_id = run["id"].as_str().unwrap().to_owned();
        next_request(&mut a).await;

        let mut watch = app.ctx.agents.watch_output();
        live(&mut b, update(&run_id, ActionState::Output, "INJECTED")).await;
        // A record through b's queue: acknowledged only after the live
        // update before it on the same session was handled.
        b.send(vec![Record {
            seq: 1,
            body: RecordBody::Action(refusal(&run_id, Some("replayed"), "seen before")),
        }])
        .await;
        live(&mut a, update(&run_id, ActionState::Output, "genuine")).await;
        let first = tokio::time::timeout(std::time::Duration::from_secs(20), watch.recv())
            .await
            .expect("live output within 20 s")
            .unwrap();
        assert_eq!(
            (first.agent.as_str(), first.chunk.as_str()),
            ("own", "genuine")
        );
        let shown = app.get(&format!("/api/v1/actions/runs/{run_id}")).await;
        assert!(!shown.to_string().contains("INJECTED"), "{shown}");

        // The refusal on the intruder's timeline names the run id it sent, nothing more.
        let events = security_events(&app, "intruder-host").await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["data"]["run"], run_id.as_str());
        assert_eq!(events[0]["data"]["known_run"], false, "{}", events[0]);
        assert!(events[0]["data"]["action"].is_null(), "{}", events[0]);
        assert!(events[0]["data"]["run_state"].is_null(), "{}", events[0]);
        assert!(
            !events[0].to_string().contains("secret-deploy"),
            "{}",
            events[0]
        );
    }
);
