//! Monitoring: check definitions, agents' results, observations and their
//! history, keepalives and TTLs, and the Sensu import.
//!
//! Results flow agent → [`ingest`] (one writer, group commit) → observation,
//! history and, when the verdict changes, a `check.state_changed` event on
//! the timeline, which is what a system's status is built from.

pub mod checks;
pub mod commands;
pub mod http;
pub mod ingest;
pub mod pages;
pub mod sensu;
pub mod store;
pub mod watch;

use std::collections::BTreeMap;

use aramaki_protocol::agent::{CheckDefinition, Metric, ServerMessage};
use serde::Serialize;
use utoipa::ToSchema;

use self::checks::CheckSpec;
use crate::agents::Agent;
use crate::context::Context;
use crate::db::{new_id, to_micros};
use crate::systems::model::Invalid;
use crate::timeline::Actor;

#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    #[error("no check '{0}'")]
    NotFound(String),
    #[error("a check named '{0}' exists already")]
    Exists(String),
    #[error("no system '{0}'")]
    UnknownSystem(String),
    #[error("'{0}' is a remote system: its checks run on its primary instance")]
    Remote(String),
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(Invalid),
    #[error("cannot record the change: {0}")]
    Audit(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<Invalid> for MonitoringError {
    fn from(i: Invalid) -> Self {
        MonitoringError::Invalid(i)
    }
}

/// A stored check definition.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Check {
    pub id: String,
    #[serde(flatten)]
    pub spec: CheckSpec,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: jiff::Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: jiff::Timestamp,
}

/// The latest result of a check on a system (per label set).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Observation {
    pub system: String,
    pub check: String,
    pub labels: BTreeMap<String, String>,
    /// The Nagios exit code of the latest result.
    pub status: i32,
    /// The verdict that counts: ok, warning, critical or unknown (a non-OK
    /// status counts once it repeated `occurrences` times).
    pub state: String,
    pub output: String,
    #[schema(value_type = Vec<Object>)]
    pub metrics: Vec<Metric>,
    pub agent_id: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub executed_at: jiff::Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub received_at: jiff::Timestamp,
    /// Consecutive results with this status.
    pub occurrences: i64,
    #[schema(value_type = String, format = DateTime)]
    pub state_since: jiff::Timestamp,
    /// When the dead-man's switch fires if nothing arrives.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub ttl_deadline: Option<jiff::Timestamp>,
}

/// One result in a check's history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub status: i32,
    pub output: String,
    #[schema(value_type = Vec<Object>)]
    pub metrics: Vec<Metric>,
    pub agent_id: Option<String>,
    pub agent_seq: Option<i64>,
    #[schema(value_type = String, format = DateTime)]
    pub executed_at: jiff::Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub received_at: jiff::Timestamp,
}

/// Records a change to checks on the instance's own system (its audit trail).
async fn record(
    ctx: &Context,
    tx: &mut crate::db::Tx,
    actor: &Actor,
    kind: &str,
    title: String,
    data: serde_json::Value,
) -> Result<(), MonitoringError> {
    crate::users::audit(ctx, tx, actor, kind, title, data)
        .await
        .map_err(|e| match e {
            crate::users::UserError::Db(db) => MonitoringError::Db(db),
            other => MonitoringError::Audit(other.to_string()),
        })
}

async fn validate_target(
    tx: &mut crate::db::Tx,
    spec: &CheckSpec,
    me: &str,
) -> Result<(), MonitoringError> {
    use crate::agents::store::{owned_system, Owned};
    spec.validate()?;
    if let Some(slug) = &spec.system {
        match owned_system(tx, slug.as_str(), me).await? {
            Owned::Here(..) => {}
            Owned::Remote => return Err(MonitoringError::Remote(slug.to_string())),
            Owned::Absent => return Err(MonitoringError::UnknownSystem(slug.to_string())),
        }
    }
    Ok(())
}

/// Creates a check, or replaces one of the same name when `replace`.
pub async fn save_check(
    ctx: &Context,
    actor: &Actor,
    spec: CheckSpec,
    replace: bool,
) -> Result<(Check, bool), MonitoringError> {
    let mut spec = spec;
    let mut tx = ctx.db.begin_recording().await?;
    validate_target(&mut tx, &spec, &ctx.identity.instance_id).await?;
    let now = ctx.now();
    let existing = store::check(&mut tx, &spec.name).await?;
    spec.keep_secrets(existing.as_ref().map(|c| &c.spec))?;
    let created = existing.is_none();
    let id = match existing {
        Some(_) if !replace => return Err(MonitoringError::Exists(spec.name)),
        Some(old) => {
            store::update_check(&mut tx, &spec, to_micros(now)).await?;
            old.id
        }
        None => {
            let id = new_id().to_string();
            store::insert_check(&mut tx, &id, &spec, to_micros(now)).await?;
            id
        }
    };
    let verb = if created { "created" } else { "updated" };
    let kind = if created {
        "check.created"
    } else {
        "check.updated"
    };
    let data = serde_json::json!({"check": spec.name, "spec": spec.redacted()});
    record(
        ctx,
        &mut tx,
        actor,
        kind,
        format!("Check '{}' {verb}", spec.name),
        data,
    )
    .await?;
    ctx.commit(tx).await?;
    ctx.ingest.checks_changed();
    push_checks(ctx).await;
    let check = store::check(&mut *ctx.db.reader().acquire().await?, &spec.name)
        .await?
        .unwrap_or(Check {
            id,
            spec,
            created_at: now,
            updated_at: now,
        });
    Ok((check, created))
}

pub async fn delete_check(ctx: &Context, actor: &Actor, name: &str) -> Result<(), MonitoringError> {
    let mut tx = ctx.db.begin_recording().await?;
    if !store::delete_check(&mut tx, name).await? {
        return Err(MonitoringError::NotFound(name.to_owned()));
    }
    let data = serde_json::json!({"check": name});
    record(
        ctx,
        &mut tx,
        actor,
        "check.deleted",
        format!("Check '{name}' deleted"),
        data,
    )
    .await?;
    ctx.commit(tx).await?;
    ctx.ingest.checks_changed();
    push_checks(ctx).await;
    Ok(())
}

/// Whether a subscription the agent declared is its to declare: a
/// `system:` or `agent:` entry may name only its own system or itself; a
/// plain one (`linux`) is always its own.
pub fn own_subscription(agent: &Agent, sub: &str) -> bool {
    if let Some(slug) = sub.strip_prefix("system:") {
        return slug == agent.system;
    }
    if let Some(who) = sub.strip_prefix("agent:") {
        return who == agent.name || who == agent.id;
    }
    true
}

/// The subscriptions an agent answers to: the plain ones it declared plus
/// `agent:<name>`, `agent:<id>` and `system:<slug>` of its own. A
/// `system:` or `agent:` entry naming another is ignored, also one stored
/// before this rule (an older database or a backup).
pub fn agent_subscriptions(agent: &Agent) -> Vec<String> {
    let mut subs: Vec<String> = agent
        .subscriptions
        .iter()
        .filter(|s| own_subscription(agent, s))
        .cloned()
        .collect();
    subs.push(format!("agent:{}", agent.name));
    subs.push(format!("agent:{}", agent.id));
    subs.push(format!("system:{}", agent.system));
    subs
}

/// The slugs of the systems a check bound to a system may run for on this
/// agent: its own system and every system that includes it explicitly.
pub fn bound_systems(agent: &Agent, graph: &crate::systems::graph::Graph) -> Vec<String> {
    let mut slugs = vec![agent.system.clone()];
    slugs.extend(
        graph
            .explicit_ancestors(&agent.system_id)
            .iter()
            .map(|id| graph.slug(id).to_owned()),
    );
    slugs
}

/// Whether the check goes to the agent: published and its subscriptions
/// meet the agent's. A check bound to a system goes through a plain
/// subscription (`linux`) only to agents on that system or on one it
/// includes explicitly; any other agent (a poller of a proxy check) must be
/// named by an `agent:` or `system:` subscription of the check.
pub fn check_applies(subs: &[String], bound: &[String], check: &Check) -> bool {
    if !check.spec.publish {
        return false;
    }
    let on_its_system = check
        .spec
        .system
        .as_ref()
        .is_none_or(|slug| bound.iter().any(|b| b == slug.as_str()));
    check.spec.subscriptions.iter().any(|s| {
        subs.contains(s) && (on_its_system || s.starts_with("agent:") || s.starts_with("system:"))
    })
}

/// The published checks that go to the agent (see [`check_applies`]).
pub fn checks_for(
    agent: &Agent,
    checks: &[Check],
    graph: &crate::systems::graph::Graph,
) -> Vec<CheckDefinition> {
    let subs = agent_subscriptions(agent);
    let bound = bound_systems(agent, graph);
    checks
        .iter()
        .filter(|c| check_applies(&subs, &bound, c))
        .map(|c| c.spec.definition())
        .collect()
}

/// Sends every connected agent its current set of checks.
pub async fn push_checks(ctx: &Context) {
    let connected = ctx.agents.connected();
    if connected.is_empty() {
        return;
    }
    let Ok(mut conn) = ctx.db.reader().acquire().await else {
        return;
    };
    let Ok(all) = store::checks(&mut conn).await else {
        return;
    };
    let Ok(graph) = crate::systems::store::load_graph(&mut conn).await else {
        return;
    };
    for id in connected {
        if let Ok(Some(agent)) = crate::agents::store::agent_by_id(&mut conn, &id).await {
            ctx.agents.send(
                &id,
                ServerMessage::Checks {
                    checks: checks_for(&agent, &all, &graph),
                },
            );
        }
    }
}
