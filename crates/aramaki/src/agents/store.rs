//! SQL for agents and enrollment tokens.

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use super::{Agent, TokenInfo};
use crate::db::{from_micros, Tx};

/// A live system's id and slug.
pub async fn system_by_slug(
    conn: &mut AnyConnection,
    slug: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    let row = sqlx::query("SELECT id, slug FROM systems WHERE slug = $1 AND deleted_at IS NULL")
        .bind(slug)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| Ok((r.try_get("id")?, r.try_get("slug")?)))
        .transpose()
}

/// A system by slug, as far as this instance may attach work to it.
pub enum Owned {
    /// One of ours: (id, slug).
    Here(String, String),
    /// A mirror of another instance's system: its checks, actions and
    /// agents belong to its primary instance.
    Remote,
    Absent,
}

pub async fn owned_system(
    conn: &mut AnyConnection,
    slug: &str,
    me: &str,
) -> Result<Owned, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, slug, instance_id FROM systems WHERE slug = $1 AND deleted_at IS NULL",
    )
    .bind(slug)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(r) = row else {
        return Ok(Owned::Absent);
    };
    if r.try_get::<String, _>("instance_id")? != me {
        return Ok(Owned::Remote);
    }
    Ok(Owned::Here(r.try_get("id")?, r.try_get("slug")?))
}

pub struct NewToken<'a> {
    pub id: &'a str,
    pub secret_hash: &'a str,
    pub system_id: &'a str,
    pub reusable: bool,
    pub created_by: &'a str,
    pub created_at: i64,
    pub expires_at: i64,
}

pub async fn insert_token(tx: &mut Tx, t: &NewToken<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agent_tokens (id, secret_hash, system_id, reusable, created_by, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(t.id)
    .bind(t.secret_hash)
    .bind(t.system_id)
    .bind(i64::from(t.reusable))
    .bind(t.created_by)
    .bind(t.created_at)
    .bind(t.expires_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A token with what enrollment needs to judge it.
pub struct TokenRow {
    pub id: String,
    pub secret_hash: String,
    pub system_id: String,
    pub system_slug: String,
    pub reusable: bool,
    pub uses: i64,
    pub expires_at: i64,
    pub revoked: bool,
}

pub async fn token(tx: &mut Tx, id: &str) -> Result<Option<TokenRow>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT t.id, t.secret_hash, t.system_id, s.slug, t.reusable, t.uses, t.expires_at, t.revoked_at \
         FROM agent_tokens t JOIN systems s ON s.id = t.system_id WHERE t.id = $1",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    row.map(|r| {
        Ok(TokenRow {
            id: r.try_get("id")?,
            secret_hash: r.try_get("secret_hash")?,
            system_id: r.try_get("system_id")?,
            system_slug: r.try_get("slug")?,
            reusable: r.try_get::<i64, _>("reusable")? != 0,
            uses: r.try_get("uses")?,
            expires_at: r.try_get("expires_at")?,
            revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
        })
    })
    .transpose()
}

pub async fn use_token(tx: &mut Tx, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE agent_tokens SET uses = uses + 1, last_used_at = $2 WHERE id = $1")
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn revoke_token(tx: &mut Tx, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE agent_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

const TOKEN_COLUMNS: &str =
    "t.id, s.slug, t.reusable, t.uses, t.created_by, t.created_at, t.expires_at, t.revoked_at";

fn token_info_from(r: &AnyRow) -> Result<TokenInfo, sqlx::Error> {
    Ok(TokenInfo {
        id: r.try_get("id")?,
        system: r.try_get("slug")?,
        reusable: r.try_get::<i64, _>("reusable")? != 0,
        uses: r.try_get("uses")?,
        created_by: r.try_get("created_by")?,
        created_at: from_micros(r.try_get("created_at")?),
        expires_at: from_micros(r.try_get("expires_at")?),
        revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
    })
}

pub async fn token_info(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<TokenInfo>, sqlx::Error> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM agent_tokens t JOIN systems s ON s.id = t.system_id WHERE t.id = $1"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(token_info_from).transpose()
}

pub async fn tokens(conn: &mut AnyConnection) -> Result<Vec<TokenInfo>, sqlx::Error> {
    let sql = format!(
        "SELECT {TOKEN_COLUMNS} FROM agent_tokens t JOIN systems s ON s.id = t.system_id ORDER BY t.created_at DESC"
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    rows.iter().map(token_info_from).collect()
}

const AGENT_COLUMNS: &str = "a.id, a.name, a.system_id, s.slug, a.public_key, a.version, a.subscriptions, \
     a.enrolled_at, a.last_seen, a.acked_seq, a.queue_depth, a.dropped, a.keepalive, a.reenroll, a.revoked_at";

fn agent_from(r: &AnyRow) -> Result<Agent, sqlx::Error> {
    let public_key: String = r.try_get("public_key")?;
    let fingerprint = aramaki_protocol::keys::unhex(&public_key)
        .map(|b| aramaki_protocol::keys::fingerprint(&b))
        .unwrap_or_default();
    let subscriptions: String = r.try_get("subscriptions")?;
    Ok(Agent {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        system: r.try_get("slug")?,
        system_id: r.try_get("system_id")?,
        version: r.try_get("version")?,
        fingerprint,
        public_key,
        subscriptions: serde_json::from_str(&subscriptions).unwrap_or_default(),
        enrolled_at: from_micros(r.try_get("enrolled_at")?),
        last_seen: r.try_get::<Option<i64>, _>("last_seen")?.map(from_micros),
        connected: false,
        acked_seq: r.try_get("acked_seq")?,
        queue_depth: r.try_get("queue_depth")?,
        dropped: r.try_get("dropped")?,
        keepalive: r.try_get("keepalive")?,
        revoked: r.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
        reenroll: r.try_get::<i64, _>("reenroll")? != 0,
    })
}

async fn agent_where(
    conn: &mut AnyConnection,
    clause: &str,
    value: &str,
) -> Result<Option<Agent>, sqlx::Error> {
    let sql = format!(
        "SELECT {AGENT_COLUMNS} FROM agents a JOIN systems s ON s.id = a.system_id WHERE {clause}"
    );
    let row = sqlx::query(&sql)
        .bind(value)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(agent_from).transpose()
}

pub async fn agent_by_id(conn: &mut AnyConnection, id: &str) -> Result<Option<Agent>, sqlx::Error> {
    agent_where(conn, "a.id = $1", id).await
}

pub async fn agent_by_name(
    conn: &mut AnyConnection,
    name: &str,
) -> Result<Option<Agent>, sqlx::Error> {
    agent_where(conn, "a.name = $1", name).await
}

/// An agent by id or by name.
pub async fn find(conn: &mut AnyConnection, key: &str) -> Result<Option<Agent>, sqlx::Error> {
    match agent_by_id(conn, key).await? {
        Some(a) => Ok(Some(a)),
        None => agent_by_name(conn, key).await,
    }
}

pub async fn agents(conn: &mut AnyConnection) -> Result<Vec<Agent>, sqlx::Error> {
    let sql = format!(
        "SELECT {AGENT_COLUMNS} FROM agents a JOIN systems s ON s.id = a.system_id ORDER BY a.name"
    );
    let rows = sqlx::query(&sql).fetch_all(&mut *conn).await?;
    rows.iter().map(agent_from).collect()
}

#[allow(clippy::too_many_arguments)]
pub async fn insert_agent(
    tx: &mut Tx,
    id: &str,
    name: &str,
    system_id: &str,
    public_key: &str,
    version: &str,
    token_id: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO agents (id, name, system_id, public_key, version, token_id, enrolled_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(name)
    .bind(system_id)
    .bind(public_key)
    .bind(version)
    .bind(token_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A re-enrollment: new key, fresh sequence numbers (the new agent state
/// starts counting at 1), no longer revoked.
pub async fn rekey(
    tx: &mut Tx,
    id: &str,
    public_key: &str,
    system_id: &str,
    token_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE agents SET public_key = $2, system_id = $3, token_id = $4, acked_seq = 0, \
         queue_incarnations = '[]', reenroll = 0, revoked_at = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(public_key)
    .bind(system_id)
    .bind(token_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn set_revoked(tx: &mut Tx, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE agents SET revoked_at = $2, reenroll = 0 WHERE id = $1")
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn set_reenroll(tx: &mut Tx, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE agents SET reenroll = 1 WHERE id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What an agent said about itself when its session started.
pub async fn session_started(
    tx: &mut Tx,
    id: &str,
    version: &str,
    subscriptions: &[String],
    queue_depth: i64,
    now: i64,
) -> Result<(), sqlx::Error> {
    let subs = serde_json::to_string(subscriptions).unwrap_or_else(|_| "[]".to_owned());
    sqlx::query(
        "UPDATE agents SET version = $2, subscriptions = $3, queue_depth = $4, last_seen = $5 WHERE id = $1",
    )
    .bind(id)
    .bind(version)
    .bind(subs)
    .bind(queue_depth)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Most queue incarnations remembered per agent (one per agent start while
/// records waited; old ones number nothing waiting any more).
const INCARNATIONS_KEPT: usize = 64;

/// The agent's queue incarnations the server knows, and adds `seen` to
/// them (newest last, bounded). Returns the list as it was before.
pub async fn queue_incarnations(
    tx: &mut Tx,
    id: &str,
    seen: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    let text: Option<String> =
        sqlx::query_scalar("SELECT queue_incarnations FROM agents WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    let known: Vec<String> = text
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut merged = known.clone();
    for s in seen {
        merged.retain(|k| k != s);
        merged.push(s.clone());
    }
    let excess = merged.len().saturating_sub(INCARNATIONS_KEPT);
    merged.drain(..excess);
    if merged != known {
        sqlx::query("UPDATE agents SET queue_incarnations = $2 WHERE id = $1")
            .bind(id)
            .bind(serde_json::to_string(&merged).unwrap_or_else(|_| "[]".to_owned()))
            .execute(&mut **tx)
            .await?;
    }
    Ok(known)
}
