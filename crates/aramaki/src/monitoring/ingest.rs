//! The results writer: one task commits what all agents sent, in batches.
//!
//! Sessions hand their records here and wait for the commit before they
//! acknowledge to the agent, so an acknowledged result is durable. The
//! agent's high-water mark (`agents.acked_seq`) is written in the same
//! transaction as its results: a record at or below it is a duplicate
//! (a replay after a lost acknowledgement) and is skipped. The writer is
//! the only one that writes observations, so it can keep the last verdict
//! of each (system, check, labels) in memory instead of reading it back.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aramaki_protocol::agent::{CheckResult, CheckState, Notice, Record, RecordBody, RecordRefusal};
use aramaki_protocol::Severity;
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, watch};

use super::store;
use crate::context::Context;
use crate::db::{to_micros, Tx};
use crate::timeline::{self, Actor, NewEvent, Target};

/// The agent a batch comes from.
#[derive(Debug, Clone)]
pub struct AgentRef {
    pub id: String,
    pub name: String,
    pub system_id: String,
    pub system: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the results writer has stopped")]
    Stopped,
}

/// A result that did not come from an agent's queue (keepalive, TTL).
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub system_id: String,
    pub system: String,
    pub agent: Option<AgentRef>,
    pub result: CheckResult,
}

enum Item {
    Records {
        agent: AgentRef,
        records: Vec<Record>,
        /// Records of the same message that are not stored (see
        /// [`crate::agents::nul`]); they count as handled all the same.
        refused: Vec<RecordRefusal>,
        reply: oneshot::Sender<Result<u64, IngestError>>,
    },
    Seen {
        agent: AgentRef,
        queue_depth: u64,
        dropped: u64,
        /// When the heartbeat arrived (µs): the writer may get to it later.
        at: i64,
    },
    Synthetic {
        result: Synthetic,
        reply: oneshot::Sender<Result<(), IngestError>>,
    },
}

/// The queue in front of the writer.
#[derive(Debug)]
pub struct Ingest {
    tx: mpsc::Sender<Item>,
    rx: Mutex<Option<mpsc::Receiver<Item>>>,
    checks_version: Arc<AtomicU64>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Item")
    }
}

impl Default for Ingest {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(4096);
        Ingest {
            tx,
            rx: Mutex::new(Some(rx)),
            checks_version: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Most records committed in one transaction.
const MAX_BATCH: usize = 4000;

/// The keepalive is an observation like any other, under this check name.
pub const KEEPALIVE_CHECK: &str = "keepalive";

impl Ingest {
    /// Starts the writer; it stops when `stop` turns true.
    pub fn spawn(ctx: Arc<Context>, stop: watch::Receiver<bool>) {
        let rx = ctx.ingest.rx.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = rx {
            tokio::spawn(run(ctx, rx, stop));
        }
    }

    /// Commits records and returns the agent's new high-water mark, which
    /// covers the `refused` ones too (noted on the agent's timeline).
    pub async fn records(
        &self,
        agent: AgentRef,
        records: Vec<Record>,
        refused: Vec<RecordRefusal>,
    ) -> Result<u64, IngestError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Item::Records {
                agent,
                records,
                refused,
                reply,
            })
            .await
            .map_err(|_| IngestError::Stopped)?;
        answer.await.map_err(|_| IngestError::Stopped)?
    }

    /// Notes that an agent is alive (a heartbeat at `at`, µs); not waited for.
    pub fn seen(&self, agent: AgentRef, queue_depth: u64, dropped: u64, at: i64) {
        let _ = self.tx.try_send(Item::Seen {
            agent,
            queue_depth,
            dropped,
            at,
        });
    }

    pub async fn synthetic(&self, result: Synthetic) -> Result<(), IngestError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Item::Synthetic { result, reply })
            .await
            .map_err(|_| IngestError::Stopped)?;
        answer.await.map_err(|_| IngestError::Stopped)?
    }

    /// Items waiting for the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Check definitions changed: the writer reloads thresholds and TTLs.
    pub fn checks_changed(&self) {
        self.checks_version.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the writer needs of a check definition.
#[derive(Debug, Clone)]
struct Rule {
    occurrences: u32,
    ttl_secs: Option<u32>,
}

#[derive(Debug, Clone)]
struct Last {
    status: i32,
    state: CheckState,
    occurrences: i64,
    state_since: i64,
}

struct Writer {
    ctx: Arc<Context>,
    rules: HashMap<String, Rule>,
    rules_version: u64,
    acked: HashMap<String, u64>,
    last: HashMap<(String, String, String), Option<Last>>,
    slugs: HashMap<String, Option<String>>,
    /// Every check definition, for judging results on other systems.
    checks: Vec<super::Check>,
    /// Per batch: each agent's checks bound to other systems, as
    /// (check, system) pairs (see `target`).
    reach: HashMap<String, Vec<(String, String)>>,
    /// (agent, check, system) of refused results already recorded as an
    /// event since the writer started: a flood is one event.
    refused: std::collections::HashSet<(String, String, String)>,
}

async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<Item>, mut stop: watch::Receiver<bool>) {
    let mut w = Writer {
        ctx,
        rules: HashMap::new(),
        rules_version: u64::MAX,
        acked: HashMap::new(),
        last: HashMap::new(),
        slugs: HashMap::new(),
        checks: Vec::new(),
        reach: HashMap::new(),
        refused: std::collections::HashSet::new(),
    };
    loop {
        let first = tokio::select! {
            item = rx.recv() => item,
            _ = stop.changed() => None,
        };
        let Some(first) = first else { return };
        let mut batch = vec![first];
        let mut size = weight(&batch[0]);
        while size < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => {
                    size += weight(&item);
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        w.commit(batch).await;
    }
}

fn weight(item: &Item) -> usize {
    match item {
        Item::Records {
            records, refused, ..
        } => (records.len() + refused.len()).max(1),
        _ => 1,
    }
}

/// Answers every item of a batch: with its high-water mark once committed,
/// or that nothing was.
fn answer(batch: Vec<Item>, highs: Option<Vec<u64>>) {
    match highs {
        Some(highs) => {
            for (item, high) in batch.into_iter().zip(highs) {
                item.answer(Some(high));
            }
        }
        None => batch.into_iter().for_each(|item| item.answer(None)),
    }
}

impl Item {
    /// Answers the sender: its agent's high-water mark (records), done
    /// (synthetic), or that nothing was committed.
    fn answer(self, outcome: Option<u64>) {
        match (self, outcome) {
            (Item::Records { reply, .. }, Some(high)) => {
                let _ = reply.send(Ok(high));
            }
            (Item::Records { reply, .. }, None) => {
                let _ = reply.send(Err(IngestError::Stopped));
            }
            (Item::Synthetic { reply, .. }, Some(_)) => {
                let _ = reply.send(Ok(()));
            }
            (Item::Synthetic { reply, .. }, None) => {
                let _ = reply.send(Err(IngestError::Stopped));
            }
            (Item::Seen { .. }, _) => {}
        }
    }
}

impl Writer {
    async fn commit(&mut self, batch: Vec<Item>) {
        if let Err(e) = self.load_rules().await {
            tracing::warn!(error = %e, "cannot load check definitions");
        }
        // Subscriptions and inclusions may have changed since the last batch.
        self.reach.clear();
        match self.write(&batch).await {
            Ok(highs) => answer(batch, Some(highs)),
            Err(e) if batch.len() > 1 => {
                // One item the database refuses must not fail the others:
                // each is committed alone, and only its own sender fails.
                tracing::warn!(error = %e, items = batch.len(), "cannot commit a batch of results; committing each item alone");
                self.forget();
                for item in batch {
                    let one = vec![item];
                    match self.write(&one).await {
                        Ok(highs) => answer(one, Some(highs)),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot commit results; the agent will resend");
                            self.forget();
                            answer(one, None);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot commit results; agents will resend");
                self.forget();
                answer(batch, None);
            }
        }
    }

    /// The caches may hold what was rolled back.
    fn forget(&mut self) {
        self.acked.clear();
        self.last.clear();
        self.refused.clear();
    }

    /// Commits `batch` in one transaction; per item, the agent's new
    /// high-water mark (0 for items that have none).
    async fn write(&mut self, batch: &[Item]) -> Result<Vec<u64>, sqlx::Error> {
        let mut highs = Vec::with_capacity(batch.len());
        let mut tx = self.ctx.db.begin_recording().await?;
        let now = to_micros(self.ctx.now());
        let mut wrote_events = false;
        let (mut committed, mut duplicates) = (0u64, 0u64);
        // Per agent: the agent, its queue depth if reported, when last seen.
        let mut seen: HashMap<String, (AgentRef, Option<u64>, i64)> = HashMap::new();
        for item in batch {
            match item {
                Item::Records {
                    agent,
                    records,
                    refused,
                    ..
                } => {
                    let acked = self.acked_of(&mut tx, &agent.id).await?;
                    let mut high = acked;
                    let refused: Vec<RecordRefusal> =
                        refused.iter().filter(|r| r.seq > acked).cloned().collect();
                    if !refused.is_empty() {
                        self.refused(&mut tx, agent, &refused).await?;
                        wrote_events = true;
                    }
                    for record in records {
                        if record.seq <= high {
                            duplicates += 1;
                            continue;
                        }
                        high = record.seq;
                        committed += 1;
                        wrote_events |= self.record(&mut tx, agent, record, now).await?;
                    }
                    high = refused.iter().map(|r| r.seq).fold(high, u64::max);
                    sqlx::query("UPDATE agents SET acked_seq = $2, last_seen = $3 WHERE id = $1")
                        .bind(agent.id.as_str())
                        .bind(i64::try_from(high).unwrap_or(i64::MAX))
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    self.acked.insert(agent.id.clone(), high);
                    seen.entry(agent.id.clone())
                        .or_insert((agent.clone(), None, now));
                    highs.push(high);
                }
                Item::Seen {
                    agent,
                    queue_depth,
                    dropped,
                    at,
                } => {
                    // The agent's own count of drops arrives as Dropped
                    // records; the heartbeat's copy is only informative.
                    let _ = dropped;
                    let at = seen.get(&agent.id).map_or(*at, |s| s.2.max(*at));
                    seen.insert(agent.id.clone(), (agent.clone(), Some(*queue_depth), at));
                    highs.push(0);
                }
                Item::Synthetic { result, .. } => {
                    let agent_id = result.agent.as_ref().map(|a| a.id.clone());
                    wrote_events |= self
                        .observe(
                            &mut tx,
                            (&result.system_id, &result.system),
                            result.agent.as_ref(),
                            &result.result,
                            (None, None),
                            now,
                        )
                        .await?;
                    if result.result.check == KEEPALIVE_CHECK {
                        if let Some(id) = agent_id {
                            let state = CheckState::from_exit(result.result.status).as_str();
                            sqlx::query("UPDATE agents SET keepalive = $2 WHERE id = $1")
                                .bind(id)
                                .bind(state)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    highs.push(0);
                }
            }
        }
        for (id, (agent, depth, at)) in seen {
            wrote_events |= self.alive(&mut tx, &agent, now).await?;
            match depth {
                Some(depth) => {
                    sqlx::query("UPDATE agents SET last_seen = $2, queue_depth = $3 WHERE id = $1")
                        .bind(id)
                        .bind(at)
                        .bind(i64::try_from(depth).unwrap_or(i64::MAX))
                        .execute(&mut *tx)
                        .await?;
                }
                None => {
                    sqlx::query("UPDATE agents SET last_seen = $2 WHERE id = $1")
                        .bind(id)
                        .bind(at)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        if wrote_events {
            self.ctx.commit(tx).await?;
        } else {
            tx.commit().await?;
        }
        self.ctx.metrics.results(committed, duplicates);
        Ok(highs)
    }

    /// Notes records refused for good on the agent's system timeline.
    async fn refused(
        &mut self,
        tx: &mut Tx,
        agent: &AgentRef,
        refused: &[RecordRefusal],
    ) -> Result<(), sqlx::Error> {
        self.ctx.metrics.records_refused(refused.len() as u64);
        let first = &refused[0];
        tracing::warn!(agent = %agent.name, count = refused.len(), seq = first.seq, field = %first.field, "agent records refused");
        let seqs: Vec<u64> = refused.iter().map(|r| r.seq).take(100).collect();
        let fields: Vec<&str> = refused.iter().map(|r| r.field.as_str()).take(100).collect();
        let event = NewEvent::internal(
            "agent.records_refused",
            Severity::Warning,
            format!(
                "Agent '{}' sent {} record(s) the server cannot store (#{}: {})",
                agent.name,
                refused.len(),
                first.seq,
                first.message
            ),
            serde_json::json!({"agent": agent.name, "agent_id": agent.id, "count": refused.len(), "seqs": seqs, "fields": fields}),
        );
        self.event(tx, agent, (&agent.system_id, &agent.system), event)
            .await
    }

    /// A heartbeat or result from an agent whose keepalive had lapsed turns
    /// it OK again.
    async fn alive(
        &mut self,
        tx: &mut Tx,
        agent: &AgentRef,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let row = sqlx::query("SELECT keepalive FROM agents WHERE id = $1")
            .bind(agent.id.as_str())
            .fetch_optional(&mut **tx)
            .await?;
        let state: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
        if state.as_deref() == Some("ok") {
            return Ok(false);
        }
        let summary = if state.as_deref() == Some("unknown") {
            "agent connected"
        } else {
            "agent is sending heartbeats again"
        };
        let result = keepalive_result(agent, 0, summary.into(), now);
        let wrote = self
            .observe(
                tx,
                (&agent.system_id, &agent.system),
                Some(agent),
                &result,
                (None, None),
                now,
            )
            .await?;
        sqlx::query("UPDATE agents SET keepalive = 'ok' WHERE id = $1")
            .bind(agent.id.as_str())
            .execute(&mut **tx)
            .await?;
        Ok(wrote)
    }

    async fn load_rules(&mut self) -> Result<(), sqlx::Error> {
        let version = self.ctx.ingest.checks_version.load(Ordering::Relaxed);
        if version == self.rules_version {
            return Ok(());
        }
        let mut conn = self.ctx.db.reader().acquire().await?;
        let checks = store::checks(&mut conn).await?;
        self.rules = checks
            .iter()
            .map(|c| {
                (
                    c.spec.name.clone(),
                    Rule {
                        occurrences: c.spec.occurrences,
                        ttl_secs: c.spec.ttl,
                    },
                )
            })
            .collect();
        self.checks = checks;
        self.rules_version = version;
        Ok(())
    }

    async fn acked_of(&mut self, tx: &mut Tx, agent_id: &str) -> Result<u64, sqlx::Error> {
        if let Some(seq) = self.acked.get(agent_id) {
            return Ok(*seq);
        }
        let row = sqlx::query("SELECT acked_seq FROM agents WHERE id = $1")
            .bind(agent_id)
            .fetch_optional(&mut **tx)
            .await?;
        let seq: i64 = row.map(|r| r.try_get(0)).transpose()?.unwrap_or(0);
        let seq = u64::try_from(seq).unwrap_or(0);
        self.acked.insert(agent_id.to_owned(), seq);
        Ok(seq)
    }

    /// One record from an agent's queue; true if it wrote a timeline event.
    async fn record(
        &mut self,
        tx: &mut Tx,
        agent: &AgentRef,
        record: &Record,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        match &record.body {
            RecordBody::Result(result) => {
                let Some((system_id, system)) = self.target(tx, agent, result).await? else {
                    return self.refuse(tx, agent, result).await;
                };
                self.observe(
                    tx,
                    (&system_id, &system),
                    Some(agent),
                    result,
                    (Some(record.seq), None),
                    now,
                )
                .await
            }
            RecordBody::Pushed { result, ttl_secs } => {
                let Some((system_id, system)) = self.target(tx, agent, result).await? else {
                    return self.refuse(tx, agent, result).await;
                };
                self.observe(
                    tx,
                    (&system_id, &system),
                    Some(agent),
                    result,
                    (Some(record.seq), Some((*ttl_secs).clamp(1, MAX_PUSHED_TTL))),
                    now,
                )
                .await
            }
            RecordBody::Dropped {
                count,
                first_seq,
                last_seq,
            } => {
                // Saturating: an overflowing sum would fail the whole
                // batch on PostgreSQL and turn the column REAL on SQLite.
                sqlx::query(
                    "UPDATE agents SET dropped = CASE WHEN dropped > $3 - $2 THEN $3 ELSE dropped + $2 END WHERE id = $1",
                )
                .bind(agent.id.as_str())
                .bind(i64::try_from(*count).unwrap_or(i64::MAX))
                .bind(i64::MAX)
                .execute(&mut **tx)
                    .await?;
                let event = NewEvent::internal(
                    "agent.results_dropped",
                    Severity::Warning,
                    format!(
                        "Agent '{}' dropped {count} results (#{first_seq}–#{last_seq}): its queue was full while the server was unreachable",
                        agent.name
                    ),
                    serde_json::json!({"agent": agent.name, "count": count, "first_seq": first_seq, "last_seq": last_seq}),
                );
                self.event(tx, agent, (&agent.system_id, &agent.system), event)
                    .await?;
                Ok(true)
            }
            RecordBody::Action(update) => {
                crate::actions::runs::finish(&self.ctx, tx, agent, update).await
            }
            RecordBody::Notice { notice, message } => {
                let severity = match notice {
                    Notice::FrameRefused => Severity::Critical,
                    Notice::QueueRenumbered => Severity::Warning,
                };
                // The agent's words, capped: a notice is a line, not a dump.
                let message: String = message.chars().take(1000).collect();
                let event = NewEvent::internal(
                    notice.kind(),
                    severity,
                    format!("Agent '{}': {message}", agent.name),
                    serde_json::json!({"agent": agent.name, "agent_id": agent.id, "side": "agent", "seq": record.seq, "detail": message}),
                );
                self.event(tx, agent, (&agent.system_id, &agent.system), event)
                    .await?;
                Ok(true)
            }
            RecordBody::Facts { facts } => {
                let text = serde_json::to_string(&facts).unwrap_or_else(|_| "{}".to_owned());
                sqlx::query("UPDATE agents SET facts = $2 WHERE id = $1")
                    .bind(agent.id.as_str())
                    .bind(text)
                    .execute(&mut **tx)
                    .await?;
                Ok(false)
            }
        }
    }

    /// Where a result belongs: the agent's own system, or the system of a
    /// check bound to it that goes to this agent (`checks_for`). None: the
    /// agent may not report on the system it names.
    async fn target(
        &mut self,
        tx: &mut Tx,
        agent: &AgentRef,
        result: &CheckResult,
    ) -> Result<Option<(String, String)>, sqlx::Error> {
        let own = (agent.system_id.clone(), agent.system.clone());
        let Some(slug) = result.system.as_deref() else {
            return Ok(Some(own));
        };
        if slug == agent.system {
            return Ok(Some(own));
        }
        if !self.reach.contains_key(&agent.id) {
            let reach = self.reach_of(tx, &agent.id).await?;
            self.reach.insert(agent.id.clone(), reach);
        }
        let allowed = self
            .reach
            .get(&agent.id)
            .is_some_and(|r| r.iter().any(|(c, s)| *c == result.check && s == slug));
        if allowed {
            if let Some(id) = self.system_id(tx, slug).await? {
                return Ok(Some((id, slug.to_owned())));
            }
        }
        Ok(None)
    }

    /// The (check, system) pairs of the checks bound to a system that go
    /// to the agent as it is registered now.
    async fn reach_of(
        &mut self,
        tx: &mut Tx,
        agent_id: &str,
    ) -> Result<Vec<(String, String)>, sqlx::Error> {
        let Some(agent) = crate::agents::store::agent_by_id(tx, agent_id).await? else {
            return Ok(Vec::new());
        };
        if agent.revoked {
            return Ok(Vec::new());
        }
        let graph = crate::systems::store::load_graph(tx).await?;
        let subs = super::agent_subscriptions(&agent);
        let bound = super::bound_systems(&agent, &graph);
        Ok(self
            .checks
            .iter()
            .filter(|c| super::check_applies(&subs, &bound, c))
            .filter_map(|c| {
                c.spec
                    .system
                    .as_ref()
                    .map(|s| (c.spec.name.clone(), s.to_string()))
            })
            .collect())
    }

    /// A result on a system the agent may not report on: not written, but
    /// acknowledged (a retry cannot fix it), and the first of its kind is a
    /// security event on the agent's own system.
    async fn refuse(
        &mut self,
        tx: &mut Tx,
        agent: &AgentRef,
        result: &CheckResult,
    ) -> Result<bool, sqlx::Error> {
        let slug = result.system.clone().unwrap_or_default();
        let key = (agent.id.clone(), result.check.clone(), slug.clone());
        tracing::warn!(agent = %agent.name, check = %result.check, system = %slug, "refused a result for a system the agent may not report on");
        if !self.refused.insert(key) {
            return Ok(false);
        }
        let check: String = result.check.chars().take(200).collect();
        let slug: String = slug.chars().take(200).collect();
        let event = NewEvent::internal(
            "agent.result_refused",
            Severity::Critical,
            format!(
                "Refused a result of '{check}' for system '{slug}' from agent '{}': no check bound to that system goes to this agent",
                agent.name
            ),
            serde_json::json!({"agent": agent.name, "agent_id": agent.id, "check": check, "system": slug}),
        );
        self.event(tx, agent, (&agent.system_id, &agent.system), event)
            .await?;
        Ok(true)
    }

    async fn system_id(&mut self, tx: &mut Tx, slug: &str) -> Result<Option<String>, sqlx::Error> {
        if let Some(id) = self.slugs.get(slug) {
            return Ok(id.clone());
        }
        let id = crate::agents::store::system_by_slug(tx, slug)
            .await?
            .map(|(id, _)| id);
        self.slugs.insert(slug.to_owned(), id.clone());
        Ok(id)
    }

    /// Updates the observation and its history; records a state change.
    async fn observe(
        &mut self,
        tx: &mut Tx,
        (system_id, system): (&str, &str),
        agent: Option<&AgentRef>,
        result: &CheckResult,
        // The agent's sequence number, and a ttl the result itself carries
        // (pushed), which goes before the definition's.
        (seq, ttl): (Option<u64>, Option<u32>),
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let labels_key = serde_json::to_string(&result.labels).unwrap_or_else(|_| "{}".to_owned());
        let key = (
            system_id.to_owned(),
            result.check.clone(),
            labels_key.clone(),
        );
        let last = self.last_of(tx, &key).await?;
        let rule = self.rules.get(&result.check).cloned();
        let threshold = i64::from(rule.as_ref().map_or(1, |r| r.occurrences.max(1)));
        let reported = CheckState::from_exit(result.status);
        let occurrences = match &last {
            Some(l) if l.status == result.status => l.occurrences + 1,
            _ => 1,
        };
        let state = match &last {
            Some(l) if reported != CheckState::Ok && occurrences < threshold => l.state,
            None if reported != CheckState::Ok && occurrences < threshold => CheckState::Unknown,
            _ => reported,
        };
        let changed = last.as_ref().is_none_or(|l| l.state != state);
        let state_since = match &last {
            Some(l) if !changed => l.state_since,
            _ => now,
        };
        let ttl_deadline = match (
            result.source.as_str(),
            ttl.or(rule.and_then(|r| r.ttl_secs)),
        ) {
            ("ttl", _) | (_, None) => None,
            (_, Some(secs)) => Some(now + i64::from(secs) * 1_000_000),
        };
        let metrics = serde_json::to_string(&result.metrics).unwrap_or_else(|_| "[]".to_owned());
        let agent_id = agent.map(|a| a.id.as_str());
        sqlx::query(
            "INSERT INTO observations (system_id, check_name, labels_key, labels, status, state, output, metrics, \
             agent_id, executed_at, received_at, occurrences, state_since, ttl_deadline) \
             VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (system_id, check_name, labels_key) DO UPDATE SET status = excluded.status, \
             state = excluded.state, output = excluded.output, metrics = excluded.metrics, \
             agent_id = excluded.agent_id, executed_at = excluded.executed_at, received_at = excluded.received_at, \
             occurrences = excluded.occurrences, state_since = excluded.state_since, ttl_deadline = excluded.ttl_deadline",
        )
        .bind(system_id)
        .bind(result.check.as_str())
        .bind(labels_key.as_str())
        .bind(result.status)
        .bind(state.as_str())
        .bind(result.output.as_str())
        .bind(metrics.as_str())
        .bind(agent_id)
        .bind(result.executed_at)
        .bind(now)
        .bind(occurrences)
        .bind(state_since)
        .bind(ttl_deadline)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO observation_history (system_id, check_name, labels_key, status, output, metrics, agent_id, \
             agent_seq, executed_at, received_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(system_id)
        .bind(result.check.as_str())
        .bind(labels_key.as_str())
        .bind(result.status)
        .bind(result.output.as_str())
        .bind(metrics.as_str())
        .bind(agent_id)
        .bind(seq.map(|s| i64::try_from(s).unwrap_or(i64::MAX)))
        .bind(result.executed_at)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        let from = last.as_ref().map(|l| l.state);
        self.last.insert(
            key,
            Some(Last {
                status: result.status,
                state,
                occurrences,
                state_since,
            }),
        );
        if !changed {
            return Ok(false);
        }
        let event = state_event(system, result, from, state, agent);
        let actor_agent = agent.cloned();
        match actor_agent {
            Some(a) => self.event(tx, &a, (system_id, system), event).await?,
            None => {
                let actor = Actor::instance(&self.ctx.identity.instance_id, "monitoring");
                timeline::append(
                    &self.ctx,
                    tx,
                    &actor,
                    Target {
                        id: system_id,
                        slug: system,
                    },
                    event,
                )
                .await?;
            }
        }
        Ok(true)
    }

    async fn event(
        &self,
        tx: &mut Tx,
        agent: &AgentRef,
        (system_id, system): (&str, &str),
        event: NewEvent,
    ) -> Result<(), sqlx::Error> {
        let actor = Actor::agent(&agent.id, &agent.name);
        timeline::append(
            &self.ctx,
            tx,
            &actor,
            Target {
                id: system_id,
                slug: system,
            },
            event,
        )
        .await?;
        Ok(())
    }

    async fn last_of(
        &mut self,
        tx: &mut Tx,
        key: &(String, String, String),
    ) -> Result<Option<Last>, sqlx::Error> {
        if let Some(last) = self.last.get(key) {
            return Ok(last.clone());
        }
        let row = sqlx::query(
            "SELECT status, state, occurrences, state_since FROM observations \
             WHERE system_id = $1 AND check_name = $2 AND labels_key = $3",
        )
        .bind(key.0.as_str())
        .bind(key.1.as_str())
        .bind(key.2.as_str())
        .fetch_optional(&mut **tx)
        .await?;
        let last = row
            .map(|r| -> Result<Last, sqlx::Error> {
                let state: String = r.try_get("state")?;
                Ok(Last {
                    status: r.try_get("status")?,
                    state: parse_state(&state),
                    occurrences: r.try_get("occurrences")?,
                    state_since: r.try_get("state_since")?,
                })
            })
            .transpose()?;
        self.last.insert(key.clone(), last.clone());
        Ok(last)
    }
}

pub fn parse_state(s: &str) -> CheckState {
    match s {
        "ok" => CheckState::Ok,
        "warning" => CheckState::Warning,
        "critical" => CheckState::Critical,
        _ => CheckState::Unknown,
    }
}

/// The severity a check state has on the timeline (UNKNOWN has no verdict).
pub fn severity_of(state: CheckState) -> Severity {
    match state {
        CheckState::Ok => Severity::Ok,
        CheckState::Warning => Severity::Warning,
        CheckState::Critical => Severity::Critical,
        CheckState::Unknown => Severity::Info,
    }
}

/// `disk` or `disk{mount=/}`: how a check shows up as a state source.
pub fn source_name(check: &str, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return check.to_owned();
    }
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{check}{{{}}}", inner.join(","))
}

fn state_event(
    system: &str,
    result: &CheckResult,
    from: Option<CheckState>,
    to: CheckState,
    agent: Option<&AgentRef>,
) -> NewEvent {
    let source = source_name(&result.check, &result.labels);
    let summary: String = result
        .output
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect();
    let from_text = from.map_or("none", |s| s.as_str());
    let title = format!(
        "{source} {} → {}: {summary}",
        from_text.to_uppercase(),
        to.as_str().to_uppercase()
    );
    let title: String = title.chars().take(500).collect();
    let output: String = result.output.chars().take(8 * 1024).collect();
    let mut event = NewEvent::internal(
        "check.state_changed",
        severity_of(to),
        title,
        serde_json::json!({
            "source": format!("check:{source}"),
            "check": result.check,
            "labels": result.labels,
            "system": system,
            "from": from_text,
            "to": to.as_str(),
            "status": result.status,
            "agent": agent.map(|a| a.name.clone()),
            "via": result.source,
        }),
    );
    event.body = format!("```\n{}\n```", output.replace("```", "'''"));
    event.occurred_at = Some(crate::db::from_micros(result.executed_at));
    event
}

/// Longest ttl a pushed result may carry (one week, as for definitions).
const MAX_PUSHED_TTL: u32 = 7 * 24 * 3600;

/// The keepalive observation for an agent.
pub fn keepalive_result(agent: &AgentRef, status: i32, summary: String, now: i64) -> CheckResult {
    let verdict = CheckState::from_exit(status).as_str().to_uppercase();
    CheckResult {
        check: KEEPALIVE_CHECK.to_owned(),
        system: None,
        labels: BTreeMap::from([("agent".to_owned(), agent.name.clone())]),
        status,
        output: format!("KEEPALIVE {verdict} - {summary}"),
        metrics: Vec::new(),
        executed_at: now,
        duration_ms: 0,
        source: "keepalive".to_owned(),
    }
}
