//! Sweeps for what did *not* happen: missed keepalives, expired TTLs, and
//! history past its retention.
//!
//! Everything is judged from the database (`agents.last_seen`,
//! `observations.ttl_deadline`), so agents that vanished while this server
//! was down are noticed after it restarts. Right after a start, agents get
//! the warning period to reconnect before they are judged.

use std::sync::Arc;
use std::time::Duration;

use aramaki_protocol::agent::CheckResult;
use jiff::Timestamp;
use sqlx::Row;
use tokio::sync::watch;

use super::ingest::{keepalive_result, AgentRef, IngestError, Synthetic};
use crate::context::Context;
use crate::db::to_micros;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Ingest(#[from] IngestError),
}

/// What one sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub keepalives: usize,
    pub ttls: usize,
    pub purged: u64,
    /// Action targets that never reported back.
    pub lost_actions: usize,
}

/// Runs [`sweep`] every `monitoring.sweep_interval` seconds until stopped.
pub fn spawn(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let started = ctx.now();
    tokio::spawn(async move {
        let every = Duration::from_secs(ctx.config.monitoring.sweep_interval);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            if let Err(e) = sweep(&ctx, started).await {
                tracing::warn!(error = %e, "monitoring sweep failed; retrying");
            }
        }
    });
}

/// One pass; `started` is when this server started (the grace period).
pub async fn sweep(ctx: &Context, started: Timestamp) -> Result<Swept, SweepError> {
    let now = ctx.now();
    Ok(Swept {
        keepalives: keepalives(ctx, now, started).await?,
        ttls: ttls(ctx, now, started).await?,
        purged: purge(ctx, now).await?,
        lost_actions: crate::actions::runs::expire_lost(ctx).await?,
    })
}

async fn keepalives(
    ctx: &Context,
    now: Timestamp,
    started: Timestamp,
) -> Result<usize, SweepError> {
    let m = &ctx.config.monitoring;
    let now_us = to_micros(now);
    let grace_from = to_micros(started);
    let rows = sqlx::query(
        "SELECT a.id, a.name, a.system_id, s.slug, a.last_seen, a.keepalive FROM agents a \
         JOIN systems s ON s.id = a.system_id WHERE a.revoked_at IS NULL AND a.last_seen IS NOT NULL",
    )
    .fetch_all(ctx.db.reader())
    .await?;
    let mut changed = 0;
    for row in rows {
        let id: String = row.try_get("id")?;
        if ctx.agents.is_connected(&id) {
            continue;
        }
        let last_seen: i64 = row.try_get("last_seen")?;
        let current: String = row.try_get("keepalive")?;
        // Silence counts from the later of the last heartbeat and our start.
        let silent_secs = (now_us - last_seen.max(grace_from)) / 1_000_000;
        let silent_for = (now_us - last_seen) / 1_000_000;
        let verdict = if silent_secs >= m.keepalive_critical as i64 {
            Some((2, "critical"))
        } else if silent_secs >= m.keepalive_warning as i64 {
            Some((1, "warning"))
        } else {
            None
        };
        let Some((status, state)) = verdict else {
            continue;
        };
        // Silence only escalates: an agent already CRITICAL stays so (the
        // grace period after a restart must not soften it to WARNING).
        if current == state || current == "critical" {
            continue;
        }
        let agent = AgentRef {
            id,
            name: row.try_get("name")?,
            system_id: row.try_get("system_id")?,
            system: row.try_get("slug")?,
        };
        let summary = format!(
            "no heartbeat from agent '{}' for {silent_for} s",
            agent.name
        );
        let result = keepalive_result(&agent, status, summary, now_us);
        ctx.ingest
            .synthetic(Synthetic {
                system_id: agent.system_id.clone(),
                system: agent.system.clone(),
                agent: Some(agent),
                result,
            })
            .await?;
        changed += 1;
    }
    Ok(changed)
}

async fn ttls(ctx: &Context, now: Timestamp, started: Timestamp) -> Result<usize, SweepError> {
    let now_us = to_micros(now);
    // After a restart, queued results get the warning period to arrive.
    let grace_until =
        to_micros(started) + ctx.config.monitoring.keepalive_warning as i64 * 1_000_000;
    if now_us < grace_until {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT o.system_id, s.slug, o.check_name, o.labels, o.agent_id, o.received_at, a.name AS agent_name \
         FROM observations o JOIN systems s ON s.id = o.system_id LEFT JOIN agents a ON a.id = o.agent_id \
         WHERE o.ttl_deadline IS NOT NULL AND o.ttl_deadline < $1",
    )
    .bind(now_us)
    .fetch_all(ctx.db.reader())
    .await?;
    let mut fired = 0;
    for row in rows {
        let system_id: String = row.try_get("system_id")?;
        let system: String = row.try_get("slug")?;
        let check: String = row.try_get("check_name")?;
        let labels: String = row.try_get("labels")?;
        let received_at: i64 = row.try_get("received_at")?;
        let agent = match (
            row.try_get::<Option<String>, _>("agent_id")?,
            row.try_get::<Option<String>, _>("agent_name")?,
        ) {
            (Some(id), Some(name)) => Some(AgentRef {
                id,
                name,
                system_id: system_id.clone(),
                system: system.clone(),
            }),
            _ => None,
        };
        let silent = (now_us - received_at) / 1_000_000;
        let result = CheckResult {
            check,
            system: None,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            status: 2,
            output: format!("TTL CRITICAL - no result for {silent} s (dead-man's switch)"),
            metrics: Vec::new(),
            executed_at: now_us,
            duration_ms: 0,
            source: "ttl".to_owned(),
        };
        ctx.ingest
            .synthetic(Synthetic {
                system_id,
                system,
                agent,
                result,
            })
            .await?;
        fired += 1;
    }
    Ok(fired)
}

async fn purge(ctx: &Context, now: Timestamp) -> Result<u64, SweepError> {
    let keep = i64::from(ctx.config.monitoring.retention_days) * 86_400 * 1_000_000;
    let mut tx = ctx.db.begin().await?;
    let purged = super::store::purge_history(&mut tx, to_micros(now) - keep).await?;
    tx.commit().await?;
    Ok(purged)
}
