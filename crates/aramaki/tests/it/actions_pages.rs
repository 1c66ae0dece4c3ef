//! Actions on the system page and the run page, as server-rendered HTML
//! with a cookie session, run through a real agent.

use aramaki::users::{self, Role};
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION};
use reqwest::StatusCode;
use serde_json::json;

use crate::agent_e2e::{enroll, eventually, AgentHost, Proc};
use crate::monitoring::token;
use crate::monitoring_pages::{get, logged_in, post};
use crate::pages::{browser, csrf_of};
use crate::support::{tester, Backend, TestApp};

/// A server with a system `ops-box` whose agent `ops-1` allows `echo`.
struct Bench {
    app: TestApp,
    _host: AgentHost,
    _agent: Proc,
}

/// Every weekday but today's (UTC): a window that is closed now.
fn not_today() -> Vec<&'static str> {
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .weekday()
        .to_monday_zero_offset();
    ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i as i8 != today)
        .map(|(_, d)| d)
        .collect()
}

async fn bench() -> Bench {
    let app = TestApp::start(Backend::Sqlite).await;
    // The agent judges request expiry by its own (real) clock.
    app.clock.set(jiff::Timestamp::now());
    app.system("ops-box", "host", json!({})).await;
    app.system("elsewhere", "host", json!({})).await;
    let host = AgentHost::new();
    host.configure(
        r#"
[actions.echo]
argv = ["/bin/echo", "{text}"]
params = ["text"]
[actions.facts]
argv = ["/bin/echo", '{"os": "debian", "cores": [2, 4]}']
"#,
    );
    let t = token(&app, "ops-box", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "ops-1").0, 0);
    let agent = host.run();
    eventually("the agent to connect", || async {
        let a = app.get("/api/v1/agents/ops-1").await;
        (a["connected"] == true).then_some(())
    })
    .await;
    for spec in [
        json!({"name": "echo", "title": "Echo a phrase", "description": "Says **back** what it is given.",
               "params": [{"name": "text", "type": "string", "pattern": "[a-z ]+", "default": "hello",
                           "description": "Lowercase words."}]}),
        json!({"name": "shape", "title": "Shape", "read_only": true, "params": [
            {"name": "mode", "type": "enum", "values": ["soft", "hard"], "required": true},
            {"name": "level", "type": "integer", "min": 1, "max": 3},
            {"name": "dry", "type": "boolean", "default": "true"}]}),
        json!({"name": "nightly", "title": "Nightly", "windows": [{"days": not_today(), "from": "03:00", "to": "04:00"}]}),
        json!({"name": "purge", "title": "Purge", "role": "admin"}),
        json!({"name": "facts", "title": "Facts", "read_only": true}),
    ] {
        let (status, body) = app.post("/api/v1/systems/ops-box/actions", spec).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    Bench {
        app,
        _host: host,
        _agent: agent,
    }
}

/// The part of a page from `from` to the next `to`.
fn part<'a>(html: &'a str, from: &str, to: &str) -> &'a str {
    let start = html
        .find(from)
        .unwrap_or_else(|| panic!("no {from} in {html}"));
    let rest = &html[start..];
    &rest[..rest.find(to).unwrap_or(rest.len())]
}

/// The run page once the run is over (no live stream any more).
async fn finished(app: &TestApp, run_path: &str, cookie: &str) -> String {
    eventually("the run to finish", || async {
        let (status, html) = get(app, run_path, cookie).await;
        assert_eq!(status, StatusCode::OK);
        (!html.contains("sse-connect")).then_some(html)
    })
    .await
}

const RUN: &str = "/systems/ops-box/actions/echo/run";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_an_action_from_the_system_page() {
    // Bound whole: the agent lives as long as the test.
    let bench = bench().await;
    let app = &bench.app;
    let viewer = logged_in(app, "vera", Some(Role::Viewer)).await;
    let olga = logged_in(app, "olga", Some(Role::Operator)).await;

    // A viewer sees what there is, but no form.
    let (status, html) = get(app, "/systems/ops-box", &viewer).await;
    assert_eq!(status, StatusCode::OK);
    let section = part(&html, "id=\"actions\"", "</section>");
    assert!(section.contains("Echo a phrase"), "{section}");
    assert!(section.contains("<strong>back</strong>"), "{section}");
    assert!(
        section.contains("any time") && section.contains("operator"),
        "{section}"
    );
    assert!(section.contains("read-only"), "{section}");
    assert!(section.contains("(outside now)"), "{section}");
    assert!(!section.contains("<form"), "viewers get no form: {section}");
    let csrf_vera = csrf_of(&html);
    let refused = post(app, RUN, &viewer, &[("csrf", &csrf_vera)]).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // An operator gets a form per action they hold the role of, one input per parameter.
    let (_, html) = get(app, "/systems/ops-box", &olga).await;
    let csrf = csrf_of(&html);
    let echo = part(&html, "id=\"run-echo\"", "</form>");
    assert!(
        echo.contains("name=\"params.text\" value=\"hello\""),
        "{echo}"
    );
    assert!(echo.contains("pattern=\"[a-z ]+\""), "{echo}");
    let shape = part(&html, "id=\"run-shape\"", "</form>");
    assert!(
        shape.contains("<select id=\"run-shape-mode\" name=\"params.mode\" required"),
        "{shape}"
    );
    assert!(
        shape.contains("type=\"number\"") && shape.contains("min=\"1\" max=\"3\""),
        "{shape}"
    );
    assert!(
        shape.contains("type=\"checkbox\"") && shape.contains(" checked"),
        "{shape}"
    );
    let nightly = part(&html, "id=\"run-nightly\"", "</form>");
    assert!(nightly.contains("name=\"override_reason\""), "{nightly}");
    assert!(nightly.contains("emergency override"), "{nightly}");
    assert!(!echo.contains("override_reason"), "{echo}");
    assert!(!html.contains("id=\"run-purge\""), "purge needs admin");

    // Without the CSRF token: refused, nothing runs.
    let forged = post(app, RUN, &olga, &[("params.text", "hello")]).await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let runs = app.get("/api/v1/systems/ops-box/actions/echo/runs").await;
    assert_eq!(runs["items"], json!([]));

    // A bad parameter comes back next to its field, as typed.
    let bad = post(
        app,
        RUN,
        &olga,
        &[("csrf", &csrf), ("params.text", "Hello!")],
    )
    .await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = bad.text().await.unwrap();
    let field = part(&html, "<div class=\"field invalid\"", "</div>");
    assert!(field.contains("value=\"Hello!\""), "{field}");
    assert!(
        field.contains("aria-describedby=\"run-echo-text-error\""),
        "{field}"
    );
    assert!(field.contains("does not match the pattern"), "{field}");
    assert!(html.contains("Fix the marked parameter"), "{html}");

    // A good run lands on the run page, which shows the output once done.
    let ok = post(
        app,
        RUN,
        &olga,
        &[("csrf", &csrf), ("params.text", "hello world")],
    )
    .await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    let run_path = ok.headers()[LOCATION].to_str().unwrap().to_owned();
    assert!(run_path.starts_with("/actions/runs/"), "{run_path}");
    let page = finished(app, &run_path, &olga).await;
    assert!(page.contains("id=\"run-state\">succeeded<"), "{page}");
    assert!(
        page.contains("<pre class=\"output\" id=\"output-0\">hello world\n</pre>"),
        "{page}"
    );
    assert!(
        page.contains("<code>text=hello world</code>") && page.contains("olga"),
        "{page}"
    );
    assert!(page.contains("ops-1") && page.contains("exit 0"), "{page}");
    // A finished run's stream says so at once.
    let stream = browser()
        .get(app.url(&format!("{run_path}/stream")))
        .header(COOKIE, &olga)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()[CONTENT_TYPE], "text/event-stream");
    assert!(stream.text().await.unwrap().contains("event: done"));

    // Again within the confirmation window: asked, naming who ran it and when.
    let again = post(
        app,
        RUN,
        &olga,
        &[("csrf", &csrf), ("params.text", "hello world")],
    )
    .await;
    assert_eq!(again.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = again.text().await.unwrap();
    let form = part(&html, "id=\"run-echo\"", "</form>");
    assert!(
        form.contains("ran on these targets") && form.contains("s ago"),
        "{form}"
    );
    assert!(form.contains("by olga (succeeded)"), "{form}");
    assert!(form.contains(&format!("href=\"{run_path}\"")), "{form}");
    assert!(form.contains("name=\"confirm\" value=\"true\""), "{form}");
    assert!(form.contains("Yes, run it again"), "{form}");
    assert!(
        form.contains("value=\"hello world\""),
        "the parameters are kept: {form}"
    );
    let confirmed = post(
        app,
        RUN,
        &olga,
        &[
            ("csrf", &csrf),
            ("confirm", "true"),
            ("params.text", "hello world"),
        ],
    )
    .await;
    assert_eq!(confirmed.status(), StatusCode::SEE_OTHER);
    let second = confirmed.headers()[LOCATION].to_str().unwrap().to_owned();
    assert_ne!(second, run_path);
    finished(app, &second, &olga).await;
    // Through htmx: told where to go instead of redirected.
    let htmx = browser()
        .post(app.url(RUN))
        .header(COOKIE, &olga)
        .header("hx-request", "true")
        .form(&[("csrf", csrf.as_str()), ("confirm", "true")])
        .send()
        .await
        .unwrap();
    assert_eq!(htmx.status(), StatusCode::OK);
    assert!(htmx.headers()["hx-redirect"]
        .to_str()
        .unwrap()
        .starts_with("/actions/runs/"));

    // The system page lists the runs for everyone who may see it.
    let (_, html) = get(app, "/systems/ops-box", &viewer).await;
    let echo = part(&html, "id=\"action-echo\"", "</article>");
    assert!(echo.contains(&format!("href=\"{run_path}\"")), "{echo}");
    assert!(
        echo.contains("<code>text=hello world</code>") && echo.contains("olga"),
        "{echo}"
    );
    assert!(
        echo.contains("<code>text=hello</code>"),
        "the default: {echo}"
    );
    assert!(echo.contains("ops-1 <span class=\"badge"), "{echo}");
    let (status, page) = get(app, &run_path, &viewer).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!page.contains("Cancel"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_invisible_systems_are_not_found() {
    // Bound whole: the agent lives as long as the test.
    let bench = bench().await;
    let app = &bench.app;
    let olga = logged_in(app, "olga", Some(Role::Operator)).await;
    let ian = logged_in(app, "ian", None).await;
    users::grant(&app.ctx, &tester(), "ian", "elsewhere", Role::Operator)
        .await
        .unwrap();
    let (_, html) = get(app, "/systems/ops-box", &olga).await;
    let ok = post(app, RUN, &olga, &[("csrf", &csrf_of(&html))]).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    let run_path = ok.headers()[LOCATION].to_str().unwrap().to_owned();

    let (_, html) = get(app, "/systems/elsewhere", &ian).await;
    let ian_csrf = csrf_of(&html);
    assert_eq!(get(app, &run_path, &ian).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(app, &format!("{run_path}/stream"), &ian).await.0,
        StatusCode::NOT_FOUND
    );
    let cancel = post(
        app,
        &format!("{run_path}/cancel"),
        &ian,
        &[("csrf", &ian_csrf)],
    )
    .await;
    assert_eq!(cancel.status(), StatusCode::NOT_FOUND);
    let run = post(app, RUN, &ian, &[("csrf", &ian_csrf)]).await;
    assert_eq!(run.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        get(app, "/actions/runs/no-such-run", &olga).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(app, &run_path, &olga).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_answers_of_a_read_only_run_are_grouped() {
    let bench = bench().await;
    let app = &bench.app;
    // Two more hosts: one answers the same JSON with its keys in another
    // order, one answers differently.
    let mut agents = Vec::new();
    for (name, answer) in [
        ("ops-2", r#"{"cores":[2,4],"os":"debian"}"#),
        ("ops-3", r#"{"os": "alpine"}"#),
    ] {
        let host = AgentHost::new();
        host.configure(&format!(
            "[actions.facts]\nargv = [\"/bin/echo\", '{answer}']\n"
        ));
        let t = token(app, "ops-box", json!({})).await;
        assert_eq!(enroll(&app.base, &t, &host.state(), name).0, 0);
        agents.push((host.run(), host));
        eventually("the agent to connect", || async {
            let a = app.get(&format!("/api/v1/agents/{name}")).await;
            (a["connected"] == true).then_some(())
        })
        .await;
    }
    let olga = logged_in(app, "olga", Some(Role::Operator)).await;
    let (_, html) = get(app, "/systems/ops-box", &olga).await;
    let ok = post(
        app,
        "/systems/ops-box/actions/facts/run",
        &olga,
        &[("csrf", &csrf_of(&html))],
    )
    .await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    let run_path = ok.headers()[LOCATION].to_str().unwrap().to_owned();
    let page = finished(app, &run_path, &olga).await;
    let answers = part(&page, "<h2>Answers</h2>", "</div>");
    assert!(
        answers.contains("<strong>2 agents:</strong> ops-1, ops-2"),
        "{answers}"
    );
    assert!(
        answers.contains("<strong>1 agent:</strong> ops-3"),
        "{answers}"
    );
    assert_eq!(answers.matches("<pre").count(), 2, "{answers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_define_actions_on_the_system_page() {
    let b = bench().await;
    let app = &b.app;
    let admin = logged_in(app, "ada", Some(Role::Admin)).await;
    let operator = logged_in(app, "olga", Some(Role::Operator)).await;
    let (_, page) = get(app, "/systems/ops-box", &operator).await;
    assert!(
        !page.contains("action-spec"),
        "operators get no definition form"
    );
    let (_, page) = get(app, "/systems/ops-box", &admin).await;
    assert!(
        page.contains("Define or change an action") && page.contains("flush-cache"),
        "a template to start from"
    );
    let csrf = csrf_of(&page);

    // Refused definitions come back with the problem named, writing nothing.
    for (spec, problem) in [
        ("{not json", "not valid"),
        (
            r#"{"name": "greet", "title": "Greet", "role": "root"}"#,
            "role",
        ),
        (
            r#"{"name": "greet", "title": "Greet", "params": [{"name": "who", "type": "colour"}]}"#,
            "colour",
        ),
        // The strict reading of the API: no U+0000, no struct by position.
        (
            r#"{"name": "greet", "title": "Gr\u0000eet"}"#,
            "`title` contains a NUL character",
        ),
        (
            r#"{"name": "greet", "title": "Greet", "params": [["who", "string"]]}"#,
            "params[0]",
        ),
    ] {
        let r = post(
            app,
            "/systems/ops-box/actions",
            &admin,
            &[("csrf", csrf.as_str()), ("spec", spec)],
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{spec}");
        let html = r.text().await.unwrap();
        assert!(
            html.contains("action-spec-error") && html.contains(problem),
            "{spec}: {html}"
        );
    }
    let spec = r#"{"name": "greet", "title": "Greet someone", "params": [{"name": "who", "type": "string", "pattern": "[a-z]+"}]}"#;
    let r = post(
        app,
        "/systems/ops-box/actions",
        &operator,
        &[
            (
                "csrf",
                csrf_of(&get(app, "/systems/ops-box", &operator).await.1).as_str(),
            ),
            ("spec", spec),
        ],
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "operators may not define"
    );
    let r = post(app, "/systems/ops-box/actions", &admin, &[("spec", spec)]).await;
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "no CSRF token, no change"
    );
    assert_eq!(
        app.call(
            reqwest::Method::GET,
            "/api/v1/systems/ops-box/actions/greet",
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let r = post(
        app,
        "/systems/ops-box/actions",
        &admin,
        &[("csrf", csrf.as_str()), ("spec", spec)],
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let defined = app.get("/api/v1/systems/ops-box/actions/greet").await;
    assert_eq!(defined["title"], "Greet someone");
    let (_, page) = get(app, "/systems/ops-box", &operator).await;
    assert!(
        page.contains("Greet someone"),
        "the new action is on the page"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_page_shows_the_timeout_the_agent_applied() {
    let bench = bench().await;
    let app = &bench.app;
    // The action allows ten minutes; the agent's allow-list keeps its
    // default cap of 60 s.
    let (status, body) = app
        .call(
            reqwest::Method::PUT,
            "/api/v1/systems/ops-box/actions/echo",
            Some(json!({"name": "echo", "title": "Echo a phrase", "timeout": 600, "confirm_within_minutes": null,
                        "params": [{"name": "text", "type": "string", "pattern": "[a-z ]+", "default": "hello"}]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let olga = logged_in(app, "olga", Some(Role::Operator)).await;
    let (_, html) = get(app, "/systems/ops-box", &olga).await;
    let ok = post(app, RUN, &olga, &[("csrf", &csrf_of(&html))]).await;
    assert_eq!(ok.status(), StatusCode::SEE_OTHER);
    let run_path = ok.headers()[LOCATION].to_str().unwrap().to_owned();
    let html = finished(app, &run_path, &olga).await;
    assert!(
        html.contains("600 s (each agent may cap it)"),
        "{}",
        part(&html, "<dl", "</dl>")
    );
    assert!(
        html.contains("timeout 60 s (this agent") && html.contains("the action allows 600 s)"),
        "{}",
        part(&html, "<section class=\"target", "</section>")
    );
}
