//! SQL for check definitions, observations and their history.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::checks::CheckSpec;
use super::{Check, Observation, Sample};
use crate::db::{from_micros, Sql, Tx};

fn check_from(r: &AnyRow) -> Result<Check, sqlx::Error> {
    let spec: String = r.try_get("spec")?;
    let spec: CheckSpec =
        serde_json::from_str(&spec).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Check {
        id: r.try_get("id")?,
        spec,
        created_at: from_micros(r.try_get("created_at")?),
        updated_at: from_micros(r.try_get("updated_at")?),
    })
}

pub async fn checks(conn: &mut AnyConnection) -> Result<Vec<Check>, sqlx::Error> {
    let rows = sqlx::query("SELECT id, spec, created_at, updated_at FROM checks ORDER BY name")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(check_from).collect()
}

pub async fn check(conn: &mut AnyConnection, name: &str) -> Result<Option<Check>, sqlx::Error> {
    let row = sqlx::query("SELECT id, spec, created_at, updated_at FROM checks WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(check_from).transpose()
}

pub async fn insert_check(
    tx: &mut Tx,
    id: &str,
    spec: &CheckSpec,
    now: i64,
) -> Result<(), sqlx::Error> {
    let text = serde_json::to_string(spec).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO checks (id, name, spec, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)",
    )
    .bind(id)
    .bind(spec.name.as_str())
    .bind(text)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn update_check(tx: &mut Tx, spec: &CheckSpec, now: i64) -> Result<(), sqlx::Error> {
    let text = serde_json::to_string(spec).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query("UPDATE checks SET spec = $2, updated_at = $3 WHERE name = $1")
        .bind(spec.name.as_str())
        .bind(text)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn delete_check(tx: &mut Tx, name: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM checks WHERE name = $1")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected() > 0)
}

const OBSERVATION_COLUMNS: &str = "o.system_id, s.slug, o.check_name, o.labels, o.status, o.state, o.output, \
     o.metrics, o.agent_id, o.executed_at, o.received_at, o.occurrences, o.state_since, o.ttl_deadline";

fn observation_from(r: &AnyRow) -> Result<Observation, sqlx::Error> {
    let labels: String = r.try_get("labels")?;
    let metrics: String = r.try_get("metrics")?;
    Ok(Observation {
        system: r.try_get("slug")?,
        check: r.try_get("check_name")?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        status: r.try_get("status")?,
        state: r.try_get("state")?,
        output: r.try_get("output")?,
        metrics: serde_json::from_str(&metrics).unwrap_or_default(),
        agent_id: r.try_get("agent_id")?,
        executed_at: from_micros(r.try_get("executed_at")?),
        received_at: from_micros(r.try_get("received_at")?),
        occurrences: r.try_get("occurrences")?,
        state_since: from_micros(r.try_get("state_since")?),
        ttl_deadline: r
            .try_get::<Option<i64>, _>("ttl_deadline")?
            .map(from_micros),
    })
}

/// Latest results, optionally only those of some systems (by id).
pub async fn observations(
    conn: &mut AnyConnection,
    system_ids: Option<&[String]>,
) -> Result<Vec<Observation>, sqlx::Error> {
    let base = format!(
        "SELECT {OBSERVATION_COLUMNS} FROM observations o JOIN systems s ON s.id = o.system_id"
    );
    let Some(ids) = system_ids else {
        let sql = format!("{base} ORDER BY s.slug, o.check_name, o.labels_key");
        let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
        return rows.iter().map(observation_from).collect();
    };
    let mut out = Vec::new();
    for chunk in ids.chunks(500) {
        let mut sql = Sql::new(&format!("{base} WHERE o.system_id IN "));
        sql.bind_list(chunk.iter())
            .push(" ORDER BY s.slug, o.check_name, o.labels_key");
        for row in sql.query().fetch_all(&mut *conn).await? {
            out.push(observation_from(&row)?);
        }
    }
    Ok(out)
}

/// History of one check on one system, newest first.
pub async fn history(
    conn: &mut AnyConnection,
    system_id: &str,
    check: &str,
    labels_key: Option<&str>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<Sample>, sqlx::Error> {
    let mut sql = Sql::new(
        "SELECT id, labels_key, status, output, metrics, agent_id, agent_seq, executed_at, received_at \
         FROM observation_history WHERE system_id = ",
    );
    sql.bind(system_id.to_owned())
        .push(" AND check_name = ")
        .bind(check.to_owned());
    if let Some(key) = labels_key {
        sql.push(" AND labels_key = ").bind(key.to_owned());
    }
    if let Some(before) = before {
        sql.push(" AND executed_at < ").bind(before);
    }
    sql.push(" ORDER BY executed_at DESC, id DESC LIMIT ")
        .bind(limit);
    let rows = sql.query().fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| {
            let metrics: String = r.try_get("metrics")?;
            let labels_key: String = r.try_get("labels_key")?;
            Ok(Sample {
                labels: serde_json::from_str(&labels_key).unwrap_or_default(),
                status: r.try_get("status")?,
                output: r.try_get("output")?,
                metrics: serde_json::from_str(&metrics).unwrap_or_default(),
                agent_id: r.try_get("agent_id")?,
                agent_seq: r.try_get("agent_seq")?,
                executed_at: from_micros(r.try_get("executed_at")?),
                received_at: from_micros(r.try_get("received_at")?),
            })
        })
        .collect()
}

/// Forgets history received before `cutoff` (µs); returns how much.
pub async fn purge_history(tx: &mut Tx, cutoff: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM observation_history WHERE received_at < $1")
        .bind(cutoff)
        .execute(&mut **tx)
        .await?;
    Ok(done.rows_affected())
}
