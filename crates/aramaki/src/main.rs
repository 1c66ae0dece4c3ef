//! The `aramaki` command: parse, build the Context, dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use aramaki::cli::{self, ClientArgs, EventCommand, SystemCommand, TimelineArgs};
use aramaki::config::{Config, LogFormat};
use aramaki::setup::{self, Setup};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "aramaki",
    version,
    about = "Aramaki: a federated DevOps control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// Data directory: configuration, identity key, SQLite database.
    #[arg(long, default_value = "./aramaki-data")]
    data_dir: PathBuf,
    /// Address to listen on (overrides server.listen).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Seed a fictional estate (data centers, projects, a week of events) into
    /// an instance that has no systems yet.
    #[arg(long)]
    demo: bool,
    /// Log format: human or json (overrides log.format).
    #[arg(long, value_parser = ["human", "json"])]
    log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (creating the data directory on first start).
    Server(ServerArgs),
    /// Create the data directory, configuration, key, database and admin; do not serve.
    Init {
        #[arg(long, default_value = "./aramaki-data")]
        data_dir: PathBuf,
    },
    /// Manage systems through the API.
    System {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: SystemCommand,
    },
    /// Record events through the API.
    Event {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: EventCommand,
    },
    /// Manage users, their roles and tokens on the data directory.
    User {
        #[arg(long, default_value = "./aramaki-data", global = true)]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: aramaki::users::commands::UserCommand,
    },
    /// Show (and follow) a system's timeline.
    Timeline {
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        args: TimelineArgs,
    },
    /// Agents and their enrollment tokens.
    Agent {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: aramaki::agents::commands::AgentCommand,
    },
    /// Actions: definitions and runs.
    Action {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: aramaki::actions::commands::ActionCommand,
    },
    /// Peering with other instances.
    Peer {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: aramaki::federation::commands::PeerCommand,
    },
    /// This instance's identity.
    Instance {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: aramaki::federation::commands::InstanceCommand,
    },
    /// Check definitions.
    Check {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: aramaki::monitoring::commands::CheckCommand,
    },
    /// Import definitions from another tool.
    Import {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: ImportCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ImportCommand {
    /// Check definitions from `sensuctl dump` output (YAML or wrapped JSON).
    Sensu {
        file: PathBuf,
        /// Show what would change without changing anything.
        #[arg(long)]
        dry_run: bool,
    },
}

fn environment() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("ARAMAKI_"))
        .collect()
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

fn announce(setup: &Setup) {
    let ctx = &setup.context;
    let dir = ctx.data_dir.display();
    if setup.wrote_config {
        println!("wrote {dir}/aramaki.toml");
    }
    if setup.created_key {
        println!(
            "created the instance identity key {dir}/instance.key (fingerprint {})",
            ctx.identity.fingerprint()
        );
    }
    if let Some(admin) = &setup.first_admin {
        println!();
        println!(
            "  First start: an administrator was created. These are shown ONCE; keep them safe."
        );
        println!("    user:      {}", admin.username);
        println!(
            "    password:  {}   (must be changed at first login)",
            admin.password.expose()
        );
        println!("    API token: {}", admin.token.expose());
        println!(
            "  Try:  ARAMAKI_TOKEN={} aramaki system list",
            admin.token.expose()
        );
        println!();
    }
}

async fn serve(args: ServerArgs) -> Result<()> {
    let (mut config, wrote) = setup::load_config(&args.data_dir, &environment())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(f) = &args.log_format {
        config.log.format = if f == "json" {
            LogFormat::Json
        } else {
            LogFormat::Human
        };
    }
    init_logging(&config);
    let listen = config.server.listen;
    let mut setup = setup::init(
        &args.data_dir,
        config,
        std::sync::Arc::new(aramaki::context::SystemClock),
    )
    .await?;
    setup.wrote_config = wrote;
    announce(&setup);
    if args.demo {
        match aramaki::demo::seed(&setup.context).await? {
            Some(s) => println!("demo: seeded {} systems and {} events", s.systems, s.events),
            None => println!("demo: this instance has systems already; left them alone"),
        }
    }
    let app = aramaki::app::App::build(setup.context.clone(), listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!(
        "aramaki {} listening on http://{}",
        env!("CARGO_PKG_VERSION"),
        app.addr()
    );
    tracing::info!(addr = %app.addr(), backend = setup.context.db.backend().name(), instance = %setup.context.identity.fingerprint(), "serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop_tx.send(true);
    });
    app.run(stop_rx).await?;
    setup.context.db.close().await;
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Server(args) => serve(args).await,
        Command::Init { data_dir } => {
            let setup = setup::init_from_dir(&data_dir, &environment()).await?;
            announce(&setup);
            if setup.first_admin.is_none() && !setup.wrote_config {
                println!("{} is already initialised", data_dir.display());
            }
            Ok(())
        }
        Command::User { data_dir, command } => {
            let setup = setup::init_from_dir(&data_dir, &environment()).await?;
            announce(&setup);
            aramaki::users::commands::run(&setup.context, command).await?;
            setup.context.db.close().await;
            Ok(())
        }
        Command::System { client, command } => {
            cli::system(&cli::Client::new(&client)?, command).await
        }
        Command::Event { client, command } => {
            cli::event(&cli::Client::new(&client)?, command).await
        }
        Command::Timeline { client, args } => {
            cli::timeline(&cli::Client::new(&client)?, args).await
        }
        Command::Agent { client, command } => {
            aramaki::agents::commands::run(&cli::Client::new(&client)?, command).await
        }
        Command::Action { client, command } => {
            aramaki::actions::commands::run(&cli::Client::new(&client)?, command).await
        }
        Command::Peer { client, command } => {
            aramaki::federation::commands::run(&cli::Client::new(&client)?, command).await
        }
        Command::Instance { client, command } => {
            aramaki::federation::commands::run_instance(&cli::Client::new(&client)?, command).await
        }
        Command::Check { client, command } => {
            aramaki::monitoring::commands::run(&cli::Client::new(&client)?, command).await
        }
        Command::Import {
            client,
            command: ImportCommand::Sensu { file, dry_run },
        } => {
            aramaki::monitoring::commands::import_sensu(&cli::Client::new(&client)?, &file, dry_run)
                .await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aramaki: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aramaki: {e:#}");
            ExitCode::FAILURE
        }
    }
}
