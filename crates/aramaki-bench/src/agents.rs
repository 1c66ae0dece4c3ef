//! Agent scenarios: results ingested over real WebSockets from simulated
//! agents (which speak the protocol through the real agent's session code),
//! many connected agents with heartbeats, and the real agent's footprint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use aramaki_agent::session::{self, Channel, Credentials};
use aramaki_protocol::agent::{
    AgentMessage, CheckResult, EnrollToken, Record, RecordBody, ServerMessage,
};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde_json::{json, Value};

use super::{free_port, start_server, Server};

/// One simulated agent's identity.
struct Identity {
    id: String,
    key: SigningKey,
    server_key: VerifyingKey,
}

async fn api(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    path: &str,
    body: Value,
) -> Result<Value> {
    let r = http
        .post(format!("{base}/api/v1{path}"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("POST {path}: {} {}", r.status(), r.text().await?);
    }
    Ok(r.json().await?)
}

fn seed_key(i: usize) -> SigningKey {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    seed[31] = 0xa5;
    SigningKey::from_bytes(&seed)
}

/// Enrolls `n` agents with one reusable token, 64 at a time.
async fn enroll_many(base: &str, token: &str, n: usize) -> Result<Vec<Identity>> {
    let http = reqwest::Client::new();
    let v = api(
        &http,
        base,
        token,
        "/agents/tokens",
        json!({"system": "aramaki", "reusable": true, "ttl": "1h"}),
    )
    .await?;
    let enroll_token = EnrollToken::parse(v["token"].as_str().unwrap_or(""))
        .context("the server issued no enrollment token")?;
    let url = session::socket_url(base, false)?;
    let started = Instant::now();
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let (url, t) = (url.clone(), enroll_token.clone());
            tasks.push(tokio::spawn(async move {
                let key = seed_key(i);
                let (id, _, server_key) =
                    session::register(&url, &t, &key, &format!("sim-{i:05}")).await?;
                Ok::<_, anyhow::Error>(Identity {
                    id,
                    key,
                    server_key,
                })
            }));
        }
        for t in tasks {
            out.push(t.await??);
        }
    }
    println!(
        "  enrolled {n} agents in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}

async fn connect(url: &str, who: &Identity) -> Result<(Channel, u64)> {
    let socket = session::open(url).await?;
    let (welcome, channel) = session::handshake(
        socket,
        &Credentials {
            agent_id: &who.id,
            key: &who.key,
            server_key: &who.server_key,
        },
        vec!["bench".into()],
        0,
    )
    .await?;
    Ok((channel, welcome.acked))
}

fn result(seq: u64, agent: usize) -> Record {
    // Mostly OK; every 500th result of a check flips to WARNING and back,
    // so state changes reach the timeline at a realistic rate.
    let check = seq % 20;
    let status = i32::from((seq / 20) % 500 == 499);
    Record {
        seq,
        body: RecordBody::Result(CheckResult {
            check: format!("check-{check:02}"),
            system: None,
            labels: BTreeMap::new(),
            status,
            output: format!(
                "CHECK {} - agent {agent} run {seq}|value={seq};80;90;0;100",
                if status == 0 { "OK" } else { "WARNING" }
            ),
            metrics: vec![],
            executed_at: jiff::Timestamp::now().as_microsecond(),
            duration_ms: 3,
            source: "check".into(),
        }),
    }
}

/// Sends `total` results in batches, one batch in flight, like the agent.
async fn stream(url: String, who: Identity, agent: usize, total: u64, batch: u64) -> Result<u64> {
    let (mut socket, acked) = connect(&url, &who).await?;
    let mut seq = acked;
    let end = acked + total;
    while seq < end {
        let upto = (seq + batch).min(end);
        let records = ((seq + 1)..=upto).map(|s| result(s, agent)).collect();
        socket.send(&AgentMessage::Records { records }).await?;
        loop {
            match socket.receive().await? {
                ServerMessage::Ack { up_to, .. } if up_to >= upto => break,
                _ => continue,
            }
        }
        seq = upto;
    }
    Ok(total)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let u: u64 = fields.get(11)?.parse().ok()?;
            let st: u64 = fields.get(12)?.parse().ok()?;
            Some(u + st)
        })
        .unwrap_or(0)
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Lets this process (and the server it starts) hold many sockets.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

async fn server(
    database_url: &Option<String>,
) -> Result<(tempfile::TempDir, Server, String, String)> {
    let dir = tempfile::tempdir()?;
    let token = super::seed(dir.path(), database_url.clone(), 0).await?;
    let (server, base) = start_server(dir.path(), database_url, free_port()?).await?;
    Ok((dir, server, base, token))
}

/// Scenario (a): results per second from `agents` simulated agents.
pub async fn results(
    agents: usize,
    total: u64,
    batch: u64,
    database_url: Option<String>,
) -> Result<()> {
    println!(
        "scenario results: {agents} agents over WebSockets, {total} results in batches of {batch}, backend {}",
        if database_url.is_some() { "postgres" } else { "sqlite" }
    );
    let (_dir, srv, base, token) = server(&database_url).await?;
    let ids = enroll_many(&base, &token, agents).await?;
    let url = session::socket_url(&base, false)?;
    let per = total / agents as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, who) in ids.into_iter().enumerate() {
        tasks.push(tokio::spawn(stream(url.clone(), who, i, per, batch)));
    }
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "  ingested {sent} results in {secs:.1} s: {:.0} results/s (each committed and acknowledged); server RSS {} MiB",
        sent as f64 / secs,
        rss_kib(srv.0.id()) / 1024
    );
    Ok(())
}

/// Scenario (b): `agents` connected at once, heartbeating.
pub async fn connections(agents: usize, hold: u64, database_url: Option<String>) -> Result<()> {
    raise_fd_limit();
    println!("scenario connections: {agents} agents connected with heartbeats, held {hold} s");
    let (_dir, srv, base, token) = server(&database_url).await?;
    let before = rss_kib(srv.0.id());
    let ids = enroll_many(&base, &token, agents).await?;
    let url = session::socket_url(&base, false)?;
    let started = Instant::now();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Result<()>>(agents);
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for chunk in ids.chunks(200) {
        let mut opened = Vec::new();
        for who in chunk {
            let url = url.clone();
            let who = Identity {
                id: who.id.clone(),
                key: who.key.clone(),
                server_key: who.server_key,
            };
            opened.push(tokio::spawn(async move { connect(&url, &who).await }));
        }
        for o in opened {
            let (socket, _) = o.await??;
            let (tx, stop) = (done_tx.clone(), stop.clone());
            tasks.push(tokio::spawn(heartbeat(socket, tx, stop)));
        }
    }
    println!(
        "  connected {agents} agents in {:.1} s; server RSS before {} MiB",
        started.elapsed().as_secs_f64(),
        before / 1024
    );
    let http = reqwest::Client::new();
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(hold);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(5)).await;
        peak = peak.max(rss_kib(srv.0.id()));
        if let Ok(Some(Err(e))) = tokio::time::timeout(Duration::ZERO, done_rx.recv()).await {
            bail!("an agent lost its session: {e}");
        }
    }
    let list: Value = http
        .get(format!("{base}/api/v1/agents"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let connected = list["items"]
        .as_array()
        .map(|a| a.iter().filter(|x| x["connected"] == true).count())
        .unwrap_or(0);
    println!(
        "  after {hold} s: {connected} of {agents} connected; server RSS peak {} MiB",
        peak / 1024
    );
    stop.notify_waiters();
    drop(tasks);
    Ok(())
}

async fn heartbeat(
    mut socket: Channel,
    done: tokio::sync::mpsc::Sender<Result<()>>,
    stop: std::sync::Arc<tokio::sync::Notify>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(20));
    tick.tick().await;
    let outcome = loop {
        tokio::select! {
            _ = stop.notified() => break Ok(()),
            _ = tick.tick() => {
                if let Err(e) = socket.send(&AgentMessage::Heartbeat { queue_depth: 0, dropped: 0 }).await {
                    break Err(e.into());
                }
            }
            m = socket.receive() => {
                if let Err(e) = m {
                    break Err(e.into());
                }
            }
        }
    };
    let _ = done.send(outcome).await;
}

fn agent_binary() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("aramaki-agent");
    if !path.exists() {
        bail!(
            "{} is missing: cargo build --release -p aramaki-agent",
            path.display()
        );
    }
    Ok(path)
}

/// Scenario (c): the real agent's binary size, memory and CPU.
pub async fn footprint(checks: usize, interval: u32, duration: u64) -> Result<()> {
    let binary = agent_binary()?;
    let size = std::fs::metadata(&binary)?.len();
    println!(
        "scenario agent-footprint: {} ({:.1} MB), {checks} checks every {interval} s, {duration} s per phase",
        binary.display(),
        size as f64 / 1e6
    );
    let (_dir, _srv, base, token) = server(&None).await?;
    let http = reqwest::Client::new();
    let v = api(
        &http,
        &base,
        &token,
        "/agents/tokens",
        json!({"system": "aramaki"}),
    )
    .await?;
    let state = tempfile::tempdir()?;
    let config = state.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "subscriptions = [\"footprint\"]\npush_http = \"127.0.0.1:{}\"\npush_tcp = \"127.0.0.1:{}\"\n",
            free_port()?,
            free_port()?
        ),
    )?;
    let status = Command::new(&binary)
        .args([
            "enroll",
            "--server",
            &base,
            "--name",
            "footprint",
            "--token",
        ])
        .arg(v["token"].as_str().unwrap_or(""))
        .arg("--state-dir")
        .arg(state.path().join("s"))
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("enrollment failed");
    }
    let child = Command::new(&binary)
        .args(["run", "--state-dir"])
        .arg(state.path().join("s"))
        .arg("--config")
        .arg(&config)
        .env("ARAMAKI_AGENT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let agent = Server(child);
    let pid = agent.0.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle_cpu, idle_rss) = measure(pid, duration).await;
    println!(
        "  idle (no checks): CPU {:.2} % of one core, RSS {:.1} MiB",
        idle_cpu,
        idle_rss as f64 / 1024.0
    );
    let program = if Path::new("/usr/lib/nagios/plugins/check_dummy").exists() {
        vec![
            "/usr/lib/nagios/plugins/check_dummy".to_owned(),
            "0".into(),
            "fine".into(),
        ]
    } else {
        vec!["/bin/true".to_owned()]
    };
    for i in 0..checks {
        api(
            &http,
            &base,
            &token,
            "/checks",
            json!({"name": format!("fp-{i:02}"), "command": program, "subscriptions": ["footprint"], "interval": interval}),
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(u64::from(interval))).await;
    let (busy_cpu, busy_rss) = measure(pid, duration).await;
    println!(
        "  {checks} checks every {interval} s: CPU {:.2} % of one core (the plugins' own CPU is not counted), RSS peak {:.1} MiB",
        busy_cpu,
        busy_rss as f64 / 1024.0
    );
    Ok(())
}

/// Average CPU % and peak RSS (KiB) of `pid` over `secs` seconds.
async fn measure(pid: u32, secs: u64) -> (f64, u64) {
    let t0 = cpu_ticks(pid);
    let started = Instant::now();
    let mut peak = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ticks = cpu_ticks(pid).saturating_sub(t0) as f64;
    (
        100.0 * ticks / ticks_per_sec() / started.elapsed().as_secs_f64(),
        peak,
    )
}
