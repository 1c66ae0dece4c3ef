//! End-to-end tests in a real headless Chromium, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`; `.ci/run` installs them).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use aramaki::users::{self, Role};
use serde_json::{json, Value};

use crate::support::{Backend, TestApp};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver in a process group of its own, so that the browsers it
/// started go with it (killing chromedriver alone leaves them running).
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", group.as_str()])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One browser session with its own profile.
struct Browser {
    http: reqwest::Client,
    url: String,
    _profile: tempfile::TempDir,
    _driver: Driver,
}

impl Browser {
    async fn start() -> Browser {
        Browser::start_sized(1280, 900).await
    }

    async fn start_sized(width: u32, height: u32) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        use std::os::unix::process::CommandExt;
        let driver = Command::new("chromedriver")
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (apt-get install chromium chromium-driver, or run .ci/run)");
        let driver = Driver(driver);
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let mut ready = false;
        for _ in 0..100 {
            if http.get(format!("{base}/status")).send().await.is_ok() {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not start");
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         format!("--window-size={width},{height}"), "--dns-prefetch-disable", format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        let url = format!("{base}/session/{session}");
        let b = Browser {
            http,
            url,
            _profile: profile,
            _driver: driver,
        };
        // Finding elements waits up to 15 s for them to appear.
        b.call("POST", "/timeouts", json!({"implicit": 15000}))
            .await;
        b
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.url);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url})).await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .call(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    async fn count(&self, css: &str) -> usize {
        self.call("POST", "/timeouts", json!({"implicit": 0})).await;
        let v = self
            .call(
                "POST",
                "/elements",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        self.call("POST", "/timeouts", json!({"implicit": 15000}))
            .await;
        v.as_array().map(Vec::len).unwrap_or(0)
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call("POST", &format!("/element/{id}/click"), json!({}))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        self.call("GET", &format!("/element/{id}/text"), json!({}))
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/async",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// The browser console's messages since the last call.
    async fn console(&self) -> Vec<String> {
        self.call("POST", "/se/log", json!({"type": "browser"}))
            .await
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| e["message"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn current_url(&self) -> String {
        self.call("GET", "/url", json!({}))
            .await
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    async fn screenshot(&self, name: &str) {
        use base64_decode::decode;
        let png = self.call("GET", "/screenshot", json!({})).await;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), decode(png.as_str().unwrap())).unwrap();
    }

    async fn login(&self, base: &str, user: &str, password: &str) {
        self.goto(&format!("{base}/login")).await;
        self.type_into("#username", user).await;
        self.type_into("#password", password).await;
        self.click("form[action='/login'] button[type=submit]")
            .await;
        self.find("header.top .who").await;
    }
}

/// Standard base64, for screenshots (no dependency for twenty lines).
mod base64_decode {
    pub fn decode(s: &str) -> Vec<u8> {
        let value = |c: u8| -> Option<u32> {
            match c {
                b'A'..=b'Z' => Some(u32::from(c - b'A')),
                b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
                b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
                b'+' => Some(62),
                b'/' => Some(63),
                _ => None,
            }
        };
        let mut out = Vec::new();
        let (mut buf, mut bits) = (0u32, 0);
        for v in s.bytes().filter_map(value) {
            buf = (buf << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((buf >> bits) as u8);
            }
        }
        out
    }
}

const PASSWORD: &str = "correct horse battery";

async fn estate(app: &TestApp) {
    app.clock.set(jiff::Timestamp::now());
    aramaki::demo::seed(&app.ctx).await.unwrap();
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "olga",
        "Olga Operator",
        Some(Role::Operator),
        PASSWORD,
        false,
    )
    .await
    .unwrap();
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "vera",
        "Vera Viewer",
        Some(Role::Viewer),
        PASSWORD,
        false,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_at_3am_finds_their_way_and_leaves_a_note() {
    let app = TestApp::start(Backend::Sqlite).await;
    estate(&app).await;
    let ops = Browser::start().await;
    ops.login(&app.base, "olga", PASSWORD).await;
    assert_eq!(ops.current_url().await, format!("{}/", app.base));
    ops.find("a[href='/systems/acme-shop']").await;
    ops.screenshot("dashboard.png").await;

    // Dashboard → system → expand a subsystem layer in place.
    ops.click("a[href='/systems/acme-shop']").await;
    ops.find("details.layer-top").await;
    assert_eq!(
        ops.count("details.layer-top > details.layer[open]").await,
        0
    );
    ops.click("details.layer-top > details.layer > summary")
        .await;
    assert_eq!(
        ops.count("details.layer-top > details.layer[open]").await,
        1,
        "expanded in place"
    );
    assert!(
        ops.current_url().await.ends_with("/systems/acme-shop"),
        "without leaving the page"
    );

    // An inherited dashboard link is there, marked, and can be followed. (It
    // points at this test server: the tests reach no other host.)
    let local = format!("{}/search?q=checkout", app.base);
    let shop = app.get("/api/v1/systems/acme-shop").await;
    let mut links = shop["links"].as_array().unwrap().clone();
    links.push(json!({"title": "Checkout dashboard", "url": local, "kind": "dashboard"}));
    let (status, _) = app
        .call(
            reqwest::Method::PATCH,
            "/api/v1/systems/acme-shop",
            Some(json!({"links": links})),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    ops.goto(&format!("{}/systems/acme-production", app.base))
        .await;
    let inherited = ops.text("ul.links li:has(a[href$='q=checkout'])").await;
    assert!(
        inherited.contains("inherited from acme-shop"),
        "{inherited}"
    );
    ops.screenshot("system.png").await;
    ops.click("ul.links a[href$='q=checkout']").await;
    ops.find("form[role=search]").await;
    assert_eq!(
        ops.current_url().await,
        local,
        "followed the inherited link"
    );

    // A second, separate session watches the timeline while the operator adds a note.
    let watcher = Browser::start().await;
    watcher.login(&app.base, "vera", PASSWORD).await;
    watcher
        .goto(&format!("{}/systems/acme-production", app.base))
        .await;
    assert_eq!(
        watcher
            .count("form[action='/systems/acme-production/notes']")
            .await,
        0,
        "a viewer gets no note form"
    );
    watcher.find("ol#timeline li").await;
    // Wait until htmx's event source is open, then note.
    let open = watcher
        .script("const done = arguments[0]; const t = Date.now(); (function poll() { const es = document.querySelector('#timeline')['htmx-internal-data']?.sseEventSource; if (es && es.readyState === 1) return done(true); if (Date.now() - t > 15000) return done(false); setTimeout(poll, 100); })();")
        .await;
    assert_eq!(open, json!(true), "the live stream opened");
    ops.goto(&format!("{}/systems/acme-production", app.base))
        .await;
    ops.type_into("#note-title", "Flushed Varnish at 3am").await;
    ops.click("form.note button[type=submit]").await;
    ops.find("ol#timeline").await;
    let first = watcher.text("ol#timeline li:first-child .etitle").await;
    let live = if first == "Flushed Varnish at 3am" {
        first
    } else {
        // The implicit wait covers appearance, not change: look again briefly.
        let found = watcher
            .script("const done = arguments[0]; const t = Date.now(); (function poll() { const li = document.querySelector('#timeline li .etitle'); if (li && li.textContent === 'Flushed Varnish at 3am') return done(li.textContent); if (Date.now() - t > 15000) return done(li ? li.textContent : null); setTimeout(poll, 100); })();")
            .await;
        found.as_str().unwrap_or("").to_owned()
    };
    assert_eq!(
        live, "Flushed Varnish at 3am",
        "the note appeared live in the other session"
    );

    // A POST without the CSRF token is refused, even from the logged-in page.
    let status = ops
        .script("const done = arguments[0]; fetch('/systems/acme-production/notes', {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'title=forged'}).then(r => done(r.status));")
        .await;
    assert_eq!(status, json!(403));
    // And the viewer's request is refused, button or not.
    let status = watcher
        .script("const done = arguments[0]; const csrf = document.querySelector('input[name=csrf]').value; fetch('/systems/acme-production/notes', {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'title=sneaky&csrf=' + csrf}).then(r => done(r.status));")
        .await;
    assert_eq!(status, json!(403));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_in_a_handbook_stays_inert() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("shop", "project", json!({})).await;
    let (status, _) = app
        .call(
            reqwest::Method::PATCH,
            "/api/v1/systems/shop",
            Some(json!({"handbook": "Rules <script>window.pwned = true</script> <img src=x onerror=\"window.pwned=true\"> [x](javascript:window.pwned=true)"})),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "vera",
        "Vera",
        Some(Role::Viewer),
        PASSWORD,
        false,
    )
    .await
    .unwrap();
    let b = Browser::start().await;
    b.login(&app.base, "vera", PASSWORD).await;
    b.goto(&format!("{}/systems/shop", app.base)).await;
    let text = b.text(".handbook").await;
    assert!(
        text.contains("<script>window.pwned = true</script>"),
        "shown as text: {text}"
    );
    b.click(".handbook a").await;
    let pwned = b
        .script("const done = arguments[0]; setTimeout(() => done(window.pwned === true), 300);")
        .await;
    assert_eq!(pwned, json!(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_include_form_explains_a_cycle_in_place() {
    let app = TestApp::start(Backend::Sqlite).await;
    estate(&app).await;
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "ada",
        "Ada Admin",
        Some(Role::Admin),
        PASSWORD,
        false,
    )
    .await
    .unwrap();
    let b = Browser::start().await;
    b.login(&app.base, "ada", PASSWORD).await;
    b.goto(&format!("{}/systems/acme-production", app.base))
        .await;
    b.find("#edit-system").await;
    b.type_into("#include-slug", "acme-shop").await;
    b.click("form.include-form button[type=submit]").await;
    let error = b.text("#include-result .error").await;
    assert!(
        error.contains("would close a cycle: acme-production → acme-shop → acme-production"),
        "{error}"
    );
    assert!(
        b.current_url().await.ends_with("/systems/acme-production"),
        "shown in place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edit_form_shows_errors_next_to_their_field_and_saves() {
    let app = TestApp::start(Backend::Sqlite).await;
    app.system("shop", "project", json!({})).await;
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "ada",
        "Ada Admin",
        Some(Role::Admin),
        PASSWORD,
        false,
    )
    .await
    .unwrap();
    let b = Browser::start().await;
    b.login(&app.base, "ada", PASSWORD).await;
    b.goto(&format!("{}/systems/shop", app.base)).await;
    b.click("#edit-system").await;
    b.find("#f-links").await;
    b.type_into("#f-links", "dashbord | Grafana | https://g.example/d")
        .await;
    b.click("form.edit button[type=submit]").await;
    let error = b.text("#e-links").await;
    assert!(error.contains("line 1: unknown kind 'dashbord'"), "{error}");
    assert!(b.current_url().await.ends_with("/systems/shop/edit"));
    // Fix it in place and save: back on the system page, with the link.
    let id = b.find("#f-links").await;
    b.call("POST", &format!("/element/{id}/clear"), json!({}))
        .await;
    b.type_into("#f-links", "dashboard | Grafana | https://g.example/d")
        .await;
    b.type_into("#f-handbook", "Be kind to the cache.").await;
    b.click("form.edit button[type=submit]").await;
    b.find("#handbook-h").await;
    assert!(
        b.current_url().await.ends_with("/systems/shop"),
        "{}",
        b.current_url().await
    );
    assert!(b.text(".handbook").await.contains("Be kind to the cache."));
    let shop = app.get("/api/v1/systems/shop").await;
    assert_eq!(shop["links"][0]["kind"], "dashboard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_fit_a_phone() {
    let app = TestApp::start(Backend::Sqlite).await;
    estate(&app).await;
    let phone = Browser::start_sized(390, 844).await;
    phone.login(&app.base, "olga", PASSWORD).await;
    for path in ["/", "/systems/acme-production", "/search?q=varnish"] {
        phone.goto(&format!("{}{path}", app.base)).await;
        phone.find("main").await;
        let fits = phone
            .script("const done = arguments[0]; done(document.documentElement.scrollWidth <= window.innerWidth + 1);")
            .await;
        assert_eq!(fits, json!(true), "{path} scrolls sideways on a phone");
    }
    phone
        .goto(&format!("{}/systems/acme-production", app.base))
        .await;
    phone.find("#handbook-h").await;
    phone.screenshot("system-phone.png").await;
}

/// Records a check result on a system through the results writer.
async fn observe(app: &TestApp, system: &str, check: &str, status: i32, output: &str) {
    let (id, slug) = {
        let v = app.get(&format!("/api/v1/systems/{system}")).await;
        (v["id"].as_str().unwrap().to_owned(), system.to_owned())
    };
    app.ctx
        .ingest
        .synthetic(aramaki::monitoring::ingest::Synthetic {
            system_id: id,
            system: slug,
            agent: None,
            result: aramaki_protocol::agent::CheckResult {
                check: check.into(),
                system: None,
                labels: Default::default(),
                status,
                output: output.into(),
                metrics: vec![],
                executed_at: app.ctx.now().as_microsecond(),
                duration_ms: 4,
                source: "check".into(),
            },
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_reads_a_checks_history_and_the_agents() {
    let app = TestApp::start(Backend::Sqlite).await;
    estate(&app).await;
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "ada",
        "Ada Admin",
        Some(Role::Admin),
        PASSWORD,
        false,
    )
    .await
    .unwrap();
    let issued = aramaki::agents::issue_token(
        &app.ctx,
        &crate::support::tester(),
        "acme-production",
        jiff::SignedDuration::from_hours(1),
        false,
    )
    .await
    .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    aramaki::agents::enroll(
        &app.ctx,
        &issued.token,
        &aramaki_protocol::keys::hex(key.verifying_key().as_bytes()),
        "shop-web-1",
        "0.1.0",
    )
    .await
    .unwrap();
    observe(
        &app,
        "acme-production",
        "checkout",
        0,
        "HTTP OK: 200 in 0.12 s",
    )
    .await;
    observe(
        &app,
        "acme-production",
        "checkout",
        2,
        "HTTP CRITICAL: 502 Bad Gateway",
    )
    .await;

    let b = Browser::start().await;
    b.login(&app.base, "ada", PASSWORD).await;
    b.goto(&format!("{}/systems/acme-production", app.base))
        .await;
    let line = b.text("#observations li.observation").await;
    assert!(line.contains("checkout") && line.contains("502"), "{line}");
    assert_eq!(b.text("#observations .badge").await, "critical");
    // The history loads in place when opened.
    b.click("#observations details summary").await;
    b.find("#observations ol.history li").await;
    assert_eq!(b.count("#observations ol.history li").await, 2);
    assert!(b.current_url().await.ends_with("/systems/acme-production"));
    b.screenshot("observations.png").await;

    b.goto(&format!("{}/agents", app.base)).await;
    let row = b.text("table.agents tbody tr").await;
    assert!(
        row.contains("shop-web-1") && row.contains("acme-production"),
        "{row}"
    );
    assert!(row.contains(&aramaki_protocol::keys::fingerprint(
        key.verifying_key().as_bytes()
    )));
    b.screenshot("agents.png").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_an_action_and_watches_its_output_live() {
    use crate::agent_e2e::{enroll, eventually, AgentHost};
    let app = TestApp::start(Backend::Sqlite).await;
    // Also sets the clock to now: the agent judges request expiry by its own.
    estate(&app).await;
    let host = AgentHost::new();
    host.configure(
        r#"
[actions.warm-cache]
argv = ["/bin/sh", "-c", "for i in 1 2 3; do echo line $i; sleep 0.4; done"]
"#,
    );
    let t = crate::monitoring::token(&app, "acme-production", json!({})).await;
    assert_eq!(enroll(&app.base, &t, &host.state(), "shop-web-1").0, 0);
    let _agent = host.run();
    eventually("the agent to connect", || async {
        let a = app.get("/api/v1/agents/shop-web-1").await;
        (a["connected"] == true).then_some(())
    })
    .await;
    let (status, body) = app
        .post(
            "/api/v1/systems/acme-production/actions",
            json!({"name": "warm-cache", "title": "Warm the product cache",
                   "description": "Fetches the top pages so that the first customers get them fast. *Safe at any time.*"}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED, "{body}");

    let b = Browser::start().await;
    b.login(&app.base, "olga", PASSWORD).await;
    b.goto(&format!("{}/systems/acme-production", app.base))
        .await;
    b.click("#run-warm-cache button[type=submit]").await;
    b.find("#run").await;
    // The output arrives while the run still runs, line by line.
    let seen = b
        .script("const done = arguments[0]; const t = Date.now(); (function poll() { const out = document.querySelector('#output-0'); const state = document.querySelector('#run-state'); if (out && out.textContent.includes('line 1')) return done({out: out.textContent, state: state.textContent}); if (Date.now() - t > 15000) return done(null); setTimeout(poll, 20); })();")
        .await;
    assert_eq!(seen["state"], "running", "seen live: {seen}");
    assert!(b.current_url().await.contains("/actions/runs/"));
    let over = "const done = arguments[0]; const t = Date.now(); (function poll() { const out = document.querySelector('#output-0'); const state = document.querySelector('#run-state'); if (state && state.textContent !== 'running') return done({out: out.textContent, state: state.textContent}); if (Date.now() - t > 15000) return done(null); setTimeout(poll, 50); })();";
    let end = b.script(over).await;
    assert_eq!(end["state"], "succeeded", "{end}");
    assert_eq!(end["out"], "line 1\nline 2\nline 3\n", "{end}");

    // Running it again at once asks first, naming who ran it and when.
    b.goto(&format!("{}/systems/acme-production", app.base))
        .await;
    b.click("#run-warm-cache button[type=submit]").await;
    let question = b.text("#run-warm-cache .confirm").await;
    assert!(
        question.contains("by Olga Operator") && question.contains("s ago"),
        "{question}"
    );
    assert!(b.current_url().await.ends_with("/systems/acme-production"));
    b.click("#run-warm-cache button[type=submit]").await;
    // htmx is told to go to the new run's page.
    b.find("#run").await;
    let end = b.script(over).await;
    assert_eq!(end["state"], "succeeded", "{end}");
    assert!(end["out"].as_str().unwrap().contains("line 3"), "{end}");
    b.screenshot("action-run.png").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_admins_peer_and_share_a_system_from_their_pages() {
    use crate::agent_e2e::eventually;
    use crate::federation_links::{instance, linked, uses};
    let net = std::sync::Arc::new(aramaki::federation::link::MemoryNet::default());
    let hosting = instance("hosting", &net).await;
    let customer = instance("customer", &net).await;
    for (app, name) in [(&hosting, "hana"), (&customer, "carl")] {
        users::create_user(
            &app.ctx,
            &crate::support::tester(),
            name,
            name,
            Some(Role::Admin),
            PASSWORD,
            false,
        )
        .await
        .unwrap();
    }
    hosting.system("storage", "infrastructure", json!({})).await;
    // Two host names, so that each instance keeps its own session cookie.
    let host_base = hosting.base.clone();
    let cust_base = customer.base.replace("127.0.0.1", "localhost");

    let b = Browser::start().await;
    b.login(&host_base, "hana", PASSWORD).await;
    b.goto(&format!("{host_base}/federation")).await;
    b.click("#issue-invite").await;
    let invite = b.text("#issued-invite").await;
    assert!(invite.contains("#aip_"), "{invite}");

    b.login(&cust_base, "carl", PASSWORD).await;
    b.goto(&format!("{cust_base}/federation")).await;
    b.type_into("#join-invite", &invite).await;
    b.click("#join").await;
    assert_eq!(
        b.text("#join-fingerprint").await,
        hosting.ctx.identity.fingerprint(),
        "the admin compares the fingerprint before anything is pinned"
    );
    b.click("#confirm-join").await;
    assert!(b
        .text("#federation-notice")
        .await
        .contains("Peered with hosting"));

    b.goto(&format!("{host_base}/federation")).await;
    assert_eq!(b.text("#peer-customer .peer-state").await, "pending");
    b.click("#peer-customer details.approve summary").await;
    b.click("#peer-customer button[data-change=approve]").await;
    b.find("#peer-customer details.suspend").await;
    linked(&hosting, &customer).await;

    b.goto(&format!("{cust_base}/federation")).await;
    b.type_into("#ask-system", "storage").await;
    b.click("#ask").await;
    let use_id = eventually("the request on the provider", || async {
        uses(&hosting)
            .await
            .into_iter()
            .find(|u| u["state"] == "pending")
            .and_then(|u| u["id"].as_str().map(str::to_owned))
    })
    .await;

    b.goto(&format!("{host_base}/federation")).await;
    b.click(&format!("#use-{use_id} button.accept")).await;
    b.find(&format!("#theirs-h ~ table #use-{use_id}")).await;
    eventually("the mirror on the customer", || async {
        let (status, _) = customer
            .call(reqwest::Method::GET, "/api/v1/systems/storage", None)
            .await;
        (status == reqwest::StatusCode::OK).then_some(())
    })
    .await;

    b.goto(&format!("{cust_base}/systems/storage")).await;
    assert!(b
        .text("#origin")
        .await
        .contains("Remote system from hosting"));
    assert_eq!(b.count("#edit-system").await, 0);
    b.find("#timeline[sse-connect]").await;
    // What happens to storage on its instance appears here live, marked.
    hosting
        .event("storage", "deploy", "storage 2.0 rolled out", json!({}))
        .await;
    let live = b
        .script("const done = arguments[0]; const t = Date.now(); (function poll() { for (const li of document.querySelectorAll('#timeline li')) { if (li.textContent.includes('storage 2.0 rolled out')) return done(li.querySelector('.from') ? li.querySelector('.from').textContent : 'unmarked'); } if (Date.now() - t > 20000) return done(null); setTimeout(poll, 50); })();")
        .await;
    assert_eq!(live, "from hosting");
    b.screenshot("remote-system.png").await;
    b.goto(&format!("{cust_base}/federation")).await;
    b.find(&format!("#use-{use_id}")).await;
    b.screenshot("federation.png").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_work_under_the_content_security_policy() {
    let app = TestApp::start(Backend::Sqlite).await;
    estate(&app).await;
    users::create_user(
        &app.ctx,
        &crate::support::tester(),
        "ada",
        "Ada Admin",
        Some(Role::Admin),
        PASSWORD,
        false,
    )
    .await
    .unwrap();
    let b = Browser::start().await;
    b.login(&app.base, "ada", PASSWORD).await;
    b.goto(&format!("{}/systems/acme-production", app.base))
        .await;
    b.find("ol#timeline li").await;
    let open = b
        .script("const done = arguments[0]; const t = Date.now(); (function poll() { const es = document.querySelector('#timeline')['htmx-internal-data']?.sseEventSource; if (es && es.readyState === 1) return done(true); if (Date.now() - t > 15000) return done(false); setTimeout(poll, 100); })();")
        .await;
    assert_eq!(open, json!(true), "the live stream opened under the policy");
    // The note form posts through htmx and is emptied by aramaki.js, which
    // replaced the inline hx-on handler.
    b.type_into("#note-title", "Checked under CSP").await;
    b.click("form.note button[type=submit]").await;
    let reset = b
        .script("const done = arguments[0]; const t = Date.now(); (function poll() { const li = document.querySelector('#timeline li .etitle'); const title = document.querySelector('#note-title'); if (li && li.textContent === 'Checked under CSP' && title.value === '') return done(true); if (Date.now() - t > 15000) return done({title: title.value, first: li && li.textContent}); setTimeout(poll, 100); })();")
        .await;
    assert_eq!(
        reset,
        json!(true),
        "the note was added and the form emptied"
    );
    for path in [
        "/",
        "/systems/acme-shop",
        "/systems/acme-shop/edit",
        "/agents",
        "/search?q=shop",
    ] {
        b.goto(&format!("{}{path}", app.base)).await;
        b.find("main").await;
    }
    let styles = b
        .script(
            "const done = arguments[0]; done(document.querySelectorAll('style, [style]').length);",
        )
        .await;
    assert_eq!(styles, json!(0), "htmx injected no styles");
    let violations: Vec<String> = b
        .console()
        .await
        .into_iter()
        .filter(|m| m.contains("Content Security Policy") || m.contains("Refused to"))
        .collect();
    assert!(violations.is_empty(), "{violations:#?}");
    // The policy is in force: an injected inline script does not run.
    let ran = b
        .script("const done = arguments[0]; const s = document.createElement('script'); s.textContent = 'window.inlineRan = true'; document.body.appendChild(s); setTimeout(() => done(window.inlineRan === true), 200);")
        .await;
    assert_eq!(ran, json!(false), "inline script is blocked");
    assert!(
        b.console()
            .await
            .iter()
            .any(|m| m.contains("Content Security Policy")),
        "the browser reported the blocked script"
    );
}
