//! Phase two of the two-phase handler: subscribers consume the timeline after
//! commit, by cursor, each batch at least once.
//!
//! A durable subscriber keeps its cursor in the database and resumes there
//! after a restart, so handlers must be idempotent (by event id). A live
//! subscriber starts at the head and keeps its cursor in memory.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{store, Event};
use crate::context::Context;
use crate::db::to_micros;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a subscriber could not handle a batch; it is retried.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandleError(pub String);

pub trait Subscriber: Send + Sync + 'static {
    /// Unique name; a durable subscriber's cursor is stored under it.
    fn name(&self) -> &str;
    /// Keep the cursor across restarts?
    fn durable(&self) -> bool;
    fn handle<'a>(
        &'a self,
        ctx: &'a Context,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), HandleError>>;
}

const BATCH: i64 = 500;
/// Other processes sharing PostgreSQL cannot wake us; look now and then.
const POLL: Duration = Duration::from_secs(2);

/// Runs `sub` until `stop` turns true.
pub async fn run(ctx: Arc<Context>, sub: Arc<dyn Subscriber>, mut stop: watch::Receiver<bool>) {
    let mut commits = ctx.timeline.commits();
    let mut cursor = match start_cursor(&ctx, sub.as_ref()).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(subscriber = sub.name(), error = %e, "cannot read the subscriber's cursor");
            return;
        }
    };
    let mut failures: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        match step(&ctx, sub.as_ref(), cursor).await {
            Ok(Some(next)) => {
                cursor = next;
                failures = 0;
                continue;
            }
            Ok(None) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::warn!(subscriber = sub.name(), error = %e, failures, "subscriber batch failed; will retry");
            }
        }
        let wait = if failures == 0 {
            POLL
        } else {
            Duration::from_millis(100u64.saturating_mul(1 << failures.min(9)))
        };
        tokio::select! {
            _ = commits.changed() => {}
            _ = stop.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn start_cursor(ctx: &Context, sub: &dyn Subscriber) -> Result<i64, sqlx::Error> {
    if sub.durable() {
        Ok(store::load_cursor(ctx.db.reader(), sub.name())
            .await?
            .unwrap_or(0))
    } else {
        store::max_seq(ctx.db.reader()).await
    }
}

/// Handles one batch after `cursor`; returns the new cursor if there was one.
pub async fn step(
    ctx: &Context,
    sub: &dyn Subscriber,
    cursor: i64,
) -> Result<Option<i64>, HandleError> {
    let events = store::after_seq(ctx.db.reader(), cursor, BATCH)
        .await
        .map_err(|e| HandleError(e.to_string()))?;
    let Some(last) = events.last().map(|e| e.sequence) else {
        return Ok(None);
    };
    sub.handle(ctx, &events).await?;
    if sub.durable() {
        let save = async {
            let mut tx = ctx.db.begin().await?;
            store::save_cursor(&mut tx, sub.name(), last, to_micros(ctx.now())).await?;
            tx.commit().await
        };
        save.await
            .map_err(|e: sqlx::Error| HandleError(e.to_string()))?;
    }
    Ok(Some(last))
}

/// The live tail: publishes committed events to the hub for the SSE streams.
#[derive(Debug, Default)]
pub struct LiveTail;

impl Subscriber for LiveTail {
    fn name(&self) -> &str {
        "live-tail"
    }

    fn durable(&self) -> bool {
        false
    }

    fn handle<'a>(
        &'a self,
        ctx: &'a Context,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            for e in events {
                ctx.timeline.publish(Arc::new(e.clone()));
            }
            Ok(())
        })
    }
}
