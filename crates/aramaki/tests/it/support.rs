//! Test support: an in-process server on a random port, on a fresh SQLite
//! file or a fresh PostgreSQL schema.

use std::sync::Arc;

use aramaki::app::{App, Shutdown};
use aramaki::config::Config;
use aramaki::context::{Context, TestClock};
use aramaki::setup;
use aramaki::users::{self, Role};
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs the body once for SQLite and, when `ARAMAKI_TEST_POSTGRES_URL` is
/// set, once for PostgreSQL: `both!(name, |app| async move { … });`
#[macro_export]
macro_rules! both {
    ($name:ident, |$app:ident| $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn body($app: $crate::support::TestApp) {
                $body.await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                body($crate::support::TestApp::start($crate::support::Backend::Sqlite).await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(app) = $crate::support::TestApp::start_postgres().await {
                    body(app).await
                }
            }
        }
    };
}

pub struct TestApp {
    pub base: String,
    pub token: String,
    pub ctx: Arc<Context>,
    pub clock: Arc<TestClock>,
    pub backend: Backend,
    pub http: reqwest::Client,
    shutdown: Shutdown,
    _dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.stop();
    }
}

/// Who the tests act as when they set things up.
pub fn tester() -> aramaki::timeline::Actor {
    aramaki::timeline::Actor::user("tester", "Test set-up")
}

/// The backends to test on: SQLite always, PostgreSQL when configured.
pub fn backends() -> Vec<Backend> {
    let mut out = vec![Backend::Sqlite];
    if postgres_url().is_some() {
        out.push(Backend::Postgres);
    }
    out
}

pub fn postgres_url() -> Option<String> {
    std::env::var("ARAMAKI_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// A fresh schema for one test, so tests can run in parallel.
pub async fn fresh_postgres_schema() -> Option<String> {
    let url = postgres_url()?;
    sqlx::any::install_default_drivers();
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let pool = sqlx::AnyPool::connect(&url)
        .await
        .expect("connect to ARAMAKI_TEST_POSTGRES_URL");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .expect("create schema");
    pool.close().await;
    let sep = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{sep}options[search_path]={schema}"))
}

/// A loopback port nobody listens on (at the time of asking).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn start_time() -> jiff::Timestamp {
    "2026-11-23T08:00:00Z".parse().expect("valid time")
}

impl TestApp {
    pub async fn start(backend: Backend) -> TestApp {
        TestApp::start_tweaked(backend, |_| {}).await
    }

    /// Starts on `backend` with a configuration tweak.
    pub async fn start_tweaked(backend: Backend, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let url = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(fresh_postgres_schema().await.expect("postgres configured")),
        };
        TestApp::start_with(backend, url, tweak).await
    }

    pub async fn start_postgres() -> Option<TestApp> {
        postgres_url()?;
        Some(TestApp::start(Backend::Postgres).await)
    }

    pub async fn start_with(
        backend: Backend,
        url: Option<String>,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        config.database.url = url;
        config.database.max_connections = 4;
        tweak(&mut config);
        let clock = Arc::new(TestClock::new(start_time()));
        let setup = setup::init(dir.path(), config, clock.clone())
            .await
            .expect("init");
        let admin = setup.first_admin.expect("first start creates an admin");
        // An instance that says where peers reach it listens exactly there.
        let listen = setup
            .context
            .config
            .instance
            .url
            .as_deref()
            .and_then(|u| u.strip_prefix("http://"))
            .unwrap_or("127.0.0.1:0")
            .parse()
            .expect("addr");
        let app = App::build(setup.context.clone(), listen)
            .await
            .expect("bind");
        let ctx = app.context();
        let (addr, shutdown, _handle) = app.spawn();
        TestApp {
            base: format!("http://{addr}"),
            token: admin.token.expose().to_owned(),
            ctx,
            clock,
            backend,
            http: reqwest::Client::new(),
            shutdown,
            _dir: dir,
        }
    }

    /// An instance that peers can reach: its `instance.url` is its address.
    pub async fn start_reachable(name: &str) -> TestApp {
        TestApp::start_reachable_with(name, |_| {}).await
    }

    /// Like [`TestApp::start_reachable`], with more configuration.
    pub async fn start_reachable_with(name: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
        let port = free_port();
        let name = name.to_owned();
        TestApp::start_tweaked(Backend::Sqlite, move |c| {
            c.instance.name = name;
            c.instance.url = Some(format!("http://127.0.0.1:{port}"));
            tweak(c);
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request as the admin.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_as(&self.token.clone(), method, path, body).await
    }

    pub async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call(Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {v}");
        v
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Creates a system and asserts it worked.
    pub async fn system(&self, slug: &str, category: &str, labels: Value) -> Value {
        let (status, v) = self
            .post("/api/v1/systems", serde_json::json!({"slug": slug, "title": slug.to_uppercase(), "category": category, "labels": labels}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "create {slug}: {v}");
        v
    }

    pub async fn include(&self, parent: &str, child: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/api/v1/systems/{parent}/subsystems"),
            serde_json::json!({"slug": child}),
        )
        .await
    }

    /// Records an event and asserts it worked.
    pub async fn event(&self, system: &str, kind: &str, title: &str, extra: Value) -> Value {
        let mut body = serde_json::json!({"system": system, "kind": kind, "title": title});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, v) = self.post("/api/v1/events", body).await;
        assert_eq!(status, StatusCode::CREATED, "event on {system}: {v}");
        v
    }

    /// A user with `role` and a token for them.
    pub async fn user(&self, name: &str, role: Role) -> String {
        let u = users::create_user(
            &self.ctx,
            &crate::support::tester(),
            name,
            name,
            Some(role),
            "a long test password",
            false,
        )
        .await
        .expect("user");
        users::create_token(&self.ctx, &crate::support::tester(), &u.id, "test")
            .await
            .expect("token")
            .expose()
            .to_owned()
    }

    /// A user with no instance-wide role, holding `grants` (slug, role), and a token.
    pub async fn user_with_grants(&self, name: &str, grants: &[(&str, Role)]) -> String {
        let u = users::create_user(
            &self.ctx,
            &crate::support::tester(),
            name,
            name,
            None,
            "a long test password",
            false,
        )
        .await
        .expect("user");
        let actor = aramaki::timeline::Actor::user("test", "Test");
        for (slug, role) in grants {
            users::grant(&self.ctx, &actor, name, slug, *role)
                .await
                .expect("grant");
        }
        users::create_token(&self.ctx, &crate::support::tester(), &u.id, "test")
            .await
            .expect("token")
            .expose()
            .to_owned()
    }

    /// Titles of a timeline page, newest first.
    pub async fn titles(&self, path: &str) -> Vec<String> {
        let v = self.get(path).await;
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|e| e["title"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// Number of events and of live systems, to prove that refused requests wrote nothing.
    pub async fn counts(&self) -> (i64, i64) {
        use sqlx::Row;
        let pool = self.ctx.db.reader();
        let e: i64 = sqlx::query("SELECT COUNT(*) FROM events")
            .fetch_one(pool)
            .await
            .expect("count")
            .get(0);
        let s: i64 = sqlx::query("SELECT COUNT(*) FROM systems WHERE deleted_at IS NULL")
            .fetch_one(pool)
            .await
            .expect("count")
            .get(0);
        (e, s)
    }
}
