//! `aramaki peer …`, as a client of the instance's own API.

use std::io::BufRead;

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::json;

use crate::cli::{encode, s, table, Client};

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Issue a one-time invite for another instance; printed once.
    Invite {
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// Join the instance that issued INVITE, after confirming its fingerprint.
    Join {
        invite: String,
        /// Do not ask: the fingerprint was compared already.
        #[arg(long)]
        yes: bool,
    },
    /// List peers with their fingerprints and states.
    List,
    /// Approve a pending peer.
    Approve {
        peer: String,
    },
    /// Stop reading a peer's messages (at once) until resumed.
    Suspend {
        peer: String,
    },
    Resume {
        peer: String,
    },
    /// End a peering for good.
    Revoke {
        peer: String,
    },
    /// Ask PEER to use its system SYSTEM (it appears here, read-only, once accepted).
    Use {
        peer: String,
        system: String,
        /// status (status only) or timeline (status and timeline).
        #[arg(long, default_value = "timeline")]
        level: String,
    },
    /// Use relations, both ways.
    Uses,
    /// Accept a request to use a system here.
    Accept {
        id: String,
        /// status or timeline (default: what was asked for).
        #[arg(long)]
        level: Option<String>,
        /// Do not share the systems it includes.
        #[arg(long)]
        no_subsystems: bool,
        /// Share its handbook.
        #[arg(long)]
        handbook: bool,
        /// Share its contacts.
        #[arg(long)]
        contacts: bool,
    },
    /// Reject a request to use a system here.
    Reject {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a use relation (either side).
    Undo {
        id: String,
    },
    /// Accept PEER's requests to use SYSTEM at once, with this exposure.
    Allow {
        peer: String,
        system: String,
        #[arg(long, default_value = "timeline")]
        level: String,
        #[arg(long)]
        no_subsystems: bool,
        #[arg(long)]
        handbook: bool,
        #[arg(long)]
        contacts: bool,
    },
    /// Withdraw a standing policy: PEER's requests for SYSTEM wait for an
    /// admin again (accepted uses stay until undone).
    Disallow {
        peer: String,
        system: String,
    },
    /// Standing policies: which peers' requests are accepted at once.
    Policies,
}

/// `aramaki instance …`.
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Rotate the instance key: peers follow (the old key signs the new
    /// one); the old key then only verifies history.
    RotateKey,
}

pub async fn run_instance(client: &Client, cmd: InstanceCommand) -> Result<()> {
    match cmd {
        InstanceCommand::RotateKey => {
            let v = client.post("/instance/rotate-key", json!({})).await?;
            println!("new fingerprint: {}", s(&v, "fingerprint"));
            Ok(())
        }
    }
}

fn show_use(v: &serde_json::Value) -> Result<()> {
    println!(
        "use {}: {} of {} is {}",
        s(v, "id"),
        s(v, "system"),
        s(v, "peer_name"),
        s(v, "state")
    );
    Ok(())
}

pub async fn run(client: &Client, cmd: PeerCommand) -> Result<()> {
    let change = |peer: &str, what: &str| format!("/peers/{}/{what}", encode(peer));
    match cmd {
        PeerCommand::Invite { ttl } => {
            let v = client.post("/peers/invites", json!({"ttl": ttl})).await?;
            println!("{}", s(&v, "invite"));
            eprintln!(
                "our fingerprint: {} (the other side should see the same); shown once",
                s(&v, "fingerprint")
            );
            Ok(())
        }
        PeerCommand::Join { invite, yes } => {
            // Checked against the invite's fingerprint (its document and,
            // over TLS, its certificate) before anyone is asked.
            let found = crate::federation::peers::preview(&invite).await?;
            println!(
                "{} at {} has fingerprint {}",
                found.name, found.url, found.fingerprint
            );
            if !yes {
                eprint!("Is this the fingerprint its admin told you? [y/N] ");
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer)?;
                if !matches!(answer.trim(), "y" | "Y" | "yes") {
                    bail!("not joining");
                }
            }
            let v = client
                .post("/peers/join", json!({"invite": invite}))
                .await?;
            println!(
                "peered with {} ({}); they may need to approve us",
                s(&v, "name"),
                s(&v, "state")
            );
            Ok(())
        }
        PeerCommand::List => {
            let v = client.get("/peers").await?;
            if client.json {
                return client.print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| {
                            vec![
                                s(p, "name"),
                                s(p, "state"),
                                s(p, "fingerprint"),
                                s(p, "url"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!("{}", table(&["NAME", "STATE", "FINGERPRINT", "URL"], &rows));
            Ok(())
        }
        PeerCommand::Approve { peer } => {
            show(client.post(&change(&peer, "approve"), json!({})).await?)
        }
        PeerCommand::Suspend { peer } => {
            show(client.post(&change(&peer, "suspend"), json!({})).await?)
        }
        PeerCommand::Resume { peer } => {
            show(client.post(&change(&peer, "resume"), json!({})).await?)
        }
        PeerCommand::Revoke { peer } => {
            show(client.post(&change(&peer, "revoke"), json!({})).await?)
        }
        PeerCommand::Use {
            peer,
            system,
            level,
        } => {
            let v = client
                .post(
                    &format!("/peers/{}/uses", encode(&peer)),
                    json!({"system": system, "level": level}),
                )
                .await?;
            show_use(&v)
        }
        PeerCommand::Uses => {
            let v = client.get("/uses").await?;
            if client.json {
                return client.print_json(&v);
            }
            let rows: Vec<Vec<String>> = v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|u| {
                            vec![
                                s(u, "id"),
                                s(u, "role"),
                                s(u, "peer_name"),
                                s(u, "system"),
                                s(u, "local_system"),
                                s(u, "state"),
                                s(&u["exposure"], "level"),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            print!(
                "{}",
                table(
                    &["ID", "ROLE", "PEER", "SYSTEM", "HERE", "STATE", "LEVEL"],
                    &rows
                )
            );
            Ok(())
        }
        PeerCommand::Accept {
            id,
            level,
            no_subsystems,
            handbook,
            contacts,
        } => {
            let mut body =
                json!({"subsystems": !no_subsystems, "handbook": handbook, "contacts": contacts});
            if let Some(level) = level {
                body["level"] = json!(level);
            }
            show_use(
                &client
                    .post(&format!("/uses/{}/accept", encode(&id)), body)
                    .await?,
            )
        }
        PeerCommand::Reject { id, reason } => show_use(
            &client
                .post(
                    &format!("/uses/{}/reject", encode(&id)),
                    json!({"reason": reason}),
                )
                .await?,
        ),
        PeerCommand::Undo { id } => show_use(
            &client
                .post(&format!("/uses/{}/undo", encode(&id)), json!({}))
                .await?,
        ),
        PeerCommand::Allow {
            peer,
            system,
            level,
            no_subsystems,
            handbook,
            contacts,
        } => {
            client
                .put(
                    &format!("/peers/{}/policies", encode(&peer)),
                    json!({"system": system, "level": level, "subsystems": !no_subsystems, "handbook": handbook, "contacts": contacts}),
                )
                .await?;
            println!("requests from {peer} to use {system} are accepted at once ({level})");
            Ok(())
        }
        PeerCommand::Disallow { peer, system } => {
            client
                .delete(&format!(
                    "/peers/{}/policies/{}",
                    encode(&peer),
                    encode(&system)
                ))
                .await?;
            println!("requests from {peer} to use {system} wait for an admin again");
            Ok(())
        }
        PeerCommand::Policies => {
            let v = client.get("/policies").await?;
            if client.json {
                return client.print_json(&v);
            }
            for p in v["items"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}",
                    s(p, "system"),
                    s(p, "peer_name"),
                    p["exposure"]["level"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

fn show(v: serde_json::Value) -> Result<()> {
    println!("{} is now {}", s(&v, "name"), s(&v, "state"));
    Ok(())
}
