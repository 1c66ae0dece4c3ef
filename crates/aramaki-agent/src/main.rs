//! `aramaki-agent enroll|run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use aramaki_agent::config::AgentConfig;
use aramaki_agent::queue::Queue;
use aramaki_agent::runtime::{Scheduler, Shared};
use aramaki_agent::session::{self, Agent};
use aramaki_agent::state::StateDir;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "aramaki-agent", version = concat!(env!("CARGO_PKG_VERSION"), " (agent protocol 2)"), about = "The Aramaki agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register this host with a server using an enrollment token.
    Enroll {
        /// The server's base URL, such as https://aramaki.example.org.
        #[arg(long)]
        server: String,
        /// The token from `aramaki agent token`.
        #[arg(long, env = "ARAMAKI_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(long, default_value = "/var/lib/aramaki-agent")]
        state_dir: PathBuf,
        /// This agent's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Allow plain http:// to a host other than loopback.
        #[arg(long)]
        allow_plaintext: bool,
        /// CA certificates (PEM) to trust besides the public roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Run: schedule checks, serve the push API, talk to the server.
    Run {
        #[arg(long, default_value = "/var/lib/aramaki-agent")]
        state_dir: PathBuf,
        /// Local configuration (subscriptions, local checks, actions, push API).
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        allow_plaintext: bool,
    },
}

/// Exit status for refusals a restart cannot fix (systemd does not restart
/// on it; see the unit file).
const EXIT_REFUSED: u8 = 78;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".to_owned())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Enroll {
            server,
            token,
            state_dir,
            name,
            allow_plaintext,
            ca_file,
        } => {
            let state = StateDir::open(&state_dir)?;
            let name = name.unwrap_or_else(hostname);
            match session::enroll(
                &state,
                &server,
                &token,
                &name,
                allow_plaintext,
                ca_file.as_deref(),
            )
            .await
            {
                Ok(r) => {
                    println!(
                        "enrolled as '{}' (agent {}) for system '{}'; the server key is pinned in {}",
                        r.name,
                        r.agent_id,
                        r.system,
                        state_dir.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("aramaki-agent: enrollment failed: {e}");
                    Ok(ExitCode::from(EXIT_REFUSED))
                }
            }
        }
        Command::Run {
            state_dir,
            config,
            allow_plaintext,
        } => {
            let config = AgentConfig::load(config.as_deref())?;
            let state = StateDir::open(&state_dir)?;
            let registration = state.registration()?;
            let key = state.key()?;
            let server_key = state.server_key()?;
            let queue = open_queue(&state.queue_dir(), config.queue_capacity)
                .await
                .with_context(|| {
                    format!("cannot open the queue in {}", state.queue_dir().display())
                })?;
            let shared = Shared::new(queue);
            start_push(&config, &shared).await?;
            let mut scheduler = Scheduler::new(
                shared.clone(),
                registration.agent_id.clone(),
                config.checks.clone(),
            )
            .with_policy(config.check_policy.clone());
            // Keep running what the server sent last, even before it answers.
            scheduler.set(state.checks());
            tracing::info!(
                agent = %registration.name,
                system = %registration.system,
                server = %registration.server,
                "aramaki-agent started"
            );
            let seen = aramaki_agent::actions::Seen::load(state.dir.join("actions-seen.json"));
            let mut agent = Agent {
                seen,
                running: Default::default(),
                updates: tokio::sync::mpsc::unbounded_channel(),
                state,
                config,
                registration,
                key,
                server_key,
                shared,
                scheduler,
                allow_plaintext,
            };
            let err = tokio::select! {
                e = session::run(&mut agent) => e,
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("stopping");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            eprintln!("aramaki-agent: {err}");
            Ok(ExitCode::from(EXIT_REFUSED))
        }
    }
}

/// Opens the queue, waiting up to 10 s for a previous agent process to let
/// go of it (a restart can race with the old process's last moments, or with
/// a check it forked that has not exec'd yet).
async fn open_queue(
    dir: &std::path::Path,
    capacity: u64,
) -> Result<Queue, aramaki_agent::queue::QueueError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Queue::open(dir, capacity) {
            Err(aramaki_agent::queue::QueueError::Locked { .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

async fn start_push(config: &AgentConfig, shared: &std::sync::Arc<Shared>) -> Result<()> {
    if !config.push_http.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.push_http)
            .await
            .with_context(|| format!("cannot listen on {} (push_http)", config.push_http))?;
        tokio::spawn(aramaki_agent::push::serve_http(listener, shared.clone()));
    }
    if !config.push_tcp.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.push_tcp)
            .await
            .with_context(|| format!("cannot listen on {} (push_tcp)", config.push_tcp))?;
        tokio::spawn(aramaki_agent::push::serve_tcp(listener, shared.clone()));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARAMAKI_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aramaki-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aramaki-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
