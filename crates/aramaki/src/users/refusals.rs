//! Refused attempts on systems, recorded on the instance's audit trail.
//!
//! A refusal is counted per (caller, kind, target) in windows of
//! `auth.refusal_window_minutes`; only the first of each becomes an event
//! (`access.refused`, carrying the caller's count of the window before), so
//! a flood on one target is one event per window. Each distinct target of a
//! window is named, so probing a harmless slug first cannot hide the real
//! target; past [`TARGETS_PER_WINDOW`] the rest are counted under `*` with
//! one more event, so a scan of many slugs stays bounded too. The caller
//! gets the same answer whether or not the target exists: recording happens
//! in both cases.

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

/// Distinct targets named per caller, kind and window; more are counted
/// together under `*`.
pub const TARGETS_PER_WINDOW: i64 = 20;

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
    let target: String = target.chars().take(100).collect();
    let mut tx = ctx.db.begin().await?;
    let known = sqlx::query(
        "SELECT 1 FROM refusals WHERE caller = $1 AND kind = $2 AND window_start = $3 AND target = $4",
    )
    .bind(caller.as_str())
    .bind(kind)
    .bind(start)
    .bind(target.as_str())
    .fetch_optional(&mut *tx)
    .await?
    .is_some();
    let named: i64 = sqlx::query(
        "SELECT count(*) AS n FROM refusals WHERE caller = $1 AND kind = $2 AND window_start = $3 AND target <> '*'",
    )
    .bind(caller.as_str())
    .bind(kind)
    .bind(start)
    .fetch_one(&mut *tx)
    .await?
    .try_get("n")?;
    let row = if known || named < TARGETS_PER_WINDOW {
        target.as_str()
    } else {
        "*"
    };
    let attempts: i64 = sqlx::query(
        "INSERT INTO refusals (caller, kind, window_start, target, attempts) VALUES ($1, $2, $3, $4, 1) \
         ON CONFLICT (caller, kind, window_start, target) DO UPDATE SET attempts = refusals.attempts + 1 \
         RETURNING attempts",
    )
    .bind(caller.as_str())
    .bind(kind)
    .bind(start)
    .bind(row)
    .fetch_one(&mut *tx)
    .await?
    .try_get("attempts")?;
    if attempts == 1 {
        let before = attempts_in(&mut tx, &caller, kind, start - window).await?;
        let title = if row == "*" {
            format!(
                "Refused {kind} on more than {TARGETS_PER_WINDOW} systems for {} (the rest of this window counted together)",
                actor.name
            )
        } else {
            format!("Refused {kind} on '{target}' for {}", actor.name)
        };
        let data = serde_json::json!({
            "caller": caller, "kind": kind, "target": row,
            "window_minutes": ctx.config.auth.refusal_window_minutes,
            "previous_window_attempts": before,
        });
        super::audit(ctx, &mut tx, &actor, "access.refused", title, data).await?;
    }
    ctx.commit(tx).await?;
    Ok(())
}

/// A caller's refused attempts of `kind` in the window starting at `start`,
/// over every target.
async fn attempts_in(
    conn: &mut sqlx::AnyConnection,
    caller: &str,
    kind: &str,
    start: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "SELECT CAST(COALESCE(SUM(attempts), 0) AS BIGINT) AS n FROM refusals \
         WHERE caller = $1 AND kind = $2 AND window_start = $3",
    )
    .bind(caller)
    .bind(kind)
    .bind(start)
    .fetch_one(conn)
    .await?
    .try_get("n")
}

/// How many refused attempts of `kind` a caller made in the window that
/// holds `at` (microseconds).
pub async fn count(ctx: &Context, caller: &str, kind: &str, at: i64) -> Result<i64, sqlx::Error> {
    let window = i64::from(ctx.config.auth.refusal_window_minutes) * 60_000_000;
    let start = at - at.rem_euclid(window);
    let mut conn = ctx.db.reader().acquire().await?;
    attempts_in(&mut conn, caller, kind, start).await
}
