//! Login throttling, per account and per source address.
//!
//! Every attempt is charged before its password is checked (a
//! compare-and-swap on the counter row, so attempts that arrive at once are
//! all counted); after `auth.login_free_failures` failures each further
//! attempt must wait, the wait doubling from one second up to
//! `auth.login_max_delay_seconds`, and after `auth.login_lockout_failures`
//! the account is locked for `auth.login_lockout_minutes` or until an admin
//! unlocks it (an address is only delayed: many people may share one, and
//! a lockout nobody can lift would be a denial of service). A refused attempt is
//! answered at once (429 with Retry-After) without checking the password, so
//! the right password is not accepted while throttled and no request is
//! held. Unknown and known usernames go through the same steps. Time is the
//! Context's clock.

use sqlx::Row;

use super::UserError;
use crate::context::Context;
use crate::db::to_micros;
use crate::timeline::Actor;

const SECOND: i64 = 1_000_000;

/// The throttled keys of one attempt.
pub struct Keys {
    user: String,
    addr: Option<String>,
}

impl Keys {
    pub fn new(username: &str, addr: Option<std::net::IpAddr>) -> Keys {
        let name: String = username.chars().take(64).collect();
        Keys {
            user: format!("user:{name}"),
            addr: addr.map(|a| format!("addr:{}", source(a))),
        }
    }

    fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.user.as_str()).chain(self.addr.as_deref())
    }
}

/// The source an address is throttled as: an IPv4 address as itself (also
/// when it arrives IPv4-mapped, `::ffff:a.b.c.d`), an IPv6 address by its
/// /64 — one site or one customer gets a whole /64, so counting single IPv6
/// addresses would give an attacker 2^64 fresh counters.
fn source(addr: std::net::IpAddr) -> String {
    use std::net::IpAddr;
    match addr.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let net = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(net))
        }
    }
}

/// Why an attempt may not be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Whole seconds until the next attempt may be made.
    pub retry_after: u64,
    pub locked: bool,
}

struct Counter {
    failures: i64,
    last_at: i64,
    locked_until: Option<i64>,
}

async fn load(tx: &mut crate::db::Tx, key: &str, now: i64) -> Result<Counter, sqlx::Error> {
    sqlx::query(
        "INSERT INTO login_failures (key, failures, last_at) VALUES ($1, 0, $2) ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let row =
        sqlx::query("SELECT failures, last_at, locked_until FROM login_failures WHERE key = $1")
            .bind(key)
            .fetch_one(&mut **tx)
            .await?;
    Ok(Counter {
        failures: row.try_get("failures")?,
        last_at: row.try_get("last_at")?,
        locked_until: row.try_get("locked_until")?,
    })
}

fn seconds_until(now: i64, at: i64) -> u64 {
    u64::try_from((at - now + SECOND - 1) / SECOND)
        .unwrap_or(1)
        .max(1)
}

/// Charges one attempt on every key, or says how long to wait.
pub async fn charge(ctx: &Context, keys: &Keys) -> Result<Result<(), Wait>, sqlx::Error> {
    let cfg = &ctx.config.auth;
    let now = to_micros(ctx.now());
    let forget = i64::from(cfg.login_lockout_minutes) * 60 * SECOND;
    let mut tx = ctx.db.begin().await?;
    let mut charges = Vec::new();
    for key in keys.all() {
        let row = load(&mut tx, key, now).await?;
        if let Some(until) = row.locked_until.filter(|u| *u > now) {
            return Ok(Err(Wait {
                retry_after: seconds_until(now, until),
                locked: true,
            }));
        }
        // Failures long past are forgotten.
        let failures = if now - row.last_at > forget {
            0
        } else {
            row.failures
        };
        let free = i64::from(if key.starts_with("addr:") {
            cfg.login_address_free_failures
        } else {
            cfg.login_free_failures
        });
        if failures >= free {
            let exponent = u32::try_from((failures - free).min(30)).unwrap_or(30);
            let delay = (1i64 << exponent).min(i64::from(cfg.login_max_delay_seconds)) * SECOND;
            if now < row.last_at + delay {
                return Ok(Err(Wait {
                    retry_after: seconds_until(now, row.last_at + delay),
                    locked: false,
                }));
            }
        }
        charges.push((key.to_owned(), row.failures, row.last_at, failures + 1));
    }
    for (key, seen_failures, seen_last, next) in charges {
        let done = sqlx::query(
            "UPDATE login_failures SET failures = $1, last_at = $2 \
             WHERE key = $3 AND failures = $4 AND last_at = $5",
        )
        .bind(next)
        .bind(now)
        .bind(key.as_str())
        .bind(seen_failures)
        .bind(seen_last)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            // Another attempt on the same key got there first.
            return Ok(Err(Wait {
                retry_after: 1,
                locked: false,
            }));
        }
    }
    tx.commit().await?;
    Ok(Ok(()))
}

/// The password was right: the account starts afresh, and the address gets
/// back the attempt it was charged.
pub async fn succeeded(ctx: &Context, keys: &Keys) -> Result<(), sqlx::Error> {
    let mut tx = ctx.db.begin().await?;
    sqlx::query("DELETE FROM login_failures WHERE key = $1")
        .bind(keys.user.as_str())
        .execute(&mut *tx)
        .await?;
    if let Some(addr) = &keys.addr {
        sqlx::query(
            "UPDATE login_failures SET failures = failures - 1 WHERE key = $1 AND failures > 0",
        )
        .bind(addr.as_str())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// The password was wrong: an account that reached the limit is locked, and
/// each lockout is an event on the instance's audit trail.
pub async fn failed(ctx: &Context, keys: &Keys) -> Result<(), UserError> {
    let cfg = &ctx.config.auth;
    let now = to_micros(ctx.now());
    let until = now + i64::from(cfg.login_lockout_minutes) * 60 * SECOND;
    let mut tx = ctx.db.begin().await?;
    let done = sqlx::query(
        "UPDATE login_failures SET locked_until = $1 \
         WHERE key = $2 AND failures >= $3 AND (locked_until IS NULL OR locked_until <= $4)",
    )
    .bind(until)
    .bind(keys.user.as_str())
    .bind(i64::from(cfg.login_lockout_failures))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() > 0 {
        let name = keys.user.strip_prefix("user:").unwrap_or(&keys.user);
        let data = serde_json::json!({
            "user": name, "locked_until": until, "minutes": cfg.login_lockout_minutes,
            "failures": cfg.login_lockout_failures,
        });
        let title = format!("Logins as {name} locked after repeated failures");
        let actor = Actor::instance(&ctx.identity.instance_id, "login throttle");
        super::audit(ctx, &mut tx, &actor, "user.locked_out", title, data).await?;
    }
    ctx.commit(tx).await?;
    Ok(())
}

/// Lifts the lockout (and forgets the failures) of an account; false if it
/// had none.
pub async fn unlock(ctx: &Context, actor: &Actor, username: &str) -> Result<bool, UserError> {
    let key = Keys::new(username, None).user;
    let mut tx = ctx.db.begin().await?;
    let done = sqlx::query("DELETE FROM login_failures WHERE key = $1")
        .bind(key.as_str())
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let data = serde_json::json!({"user": username});
    super::audit(
        ctx,
        &mut tx,
        actor,
        "user.unlocked",
        format!("Logins as {username} unlocked"),
        data,
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str) -> Option<String> {
        Keys::new("ada", Some(addr.parse().unwrap())).addr
    }

    #[test]
    fn addresses_are_keyed_by_their_source() {
        assert_eq!(key("192.0.2.7").as_deref(), Some("addr:192.0.2.7"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"), "IPv4-mapped");
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        // One /64 is one source, whatever the interface identifier.
        assert_eq!(
            key("2001:db8:1:2::1").as_deref(),
            Some("addr:2001:db8:1:2::/64")
        );
        assert_eq!(
            key("2001:db8:1:2:ffff:ffff:ffff:ffff"),
            key("2001:db8:1:2::1")
        );
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("::1").as_deref(), Some("addr:::/64"));
        assert_eq!(Keys::new("ada", None).addr, None);
    }
}
