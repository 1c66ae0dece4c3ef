//! The agents page and the observations and checks on the system page, as
//! server-rendered HTML over HTTP with a cookie session and CSRF tokens.

use std::collections::BTreeMap;

use aramaki::monitoring::ingest::Synthetic;
use aramaki::users::{self, Role};
use aramaki_protocol::agent::CheckResult;
use aramaki_protocol::keys::hex;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::json;

use crate::both;
use crate::pages::{browser, csrf_of};
use crate::support::{start_time, tester, TestApp};

/// Creates a user with an instance-wide `role` (or none) and logs them in;
/// returns the session cookie.
pub(crate) async fn logged_in(app: &TestApp, name: &str, role: Option<Role>) -> String {
    users::create_user(
        &app.ctx,
        &tester(),
        name,
        name,
        role,
        "correct horse battery",
        false,
    )
    .await
    .unwrap();
    let resp = browser()
        .post(app.url("/login"))
        .form(&[
            ("username", name),
            ("password", "correct horse battery"),
            ("next", "/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "login {name}");
    let set = resp.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    set.split(';').next().unwrap().to_owned()
}

pub(crate) async fn get(app: &TestApp, path: &str, cookie: &str) -> (StatusCode, String) {
    let resp = browser()
        .get(app.url(path))
        .header(COOKIE, cookie)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.text().await.unwrap())
}

pub(crate) async fn post(
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

/// Records a result for `check` on a system, `secs` after the start time.
async fn result(
    app: &TestApp,
    system: &serde_json::Value,
    check: &str,
    status: i32,
    output: &str,
    secs: i64,
) {
    app.ctx
        .ingest
        .synthetic(Synthetic {
            system_id: system["id"].as_str().unwrap().to_owned(),
            system: system["slug"].as_str().unwrap().to_owned(),
            agent: None,
            result: CheckResult {
                check: check.to_owned(),
                system: None,
                labels: BTreeMap::new(),
                status,
                output: output.to_owned(),
                metrics: Vec::new(),
                executed_at: start_time().as_microsecond() + secs * 1_000_000,
                duration_ms: 5,
                source: "push".into(),
            },
        })
        .await
        .unwrap();
}

both!(admins_list_and_revoke_agents, |app| async move {
    app.system("shop", "project", json!({})).await;
    let issued = aramaki::agents::issue_token(
        &app.ctx,
        &tester(),
        "shop",
        jiff::SignedDuration::from_hours(1),
        false,
    )
    .await
    .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let enrolled = aramaki::agents::enroll(
        &app.ctx,
        &issued.token,
        &hex(key.verifying_key().as_bytes()),
        "web-1",
        "1.2.3",
    )
    .await
    .unwrap();
    let admin = logged_in(&app, "root", Some(Role::Admin)).await;
    let viewer = logged_in(&app, "vera", Some(Role::Viewer)).await;

    let (status, html) = get(&app, "/agents", &admin).await;
    assert_eq!(status, StatusCode::OK, "{html}");
    assert!(html.contains("web-1") && html.contains("1.2.3"), "{html}");
    assert!(html.contains("href=\"/systems/shop\""), "{html}");
    assert!(html.contains("disconnected"), "{html}");
    assert!(
        html.contains(&format!("aek_{}_", issued.info.id)),
        "tokens are listed: {html}"
    );
    assert!(html.contains("single-use"), "{html}");
    let revoke_path = format!("/agents/{}/revoke", enrolled.agent_id);
    assert!(html.contains(&revoke_path), "{html}");
    assert!(html.contains("hx-confirm"), "{html}");
    let csrf = csrf_of(&html);

    // Only instance admins: viewers are refused, strangers sent to log in.
    assert_eq!(get(&app, "/agents", &viewer).await.0, StatusCode::FORBIDDEN);
    let anon = browser().get(app.url("/agents")).send().await.unwrap();
    assert_eq!(anon.status(), StatusCode::SEE_OTHER);
    assert_eq!(anon.headers()[LOCATION], "/login?next=%2Fagents");
    let viewer_csrf = csrf_of(&get(&app, "/", &viewer).await.1);
    let refused = post(&app, &revoke_path, &viewer, &[("csrf", &viewer_csrf)]).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let forged = post(&app, &revoke_path, &admin, &[("csrf", "guess")]).await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert!(
        get(&app, "/agents", &admin).await.1.contains(&revoke_path),
        "still active"
    );

    let done = post(&app, &revoke_path, &admin, &[("csrf", &csrf)]).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(done.headers()[LOCATION], "/agents");
    let (_, html) = get(&app, "/agents", &admin).await;
    assert!(html.contains(">revoked<"), "{html}");
    assert!(
        !html.contains(&revoke_path),
        "no revoke button once revoked: {html}"
    );
    let missing = post(&app, "/agents/nobody/revoke", &admin, &[("csrf", &csrf)]).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
});

both!(
    the_system_page_shows_observations_and_history,
    |app| async move {
        let shop = app.system("shop", "project", json!({})).await;
        app.system("dc1", "infrastructure", json!({})).await;
        result(&app, &shop, "disk", 0, "DISK OK", 0).await;
        result(
            &app,
            &shop,
            "disk",
            1,
            "DISK WARNING - 91% used\nperf details",
            60,
        )
        .await;
        let viewer = logged_in(&app, "vera", Some(Role::Viewer)).await;

        let (status, html) = get(&app, "/systems/shop", &viewer).await;
        assert_eq!(status, StatusCode::OK);
        assert!(html.contains("id=\"observations-h\""), "{html}");
        assert!(
            html.contains("<span class=\"badge warning\">warning</span>"),
            "{html}"
        );
        assert!(html.contains("DISK WARNING - 91% used"), "{html}");
        let section =
            &html[html.find("id=\"observations\"").unwrap()..html.find("id=\"checks\"").unwrap()];
        assert!(
            !section.contains("perf details"),
            "only the first line: {section}"
        );
        let history = "/systems/shop/observations/disk/history?labels=";
        assert!(html.contains(&format!("hx-get=\"{history}\"")), "{html}");
        assert!(
            !html.contains("id=\"check-form\""),
            "viewers get no form: {html}"
        );

        let (status, fragment) = get(&app, history, &viewer).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!fragment.contains("<html"), "a fragment: {fragment}");
        let warning = fragment.find("DISK WARNING").expect("the warning");
        let ok = fragment.find("DISK OK").expect("the earlier result");
        assert!(warning < ok, "newest first: {fragment}");
        assert!(fragment.contains("badge ok") && fragment.contains("badge warning"));

        // Someone who may only see dc1 finds neither the page nor its history.
        users::create_user(
            &app.ctx,
            &tester(),
            "sam",
            "Sam",
            None,
            "correct horse battery",
            false,
        )
        .await
        .unwrap();
        users::grant(&app.ctx, &tester(), "sam", "dc1", Role::Viewer)
            .await
            .unwrap();
        let resp = browser()
            .post(app.url("/login"))
            .form(&[("username", "sam"), ("password", "correct horse battery")])
            .send()
            .await
            .unwrap();
        let sam = resp.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(get(&app, history, &sam).await.0, StatusCode::NOT_FOUND);
        assert_eq!(
            get(&app, "/systems/nowhere/observations/disk/history", &viewer)
                .await
                .0,
            StatusCode::NOT_FOUND
        );
    }
);

both!(
    admins_add_and_delete_checks_through_the_form,
    |app| async move {
        app.system("shop", "project", json!({})).await;
        let admin = logged_in(&app, "root", Some(Role::Admin)).await;
        let viewer = logged_in(&app, "vera", Some(Role::Viewer)).await;
        let (_, page) = get(&app, "/systems/shop", &admin).await;
        assert!(page.contains("id=\"check-form\""), "{page}");
        let csrf = csrf_of(&page);
        let command = "/usr/lib/nagios/plugins/check_disk -w 10%  -c 5%";
        let form = |interval: &'static str| {
            vec![
                ("csrf", csrf.clone()),
                ("name", "disk-root".to_owned()),
                ("command", command.to_owned()),
                ("interval", interval.to_owned()),
                ("timeout", "".to_owned()),
                ("ttl", "".to_owned()),
                ("occurrences", "3".to_owned()),
            ]
        };
        let count = || async {
            app.get("/api/v1/checks").await["items"]
                .as_array()
                .unwrap()
                .len()
        };

        // A bad interval comes back next to its field, and nothing is written.
        for bad in ["0", "soon"] {
            let resp = browser()
                .post(app.url("/systems/shop/checks"))
                .header(COOKIE, &admin)
                .form(&form(bad))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
            let html = resp.text().await.unwrap();
            let field = html
                .find("id=\"check-interval\"")
                .expect("the interval field");
            let error = html.find("id=\"check-error-interval\"").expect("its error");
            assert!(error > field, "the error follows its field: {html}");
            assert!(
                html.contains(&format!("value=\"{bad}\"")),
                "the input is kept: {html}"
            );
            assert!(html.contains("value=\"disk-root\""), "{html}");
        }
        assert_eq!(count().await, 0);

        // A viewer is refused, with a valid token too.
        let viewer_csrf = csrf_of(&get(&app, "/systems/shop", &viewer).await.1);
        let mut as_viewer = form("60");
        as_viewer[0].1 = viewer_csrf.clone();
        let refused = browser()
            .post(app.url("/systems/shop/checks"))
            .header(COOKIE, &viewer)
            .form(&as_viewer)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(count().await, 0);

        let added = browser()
            .post(app.url("/systems/shop/checks"))
            .header(COOKIE, &admin)
            .form(&form("60"))
            .send()
            .await
            .unwrap();
        assert_eq!(added.status(), StatusCode::SEE_OTHER);
        assert_eq!(added.headers()[LOCATION], "/systems/shop#checks");
        let check = app.get("/api/v1/checks/disk-root").await;
        assert_eq!(
            check["command"],
            json!([
                "/usr/lib/nagios/plugins/check_disk",
                "-w",
                "10%",
                "-c",
                "5%"
            ])
        );
        assert_eq!(check["subscriptions"], json!(["system:shop"]));
        assert_eq!(
            (
                check["interval"].as_u64(),
                check["timeout"].as_u64(),
                check["occurrences"].as_u64()
            ),
            (Some(60), Some(60), Some(3))
        );

        let (_, page) = get(&app, "/systems/shop", &admin).await;
        assert!(
            page.contains("<td>disk-root</td>") && page.contains("every 60 s"),
            "{page}"
        );
        let delete = "/systems/shop/checks/disk-root/delete";
        assert!(page.contains(delete), "{page}");
        let (_, page) = get(&app, "/systems/shop", &viewer).await;
        assert!(
            page.contains("<td>disk-root</td>"),
            "viewers see the checks: {page}"
        );
        assert!(!page.contains(delete), "but cannot delete them: {page}");
        let refused = post(&app, delete, &viewer, &[("csrf", &viewer_csrf)]).await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(count().await, 1);

        // The same name again is refused next to the name.
        let again = browser()
            .post(app.url("/systems/shop/checks"))
            .header(COOKIE, &admin)
            .form(&form("60"))
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(again
            .text()
            .await
            .unwrap()
            .contains("id=\"check-error-name\""));

        let deleted = browser()
            .post(app.url(delete))
            .header(COOKIE, &admin)
            .header("HX-Request", "true")
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), StatusCode::OK);
        assert_eq!(deleted.headers()["hx-redirect"], "/systems/shop#checks");
        assert_eq!(count().await, 0);
    }
);
