//! Actions: named, allow-listed operations on a system ("flush the cache"),
//! run through the system's agents with rules (who, when, how often) and a
//! record of every run and refusal on the timeline.
//!
//! The server names an action and sends parameter values, signed with the
//! instance key, for one agent, with an expiry and a unique run id; the
//! agent runs only what its local allow-list defines.

pub mod commands;
pub mod http;
pub mod model;
pub mod pages;
pub mod runs;
pub mod store;

use serde::Serialize;
use utoipa::ToSchema;

use self::model::ActionSpec;
use crate::context::Context;
use crate::db::{new_id, to_micros};
use crate::systems::model::Invalid;
use crate::timeline::{self, Actor, Target};

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("no system '{0}'")]
    UnknownSystem(String),
    #[error("'{0}' is a remote system: its actions are defined on its primary instance")]
    Remote(String),
    #[error("no action '{name}' on '{system}'")]
    NotFound { system: String, name: String },
    #[error("action '{0}' exists already on this system")]
    Exists(String),
    #[error("no run '{0}'")]
    UnknownRun(String),
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(Invalid),
    /// The run is refused for a reason the caller can read (and the
    /// refusal is on the timeline).
    #[error("{message}")]
    Refused {
        code: &'static str,
        message: String,
        details: serde_json::Value,
    },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<Invalid> for ActionError {
    fn from(i: Invalid) -> Self {
        ActionError::Invalid(i)
    }
}

/// A stored action.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Action {
    pub id: String,
    pub system: String,
    #[serde(skip)]
    pub system_id: String,
    #[serde(flatten)]
    pub spec: ActionSpec,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: jiff::Timestamp,
}

/// Creates an action on a system, or replaces one of the same name.
pub async fn save(
    ctx: &Context,
    actor: &Actor,
    system: &str,
    spec: ActionSpec,
    replace: bool,
) -> Result<(Action, bool), ActionError> {
    use crate::agents::store::{owned_system, Owned};
    spec.validate()?;
    let mut tx = ctx.db.begin_recording().await?;
    let (system_id, slug) = match owned_system(&mut tx, system, &ctx.identity.instance_id).await? {
        Owned::Here(id, slug) => (id, slug),
        Owned::Remote => return Err(ActionError::Remote(system.to_owned())),
        Owned::Absent => return Err(ActionError::UnknownSystem(system.to_owned())),
    };
    let now = to_micros(ctx.now());
    let existing = store::action(&mut tx, &system_id, &spec.name).await?;
    let created = existing.is_none();
    match existing {
        Some(_) if !replace => return Err(ActionError::Exists(spec.name)),
        Some(old) => store::update(&mut tx, &old.id, &spec, now).await?,
        None => store::insert(&mut tx, &new_id().to_string(), &system_id, &spec, now).await?,
    }
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &system_id,
            slug: &slug,
        },
        if created {
            "action.created"
        } else {
            "action.updated"
        },
        format!(
            "Action '{}' {}",
            spec.name,
            if created { "defined" } else { "changed" }
        ),
        serde_json::json!({"action": spec.name, "spec": spec}),
    )
    .await?;
    ctx.commit(tx).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let action = store::action(&mut conn, &system_id, &spec.name)
        .await?
        .ok_or(ActionError::NotFound {
            system: slug,
            name: spec.name,
        })?;
    Ok((action, created))
}

pub async fn delete(
    ctx: &Context,
    actor: &Actor,
    system: &str,
    name: &str,
) -> Result<(), ActionError> {
    let mut tx = ctx.db.begin_recording().await?;
    let (system_id, slug) = crate::agents::store::system_by_slug(&mut tx, system)
        .await?
        .ok_or_else(|| ActionError::UnknownSystem(system.to_owned()))?;
    if !store::delete(&mut tx, &system_id, name).await? {
        return Err(ActionError::NotFound {
            system: slug,
            name: name.to_owned(),
        });
    }
    timeline::record(
        ctx,
        &mut tx,
        actor,
        Target {
            id: &system_id,
            slug: &slug,
        },
        "action.deleted",
        format!("Action '{name}' removed"),
        serde_json::json!({"action": name}),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(())
}
