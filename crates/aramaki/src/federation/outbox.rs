//! The per-peer outbox: messages wait in the database, numbered per peer,
//! until the peer acknowledges them after its commit. Numbering per peer
//! keeps them in order (and so in order per system); the receiver's cursor
//! says where to resume after a restart or a partition.

use sqlx::Row;

use crate::db::Tx;

/// A message waiting for a peer.
#[derive(Debug, Clone)]
pub struct Queued {
    pub seq: i64,
    /// Random: tells this message from another given the same number.
    pub mark: String,
    pub kind: String,
    pub body: serde_json::Value,
}

/// Queues messages for `peer` in the caller's transaction; returns the
/// last sequence number given. Wake the link after commit
/// ([`super::link::Federation::wake`]).
pub async fn enqueue(
    tx: &mut Tx,
    peer: &str,
    messages: &[(&str, serde_json::Value)],
    now: i64,
) -> Result<i64, sqlx::Error> {
    let n = messages.len() as i64;
    let row = sqlx::query(
        "UPDATE peers SET out_seq = out_seq + $2 WHERE instance_id = $1 RETURNING out_seq",
    )
    .bind(peer)
    .bind(n)
    .fetch_one(&mut **tx)
    .await?;
    let last: i64 = row.try_get(0)?;
    let mut seq = last - n;
    for (kind, body) in messages {
        seq += 1;
        let body = fitted(kind, body);
        sqlx::query(
            "INSERT INTO federation_outbox (peer_id, seq, kind, body, created_at, mark) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(peer)
        .bind(seq)
        .bind(*kind)
        .bind(body.as_ref().to_string())
        .bind(now)
        .bind(crate::db::new_id().to_string())
        .execute(&mut **tx)
        .await?;
    }
    Ok(last)
}

/// Messages for `peer` after `after`, in order.
pub async fn after(
    pool: &sqlx::AnyPool,
    peer: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<Queued>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, mark, kind, body FROM federation_outbox WHERE peer_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
    )
    .bind(peer)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let body: String = r.try_get("body")?;
            Ok(Queued {
                seq: r.try_get("seq")?,
                mark: r.try_get("mark")?,
                kind: r.try_get("kind")?,
                body: serde_json::from_str(&body).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            })
        })
        .collect()
}

/// Drops what the peer acknowledged, keeping the mark of the last one.
pub async fn acknowledged(db: &crate::db::Db, peer: &str, upto: i64) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "UPDATE peers SET acked_seq = $2, acked_mark = \
         (SELECT mark FROM federation_outbox WHERE peer_id = $1 AND seq = $2) \
         WHERE instance_id = $1 AND acked_seq < $2 AND EXISTS \
         (SELECT 1 FROM federation_outbox WHERE peer_id = $1 AND seq = $2)",
    )
    .bind(peer)
    .bind(upto)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM federation_outbox WHERE peer_id = $1 AND seq <= $2")
        .bind(peer)
        .bind(upto)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// How many messages wait for `peer`, and when the oldest was queued (µs).
pub async fn backlog(pool: &sqlx::AnyPool, peer: &str) -> Result<(i64, Option<i64>), sqlx::Error> {
    let row =
        sqlx::query("SELECT COUNT(*), MIN(created_at) FROM federation_outbox WHERE peer_id = $1")
            .bind(peer)
            .fetch_one(pool)
            .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Where a link resumes sending to `peer`, given the cursor it sent (the
/// last message it committed from us, in epoch `cursor_epoch`): the cursor
/// and our epoch. When the numbering is broken — the peer holds numbers we
/// never gave (we were restored from a backup) or resumes after messages
/// we trimmed once it acknowledged them (it was) — a new epoch starts at 1
/// with a fresh snapshot of every use, and it is said loudly.
pub async fn reconcile(
    ctx: &crate::context::Context,
    peer: &super::link::LinkPeer,
    cursor: i64,
    cursor_epoch: &str,
    cursor_mark: &str,
) -> Result<(i64, String), sqlx::Error> {
    let mut tx = ctx.db.begin_recording().await?;
    let row = sqlx::query(
        "SELECT out_seq, out_epoch, acked_seq, acked_mark FROM peers WHERE instance_id = $1",
    )
    .bind(peer.id.as_str())
    .fetch_one(&mut *tx)
    .await?;
    let (out_seq, epoch): (i64, String) = (row.try_get(0)?, row.try_get(1)?);
    let (acked_seq, acked_mark): (i64, String) = (row.try_get(2)?, row.try_get(3)?);
    let same_epoch = cursor_epoch == epoch;
    let theirs = if same_epoch { cursor } else { 0 };
    let next_kept = sqlx::query("SELECT 1 FROM federation_outbox WHERE peer_id = $1 AND seq = $2")
        .bind(peer.id.as_str())
        .bind(theirs + 1)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    // The mark we know for the number they hold: the last acknowledged,
    // or one still waiting.
    let ours = if theirs == acked_seq {
        Some(acked_mark)
    } else {
        sqlx::query("SELECT mark FROM federation_outbox WHERE peer_id = $1 AND seq = $2")
            .bind(peer.id.as_str())
            .bind(theirs)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<String, _>(0))
            .transpose()?
    };
    let diverged = same_epoch
        && theirs > 0
        && !cursor_mark.is_empty()
        && ours.is_some_and(|m| !m.is_empty() && m != cursor_mark);
    let broken = if theirs > out_seq {
        Some(format!(
            "{} holds messages up to {theirs} from this instance, which numbered only {out_seq}: \
             this instance was restored from a backup or lost its state",
            peer.name
        ))
    } else if diverged {
        Some(format!(
            "{} holds another message {theirs} than the one this instance numbered so: \
             this instance was restored from a backup and numbered anew",
            peer.name
        ))
    } else if theirs < out_seq && !next_kept {
        Some(format!(
            "{} resumes after message {theirs}, but {} and later were trimmed once it had acknowledged them: \
             {} was restored from a backup or lost its state",
            peer.name,
            theirs + 1,
            peer.name
        ))
    } else {
        None
    };
    let Some(reason) = broken else {
        return Ok((theirs, epoch));
    };
    let epoch = crate::db::new_id().to_string();
    let now = crate::db::to_micros(ctx.now());
    // What still waits goes again, renumbered in the new epoch (the peer
    // may have some of it: every handler takes a repeat), then the fresh
    // snapshots, so that the peer ends on the current state.
    let waiting =
        sqlx::query("SELECT kind, body FROM federation_outbox WHERE peer_id = $1 ORDER BY seq")
            .bind(peer.id.as_str())
            .fetch_all(&mut *tx)
            .await?;
    let mut fresh: Vec<(String, serde_json::Value)> = Vec::new();
    for r in &waiting {
        let body: String = r.try_get(1)?;
        let body = serde_json::from_str(&body).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        fresh.push((r.try_get(0)?, body));
    }
    sqlx::query("DELETE FROM federation_outbox WHERE peer_id = $1")
        .bind(peer.id.as_str())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE peers SET out_seq = 0, out_epoch = $2, resynced_at = $3, resync_reason = $4, acked_seq = 0, acked_mark = '' WHERE instance_id = $1",
    )
    .bind(peer.id.as_str())
    .bind(epoch.as_str())
    .bind(now)
    .bind(reason.as_str())
    .execute(&mut *tx)
    .await?;
    let snapshots = super::uses::resync_messages(&mut tx, &peer.id).await?;
    fresh.extend(snapshots.into_iter().map(|(k, v)| (k.to_owned(), v)));
    let fresh: Vec<(&str, serde_json::Value)> =
        fresh.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    enqueue(&mut tx, &peer.id, &fresh, now).await?;
    let actor = crate::timeline::Actor::instance(&ctx.identity.instance_id, "federation");
    crate::users::audit(
        ctx,
        &mut tx,
        &actor,
        "federation.resynced",
        format!(
            "The numbering of messages to {} was broken; a new epoch starts with a fresh snapshot of every use ({} messages). {reason}",
            peer.name,
            fresh.len()
        ),
        serde_json::json!({"peer": peer.id, "epoch": epoch, "direction": "outbound", "cursor": cursor, "out_seq": out_seq, "reason": reason}),
    )
    .await
    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    ctx.commit(tx).await?;
    ctx.federation.resynced("outbound");
    tracing::warn!(
        peer = peer.name,
        epoch,
        reason,
        "federation numbering broken: new epoch, fresh snapshots"
    );
    Ok((0, epoch))
}

/// Room for a body inside an envelope (the rest is headers and signature).
const BODY_BUDGET: usize = super::envelope::MAX_ENVELOPE_BYTES - 16 * 1024;

/// A body that fits in an envelope: the receiver refuses larger ones, and
/// one refused message would hold up every later one. Recent events of a
/// snapshot go first, then the longest texts are cut, with a mark.
fn fitted<'a>(kind: &str, body: &'a serde_json::Value) -> std::borrow::Cow<'a, serde_json::Value> {
    let size = |v: &serde_json::Value| v.to_string().len();
    if size(body) <= BODY_BUDGET {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut v = body.clone();
    if let Some(events) = v.get_mut("events").and_then(|e| e.as_array_mut()) {
        // Newest first: the oldest go, until they take half the room at most.
        let mut total: usize = events.iter().map(size).sum();
        while total > BODY_BUDGET / 2 {
            let Some(last) = events.pop() else { break };
            total -= size(&last);
        }
    }
    while size(&v) > BODY_BUDGET {
        let Some(longest) = longest_string(&mut v) else {
            break;
        };
        if longest.len() < 256 {
            break;
        }
        let keep: String = longest.chars().take(longest.chars().count() / 2).collect();
        *longest = format!("{keep} … (cut to fit a federation message)");
    }
    tracing::warn!(
        kind,
        before = size(body),
        after = size(&v),
        "federation message cut to fit"
    );
    std::borrow::Cow::Owned(v)
}

fn longest_string(v: &mut serde_json::Value) -> Option<&mut String> {
    match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Array(items) => items
            .iter_mut()
            .filter_map(longest_string)
            .max_by_key(|s| s.len()),
        serde_json::Value::Object(fields) => fields
            .values_mut()
            .filter_map(longest_string)
            .max_by_key(|s| s.len()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_too_large_for_an_envelope_is_cut_to_fit() {
        let small = serde_json::json!({"title": "fine"});
        assert!(matches!(
            fitted("event", &small),
            std::borrow::Cow::Borrowed(_)
        ));
        let events: Vec<_> = (0..400)
            .map(|i| serde_json::json!({"title": format!("event {i}"), "body": "x".repeat(2_000)}))
            .collect();
        let big = serde_json::json!({
            "system": {"handbook": "h".repeat(300_000), "title": "Storage"},
            "events": events,
        });
        let fit = fitted("use.snapshot", &big);
        assert!(fit.to_string().len() <= BODY_BUDGET);
        assert_eq!(fit["system"]["title"], "Storage", "short fields stay");
        assert!(fit["system"]["handbook"]
            .as_str()
            .unwrap()
            .ends_with("(cut to fit a federation message)"));
    }
}
