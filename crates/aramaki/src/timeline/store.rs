//! SQL for the timeline.

use std::collections::HashMap;

use aramaki_protocol::{ActorKind, Severity};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use uuid::Uuid;

use super::{Actor, Event, Idempotency};
use crate::db::{from_micros, like_escape, to_micros, Sql, Tx};

const COLUMNS: &str = "e.seq, e.id, e.system_id, s.slug, e.occurred_at, e.recorded_at, e.kind, \
    e.severity, e.title, e.body, e.actor_kind, e.actor_id, e.actor_name, e.data, e.origin, e.caused_by";

/// Inserts the event and returns its sequence number.
pub async fn insert(tx: &mut Tx, e: &Event, idem: Option<&Idempotency>) -> Result<i64, sqlx::Error> {
    let row = sqlx::query(
        "INSERT INTO events (id, system_id, occurred_at, recorded_at, kind, severity, title, body, \
         actor_kind, actor_id, actor_name, data, origin, caused_by, idem_scope, idem_key, idem_hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) RETURNING seq",
    )
    .bind(e.id.to_string())
    .bind(e.system_id.as_str())
    .bind(to_micros(e.occurred_at))
    .bind(to_micros(e.recorded_at))
    .bind(e.kind.as_str())
    .bind(e.severity.rank())
    .bind(e.title.as_str())
    .bind(e.body.as_str())
    .bind(e.actor.kind.as_str())
    .bind(e.actor.id.as_deref())
    .bind(e.actor.name.as_str())
    .bind(e.data.to_string())
    .bind(e.origin.as_str())
    .bind(e.caused_by.map(|c| c.to_string()))
    .bind(idem.map(|i| i.scope.clone()))
    .bind(idem.map(|i| i.key.clone()))
    .bind(idem.map(|i| i.request_hash.clone()))
    .fetch_one(&mut **tx)
    .await?;
    row.try_get::<i64, _>(0)
}

/// Records the state a state event sets, per (system, source).
pub async fn set_state(tx: &mut Tx, e: &Event, source: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO system_states (system_id, source, severity, summary, event_id, since) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (system_id, source) DO UPDATE SET severity = excluded.severity, \
         summary = excluded.summary, event_id = excluded.event_id, since = excluded.since",
    )
    .bind(e.system_id.as_str())
    .bind(source)
    .bind(e.severity.rank())
    .bind(e.title.as_str())
    .bind(e.id.to_string())
    .bind(to_micros(e.occurred_at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The event recorded earlier under this idempotency key, with its request hash.
pub async fn find_idempotent(
    pool: &AnyPool,
    scope: &str,
    key: &str,
) -> Result<Option<(Event, String)>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS}, e.idem_hash FROM events e JOIN systems s ON s.id = e.system_id \
         WHERE e.idem_scope = $1 AND e.idem_key = $2"
    );
    let row = sqlx::query(&sql).bind(scope).bind(key).fetch_optional(pool).await?;
    match row {
        Some(row) => {
            let hash: String = row.try_get("idem_hash")?;
            Ok(Some((event_from_row(&row)?, hash)))
        }
        None => Ok(None),
    }
}

pub async fn get(pool: &AnyPool, id: Uuid) -> Result<Option<Event>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM events e JOIN systems s ON s.id = e.system_id WHERE e.id = $1");
    let row = sqlx::query(&sql).bind(id.to_string()).fetch_optional(pool).await?;
    row.as_ref().map(event_from_row).transpose()
}

pub async fn exists(tx: &mut Tx, id: Uuid) -> Result<bool, sqlx::Error> {
    let row = sqlx::query("SELECT 1 FROM events WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    Ok(row.is_some())
}

/// Events committed after `after`, in commit order.
pub async fn after_seq(pool: &AnyPool, after: i64, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events e JOIN systems s ON s.id = e.system_id \
         WHERE e.seq > $1 ORDER BY e.seq LIMIT $2"
    );
    let rows = sqlx::query(&sql).bind(after).bind(limit).fetch_all(pool).await?;
    rows.iter().map(event_from_row).collect()
}

/// Events of the given systems committed after `after`, in commit order.
pub async fn after_seq_for(
    pool: &AnyPool,
    system_ids: &[String],
    after: i64,
    limit: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    if system_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM events e JOIN systems s ON s.id = e.system_id WHERE e.seq > "
    ));
    sql.bind(after).push(" AND e.system_id IN ").bind_list(system_ids.iter());
    sql.push(" ORDER BY e.seq LIMIT ").bind(limit);
    let rows = sql.query().fetch_all(pool).await?;
    rows.iter().map(event_from_row).collect()
}

pub async fn max_seq(pool: &AnyPool) -> Result<i64, sqlx::Error> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM events").fetch_one(pool).await?;
    row.try_get::<i64, _>(0)
}

/// Filters of a timeline page.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub kinds: Vec<String>,
    pub kind_prefixes: Vec<String>,
    pub min_severity: Option<Severity>,
    pub text: Option<String>,
    pub actor: Option<String>,
}

/// A position in a timeline: strictly older than (occurred_at, id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub occurred_at: i64,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        format!("{}_{}", self.occurred_at, self.id)
    }

    pub fn decode(s: &str) -> Option<Cursor> {
        let (t, id) = s.split_once('_')?;
        let occurred_at = t.parse().ok()?;
        let id = Uuid::parse_str(id).ok()?;
        Some(Cursor { occurred_at, id: id.to_string() })
    }

    pub fn of(e: &Event) -> Cursor {
        Cursor { occurred_at: to_micros(e.occurred_at), id: e.id.to_string() }
    }
}

/// Above this many systems, one IN query beats a union of per-system scans.
const UNION_LIMIT: usize = 64;

/// Newest-first page of the events of `system_ids`, `limit` items at most.
pub async fn page(
    pool: &AnyPool,
    system_ids: &[String],
    filter: &Filter,
    before: Option<&Cursor>,
    limit: i64,
) -> Result<Vec<Event>, sqlx::Error> {
    if system_ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new(&format!("SELECT {COLUMNS} FROM ("));
    if system_ids.len() <= UNION_LIMIT {
        // Each system's newest rows come straight from its index; the merge
        // of a few short lists is cheap whatever the total size.
        for (i, id) in system_ids.iter().enumerate() {
            if i > 0 {
                sql.push(" UNION ALL ");
            }
            sql.push("SELECT * FROM (SELECT * FROM events WHERE system_id = ").bind(id);
            push_filters(&mut sql, filter, before);
            sql.push(" ORDER BY occurred_at DESC, id DESC LIMIT ").bind(limit);
            sql.push(&format!(") AS p{i}"));
        }
    } else {
        sql.push("SELECT * FROM events WHERE system_id IN ").bind_list(system_ids.iter());
        push_filters(&mut sql, filter, before);
    }
    sql.push(") AS e JOIN systems s ON s.id = e.system_id ORDER BY e.occurred_at DESC, e.id DESC LIMIT ")
        .bind(limit);
    let rows = sql.query().fetch_all(pool).await?;
    rows.iter().map(event_from_row).collect()
}

fn push_filters(sql: &mut Sql, f: &Filter, before: Option<&Cursor>) {
    if let Some(c) = before {
        sql.push(" AND occurred_at <= ").bind(c.occurred_at);
        sql.push(" AND (occurred_at < ").bind(c.occurred_at);
        sql.push(" OR id < ").bind(c.id.as_str()).push(")");
    }
    if let Some(t) = f.since {
        sql.push(" AND occurred_at >= ").bind(t);
    }
    if let Some(t) = f.until {
        sql.push(" AND occurred_at < ").bind(t);
    }
    if !f.kinds.is_empty() || !f.kind_prefixes.is_empty() {
        sql.push(" AND (");
        let mut first = true;
        if !f.kinds.is_empty() {
            sql.push("kind IN ").bind_list(f.kinds.iter());
            first = false;
        }
        for p in &f.kind_prefixes {
            if !first {
                sql.push(" OR ");
            }
            sql.push("kind LIKE ").bind(format!("{}.%", like_escape(p))).push(" ESCAPE '\\'");
            first = false;
        }
        sql.push(")");
    }
    if let Some(s) = f.min_severity {
        sql.push(" AND severity >= ").bind(s.rank());
    }
    if let Some(text) = &f.text {
        let pattern = format!("%{}%", like_escape(&text.to_lowercase()));
        sql.push(" AND (lower(title) LIKE ").bind(pattern.clone()).push(" ESCAPE '\\'");
        sql.push(" OR lower(body) LIKE ").bind(pattern).push(" ESCAPE '\\')");
    }
    if let Some(actor) = &f.actor {
        sql.push(" AND (actor_name = ").bind(actor.as_str());
        sql.push(" OR actor_id = ").bind(actor.as_str()).push(")");
    }
}

pub fn event_from_row(row: &AnyRow) -> Result<Event, sqlx::Error> {
    let decode = |col: &str, msg: String| sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: msg.into(),
    };
    let id: String = row.try_get("id")?;
    let severity: i64 = row.try_get("severity")?;
    let actor_kind: String = row.try_get("actor_kind")?;
    let data: String = row.try_get("data")?;
    let caused_by: Option<String> = row.try_get("caused_by")?;
    Ok(Event {
        id: Uuid::parse_str(&id).map_err(|e| decode("id", e.to_string()))?,
        sequence: row.try_get("seq")?,
        system: row.try_get("slug")?,
        occurred_at: from_micros(row.try_get("occurred_at")?),
        recorded_at: from_micros(row.try_get("recorded_at")?),
        kind: row.try_get("kind")?,
        severity: Severity::from_rank(severity)
            .ok_or_else(|| decode("severity", format!("unknown rank {severity}")))?,
        title: row.try_get("title")?,
        body: row.try_get("body")?,
        actor: Actor {
            kind: actor_kind
                .parse::<ActorKind>()
                .map_err(|e| decode("actor_kind", e.to_string()))?,
            id: row.try_get("actor_id")?,
            name: row.try_get("actor_name")?,
        },
        data: serde_json::from_str(&data).map_err(|e| decode("data", e.to_string()))?,
        origin: row.try_get("origin")?,
        caused_by: caused_by
            .map(|c| Uuid::parse_str(&c))
            .transpose()
            .map_err(|e| decode("caused_by", e.to_string()))?,
        system_id: row.try_get("system_id")?,
    })
}

/// One (system, source) state.
#[derive(Debug, Clone)]
pub struct StateRow {
    pub source: String,
    pub severity: Severity,
    pub summary: String,
    pub event_id: String,
    pub since: i64,
}

/// Current states of the given systems, by system id.
pub async fn states_for(
    pool: &AnyPool,
    system_ids: &[String],
) -> Result<HashMap<String, Vec<StateRow>>, sqlx::Error> {
    let mut out: HashMap<String, Vec<StateRow>> = HashMap::new();
    for chunk in system_ids.chunks(500) {
        let mut sql = Sql::new(
            "SELECT system_id, source, severity, summary, event_id, since FROM system_states WHERE system_id IN ",
        );
        sql.bind_list(chunk.iter()).push(" ORDER BY source");
        for row in sql.query().fetch_all(pool).await? {
            let rank: i64 = row.try_get("severity")?;
            out.entry(row.try_get("system_id")?).or_default().push(StateRow {
                source: row.try_get("source")?,
                severity: Severity::from_rank(rank).unwrap_or(Severity::Info),
                summary: row.try_get("summary")?,
                event_id: row.try_get("event_id")?,
                since: row.try_get("since")?,
            });
        }
    }
    Ok(out)
}

pub async fn load_cursor(pool: &AnyPool, name: &str) -> Result<Option<i64>, sqlx::Error> {
    let row = sqlx::query("SELECT seq FROM subscriber_cursors WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await?;
    row.map(|r| r.try_get::<i64, _>(0)).transpose()
}

pub async fn save_cursor(tx: &mut Tx, name: &str, seq: i64, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO subscriber_cursors (name, seq, updated_at) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
    )
    .bind(name)
    .bind(seq)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
