//! `aramaki action …`, as a client of the REST API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Subcommand;
use serde_json::{json, Map, Value};

use crate::cli::{encode, s, table, Client};

#[derive(Debug, Subcommand)]
pub enum ActionCommand {
    /// Define an action on SYSTEM from a JSON file (see the API's ActionSpec).
    Add {
        system: String,
        #[arg(long)]
        file: PathBuf,
        /// Replace an action of the same name.
        #[arg(long)]
        replace: bool,
    },
    /// List actions (of one system, or all you may see).
    List { system: Option<String> },
    /// Show an action with its last runs.
    Show { system: String, name: String },
    /// Run an action and wait for its outcome.
    Run {
        system: String,
        name: String,
        /// name=value, repeatable.
        #[arg(long = "param")]
        params: Vec<String>,
        /// Confirm a run the confirmation rule asks about.
        #[arg(long)]
        confirm: bool,
        /// Run outside the allowed windows; the reason is flagged on the timeline.
        #[arg(long = "override")]
        override_reason: Option<String>,
        /// Seconds to wait for the outcome (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Cancel a run.
    Cancel { run: String },
}

pub async fn run(client: &Client, cmd: ActionCommand) -> Result<()> {
    match cmd {
        ActionCommand::Add {
            system,
            file,
            replace,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let spec: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let name = spec
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("the spec needs a name"))?
                .to_owned();
            let path = format!("/systems/{}/actions", encode(&system));
            let v = if replace {
                client
                    .put(&format!("{path}/{}", encode(&name)), spec)
                    .await?
            } else {
                client.post(&path, spec).await?
            };
            println!("action '{}' saved on '{}'", s(&v, "name"), s(&v, "system"));
            Ok(())
        }
        ActionCommand::List { system } => {
            let path = match &system {
                Some(sys) => format!("/systems/{}/actions", encode(sys)),
                None => "/actions".to_owned(),
            };
            let v = client.get(&path).await?;
            if client.json {
                return client.print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| vec![s(x, "system"), s(x, "name"), s(x, "title"), s(x, "role")])
                        .collect()
                })
                .unwrap_or_default();
            print!("{}", table(&["SYSTEM", "NAME", "TITLE", "ROLE"], &rows));
            Ok(())
        }
        ActionCommand::Show { system, name } => {
            let path = format!("/systems/{}/actions/{}", encode(&system), encode(&name));
            let mut v = client.get(&path).await?;
            v["runs"] = client.get(&format!("{path}/runs")).await?["items"].clone();
            client.print_json(&v)
        }
        ActionCommand::Run {
            system,
            name,
            params,
            confirm,
            override_reason,
            wait,
        } => {
            let mut map = Map::new();
            for p in &params {
                let (k, val) = p
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--param {p:?} must be name=value"))?;
                map.insert(k.to_owned(), Value::String(val.to_owned()));
            }
            let mut body = json!({"params": map, "confirm": confirm});
            if let Some(r) = override_reason {
                body["override_reason"] = Value::String(r);
            }
            let path = format!(
                "/systems/{}/actions/{}/runs",
                encode(&system),
                encode(&name)
            );
            let run = client.post(&path, body).await?;
            let id = s(&run, "id");
            eprintln!(
                "run {id} started on {} target(s)",
                run["targets"].as_array().map_or(0, Vec::len)
            );
            if wait == 0 {
                return client.print_json(&run);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(wait);
            loop {
                let v = client.get(&format!("/actions/runs/{id}")).await?;
                if s(&v, "state") != "running" {
                    print_outcome(&v);
                    if s(&v, "state") != "succeeded" {
                        bail!("run {id} {}", s(&v, "state"));
                    }
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    bail!("run {id} still running after {wait} s");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        ActionCommand::Cancel { run } => {
            client
                .post(&format!("/actions/runs/{}/cancel", encode(&run)), json!({}))
                .await?;
            println!("asked the agents to cancel run {run}");
            Ok(())
        }
    }
}

fn print_outcome(run: &Value) {
    if let Some(by) = run["cancelled_by"]["name"].as_str() {
        println!("cancelled by {by}");
    }
    for t in run["targets"].as_array().into_iter().flatten() {
        let timeout = t["timeout_secs"]
            .as_u64()
            .map(|secs| format!(", timeout {secs} s"))
            .unwrap_or_default();
        println!(
            "== {}: {} (exit {}{timeout})",
            s(t, "agent"),
            s(t, "state"),
            s(t, "exit_code")
        );
        print!("{}", s(t, "output"));
        if !s(t, "message").is_empty() {
            println!("{}", s(t, "message"));
        }
    }
}
