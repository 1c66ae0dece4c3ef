//! The timeline: one append-only stream of everything that happens to every
//! system. It doubles as the outbox: `seq` orders events by commit, and
//! subscribers follow it by cursor after commit (see [`subscribers`]).

pub mod batch;
pub mod http;
pub mod hub;
pub mod store;
pub mod subscribers;

use std::fmt;

use aramaki_protocol::{ActorKind, Severity};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::context::Context;
use crate::db::Tx;
use crate::systems::model::{check_text, Invalid, MAX_MARKDOWN};

/// Who did something.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Actor {
    #[schema(value_type = String, example = "user")]
    pub kind: ActorKind,
    /// Stable id of the actor (user id, agent id, instance id), if any.
    pub id: Option<String>,
    pub name: String,
}

impl Actor {
    pub fn user(id: &str, name: &str) -> Actor {
        Actor {
            kind: ActorKind::User,
            id: Some(id.to_owned()),
            name: name.to_owned(),
        }
    }

    pub fn agent(id: &str, name: &str) -> Actor {
        Actor {
            kind: ActorKind::Agent,
            id: Some(id.to_owned()),
            name: name.to_owned(),
        }
    }

    pub fn instance(id: &str, name: &str) -> Actor {
        Actor {
            kind: ActorKind::Instance,
            id: Some(id.to_owned()),
            name: name.to_owned(),
        }
    }
}

/// One entry on the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: Uuid,
    /// Position in commit order on this instance; the live stream's event id.
    pub sequence: i64,
    /// Slug of the system the event is about.
    pub system: String,
    #[schema(value_type = String, format = DateTime)]
    pub occurred_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub recorded_at: Timestamp,
    /// Namespaced kind: `system.updated`, `note`, `deploy`, `state`, …
    pub kind: String,
    #[schema(value_type = String, example = "info")]
    pub severity: Severity,
    pub title: String,
    /// Markdown.
    pub body: String,
    pub actor: Actor,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// Id of the instance where the event was first recorded.
    pub origin: String,
    pub caused_by: Option<Uuid>,
    #[serde(skip)]
    pub system_id: String,
}

/// A namespaced event kind such as `deploy` or `system.updated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "deploy")]
pub struct Kind(String);

impl Kind {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Kinds that only Aramaki itself records; clients cannot forge them.
    pub fn is_reserved(&self) -> bool {
        const RESERVED: [&str; 9] = [
            "system",
            "user",
            "token",
            "alert",
            "action",
            "check",
            "agent",
            "peer",
            "federation",
        ];
        let ns = self.0.split('.').next().unwrap_or("");
        self.0.contains('.') && RESERVED.contains(&ns)
    }

    /// `state` events set a system's own state until monitoring owns it.
    pub fn is_state(&self) -> bool {
        self.0 == "state" || self.0.ends_with(".state_changed")
    }
}

impl TryFrom<String> for Kind {
    type Error = String;
    fn try_from(s: String) -> Result<Kind, String> {
        let valid_part = |p: &str| {
            let mut chars = p.chars();
            chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        if s.is_empty() || s.len() > 64 || !s.split('.').all(valid_part) {
            return Err(format!(
                "kind '{s}' must be dot-separated lowercase words (letters, digits, '_'), at most 64 characters, such as 'deploy' or 'ci.pipeline'"
            ));
        }
        Ok(Kind(s))
    }
}

impl From<Kind> for String {
    fn from(k: Kind) -> String {
        k.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: Kind,
    pub severity: Severity,
    pub title: String,
    pub body: String,
    pub occurred_at: Option<Timestamp>,
    pub data: serde_json::Value,
    pub caused_by: Option<Uuid>,
    pub idempotency: Option<Idempotency>,
}

impl NewEvent {
    /// An event recorded by Aramaki itself (kind must be valid by construction).
    pub fn internal(
        kind: &str,
        severity: Severity,
        title: String,
        data: serde_json::Value,
    ) -> NewEvent {
        NewEvent {
            kind: Kind(kind.to_owned()),
            severity,
            title,
            body: String::new(),
            occurred_at: None,
            data,
            caused_by: None,
            idempotency: None,
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        check_text("title", &self.title, 1, 500)?;
        check_text("body", &self.body, 0, MAX_MARKDOWN)?;
        if !self.data.is_object() {
            return Err(Invalid::new("data", "must be a JSON object"));
        }
        if self.kind.is_state() && self.severity == Severity::Info {
            return Err(Invalid::new(
                "severity",
                "a state event needs severity ok, warning or critical",
            ));
        }
        Ok(())
    }

    /// Where a state event's state comes from (`data.source`, else `default`).
    pub fn state_source(&self) -> String {
        self.data
            .get("source")
            .or_else(|| self.data.get("check"))
            .and_then(|v| v.as_str())
            .map(|s| s.chars().take(100).collect())
            .unwrap_or_else(|| "default".to_owned())
    }
}

/// A client's idempotency key, scoped to the caller, with a hash of the
/// request so that a reused key with a different request is refused.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub scope: String,
    pub key: String,
    pub request_hash: String,
}

/// The system an event is appended to.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    pub id: &'a str,
    pub slug: &'a str,
}

/// Appends an event inside the caller's transaction, so the change and its
/// record commit together. Call [`Context::commit`] afterwards to wake
/// subscribers.
pub async fn append(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    target: Target<'_>,
    new: NewEvent,
) -> Result<Event, sqlx::Error> {
    ctx.db.lock_timeline(tx).await?;
    let now = ctx.now();
    let event = Event {
        id: crate::db::new_id(),
        sequence: 0,
        system: target.slug.to_owned(),
        occurred_at: new.occurred_at.unwrap_or(now),
        recorded_at: now,
        kind: new.kind.0.clone(),
        severity: new.severity,
        title: new.title.trim().to_owned(),
        body: new.body.clone(),
        actor: actor.clone(),
        data: new.data.clone(),
        origin: ctx.identity.instance_id.clone(),
        caused_by: new.caused_by,
        system_id: target.id.to_owned(),
    };
    let sequence = store::insert(tx, &event, new.idempotency.as_ref()).await?;
    if new.kind.is_state() {
        store::set_state(tx, &event, &new.state_source()).await?;
    }
    ctx.metrics.events_recorded(1);
    Ok(Event { sequence, ..event })
}

/// Appends an informational event that Aramaki records about its own
/// changes (structure, grants, accounts) in the caller's transaction.
pub async fn record(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    target: Target<'_>,
    kind: &str,
    title: String,
    data: serde_json::Value,
) -> Result<Event, sqlx::Error> {
    append(
        ctx,
        tx,
        actor,
        target,
        NewEvent::internal(kind, Severity::Info, title, data),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_namespaced_words() {
        for ok in [
            "deploy",
            "note",
            "system.updated",
            "ci.pipeline_done",
            "check.state_changed",
        ] {
            assert!(Kind::try_from(ok.to_owned()).is_ok(), "{ok}");
        }
        for bad in ["", "Deploy", "a..b", ".a", "a.", "1a", "a b", "a-b"] {
            assert!(Kind::try_from(bad.to_owned()).is_err(), "{bad}");
        }
    }

    #[test]
    fn reserved_and_state_kinds() {
        let k = |s: &str| Kind::try_from(s.to_owned()).unwrap();
        assert!(k("system.updated").is_reserved());
        assert!(!k("system").is_reserved());
        assert!(!k("deploy").is_reserved());
        assert!(k("state").is_state());
        assert!(k("check.state_changed").is_state());
        assert!(!k("note").is_state());
    }

    #[test]
    fn state_events_need_a_verdict() {
        let mut e = NewEvent::internal("state", Severity::Info, "x".into(), serde_json::json!({}));
        assert!(e.validate().is_err());
        e.severity = Severity::Warning;
        assert!(e.validate().is_ok());
        e.data = serde_json::json!([1]);
        assert_eq!(e.validate().unwrap_err().field, "data");
    }
}
