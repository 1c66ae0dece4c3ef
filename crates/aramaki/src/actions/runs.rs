//! Running an action: the rules (role, parameters, time window, concurrency,
//! confirmation), the signed requests to each target agent, their progress
//! and outcome, and the record on the timeline.

use std::collections::BTreeMap;

use aramaki_protocol::agent::{
    action_transcript, ActionRequest, ActionState, ActionUpdate, ServerMessage, SignedAction,
};
use aramaki_protocol::keys::hex;
use aramaki_protocol::Severity;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{store, Action, ActionError};
use crate::context::Context;
use crate::db::{new_id, to_micros, Tx};
use crate::monitoring::ingest::AgentRef;
use crate::timeline::{self, Actor, NewEvent, Target};
use crate::users::access::Access;
use crate::users::Role;

/// How long an agent may take to receive a request before refusing it.
const REQUEST_TTL_SECS: i64 = 300;
/// Output kept per target (the full size is noted).
pub const OUTPUT_LIMIT: usize = 256 * 1024;

/// One run of an action on its targets.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Run {
    pub id: String,
    pub action: String,
    pub system: String,
    #[serde(skip)]
    pub system_id: String,
    pub actor: Actor,
    pub params: BTreeMap<String, String>,
    /// Set when the run was started outside its windows.
    pub override_reason: Option<String>,
    /// running, succeeded, failed or cancelled.
    pub state: String,
    #[schema(value_type = String, format = DateTime)]
    pub started_at: Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Timestamp>,
    /// The timeout the run asked for (seconds; each agent caps it by its
    /// own configuration: see each target's `timeout_secs`).
    pub timeout_secs: Option<u32>,
    /// Who asked to cancel it, if anyone.
    pub cancelled_by: Option<Actor>,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub cancelled_at: Option<Timestamp>,
    pub targets: Vec<RunTarget>,
    /// Identical answers grouped (JSON compared canonically when every
    /// output is JSON, else trimmed text): discovery across many targets.
    pub answers: Vec<Answer>,
}

/// One distinct answer and the agents that gave it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Answer {
    /// The parsed JSON, or the text.
    #[schema(value_type = Object)]
    pub answer: serde_json::Value,
    pub agents: Vec<String>,
}

/// Groups the finished targets' outputs, most common answer first.
pub fn group_answers(targets: &[RunTarget]) -> Vec<Answer> {
    let done: Vec<&RunTarget> = targets.iter().filter(|t| t.state == "succeeded").collect();
    let parsed: Option<Vec<serde_json::Value>> = done
        .iter()
        .map(|t| serde_json::from_str::<serde_json::Value>(t.output.trim()).ok())
        .collect();
    let values: Vec<serde_json::Value> = match parsed {
        Some(v) if !done.is_empty() => v,
        _ => done
            .iter()
            .map(|t| serde_json::Value::String(t.output.trim().to_owned()))
            .collect(),
    };
    let mut groups: Vec<Answer> = Vec::new();
    for (t, v) in done.iter().zip(values) {
        // Map equality ignores key order, so equal JSON compares equal.
        match groups.iter_mut().find(|g| g.answer == v) {
            Some(g) => g.agents.push(t.agent.clone()),
            None => groups.push(Answer {
                answer: v,
                agents: vec![t.agent.clone()],
            }),
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.agents.len()));
    groups
}

/// One agent's part of a run.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunTarget {
    pub agent_id: String,
    pub agent: String,
    /// The system the agent is bound to: who may see it may see this target.
    #[serde(skip)]
    pub system_id: String,
    /// sent, running, succeeded, failed, cancelled, timed_out, refused, unreachable
    pub state: String,
    pub exit_code: Option<i32>,
    /// Output, cut at 256 KiB.
    pub output: String,
    /// The full size of the output in bytes.
    pub output_size: i64,
    /// Why it ended this way (refusal reason, timeout…).
    pub message: String,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub finished_at: Option<Timestamp>,
    /// The timeout the agent applies (seconds): the run's, capped by the
    /// agent's local configuration; reported when it starts.
    pub timeout_secs: Option<u32>,
}

/// The body of a run request.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Confirms a run the confirmation rule asks about.
    #[serde(default)]
    pub confirm: bool,
    /// Runs outside the allowed windows; the reason is flagged on the timeline.
    #[serde(default)]
    pub override_reason: Option<String>,
}

fn state_name(s: ActionState) -> &'static str {
    match s {
        ActionState::Started | ActionState::Output => "running",
        ActionState::Succeeded => "succeeded",
        ActionState::Failed => "failed",
        ActionState::Cancelled => "cancelled",
        ActionState::TimedOut => "timed_out",
        ActionState::Refused => "refused",
    }
}

/// Records a refusal on the action's system, inside `tx`.
async fn record_refusal(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    action: &Action,
    code: &'static str,
    message: &str,
    details: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    let mut event = NewEvent::internal(
        "action.refused",
        Severity::Warning,
        format!("Refused to run '{}': {message}", action.spec.name),
        serde_json::json!({"action": action.spec.name, "code": code, "details": details}),
    );
    event.title = event.title.chars().take(500).collect();
    timeline::append(
        ctx,
        tx,
        actor,
        Target {
            id: &action.system_id,
            slug: &action.system,
        },
        event,
    )
    .await?;
    Ok(())
}

/// Refuses and records the refusal on the system's timeline.
async fn refuse(
    ctx: &Context,
    actor: &Actor,
    action: &Action,
    code: &'static str,
    message: String,
    details: serde_json::Value,
) -> ActionError {
    let recorded = async {
        let mut tx = ctx.db.begin_recording().await?;
        record_refusal(ctx, &mut tx, actor, action, code, &message, &details).await?;
        ctx.commit(tx).await
    };
    if let Err(e) = recorded.await {
        tracing::error!(error = %e, "cannot record a refused action");
    }
    ActionError::Refused {
        code,
        message,
        details,
    }
}

/// Why the guard refuses a run.
struct Guarded {
    code: &'static str,
    message: String,
    details: serde_json::Value,
    /// Worth a timeline entry (busy); a question to the caller is not.
    record: bool,
}

/// The concurrency and confirmation rules, decided inside the transaction
/// that records the run. That transaction first takes the timeline lock
/// (PostgreSQL: an advisory lock every recording transaction takes first)
/// and then writes the action's row, which makes SQLite take its write
/// lock and PostgreSQL a row lock: two starts of the same action are
/// serialised even across server processes, and each reads what the other
/// committed (READ COMMITTED reads per statement, after the lock).
async fn guard(
    tx: &mut Tx,
    action: &Action,
    agent_ids: &[&str],
    confirmed: bool,
    now: Timestamp,
) -> Result<Option<Guarded>, sqlx::Error> {
    sqlx::query("UPDATE actions SET updated_at = updated_at WHERE id = $1")
        .bind(action.id.as_str())
        .execute(&mut **tx)
        .await?;
    let live = store::live_runs(tx, &action.id).await?;
    let limit = action.spec.concurrency as usize;
    for agent in agent_ids {
        let on_agent: Vec<&Run> = live
            .iter()
            .filter(|r| {
                r.targets
                    .iter()
                    .any(|t| t.agent_id == *agent && matches!(t.state.as_str(), "sent" | "running"))
            })
            .collect();
        if on_agent.len() >= limit {
            if let Some(busy) = on_agent.first() {
                let message = format!(
                    "'{}' is already running on these targets ({} at once allowed): started by {} at {}",
                    action.spec.name, limit, busy.actor.name, busy.started_at
                );
                let details = serde_json::json!({"run": busy.id, "by": busy.actor.name, "since": busy.started_at.to_string(), "concurrency": limit});
                return Ok(Some(Guarded {
                    code: "busy",
                    message,
                    details,
                    record: true,
                }));
            }
        }
    }
    // Read-only actions change nothing: asking again would only slow discovery.
    let confirm_rule = action
        .spec
        .confirm_within_minutes
        .filter(|_| !action.spec.read_only);
    if let (Some(minutes), false) = (confirm_rule, confirmed) {
        let since = now
            .checked_sub(jiff::SignedDuration::from_mins(i64::from(minutes)))
            .unwrap_or(now);
        let recent = store::runs_since(tx, &action.id, to_micros(since)).await?;
        if let Some(last) = recent.iter().find(|r| {
            r.targets
                .iter()
                .any(|t| agent_ids.contains(&t.agent_id.as_str()))
        }) {
            return Ok(Some(Guarded {
                code: "confirm",
                message: format!(
                    "'{}' ran on these targets at {} by {} ({}); confirm to run it again",
                    action.spec.name, last.started_at, last.actor.name, last.state
                ),
                details: serde_json::json!({"run": last.id, "by": last.actor.name, "at": last.started_at.to_string(), "state": last.state}),
                record: false,
            }));
        }
    }
    Ok(None)
}

/// The agents an action targets: below its system, only systems on which
/// the caller holds the role the action needs (a selector member that only
/// matches by its labels is not the caller's to run on).
async fn targets(
    ctx: &Context,
    access: &Access,
    needed: Role,
    action: &Action,
) -> Result<Vec<crate::agents::Agent>, sqlx::Error> {
    let mut conn = ctx.db.reader().acquire().await?;
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    let systems = if action.spec.include_subsystems {
        let mut all = graph.closure(&action.system_id);
        all.retain(|s| access.role_on(&graph, s).is_some_and(|r| r >= needed));
        all
    } else {
        vec![action.system_id.clone()]
    };
    let agents = crate::agents::store::agents(&mut conn).await?;
    Ok(agents
        .into_iter()
        .filter(|a| !a.revoked && systems.contains(&a.system_id))
        .filter(|a| {
            action.spec.subscriptions.is_empty()
                || crate::monitoring::agent_subscriptions(a)
                    .iter()
                    .any(|s| action.spec.subscriptions.contains(s))
        })
        .collect())
}

/// Starts a run, or refuses it with the reason (recorded on the timeline).
pub async fn start(
    ctx: &Context,
    access: &Access,
    action: &Action,
    req: RunRequest,
) -> Result<Run, ActionError> {
    let actor = access.actor();
    let needed = action.spec.required_role()?;
    let role = {
        let mut conn = ctx.db.reader().acquire().await?;
        let graph = crate::systems::store::load_graph(&mut conn).await?;
        access.role_on(&graph, &action.system_id)
    };
    if access.principal().is_none() || role.is_none_or(|r| r < needed) {
        let message = format!(
            "running '{}' needs the {needed} role on '{}'",
            action.spec.name, action.system
        );
        return Err(refuse(
            ctx,
            &actor,
            action,
            "forbidden",
            message,
            serde_json::json!({}),
        )
        .await);
    }
    let params = match action.spec.check_params(&req.params) {
        Ok(p) => p,
        Err(invalid) => {
            let message = format!("{}: {}", invalid.field, invalid.message);
            return Err(refuse(
                ctx,
                &actor,
                action,
                "invalid_params",
                message,
                serde_json::json!({"field": invalid.field}),
            )
            .await);
        }
    };
    let now = ctx.now();
    let override_reason = req
        .override_reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    if !action.spec.in_window(now) && override_reason.is_none() {
        let message = format!(
            "outside the allowed windows: {}; give an override reason to run it anyway",
            action.spec.describe_windows()
        );
        return Err(refuse(
            ctx,
            &actor,
            action,
            "outside_window",
            message,
            serde_json::json!({"windows": action.spec.windows}),
        )
        .await);
    }
    let agents = targets(ctx, access, needed, action).await?;
    if agents.is_empty() {
        let message = format!(
            "no enrolled agent of '{}' matches this action",
            action.system
        );
        return Err(refuse(
            ctx,
            &actor,
            action,
            "no_targets",
            message,
            serde_json::json!({}),
        )
        .await);
    }
    let run_id = new_id().to_string();
    let mut run = Run {
        id: run_id.clone(),
        action: action.spec.name.clone(),
        system: action.system.clone(),
        system_id: action.system_id.clone(),
        actor: actor.clone(),
        params: params.clone(),
        override_reason: override_reason.clone(),
        state: "running".into(),
        started_at: now,
        finished_at: None,
        timeout_secs: Some(action.spec.timeout),
        cancelled_by: None,
        cancelled_at: None,
        answers: Vec::new(),
        targets: agents
            .iter()
            .map(|a| {
                let connected = ctx.agents.is_connected(&a.id);
                RunTarget {
                    agent_id: a.id.clone(),
                    agent: a.name.clone(),
                    system_id: a.system_id.clone(),
                    state: if connected { "sent" } else { "unreachable" }.into(),
                    exit_code: None,
                    output: String::new(),
                    output_size: 0,
                    message: if connected {
                        String::new()
                    } else {
                        "the agent is not connected".into()
                    },
                    finished_at: None,
                    timeout_secs: None,
                }
            })
            .collect(),
    };
    let mut tx = ctx.db.begin_recording().await?;
    let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    if let Some(g) = guard(&mut tx, action, &ids, req.confirm, now).await? {
        if g.record {
            record_refusal(ctx, &mut tx, &actor, action, g.code, &g.message, &g.details).await?;
            ctx.commit(tx).await?;
        }
        return Err(ActionError::Refused {
            code: g.code,
            message: g.message,
            details: g.details,
        });
    }
    store::insert_run(&mut tx, &run, &action.id, &action.system_id).await?;
    let names: Vec<&str> = run.targets.iter().map(|t| t.agent.as_str()).collect();
    let (severity, title) = match &override_reason {
        Some(reason) => (
            Severity::Warning,
            format!(
                "EMERGENCY OVERRIDE: {} ran '{}' outside its windows on {} — {reason}",
                actor.name,
                action.spec.name,
                names.join(", ")
            ),
        ),
        None => (
            Severity::Info,
            format!(
                "{} ran '{}' on {}",
                actor.name,
                action.spec.name,
                names.join(", ")
            ),
        ),
    };
    let mut event = NewEvent::internal(
        "action.started",
        severity,
        title.chars().take(500).collect(),
        serde_json::json!({"action": action.spec.name, "run": run_id, "params": params, "targets": names, "override_reason": override_reason}),
    );
    event.body = action.spec.description.chars().take(2000).collect();
    timeline::append(
        ctx,
        &mut tx,
        &actor,
        Target {
            id: &action.system_id,
            slug: &action.system,
        },
        event,
    )
    .await?;
    if run.targets.iter().all(|t| t.state == "unreachable") {
        run_finished(ctx, &mut tx, &run_id).await?;
        run.state = "failed".into();
        run.finished_at = Some(now);
    }
    ctx.commit(tx).await?;
    dispatch(ctx, action, &run, &params);
    Ok(run)
}

/// Signs and sends the request to each connected target.
fn dispatch(ctx: &Context, action: &Action, run: &Run, params: &BTreeMap<String, String>) {
    let expires_at = to_micros(ctx.now()) + REQUEST_TTL_SECS * 1_000_000;
    for t in run.targets.iter().filter(|t| t.state == "sent") {
        let request = ActionRequest {
            run_id: run.id.clone(),
            audience: t.agent_id.clone(),
            action: action.spec.name.clone(),
            params: params.clone(),
            expires_at,
            timeout_secs: run.timeout_secs.unwrap_or(action.spec.timeout),
        };
        let signature = hex(&ctx.identity.sign(&action_transcript(&request)).to_bytes());
        ctx.agents.send(
            &t.agent_id,
            ServerMessage::Action(SignedAction { request, signature }),
        );
    }
}

/// Live progress from an agent: `started` and output chunks.
pub async fn progress(
    ctx: &Context,
    agent: &AgentRef,
    update: &ActionUpdate,
) -> Result<(), sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    // Only an agent that is a target of this run may speak for it: anything
    // else is neither stored nor shown to the run's viewers.
    let matched = match update.state {
        ActionState::Started => {
            // The outcome (through the queue) may have come first: then
            // only the timeout is news.
            sqlx::query("UPDATE action_run_targets SET state = CASE WHEN state = 'sent' THEN 'running' ELSE state END, timeout_secs = COALESCE(timeout_secs, $3) WHERE run_id = $1 AND agent_id = $2")
                .bind(update.run_id.as_str())
                .bind(agent.id.as_str())
                .bind(update.timeout_secs.map(i64::from))
                .execute(&mut *tx)
                .await?
                .rows_affected()
                > 0
        }
        ActionState::Output => {
            append_output(&mut tx, &update.run_id, &agent.id, &update.output).await?
        }
        _ => false,
    };
    tx.commit().await?;
    if matched {
        ctx.agents
            .output(&update.run_id, &agent.name, &update.output);
    } else {
        tracing::warn!(agent = %agent.name, run = %update.run_id, "progress for a run this agent is not a target of: ignored");
    }
    Ok(())
}

async fn append_output(
    tx: &mut Tx,
    run_id: &str,
    agent_id: &str,
    chunk: &str,
) -> Result<bool, sqlx::Error> {
    use sqlx::Row;
    let row =
        sqlx::query("SELECT output FROM action_run_targets WHERE run_id = $1 AND agent_id = $2")
            .bind(run_id)
            .bind(agent_id)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(row) = row else { return Ok(false) };
    let mut output: String = row.try_get(0)?;
    let room = OUTPUT_LIMIT.saturating_sub(output.len());
    let mut cut = room.min(chunk.len());
    while !chunk.is_char_boundary(cut) {
        cut -= 1;
    }
    output.push_str(&chunk[..cut]);
    sqlx::query("UPDATE action_run_targets SET output = $3, output_size = output_size + $4 WHERE run_id = $1 AND agent_id = $2")
        .bind(run_id)
        .bind(agent_id)
        .bind(output)
        .bind(chunk.len() as i64)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

/// Refusals an agent makes of a request the server signed for it and it
/// had not seen: the run's genuine outcome on that agent. Any other
/// refusal (a replay, a forgery, another audience, or one without a code)
/// is a security event and changes no run.
const OWN_REQUEST_REFUSALS: [&str; 6] = [
    "not_allowed",
    "unknown_param",
    "missing_param",
    "leading_dash",
    "value_not_allowed",
    "expired",
];

/// The final outcome of a target, committed by the results writer with the
/// rest of the agent's records. Returns true if it wrote a timeline event.
pub async fn finish(
    ctx: &Context,
    tx: &mut Tx,
    agent: &AgentRef,
    update: &ActionUpdate,
) -> Result<bool, sqlx::Error> {
    let current = store::target_state(tx, &update.run_id, &agent.id).await?;
    if update.state == ActionState::Refused {
        let own = current.as_deref() == Some("sent")
            && update
                .refusal
                .as_deref()
                .is_some_and(|code| OWN_REQUEST_REFUSALS.contains(&code));
        if !own {
            record_refused_request(ctx, tx, agent, update).await?;
            return Ok(true);
        }
    }
    let Some(current) = current else {
        tracing::warn!(agent = %agent.name, run = %update.run_id, "an outcome for an unknown run");
        return Ok(false);
    };
    if !matches!(current.as_str(), "sent" | "running") {
        return Ok(false);
    }
    let state = state_name(update.state);
    sqlx::query(
        "UPDATE action_run_targets SET state = $3, exit_code = $4, message = $5, finished_at = $6, timeout_secs = COALESCE($7, timeout_secs) WHERE run_id = $1 AND agent_id = $2",
    )
    .bind(update.run_id.as_str())
    .bind(agent.id.as_str())
    .bind(state)
    .bind(update.exit_code.map(i64::from))
    .bind(update.output.chars().take(2000).collect::<String>())
    .bind(to_micros(ctx.now()))
    .bind(update.timeout_secs.map(i64::from))
    .execute(&mut **tx)
    .await?;
    if update.state == ActionState::Refused {
        let run = store::run(tx, &update.run_id).await?;
        if let Some(run) = run {
            let (sid, slug) = crate::agents::store::system_by_slug(tx, &run.system)
                .await?
                .unwrap_or_default();
            let event = NewEvent::internal(
                "action.refused",
                Severity::Warning,
                format!(
                    "Agent '{}' refused '{}': {}",
                    agent.name, run.action, update.output
                )
                .chars()
                .take(500)
                .collect(),
                serde_json::json!({"action": run.action, "run": run.id, "agent": agent.name, "reason": update.output, "refusal": update.refusal}),
            );
            timeline::append(
                ctx,
                tx,
                &Actor::agent(&agent.id, &agent.name),
                Target {
                    id: &sid,
                    slug: &slug,
                },
                event,
            )
            .await?;
        }
    }
    run_finished(ctx, tx, &update.run_id).await
}

/// An agent refused a request this server did not send it as such: a
/// replayed or tampered copy of a known run's request, one for another
/// agent, or one for a run this server never made. Recorded loudly on the
/// agent's system (which rolls up into the run's); no run changes, so a
/// live run stays running and cancellable.
async fn record_refused_request(
    ctx: &Context,
    tx: &mut Tx,
    agent: &AgentRef,
    update: &ActionUpdate,
) -> Result<(), sqlx::Error> {
    // Describe the run only to the owners of one of its targets: the
    // agent's timeline must not tell them about other tenants' runs.
    let run = store::run(tx, &update.run_id)
        .await?
        .filter(|run| run.targets.iter().any(|t| t.agent_id == agent.id));
    let title = match &run {
        Some(run) => format!(
            "Security: agent '{}' refused a replayed or altered request for run {} of '{}' ({}): {}",
            agent.name, run.id, run.action, run.state, update.output
        ),
        None => format!(
            "Security: agent '{}' refused a request for run {} that this server did not send it: {}",
            agent.name, update.run_id, update.output
        ),
    };
    let event = NewEvent::internal(
        "action.refused",
        Severity::Warning,
        title.chars().take(500).collect(),
        serde_json::json!({
            "security": true,
            "run": update.run_id,
            "known_run": run.is_some(),
            "action": run.as_ref().map(|r| r.action.clone()),
            "run_state": run.as_ref().map(|r| r.state.clone()),
            "agent": agent.name,
            "agent_id": agent.id,
            "reason": update.output.chars().take(2000).collect::<String>(),
            "refusal": update.refusal,
        }),
    );
    timeline::append(
        ctx,
        tx,
        &Actor::agent(&agent.id, &agent.name),
        Target {
            id: &agent.system_id,
            slug: &agent.system,
        },
        event,
    )
    .await?;
    tracing::warn!(agent = %agent.name, run = %update.run_id, refusal = ?update.refusal, "an agent refused a request this server did not send it as such");
    Ok(())
}

/// Closes the run once every target is done; records the outcome.
async fn run_finished(ctx: &Context, tx: &mut Tx, run_id: &str) -> Result<bool, sqlx::Error> {
    let Some(run) = store::run(tx, run_id).await? else {
        return Ok(false);
    };
    if run.state != "running"
        || run
            .targets
            .iter()
            .any(|t| matches!(t.state.as_str(), "sent" | "running"))
    {
        return Ok(false);
    }
    let all_ok = run.targets.iter().all(|t| t.state == "succeeded");
    let cancelled = run.targets.iter().any(|t| t.state == "cancelled");
    let state = if all_ok {
        "succeeded"
    } else if cancelled {
        "cancelled"
    } else {
        "failed"
    };
    let now = to_micros(ctx.now());
    sqlx::query("UPDATE action_runs SET state = $2, finished_at = $3 WHERE id = $1")
        .bind(run_id)
        .bind(state)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    let per_target: Vec<String> = run
        .targets
        .iter()
        .map(|t| match t.exit_code {
            Some(code) => format!("{}: {} (exit {code})", t.agent, t.state),
            None => format!("{}: {}", t.agent, t.state),
        })
        .collect();
    let mut body = String::new();
    for t in &run.targets {
        let cut = if t.output_size as usize > t.output.len() {
            format!(" (first {} of {} bytes)", t.output.len(), t.output_size)
        } else {
            String::new()
        };
        body.push_str(&format!(
            "**{}** — {}{cut}\n\n```\n{}\n```\n\n",
            t.agent,
            t.state,
            t.output
                .replace("```", "'''")
                .chars()
                .take(8000)
                .collect::<String>()
        ));
        if !t.message.is_empty() {
            body.push_str(&format!("{}\n\n", t.message));
        }
    }
    let severity = if all_ok {
        Severity::Ok
    } else {
        Severity::Warning
    };
    let by = run
        .cancelled_by
        .as_ref()
        .map(|c| format!(" (cancel asked by {})", c.name))
        .unwrap_or_default();
    let mut event = NewEvent::internal(
        "action.finished",
        severity,
        format!("'{}' {state}{by}: {}", run.action, per_target.join(", "))
            .chars()
            .take(500)
            .collect(),
        serde_json::json!({"action": run.action, "run": run.id, "state": state, "cancelled_by": run.cancelled_by, "timeout_secs": run.timeout_secs, "targets": run.targets.iter().map(|t| serde_json::json!({"agent": t.agent, "state": t.state, "exit_code": t.exit_code, "output_size": t.output_size, "timeout_secs": t.timeout_secs})).collect::<Vec<_>>()}),
    );
    event.body = body.chars().take(60_000).collect();
    let (sid, slug) = crate::agents::store::system_by_slug(tx, &run.system)
        .await?
        .unwrap_or_default();
    timeline::append(
        ctx,
        tx,
        &run.actor,
        Target {
            id: &sid,
            slug: &slug,
        },
        event,
    )
    .await?;
    Ok(true)
}

impl Run {
    /// The run as `access` may see it: only the targets whose agents are
    /// bound to systems the caller may see (seeing the run's system is not
    /// enough: its targets may lie beyond the caller's grants).
    pub fn seen_by(mut self, access: &Access, graph: &crate::systems::graph::Graph) -> Run {
        if let Some(visible) = access.visible(graph) {
            self.targets.retain(|t| visible.contains(&t.system_id));
            self.answers = group_answers(&self.targets);
        }
        self
    }
}

/// Asks the agents of a running run to stop it.
pub async fn cancel(ctx: &Context, access: &Access, run_id: &str) -> Result<Run, ActionError> {
    let mut conn = ctx.db.reader().acquire().await?;
    let run = store::run(&mut conn, run_id)
        .await?
        .ok_or_else(|| ActionError::UnknownRun(run_id.to_owned()))?;
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    // By id: a slug names whichever live system holds it now.
    let role = graph
        .node(&run.system_id)
        .and_then(|_| access.role_on(&graph, &run.system_id));
    if role.is_none() || access.principal().is_none() {
        // Runs of systems the caller cannot see do not exist for them.
        return Err(ActionError::UnknownRun(run_id.to_owned()));
    }
    if role.is_none_or(|r| r < Role::Operator) {
        return Err(ActionError::Refused {
            code: "forbidden",
            message: "cancelling a run needs the operator role on its system".into(),
            details: serde_json::json!({}),
        });
    }
    drop(conn);
    let live: Vec<&RunTarget> = run
        .targets
        .iter()
        .filter(|t| matches!(t.state.as_str(), "sent" | "running"))
        .collect();
    if run.state != "running" || live.is_empty() {
        return Err(ActionError::Refused {
            code: "not_running",
            message: format!("run {run_id} is not running ({})", run.state),
            details: serde_json::json!({"state": run.state}),
        });
    }
    // The first canceller is recorded on the run and on the timeline; a
    // second request only asks the agents again.
    let actor = access.actor();
    let now = ctx.now();
    let mut tx = ctx.db.begin_recording().await?;
    let marked = sqlx::query(
        "UPDATE action_runs SET cancelled_by = $2, cancelled_at = $3 WHERE id = $1 AND state = 'running' AND cancelled_by IS NULL",
    )
    .bind(run.id.as_str())
    .bind(serde_json::to_string(&actor).map_err(|e| sqlx::Error::Encode(Box::new(e)))?)
    .bind(to_micros(now))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if marked == 1 {
        let agents: Vec<&str> = live.iter().map(|t| t.agent.as_str()).collect();
        let event = NewEvent::internal(
            "action.cancelled",
            Severity::Warning,
            format!(
                "{} cancelled '{}' (run by {}) on {}",
                actor.name,
                run.action,
                run.actor.name,
                agents.join(", ")
            )
            .chars()
            .take(500)
            .collect(),
            serde_json::json!({"action": run.action, "run": run.id, "cancelled_by": actor, "started_by": run.actor, "targets": agents}),
        );
        timeline::append(
            ctx,
            &mut tx,
            &actor,
            Target {
                id: &run.system_id,
                slug: &run.system,
            },
            event,
        )
        .await?;
    }
    ctx.commit(tx).await?;
    for t in &live {
        ctx.agents.send(
            &t.agent_id,
            ServerMessage::Cancel {
                run_id: run.id.clone(),
            },
        );
    }
    let mut conn = ctx.db.reader().acquire().await?;
    store::run(&mut conn, run_id)
        .await?
        .ok_or_else(|| ActionError::UnknownRun(run_id.to_owned()))
}

/// Marks targets that never reported back as `lost` once their request
/// expired and their timeout passed, so that a vanished agent does not
/// hold a run (and the concurrency guard) open for ever. Returns how many.
pub async fn expire_lost(ctx: &Context) -> Result<usize, sqlx::Error> {
    use sqlx::Row;
    let now = to_micros(ctx.now());
    let rows = sqlx::query(
        "SELECT t.run_id, t.agent_id, r.started_at, r.timeout_secs, a.spec FROM action_run_targets t \
         JOIN action_runs r ON r.id = t.run_id JOIN actions a ON a.id = r.action_id \
         WHERE t.state IN ('sent', 'running')",
    )
    .fetch_all(ctx.db.reader())
    .await?;
    let mut lost = 0;
    for row in rows {
        // The timeout the run asked for: the action may have changed since.
        let asked = row
            .try_get::<Option<i64>, _>("timeout_secs")?
            .and_then(|t| u32::try_from(t).ok());
        let spec: String = row.try_get("spec")?;
        let timeout = asked.unwrap_or_else(|| {
            serde_json::from_str::<super::model::ActionSpec>(&spec).map_or(60, |s| s.timeout)
        });
        let started: i64 = row.try_get("started_at")?;
        let give_up = started + (REQUEST_TTL_SECS + i64::from(timeout) + 60) * 1_000_000;
        if now < give_up {
            continue;
        }
        let (run_id, agent_id): (String, String) =
            (row.try_get("run_id")?, row.try_get("agent_id")?);
        let mut tx = ctx.db.begin_recording().await?;
        sqlx::query(
            "UPDATE action_run_targets SET state = 'lost', message = $3, finished_at = $4 \
             WHERE run_id = $1 AND agent_id = $2 AND state IN ('sent', 'running')",
        )
        .bind(run_id.as_str())
        .bind(agent_id.as_str())
        .bind("no outcome from the agent before its request expired and its timeout passed")
        .bind(now)
        .execute(&mut *tx)
        .await?;
        run_finished(ctx, &mut tx, &run_id).await?;
        ctx.commit(tx).await?;
        lost += 1;
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(list: &[(&str, &str)]) -> Vec<RunTarget> {
        list.iter()
            .map(|(agent, output)| RunTarget {
                agent_id: (*agent).to_owned(),
                agent: (*agent).to_owned(),
                system_id: String::new(),
                state: "succeeded".into(),
                exit_code: Some(0),
                output: (*output).to_owned(),
                output_size: output.len() as i64,
                message: String::new(),
                finished_at: None,
                timeout_secs: None,
            })
            .collect()
    }

    #[test]
    fn equal_json_answers_are_one_group_whatever_the_key_order() {
        let got = group_answers(&done(&[
            ("web-1", "{\"a\": 1, \"b\": [1, {\"y\": 2, \"x\": 1}]}\n"),
            ("web-2", "{\"b\":[1,{\"x\":1,\"y\":2}],\"a\":1}"),
            ("web-3", "{\"a\": 2}"),
        ]));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].agents, ["web-1", "web-2"]);
        assert_eq!(got[1].agents, ["web-3"]);
    }

    #[test]
    fn text_answers_compare_trimmed() {
        let got = group_answers(&done(&[
            ("a", "6.1.0\n"),
            ("b", "  6.1.0"),
            ("c", "{\"not\": \"all json\"}"),
        ]));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].agents, ["a", "b"]);
        assert_eq!(got[0].answer, serde_json::Value::String("6.1.0".into()));
    }
}
