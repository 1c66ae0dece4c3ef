//! `aramaki check …` and `aramaki import sensu`, as clients of the REST API.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Subcommand;
use serde_json::{json, Value};

use super::checks::CheckSpec;
use super::sensu;
use crate::cli::{encode, label_map, s, table, Client};

#[derive(Debug, Subcommand)]
pub enum CheckCommand {
    /// Define a check (or, with --replace, redefine it).
    Add(Box<AddCheck>),
    /// List check definitions.
    List,
    /// Show one check definition as JSON.
    Show { name: String },
    /// Delete a check definition.
    Delete { name: String },
}

/// The flags of `aramaki check add`.
#[derive(Debug, clap::Args)]
pub struct AddCheck {
    name: String,
    /// Program and arguments after `--`, run without a shell:
    /// aramaki check add load --subscriptions linux --interval 60 -- /usr/lib/nagios/plugins/check_load -w 5 -c 10
    #[arg(last = true)]
    pub command: Vec<String>,
    /// A command line run through /bin/sh (only when you need shell syntax).
    #[arg(long)]
    shell: Option<String>,
    /// A built-in probe as JSON, e.g. '{"probe":"tcp","host":"127.0.0.1","port":22}'.
    #[arg(long)]
    probe: Option<String>,
    /// Comma-separated subscriptions (agents subscribe to agent:NAME and system:SLUG too).
    #[arg(long, value_delimiter = ',', required = true)]
    subscriptions: Vec<String>,
    /// Seconds between runs.
    #[arg(long, conflicts_with = "cron")]
    interval: Option<u32>,
    /// Five-field cron expression instead of an interval.
    #[arg(long)]
    cron: Option<String>,
    /// IANA time zone for --cron.
    #[arg(long)]
    timezone: Option<String>,
    #[arg(long, default_value_t = 60)]
    timeout: u32,
    /// Dead-man's switch in seconds.
    #[arg(long)]
    ttl: Option<u32>,
    /// A non-OK status counts after this many repeats.
    #[arg(long, default_value_t = 1)]
    occurrences: u32,
    /// The system results belong to (default: the agent's own).
    #[arg(long)]
    system: Option<String>,
    /// key=value, repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// NAME=value for the command's environment, repeatable.
    #[arg(long = "env")]
    env: Vec<String>,
    /// Replace an existing check of this name.
    #[arg(long)]
    replace: bool,
}

pub async fn run(client: &Client, cmd: CheckCommand) -> Result<()> {
    match cmd {
        CheckCommand::Add(add) => {
            let AddCheck {
                name,
                command,
                shell,
                probe,
                subscriptions,
                interval,
                cron,
                timezone,
                timeout,
                ttl,
                occurrences,
                system,
                labels,
                env,
                replace,
            } = *add;
            let probe: Option<Value> = probe
                .map(|p| serde_json::from_str(&p).with_context(|| "--probe must be JSON"))
                .transpose()?;
            let mut body = json!({
                "name": name,
                "subscriptions": subscriptions,
                "timeout": timeout,
                "occurrences": occurrences,
                "labels": label_map(&labels)?,
                "env": env_map(&env)?,
            });
            let fields = [
                ("command", (!command.is_empty()).then(|| json!(command))),
                ("shell", shell.map(Value::from)),
                ("probe", probe),
                ("interval", interval.map(Value::from)),
                ("cron", cron.map(Value::from)),
                ("timezone", timezone.map(Value::from)),
                ("ttl", ttl.map(Value::from)),
                ("system", system.map(Value::from)),
            ];
            for (key, value) in fields {
                if let Some(v) = value {
                    body[key] = v;
                }
            }
            let v = if replace {
                client
                    .put(&format!("/checks/{}", encode(&name)), body)
                    .await?
            } else {
                client.post("/checks", body).await?
            };
            if client.json {
                return client.print_json(&v);
            }
            println!(
                "check '{}' saved; connected agents have it now",
                s(&v, "name")
            );
            Ok(())
        }
        CheckCommand::List => {
            let v = client.get("/checks").await?;
            if client.json {
                return client.print_json(&v);
            }
            let rows = items(&v).iter().map(check_row).collect::<Vec<_>>();
            print!(
                "{}",
                table(
                    &["NAME", "RUNS", "SCHEDULE", "SUBSCRIPTIONS", "SYSTEM"],
                    &rows
                )
            );
            Ok(())
        }
        CheckCommand::Show { name } => {
            let v = client.get(&format!("/checks/{}", encode(&name))).await?;
            client.print_json(&v)
        }
        CheckCommand::Delete { name } => {
            client.delete(&format!("/checks/{}", encode(&name))).await?;
            println!("deleted check '{name}'");
            Ok(())
        }
    }
}

fn env_map(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow!("--env {p:?} must be NAME=value"))
        })
        .collect()
}

fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn check_row(c: &Value) -> Vec<String> {
    let runs = if let Some(argv) = c.get("command").and_then(Value::as_array) {
        argv.iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" ")
    } else if let Some(sh) = c.get("shell").and_then(Value::as_str) {
        format!("sh -c {sh:?}")
    } else {
        format!("probe {}", c["probe"]["probe"].as_str().unwrap_or("?"))
    };
    let schedule = match c.get("cron").and_then(Value::as_str) {
        Some(cron) => format!("cron {cron}"),
        None => format!("every {} s", s(c, "interval")),
    };
    let subs = c["subscriptions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let runs: String = runs.chars().take(60).collect();
    vec![s(c, "name"), runs, schedule, subs, s(c, "system")]
}

/// `aramaki import sensu FILE [--dry-run]`.
pub async fn import_sensu(client: &Client, file: &PathBuf, dry_run: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let import = sensu::parse_dump(&text)?;
    let existing: Vec<CheckSpec> = items(&client.get("/checks").await?)
        .into_iter()
        .filter_map(|c| spec_of(c).ok())
        .collect();
    let plan = sensu::plan(&existing, &import);
    if !dry_run {
        for check in &import.checks {
            let name = &check.spec.name;
            let changes = plan.iter().any(|c| match c {
                sensu::Change::Create(n) => n == name,
                sensu::Change::Update { name: n, .. } => n == name,
                sensu::Change::Unchanged(_) => false,
            });
            // Secrets cannot be compared with the server's (it never shows
            // them), so a check that carries any is always sent.
            if changes || check.spec.redacted() != check.spec {
                let body = serde_json::to_value(&check.spec)?;
                client
                    .put(&format!("/checks/{}", encode(name)), body)
                    .await
                    .with_context(|| format!("cannot save check '{name}'"))?;
            }
        }
    }
    print!("{}", sensu::report(&import, &plan, dry_run));
    if !import.errors.is_empty() && !dry_run {
        bail!(
            "{} resources could not be imported (see above)",
            import.errors.len()
        );
    }
    Ok(())
}

/// A stored check as the spec it was saved from (drops id and times).
fn spec_of(mut v: Value) -> Result<CheckSpec> {
    if let Some(o) = v.as_object_mut() {
        for k in ["id", "created_at", "updated_at"] {
            o.remove(k);
        }
    }
    Ok(serde_json::from_value(v)?)
}
