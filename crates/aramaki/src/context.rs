//! The Context: everything the domain needs from the outside world, built once
//! in `main` (or once per test) and passed by reference.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};

use crate::config::Config;
use crate::db::Db;
use crate::federation::identity::Identity;
use crate::metrics::Metrics;
use crate::timeline::hub::TimelineHub;

/// Where domain code gets the time from; tests drive a [`TestClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> Timestamp;
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct TestClock(Mutex<Timestamp>);

impl TestClock {
    pub fn new(start: Timestamp) -> TestClock {
        TestClock(Mutex::new(start))
    }

    pub fn advance(&self, by: SignedDuration) {
        if let Ok(mut t) = self.0.lock() {
            *t = t.checked_add(by).unwrap_or(*t);
        }
    }

    pub fn set(&self, to: Timestamp) {
        if let Ok(mut t) = self.0.lock() {
            *t = to;
        }
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        self.0.lock().map(|t| *t).unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// One instance's view of the world.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub data_dir: PathBuf,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    pub identity: Identity,
    pub timeline: TimelineHub,
    pub appender: crate::timeline::batch::Appender,
    pub metrics: Metrics,
    /// Agents connected to this process.
    pub agents: crate::agents::hub::AgentHub,
    /// The results writer's queue.
    pub ingest: crate::monitoring::ingest::Ingest,
    /// Links to peer instances.
    pub federation: crate::federation::link::Federation,
}

impl Context {
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Commits a write transaction and wakes the timeline's subscribers.
    pub async fn commit(&self, tx: crate::db::Tx) -> Result<(), sqlx::Error> {
        tx.commit().await?;
        self.timeline.wake();
        Ok(())
    }
}
