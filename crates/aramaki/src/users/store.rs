//! SQL for users and tokens.

use sqlx::{AnyPool, Row};

use super::{Principal, Role, User};
use crate::db::Tx;

pub async fn insert_user(
    tx: &mut Tx,
    u: &User,
    password_hash: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (id, username, display_name, password_hash, must_change_password, role, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(u.id.as_str())
    .bind(u.username.as_str())
    .bind(u.display_name.as_str())
    .bind(password_hash)
    .bind(i64::from(u.must_change_password))
    .bind(u.role.as_str())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn insert_token(
    tx: &mut Tx,
    id: &str,
    user_id: &str,
    name: &str,
    prefix: &str,
    secret_hash: &str,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, name, prefix, secret_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(user_id)
    .bind(name)
    .bind(prefix)
    .bind(secret_hash)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub struct TokenRow {
    pub token_id: String,
    pub secret_hash: String,
    pub revoked: bool,
    pub disabled: bool,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub principal: Principal,
}

pub async fn token_by_prefix(
    pool: &AnyPool,
    prefix: &str,
) -> Result<Option<TokenRow>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT t.id, t.secret_hash, t.revoked_at, t.expires_at, t.last_used_at, \
         u.id AS user_id, u.username, u.display_name, u.role, u.disabled_at \
         FROM api_tokens t JOIN users u ON u.id = t.user_id WHERE t.prefix = $1",
    )
    .bind(prefix)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let role: String = row.try_get("role")?;
    Ok(Some(TokenRow {
        token_id: row.try_get("id")?,
        secret_hash: row.try_get("secret_hash")?,
        revoked: row.try_get::<Option<i64>, _>("revoked_at")?.is_some(),
        disabled: row.try_get::<Option<i64>, _>("disabled_at")?.is_some(),
        expires_at: row.try_get("expires_at")?,
        last_used_at: row.try_get("last_used_at")?,
        principal: Principal {
            user_id: row.try_get("user_id")?,
            username: row.try_get("username")?,
            display_name: row.try_get("display_name")?,
            // An unknown role in the database grants the least.
            role: Role::parse(&role).unwrap_or(Role::Viewer),
        },
    }))
}

pub async fn touch_token(tx: &mut Tx, id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn count_users(pool: &AnyPool) -> Result<i64, sqlx::Error> {
    sqlx::query("SELECT COUNT(*) FROM users")
        .fetch_one(pool)
        .await?
        .try_get::<i64, _>(0)
}
