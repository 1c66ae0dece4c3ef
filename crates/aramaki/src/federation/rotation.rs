//! Key rotation: `aramaki instance rotate-key`.
//!
//! The retiring key signs the new one (the proof); the new key goes to
//! `instance.key.next`, the database records the rotation, then the file
//! takes the key's place (a crash in between is settled at the next start).
//! Every link is closed: each reopens with a hello that carries the key
//! history, and each peer walks it from the key it pinned to the new one.
//! From then on the old key only verifies history.

use aramaki_protocol::federation::{KeyRotation, RetiredKey};
use sqlx::Row;

use super::identity::{create_next_key, hex, promote_next_key};
use super::peers::FederationError;
use crate::context::Context;
use crate::db::{to_micros, Db};
use crate::timeline::Actor;

/// The rotations and retired keys recorded, oldest first.
pub async fn history(db: &Db) -> Result<(Vec<KeyRotation>, Vec<RetiredKey>), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT public_key, proof, created_at, retired_at FROM instance_keys ORDER BY created_at, public_key",
    )
    .fetch_all(db.reader())
    .await?;
    let mut rotations = Vec::new();
    let mut retired = Vec::new();
    for row in rows {
        let public_key: String = row.try_get("public_key")?;
        if let Some(proof) = row.try_get::<Option<String>, _>("proof")? {
            rotations.push(KeyRotation {
                public_key: public_key.clone(),
                rotated_at: row.try_get("created_at")?,
                proof,
            });
        }
        if let Some(at) = row.try_get::<Option<i64>, _>("retired_at")? {
            retired.push(RetiredKey {
                public_key,
                retired_at: at,
            });
        }
    }
    Ok((rotations, retired))
}

/// Rotates the instance key; returns the new fingerprint.
pub async fn rotate_key(ctx: &Context, actor: &Actor) -> Result<String, FederationError> {
    let internal = |e: super::identity::IdentityError| FederationError::Internal(e.to_string());
    let next = create_next_key(&ctx.data_dir).map_err(internal)?;
    let now = to_micros(ctx.now());
    let old_key = ctx.identity.public_key_hex();
    let new_key = hex(next.verifying_key().as_bytes());
    let created: i64 = sqlx::query("SELECT created_at FROM instance")
        .fetch_one(ctx.db.reader())
        .await?
        .try_get(0)?;
    let step = ctx.identity.rotation_step(&next.verifying_key(), now);
    let mut tx = ctx.db.begin_recording().await?;
    sqlx::query(
        "INSERT INTO instance_keys (public_key, proof, created_at, retired_at) VALUES ($1, NULL, $2, $3) \
         ON CONFLICT (public_key) DO UPDATE SET retired_at = excluded.retired_at",
    )
    .bind(old_key.as_str())
    .bind(created)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO instance_keys (public_key, proof, created_at) VALUES ($1, $2, $3)")
        .bind(new_key.as_str())
        .bind(step.proof.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE instance SET public_key = $1")
        .bind(new_key.as_str())
        .execute(&mut *tx)
        .await?;
    let fingerprint = aramaki_protocol::keys::fingerprint(next.verifying_key().as_bytes());
    crate::users::audit(
        ctx,
        &mut tx,
        actor,
        "federation.key_rotated",
        format!(
            "Rotated the instance key: new fingerprint {fingerprint}; the old key ({}) now only verifies history",
            ctx.identity.fingerprint()
        ),
        serde_json::json!({"old_key": old_key, "new_key": new_key, "fingerprint": fingerprint}),
    )
    .await
    .map_err(|e| FederationError::Internal(e.to_string()))?;
    ctx.commit(tx).await?;
    promote_next_key(&ctx.data_dir).map_err(internal)?;
    ctx.identity.complete_rotation(next, step);
    ctx.federation.close_all();
    Ok(fingerprint)
}
