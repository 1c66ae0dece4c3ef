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

/// Commits `messages` from `peer`; returns the new cursor and whether a
/// gap (or a replay) stopped the batch early.
pub async fn apply(
    ctx: &Context,
    peer: &LinkPeer,
    messages: Vec<Envelope>,
) -> Result<(i64, bool), sqlx::Error> {
    if messages.is_empty() {
        return Ok((peer.in_seq, false));
    }
    let now = to_micros(ctx.now());
    let mut tx = ctx.db.begin_recording().await?;
    let mut cursor: i64 = sqlx::query("SELECT in_seq FROM peers WHERE instance_id = $1")
        .bind(peer.id.as_str())
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
    let start = cursor;
    let mut gap = false;
    for e in messages {
        let seq = e.body["seq"].as_i64().unwrap_or(0);
        if seq <= cursor {
            continue;
        }
        if seq != cursor + 1 {
            gap = true;
            break;
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
    }
    if cursor != start {
        sqlx::query("UPDATE peers SET in_seq = $2, last_seen_at = $3 WHERE instance_id = $1")
            .bind(peer.id.as_str())
            .bind(cursor)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        ctx.commit(tx).await?;
    }
    Ok((cursor, gap))
}
