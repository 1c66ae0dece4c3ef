//! The OpenAPI document describes the API exactly: every operation is
//! called for real on a seeded estate, and its parameters, the status it
//! answers, the content type and the top-level shape of the body are
//! checked against what the document says.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::{json, Value};

use crate::both;
use crate::support::TestApp;

/// The schema a `$ref` points to.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            &doc["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Checks the body's top-level shape against a schema; returns what is wrong.
fn shape_errors(doc: &Value, schema: &Value, body: &Value) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut errors = Vec::new();
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            errors.extend(shape_errors(doc, part, body));
        }
        return errors;
    }
    match schema["type"].as_str() {
        Some("array") if !body.is_array() => errors.push(format!("expected an array, got {body}")),
        Some("object") | None if schema.get("properties").is_some() => {
            let Some(obj) = body.as_object() else {
                errors.push(format!("expected an object, got {body}"));
                return errors;
            };
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap_or_default();
                if !obj.contains_key(name) {
                    errors.push(format!("required property `{name}` missing"));
                }
            }
        }
        _ => {}
    }
    errors
}

/// Path parameter values from the seeded estate, by route and name.
struct Estate {
    values: BTreeMap<&'static str, String>,
    by_route: BTreeMap<(&'static str, &'static str), String>,
}

impl Estate {
    fn value(&self, route: &str, name: &str) -> String {
        self.by_route
            .iter()
            .find(|((r, n), _)| *r == route && *n == name)
            .map(|(_, v)| v.clone())
            .or_else(|| self.values.get(name).cloned())
            .unwrap_or_else(|| panic!("no value for {{{name}}} in {route}"))
    }
}

async fn seed(app: &TestApp) -> Estate {
    app.system("shop", "project", json!({"env": "prod"})).await;
    app.system("web", "host", json!({})).await;
    app.system("db", "host", json!({})).await;
    app.system("gone", "host", json!({})).await;
    assert!(app.include("shop", "web").await.0.is_success());
    assert!(app.include("shop", "gone").await.0.is_success());
    let event = app.event("shop", "note", "hello", json!({})).await;
    let (status, check) = app
        .post(
            "/api/v1/checks",
            json!({"name": "queue", "command": ["/bin/true"], "subscriptions": ["linux"], "interval": 10}),
        )
        .await;
    assert!(status.is_success(), "{check}");
    let (status, action) = app
        .post(
            "/api/v1/systems/web/actions",
            json!({"name": "purge", "title": "Purge", "timeout": 30, "params": [{"name": "scope", "type": "enum", "values": ["all", "images"], "default": "all"}]}),
        )
        .await;
    assert!(status.is_success(), "{action}");
    let (status, enrollment) = app
        .post("/api/v1/agents/tokens", json!({"system": "web"}))
        .await;
    assert!(status.is_success(), "{enrollment}");
    let (status, token) = app.post("/api/v1/tokens", json!({"name": "spare"})).await;
    assert!(status.is_success(), "{token}");
    let id = |v: &Value| v["id"].as_str().unwrap_or_default().to_owned();
    let values = BTreeMap::from([
        ("slug", "shop".to_owned()),
        ("child", "gone".to_owned()),
        ("name", "queue".to_owned()),
        ("check", "queue".to_owned()),
        ("agent", "no-such-agent".to_owned()),
        ("peer", "no-such-peer".to_owned()),
        ("system", "shop".to_owned()),
        ("decision", "accept".to_owned()),
        ("change", "approve".to_owned()),
        ("id", "01900000-0000-7000-8000-000000000000".to_owned()),
    ]);
    let by_route = BTreeMap::from([
        (("/api/v1/events/{id}", "id"), id(&event)),
        (("/api/v1/tokens/{id}", "id"), id(&token)),
        (("/api/v1/agents/tokens/{id}", "id"), id(&enrollment)),
        (("/api/v1/systems/{slug}/actions", "slug"), "web".to_owned()),
        (
            ("/api/v1/systems/{slug}/actions/{name}", "slug"),
            "web".to_owned(),
        ),
        (
            ("/api/v1/systems/{slug}/actions/{name}", "name"),
            "purge".to_owned(),
        ),
        (
            ("/api/v1/systems/{slug}/actions/{name}/runs", "slug"),
            "web".to_owned(),
        ),
        (
            ("/api/v1/systems/{slug}/actions/{name}/runs", "name"),
            "purge".to_owned(),
        ),
    ]);
    Estate { values, by_route }
}

/// A valid body for the operations that take one.
fn body_for(method: &str, route: &str) -> Value {
    match (method, route) {
        ("post", "/api/v1/systems") => {
            json!({"slug": "new-one", "title": "New", "category": "host"})
        }
        ("patch", "/api/v1/systems/{slug}") => json!({"title": "The shop"}),
        ("post", "/api/v1/systems/{slug}/subsystems") => json!({"slug": "db"}),
        ("post", "/api/v1/categories") => json!({"name": "rack", "title": "Rack"}),
        ("post", "/api/v1/events") => json!({"system": "shop", "kind": "note", "title": "t"}),
        ("post", "/api/v1/events/batch") => {
            json!({"events": [{"system": "shop", "kind": "note", "title": "b"}]})
        }
        ("post", "/api/v1/tokens") => json!({"name": "another"}),
        ("post", "/api/v1/agents/tokens") => json!({"system": "db"}),
        ("post", "/api/v1/checks") => {
            json!({"name": "disk", "command": ["/bin/true"], "subscriptions": ["linux"], "interval": 60})
        }
        ("put", "/api/v1/checks/{name}") => {
            json!({"name": "queue", "command": ["/bin/true"], "subscriptions": ["linux"], "interval": 30})
        }
        ("post", "/api/v1/systems/{slug}/actions") => json!({"name": "flush", "title": "Flush"}),
        ("put", "/api/v1/systems/{slug}/actions/{name}") => {
            json!({"name": "purge", "title": "Purge all", "timeout": 30})
        }
        ("post", "/api/v1/systems/{slug}/actions/{name}/runs") => json!({"params": {}}),
        ("post", "/api/v1/peers/{peer}/uses") => json!({"system": "shop"}),
        ("post", "/api/v1/uses/{id}/{decision}") => json!({}),
        ("put", "/api/v1/peers/{peer}/policies") => json!({"system": "shop", "level": "view"}),
        ("post", "/api/v1/peers/invites") => json!({}),
        ("post", "/api/v1/peers/join") => json!({"invite": "not-an-invite"}),
        _ => json!({}),
    }
}

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

both!(
    the_document_describes_every_operation_exactly,
    |app| async move {
        let estate = seed(&app).await;
        let doc: Value = app
            .http
            .get(app.url("/api/v1/openapi.json"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut operations = Vec::new();
        for (route, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    operations.push((route.clone(), method, op.clone()));
                }
            }
        }
        // Reads first, then writes, deletes last: each finds the estate whole.
        operations.sort_by_key(|(route, method, _)| {
            (
                METHODS.iter().position(|m| m == method),
                std::cmp::Reverse(route.len()),
            )
        });
        assert!(operations.len() > 50, "{} operations", operations.len());
        let mut problems = Vec::new();
        let mut seen_statuses = BTreeSet::new();
        for (route, method, op) in &operations {
            let label = format!("{} {route}", method.to_uppercase());
            let template: BTreeSet<String> = route
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .map(str::to_owned)
                .collect();
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            let declared: BTreeSet<String> = params
                .iter()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
                .collect();
            if declared != template {
                problems.push(format!(
                    "{label}: path parameters declared {declared:?}, route has {template:?}"
                ));
            }
            for (status, response) in op["responses"].as_object().into_iter().flatten() {
                let types: Vec<&String> = response["content"]
                    .as_object()
                    .map(|c| c.keys().collect())
                    .unwrap_or_default();
                if status.starts_with(['4', '5']) && types != ["application/problem+json"] {
                    problems.push(format!("{label}: error {status} documented as {types:?}"));
                }
            }
            for p in &params {
                let within = p["in"].as_str().unwrap_or_default();
                if !["path", "query", "header"].contains(&within) {
                    problems.push(format!("{label}: parameter {} is in {within}", p["name"]));
                }
            }
            let mut url = route.clone();
            for name in &template {
                url = url.replace(&format!("{{{name}}}"), &estate.value(route, name));
            }
            if route.ends_with("/stream") {
                // A stream never ends: its head is enough (checked below).
                url.push_str("?kind=note");
            }
            let mut req = app
                .http
                .request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    app.url(&url),
                )
                .bearer_auth(&app.token);
            if op.get("requestBody").is_some() {
                req = req.json(&body_for(method, route));
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16().to_string();
            seen_statuses.insert(format!("{label} {status}"));
            let ctype = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or_default().trim().to_owned());
            let Some(documented) = op["responses"].get(&status) else {
                problems.push(format!(
                    "{label}: answered {status}, which is not documented"
                ));
                continue;
            };
            let content = documented["content"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            if route.ends_with("/stream") {
                if ctype.as_deref().map(|c| content.contains_key(c)) != Some(true) {
                    problems.push(format!(
                        "{label}: content type {ctype:?}, documented {:?}",
                        content.keys()
                    ));
                }
                continue;
            }
            let text = resp.text().await.unwrap();
            if content.is_empty() {
                if !text.is_empty() {
                    problems.push(format!("{label}: {status} documents no body, got {text}"));
                }
                continue;
            }
            let Some(ctype) = ctype else {
                problems.push(format!("{label}: {status} has no content type"));
                continue;
            };
            let Some(media) = content.get(&ctype) else {
                problems.push(format!(
                    "{label}: {status} answered {ctype}, documented {:?}",
                    content.keys().collect::<Vec<_>>()
                ));
                continue;
            };
            if status.starts_with('4') && ctype != "application/problem+json" {
                problems.push(format!("{label}: error {status} as {ctype}"));
            }
            if let Some(schema) = media.get("schema") {
                let body: Value =
                    serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
                for e in shape_errors(&doc, schema, &body) {
                    problems.push(format!("{label}: {status} body: {e}"));
                }
            }
        }
        // Every secured operation refuses an anonymous caller, as documented.
        for (route, method, op) in &operations {
            if op["security"].as_array().is_none_or(|s| s.is_empty()) {
                continue;
            }
            let label = format!("{} {route}", method.to_uppercase());
            let mut url = route.clone();
            for name in route
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            {
                url = url.replace(&format!("{{{name}}}"), &estate.value(route, name));
            }
            let resp = app
                .http
                .request(
                    Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                    app.url(&url),
                )
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16().to_string();
            if status != "401" {
                problems.push(format!("{label}: anonymous caller got {status}"));
            }
            let documented = op["responses"][status.as_str()]["content"]
                .get("application/problem+json")
                .is_some();
            let ctype = resp.headers().get("content-type").cloned();
            if !documented
                || ctype.as_ref().and_then(|c| c.to_str().ok()) != Some("application/problem+json")
            {
                problems.push(format!(
                    "{label}: anonymous {status} as {ctype:?} is not as documented"
                ));
            }
        }
        assert!(
            problems.is_empty(),
            "the document is wrong:\n{}",
            problems.join("\n")
        );
        // The walk reached the successful answers, not only refusals.
        for ok in [
            "GET /api/v1/systems/{slug} 200",
            "GET /api/v1/events/{id} 200",
            "GET /api/v1/systems/{slug}/observations/{check}/history 200",
            "POST /api/v1/agents/tokens 201",
            "DELETE /api/v1/tokens/{id} 204",
            "DELETE /api/v1/systems/{slug}/subsystems/{child} 204",
        ] {
            assert!(
                seen_statuses.contains(ok),
                "{ok} not reached: {seen_statuses:#?}"
            );
        }
    }
);
