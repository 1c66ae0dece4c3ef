//! Load and latency scenarios against a real Aramaki server process.
//!
//! The server runs in a child process (this binary re-executed as `serve`,
//! which runs the same `App` as `aramaki server`), and is driven over real
//! HTTP on loopback. Figures go to stdout; record them in BENCHMARKS.md.

mod agents;
mod federation;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use aramaki::config::Config;
use aramaki::context::SystemClock;
use aramaki::systems::model::{CategoryName, Slug};
use aramaki::systems::{self, NewSystem};
use aramaki::timeline::{self, Actor, Kind, NewEvent, Target};
use aramaki_protocol::Severity;
use clap::{Parser, Subcommand};
use jiff::{SignedDuration, Timestamp};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "aramaki-bench",
    about = "Load and latency scenarios for Aramaki"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// A system with 50 transitive subsystems and many events: timeline page
    /// latency (newest 50, filtered) and event recording throughput.
    Timeline {
        /// Events to seed before measuring.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Timeline requests per measured page kind.
        #[arg(long, default_value_t = 500)]
        requests: usize,
        /// Events to record through the API.
        #[arg(long, default_value_t = 20_000)]
        record: usize,
        /// Concurrent API clients while recording.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Database URL (default: SQLite in a temporary data directory).
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Results per second ingested from simulated agents over WebSockets.
    Results {
        #[arg(long, default_value_t = 50)]
        agents: usize,
        #[arg(long, default_value_t = 200_000)]
        results: u64,
        /// Records per message (the agent sends up to 500).
        #[arg(long, default_value_t = 100)]
        batch: u64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Many agents connected at once, heartbeating; server memory.
    Connections {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Seconds to hold the connections.
        #[arg(long, default_value_t = 60)]
        hold: u64,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// The real agent's binary size, memory and CPU, idle and with checks.
    AgentFootprint {
        #[arg(long, default_value_t = 50)]
        checks: usize,
        #[arg(long, default_value_t = 10)]
        interval: u32,
        /// Seconds measured per phase.
        #[arg(long, default_value_t = 60)]
        duration: u64,
    },
    /// Two instances over one peer link: activity propagation latency at a
    /// fixed rate, and throughput unpaced.
    Federation {
        /// Activities per second in the paced phase.
        #[arg(long, default_value_t = 1_000)]
        rate: usize,
        /// Seconds of the paced phase.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Activities in the unpaced phase.
        #[arg(long, default_value_t = 20_000)]
        burst: usize,
        /// Link over TLS with the instance key pinned (`federation.listen`).
        #[arg(long)]
        tls: bool,
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Internal: run the server on a prepared data directory.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        database_url: Option<String>,
    },
}

fn config(database_url: Option<String>) -> Config {
    let mut c = Config::default();
    c.database.url = database_url;
    c.log.filter = "warn".into();
    // Every simulated agent connects from 127.0.0.1: lift the per-source
    // and long-lived caps (the open-file limit still applies).
    c.web.max_connections = 16_384;
    c.web.max_long_lived_connections = Some(16_000);
    c.web.max_long_lived_per_source = 16_000;
    c
}

/// root → 10 groups → 4 leaves each: 50 transitive subsystems.
async fn seed(dir: &Path, database_url: Option<String>, events: usize) -> Result<String> {
    let setup = aramaki::setup::init(dir, config(database_url), Arc::new(SystemClock)).await?;
    let ctx = setup.context;
    let token = setup
        .first_admin
        .context("fresh data directory expected")?
        .token
        .expose()
        .to_owned();
    let actor = Actor::user("bench", "Bench");
    let new = |slug: String, category: &str| -> Result<NewSystem> {
        Ok(NewSystem::new(
            Slug::try_from(slug.clone()).map_err(anyhow::Error::msg)?,
            &slug,
            CategoryName::try_from(category.to_owned()).map_err(anyhow::Error::msg)?,
        ))
    };
    let mut targets =
        vec![systems::create(&ctx, &actor, new("root".into(), "infrastructure")?).await?];
    for g in 0..10 {
        let group =
            systems::create(&ctx, &actor, new(format!("group-{g}"), "infrastructure")?).await?;
        systems::include(&ctx, &actor, "root", group.slug.as_str()).await?;
        for l in 0..4 {
            let leaf = systems::create(&ctx, &actor, new(format!("host-{g}-{l}"), "host")?).await?;
            systems::include(&ctx, &actor, group.slug.as_str(), leaf.slug.as_str()).await?;
            targets.push(leaf);
        }
        targets.push(group);
    }
    let (_, closure) = systems::closure(
        &ctx,
        "root",
        &aramaki::users::access::Access::public_reader(),
    )
    .await?;
    if closure.len() != 51 {
        bail!("expected root plus 50 subsystems, got {}", closure.len());
    }
    let started = Instant::now();
    let span = SignedDuration::from_hours(24 * 30);
    let origin = Timestamp::now().checked_sub(span)?;
    let step = span.as_micros() / events.max(1) as i128;
    let kinds = ["note", "deploy", "state", "ci.pipeline", "note"];
    let mut rng = Lcg(0x5eed);
    let mut done = 0;
    while done < events {
        let mut tx = ctx.db.begin().await?;
        for _ in 0..10_000.min(events - done) {
            let target = &targets[(rng.next() % targets.len() as u64) as usize];
            let kind = kinds[(rng.next() % kinds.len() as u64) as usize];
            let severity = match rng.next() % 100 {
                0..=1 => Severity::Critical,
                2..=9 => Severity::Warning,
                10..=39 => Severity::Ok,
                _ if kind == "state" => Severity::Ok,
                _ => Severity::Info,
            };
            let at =
                origin.checked_add(SignedDuration::from_micros((step * done as i128) as i64))?;
            let (id, slug) = (target.id.to_string(), target.slug.to_string());
            let e = NewEvent {
                kind: Kind::try_from(kind.to_owned()).map_err(anyhow::Error::msg)?,
                severity,
                title: format!("{kind} number {done} on {slug}"),
                body: String::new(),
                occurred_at: Some(at),
                data: json!({"n": done}),
                caused_by: None,
                idempotency: None,
            };
            timeline::append(
                &ctx,
                &mut tx,
                &actor,
                Target {
                    id: &id,
                    slug: &slug,
                },
                e,
            )
            .await?;
            done += 1;
        }
        tx.commit().await?;
    }
    println!(
        "seeded {events} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    ctx.db.close().await;
    Ok(token)
}

/// A tiny deterministic generator: the same data every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_server(
    dir: &Path,
    database_url: &Option<String>,
    port: u16,
) -> Result<(Server, String)> {
    start_server_named(dir, database_url, port, "", None).await
}

/// Starts a server; a non-empty `name` makes it a federating instance
/// reachable at its port (peers joining it are approved at once).
async fn start_server_named(
    dir: &Path,
    database_url: &Option<String>,
    port: u16,
    name: &str,
    federation_listen: Option<&str>,
) -> Result<(Server, String)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .env("ARAMAKI_BENCH_NAME", name)
        .env("ARAMAKI_BENCH_PORT", port.to_string());
    if let Some(listen) = federation_listen {
        cmd.env("ARAMAKI_BENCH_FEDERATION_LISTEN", listen);
    }
    if let Some(url) = database_url {
        cmd.arg("--database-url").arg(url);
    }
    let server = Server(cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn()?);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http
            .get(format!("{base}/api/v1/health"))
            .send()
            .await
            .is_ok()
        {
            return Ok((server, base));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the server did not come up on {base}")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn latency(
    http: &reqwest::Client,
    token: &str,
    url: &str,
    n: usize,
) -> Result<(f64, f64, usize)> {
    let mut times = Vec::with_capacity(n);
    let mut items = 0;
    for _ in 0..n {
        let t = Instant::now();
        let resp = http.get(url).bearer_auth(token).send().await?;
        if !resp.status().is_success() {
            bail!("{url}: {}", resp.status());
        }
        let body: serde_json::Value = resp.json().await?;
        times.push(t.elapsed());
        items = body["items"].as_array().map(Vec::len).unwrap_or(0);
    }
    times.sort();
    Ok((percentile(&times, 0.5), percentile(&times, 0.99), items))
}

async fn record(base: &str, token: &str, total: usize, clients: usize) -> Result<(f64, f64, f64)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, token) = (
            http.clone(),
            format!("{base}/api/v1/events"),
            token.to_owned(),
        );
        let share = total / clients + usize::from(c < total % clients);
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::with_capacity(share);
            for i in 0..share {
                let t = Instant::now();
                let body = json!({"system": format!("host-{}-{}", c % 10, i % 4), "kind": "deploy", "title": format!("deploy {c}/{i}")});
                let resp = http.post(&url).bearer_auth(&token).json(&body).send().await?;
                if resp.status() != reqwest::StatusCode::CREATED {
                    bail!("recording failed: {}", resp.status());
                }
                times.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(times)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Ok((
        total as f64 / elapsed,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    ))
}

/// Records `total` events in batches of `size` through `POST /api/v1/events/batch`.
async fn record_bulk(
    base: &str,
    token: &str,
    total: usize,
    size: usize,
    clients: usize,
) -> Result<f64> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let batches = total.div_ceil(size);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, token) = (
            http.clone(),
            format!("{base}/api/v1/events/batch"),
            token.to_owned(),
        );
        let mine: Vec<usize> = (0..batches).filter(|b| b % clients == c).collect();
        tasks.push(tokio::spawn(async move {
            for b in mine {
                let events: Vec<serde_json::Value> = (0..size)
                    .map(|i| json!({"system": format!("host-{}-{}", b % 10, i % 4), "kind": "ci.pipeline", "title": format!("bulk {b}/{i}")}))
                    .collect();
                let resp = http.post(&url).bearer_auth(&token).json(&json!({"events": events})).send().await?;
                if resp.status() != reqwest::StatusCode::CREATED {
                    bail!("bulk recording failed: {}", resp.status());
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((batches * size) as f64 / started.elapsed().as_secs_f64())
}

async fn timeline_scenario(
    events: usize,
    requests: usize,
    total: usize,
    clients: usize,
    database_url: Option<String>,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    println!(
        "scenario timeline: root with 50 transitive subsystems, {events} events, backend {}",
        if database_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    let token = seed(dir.path(), database_url.clone(), events).await?;
    let (_server, base) = start_server(dir.path(), &database_url, free_port()?).await?;
    let http = reqwest::Client::new();
    let pages = [
        (
            "newest 50",
            format!("{base}/api/v1/systems/root/timeline?limit=50"),
        ),
        (
            "filtered: severity>=critical",
            format!("{base}/api/v1/systems/root/timeline?limit=50&severity=critical"),
        ),
        (
            "filtered: kind=deploy,state & severity>=warning",
            format!(
                "{base}/api/v1/systems/root/timeline?limit=50&kind=deploy,state&severity=warning"
            ),
        ),
        (
            "subsystem group-3 newest 50",
            format!("{base}/api/v1/systems/group-3/timeline?limit=50"),
        ),
    ];
    for (name, url) in &pages {
        latency(&http, &token, url, 20).await?; // warm-up
        let (p50, p99, items) = latency(&http, &token, url, requests).await?;
        println!("timeline page {name:<48} p50 {p50:7.2} ms   p99 {p99:7.2} ms   ({items} items, {requests} requests)");
    }
    let (rate, p50, p99) = record(&base, &token, total, clients).await?;
    println!("record events via POST /api/v1/events: {rate:8.0} events/s   p50 {p50:.2} ms   p99 {p99:.2} ms   ({total} events, {clients} clients)");
    let rate = record_bulk(&base, &token, total, 500, 4).await?;
    println!("record events via POST /api/v1/events/batch: {rate:8.0} events/s   ({total} events, batches of 500, 4 clients)");
    Ok(())
}

async fn serve(data_dir: PathBuf, database_url: Option<String>) -> Result<()> {
    let port: u16 = std::env::var("ARAMAKI_BENCH_PORT")?.parse()?;
    let mut config = config(database_url);
    if let Some(name) = std::env::var("ARAMAKI_BENCH_NAME")
        .ok()
        .filter(|n| !n.is_empty())
    {
        config.instance.name = name;
        config.instance.url = Some(format!("http://127.0.0.1:{port}"));
        config.federation.auto_approve = true;
    }
    if let Ok(listen) = std::env::var("ARAMAKI_BENCH_FEDERATION_LISTEN") {
        config.federation.listen = Some(listen);
    }
    let setup = aramaki::setup::init(&data_dir, config, Arc::new(SystemClock)).await?;
    let app = aramaki::app::App::build(setup.context, ([127, 0, 0, 1], port).into()).await?;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    app.run(rx).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::Timeline {
            events,
            requests,
            record,
            clients,
            database_url,
        } => timeline_scenario(events, requests, record, clients.max(1), database_url).await,
        Scenario::Results {
            agents: n,
            results,
            batch,
            database_url,
        } => agents::results(n.max(1), results, batch.max(1), database_url).await,
        Scenario::Connections {
            agents: n,
            hold,
            database_url,
        } => agents::connections(n.max(1), hold, database_url).await,
        Scenario::Federation {
            rate,
            seconds,
            burst,
            tls,
            database_url,
        } => {
            let phases = (rate.max(1), seconds.max(1), burst.max(1));
            federation::scenario(phases, tls, database_url).await
        }
        Scenario::AgentFootprint {
            checks,
            interval,
            duration,
        } => agents::footprint(checks, interval.max(1), duration.max(1)).await,
        Scenario::Serve {
            data_dir,
            database_url,
        } => serve(data_dir, database_url).await,
    }
}
