//! U+0000 arriving over the WebSockets (issue 13 follow-up): PostgreSQL
//! TEXT cannot store it, SQLite can. Agents' free text keeps its content
//! with the NUL replaced, a NUL in a name refuses that record only; a
//! peer's message with a NUL is refused and counted, the next one applies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aramaki::federation::link::MemoryNet;
use aramaki_protocol::agent::{
    AgentMessage, Record, RecordBody, RecordRefusal, Refusal, ServerMessage,
};
use serde_json::{json, Value};
use sqlx::Row;

use crate::both;
use crate::federation_faults::{now, refusals, Mallory};
use crate::monitoring::{enroll, enroll_as, enrolled, key, result, token, SimAgent};
use crate::support::{free_port, postgres_url, Backend, TestApp};

/// Waits for the acknowledgement of what the agent sent last.
async fn ack(agent: &mut SimAgent) -> (u64, Vec<RecordRefusal>) {
    loop {
        match agent.next().await {
            ServerMessage::Ack { up_to, refused } => return (up_to, refused),
            ServerMessage::Checks { .. } | ServerMessage::Heartbeat => {}
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}

async fn observations(app: &TestApp, system: &str) -> BTreeMap<String, Value> {
    let v = app
        .get(&format!("/api/v1/systems/{system}/observations"))
        .await;
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["check"].as_str().unwrap().to_owned(), o.clone()))
        .collect()
}

async fn metrics(app: &TestApp) -> String {
    app.http
        .get(app.url("/metrics"))
        .bearer_auth(&app.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

both!(
    a_nul_in_agent_output_is_replaced_and_in_a_name_refuses_only_its_record,
    |app| async move {
        let (a_id, a_key) = enrolled(&app, "nul-a", 61).await;
        let (b_id, b_key) = enrolled(&app, "nul-b", 62).await;
        let mut a = SimAgent::connect(&app, &a_id, &a_key).await.unwrap();
        let mut b = SimAgent::connect(&app, &b_id, &b_key).await.unwrap();
        let mut labelled = result(3, "disk", 0, "DISK OK");
        if let RecordBody::Result(r) = &mut labelled.body {
            r.labels.insert("mount".into(), "/va\0r".into());
        }
        let facts = Record {
            seq: 5,
            body: RecordBody::Facts {
                facts: BTreeMap::from([("kernel".to_owned(), "6.1\0".to_owned())]),
            },
        };
        // Both agents' records go to the writer together: A's poisoned
        // ones must not fail B's.
        a.say(&AgentMessage::Records {
            records: vec![
                result(1, "dump", 2, "DUMP CRITICAL - bin\0ary\0"),
                result(2, "ba\0d", 0, "x"),
                labelled,
                result(4, "load", 0, "LOAD OK"),
                facts,
            ],
        })
        .await;
        b.say(&AgentMessage::Records {
            records: vec![result(1, "load", 1, "LOAD WARNING")],
        })
        .await;
        let (a_up_to, refused) = ack(&mut a).await;
        let (b_up_to, b_refused) = ack(&mut b).await;
        assert_eq!(a_up_to, 5, "refused records are acknowledged too");
        assert_eq!(b_up_to, 1);
        assert!(b_refused.is_empty());
        let fields: Vec<(u64, &str)> = refused.iter().map(|r| (r.seq, r.field.as_str())).collect();
        assert_eq!(fields, vec![(2, "check"), (3, "labels.mount")]);
        assert!(
            refused[0]
                .message
                .contains("`check` contains a NUL character"),
            "{}",
            refused[0].message
        );

        let obs = observations(&app, "nul-a-host").await;
        assert_eq!(
            obs["dump"]["output"], "DUMP CRITICAL - bin\u{FFFD}ary\u{FFFD}",
            "free text is kept with the NUL replaced"
        );
        assert_eq!(obs["load"]["output"], "LOAD OK");
        assert!(
            !obs.keys().any(|k| k.starts_with("ba")) && !obs.contains_key("disk"),
            "refused records are not stored: {:?}",
            obs.keys()
        );
        let history: Vec<String> =
            sqlx::query("SELECT output FROM observation_history WHERE check_name = 'dump'")
                .fetch_all(app.ctx.db.reader())
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
        assert_eq!(history, vec!["DUMP CRITICAL - bin\u{FFFD}ary\u{FFFD}"]);
        let facts: String = sqlx::query("SELECT facts FROM agents WHERE id = $1")
            .bind(a_id.as_str())
            .fetch_one(app.ctx.db.reader())
            .await
            .unwrap()
            .get(0);
        assert!(facts.contains("6.1\u{FFFD}"), "{facts}");
        assert_eq!(
            observations(&app, "nul-b-host").await["load"]["output"],
            "LOAD WARNING"
        );

        // The refusal is on the agent's timeline and in the metrics.
        let events = app
            .get("/api/v1/systems/nul-a-host/timeline?kind=agent.records_refused&limit=10")
            .await;
        let events = events["items"].as_array().unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["data"]["seqs"], json!([2, 3]));
        let m = metrics(&app).await;
        assert!(m.contains("aramaki_agent_records_refused_total 2"), "{m}");
        assert!(m.contains("aramaki_agent_nul_replaced_total 3"), "{m}");

        // Nothing is retried: after reconnecting the server holds all five.
        drop(a);
        let again = SimAgent::connect(&app, &a_id, &a_key).await.unwrap();
        assert_eq!(again.acked, 5);
    }
);

both!(
    a_nul_in_an_enrollment_is_refused_naming_the_field,
    |app| async move {
        app.system("nul-host", "host", json!({})).await;
        let t = token(&app, "nul-host", json!({})).await;
        // The version is stored as the agent reports it.
        let (reason, message) = enroll_as(&app, &t, &key(63), "web-one", "1.0\0")
            .await
            .unwrap_err();
        assert_eq!(reason, Refusal::Malformed);
        assert!(
            message.contains("`version` contains a NUL character"),
            "{message}"
        );
        // The token was not spent: the agent may enroll as it should.
        enroll(&app, &t, &key(63), "web-one").await.unwrap();
    }
);

async fn reachable(backend: Backend, net: &Arc<MemoryNet>) -> TestApp {
    let port = free_port();
    let app = TestApp::start_tweaked(backend, move |c| {
        c.instance.name = "customer".into();
        c.instance.url = Some(format!("http://127.0.0.1:{port}"));
    })
    .await;
    app.ctx.federation.set_transport(net.clone());
    net.attach(&app.base, app.ctx.clone());
    app
}

async fn a_peer_message_with_nul_is_refused_and_the_next_applies(backend: Backend) {
    let net = Arc::new(MemoryNet::default());
    let app = reachable(backend, &net).await;
    let mut remote = Mallory::link(&net, &app, 71).await;
    let before = refusals(&app, "nul");
    let (poisoned, next) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    // Sent back to back, so that the link commits them as one batch.
    let first = remote.frame(
        &app,
        1,
        "use.request",
        json!({"use": poisoned, "system": "web\u{0}", "level": "status"}),
    );
    let second = remote.frame(
        &app,
        2,
        "use.request",
        json!({"use": next, "system": "nowhere", "level": "status"}),
    );
    remote.conn.tx.send(first).await.unwrap();
    remote.conn.tx.send(second).await.unwrap();
    loop {
        let ack = remote.next(&app, "link.ack").await;
        if ack.body["upto"].as_i64().unwrap_or(0) >= 2 {
            break;
        }
    }
    assert_eq!(refusals(&app, "nul"), before + 1, "refused and counted");
    let uses: Vec<(String, String)> =
        sqlx::query("SELECT id, state FROM uses WHERE peer_id = $1 ORDER BY id")
            .bind(remote.id.as_str())
            .fetch_all(app.ctx.db.reader())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    assert_eq!(
        uses,
        vec![(next.clone(), "rejected".to_owned())],
        "only the clean message is applied"
    );
    let rejected = remote.next(&app, "use.rejected").await;
    assert_eq!(
        rejected.body["data"]["use"], next,
        "the answer to the clean request"
    );
    let m = metrics(&app).await;
    assert!(
        m.contains("aramaki_federation_refused_total{reason=\"nul\"} 1"),
        "{m}"
    );
}

mod a_peer_message_with_nul_is_refused_without_failing_the_batch {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        a_peer_message_with_nul_is_refused_and_the_next_applies(Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        if postgres_url().is_some() {
            a_peer_message_with_nul_is_refused_and_the_next_applies(Backend::Postgres).await
        }
    }
}

both!(
    a_nul_in_action_output_is_replaced_live_and_in_the_outcome,
    |app| async move {
        use aramaki_protocol::agent::{ActionState, ActionUpdate};
        let (id, k) = enrolled(&app, "nul-act", 64).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        app.post(
            "/api/v1/systems/nul-act-host/actions",
            json!({"name": "quick", "title": "Quick", "timeout": 300, "confirm_within_minutes": null}),
        )
        .await;
        let (_, run) = app
            .call(
                reqwest::Method::POST,
                "/api/v1/systems/nul-act-host/actions/quick/runs",
                Some(json!({})),
            )
            .await;
        let run_id = run["id"].as_str().unwrap().to_owned();
        loop {
            if let ServerMessage::Action(_) = agent.next().await {
                break;
            }
        }
        let update = |state, output: &str| ActionUpdate {
            run_id: run_id.clone(),
            state,
            exit_code: None,
            output: output.into(),
            refusal: None,
            timeout_secs: None,
        };
        agent
            .say(&AgentMessage::ActionUpdate(update(
                ActionState::Started,
                "",
            )))
            .await;
        agent
            .say(&AgentMessage::ActionUpdate(update(
                ActionState::Output,
                "chunk\0one\n",
            )))
            .await;
        // Live updates are handled in order, before the records behind them.
        agent
            .say(&AgentMessage::Records {
                records: vec![Record {
                    seq: 1,
                    body: RecordBody::Action(ActionUpdate {
                        exit_code: Some(0),
                        ..update(ActionState::Succeeded, "done\0")
                    }),
                }],
            })
            .await;
        let (up_to, refused) = ack(&mut agent).await;
        assert_eq!((up_to, refused.len()), (1, 0));
        let shown = app.get(&format!("/api/v1/actions/runs/{run_id}")).await;
        let target = &shown["targets"][0];
        assert_eq!(target["state"], "succeeded", "{shown}");
        let text = target.to_string();
        assert!(
            text.contains("chunk\u{FFFD}one") && text.contains("done\u{FFFD}"),
            "{shown}"
        );
    }
);

both!(
    a_dropped_count_past_the_column_saturates_instead_of_failing_the_batch,
    |app| async move {
        let (id, k) = enrolled(&app, "nul-drop", 65).await;
        let mut agent = SimAgent::connect(&app, &id, &k).await.unwrap();
        let dropped = |seq| Record {
            seq,
            body: RecordBody::Dropped {
                count: u64::MAX,
                first_seq: 1,
                last_seq: 2,
            },
        };
        agent
            .say(&AgentMessage::Records {
                records: vec![dropped(1), dropped(2), result(3, "load", 0, "LOAD OK")],
            })
            .await;
        assert_eq!(ack(&mut agent).await.0, 3);
        let count: i64 = sqlx::query("SELECT dropped FROM agents WHERE id = $1")
            .bind(id.as_str())
            .fetch_one(app.ctx.db.reader())
            .await
            .unwrap()
            .get(0);
        assert_eq!(count, i64::MAX);
        assert_eq!(
            observations(&app, "nul-drop-host").await["load"]["output"],
            "LOAD OK"
        );
    }
);

/// Waits until `n` items wait for the results writer.
async fn writer_queue(app: &TestApp, n: usize) {
    crate::agent_e2e::eventually(
        &format!("{n} items waiting for the results writer"),
        || async { (app.ctx.ingest.queued() == n).then_some(()) },
    )
    .await;
}

both!(
    a_record_the_database_refuses_fails_only_its_own_agent,
    |app| async move {
        // Stands for any record the database cannot take.
        let poison = match app.backend {
            Backend::Sqlite => {
                "CREATE TRIGGER poison BEFORE INSERT ON observation_history \
                 WHEN NEW.check_name = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            }
            Backend::Postgres => {
                "ALTER TABLE observation_history ADD CONSTRAINT poison \
                 CHECK (check_name <> 'poison')"
            }
        };
        sqlx::query(poison)
            .execute(app.ctx.db.reader())
            .await
            .unwrap();
        let (a_id, a_key) = enrolled(&app, "bad-a", 66).await;
        let (b_id, b_key) = enrolled(&app, "good-b", 67).await;
        let (c_id, c_key) = enrolled(&app, "first-c", 68).await;
        let mut a = SimAgent::connect(&app, &a_id, &a_key).await.unwrap();
        let mut b = SimAgent::connect(&app, &b_id, &b_key).await.unwrap();
        let _c = SimAgent::connect(&app, &c_id, &c_key).await.unwrap();
        writer_queue(&app, 0).await;
        // The writer is held up on C's heartbeat while A's and B's records
        // queue behind it: they are then committed as one batch.
        let hold = app.ctx.db.begin_recording().await.unwrap();
        let c_system = app.get("/api/v1/systems/first-c-host").await;
        app.ctx.ingest.seen(
            aramaki::monitoring::ingest::AgentRef {
                id: c_id.clone(),
                name: "first-c".into(),
                system_id: c_system["id"].as_str().unwrap().to_owned(),
                system: "first-c-host".into(),
            },
            0,
            0,
            now(&app),
        );
        writer_queue(&app, 0).await;
        a.say(&AgentMessage::Records {
            records: vec![result(1, "poison", 0, "x")],
        })
        .await;
        b.say(&AgentMessage::Records {
            records: vec![result(1, "load", 0, "B OK")],
        })
        .await;
        writer_queue(&app, 2).await;
        hold.rollback().await.unwrap();
        assert_eq!(ack(&mut b).await.0, 1, "B's result is not failed by A's");
        assert_eq!(
            observations(&app, "good-b-host").await["load"]["output"],
            "B OK"
        );
        // A's record is not acknowledged: its session ends and it resends.
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            use futures_util::StreamExt;
            loop {
                match a.ws.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "A's session ends without an ack");
    }
);
