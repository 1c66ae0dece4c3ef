//! Browser sessions: a random secret in an HttpOnly cookie, only its hash in
//! the database, an idle and an absolute expiry, a CSRF token per session,
//! and logout here or everywhere.

use jiff::SignedDuration;
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;

use super::{base32, hash_password, random_bytes, verify_password, Principal, Role, UserError};
use crate::context::Context;
use crate::db::{new_id, to_micros};
use crate::federation::identity::hex;

pub const COOKIE: &str = "aramaki_session";

/// A valid session and who it belongs to.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub principal: Principal,
    pub csrf: String,
    pub must_change_password: bool,
}

impl Session {
    /// Does a submitted CSRF token match this session's (in constant time)?
    pub fn csrf_ok(&self, given: &str) -> bool {
        bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

fn hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// A hash to verify against when the user does not exist, so that a wrong
/// username costs as long as a wrong password. Computed once: hashing it on
/// every attempt would make unknown usernames slower, which tells them apart.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy password for timing").unwrap_or_default())
}

/// What a login attempt came to.
#[derive(Debug)]
pub enum Login {
    /// A session is open; the cookie value, shown once.
    Opened(String, Session),
    /// Wrong username or password (the same for both).
    Refused,
    /// The right one-time password, but it has expired.
    Expired,
    /// Too many failures: try again after this wait.
    Throttled(super::throttle::Wait),
}

/// Checks the password and opens a session; returns the cookie value once.
/// Throttled per account and per source address (see `throttle`).
pub async fn login(
    ctx: &Context,
    username: &str,
    password: &str,
    addr: Option<std::net::IpAddr>,
) -> Result<Login, UserError> {
    // Every attempt touches the decoy first, so that the one-time cost of
    // making it does not fall on the first unknown username only.
    let decoy = decoy_hash();
    let keys = super::throttle::Keys::new(username, addr);
    if let Err(wait) = super::throttle::charge(ctx, &keys).await? {
        return Ok(Login::Throttled(wait));
    }
    let row = sqlx::query(
        "SELECT id, username, display_name, role, password_hash, must_change_password, password_expires_at, created_at, disabled_at FROM users WHERE username = $1",
    )
    .bind(username)
    .fetch_optional(ctx.db.reader())
    .await?;
    let Some(row) = row else {
        let _ = verify_password(password, decoy);
        super::throttle::failed(ctx, &keys).await?;
        return Ok(Login::Refused);
    };
    let stored: String = row.try_get("password_hash")?;
    if !verify_password(password, &stored)
        || row.try_get::<Option<i64>, _>("disabled_at")?.is_some()
    {
        super::throttle::failed(ctx, &keys).await?;
        return Ok(Login::Refused);
    }
    super::throttle::succeeded(ctx, &keys).await?;
    let must_change_password = row.try_get::<i64, _>("must_change_password")? != 0;
    let expires: Option<i64> = row.try_get("password_expires_at")?;
    let created: i64 = row.try_get("created_at")?;
    if one_time_expired(ctx, must_change_password, expires, created) {
        return Ok(Login::Expired);
    }
    let role: String = row.try_get("role")?;
    let principal = Principal {
        user_id: row.try_get("id")?,
        username: row.try_get("username")?,
        display_name: row.try_get("display_name")?,
        role: Role::parse(&role),
    };
    let secret = base32(&random_bytes::<32>()?).to_ascii_lowercase();
    let csrf = base32(&random_bytes::<32>()?).to_ascii_lowercase();
    let now = ctx.now();
    let max = SignedDuration::from_hours(i64::from(ctx.config.web.session_max_hours));
    let expires = now.checked_add(max).unwrap_or(now);
    let id = new_id().to_string();
    let mut tx = ctx.db.begin().await?;
    sqlx::query(
        "INSERT INTO sessions (id, secret_hash, user_id, csrf, created_at, last_seen_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $5, $6)",
    )
    .bind(id.as_str())
    .bind(hash(&secret))
    .bind(principal.user_id.as_str())
    .bind(csrf.as_str())
    .bind(to_micros(now))
    .bind(to_micros(expires))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Login::Opened(
        secret,
        Session {
            id,
            principal,
            csrf,
            must_change_password,
        },
    ))
}

/// Whether a one-time password no longer opens anything. One set before
/// expiry times were recorded (`password_expires_at` NULL) counts from the
/// account's creation: never-expiring is not a state a one-time password
/// can be in.
fn one_time_expired(ctx: &Context, must_change: bool, until: Option<i64>, created: i64) -> bool {
    let hours = i64::from(ctx.config.auth.one_time_password_hours);
    let until = until.unwrap_or_else(|| created.saturating_add(hours * 3_600_000_000));
    must_change && until <= to_micros(ctx.now())
}

/// The session a cookie value belongs to, if it is still valid.
pub async fn resume(ctx: &Context, secret: &str) -> Result<Option<Session>, sqlx::Error> {
    if secret.is_empty() || secret.len() > 128 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT s.id, s.csrf, s.last_seen_at, s.expires_at, s.ended_at, u.id AS user_id, u.username, \
         u.display_name, u.role, u.must_change_password, u.password_expires_at, u.created_at AS user_created_at, u.disabled_at \
         FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.secret_hash = $1",
    )
    .bind(hash(secret))
    .fetch_optional(ctx.db.reader())
    .await?;
    let Some(row) = row else { return Ok(None) };
    let now = to_micros(ctx.now());
    let idle = i64::from(ctx.config.web.session_idle_minutes) * 60_000_000;
    let last_seen: i64 = row.try_get("last_seen_at")?;
    let ended = row.try_get::<Option<i64>, _>("ended_at")?.is_some();
    let disabled = row.try_get::<Option<i64>, _>("disabled_at")?.is_some();
    if ended || disabled || row.try_get::<i64, _>("expires_at")? <= now || last_seen + idle <= now {
        return Ok(None);
    }
    // A session opened with a one-time password ends when the password expires.
    let must_change = row.try_get::<i64, _>("must_change_password")? != 0;
    let one_time_until: Option<i64> = row.try_get("password_expires_at")?;
    let created: i64 = row.try_get("user_created_at")?;
    if one_time_expired(ctx, must_change, one_time_until, created) {
        return Ok(None);
    }
    let id: String = row.try_get("id")?;
    if now - last_seen > 60_000_000 {
        let mut tx = ctx.db.begin().await?;
        sqlx::query("UPDATE sessions SET last_seen_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let role: String = row.try_get("role")?;
    Ok(Some(Session {
        id,
        principal: Principal {
            user_id: row.try_get("user_id")?,
            username: row.try_get("username")?,
            display_name: row.try_get("display_name")?,
            role: Role::parse(&role),
        },
        csrf: row.try_get("csrf")?,
        must_change_password: must_change,
    }))
}

/// Ends one session.
pub async fn logout(ctx: &Context, session_id: &str) -> Result<(), sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    sqlx::query("UPDATE sessions SET ended_at = $1 WHERE id = $2 AND ended_at IS NULL")
        .bind(to_micros(ctx.now()))
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Ends every session of a user, on every device.
pub async fn logout_everywhere(ctx: &Context, user_id: &str) -> Result<u64, sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    let done =
        sqlx::query("UPDATE sessions SET ended_at = $1 WHERE user_id = $2 AND ended_at IS NULL")
            .bind(to_micros(ctx.now()))
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
    let who = super::store::username_of(&mut tx, user_id).await?;
    let actor = crate::timeline::Actor::user(user_id, &who);
    let data = serde_json::json!({"user": who, "sessions": done.rows_affected()});
    super::audit(
        ctx,
        &mut tx,
        &actor,
        "user.logged_out_everywhere",
        format!("{who} logged out everywhere"),
        data,
    )
    .await
    .map_err(|e| match e {
        UserError::Db(db) => db,
        other => sqlx::Error::Protocol(other.to_string()),
    })?;
    ctx.commit(tx).await?;
    Ok(done.rows_affected())
}

/// Why a new password was refused.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("the current password is wrong")]
    WrongCurrent,
    #[error("the new password needs at least 12 characters")]
    TooShort,
    #[error("the new password must differ from the current one")]
    Unchanged,
    #[error("too many wrong passwords; try again in {0} s")]
    Throttled(u64),
    #[error(transparent)]
    User(#[from] UserError),
}

/// Changes a user's password after checking the current one; ends the
/// user's other sessions.
pub async fn change_password(
    ctx: &Context,
    session: &Session,
    current: &str,
    new: &str,
) -> Result<(), PasswordError> {
    let stored: String = sqlx::query("SELECT password_hash FROM users WHERE id = $1")
        .bind(session.principal.user_id.as_str())
        .fetch_one(ctx.db.reader())
        .await
        .map_err(UserError::from)?
        .try_get("password_hash")
        .map_err(UserError::from)?;
    // Guessing the current password here is throttled like logging in.
    let keys = super::throttle::Keys::new(&session.principal.username, None);
    if let Err(wait) = super::throttle::charge(ctx, &keys)
        .await
        .map_err(UserError::from)?
    {
        return Err(PasswordError::Throttled(wait.retry_after));
    }
    if !verify_password(current, &stored) {
        super::throttle::failed(ctx, &keys).await?;
        return Err(PasswordError::WrongCurrent);
    }
    super::throttle::succeeded(ctx, &keys)
        .await
        .map_err(UserError::from)?;
    if new.chars().count() < 12 {
        return Err(PasswordError::TooShort);
    }
    if new == current {
        return Err(PasswordError::Unchanged);
    }
    let hashed = hash_password(new)?;
    let mut tx = ctx.db.begin().await.map_err(UserError::from)?;
    super::store::set_password(&mut tx, &session.principal.username, &hashed, None)
        .await
        .map_err(UserError::from)?;
    sqlx::query(
        "UPDATE sessions SET ended_at = $1 WHERE user_id = $2 AND id <> $3 AND ended_at IS NULL",
    )
    .bind(to_micros(ctx.now()))
    .bind(session.principal.user_id.as_str())
    .bind(session.id.as_str())
    .execute(&mut *tx)
    .await
    .map_err(UserError::from)?;
    let who = &session.principal.username;
    let data = serde_json::json!({"user": who});
    super::audit(
        ctx,
        &mut tx,
        &session.principal.actor(),
        "user.password_changed",
        format!("{who} changed their password"),
        data,
    )
    .await?;
    ctx.commit(tx).await.map_err(UserError::from)?;
    Ok(())
}
