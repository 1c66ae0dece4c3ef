//! The running agent: the scheduler that runs checks whether or not the
//! server is reachable, and the queue every result goes through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aramaki_protocol::agent::{CheckDefinition, Record, RecordBody};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::queue::{Queue, QueueError};

/// The queue, shared by the scheduler, the push API and the session.
pub struct Shared {
    queue: Mutex<Queue>,
    /// Woken whenever records were added.
    pub added: Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("the queue lock is poisoned")]
    Poisoned,
    #[error("queue task failed: {0}")]
    Task(String),
}

impl Shared {
    pub fn new(queue: Queue) -> Arc<Shared> {
        Arc::new(Shared {
            queue: Mutex::new(queue),
            added: Notify::new(),
        })
    }

    /// Appends durably (the write and fsync happen off the async threads);
    /// returns the sequence numbers once the records are on disk.
    pub async fn push(self: &Arc<Self>, bodies: Vec<RecordBody>) -> Result<Vec<u64>, SharedError> {
        let me = self.clone();
        let seqs = tokio::task::spawn_blocking(move || {
            let mut q = me.queue.lock().map_err(|_| SharedError::Poisoned)?;
            q.push(bodies).map_err(SharedError::from)
        })
        .await
        .map_err(|e| SharedError::Task(e.to_string()))??;
        self.added.notify_one();
        Ok(seqs)
    }

    pub fn read(&self, after: u64, max: usize) -> Result<Vec<Record>, SharedError> {
        let q = self.queue.lock().map_err(|_| SharedError::Poisoned)?;
        Ok(q.read(after, max)?)
    }

    /// See [`Queue::reconcile`].
    pub fn reconcile(
        &self,
        mark: u64,
        known: &[String],
    ) -> Result<Option<crate::queue::Renumbered>, SharedError> {
        let mut q = self.queue.lock().map_err(|_| SharedError::Poisoned)?;
        Ok(q.reconcile(mark, known)?)
    }

    /// See [`Queue::spans`].
    pub fn spans(&self) -> Vec<aramaki_protocol::agent::QueueSpan> {
        self.queue.lock().map(|q| q.spans()).unwrap_or_default()
    }

    pub fn ack(&self, up_to: u64) -> Result<(), SharedError> {
        let mut q = self.queue.lock().map_err(|_| SharedError::Poisoned)?;
        Ok(q.ack(up_to)?)
    }

    /// (unacknowledged records, records dropped so far)
    pub fn depth(&self) -> (u64, u64) {
        self.queue
            .lock()
            .map(|q| (q.depth(), q.dropped()))
            .unwrap_or((0, 0))
    }

    pub fn acked(&self) -> u64 {
        self.queue.lock().map(|q| q.acked()).unwrap_or(0)
    }
}

/// Runs each check on its own schedule, independent of the connection.
pub struct Scheduler {
    shared: Arc<Shared>,
    /// Spreads this agent's interval checks differently from other agents'.
    splay_prefix: String,
    running: HashMap<String, (CheckDefinition, JoinHandle<()>)>,
    local: Vec<CheckDefinition>,
    /// What the server's checks may execute (local checks are the
    /// operator's own and are not filtered).
    policy: crate::policy::CheckPolicy,
}

impl Scheduler {
    pub fn new(
        shared: Arc<Shared>,
        splay_prefix: String,
        local: Vec<CheckDefinition>,
    ) -> Scheduler {
        Scheduler {
            shared,
            splay_prefix,
            running: HashMap::new(),
            local,
            policy: crate::policy::CheckPolicy::default(),
        }
    }

    /// Sets the policy the server's checks are held to.
    pub fn with_policy(mut self, policy: crate::policy::CheckPolicy) -> Scheduler {
        self.policy = policy;
        self
    }

    /// Replaces the server's set of checks (local checks always run; a
    /// server check with a local check's name gives way to the local one).
    pub fn set(&mut self, from_server: Vec<CheckDefinition>) {
        let mut wanted: HashMap<String, (CheckDefinition, Option<String>)> = HashMap::new();
        for def in from_server {
            let refusal = self.policy.admit(&def.run).err();
            wanted.insert(def.name.clone(), (def, refusal));
        }
        for def in self.local.iter().cloned() {
            wanted.insert(def.name.clone(), (def, None));
        }
        self.running.retain(|name, (def, task)| {
            let keep = wanted.get(name).is_some_and(|(d, _)| d == def);
            if !keep {
                task.abort();
            }
            keep
        });
        for (name, (def, refusal)) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            if let Some(why) = &refusal {
                tracing::warn!(check = %name, reason = %why, "check refused by the check policy; it reports UNKNOWN instead of running");
            }
            if let Err(e) = crate::schedule::validate(&def.schedule) {
                tracing::error!(check = %name, error = %e, "check not scheduled");
                continue;
            }
            let key = format!("{}/{name}", self.splay_prefix);
            let task = tokio::spawn(check_loop(def.clone(), refusal, self.shared.clone(), key));
            self.running.insert(name, (def, task));
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.running.keys().cloned().collect();
        names.sort();
        names
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        for (_, (_, task)) in self.running.drain() {
            task.abort();
        }
    }
}

async fn check_loop(
    def: CheckDefinition,
    refusal: Option<String>,
    shared: Arc<Shared>,
    splay_key: String,
) {
    loop {
        let now = jiff::Timestamp::now();
        let next = match crate::schedule::next_run(&def.schedule, &splay_key, now) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(check = %def.name, error = %e, "check stopped");
                return;
            }
        };
        let wait = now.duration_until(next);
        let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        let result = match &refusal {
            Some(why) => crate::policy::refused(&def, why),
            None => crate::exec::run(&def).await,
        };
        if let Err(e) = shared.push(vec![RecordBody::Result(result)]).await {
            tracing::error!(check = %def.name, error = %e, "cannot queue a result");
        }
    }
}
