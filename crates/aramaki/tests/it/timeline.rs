//! The timeline through the API: rollup, pagination, filters, idempotent
//! recording, the live tail and the subscriber mechanism.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aramaki::context::Context;
use aramaki::timeline::subscribers::{self, BoxFuture, HandleError, Subscriber};
use aramaki::timeline::Event;
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both;
use crate::support::TestApp;

/// dc1 → {storage, compute} → host-a (a diamond), plus an unrelated system.
async fn diamond(app: &TestApp) {
    // It is noon: the events below happened this morning.
    app.clock.set("2026-11-23T12:00:00Z".parse().unwrap());
    for s in ["dc1", "storage", "compute", "host-a", "elsewhere"] {
        app.system(s, "infrastructure", json!({})).await;
    }
    app.include("dc1", "storage").await;
    app.include("dc1", "compute").await;
    app.include("storage", "host-a").await;
    app.include("compute", "host-a").await;
}

both!(
    rollup_contains_each_subsystem_event_once_newest_first,
    |app| async move {
        diamond(&app).await;
        app.event(
            "host-a",
            "note",
            "on the host",
            json!({"occurred_at": "2026-11-23T09:00:00Z"}),
        )
        .await;
        app.event(
            "storage",
            "deploy",
            "on storage",
            json!({"occurred_at": "2026-11-23T09:01:00Z"}),
        )
        .await;
        app.event(
            "dc1",
            "note",
            "on dc1",
            json!({"occurred_at": "2026-11-23T09:02:00Z"}),
        )
        .await;
        app.event(
            "elsewhere",
            "note",
            "not ours",
            json!({"occurred_at": "2026-11-23T09:03:00Z"}),
        )
        .await;
        let titles = app
            .titles("/api/v1/systems/dc1/timeline?kind=note,deploy")
            .await;
        assert_eq!(
            titles,
            ["on dc1", "on storage", "on the host"],
            "host-a appears once although reached twice"
        );
        let titles = app
            .titles("/api/v1/systems/compute/timeline?kind=note,deploy")
            .await;
        assert_eq!(titles, ["on the host"]);
        let e = app
            .get("/api/v1/systems/dc1/timeline?kind=note&limit=1")
            .await;
        assert_eq!(e["items"][0]["system"], "dc1");
        assert_eq!(
            e["items"][0]["origin"],
            app.ctx.identity.instance_id.as_str()
        );
        assert_eq!(e["items"][0]["occurred_at"], "2026-11-23T09:02:00Z");
    }
);

both!(
    pages_follow_the_cursor_without_gaps_or_repeats,
    |app| async move {
        diamond(&app).await;
        let systems = ["dc1", "storage", "compute", "host-a"];
        for i in 0..23 {
            // Several events share a time: the id breaks the tie.
            let at = format!("2026-11-23T10:{:02}:00Z", i / 3);
            app.event(
                systems[i % 4],
                "note",
                &format!("n{i:02}"),
                json!({"occurred_at": at}),
            )
            .await;
        }
        let mut seen = Vec::new();
        let mut path = "/api/v1/systems/dc1/timeline?kind=note&limit=5".to_owned();
        loop {
            let page = app.get(&path).await;
            seen.extend(
                page["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["title"].as_str().unwrap().to_owned()),
            );
            match page["next"].as_str() {
                Some(next) => {
                    path = format!("/api/v1/systems/dc1/timeline?kind=note&limit=5&cursor={next}")
                }
                None => break,
            }
        }
        assert_eq!(seen.len(), 23);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 23, "no event twice");
        // Newest first by occurrence.
        let minutes: Vec<usize> = seen
            .iter()
            .map(|t| t[1..].parse::<usize>().unwrap() / 3)
            .collect();
        assert!(minutes.windows(2).all(|w| w[0] >= w[1]), "{seen:?}");
    }
);

both!(filters_narrow_the_timeline, |app| async move {
    diamond(&app).await;
    let ops = app.user("olga", aramaki::users::Role::Operator).await;
    app.event(
        "storage",
        "deploy",
        "Deployed storage v2",
        json!({"occurred_at": "2026-11-23T07:00:00Z", "severity": "ok"}),
    )
    .await;
    app.event(
        "host-a",
        "note",
        "Disk replaced",
        json!({"occurred_at": "2026-11-23T07:30:00Z", "body": "The *sdb* drive was swapped"}),
    )
    .await;
    app.event(
        "host-a",
        "state",
        "Disk failing",
        json!({"occurred_at": "2026-11-23T07:10:00Z", "severity": "critical"}),
    )
    .await;
    let (status, _) = app
        .call_as(&ops, Method::POST, "/api/v1/events", Some(json!({"system": "compute", "kind": "ci.pipeline", "title": "Pipeline 42 green", "occurred_at": "2026-11-23T07:20:00Z"})))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let base = "/api/v1/systems/dc1/timeline";
    assert_eq!(
        app.titles(&format!("{base}?severity=critical")).await,
        ["Disk failing"]
    );
    assert_eq!(
        app.titles(&format!("{base}?severity=ok&kind=deploy,state"))
            .await,
        ["Disk failing", "Deployed storage v2"]
    );
    assert_eq!(
        app.titles(&format!("{base}?kind=ci.*")).await,
        ["Pipeline 42 green"]
    );
    assert_eq!(
        app.titles(&format!("{base}?q=SDB")).await,
        ["Disk replaced"],
        "text search covers the body, ignoring case"
    );
    assert_eq!(
        app.titles(&format!("{base}?actor=olga")).await,
        ["Pipeline 42 green"]
    );
    assert_eq!(
        app.titles(&format!(
            "{base}?since=2026-11-23T07:05:00Z&until=2026-11-23T07:25:00Z"
        ))
        .await,
        ["Pipeline 42 green", "Disk failing"]
    );
    let (status, p) = app
        .call(Method::GET, &format!("{base}?severity=fatal"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("unknown severity 'fatal'"));
    let (status, _) = app
        .call(Method::GET, &format!("{base}?since=yesterday"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = app
        .call(Method::GET, &format!("{base}?cursor=nonsense"), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
});

both!(an_idempotency_key_records_one_event, |app| async move {
    app.system("shop", "project", json!({})).await;
    let body = json!({"system": "shop", "kind": "deploy", "title": "Deployed 1.4.2", "data": {"version": "1.4.2"}});
    let send = |body: serde_json::Value| {
        app.http
            .post(app.url("/api/v1/events"))
            .bearer_auth(&app.token)
            .header("Idempotency-Key", "ci-run-981")
            .json(&body)
            .send()
    };
    let first = send(body.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("location").is_some());
    let first: serde_json::Value = first.json().await.unwrap();
    let second = send(body.clone()).await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(second.headers().get("idempotent-replayed").unwrap(), "true");
    let second: serde_json::Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(
        app.titles("/api/v1/systems/shop/timeline?kind=deploy")
            .await
            .len(),
        1
    );

    let mut other = body.clone();
    other["title"] = json!("Deployed 1.4.3");
    let third = send(other).await.unwrap();
    assert_eq!(third.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        app.titles("/api/v1/systems/shop/timeline?kind=deploy")
            .await
            .len(),
        1
    );

    let got = app
        .get(&format!("/api/v1/events/{}", first["id"].as_str().unwrap()))
        .await;
    assert_eq!(got["data"]["version"], "1.4.2");
});

both!(
    reserved_kinds_and_bad_events_are_refused,
    |app| async move {
        app.system("shop", "project", json!({})).await;
        let before = app.counts().await;
        for (body, field) in [
            (
                json!({"system": "shop", "kind": "system.updated", "title": "forged"}),
                "kind",
            ),
            (
                json!({"system": "nope", "kind": "note", "title": "x"}),
                "system",
            ),
            (
                json!({"system": "shop", "kind": "state", "title": "x", "severity": "info"}),
                "severity",
            ),
            (
                json!({"system": "shop", "kind": "note", "title": "  "}),
                "title",
            ),
            (
                json!({"system": "shop", "kind": "note", "title": "x", "data": [1, 2]}),
                "data",
            ),
            (
                json!({"system": "shop", "kind": "note", "title": "x", "occurred_at": "2027-01-01T00:00:00Z"}),
                "occurred_at",
            ),
            (
                json!({"system": "shop", "kind": "note", "title": "x", "caused_by": "01900000-0000-7000-8000-000000000000"}),
                "caused_by",
            ),
        ] {
            let (status, p) = app.post("/api/v1/events", body.clone()).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body} → {p}");
            assert_eq!(p["field"], field, "{p}");
        }
        assert_eq!(app.counts().await, before);
        let cause = app.event("shop", "deploy", "Deployed", json!({})).await;
        let effect = app
            .event(
                "shop",
                "note",
                "Rolled back",
                json!({"caused_by": cause["id"]}),
            )
            .await;
        assert_eq!(effect["caused_by"], cause["id"]);
    }
);

/// Reads server-sent events until `n` `data:` payloads arrived.
async fn read_sse(resp: reqwest::Response, n: usize) -> Vec<serde_json::Value> {
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("an event within 20 s")
            .expect("stream open")
            .expect("chunk");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    out.push(serde_json::from_str(d.trim()).unwrap());
                }
            }
        }
    }
    out
}

both!(
    the_live_tail_streams_subsystem_events_and_resumes,
    |app| async move {
        diamond(&app).await;
        let open = |last: Option<String>| {
            let mut req = app
                .http
                .get(app.url("/api/v1/systems/dc1/timeline/stream"))
                .bearer_auth(&app.token);
            if let Some(id) = last {
                req = req.header("Last-Event-ID", id);
            }
            req.send()
        };
        let resp = open(None).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        app.event("elsewhere", "note", "not for dc1", json!({}))
            .await;
        let first = app.event("host-a", "note", "first", json!({})).await;
        app.event("dc1", "note", "second", json!({})).await;
        let got = read_sse(resp, 2).await;
        assert_eq!(got[0]["title"], "first");
        assert_eq!(got[1]["title"], "second");

        // Reconnect after "first": "second" is replayed, then live ones follow.
        let resp = open(Some(first["sequence"].to_string())).await.unwrap();
        app.event("storage", "note", "third", json!({})).await;
        let got = read_sse(resp, 2).await;
        assert_eq!(got[0]["title"], "second");
        assert_eq!(got[1]["title"], "third");

        // A filtered stream passes only what matches.
        let resp = app
            .http
            .get(app.url("/api/v1/systems/dc1/timeline/stream?kind=deploy&severity=warning"))
            .bearer_auth(&app.token)
            .send()
            .await
            .unwrap();
        app.event("host-a", "note", "a note", json!({"severity": "critical"}))
            .await;
        app.event("host-a", "deploy", "quiet deploy", json!({}))
            .await;
        app.event(
            "host-a",
            "deploy",
            "loud deploy",
            json!({"severity": "warning"}),
        )
        .await;
        assert_eq!(read_sse(resp, 1).await[0]["title"], "loud deploy");

        let (status, _) = app
            .call(Method::GET, "/api/v1/systems/nope/timeline/stream", None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
);

/// A durable test subscriber that remembers what it saw.
struct Recorder(Mutex<Vec<String>>);

impl Subscriber for Recorder {
    fn name(&self) -> &str {
        "test-recorder"
    }
    fn durable(&self) -> bool {
        true
    }
    fn handle<'a>(
        &'a self,
        _ctx: &'a Context,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            self.0
                .lock()
                .unwrap()
                .extend(events.iter().map(|e| e.title.clone()));
            Ok(())
        })
    }
}

both!(
    a_durable_subscriber_resumes_at_its_cursor,
    |app| async move {
        // Start after what the first start recorded (the instance's own audit trail).
        let mut cursor = aramaki::timeline::store::max_seq(app.ctx.db.reader())
            .await
            .unwrap();
        app.system("shop", "project", json!({})).await;
        app.event("shop", "note", "one", json!({})).await;
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        while let Some(next) = subscribers::step(&app.ctx, rec.as_ref(), cursor)
            .await
            .unwrap()
        {
            cursor = next;
        }
        assert_eq!(*rec.0.lock().unwrap(), ["Created project 'SHOP'", "one"]);
        app.event("shop", "note", "two", json!({})).await;
        // A "restarted" subscriber starts from the stored cursor, not from zero.
        let stored = aramaki::timeline::store::load_cursor(app.ctx.db.reader(), "test-recorder")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored, cursor);
        let again = Arc::new(Recorder(Mutex::new(Vec::new())));
        assert!(subscribers::step(&app.ctx, again.as_ref(), stored)
            .await
            .unwrap()
            .is_some());
        assert_eq!(*again.0.lock().unwrap(), ["two"]);
    }
);

both!(
    concurrent_requests_with_one_key_record_one_event,
    |app| async move {
        app.system("shop", "project", json!({})).await;
        let body = json!({"system": "shop", "kind": "deploy", "title": "Deployed 2.0"});
        let sends = (0..12).map(|_| {
            app.http
                .post(app.url("/api/v1/events"))
                .bearer_auth(&app.token)
                .header("Idempotency-Key", "run-7")
                .json(&body)
                .send()
        });
        let statuses: Vec<StatusCode> = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .map(|r| r.unwrap().status())
            .collect();
        assert_eq!(
            statuses
                .iter()
                .filter(|s| **s == StatusCode::CREATED)
                .count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == StatusCode::OK).count(),
            11,
            "{statuses:?}"
        );
        assert_eq!(
            app.titles("/api/v1/systems/shop/timeline?kind=deploy")
                .await,
            ["Deployed 2.0"]
        );
    }
);

both!(
    concurrent_events_are_all_recorded_in_commit_order,
    |app| async move {
        app.system("shop", "project", json!({})).await;
        let sends = (0..60).map(|i| {
            app.post(
                "/api/v1/events",
                json!({"system": "shop", "kind": "note", "title": format!("n{i}")}),
            )
        });
        let results = futures_util::future::join_all(sends).await;
        let mut seqs: Vec<i64> = results
            .iter()
            .map(|(s, v)| {
                assert_eq!(*s, StatusCode::CREATED, "{v}");
                v["sequence"].as_i64().unwrap()
            })
            .collect();
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs.len(), 60, "each event has its own sequence number");
        let page = app
            .get("/api/v1/systems/shop/timeline?kind=note&limit=100")
            .await;
        assert_eq!(page["items"].as_array().unwrap().len(), 60);
    }
);

both!(a_batch_is_recorded_all_or_none, |app| async move {
    app.system("shop", "project", json!({})).await;
    app.system("db", "service", json!({})).await;
    let before = app.counts().await;
    let (status, p) = app
        .post(
            "/api/v1/events/batch",
            json!({"events": [
                {"system": "shop", "kind": "deploy", "title": "ok one"},
                {"system": "nowhere", "kind": "deploy", "title": "bad one"}
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["field"], "events[1].system");
    let (status, p) = app
        .post(
            "/api/v1/events/batch",
            json!({"events": [{"system": "shop", "kind": "deploy", "title": " "}]}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(p["field"], "events[0].title");
    let (status, _) = app
        .post("/api/v1/events/batch", json!({"events": []}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        app.counts().await,
        before,
        "nothing of a refused batch is written"
    );

    let batch = json!({"events": [
        {"system": "shop", "kind": "deploy", "title": "shop 3.1", "idempotency_key": "b-1"},
        {"system": "db", "kind": "state", "title": "replica lag", "severity": "warning", "idempotency_key": "b-2"},
        {"system": "db", "kind": "note", "title": "looking into it"}
    ]});
    let (status, v) = app.post("/api/v1/events/batch", batch.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| i["replayed"] == false));
    assert_eq!(
        app.get("/api/v1/systems/db/status").await["state"],
        "warning"
    );
    // Sent again: the keyed events are replayed, the unkeyed one is new.
    let (status, v) = app.post("/api/v1/events/batch", batch).await;
    assert_eq!(status, StatusCode::CREATED);
    let replayed: Vec<bool> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["replayed"].as_bool().unwrap())
        .collect();
    assert_eq!(replayed, [true, true, false]);
    assert_eq!(
        app.titles("/api/v1/systems/shop/timeline?kind=deploy")
            .await,
        ["shop 3.1"]
    );
});

/// Reads a server-sent event stream one `data:` payload at a time.
struct SseReader {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: String,
}

impl SseReader {
    fn new(resp: reqwest::Response) -> SseReader {
        assert_eq!(resp.status(), StatusCode::OK);
        SseReader {
            stream: resp.bytes_stream().map(|r| r.map(|b| b.to_vec())).boxed(),
            buf: String::new(),
        }
    }

    /// The next payload, or `None` once the server ended the stream; waits
    /// at most 20 s for either.
    async fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(d) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                    return Some(serde_json::from_str(d.trim()).unwrap());
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.stream.next())
                .await
                .expect("an event or the end of the stream within 20 s");
            match chunk {
                Some(Ok(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                Some(Err(_)) | None => return None,
            }
        }
    }
}

both!(
    a_live_stream_ends_when_its_watcher_loses_the_right_to_watch,
    |app| async move {
        use aramaki::users::{self, Role};
        diamond(&app).await;
        let open = |token: String| {
            let app = &app;
            async move {
                SseReader::new(
                    app.http
                        .get(app.url("/api/v1/systems/dc1/timeline/stream"))
                        .bearer_auth(token)
                        .send()
                        .await
                        .unwrap(),
                )
            }
        };

        // A grant revoked: the open stream ends before the next event.
        let granted = app
            .user_with_grants("granted", &[("dc1", Role::Viewer)])
            .await;
        let mut stream = open(granted).await;
        app.event("host-a", "note", "while granted", json!({}))
            .await;
        assert_eq!(stream.next().await.unwrap()["title"], "while granted");
        users::revoke(&app.ctx, &crate::support::tester(), "granted", "dc1")
            .await
            .unwrap();
        app.event("host-a", "note", "after the revocation", json!({}))
            .await;
        // Not even the revocation itself (an event on dc1) reaches them.
        let rest = stream.next().await;
        assert!(rest.is_none(), "a revoked viewer still streams: {rest:?}");

        // A token revoked through the API.
        let user = users::create_user(
            &app.ctx,
            &crate::support::tester(),
            "tokened",
            "Tokened",
            Some(Role::Viewer),
            "a long test password",
            false,
        )
        .await
        .unwrap();
        let (token_id, token) = users::create_token_expiring(
            &app.ctx,
            &crate::support::tester(),
            &user.id,
            "stream",
            None,
        )
        .await
        .unwrap();
        let mut stream = open(token.expose().to_owned()).await;
        app.event("dc1", "note", "with a token", json!({})).await;
        assert_eq!(stream.next().await.unwrap()["title"], "with a token");
        let (status, _) = app
            .call(Method::DELETE, &format!("/api/v1/tokens/{token_id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        app.event("dc1", "note", "after the token", json!({})).await;
        assert!(
            stream.next().await.is_none(),
            "a revoked token still streams"
        );

        // A token that expires says nothing on the timeline: the stream asks
        // again by the clock.
        let expires = aramaki::db::to_micros(app.ctx.now()) + 60_000_000;
        let (_, token) = users::create_token_expiring(
            &app.ctx,
            &crate::support::tester(),
            &user.id,
            "short",
            Some(expires),
        )
        .await
        .unwrap();
        let mut stream = open(token.expose().to_owned()).await;
        app.event("dc1", "note", "before expiry", json!({})).await;
        assert_eq!(stream.next().await.unwrap()["title"], "before expiry");
        app.clock.advance(jiff::SignedDuration::from_secs(120));
        app.event("dc1", "note", "after expiry", json!({})).await;
        assert!(
            stream.next().await.is_none(),
            "an expired token still streams"
        );
    }
);
