//! Federation scenario: two server processes peered over one link on
//! loopback; the consumer uses a system of the provider. Activity is
//! recorded on the provider at a fixed rate, and its arrival is watched on
//! the consumer's live timeline stream: propagation latency (from just
//! before the provider's API call to the event on the consumer's stream)
//! and, unpaced, throughput.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use aramaki::context::SystemClock;
use serde_json::{json, Value};

use super::{free_port, percentile, start_server_named, Server};

/// A prepared instance: name, port, admin token.
struct Node {
    base: String,
    token: String,
    _server: Server,
}

async fn prepare(
    dir: &Path,
    name: &str,
    port: u16,
    database_url: &Option<String>,
) -> Result<String> {
    let mut config = super::config(database_url.clone());
    config.instance.name = name.to_owned();
    config.instance.url = Some(format!("http://127.0.0.1:{port}"));
    config.federation.auto_approve = true;
    let setup = aramaki::setup::init(dir, config, Arc::new(SystemClock)).await?;
    let token = setup
        .first_admin
        .context("fresh data directory expected")?
        .token
        .expose()
        .to_owned();
    setup.context.db.close().await;
    Ok(token)
}

async fn node(dir: &Path, name: &str, tls: bool, database_url: &Option<String>) -> Result<Node> {
    let port = free_port()?;
    let token = prepare(dir, name, port, database_url).await?;
    let listen = if tls {
        Some(format!("127.0.0.1:{}", free_port()?))
    } else {
        None
    };
    let (server, base) =
        start_server_named(dir, database_url, port, name, listen.as_deref()).await?;
    Ok(Node {
        base,
        token,
        _server: server,
    })
}

async fn call(
    http: &reqwest::Client,
    n: &Node,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> Result<Value> {
    let r = http
        .request(method, format!("{}/api/v1{path}", n.base))
        .bearer_auth(&n.token)
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("{path}: {} {}", r.status(), r.text().await?);
    }
    let text = r.text().await?;
    Ok(if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)?
    })
}

/// Arrival times of events on the consumer's stream, by title.
type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// Follows `slug`'s live timeline on `n`, noting when each title arrives.
async fn watch(n: &Node, slug: &str) -> Result<Arrivals> {
    let arrivals: Arrivals = Arc::default();
    let mut resp = reqwest::Client::new()
        .get(format!("{}/api/v1/systems/{slug}/timeline/stream", n.base))
        .bearer_auth(&n.token)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("stream: {}", resp.status());
    }
    let out = arrivals.clone();
    tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            let at = Instant::now();
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find('\n') {
                let line: String = buffer.drain(..=end).collect();
                let Some(data) = line.trim_end().strip_prefix("data:") else {
                    continue;
                };
                if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                    if let Some(t) = v["title"].as_str() {
                        if let Ok(mut map) = out.lock() {
                            map.insert(t.to_owned(), at);
                        }
                    }
                }
            }
        }
    });
    Ok(arrivals)
}

/// Records `total` events on the provider in batches of `batch`, one batch
/// every `every` (or as fast as it goes); returns when each was sent.
async fn drive(
    http: &reqwest::Client,
    provider: &Node,
    prefix: &str,
    total: usize,
    batch: usize,
    every: Option<Duration>,
) -> Result<Vec<(String, Instant)>> {
    let mut sent = Vec::with_capacity(total);
    let mut tick = every.map(tokio::time::interval);
    let mut i = 0;
    while i < total {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let n = batch.min(total - i);
        let titles: Vec<String> = (i..i + n).map(|k| format!("{prefix} {k}")).collect();
        let events: Vec<Value> = titles
            .iter()
            .map(|t| json!({"system": "storage", "kind": "deploy", "title": t}))
            .collect();
        let at = Instant::now();
        call(
            http,
            provider,
            reqwest::Method::POST,
            "/events/batch",
            json!({"events": events}),
        )
        .await?;
        sent.extend(titles.into_iter().map(|t| (t, at)));
        i += n;
    }
    Ok(sent)
}

/// Waits until every title arrived (or a minute passed); returns latencies.
async fn latencies(
    arrivals: &Arrivals,
    sent: &[(String, Instant)],
) -> Result<(Vec<Duration>, Instant)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = arrivals
            .lock()
            .map(|m| sent.iter().all(|(t, _)| m.contains_key(t)))
            .unwrap_or(false);
        if done {
            break;
        }
        if Instant::now() > deadline {
            let got = arrivals.lock().map(|m| m.len()).unwrap_or(0);
            bail!(
                "only {got} of {} activities arrived within a minute",
                sent.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let map = arrivals.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let mut out = Vec::with_capacity(sent.len());
    let mut last = sent.first().map(|(_, t)| *t).unwrap_or_else(Instant::now);
    for (title, at) in sent {
        if let Some(arrived) = map.get(title) {
            out.push(arrived.saturating_duration_since(*at));
            last = last.max(*arrived);
        }
    }
    out.sort();
    Ok((out, last))
}

pub async fn scenario(
    (rate, seconds, burst): (usize, u64, usize),
    tls: bool,
    database_url: Option<String>,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (pdir, cdir) = (dir.path().join("provider"), dir.path().join("consumer"));
    let provider = node(&pdir, "provider", tls, &database_url).await?;
    let consumer = node(&cdir, "consumer", tls, &database_url).await?;
    let http = reqwest::Client::new();
    use reqwest::Method;
    let invite = call(&http, &provider, Method::POST, "/peers/invites", json!({})).await?;
    call(
        &http,
        &consumer,
        Method::POST,
        "/peers/join",
        json!({"invite": invite["invite"]}),
    )
    .await?;
    if tls {
        let peers = call(&http, &provider, Method::GET, "/peers", json!(null)).await?;
        if peers["items"][0]["tls_pinned"] != true {
            bail!("the peers did not pin TLS: {peers}");
        }
    }
    println!(
        "link: {}",
        if tls {
            "wss:// with the instance key pinned"
        } else {
            "plain ws:// on loopback"
        }
    );
    call(
        &http,
        &provider,
        Method::POST,
        "/systems",
        json!({"slug": "storage", "title": "Storage", "category": "infrastructure"}),
    )
    .await?;
    call(
        &http,
        &provider,
        Method::PUT,
        "/peers/consumer/policies",
        json!({"system": "storage", "level": "timeline"}),
    )
    .await?;
    call(
        &http,
        &consumer,
        Method::POST,
        "/peers/provider/uses",
        json!({"system": "storage"}),
    )
    .await?;
    let started = Instant::now();
    loop {
        let r = http
            .get(format!("{}/api/v1/systems/storage", consumer.base))
            .bearer_auth(&consumer.token)
            .send()
            .await?;
        if r.status().is_success() {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the consumer never mirrored storage");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrivals = watch(&consumer, "storage").await?;
    // Warm-up: the link and both databases.
    let warm = drive(
        &http,
        &provider,
        "warm",
        200,
        10,
        Some(Duration::from_millis(10)),
    )
    .await?;
    latencies(&arrivals, &warm).await?;

    // Paced: `rate` activities/s in batches of 10 every 10 ms (or fewer).
    let total = rate * seconds as usize;
    let batch = (rate / 100).max(1);
    let every = Duration::from_secs_f64(batch as f64 / rate as f64);
    let t0 = Instant::now();
    let sent = drive(&http, &provider, "paced", total, batch, Some(every)).await?;
    let offered = total as f64 / t0.elapsed().as_secs_f64();
    let (lat, _) = latencies(&arrivals, &sent).await?;
    println!(
        "paced: {total} activities at {offered:.0}/s offered: propagation p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );

    // Unpaced: as fast as the provider takes them, batches of 100.
    let t0 = Instant::now();
    let sent = drive(&http, &provider, "burst", burst, 100, None).await?;
    let (lat, last) = latencies(&arrivals, &sent).await?;
    let elapsed = last.saturating_duration_since(t0).as_secs_f64();
    println!(
        "unpaced: {burst} activities delivered in {elapsed:.2} s = {:.0} activities/s over one link (p50 {:.0} ms, p99 {:.0} ms)",
        burst as f64 / elapsed,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    Ok(())
}
