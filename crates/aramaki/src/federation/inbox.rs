//! Committing what a peer sent: in order, exactly once in effect.
//!
//! Messages carry the sender's per-peer sequence number. A batch commits in
//! one transaction with the new cursor (`peers.in_seq`) and the envelope
//! ids (replay protection), so a crash either keeps all of it or none;
//! a number at or below the cursor is a redelivery and is skipped, one
//! beyond the next is a gap (the sender rewinds on the nack).

use aramaki_protocol::federation::Envelope;
use sqlx::Row;

use super::link::{remember, LinkPeer};
use super::uses::{dispatch, Refusal};
use crate::context::Context;
use crate::db::to_micros;

/// Commits `messages` from `peer`; returns the new cursor, the epoch it
/// counts in, and whether a gap (or a replay) stopped the batch early.
///
/// Numbers count within the sender's epoch: a message of another epoch
/// numbered 1 starts that epoch here (the sender found the numbering
/// broken and started afresh, which is said loudly); any other number of
/// another epoch is a gap.
pub async fn apply(
    ctx: &Context,
    peer: &LinkPeer,
    messages: Vec<Envelope>,
) -> Result<(i64, String, bool), sqlx::Error> {
    if messages.is_empty() {
        return Ok((peer.in_seq, peer.in_epoch.clone(), false));
    }
    let now = to_micros(ctx.now());
    let mut tx = ctx.db.begin_recording().await?;
    let row = sqlx::query("SELECT in_seq, in_epoch FROM peers WHERE instance_id = $1")
        .bind(peer.id.as_str())
        .fetch_one(&mut *tx)
        .await?;
    let (mut cursor, mut epoch): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
    let (start, start_epoch) = (cursor, epoch.clone());
    let mut gap = false;
    let mut mark: Option<String> = None;
    for e in messages {
        let seq = e.body["seq"].as_i64().unwrap_or(0);
        let their_epoch = e.body["epoch"].as_str().unwrap_or_default();
        let nul = nul_field(&e);
        if let Some(field) = nul.as_deref().filter(|_| their_epoch.contains('\0')) {
            // A numbering that cannot be stored: nothing of it applies.
            ctx.federation
                .refuse(&peer.name, "nul", &nul_detail(seq, field));
            gap = true;
            break;
        }
        if their_epoch != epoch {
            if seq != 1 {
                gap = true;
                break;
            }
            if cursor > 0 || !epoch.is_empty() {
                let reason = format!(
                    "{} restarted its numbering (after message {cursor} of the epoch before): \
                     it found it broken, after a restore from a backup on one side",
                    peer.name
                );
                note_broken(ctx, peer, "inbound", &reason, Some(&mut tx)).await?;
            }
            epoch = their_epoch.to_owned();
            cursor = 0;
        }
        if seq <= cursor {
            continue;
        }
        if seq != cursor + 1 {
            gap = true;
            break;
        }
        if let Some(field) = nul {
            // Refused like a message that is not allowed, and passed over:
            // the next one on the link applies.
            ctx.federation
                .refuse(&peer.name, "nul", &nul_detail(seq, &field));
            cursor = seq;
            let their_mark = e.body["mark"].as_str().unwrap_or_default();
            mark = Some(if their_mark.contains('\0') {
                String::new()
            } else {
                their_mark.to_owned()
            });
            continue;
        }
        if !remember(&mut tx, &e, now).await? {
            ctx.federation.refuse(
                &peer.name,
                "replayed",
                &format!("envelope {} was seen before (replay)", e.id),
            );
            gap = true;
            break;
        }
        // A message that writes in several steps is all or nothing: one
        // refused half-way (a snapshot with a bad system) leaves no trace.
        let guarded = !matches!(e.kind.as_str(), "activity" | "status");
        if guarded {
            sqlx::query("SAVEPOINT inbox_message")
                .execute(&mut *tx)
                .await?;
        }
        match dispatch(ctx, &mut tx, peer, &e.kind, &e.body["data"]).await {
            Ok(()) => {}
            Err(Refusal::Db(err)) => return Err(err),
            Err(Refusal::Refused(reason)) => {
                if guarded {
                    sqlx::query("ROLLBACK TO SAVEPOINT inbox_message")
                        .execute(&mut *tx)
                        .await?;
                }
                ctx.federation.refuse(&peer.name, "not_allowed", &reason);
            }
        }
        if guarded {
            sqlx::query("RELEASE SAVEPOINT inbox_message")
                .execute(&mut *tx)
                .await?;
        }
        cursor = seq;
        mark = Some(e.body["mark"].as_str().unwrap_or_default().to_owned());
    }
    if cursor != start || epoch != start_epoch {
        sqlx::query(
            "UPDATE peers SET in_seq = $2, in_epoch = $4, in_mark = COALESCE($5, in_mark), last_seen_at = $3 WHERE instance_id = $1",
        )
        .bind(peer.id.as_str())
        .bind(cursor)
        .bind(now)
        .bind(epoch.as_str())
        .bind(mark)
        .execute(&mut *tx)
        .await?;
        ctx.commit(tx).await?;
    } else {
        // Nothing committed: the epoch switch (if any) is not noted either.
        return Ok((start, start_epoch, gap));
    }
    Ok((cursor, epoch, gap))
}

/// The first field of an envelope holding U+0000, which PostgreSQL TEXT
/// cannot store (SQLite would): such a message is refused on both.
pub fn nul_field(e: &Envelope) -> Option<String> {
    let value = serde_json::to_value(e).ok()?;
    crate::input::nul_path(&value, &mut String::new())
}

fn nul_detail(seq: i64, field: &str) -> String {
    format!("message {seq}: `{field}` contains a NUL character (U+0000), which is not allowed")
}

/// Says loudly that the numbering with `peer` was found broken: on the
/// instance's timeline, on the peer (shown in the peer list), in the
/// metric and the log. In `tx` if given, else in its own transaction.
pub async fn note_broken(
    ctx: &Context,
    peer: &LinkPeer,
    direction: &'static str,
    reason: &str,
    tx: Option<&mut crate::db::Tx>,
) -> Result<(), sqlx::Error> {
    let mut own = None;
    let tx = match tx {
        Some(tx) => tx,
        None => own.insert(ctx.db.begin_recording().await?),
    };
    let now = to_micros(ctx.now());
    sqlx::query("UPDATE peers SET resynced_at = $2, resync_reason = $3 WHERE instance_id = $1")
        .bind(peer.id.as_str())
        .bind(now)
        .bind(reason)
        .execute(&mut **tx)
        .await?;
    let actor = crate::timeline::Actor::instance(&ctx.identity.instance_id, "federation");
    crate::users::audit(
        ctx,
        tx,
        &actor,
        "federation.resynced",
        format!(
            "The numbering of messages with {} was broken: {reason}",
            peer.name
        ),
        serde_json::json!({"peer": peer.id, "direction": direction, "reason": reason}),
    )
    .await
    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    if let Some(tx) = own {
        ctx.commit(tx).await?;
    }
    ctx.federation.resynced(direction);
    tracing::warn!(
        peer = peer.name,
        direction,
        reason,
        "federation numbering broken"
    );
    Ok(())
}
