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
        sqlx::query(
            "INSERT INTO federation_outbox (peer_id, seq, kind, body, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(peer)
        .bind(seq)
        .bind(*kind)
        .bind(body.to_string())
        .bind(now)
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
        "SELECT seq, kind, body FROM federation_outbox WHERE peer_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
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
                kind: r.try_get("kind")?,
                body: serde_json::from_str(&body).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            })
        })
        .collect()
}

/// Drops what the peer acknowledged.
pub async fn acknowledged(db: &crate::db::Db, peer: &str, upto: i64) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
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
