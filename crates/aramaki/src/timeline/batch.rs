//! Group commit for events recorded through the API.
//!
//! Concurrent `POST /api/v1/events` requests are queued to one writer task,
//! which appends whatever has queued up in a single transaction and answers
//! each request after the commit. On SQLite (one writer) this turns a
//! transaction per event into a transaction per batch, which is what makes
//! thousands of events per second possible on a small machine. Nothing is
//! acknowledged before it is committed. The writer also resolves system
//! slugs and causes, so a request costs no extra round trip of its own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::{store, Actor, Event, Idempotency, NewEvent};
use crate::context::Context;
use crate::db::new_id;

/// What became of one event of a request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Recorded now.
    Appended(Event),
    /// The idempotency key was used before for the same event.
    Replayed(Event),
    /// The idempotency key was used before for a different event.
    KeyReused,
    /// No live system has this slug.
    UnknownSystem(String),
    /// No event has this id.
    UnknownCause(Uuid),
    /// Not written because another event of the same request was refused.
    NotWritten,
}

impl Outcome {
    fn refused(&self) -> bool {
        matches!(
            self,
            Outcome::KeyReused | Outcome::UnknownSystem(_) | Outcome::UnknownCause(_)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("the event writer has stopped")]
    Stopped,
}

/// One event to append to a system, named by slug.
#[derive(Debug, Clone)]
pub struct Request {
    pub actor: Actor,
    pub system: String,
    pub event: NewEvent,
}

type Group = Vec<Request>;
type Reply = oneshot::Sender<Result<Vec<Outcome>, BatchError>>;

/// The queue in front of the writer task.
#[derive(Debug)]
pub struct Appender {
    tx: mpsc::Sender<(Group, Reply)>,
    rx: Mutex<Option<mpsc::Receiver<(Group, Reply)>>>,
}

impl Default for Appender {
    fn default() -> Self {
        Appender::new()
    }
}

/// Most events committed in one transaction (a larger single request is
/// still committed whole).
const MAX_BATCH: usize = 512;

impl Appender {
    pub fn new() -> Appender {
        let (tx, rx) = mpsc::channel(1024);
        Appender {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    /// Appends a request's events, all or none, through the writer task when
    /// it runs, else directly.
    pub async fn append(&self, ctx: &Context, group: Group) -> Result<Vec<Outcome>, BatchError> {
        let running = self.rx.lock().map(|rx| rx.is_none()).unwrap_or(true);
        if !running {
            let mut results = write_batch(ctx, vec![group]).await?;
            return results.pop().ok_or(BatchError::Stopped);
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((group, reply))
            .await
            .map_err(|_| BatchError::Stopped)?;
        answer.await.map_err(|_| BatchError::Stopped)?
    }

    /// Starts the writer task (once); it ends when `stop` turns true.
    pub fn spawn(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
        let Some(mut rx) = ctx.appender.rx.lock().ok().and_then(|mut rx| rx.take()) else {
            return;
        };
        tokio::spawn(async move {
            loop {
                let first = tokio::select! {
                    item = rx.recv() => item,
                    _ = stop.changed() => None,
                };
                let Some(first) = first else { break };
                // Let requests that are being handled right now join this batch.
                tokio::task::yield_now().await;
                let mut size = first.0.len();
                let mut items = vec![first];
                while size < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(item) => {
                            size += item.0.len();
                            items.push(item);
                        }
                        Err(_) => break,
                    }
                }
                run_batch(&ctx, items).await;
            }
        });
    }
}

async fn run_batch(ctx: &Context, items: Vec<(Group, Reply)>) {
    let (groups, replies): (Vec<Group>, Vec<Reply>) = items.into_iter().unzip();
    let copies = groups.clone();
    match write_batch(ctx, groups).await {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) if copies.len() > 1 => {
            // One bad request must not fail the others: retry each alone.
            tracing::warn!(error = %e, requests = copies.len(), "event batch failed; retrying one by one");
            for (reply, group) in replies.into_iter().zip(copies) {
                let result = write_batch(ctx, vec![group])
                    .await
                    .and_then(|mut r| r.pop().ok_or(BatchError::Stopped));
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(BatchError::Db(sqlx::Error::Protocol(e.to_string()))));
            }
        }
    }
}

/// What a batch writes, and what it answers.
struct Plan {
    outcomes: Vec<Vec<Outcome>>,
    fresh: Vec<Fresh>,
}

/// An event to write: where its answer goes, and the state it sets.
struct Fresh {
    group: usize,
    index: usize,
    event: Event,
    idempotency: Option<Idempotency>,
    state_source: Option<String>,
}

/// Appends the groups in one transaction, each group all or nothing.
async fn write_batch(ctx: &Context, groups: Vec<Group>) -> Result<Vec<Vec<Outcome>>, BatchError> {
    let mut tx = ctx.db.begin().await?;
    // On PostgreSQL this lock also makes the idempotency check race-free.
    ctx.db.lock_timeline(&mut tx).await?;
    let all = || groups.iter().flatten();
    let slugs: Vec<String> = all()
        .map(|r| r.system.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let systems = crate::systems::store::ids_by_slugs(&mut tx, &slugs).await?;
    let causes: Vec<Uuid> = all().filter_map(|r| r.event.caused_by).collect();
    let known_causes = store::existing_ids(&mut tx, &causes).await?;
    let keys: Vec<(String, String)> = all()
        .filter_map(|r| {
            r.event
                .idempotency
                .as_ref()
                .map(|i| (i.scope.clone(), i.key.clone()))
        })
        .collect();
    let mut seen = store::find_keys(&mut tx, &keys).await?;
    let plan = plan(ctx, groups, &systems, &known_causes, &mut seen);
    let mut outcomes = plan.outcomes;
    if !plan.fresh.is_empty() {
        let rows: Vec<(&Event, Option<&Idempotency>)> = plan
            .fresh
            .iter()
            .map(|f| (&f.event, f.idempotency.as_ref()))
            .collect();
        let seqs = store::insert_many(&mut tx, &rows).await?;
        for f in plan.fresh {
            let mut event = f.event;
            event.sequence = seqs.get(&event.id.to_string()).copied().unwrap_or(0);
            if let Some(source) = f.state_source {
                store::set_state(&mut tx, &event, &source).await?;
            }
            if let Some(slot) = outcomes.get_mut(f.group).and_then(|o| o.get_mut(f.index)) {
                *slot = Outcome::Appended(event);
            }
        }
    }
    ctx.commit(tx).await?;
    let appended = outcomes
        .iter()
        .flatten()
        .filter(|o| matches!(o, Outcome::Appended(_)))
        .count();
    ctx.metrics.events_recorded(appended as u64);
    Ok(outcomes)
}

/// Decides each event's fate; a group with a refused event writes nothing.
fn plan(
    ctx: &Context,
    groups: Vec<Group>,
    systems: &HashMap<String, String>,
    known_causes: &HashSet<Uuid>,
    seen: &mut HashMap<(String, String), (String, Event)>,
) -> Plan {
    let now = ctx.now();
    let mut outcomes = Vec::with_capacity(groups.len());
    let mut fresh = Vec::new();
    for (g, group) in groups.into_iter().enumerate() {
        let mut group_outcomes = Vec::with_capacity(group.len());
        let mut group_fresh = Vec::new();
        let mut group_keys: HashMap<(String, String), (String, Event)> = HashMap::new();
        for (i, r) in group.into_iter().enumerate() {
            let key = r
                .event
                .idempotency
                .as_ref()
                .map(|k| (k.scope.clone(), k.key.clone()));
            if let (Some(k), Some(idem)) = (&key, &r.event.idempotency) {
                if let Some((hash, earlier)) = seen.get(k).or_else(|| group_keys.get(k)) {
                    group_outcomes.push(if *hash == idem.request_hash {
                        Outcome::Replayed(earlier.clone())
                    } else {
                        Outcome::KeyReused
                    });
                    continue;
                }
            }
            let Some(system_id) = systems.get(&r.system) else {
                group_outcomes.push(Outcome::UnknownSystem(r.system));
                continue;
            };
            if let Some(cause) = r.event.caused_by.filter(|c| !known_causes.contains(c)) {
                group_outcomes.push(Outcome::UnknownCause(cause));
                continue;
            }
            let event = Event {
                id: new_id(),
                sequence: 0,
                system: r.system.clone(),
                occurred_at: r.event.occurred_at.unwrap_or(now),
                recorded_at: now,
                kind: r.event.kind.to_string(),
                severity: r.event.severity,
                title: r.event.title.trim().to_owned(),
                body: r.event.body.clone(),
                actor: r.actor,
                data: r.event.data.clone(),
                origin: ctx.identity.instance_id.clone(),
                caused_by: r.event.caused_by,
                system_id: system_id.clone(),
            };
            if let (Some(k), Some(idem)) = (key, &r.event.idempotency) {
                group_keys.insert(k, (idem.request_hash.clone(), event.clone()));
            }
            let state_source = r.event.kind.is_state().then(|| r.event.state_source());
            group_outcomes.push(Outcome::NotWritten);
            group_fresh.push(Fresh {
                group: g,
                index: i,
                event,
                idempotency: r.event.idempotency,
                state_source,
            });
        }
        if group_outcomes.iter().any(Outcome::refused) {
            outcomes.push(group_outcomes);
            continue;
        }
        seen.extend(group_keys);
        fresh.extend(group_fresh);
        outcomes.push(group_outcomes);
    }
    Plan { outcomes, fresh }
}
