//! SQL for users and tokens.

use sqlx::{AnyPool, Row};

use super::{Principal, Role, User};
use crate::db::Tx;

pub async fn insert_user(
    tx: &mut Tx,
    u: &User,
    password_hash: &str,
    now: i64,
    one_time_until: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (id, username, display_name, password_hash, must_change_password, role, created_at, password_expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(u.id.as_str())
    .bind(u.username.as_str())
    .bind(u.display_name.as_str())
    .bind(password_hash)
    .bind(i64::from(u.must_change_password))
    .bind(Role::instance_str(u.role))
    .bind(now)
    .bind(one_time_until)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub async fn insert_token(
    tx: &mut Tx,
    id: &str,
    user_id: &str,
    name: &str,
    prefix: &str,
    secret_hash: &str,
    now: i64,
    expires_at: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO api_tokens (id, user_id, name, prefix, secret_hash, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(user_id)
    .bind(name)
    .bind(prefix)
    .bind(secret_hash)
    .bind(now)
    .bind(expires_at)
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
            // An unknown role in the database grants nothing.
            role: Role::parse(&role),
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

/// A user's grants as (system id, role), live systems only.
pub async fn grants_of(pool: &AnyPool, user_id: &str) -> Result<Vec<(String, Role)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT g.system_id, g.role FROM grants g JOIN systems s ON s.id = g.system_id \
         WHERE g.user_id = $1 AND s.deleted_at IS NULL",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let role: String = row.try_get("role")?;
        if let Some(role) = Role::parse(&role) {
            out.push((row.try_get("system_id")?, role));
        }
    }
    Ok(out)
}

pub async fn by_username(
    conn: &mut sqlx::AnyConnection,
    username: &str,
) -> Result<Option<User>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, username, display_name, role, must_change_password FROM users WHERE username = $1",
    )
    .bind(username)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        let role: String = r.try_get("role")?;
        Ok(User {
            id: r.try_get("id")?,
            username: r.try_get("username")?,
            display_name: r.try_get("display_name")?,
            role: Role::parse(&role),
            must_change_password: r.try_get::<i64, _>("must_change_password")? != 0,
        })
    })
    .transpose()
}

/// Sets a grant; returns the role it replaced, if any.
pub async fn set_grant(
    tx: &mut Tx,
    user_id: &str,
    system_id: &str,
    role: Role,
    granted_by: &str,
    now: i64,
) -> Result<Option<Role>, sqlx::Error> {
    let before = remove_grant(tx, user_id, system_id).await?;
    sqlx::query("INSERT INTO grants (user_id, system_id, role, granted_by, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(user_id)
        .bind(system_id)
        .bind(role.as_str())
        .bind(granted_by)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    Ok(before)
}

/// Removes a grant; returns the role it held, if there was one.
pub async fn remove_grant(
    tx: &mut Tx,
    user_id: &str,
    system_id: &str,
) -> Result<Option<Role>, sqlx::Error> {
    let row = sqlx::query("SELECT role FROM grants WHERE user_id = $1 AND system_id = $2")
        .bind(user_id)
        .bind(system_id)
        .fetch_optional(&mut **tx)
        .await?;
    let before = match row {
        Some(r) => Role::parse(&r.try_get::<String, _>("role")?),
        None => return Ok(None),
    };
    sqlx::query("DELETE FROM grants WHERE user_id = $1 AND system_id = $2")
        .bind(user_id)
        .bind(system_id)
        .execute(&mut **tx)
        .await?;
    Ok(before)
}

/// A user as `aramaki user list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct Overview {
    pub username: String,
    pub display_name: String,
    pub role: String,
    /// `slug:role` for each grant.
    pub grants: Vec<String>,
    /// Tokens that are neither revoked nor expired.
    pub tokens: i64,
}

pub async fn overview(pool: &AnyPool) -> Result<Vec<Overview>, sqlx::Error> {
    let users = sqlx::query(
        "SELECT u.id, u.username, u.display_name, u.role, \
         (SELECT COUNT(*) FROM api_tokens t WHERE t.user_id = u.id AND t.revoked_at IS NULL) AS tokens \
         FROM users u ORDER BY u.username",
    )
    .fetch_all(pool)
    .await?;
    let grants = sqlx::query(
        "SELECT g.user_id, s.slug, g.role FROM grants g JOIN systems s ON s.id = g.system_id \
         WHERE s.deleted_at IS NULL ORDER BY s.slug",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for u in users {
        let id: String = u.try_get("id")?;
        let mut mine = Vec::new();
        for g in &grants {
            if g.try_get::<String, _>("user_id")? == id {
                mine.push(format!(
                    "{}:{}",
                    g.try_get::<String, _>("slug")?,
                    g.try_get::<String, _>("role")?
                ));
            }
        }
        out.push(Overview {
            username: u.try_get("username")?,
            display_name: u.try_get("display_name")?,
            role: u.try_get("role")?,
            grants: mine,
            tokens: u.try_get("tokens")?,
        });
    }
    Ok(out)
}

/// Sets a user's password hash; false if there is no such user. With
/// `one_time_until` (microseconds) it is a one-time password: it must be
/// changed and stops working then.
pub async fn set_password(
    tx: &mut Tx,
    username: &str,
    hash: &str,
    one_time_until: Option<i64>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE users SET password_hash = $1, must_change_password = $2, password_expires_at = $3 WHERE username = $4",
    )
    .bind(hash)
    .bind(i64::from(one_time_until.is_some()))
    .bind(one_time_until)
    .bind(username)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// A token as its owner sees it (no secret, no hash).
pub struct TokenListing {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

pub async fn tokens_of(pool: &AnyPool, user_id: &str) -> Result<Vec<TokenListing>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, name, prefix, created_at, last_used_at, expires_at, revoked_at FROM api_tokens \
         WHERE user_id = $1 ORDER BY created_at DESC, id DESC",
    )
    .bind(user_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TokenListing {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                prefix: r.try_get("prefix")?,
                created_at: r.try_get("created_at")?,
                last_used_at: r.try_get("last_used_at")?,
                expires_at: r.try_get("expires_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .collect()
}

/// Revokes a valid token (of `owner`, if given); false if there was none.
pub async fn revoke_token(
    tx: &mut Tx,
    id: &str,
    owner: Option<&str>,
    now: i64,
) -> Result<bool, sqlx::Error> {
    let done = match owner {
        Some(owner) => {
            sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND user_id = $3 AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .bind(owner)
                .execute(&mut **tx)
                .await?
        }
        None => {
            sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut **tx)
                .await?
        }
    };
    Ok(done.rows_affected() > 0)
}

pub async fn username_of(tx: &mut Tx, user_id: &str) -> Result<String, sqlx::Error> {
    sqlx::query("SELECT username FROM users WHERE id = $1")
        .bind(user_id)
        .fetch_one(&mut **tx)
        .await?
        .try_get("username")
}
