//! The `aramaki` command as a client of the REST API: human-readable tables
//! by default, `--json` for scripts.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Where the API is and who we are.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the Aramaki server.
    #[arg(
        long,
        env = "ARAMAKI_URL",
        default_value = "http://127.0.0.1:8764",
        global = true
    )]
    pub url: String,
    /// API token (printed once at first start).
    #[arg(long, env = "ARAMAKI_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Create a system.
    Add {
        slug: String,
        #[arg(long)]
        title: String,
        #[arg(long)]
        category: String,
        #[arg(long)]
        description: Option<String>,
        /// Read the handbook (Markdown) from this file.
        #[arg(long)]
        handbook_file: Option<std::path::PathBuf>,
        /// A label, `key=value`; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Make it a dynamic aggregate of all systems matching this selector.
        #[arg(long)]
        selector: Option<String>,
        /// A link, `kind|title|url` (kind: dashboard, docs, repository, runbook, chat, other); repeatable.
        #[arg(long = "link")]
        links: Vec<String>,
        /// A contact, `name|role|how to reach|escalation order`; repeatable.
        #[arg(long = "contact")]
        contacts: Vec<String>,
    },
    /// List systems.
    List {
        #[arg(long)]
        category: Option<String>,
        /// Label selector such as `role=storage,dc=dc1`.
        #[arg(long)]
        label: Option<String>,
        /// Text search.
        #[arg(long, short)]
        q: Option<String>,
    },
    /// Show one system with its subsystems and includers.
    Show { slug: String },
    /// Change a system.
    Edit {
        slug: String,
        #[arg(long)]
        new_slug: Option<String>,
        #[arg(long)]
        title: Option<String>,
        #[arg(long)]
        category: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        handbook_file: Option<std::path::PathBuf>,
        /// Set a label, `key=value`; repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Remove a label by key; repeatable.
        #[arg(long = "remove-label")]
        remove_labels: Vec<String>,
        #[arg(long, conflicts_with = "no_selector")]
        selector: Option<String>,
        /// Turn a dynamic aggregate back into a plain system.
        #[arg(long)]
        no_selector: bool,
    },
    /// Include CHILD as a subsystem of PARENT.
    Include { parent: String, child: String },
    /// Exclude CHILD from PARENT.
    Exclude { parent: String, child: String },
    /// Delete a system.
    Delete {
        slug: String,
        /// Exclude it from every system that includes it first.
        #[arg(long)]
        force: bool,
    },
    /// Show the decomposed status of a system.
    Status { slug: String },
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Record an event on a system's timeline.
    Add {
        system: String,
        #[arg(long)]
        kind: String,
        #[arg(long)]
        title: String,
        #[arg(long, default_value = "info")]
        severity: String,
        #[arg(long)]
        body: Option<String>,
        /// RFC 3339 time; default now.
        #[arg(long)]
        occurred_at: Option<String>,
        /// A JSON object.
        #[arg(long)]
        data: Option<String>,
        /// Record at most once under this key.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct TimelineArgs {
    pub system: String,
    /// Keep printing new events as they happen.
    #[arg(long, short)]
    pub follow: bool,
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
    /// Comma-separated kinds; `system.*` for a namespace.
    #[arg(long)]
    pub kind: Option<String>,
    /// Minimum severity.
    #[arg(long)]
    pub severity: Option<String>,
    /// Text search.
    #[arg(long, short)]
    pub q: Option<String>,
}

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    pub json: bool,
}

impl Client {
    pub fn new(args: &ClientArgs) -> Result<Client> {
        let base = args.url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("--url must start with http:// or https://, got {base:?}");
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("aramaki-cli/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            base,
            token: args.token.clone(),
            http,
            json: args.json,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Result<(StatusCode, Value)> {
        let url = format!("{}/api/v1{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_client_error() || status.is_server_error() {
            let detail = value
                .get("detail")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| value.to_string());
            let hint = if status == StatusCode::UNAUTHORIZED && self.token.is_none() {
                " (set ARAMAKI_TOKEN or --token)"
            } else {
                ""
            };
            bail!(
                "{} {}: {detail}{hint}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
        }
        Ok((status, value))
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        Ok(self.call(Method::GET, path, None, &[]).await?.1)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value> {
        Ok(self.call(Method::POST, path, Some(body), &[]).await?.1)
    }

    pub async fn put(&self, path: &str, body: Value) -> Result<Value> {
        Ok(self.call(Method::PUT, path, Some(body), &[]).await?.1)
    }

    pub async fn delete(&self, path: &str) -> Result<()> {
        self.call(Method::DELETE, path, None, &[]).await?;
        Ok(())
    }

    pub fn print_json(&self, v: &Value) -> Result<()> {
        println!("{}", serde_json::to_string_pretty(v)?);
        Ok(())
    }
}

pub fn label_map(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow!("label {p:?} must be key=value"))
        })
        .collect()
}

fn parse_link(s: &str) -> Result<Value> {
    let parts: Vec<&str> = s.splitn(3, '|').collect();
    match parts.as_slice() {
        [kind, title, url] => {
            Ok(json!({"kind": kind.trim(), "title": title.trim(), "url": url.trim()}))
        }
        _ => bail!("link {s:?} must be kind|title|url"),
    }
}

fn parse_contact(s: &str) -> Result<Value> {
    let parts: Vec<&str> = s.split('|').collect();
    let order = |p: Option<&&str>| -> Result<u32> {
        p.map(|v| {
            v.trim()
                .parse::<u32>()
                .map_err(|_| anyhow!("escalation order in {s:?} must be a number"))
        })
        .unwrap_or(Ok(1))
    };
    match parts.as_slice() {
        [name, rest @ ..] if !name.trim().is_empty() && rest.len() <= 3 => Ok(json!({
            "name": name.trim(),
            "role": rest.first().map(|r| r.trim()).unwrap_or(""),
            "reach": rest.get(1).map(|r| r.trim()).unwrap_or(""),
            "escalation": order(rest.get(2))?,
        })),
        _ => bail!("contact {s:?} must be name|role|how to reach|order"),
    }
}

fn read_file(path: &Option<std::path::PathBuf>) -> Result<Option<String>> {
    path.as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display())))
        .transpose()
}

pub fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn labels_text(v: &Value) -> String {
    v.get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// Prints rows as aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(headers.iter().map(|h| h.to_uppercase()).collect());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.clone()));
        out.push('\n');
    }
    out
}

fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let encoded: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if encoded.is_empty() {
        String::new()
    } else {
        format!("?{}", encoded.join("&"))
    }
}

/// Percent-encodes a query or path component.
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub async fn system(client: &Client, cmd: SystemCommand) -> Result<()> {
    match cmd {
        SystemCommand::Add {
            slug,
            title,
            category,
            description,
            handbook_file,
            labels,
            selector,
            links,
            contacts,
        } => {
            let mut body = json!({"slug": slug, "title": title, "category": category, "labels": label_map(&labels)?});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(h) = read_file(&handbook_file)? {
                body["handbook"] = json!(h);
            }
            if let Some(sel) = selector {
                body["selector"] = json!(sel);
            }
            body["links"] =
                Value::Array(links.iter().map(|l| parse_link(l)).collect::<Result<_>>()?);
            body["contacts"] = Value::Array(
                contacts
                    .iter()
                    .map(|c| parse_contact(c))
                    .collect::<Result<_>>()?,
            );
            let (_, v) = client
                .call(Method::POST, "/systems", Some(body), &[])
                .await?;
            if client.json {
                client.print_json(&v)
            } else {
                println!("created {}", s(&v, "slug"));
                Ok(())
            }
        }
        SystemCommand::List { category, label, q } => {
            let mut items = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let qs = query_string(&[
                    ("category", category.clone()),
                    ("label", label.clone()),
                    ("q", q.clone()),
                    ("cursor", cursor.clone()),
                ]);
                let page = client.get(&format!("/systems{qs}")).await?;
                items.extend(
                    page.get("items")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                );
                cursor = page.get("next").and_then(Value::as_str).map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
            if client.json {
                return client.print_json(&Value::Array(items));
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|v| {
                    vec![
                        s(v, "slug"),
                        s(v, "category"),
                        s(v, "title"),
                        labels_text(v),
                        s(v, "selector"),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["slug", "category", "title", "labels", "selector"], &rows)
            );
            Ok(())
        }
        SystemCommand::Show { slug } => {
            let path = format!("/systems/{}", encode(&slug));
            let v = client.get(&path).await?;
            let subs = client.get(&format!("{path}/subsystems")).await?;
            let ups = client.get(&format!("{path}/includers")).await?;
            if client.json {
                return client.print_json(
                    &json!({"system": v, "subsystems": subs["items"], "includers": ups["items"]}),
                );
            }
            println!(
                "{} — {} ({})",
                s(&v, "slug"),
                s(&v, "title"),
                s(&v, "category")
            );
            if !labels_text(&v).is_empty() {
                println!("labels:    {}", labels_text(&v));
            }
            if !s(&v, "selector").is_empty() {
                println!("selector:  {}", s(&v, "selector"));
            }
            let list = |v: &Value| -> String {
                v.get("items")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .map(|m| format!("{} ({})", s(m, "slug"), s(m, "via")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            println!("includes:  {}", list(&subs));
            println!("included by: {}", list(&ups));
            for c in v
                .get("contacts")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!(
                    "contact {}: {} — {} — {}",
                    s(c, "escalation"),
                    s(c, "name"),
                    s(c, "role"),
                    s(c, "reach")
                );
            }
            for l in v
                .get("links")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                println!("link [{}] {}: {}", s(l, "kind"), s(l, "title"), s(l, "url"));
            }
            if !s(&v, "description").is_empty() {
                println!("\n{}", s(&v, "description"));
            }
            if !s(&v, "handbook").is_empty() {
                println!("\nHandbook:\n{}", s(&v, "handbook"));
            }
            Ok(())
        }
        SystemCommand::Edit {
            slug,
            new_slug,
            title,
            category,
            description,
            handbook_file,
            labels,
            remove_labels,
            selector,
            no_selector,
        } => {
            let path = format!("/systems/{}", encode(&slug));
            let mut patch = serde_json::Map::new();
            if let Some(v) = new_slug {
                patch.insert("slug".into(), json!(v));
            }
            if let Some(v) = title {
                patch.insert("title".into(), json!(v));
            }
            if let Some(v) = category {
                patch.insert("category".into(), json!(v));
            }
            if let Some(v) = description {
                patch.insert("description".into(), json!(v));
            }
            if let Some(v) = read_file(&handbook_file)? {
                patch.insert("handbook".into(), json!(v));
            }
            if let Some(v) = selector {
                patch.insert("selector".into(), json!(v));
            }
            if no_selector {
                patch.insert("selector".into(), Value::Null);
            }
            if !labels.is_empty() || !remove_labels.is_empty() {
                let current = client.get(&path).await?;
                let mut map: BTreeMap<String, String> =
                    serde_json::from_value(current["labels"].clone()).unwrap_or_default();
                map.extend(label_map(&labels)?);
                for k in &remove_labels {
                    map.remove(k);
                }
                patch.insert("labels".into(), json!(map));
            }
            if patch.is_empty() {
                bail!("nothing to change: give at least one option such as --title");
            }
            let (_, v) = client
                .call(Method::PATCH, &path, Some(Value::Object(patch)), &[])
                .await?;
            if client.json {
                client.print_json(&v)
            } else {
                println!("updated {} (version {})", s(&v, "slug"), s(&v, "version"));
                Ok(())
            }
        }
        SystemCommand::Include { parent, child } => {
            let (status, v) = client
                .call(
                    Method::POST,
                    &format!("/systems/{}/subsystems", encode(&parent)),
                    Some(json!({"slug": child})),
                    &[],
                )
                .await?;
            if client.json {
                return client.print_json(&v);
            }
            if status == StatusCode::CREATED {
                println!("{parent} now includes {child}");
            } else {
                println!("{parent} already includes {child}");
            }
            Ok(())
        }
        SystemCommand::Exclude { parent, child } => {
            client
                .call(
                    Method::DELETE,
                    &format!("/systems/{}/subsystems/{}", encode(&parent), encode(&child)),
                    None,
                    &[],
                )
                .await?;
            if !client.json {
                println!("{parent} no longer includes {child}");
            }
            Ok(())
        }
        SystemCommand::Delete { slug, force } => {
            let qs = if force { "?force=true" } else { "" };
            client
                .call(
                    Method::DELETE,
                    &format!("/systems/{}{qs}", encode(&slug)),
                    None,
                    &[],
                )
                .await?;
            if !client.json {
                println!("deleted {slug}");
            }
            Ok(())
        }
        SystemCommand::Status { slug } => {
            let v = client
                .get(&format!("/systems/{}/status", encode(&slug)))
                .await?;
            if client.json {
                return client.print_json(&v);
            }
            let mut out = String::new();
            status_lines(&v, 0, &mut out);
            print!("{out}");
            Ok(())
        }
    }
}

fn status_lines(layer: &Value, depth: usize, out: &mut String) {
    let via = match s(layer, "via").as_str() {
        "selector" => " (by selector)",
        _ => "",
    };
    out.push_str(&format!(
        "{}{:<10} {}{via}  [worst below: {}]\n",
        "  ".repeat(depth),
        s(layer, "state"),
        s(layer, "slug"),
        s(layer, "worst")
    ));
    for src in layer
        .get("sources")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "{}  · {}: {} — {}\n",
            "  ".repeat(depth),
            s(src, "source"),
            s(src, "state"),
            s(src, "summary")
        ));
    }
    for sub in layer
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        status_lines(sub, depth + 1, out);
    }
}

pub async fn event(client: &Client, cmd: EventCommand) -> Result<()> {
    let EventCommand::Add {
        system,
        kind,
        title,
        severity,
        body,
        occurred_at,
        data,
        idempotency_key,
    } = cmd;
    let mut req = json!({"system": system, "kind": kind, "title": title, "severity": severity});
    if let Some(b) = body {
        req["body"] = json!(b);
    }
    if let Some(t) = occurred_at {
        req["occurred_at"] = json!(t);
    }
    if let Some(d) = data {
        req["data"] = serde_json::from_str(&d).context("--data must be a JSON object")?;
    }
    let headers: Vec<(&str, String)> = idempotency_key
        .into_iter()
        .map(|k| ("Idempotency-Key", k))
        .collect();
    let (status, v) = client
        .call(Method::POST, "/events", Some(req), &headers)
        .await?;
    if client.json {
        return client.print_json(&v);
    }
    if status == StatusCode::OK {
        println!("already recorded as {}", s(&v, "id"));
    } else {
        println!("recorded {}", s(&v, "id"));
    }
    Ok(())
}

fn event_line(e: &Value) -> String {
    let actor = e.get("actor").map(|a| s(a, "name")).unwrap_or_default();
    format!(
        "{}  {:<8} {:<14} {:<18} {} — {}",
        s(e, "occurred_at"),
        s(e, "severity"),
        s(e, "system"),
        s(e, "kind"),
        s(e, "title"),
        actor
    )
}

pub async fn timeline(client: &Client, args: TimelineArgs) -> Result<()> {
    let path = format!("/systems/{}/timeline", encode(&args.system));
    let qs = query_string(&[
        ("limit", Some(args.limit.to_string())),
        ("kind", args.kind.clone()),
        ("severity", args.severity.clone()),
        ("q", args.q.clone()),
    ]);
    let page = client.get(&format!("{path}{qs}")).await?;
    let mut items = page
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    items.reverse();
    let mut stdout = std::io::stdout();
    for e in &items {
        if client.json {
            writeln!(stdout, "{e}")?;
        } else {
            writeln!(stdout, "{}", event_line(e))?;
        }
    }
    if !args.follow {
        return Ok(());
    }
    let qs = query_string(&[
        ("kind", args.kind.clone()),
        ("severity", args.severity.clone()),
        ("q", args.q.clone()),
    ]);
    follow(client, &format!("{path}/stream{qs}")).await
}

/// Prints the live tail, resuming after the last seen event on reconnect.
async fn follow(client: &Client, path: &str) -> Result<()> {
    use futures_util::StreamExt;
    let url = format!("{}/api/v1{}", client.base, path);
    let mut last: Option<String> = None;
    loop {
        let mut req = client.http.get(&url).header("Accept", "text/event-stream");
        if let Some(t) = &client.token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = &last {
            req = req.header("Last-Event-ID", id);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach {}", client.base))?;
        if !resp.status().is_success() {
            bail!(
                "{}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(d) = line.strip_prefix("data:") {
                        data.push_str(d.trim_start());
                    }
                    if let Some(id) = line.strip_prefix("id:") {
                        last = Some(id.trim().to_owned());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let e: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                if client.json {
                    println!("{e}");
                } else {
                    println!("{}", event_line(&e));
                }
            }
        }
        eprintln!("stream closed; reconnecting");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["slug", "title"],
            &[
                vec!["a".into(), "Alpha".into()],
                vec!["long-slug".into(), "B".into()],
            ],
        );
        assert_eq!(t, "SLUG       TITLE\na          Alpha\nlong-slug  B\n");
    }

    #[test]
    fn links_and_contacts_parse() {
        assert_eq!(
            parse_link("dashboard|Grafana|https://g.example/d").unwrap()["kind"],
            "dashboard"
        );
        assert!(parse_link("Grafana https://x").is_err());
        let c = parse_contact("Ada|on-call|+49 30 1234|2").unwrap();
        assert_eq!(c["escalation"], 2);
        assert!(parse_contact("Ada|x|y|first").is_err());
        assert_eq!(encode("a b/ä"), "a%20b%2F%C3%A4");
    }
}
