//! Accounts, roles and API tokens.
//!
//! Passwords are argon2id hashes. API tokens are `ark_<prefix>_<secret>`: the
//! prefix finds the row, the secret is stored only as its SHA-256 and compared
//! in constant time.

pub mod access;
pub mod commands;
pub mod http;
pub mod pages;
pub mod refusals;
pub mod sessions;
pub mod store;
pub mod throttle;

use std::fmt;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::context::Context;
use crate::db::{new_id, to_micros};
use crate::federation::identity::{base32, hex};
use crate::timeline::{self, Actor, Target};

/// What a user may do, in increasing power. A role is granted on a system
/// and holds on everything it includes; a user's instance-wide role holds on
/// every system, and the instance-wide `admin` is the instance admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read systems, status and timelines.
    Viewer,
    /// Also record events (notes, deploy markers) and, later, run actions.
    Operator,
    /// Also change systems, their structure and categories.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
    }

    /// Parses an instance-wide role, where `none` means grants only.
    pub fn parse_instance(s: &str) -> Result<Option<Role>, String> {
        match s {
            "none" => Ok(None),
            other => Role::parse(other).map(Some).ok_or_else(|| {
                format!("unknown role '{other}', expected none, viewer, operator or admin")
            }),
        }
    }

    pub fn instance_str(role: Option<Role>) -> &'static str {
        role.map(Role::as_str).unwrap_or("none")
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("username '{0}' is already taken")]
    Taken(String),
    #[error("username must be 1 to 64 characters of lowercase letters, digits, '.', '_' or '-'")]
    BadUsername,
    #[error("{0}")]
    BadRole(String),
    #[error("this instance has no system to record its audit trail on")]
    NoInstanceSystem,
    #[error("no user '{0}'")]
    NoUser(String),
    #[error("no system '{0}'")]
    NoSystem(String),
    #[error("'{user}' has no grant on '{system}'")]
    NoGrant { user: String, system: String },
    #[error("cannot hash the password: {0}")]
    Hash(String),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: String,
    pub username: String,
    pub display_name: String,
    /// The instance-wide role; `None` means per-system grants only.
    pub role: Option<Role>,
}

impl Principal {
    pub fn actor(&self) -> Actor {
        Actor::user(&self.user_id, &self.display_name)
    }

    /// Holds `needed` on every system (and so on the instance)?
    pub fn may_everywhere(&self, needed: Role) -> bool {
        self.role.is_some_and(|r| r >= needed)
    }
}

/// A plaintext secret shown once; never printed by `Debug`.
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], UserError> {
    let mut buf = [0u8; N];
    getrandom::getrandom(&mut buf).map_err(|e| UserError::Random(e.to_string()))?;
    Ok(buf)
}

pub fn hash_password(password: &str) -> Result<String, UserError> {
    let salt_bytes: [u8; 16] = random_bytes()?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| UserError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A readable random password for first logins (about 100 bits).
pub fn generate_password() -> Result<Secret, UserError> {
    let bytes: [u8; 12] = random_bytes()?;
    let s = base32(&bytes).to_ascii_lowercase();
    let groups: Vec<&str> = (0..s.len())
        .step_by(5)
        .filter_map(|i| s.get(i..(i + 5).min(s.len())))
        .collect();
    Ok(Secret(groups.join("-")))
}

fn check_username(name: &str) -> Result<(), UserError> {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(ok) {
        return Err(UserError::BadUsername);
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub display_name: String,
    /// The instance-wide role; `None` means per-system grants only.
    pub role: Option<Role>,
    pub must_change_password: bool,
}

/// Creates a user with a password hash.
pub async fn create_user(
    ctx: &Context,
    actor: &Actor,
    username: &str,
    display_name: &str,
    role: Option<Role>,
    password: &str,
    must_change_password: bool,
) -> Result<User, UserError> {
    check_username(username)?;
    let user = User {
        id: new_id().to_string(),
        username: username.to_owned(),
        display_name: display_name.to_owned(),
        role,
        must_change_password,
    };
    let hash = hash_password(password)?;
    let one_time = must_change_password.then(|| one_time_until(ctx));
    let mut tx = ctx.db.begin().await?;
    match store::insert_user(&mut tx, &user, &hash, to_micros(ctx.now()), one_time).await {
        Err(e) if crate::db::is_unique_violation(&e) => {
            return Err(UserError::Taken(username.into()))
        }
        other => other?,
    }
    let title = format!(
        "Created user {} ({})",
        user.username,
        Role::instance_str(role)
    );
    let data = serde_json::json!({"user": user.username, "user_id": user.id, "after": {"role": Role::instance_str(role)}});
    audit(ctx, &mut tx, actor, "user.created", title, data).await?;
    ctx.commit(tx).await?;
    Ok(user)
}

/// When a one-time password set now stops working (microseconds).
pub fn one_time_until(ctx: &Context) -> i64 {
    let hours = i64::from(ctx.config.auth.one_time_password_hours);
    to_micros(ctx.now()).saturating_add(hours * 3_600_000_000)
}

/// Records an instance-level change (accounts, tokens, sessions) on the
/// timeline of the system that stands for this instance, in the caller's
/// transaction.
pub async fn audit(
    ctx: &Context,
    tx: &mut crate::db::Tx,
    actor: &Actor,
    kind: &str,
    title: String,
    data: serde_json::Value,
) -> Result<(), UserError> {
    let row =
        sqlx::query("SELECT s.id, s.slug FROM instance i JOIN systems s ON s.id = i.system_id")
            .fetch_optional(&mut **tx)
            .await?
            .ok_or(UserError::NoInstanceSystem)?;
    let (id, slug): (String, String) = (row.try_get("id")?, row.try_get("slug")?);
    timeline::record(
        ctx,
        tx,
        actor,
        Target {
            id: &id,
            slug: &slug,
        },
        kind,
        title,
        data,
    )
    .await?;
    Ok(())
}

/// Issues an API token for `user`; the plaintext is returned once.
pub async fn create_token(
    ctx: &Context,
    actor: &Actor,
    user_id: &str,
    name: &str,
) -> Result<Secret, UserError> {
    Ok(create_token_expiring(ctx, actor, user_id, name, None)
        .await?
        .1)
}

/// Issues an API token that expires at `expires_at` (microseconds), if given;
/// returns its id and the plaintext, once.
pub async fn create_token_expiring(
    ctx: &Context,
    actor: &Actor,
    user_id: &str,
    name: &str,
    expires_at: Option<i64>,
) -> Result<(String, Secret), UserError> {
    let prefix = base32(&random_bytes::<5>()?).to_ascii_lowercase();
    let secret = base32(&random_bytes::<32>()?).to_ascii_lowercase();
    let id = new_id().to_string();
    let mut tx = ctx.db.begin().await?;
    store::insert_token(
        &mut tx,
        &id,
        user_id,
        name,
        &prefix,
        &hash_secret(&secret),
        to_micros(ctx.now()),
        expires_at,
    )
    .await?;
    let owner = store::username_of(&mut tx, user_id).await?;
    let title = format!("Issued API token '{name}' (ark_{prefix}_…) to {owner}");
    let data = serde_json::json!({"user": owner, "token_id": id, "name": name, "prefix": prefix, "expires_at": expires_at});
    audit(ctx, &mut tx, actor, "token.created", title, data).await?;
    ctx.commit(tx).await?;
    Ok((id, Secret(format!("ark_{prefix}_{secret}"))))
}

pub(crate) fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Who holds this bearer token, if it is valid, unexpired and not revoked.
pub async fn authenticate(ctx: &Context, token: &str) -> Result<Option<Principal>, sqlx::Error> {
    let Some((prefix, secret)) = token.strip_prefix("ark_").and_then(|t| t.split_once('_')) else {
        return Ok(None);
    };
    if prefix.len() != 8 || secret.is_empty() || secret.len() > 128 {
        return Ok(None);
    }
    let Some(row) = store::token_by_prefix(ctx.db.reader(), prefix).await? else {
        return Ok(None);
    };
    let given = hash_secret(secret);
    if !bool::from(given.as_bytes().ct_eq(row.secret_hash.as_bytes())) {
        return Ok(None);
    }
    let now = to_micros(ctx.now());
    if row.revoked || row.disabled || row.expires_at.is_some_and(|t| t <= now) {
        return Ok(None);
    }
    // Note use at most once a minute: a write per request would serialise reads.
    if row.last_used_at.is_none_or(|t| now - t > 60_000_000) {
        let mut tx = ctx.db.begin().await?;
        store::touch_token(&mut tx, &row.token_id, now).await?;
        tx.commit().await?;
    }
    Ok(Some(row.principal))
}

/// Grants `role` on a system (and so on everything it includes) to a user,
/// replacing an earlier grant there; recorded on the system's timeline.
pub async fn grant(
    ctx: &Context,
    actor: &Actor,
    username: &str,
    slug: &str,
    role: Role,
) -> Result<(), UserError> {
    let mut tx = ctx.db.begin().await?;
    let user = store::by_username(&mut tx, username)
        .await?
        .ok_or_else(|| UserError::NoUser(username.into()))?;
    let (id, slug) = system_target(&mut tx, slug).await?;
    let before = store::set_grant(
        &mut tx,
        &user.id,
        &id,
        role,
        &actor.name,
        to_micros(ctx.now()),
    )
    .await?;
    let title = format!("Granted {role} to {}", user.username);
    let data = serde_json::json!({
        "user": user.username, "user_id": user.id,
        "before": { "role": before.map(Role::as_str) }, "after": { "role": role.as_str() },
    });
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &id,
            slug: &slug,
        },
        "user.granted",
        title,
        data,
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(())
}

/// Takes a user's grant on a system away; recorded on its timeline.
pub async fn revoke(
    ctx: &Context,
    actor: &Actor,
    username: &str,
    slug: &str,
) -> Result<(), UserError> {
    let mut tx = ctx.db.begin().await?;
    let user = store::by_username(&mut tx, username)
        .await?
        .ok_or_else(|| UserError::NoUser(username.into()))?;
    let (id, slug) = system_target(&mut tx, slug).await?;
    let Some(before) = store::remove_grant(&mut tx, &user.id, &id).await? else {
        return Err(UserError::NoGrant {
            user: user.username,
            system: slug,
        });
    };
    let title = format!("Revoked {before} from {}", user.username);
    let data = serde_json::json!({
        "user": user.username, "user_id": user.id,
        "before": { "role": before.as_str() }, "after": { "role": null },
    });
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &id,
            slug: &slug,
        },
        "user.revoked",
        title,
        data,
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(())
}

async fn system_target(tx: &mut crate::db::Tx, slug: &str) -> Result<(String, String), UserError> {
    crate::systems::store::ids_by_slugs(tx, &[slug.to_owned()])
        .await?
        .remove(slug)
        .map(|id| (id, slug.to_owned()))
        .ok_or_else(|| UserError::NoSystem(slug.into()))
}

pub async fn count_users(ctx: &Context) -> Result<i64, sqlx::Error> {
    store::count_users(ctx.db.reader()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let pw = generate_password().unwrap();
        assert!(pw.expose().len() >= 20);
        let hash = hash_password(pw.expose()).unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(pw.expose(), &hash));
        assert!(!verify_password("wrong", &hash));
        assert!(!verify_password("x", "not a hash"));
        assert_eq!(format!("{pw:?}"), "Secret(…)");
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }
}
