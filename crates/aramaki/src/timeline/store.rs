//! SQL for the timeline.

use std::collections::{HashMap, HashSet};

use aramaki_protocol::{ActorKind, Severity};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use uuid::Uuid;

use super::{Actor, Event, Idempotency};
use crate::db::{from_micros, like_escape, to_micros, Sql, Tx};

const COLUMNS: &str = "e.seq, e.id, e.system_id, s.slug, e.occurred_at, e.recorded_at, e.kind, \
    e.severity, e.title, e.body, e.actor_kind, e.actor_id, e.actor_name, e.data, e.origin, e.caused_by";

/// Inserts the event and returns its sequence number.
pub async fn insert(
    tx: &mut Tx,
    e: &Event,
    idem: Option<&Idempotency>,
) -> Result<i64, sqlx::Error> {
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

/// Inserts events in one statement; returns their sequence numbers by id.
pub async fn insert_many(
    tx: &mut Tx,
    rows: &[(&Event, Option<&Idempotency>)],
) -> Result<HashMap<String, i64>, sqlx::Error> {
    let mut out = HashMap::new();
    // 17 parameters a row. SQLite looks each numbered parameter up by a
    // linear scan, so a statement's cost grows with the square of its
    // parameters: many small statements beat one large one (measured).
    for chunk in rows.chunks(32) {
        let mut sql = Sql::new(
            "INSERT INTO events (id, system_id, occurred_at, recorded_at, kind, severity, title, body, \
             actor_kind, actor_id, actor_name, data, origin, caused_by, idem_scope, idem_key, idem_hash) VALUES ",
        );
        for (i, (e, idem)) in chunk.iter().enumerate() {
            sql.push(if i == 0 { "(" } else { ", (" });
            sql.bind(e.id.to_string())
                .push(", ")
                .bind(e.system_id.as_str())
                .push(", ");
            sql.bind(to_micros(e.occurred_at))
                .push(", ")
                .bind(to_micros(e.recorded_at))
                .push(", ");
            sql.bind(e.kind.as_str())
                .push(", ")
                .bind(e.severity.rank())
                .push(", ");
            sql.bind(e.title.as_str())
                .push(", ")
                .bind(e.body.as_str())
                .push(", ");
            sql.bind(e.actor.kind.as_str())
                .push(", ")
                .bind(e.actor.id.clone())
                .push(", ");
            sql.bind(e.actor.name.as_str())
                .push(", ")
                .bind(e.data.to_string())
                .push(", ");
            sql.bind(e.origin.as_str())
                .push(", ")
                .bind(e.caused_by.map(|c| c.to_string()))
                .push(", ");
            sql.bind(idem.map(|i| i.scope.clone()))
                .push(", ")
                .bind(idem.map(|i| i.key.clone()))
                .push(", ");
            sql.bind(idem.map(|i| i.request_hash.clone())).push(")");
        }
        sql.push(" RETURNING seq, id");
        for row in sql.query().fetch_all(&mut **tx).await? {
            out.insert(row.try_get("id")?, row.try_get("seq")?);
        }
    }
    Ok(out)
}

/// Events recorded earlier under these idempotency keys, with their
/// request hashes, by (scope, key).
pub async fn find_keys(
    tx: &mut Tx,
    keys: &[(String, String)],
) -> Result<HashMap<(String, String), (String, Event)>, sqlx::Error> {
    let mut by_scope: HashMap<&str, Vec<&str>> = HashMap::new();
    for (scope, key) in keys {
        by_scope
            .entry(scope.as_str())
            .or_default()
            .push(key.as_str());
    }
    let mut out = HashMap::new();
    for (scope, keys) in by_scope {
        for chunk in keys.chunks(400) {
            let mut sql = Sql::new(&format!(
                "SELECT {COLUMNS}, e.idem_key, e.idem_hash FROM events e \
                 JOIN systems s ON s.id = e.system_id WHERE e.idem_scope = "
            ));
            sql.bind(scope)
                .push(" AND e.idem_key IN ")
                .bind_list(chunk.iter().copied());
            for row in sql.query().fetch_all(&mut **tx).await? {
                let key: String = row.try_get("idem_key")?;
                out.insert(
                    (scope.to_owned(), key),
                    (row.try_get("idem_hash")?, event_from_row(&row)?),
                );
            }
        }
    }
    Ok(out)
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

pub async fn get(pool: &AnyPool, id: Uuid) -> Result<Option<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events e JOIN systems s ON s.id = e.system_id WHERE e.id = $1"
    );
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(event_from_row).transpose()
}

/// Which of these event ids exist.
pub async fn existing_ids(tx: &mut Tx, ids: &[Uuid]) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut out = HashSet::new();
    for chunk in ids.chunks(500) {
        let mut sql = Sql::new("SELECT id FROM events WHERE id IN ");
        sql.bind_list(chunk.iter().map(|u| u.to_string()));
        for row in sql.query().fetch_all(&mut **tx).await? {
            let id: String = row.try_get("id")?;
            if let Ok(u) = Uuid::parse_str(&id) {
                out.insert(u);
            }
        }
    }
    Ok(out)
}

/// Events committed after `after`, in commit order.
pub async fn after_seq(pool: &AnyPool, after: i64, limit: i64) -> Result<Vec<Event>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM events e JOIN systems s ON s.id = e.system_id \
         WHERE e.seq > $1 ORDER BY e.seq LIMIT $2"
    );
    let rows = sqlx::query(&sql)
        .bind(after)
        .bind(limit)
        .fetch_all(pool)
        .await?;
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
    sql.bind(after)
        .push(" AND e.system_id IN ")
        .bind_list(system_ids.iter());
    sql.push(" ORDER BY e.seq LIMIT ").bind(limit);
    let rows = sql.query().fetch_all(pool).await?;
    rows.iter().map(event_from_row).collect()
}

pub async fn max_seq(pool: &AnyPool) -> Result<i64, sqlx::Error> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM events")
        .fetch_one(pool)
        .await?;
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

impl Filter {
    /// Whether an event passes the filter (for live streams, which are not
    /// read from an index).
    pub fn matches(&self, e: &Event) -> bool {
        let at = to_micros(e.occurred_at);
        let kinds_ok = (self.kinds.is_empty() && self.kind_prefixes.is_empty())
            || self.kinds.contains(&e.kind)
            || self.kind_prefixes.iter().any(|p| {
                e.kind
                    .strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            });
        let text_ok = self.text.as_ref().is_none_or(|t| {
            let t = t.to_lowercase();
            e.title.to_lowercase().contains(&t) || e.body.to_lowercase().contains(&t)
        });
        let actor_ok = self
            .actor
            .as_ref()
            .is_none_or(|a| e.actor.name == *a || e.actor.id.as_deref() == Some(a.as_str()));
        kinds_ok
            && text_ok
            && actor_ok
            && self.min_severity.is_none_or(|s| e.severity >= s)
            && self.since.is_none_or(|s| at >= s)
            && self.until.is_none_or(|u| at < u)
    }
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
        Some(Cursor {
            occurred_at,
            id: id.to_string(),
        })
    }

    pub fn of(e: &Event) -> Cursor {
        Cursor {
            occurred_at: to_micros(e.occurred_at),
            id: e.id.to_string(),
        }
    }
}

/// One newest-first index range: a system, narrowed to one kind and one
/// severity when the filter names them.
#[derive(Debug, Clone)]
struct Probe<'a> {
    system_id: &'a str,
    kind: Option<&'a str>,
    severity: Option<i64>,
}

/// Above this many probes, one IN query beats a merge of index ranges.
const MAX_PROBES: usize = 4000;
/// SQLite allows 500 terms in a compound SELECT, and looks numbered
/// parameters up linearly (quadratic in their number): keep statements small.
const PROBES_PER_STATEMENT: usize = 64;

fn probes<'a>(system_ids: &'a [String], f: &'a Filter) -> Vec<Probe<'a>> {
    let severities: Vec<Option<i64>> = match f.min_severity {
        Some(min) => Severity::ALL
            .iter()
            .filter(|s| **s >= min)
            .map(|s| Some(s.rank()))
            .collect(),
        None if !f.kinds.is_empty() => Severity::ALL.iter().map(|s| Some(s.rank())).collect(),
        None => vec![None],
    };
    let mut out = Vec::new();
    for system_id in system_ids {
        for severity in &severities {
            for kind in &f.kinds {
                out.push(Probe {
                    system_id,
                    kind: Some(kind),
                    severity: *severity,
                });
            }
            // Namespace filters cannot be expanded into kinds: they ride along
            // as a residual condition on a per-system (and severity) probe.
            if f.kinds.is_empty() || !f.kind_prefixes.is_empty() {
                out.push(Probe {
                    system_id,
                    kind: None,
                    severity: *severity,
                });
            }
        }
    }
    out
}

/// Newest-first page of the events of `system_ids`, `limit` items at most.
///
/// Each probe reads at most `limit` keys from one index range, so a page
/// costs about (number of probes × limit) index entries, whatever the total
/// size of the timeline. The keys are merged here and only the winning rows
/// are read in full.
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
    let probes = probes(system_ids, filter);
    let mut keys: Vec<(i64, String, i64)> = Vec::new();
    if probes.len() > MAX_PROBES {
        let mut sql = Sql::new("SELECT seq, occurred_at, id FROM events WHERE system_id IN ");
        sql.bind_list(system_ids.iter());
        push_filters(&mut sql, filter, before, true);
        sql.push(" ORDER BY occurred_at DESC, id DESC LIMIT ")
            .bind(limit);
        keys.extend(read_keys(pool, &sql).await?);
    } else {
        // Integers the server chose itself (limit, severity rank) are written
        // as literals: fewer parameters make cheaper statements on SQLite.
        let statements: Vec<Sql> = probes
            .chunks(PROBES_PER_STATEMENT)
            .map(|chunk| {
                let mut sql = Sql::new("");
                for (i, p) in chunk.iter().enumerate() {
                    if i > 0 {
                        sql.push(" UNION ALL ");
                    }
                    sql.push(
                        "SELECT * FROM (SELECT seq, occurred_at, id FROM events WHERE system_id = ",
                    )
                    .bind(p.system_id);
                    if let Some(kind) = p.kind {
                        sql.push(" AND kind = ").bind(kind);
                    }
                    if let Some(sev) = p.severity {
                        sql.push(&format!(" AND severity = {sev}"));
                    }
                    push_filters(&mut sql, filter, before, p.kind.is_none());
                    sql.push(&format!(
                        " ORDER BY occurred_at DESC, id DESC LIMIT {limit}) AS p{i}"
                    ));
                }
                sql
            })
            .collect();
        // Independent statements run side by side on the reader pool.
        let results =
            futures_util::future::try_join_all(statements.iter().map(|sql| read_keys(pool, sql)))
                .await?;
        keys.extend(results.into_iter().flatten());
    }
    keys.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    keys.dedup_by(|a, b| a.2 == b.2);
    keys.truncate(usize::try_from(limit).unwrap_or(0));
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut sql = Sql::new(&format!(
        "SELECT {COLUMNS} FROM events e JOIN systems s ON s.id = e.system_id WHERE e.seq IN "
    ));
    sql.bind_list(keys.iter().map(|k| k.2));
    let rows = sql.query().fetch_all(pool).await?;
    let mut events: Vec<Event> = rows.iter().map(event_from_row).collect::<Result<_, _>>()?;
    events.sort_by_key(|e| std::cmp::Reverse((e.occurred_at, e.id)));
    Ok(events)
}

async fn read_keys(pool: &AnyPool, sql: &Sql) -> Result<Vec<(i64, String, i64)>, sqlx::Error> {
    let rows = sql.query().fetch_all(pool).await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("occurred_at")?,
                r.try_get("id")?,
                r.try_get("seq")?,
            ))
        })
        .collect()
}

/// Adds the cursor and the residual filters; `kinds` says whether the kind
/// filter still has to be applied here (it has not been expanded into probes).
fn push_filters(sql: &mut Sql, f: &Filter, before: Option<&Cursor>, kinds: bool) {
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
    if kinds && (!f.kinds.is_empty() || !f.kind_prefixes.is_empty()) {
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
            sql.push("kind LIKE ")
                .bind(format!("{}.%", like_escape(p)))
                .push(" ESCAPE '\\'");
            first = false;
        }
        sql.push(")");
    }
    if let Some(s) = f.min_severity {
        // Redundant inside a severity probe, needed in the IN fallback.
        sql.push(" AND severity >= ").bind(s.rank());
    }
    if let Some(text) = &f.text {
        let pattern = format!("%{}%", like_escape(&text.to_lowercase()));
        sql.push(" AND (lower(title) LIKE ")
            .bind(pattern.clone())
            .push(" ESCAPE '\\'");
        sql.push(" OR lower(body) LIKE ")
            .bind(pattern)
            .push(" ESCAPE '\\')");
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
            out.entry(row.try_get("system_id")?)
                .or_default()
                .push(StateRow {
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
