//! Agents: enrollment tokens, the agent registry and the agent WebSocket.
//!
//! An agent proves who it is with the Ed25519 key it generated at
//! enrollment; the server proves who it is with the instance key the agent
//! pinned then. Tokens are only for that first contact.

pub mod commands;
pub mod http;
pub mod hub;
pub mod nul;
pub mod pages;
pub mod socket;
pub mod store;

use aramaki_protocol::agent::{EnrollToken, Refusal};
use aramaki_protocol::keys::{base32, compact_fingerprint, unhex_array};
use ed25519_dalek::VerifyingKey;
use jiff::SignedDuration;
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::context::Context;
use crate::db::{new_id, to_micros};
use crate::timeline::{self, Actor, Target};
use crate::users::{hash_secret, random_bytes};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no agent '{0}'")]
    NotFound(String),
    #[error("no system '{0}'")]
    UnknownSystem(String),
    #[error("'{0}' is a remote system: its agents enroll with its primary instance")]
    Remote(String),
    #[error("no enrollment token '{0}'")]
    UnknownToken(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{}: {message}", reason.describe())]
    Refused { reason: Refusal, message: String },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("no randomness available: {0}")]
    Random(String),
}

impl AgentError {
    fn refused(reason: Refusal, message: impl Into<String>) -> AgentError {
        AgentError::Refused {
            reason,
            message: message.into(),
        }
    }
}

/// An agent as the registry knows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Agent {
    pub id: String,
    pub name: String,
    /// The system the agent is bound to.
    pub system: String,
    #[serde(skip)]
    pub system_id: String,
    pub version: String,
    /// The agent's key fingerprint (`ABCD-EFGH-…`).
    pub fingerprint: String,
    #[serde(skip)]
    pub public_key: String,
    pub subscriptions: Vec<String>,
    #[schema(value_type = String, format = DateTime)]
    pub enrolled_at: jiff::Timestamp,
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_seen: Option<jiff::Timestamp>,
    /// Whether a session is open right now (on this server process).
    pub connected: bool,
    /// Highest result sequence committed.
    pub acked_seq: i64,
    /// Results waiting in the agent's disk queue at its last report.
    pub queue_depth: i64,
    /// Results the agent dropped because its queue was full.
    pub dropped: i64,
    /// ok, warning or critical: the keepalive verdict.
    pub keepalive: String,
    pub revoked: bool,
    /// An admin allowed this agent to enroll again with a new key.
    pub reenroll: bool,
}

/// An enrollment token as listed (never its secret).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = EnrollmentTokenInfo)]
pub struct TokenInfo {
    /// The visible prefix.
    pub id: String,
    pub system: String,
    pub reusable: bool,
    pub uses: i64,
    pub created_by: String,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: jiff::Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: jiff::Timestamp,
    pub revoked: bool,
}

/// A token just issued: the only time its secret is visible.
#[derive(Debug, Serialize, ToSchema)]
pub struct IssuedToken {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// Give this to `aramaki-agent enroll --token`; shown once.
    pub token: String,
}

/// Longest lifetime of an enrollment token.
pub const MAX_TOKEN_TTL: SignedDuration = SignedDuration::from_hours(24 * 30);

/// Parses `90s`, `15m`, `1h`, `7d` (or a plain number of seconds).
pub fn parse_ttl(s: &str) -> Result<SignedDuration, AgentError> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .map_err(|_| AgentError::Invalid(format!("ttl '{s}' must look like 90s, 15m, 1h or 7d")))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => {
            return Err(AgentError::Invalid(format!(
                "ttl '{s}' must look like 90s, 15m, 1h or 7d"
            )))
        }
    };
    let ttl = SignedDuration::from_secs(secs);
    if secs < 60 || ttl > MAX_TOKEN_TTL {
        return Err(AgentError::Invalid(format!(
            "ttl '{s}' must be between 1 minute and 30 days"
        )));
    }
    Ok(ttl)
}

fn random<const N: usize>() -> Result<[u8; N], AgentError> {
    random_bytes::<N>().map_err(|e| AgentError::Random(e.to_string()))
}

/// Issues an enrollment token for agents of `system`.
pub async fn issue_token(
    ctx: &Context,
    actor: &Actor,
    system: &str,
    ttl: SignedDuration,
    reusable: bool,
) -> Result<IssuedToken, AgentError> {
    let id = base32(&random::<5>()?).to_ascii_lowercase();
    let secret = base32(&random::<32>()?).to_ascii_lowercase();
    let now = ctx.now();
    let expires = now.checked_add(ttl).unwrap_or(now);
    let mut tx = ctx.db.begin_recording().await?;
    let (system_id, slug) =
        match store::owned_system(&mut tx, system, &ctx.identity.instance_id).await? {
            store::Owned::Here(id, slug) => (id, slug),
            store::Owned::Remote => return Err(AgentError::Remote(system.to_owned())),
            store::Owned::Absent => return Err(AgentError::UnknownSystem(system.to_owned())),
        };
    store::insert_token(
        &mut tx,
        &store::NewToken {
            id: &id,
            secret_hash: &hash_secret(&secret),
            system_id: &system_id,
            reusable,
            created_by: &actor.name,
            created_at: to_micros(now),
            expires_at: to_micros(expires),
        },
    )
    .await?;
    let kind = if reusable { "reusable" } else { "single-use" };
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &system_id,
            slug: &slug,
        },
        "agent.token_issued",
        format!("Issued a {kind} agent enrollment token (aek_{id}_…), valid until {expires}"),
        serde_json::json!({"token": id, "reusable": reusable, "expires_at": expires.to_string()}),
    )
    .await?;
    ctx.commit(tx).await?;
    let token = EnrollToken {
        id: id.clone(),
        secret,
        fingerprint: compact_fingerprint(ctx.identity.public_key().as_bytes()),
    };
    Ok(IssuedToken {
        info: TokenInfo {
            id,
            system: slug,
            reusable,
            uses: 0,
            created_by: actor.name.clone(),
            created_at: now,
            expires_at: expires,
            revoked: false,
        },
        token: token.to_string(),
    })
}

/// What a successful enrollment gives the agent.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub agent_id: String,
    pub system: String,
}

/// Trades a valid token for a registration of `public_key` under `name`.
///
/// Enrolling again with the same name and key is harmless (the same agent
/// is returned). A different key for a known name is refused until an admin
/// allows re-enrollment; the token is not used up by a refusal.
pub async fn enroll(
    ctx: &Context,
    token: &str,
    public_key: &str,
    name: &str,
    version: &str,
) -> Result<Enrolled, AgentError> {
    let token = EnrollToken::parse(token).ok_or_else(|| {
        AgentError::refused(Refusal::TokenInvalid, "this is not an enrollment token")
    })?;
    enroll_with(
        ctx,
        TokenProof::Secret {
            id: &token.id,
            secret: &token.secret,
        },
        public_key,
        name,
        version,
    )
    .await
}

/// How an enrolling party shows it holds a token.
pub enum TokenProof<'a> {
    /// The secret itself (an admin's in-process enrollment).
    Secret { id: &'a str, secret: &'a str },
    /// An agent over the socket: the token id and a MAC keyed by the stored
    /// hash of the secret over this enrollment's facts (the secret never
    /// crosses the wire).
    Mac {
        id: &'a str,
        mac: &'a str,
        facts: &'a aramaki_protocol::agent::Enrollment<'a>,
    },
}

impl TokenProof<'_> {
    fn id(&self) -> &str {
        match self {
            TokenProof::Secret { id, .. } | TokenProof::Mac { id, .. } => id,
        }
    }

    /// Compared in constant time.
    fn holds(&self, secret_hash: &str) -> bool {
        let (given, expected) = match self {
            TokenProof::Secret { secret, .. } => (hash_secret(secret), secret_hash.to_owned()),
            TokenProof::Mac { mac, facts, .. } => (
                (*mac).to_owned(),
                aramaki_protocol::agent::enroll_mac(secret_hash, facts),
            ),
        };
        bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
    }
}

/// [`enroll`] with a proof of the token.
pub async fn enroll_with(
    ctx: &Context,
    token: TokenProof<'_>,
    public_key: &str,
    name: &str,
    version: &str,
) -> Result<Enrolled, AgentError> {
    parse_key(public_key)?;
    validate_agent_name(name)?;
    let now = to_micros(ctx.now());
    let mut tx = ctx.db.begin_recording().await?;
    let row = store::token(&mut tx, token.id())
        .await?
        .ok_or_else(|| AgentError::refused(Refusal::TokenInvalid, "no such enrollment token"))?;
    if !token.holds(&row.secret_hash) {
        return Err(AgentError::refused(
            Refusal::TokenInvalid,
            "no such enrollment token",
        ));
    }
    if row.revoked {
        return Err(AgentError::refused(
            Refusal::TokenInvalid,
            "the enrollment token was revoked",
        ));
    }
    if row.expires_at <= now {
        return Err(AgentError::refused(
            Refusal::TokenExpired,
            "the enrollment token has expired; ask an admin for a new one",
        ));
    }
    if !row.reusable && row.uses > 0 {
        return Err(AgentError::refused(
            Refusal::TokenUsed,
            "this single-use enrollment token was used already",
        ));
    }
    let agent_id = match store::agent_by_name(&mut tx, name).await? {
        Some(existing) if existing.public_key == public_key && !existing.revoked => existing.id,
        Some(existing) if existing.reenroll => {
            store::rekey(&mut tx, &existing.id, public_key, &row.system_id, &row.id).await?;
            existing.id
        }
        Some(_) => {
            return Err(AgentError::refused(
                Refusal::KeyChanged,
                format!("agent '{name}' is enrolled with another key; an admin must allow re-enrollment first (aramaki agent reenroll {name})"),
            ))
        }
        None => {
            let id = new_id().to_string();
            store::insert_agent(&mut tx, &id, name, &row.system_id, public_key, version, &row.id, now)
                .await?;
            id
        }
    };
    store::use_token(&mut tx, &row.id, now).await?;
    let actor = Actor::agent(&agent_id, name);
    timeline::record(
        ctx,
        &mut tx,
        &actor,
        Target {
            id: &row.system_id,
            slug: &row.system_slug,
        },
        "agent.enrolled",
        format!("Agent '{name}' enrolled"),
        serde_json::json!({
            "agent": name,
            "agent_id": agent_id,
            "fingerprint": aramaki_protocol::keys::fingerprint(&parse_key(public_key)?.to_bytes()),
            "token": row.id,
        }),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(Enrolled {
        agent_id,
        system: row.system_slug,
    })
}

/// An Ed25519 public key from 64 hex digits.
pub fn parse_key(hex: &str) -> Result<VerifyingKey, AgentError> {
    unhex_array::<32>(hex)
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        .ok_or_else(|| {
            AgentError::refused(
                Refusal::Malformed,
                "public_key must be an Ed25519 public key in 64 hex digits",
            )
        })
}

/// Agent names: 1–64 of letters, digits, `.`, `-`, `_` (host names fit).
pub fn validate_agent_name(name: &str) -> Result<(), AgentError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::refused(
            Refusal::Malformed,
            format!("agent name '{name}' must be 1 to 64 letters, digits, '.', '-' or '_'"),
        ))
    }
}

/// Revokes an agent: its socket closes now and its key is refused from then on.
pub async fn revoke(ctx: &Context, actor: &Actor, id_or_name: &str) -> Result<Agent, AgentError> {
    let mut tx = ctx.db.begin_recording().await?;
    let agent = store::find(&mut tx, id_or_name)
        .await?
        .ok_or_else(|| AgentError::NotFound(id_or_name.to_owned()))?;
    store::set_revoked(&mut tx, &agent.id, to_micros(ctx.now())).await?;
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &agent.system_id,
            slug: &agent.system,
        },
        "agent.revoked",
        format!("Agent '{}' revoked", agent.name),
        serde_json::json!({"agent": agent.name, "agent_id": agent.id, "fingerprint": agent.fingerprint}),
    )
    .await?;
    ctx.commit(tx).await?;
    ctx.agents.close(
        &agent.id,
        Refusal::Revoked,
        "this agent was revoked by an admin",
    );
    Ok(Agent {
        revoked: true,
        connected: false,
        ..agent
    })
}

/// Lets an agent enroll again with a new key (after a host rebuild).
pub async fn allow_reenroll(
    ctx: &Context,
    actor: &Actor,
    id_or_name: &str,
) -> Result<Agent, AgentError> {
    let mut tx = ctx.db.begin_recording().await?;
    let agent = store::find(&mut tx, id_or_name)
        .await?
        .ok_or_else(|| AgentError::NotFound(id_or_name.to_owned()))?;
    store::set_reenroll(&mut tx, &agent.id).await?;
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &agent.system_id,
            slug: &agent.system,
        },
        "agent.reenroll_allowed",
        format!("Agent '{}' may enroll again with a new key", agent.name),
        serde_json::json!({"agent": agent.name, "agent_id": agent.id}),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(Agent {
        reenroll: true,
        ..agent
    })
}

/// Revokes an enrollment token (agents already enrolled stay enrolled).
pub async fn revoke_token(ctx: &Context, actor: &Actor, id: &str) -> Result<(), AgentError> {
    let mut tx = ctx.db.begin_recording().await?;
    let info = store::token_info(&mut tx, id)
        .await?
        .ok_or_else(|| AgentError::UnknownToken(id.to_owned()))?;
    store::revoke_token(&mut tx, id, to_micros(ctx.now())).await?;
    let (system_id, slug) = store::system_by_slug(&mut tx, &info.system)
        .await?
        .ok_or_else(|| AgentError::UnknownSystem(info.system.clone()))?;
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &system_id,
            slug: &slug,
        },
        "agent.token_revoked",
        format!("Revoked agent enrollment token aek_{id}_…"),
        serde_json::json!({"token": id}),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(())
}

/// A `hello` declared `system:` or `agent:` subscriptions that name another
/// system or agent (a host reaching for another tenant's checks): they are
/// ignored, and this records it once per hello as a security event on the
/// agent's own system.
pub async fn subscriptions_ignored(
    ctx: &Context,
    agent: &crate::monitoring::ingest::AgentRef,
    ignored: &[String],
) {
    tracing::warn!(agent = %agent.name, ?ignored, "ignored subscriptions naming another system or agent");
    let event = timeline::NewEvent::internal(
        "agent.subscriptions_ignored",
        aramaki_protocol::Severity::Critical,
        format!(
            "Agent '{}' declared subscriptions naming another system or agent ({}); they were ignored",
            agent.name,
            ignored.join(", ")
        ),
        serde_json::json!({"agent": agent.name, "agent_id": agent.id, "ignored": ignored}),
    );
    let recorded = async {
        let mut tx = ctx.db.begin_recording().await?;
        timeline::append(
            ctx,
            &mut tx,
            &Actor::agent(&agent.id, &agent.name),
            Target {
                id: &agent.system_id,
                slug: &agent.system,
            },
            event,
        )
        .await?;
        ctx.commit(tx).await
    };
    if let Err(e) = recorded.await {
        tracing::error!(agent = %agent.name, error = %e, "cannot record ignored subscriptions");
    }
}

/// A frame of an agent's session failed its integrity check (forged,
/// replayed or reordered between agent and server): a security event on the
/// agent's system and a counter in the metrics. The session is then ended.
pub async fn frame_refused(
    ctx: &Context,
    agent: &crate::monitoring::ingest::AgentRef,
    session: &str,
    detail: &str,
) {
    ctx.metrics.frame_refused();
    tracing::warn!(agent = %agent.name, session, detail, "refused a frame from an agent");
    let event = timeline::NewEvent::internal(
        aramaki_protocol::agent::Notice::FrameRefused.kind(),
        aramaki_protocol::Severity::Critical,
        format!(
            "Refused a frame from agent '{}': {detail}; the session was ended",
            agent.name
        ),
        serde_json::json!({"agent": agent.name, "agent_id": agent.id, "session": session, "side": "server", "detail": detail}),
    );
    let recorded = async {
        let mut tx = ctx.db.begin_recording().await?;
        timeline::append(
            ctx,
            &mut tx,
            &Actor::agent(&agent.id, &agent.name),
            Target {
                id: &agent.system_id,
                slug: &agent.system,
            },
            event,
        )
        .await?;
        ctx.commit(tx).await
    };
    if let Err(e) = recorded.await {
        tracing::error!(agent = %agent.name, error = %e, "cannot record a refused frame");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units_and_bounds() {
        assert_eq!(parse_ttl("1h").unwrap(), SignedDuration::from_hours(1));
        assert_eq!(parse_ttl("90s").unwrap(), SignedDuration::from_secs(90));
        assert_eq!(parse_ttl("7d").unwrap(), SignedDuration::from_hours(168));
        for bad in ["", "h", "1y", "30s", "31d", "-1h", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn agent_names_fit_host_names() {
        assert!(validate_agent_name("web-1.dc1").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_agent_name(bad).is_err(), "{bad}");
        }
    }
}
