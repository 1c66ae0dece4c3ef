//! Refused attempts on systems, recorded on the instance's audit trail.
//!
//! A refusal is counted per (caller, kind) in windows of
//! `auth.refusal_window_minutes`; only the first of a window becomes an
//! event (`access.refused`), carrying the count of the window before, so a
//! flood is one event per window. The caller gets the same answer whether
//! or not the target exists: recording happens in both cases.

use sqlx::Row;

use super::access::Access;
use crate::context::Context;
use crate::db::to_micros;

/// Counts a refused attempt of `kind` on `target` (a slug as given) and,
/// for the first of its window, records it. Best effort: a failure to
/// record is logged, and the refusal stands.
pub async fn record(ctx: &Context, access: &Access, kind: &str, target: &str) {
    if let Err(e) = try_record(ctx, access, kind, target).await {
        tracing::warn!(error = %e, kind, "cannot record a refused attempt");
    }
}

async fn try_record(
    ctx: &Context,
    access: &Access,
    kind: &str,
    target: &str,
) -> Result<(), super::UserError> {
    let actor = access.actor();
    let caller = actor.id.clone().unwrap_or_else(|| actor.name.clone());
    let window = i64::from(ctx.config.auth.refusal_window_minutes) * 60_000_000;
    let now = to_micros(ctx.now());
    let start = now - now.rem_euclid(window);
    let mut tx = ctx.db.begin().await?;
    let attempts: i64 = sqlx::query(
        "INSERT INTO refusals (caller, kind, window_start, attempts) VALUES ($1, $2, $3, 1) \
         ON CONFLICT (caller, kind, window_start) DO UPDATE SET attempts = refusals.attempts + 1 \
         RETURNING attempts",
    )
    .bind(caller.as_str())
    .bind(kind)
    .bind(start)
    .fetch_one(&mut *tx)
    .await?
    .try_get("attempts")?;
    if attempts == 1 {
        let before: Option<i64> = sqlx::query(
            "SELECT attempts FROM refusals WHERE caller = $1 AND kind = $2 AND window_start = $3",
        )
        .bind(caller.as_str())
        .bind(kind)
        .bind(start - window)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get("attempts"))
        .transpose()?;
        let target: String = target.chars().take(100).collect();
        let title = format!("Refused {kind} on '{target}' for {}", actor.name);
        let data = serde_json::json!({
            "caller": caller, "kind": kind, "target": target,
            "window_minutes": ctx.config.auth.refusal_window_minutes,
            "previous_window_attempts": before.unwrap_or(0),
        });
        super::audit(ctx, &mut tx, &actor, "access.refused", title, data).await?;
    }
    ctx.commit(tx).await?;
    Ok(())
}

/// How many refused attempts of `kind` a caller made in the window that
/// holds `at` (microseconds).
pub async fn count(ctx: &Context, caller: &str, kind: &str, at: i64) -> Result<i64, sqlx::Error> {
    let window = i64::from(ctx.config.auth.refusal_window_minutes) * 60_000_000;
    let start = at - at.rem_euclid(window);
    let row = sqlx::query(
        "SELECT attempts FROM refusals WHERE caller = $1 AND kind = $2 AND window_start = $3",
    )
    .bind(caller)
    .bind(kind)
    .bind(start)
    .fetch_optional(ctx.db.reader())
    .await?;
    Ok(match row {
        Some(r) => r.try_get("attempts")?,
        None => 0,
    })
}
