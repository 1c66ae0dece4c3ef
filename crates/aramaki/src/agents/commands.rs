//! `aramaki agent …`: enrollment tokens and the agent registry, as a client
//! of the REST API (an instance admin's token).

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};

use crate::cli::{encode, s, table, Client};

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Issue an enrollment token for agents of SYSTEM; printed once.
    Token {
        #[arg(long)]
        system: String,
        /// Lifetime: 15m, 1h, 7d… (at most 30 days).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Let several agents enroll with the same token.
        #[arg(long)]
        reusable: bool,
    },
    /// List enrollment tokens (never their secrets).
    Tokens,
    /// Revoke an enrollment token by its visible prefix.
    RevokeToken { id: String },
    /// List agents with their connection state.
    List,
    /// Show one agent (id or name).
    Show { agent: String },
    /// Revoke an agent: its socket closes now, its key is refused from then on.
    Revoke { agent: String },
    /// Allow an agent to enroll again with a new key.
    Reenroll { agent: String },
}

pub async fn run(client: &Client, cmd: AgentCommand) -> Result<()> {
    match cmd {
        AgentCommand::Token {
            system,
            ttl,
            reusable,
        } => {
            let v = client
                .post(
                    "/agents/tokens",
                    json!({"system": system, "ttl": ttl, "reusable": reusable}),
                )
                .await?;
            if client.json {
                return client.print_json(&v);
            }
            println!("{}", s(&v, "token"));
            eprintln!(
                "enrollment token for system '{}', {}, valid until {} (shown once)",
                s(&v, "system"),
                if reusable { "reusable" } else { "single use" },
                s(&v, "expires_at")
            );
            eprintln!("on the host: aramaki-agent enroll --server URL --token TOKEN");
            Ok(())
        }
        AgentCommand::Tokens => {
            let v = client.get("/agents/tokens").await?;
            if client.json {
                return client.print_json(&v);
            }
            let rows = items(&v)
                .iter()
                .map(|t| {
                    vec![
                        format!("aek_{}_…", s(t, "id")),
                        s(t, "system"),
                        if t["reusable"] == true {
                            "reusable"
                        } else {
                            "single use"
                        }
                        .into(),
                        s(t, "uses"),
                        s(t, "expires_at"),
                        if t["revoked"] == true { "revoked" } else { "" }.into(),
                    ]
                })
                .collect::<Vec<_>>();
            print!(
                "{}",
                table(&["TOKEN", "SYSTEM", "KIND", "USES", "EXPIRES", ""], &rows)
            );
            Ok(())
        }
        AgentCommand::RevokeToken { id } => {
            let id = id
                .trim_start_matches("aek_")
                .split('_')
                .next()
                .unwrap_or("");
            client
                .delete(&format!("/agents/tokens/{}", encode(id)))
                .await?;
            println!("revoked enrollment token aek_{id}_…");
            Ok(())
        }
        AgentCommand::List => {
            let v = client.get("/agents").await?;
            if client.json {
                return client.print_json(&v);
            }
            let rows = items(&v).iter().map(agent_row).collect::<Vec<_>>();
            print!(
                "{}",
                table(
                    &[
                        "NAME",
                        "SYSTEM",
                        "STATE",
                        "KEEPALIVE",
                        "VERSION",
                        "LAST SEEN",
                        "QUEUE",
                        "FINGERPRINT"
                    ],
                    &rows
                )
            );
            Ok(())
        }
        AgentCommand::Show { agent } => {
            let v = client.get(&format!("/agents/{}", encode(&agent))).await?;
            client.print_json(&v)
        }
        AgentCommand::Revoke { agent } => {
            let v = client
                .post(&format!("/agents/{}/revoke", encode(&agent)), json!({}))
                .await?;
            println!("revoked agent '{}'", s(&v, "name"));
            Ok(())
        }
        AgentCommand::Reenroll { agent } => {
            let v = client
                .post(&format!("/agents/{}/reenroll", encode(&agent)), json!({}))
                .await?;
            println!(
                "agent '{}' may now enroll again with a new key and a fresh token",
                s(&v, "name")
            );
            Ok(())
        }
    }
}

fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn agent_row(a: &Value) -> Vec<String> {
    let state = if a["revoked"] == true {
        "revoked"
    } else if a["connected"] == true {
        "connected"
    } else {
        "disconnected"
    };
    vec![
        s(a, "name"),
        s(a, "system"),
        state.into(),
        s(a, "keepalive"),
        s(a, "version"),
        s(a, "last_seen"),
        s(a, "queue_depth"),
        s(a, "fingerprint"),
    ]
}
