//! SQL for actions and their runs.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::model::ActionSpec;
use super::runs::{Run, RunTarget};
use super::Action;
use crate::db::{from_micros, Tx};

fn action_from(r: &AnyRow) -> Result<Action, sqlx::Error> {
    let spec: String = r.try_get("spec")?;
    Ok(Action {
        id: r.try_get("id")?,
        system: r.try_get("slug")?,
        system_id: r.try_get("system_id")?,
        spec: serde_json::from_str(&spec).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        updated_at: from_micros(r.try_get("updated_at")?),
    })
}

const ACTION_COLUMNS: &str = "a.id, a.system_id, s.slug, a.spec, a.updated_at";

pub async fn action(
    conn: &mut AnyConnection,
    system_id: &str,
    name: &str,
) -> Result<Option<Action>, sqlx::Error> {
    let sql = format!(
        "SELECT {ACTION_COLUMNS} FROM actions a JOIN systems s ON s.id = a.system_id WHERE a.system_id = $1 AND a.name = $2"
    );
    let row = sqlx::query(&sql)
        .bind(system_id)
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(action_from).transpose()
}

pub async fn action_by_id(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<Action>, sqlx::Error> {
    let sql = format!("SELECT {ACTION_COLUMNS} FROM actions a JOIN systems s ON s.id = a.system_id WHERE a.id = $1");
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(action_from).transpose()
}

/// Actions of some systems (by id), or all.
pub async fn actions(
    conn: &mut AnyConnection,
    system_ids: Option<&[String]>,
) -> Result<Vec<Action>, sqlx::Error> {
    // Deleted actions that keep their runs are renamed `…#deleted-…`.
    let sql = format!(
        "SELECT {ACTION_COLUMNS} FROM actions a JOIN systems s ON s.id = a.system_id \
         WHERE a.name NOT LIKE '%#deleted-%' ORDER BY s.slug, a.name"
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    let all = rows
        .iter()
        .map(action_from)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match system_ids {
        None => all,
        Some(ids) => all
            .into_iter()
            .filter(|a| ids.contains(&a.system_id))
            .collect(),
    })
}

pub async fn insert(
    tx: &mut Tx,
    id: &str,
    system_id: &str,
    spec: &ActionSpec,
    now: i64,
) -> Result<(), sqlx::Error> {
    let text = serde_json::to_string(spec).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("INSERT INTO actions (id, system_id, name, spec, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)")
        .bind(id)
        .bind(system_id)
        .bind(spec.name.as_str())
        .bind(text)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn update(tx: &mut Tx, id: &str, spec: &ActionSpec, now: i64) -> Result<(), sqlx::Error> {
    let text = serde_json::to_string(spec).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("UPDATE actions SET spec = $2, updated_at = $3 WHERE id = $1")
        .bind(id)
        .bind(text)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn delete(tx: &mut Tx, system_id: &str, name: &str) -> Result<bool, sqlx::Error> {
    let runs = sqlx::query("SELECT COUNT(*) FROM action_runs r JOIN actions a ON a.id = r.action_id WHERE a.system_id = $1 AND a.name = $2")
        .bind(system_id)
        .bind(name)
        .fetch_one(&mut **tx)
        .await?
        .try_get::<i64, _>(0)?;
    if runs > 0 {
        // Runs keep their action: rename it out of the way instead.
        let done = sqlx::query("UPDATE actions SET name = name || '#deleted-' || id WHERE system_id = $1 AND name = $2")
            .bind(system_id)
            .bind(name)
            .execute(&mut **tx)
            .await?;
        return Ok(done.rows_affected() > 0);
    }
    let done = sqlx::query("DELETE FROM actions WHERE system_id = $1 AND name = $2")
        .bind(system_id)
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub async fn insert_run(
    tx: &mut Tx,
    run: &Run,
    action_id: &str,
    system_id: &str,
) -> Result<(), sqlx::Error> {
    let actor = serde_json::to_string(&run.actor).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let params =
        serde_json::to_string(&run.params).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO action_runs (id, action_id, system_id, actor, params, override_reason, state, started_at, timeout_secs) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(run.id.as_str())
    .bind(action_id)
    .bind(system_id)
    .bind(actor)
    .bind(params)
    .bind(run.override_reason.as_deref())
    .bind(run.state.as_str())
    .bind(crate::db::to_micros(run.started_at))
    .bind(run.timeout_secs.map(i64::from))
    .execute(&mut **tx)
    .await?;
    for t in &run.targets {
        sqlx::query("INSERT INTO action_run_targets (run_id, agent_id, state, message) VALUES ($1, $2, $3, $4)")
            .bind(run.id.as_str())
            .bind(t.agent_id.as_str())
            .bind(t.state.as_str())
            .bind(t.message.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

fn run_from(r: &AnyRow, targets: Vec<RunTarget>) -> Result<Run, sqlx::Error> {
    let actor: String = r.try_get("actor")?;
    let params: String = r.try_get("params")?;
    Ok(Run {
        id: r.try_get("id")?,
        action: r.try_get("name")?,
        system: r.try_get("slug")?,
        system_id: r.try_get("system_id")?,
        actor: serde_json::from_str(&actor).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        params: serde_json::from_str(&params).unwrap_or_default(),
        override_reason: r.try_get("override_reason")?,
        state: r.try_get("state")?,
        started_at: from_micros(r.try_get("started_at")?),
        finished_at: r.try_get::<Option<i64>, _>("finished_at")?.map(from_micros),
        timeout_secs: seconds(r.try_get("timeout_secs")?),
        cancelled_by: r
            .try_get::<Option<String>, _>("cancelled_by")?
            .and_then(|a| serde_json::from_str(&a).ok()),
        cancelled_at: r
            .try_get::<Option<i64>, _>("cancelled_at")?
            .map(from_micros),
        answers: super::runs::group_answers(&targets),
        targets,
    })
}

/// A stored number of seconds (NULL or out of range: unknown).
fn seconds(v: Option<i64>) -> Option<u32> {
    v.and_then(|n| u32::try_from(n).ok())
}

const RUN_COLUMNS: &str = "r.id, a.name, s.slug, r.system_id, r.actor, r.params, r.override_reason, r.state, r.started_at, r.finished_at, r.timeout_secs, r.cancelled_by, r.cancelled_at";

pub async fn targets(
    conn: &mut AnyConnection,
    run_id: &str,
) -> Result<Vec<RunTarget>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT t.agent_id, g.name, g.system_id, t.state, t.exit_code, t.output, t.output_size, t.message, t.finished_at, t.timeout_secs \
         FROM action_run_targets t JOIN agents g ON g.id = t.agent_id WHERE t.run_id = $1 ORDER BY g.name",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(RunTarget {
                agent_id: r.try_get("agent_id")?,
                agent: r.try_get("name")?,
                system_id: r.try_get("system_id")?,
                state: r.try_get("state")?,
                exit_code: r.try_get::<Option<i64>, _>("exit_code")?.map(|c| c as i32),
                output: r.try_get("output")?,
                output_size: r.try_get("output_size")?,
                message: r.try_get("message")?,
                finished_at: r.try_get::<Option<i64>, _>("finished_at")?.map(from_micros),
                timeout_secs: seconds(r.try_get("timeout_secs")?),
            })
        })
        .collect()
}

pub async fn run(conn: &mut AnyConnection, id: &str) -> Result<Option<Run>, sqlx::Error> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM action_runs r JOIN actions a ON a.id = r.action_id JOIN systems s ON s.id = r.system_id WHERE r.id = $1"
    );
    let Some(row) = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
    else {
        return Ok(None);
    };
    let targets = targets(conn, id).await?;
    run_from(&row, targets).map(Some)
}

/// The latest runs of an action, newest first.
pub async fn runs_of(
    conn: &mut AnyConnection,
    action_id: &str,
    limit: i64,
) -> Result<Vec<Run>, sqlx::Error> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM action_runs r JOIN actions a ON a.id = r.action_id JOIN systems s ON s.id = r.system_id \
         WHERE r.action_id = $1 ORDER BY r.started_at DESC LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(action_id)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = row.try_get("id")?;
        let targets = targets(conn, &id).await?;
        out.push(run_from(row, targets)?);
    }
    Ok(out)
}

/// Runs of an action with a target still sent or running, oldest first.
pub async fn live_runs(conn: &mut AnyConnection, action_id: &str) -> Result<Vec<Run>, sqlx::Error> {
    runs_where(
        conn,
        "r.action_id = $1 AND EXISTS (SELECT 1 FROM action_run_targets t WHERE t.run_id = r.id AND t.state IN ('sent', 'running')) ORDER BY r.started_at",
        action_id,
        None,
    )
    .await
}

/// Runs of an action started at or after `since` (µs), newest first.
pub async fn runs_since(
    conn: &mut AnyConnection,
    action_id: &str,
    since: i64,
) -> Result<Vec<Run>, sqlx::Error> {
    runs_where(
        conn,
        "r.action_id = $1 AND r.started_at >= $2 ORDER BY r.started_at DESC",
        action_id,
        Some(since),
    )
    .await
}

async fn runs_where(
    conn: &mut AnyConnection,
    condition: &str,
    action_id: &str,
    since: Option<i64>,
) -> Result<Vec<Run>, sqlx::Error> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM action_runs r JOIN actions a ON a.id = r.action_id JOIN systems s ON s.id = r.system_id WHERE {condition}"
    );
    let mut query = sqlx::query(&sql).bind(action_id);
    if let Some(since) = since {
        query = query.bind(since);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = row.try_get("id")?;
        let targets = targets(conn, &id).await?;
        out.push(run_from(row, targets)?);
    }
    Ok(out)
}

/// A target's row as the writer needs it to finish a run.
pub async fn target_state(
    tx: &mut Tx,
    run_id: &str,
    agent_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row =
        sqlx::query("SELECT state FROM action_run_targets WHERE run_id = $1 AND agent_id = $2")
            .bind(run_id)
            .bind(agent_id)
            .fetch_optional(&mut **tx)
            .await?;
    row.map(|r| r.try_get(0)).transpose()
}
