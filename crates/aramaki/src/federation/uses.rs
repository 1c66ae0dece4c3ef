//! Using another instance's systems.
//!
//! B asks to use system S of A (`use.request`); A's admin accepts or
//! rejects it, or a standing policy on S for B accepts it at once
//! (`use.accepted` with the exposure, then `system.snapshot`, or
//! `use.rejected`); either side ends it (`use.undo`). Every step is on the
//! timeline of both sides: on S at A, on B's instance system (and the
//! mirror) at B.
//!
//! Once accepted, S is mirrored on B as a read-only system marked with its
//! origin (`instance` = A), with the systems S includes if the use exposes
//! subsystems. A sends activity about exactly those systems, and only to
//! the instances that use them ([`FederationOut`]): timeline events when
//! the use exposes the timeline, state changes only when it exposes status.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa::ToSchema;

use super::link::LinkPeer;
use super::outbox;
use super::peers::FederationError;
use crate::context::Context;
use crate::db::{from_micros, new_id, to_micros, Tx};
use crate::systems::model::{CategoryName, Slug};
use crate::systems::{store as systems_store, System};
use crate::timeline::subscribers::{BoxFuture, HandleError, Subscriber};
use crate::timeline::{store as timeline_store, Actor, Event, Target};

/// What a use relation shows the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The status of S (with its layers), no timeline.
    Status,
    /// Status and every timeline event.
    Timeline,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Status => "status",
            Level::Timeline => "timeline",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "status" => Some(Level::Status),
            "timeline" => Some(Level::Timeline),
            _ => None,
        }
    }
}

/// The exposure of one use relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Exposure {
    pub level: Level,
    /// The systems S includes are shared too.
    #[serde(default = "yes")]
    pub subsystems: bool,
    /// S's handbook is shared.
    #[serde(default)]
    pub handbook: bool,
    /// S's contacts are shared.
    #[serde(default)]
    pub contacts: bool,
}

fn yes() -> bool {
    true
}

impl Exposure {
    /// From a row with `level`, `subsystems`, `handbook` and `contacts`.
    fn of_row(r: &sqlx::any::AnyRow) -> Result<Exposure, sqlx::Error> {
        Ok(Exposure {
            level: Level::parse(&r.try_get::<String, _>("level")?).unwrap_or(Level::Status),
            subsystems: r.try_get::<i64, _>("subsystems")? != 0,
            handbook: r.try_get::<i64, _>("handbook")? != 0,
            contacts: r.try_get::<i64, _>("contacts")? != 0,
        })
    }

    pub fn new(level: Level) -> Exposure {
        Exposure {
            level,
            subsystems: true,
            handbook: false,
            contacts: false,
        }
    }
}

/// A use relation as listed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UseInfo {
    pub id: String,
    pub peer: String,
    pub peer_name: String,
    /// `consumer` (we use the peer's system) or `provider`.
    pub role: String,
    /// The system's slug on the provider.
    pub system: String,
    /// The system here: ours (provider) or its mirror (consumer).
    pub local_system: Option<String>,
    /// requested, pending, accepted, rejected or ended.
    pub state: String,
    pub exposure: Exposure,
    pub requested_by: String,
    pub decided_by: Option<String>,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: jiff::Timestamp,
}

const USE_COLUMNS: &str = "u.peer_id, u.id, u.role, u.system_slug, u.system_id, u.state, u.level, \
    u.subsystems, u.handbook, u.contacts, u.requested_by, u.decided_by, u.updated_at, p.name AS peer_name, s.slug AS local_slug";

fn use_from(r: &sqlx::any::AnyRow) -> Result<UseInfo, sqlx::Error> {
    Ok(UseInfo {
        id: r.try_get("id")?,
        peer: r.try_get("peer_id")?,
        peer_name: r.try_get("peer_name")?,
        role: r.try_get("role")?,
        system: r.try_get("system_slug")?,
        local_system: r.try_get("local_slug")?,
        state: r.try_get("state")?,
        exposure: Exposure::of_row(r)?,
        requested_by: r.try_get("requested_by")?,
        decided_by: r.try_get("decided_by")?,
        updated_at: from_micros(r.try_get("updated_at")?),
    })
}

fn select_uses(filter: &str) -> String {
    format!(
        "SELECT {USE_COLUMNS} FROM uses u JOIN peers p ON p.instance_id = u.peer_id \
         LEFT JOIN systems s ON s.id = u.system_id AND s.deleted_at IS NULL {filter}"
    )
}

/// Every use relation, newest first.
pub async fn list(ctx: &Context) -> Result<Vec<UseInfo>, sqlx::Error> {
    let rows = sqlx::query(&select_uses("ORDER BY u.updated_at DESC, u.id"))
        .fetch_all(ctx.db.reader())
        .await?;
    rows.iter().map(use_from).collect()
}

/// A page of use relations, newest first (by when they were asked), after
/// the use `after` (peer, id) of the previous page, optionally in one state.
/// `None` if `after` names no use.
pub async fn page(
    ctx: &Context,
    state: Option<&str>,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Option<Vec<UseInfo>>, sqlx::Error> {
    let mut filter = String::from("WHERE ($1 = '' OR u.state = $1)");
    if after.is_some() {
        filter.push_str(
            " AND (u.created_at, u.peer_id, u.id) < \
             (SELECT c.created_at, c.peer_id, c.id FROM uses c WHERE c.peer_id = $3 AND c.id = $4)",
        );
        let (peer, id) = after.unwrap_or_default();
        let known = sqlx::query("SELECT 1 FROM uses WHERE peer_id = $1 AND id = $2")
            .bind(peer)
            .bind(id)
            .fetch_optional(ctx.db.reader())
            .await?
            .is_some();
        if !known {
            return Ok(None);
        }
    }
    filter.push_str(" ORDER BY u.created_at DESC, u.peer_id DESC, u.id DESC LIMIT $2");
    let sql = select_uses(&filter);
    let mut q = sqlx::query(&sql)
        .bind(state.unwrap_or_default())
        .bind(limit);
    if let Some((peer, id)) = after {
        q = q.bind(peer).bind(id);
    }
    let rows = q.fetch_all(ctx.db.reader()).await?;
    Ok(Some(rows.iter().map(use_from).collect::<Result<_, _>>()?))
}

/// One use relation by id.
pub async fn get(ctx: &Context, id: &str) -> Result<UseInfo, FederationError> {
    let row = sqlx::query(&select_uses("WHERE u.id = $1"))
        .bind(id)
        .fetch_optional(ctx.db.reader())
        .await?
        .ok_or_else(|| FederationError::NotFound(format!("use '{id}'")))?;
    Ok(use_from(&row)?)
}

async fn get_in(tx: &mut Tx, peer: &str, id: &str) -> Result<Option<UseInfo>, sqlx::Error> {
    let row = sqlx::query(&select_uses("WHERE u.peer_id = $1 AND u.id = $2"))
        .bind(peer)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(use_from).transpose()
}

fn internal(e: impl std::fmt::Display) -> FederationError {
    FederationError::Internal(e.to_string())
}

/// Records on this instance's own system (the audit trail).
async fn on_instance(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    kind: &str,
    title: String,
    data: serde_json::Value,
) -> Result<(), FederationError> {
    crate::users::audit(ctx, tx, actor, kind, title, data)
        .await
        .map_err(internal)
}

/// Records on a system's timeline.
async fn on_system(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    system_id: &str,
    kind: &str,
    title: String,
    data: serde_json::Value,
) -> Result<(), sqlx::Error> {
    let slug: String = sqlx::query("SELECT slug FROM systems WHERE id = $1")
        .bind(system_id)
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    crate::timeline::record(
        ctx,
        tx,
        actor,
        Target {
            id: system_id,
            slug: &slug,
        },
        kind,
        title,
        data,
    )
    .await?;
    Ok(())
}

/// B asks peer `peer` to use its system `slug`.
pub async fn request(
    ctx: &Context,
    actor: &Actor,
    peer: &str,
    slug: &str,
    level: Level,
) -> Result<UseInfo, FederationError> {
    let peer = super::peers::find(ctx, peer).await?;
    if !matches!(peer.state.as_str(), "active" | "unreachable") {
        return Err(FederationError::Peer(format!(
            "peer {} is {}; only an active peer can be asked",
            peer.name, peer.state
        )));
    }
    Slug::try_from(slug).map_err(FederationError::Peer)?;
    let id = new_id().to_string();
    let now = to_micros(ctx.now());
    let mut tx = ctx.db.begin_recording().await?;
    let open = sqlx::query(
        "SELECT id FROM uses WHERE peer_id = $1 AND role = 'consumer' AND system_slug = $2 AND state IN ('requested', 'accepted')",
    )
    .bind(peer.instance_id.as_str())
    .bind(slug)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = open {
        let existing: String = row.try_get(0)?;
        return Err(FederationError::Peer(format!(
            "this instance asked for or uses {slug} of {} already (use {existing})",
            peer.name
        )));
    }
    sqlx::query(
        "INSERT INTO uses (peer_id, id, role, system_slug, state, level, requested_by, created_at, updated_at) \
         VALUES ($1, $2, 'consumer', $3, 'requested', $4, $5, $6, $6)",
    )
    .bind(peer.instance_id.as_str())
    .bind(id.as_str())
    .bind(slug)
    .bind(level.as_str())
    .bind(actor.name.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await?;
    outbox::enqueue(
        &mut tx,
        &peer.instance_id,
        &[(
            "use.request",
            json!({"use": id, "system": slug, "level": level.as_str()}),
        )],
        now,
    )
    .await?;
    on_instance(
        ctx,
        &mut tx,
        actor,
        "federation.use_requested",
        format!("Asked {} to use {slug} ({})", peer.name, level.as_str()),
        json!({"use": id, "peer": peer.instance_id, "system": slug, "level": level.as_str()}),
    )
    .await?;
    ctx.commit(tx).await?;
    ctx.federation.wake(&peer.instance_id);
    get(ctx, &id).await
}

/// A accepts (with an exposure) or rejects a pending request.
pub async fn decide(
    ctx: &Context,
    actor: &Actor,
    id: &str,
    accept: Option<Exposure>,
    reason: &str,
) -> Result<UseInfo, FederationError> {
    let u = get(ctx, id).await?;
    if u.role != "provider" || u.state != "pending" {
        return Err(FederationError::Peer(format!(
            "use {id} is {} ({}); only a pending request to this instance can be decided",
            u.state, u.role
        )));
    }
    let mut tx = ctx.db.begin_recording().await?;
    // Again under the recording lock, which the inbox takes too: an undo
    // that arrived meanwhile is not overwritten.
    if !still_in(&mut tx, &u, &["pending"]).await? {
        return Err(FederationError::Peer(format!(
            "use {id} changed meanwhile; look again"
        )));
    }
    let system_id = sqlx::query("SELECT system_id FROM uses WHERE peer_id = $1 AND id = $2")
        .bind(u.peer.as_str())
        .bind(id)
        .fetch_one(&mut *tx)
        .await?
        .try_get::<Option<String>, _>(0)?
        .ok_or_else(|| FederationError::Internal("the use names no system".into()))?;
    match accept {
        Some(exposure) => {
            accept_in(
                ctx,
                &mut tx,
                actor,
                &u.peer,
                &u.peer_name,
                id,
                &system_id,
                exposure,
            )
            .await?
        }
        None => {
            set_use_state(&mut tx, &u.peer, id, "rejected", Some(&actor.name), ctx).await?;
            let now = to_micros(ctx.now());
            outbox::enqueue(
                &mut tx,
                &u.peer,
                &[("use.rejected", json!({"use": id, "reason": reason}))],
                now,
            )
            .await?;
            on_system(
                ctx,
                &mut tx,
                actor,
                &system_id,
                "federation.use_rejected",
                format!("Rejected {}'s request to use {}", u.peer_name, u.system),
                json!({"use": id, "peer": u.peer, "reason": reason}),
            )
            .await?;
        }
    }
    ctx.commit(tx).await?;
    ctx.federation.wake(&u.peer);
    get(ctx, id).await
}

/// Whether a use is still in one of `states`, read in `tx`.
async fn still_in(tx: &mut Tx, u: &UseInfo, states: &[&str]) -> Result<bool, sqlx::Error> {
    Ok(get_in(tx, &u.peer, &u.id)
        .await?
        .is_some_and(|now| states.contains(&now.state.as_str())))
}

async fn set_use_state(
    tx: &mut Tx,
    peer: &str,
    id: &str,
    state: &str,
    decided_by: Option<&str>,
    ctx: &Context,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE uses SET state = $3, decided_by = COALESCE($4, decided_by), updated_at = $5 WHERE peer_id = $1 AND id = $2",
    )
    .bind(peer)
    .bind(id)
    .bind(state)
    .bind(decided_by)
    .bind(to_micros(ctx.now()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Accepts a use in the caller's transaction: state, exposure, the answer
/// and the first snapshot, and the event on S.
#[allow(clippy::too_many_arguments)]
async fn accept_in(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    peer: &str,
    peer_name: &str,
    id: &str,
    system_id: &str,
    exposure: Exposure,
) -> Result<(), FederationError> {
    sqlx::query(
        "UPDATE uses SET state = 'accepted', level = $3, subsystems = $4, handbook = $5, contacts = $6, \
         decided_by = $7, updated_at = $8 WHERE peer_id = $1 AND id = $2",
    )
    .bind(peer)
    .bind(id)
    .bind(exposure.level.as_str())
    .bind(i64::from(exposure.subsystems))
    .bind(i64::from(exposure.handbook))
    .bind(i64::from(exposure.contacts))
    .bind(actor.name.as_str())
    .bind(to_micros(ctx.now()))
    .execute(&mut **tx)
    .await?;
    let snapshot = snapshot(tx, id, system_id, exposure).await?;
    outbox::enqueue(
        tx,
        peer,
        &[
            ("use.accepted", json!({"use": id, "exposure": exposure})),
            ("system.snapshot", snapshot),
        ],
        to_micros(ctx.now()),
    )
    .await?;
    on_system(
        ctx,
        tx,
        actor,
        system_id,
        "federation.use_accepted",
        format!(
            "{peer_name} uses this system now ({}{})",
            exposure.level.as_str(),
            if exposure.subsystems {
                ", with subsystems"
            } else {
                ""
            }
        ),
        json!({"use": id, "peer": peer, "exposure": exposure}),
    )
    .await?;
    Ok(())
}

/// Ends a use from either side.
pub async fn undo(ctx: &Context, actor: &Actor, id: &str) -> Result<UseInfo, FederationError> {
    let u = get(ctx, id).await?;
    if !matches!(u.state.as_str(), "requested" | "pending" | "accepted") {
        return Err(FederationError::Peer(format!(
            "use {id} is {} already",
            u.state
        )));
    }
    let mut tx = ctx.db.begin_recording().await?;
    if !still_in(&mut tx, &u, &["requested", "pending", "accepted"]).await? {
        return Err(FederationError::Peer(format!(
            "use {id} changed meanwhile; look again"
        )));
    }
    end_in(ctx, &mut tx, actor, &u, "ended here").await?;
    outbox::enqueue(
        &mut tx,
        &u.peer,
        &[("use.undo", json!({"use": id}))],
        to_micros(ctx.now()),
    )
    .await?;
    ctx.commit(tx).await?;
    ctx.federation.wake(&u.peer);
    get(ctx, id).await
}

/// Marks a use ended here: a consumer drops its mirrors, a provider
/// records it on S.
async fn end_in(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    u: &UseInfo,
    how: &str,
) -> Result<(), FederationError> {
    set_use_state(tx, &u.peer, &u.id, "ended", None, ctx).await?;
    let data = json!({"use": u.id, "peer": u.peer, "system": u.system});
    if u.role == "consumer" {
        drop_mirrors(ctx, tx, &u.peer, &u.id).await?;
        on_instance(
            ctx,
            tx,
            actor,
            "federation.use_ended",
            format!("No longer uses {} of {} ({how})", u.system, u.peer_name),
            data,
        )
        .await
    } else {
        let system_id: Option<String> =
            sqlx::query("SELECT system_id FROM uses WHERE peer_id = $1 AND id = $2")
                .bind(u.peer.as_str())
                .bind(u.id.as_str())
                .fetch_one(&mut **tx)
                .await?
                .try_get(0)?;
        let title = format!("{} no longer uses this system ({how})", u.peer_name);
        match system_id {
            Some(s) => {
                Ok(on_system(ctx, tx, actor, &s, "federation.use_ended", title, data).await?)
            }
            None => on_instance(ctx, tx, actor, "federation.use_ended", title, data).await,
        }
    }
}

/// On revocation: every use with the peer ends here.
pub async fn end_all_with(ctx: &Context, peer: &str, why: &str) -> Result<(), FederationError> {
    let rows = sqlx::query(&select_uses(
        "WHERE u.peer_id = $1 AND u.state IN ('requested', 'pending', 'accepted')",
    ))
    .bind(peer)
    .fetch_all(ctx.db.reader())
    .await?;
    let actor = Actor::instance(&ctx.identity.instance_id, "federation");
    for row in rows {
        let u = use_from(&row)?;
        let mut tx = ctx.db.begin_recording().await?;
        end_in(ctx, &mut tx, &actor, &u, why).await?;
        sqlx::query("DELETE FROM federation_outbox WHERE peer_id = $1")
            .bind(peer)
            .execute(&mut *tx)
            .await?;
        ctx.commit(tx).await?;
    }
    Ok(())
}

async fn drop_mirrors(
    ctx: &Context,
    tx: &mut Tx,
    peer: &str,
    use_id: &str,
) -> Result<(), sqlx::Error> {
    let rows =
        sqlx::query("SELECT system_id FROM remote_systems WHERE peer_id = $1 AND use_id = $2")
            .bind(peer)
            .bind(use_id)
            .fetch_all(&mut **tx)
            .await?;
    let now = to_micros(ctx.now());
    for row in rows {
        drop_mirror(tx, &row.try_get::<String, _>(0)?, now).await?;
    }
    Ok(())
}

/// One mirror goes: the system here is deleted, and no longer a mirror.
async fn drop_mirror(tx: &mut Tx, system_id: &str, now: i64) -> Result<(), sqlx::Error> {
    systems_store::mark_deleted(tx, system_id, now).await?;
    sqlx::query("DELETE FROM remote_systems WHERE system_id = $1")
        .bind(system_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A's standing answer for requests of `peer` for `slug`.
pub async fn allow(
    ctx: &Context,
    actor: &Actor,
    peer: &str,
    slug: &str,
    exposure: Exposure,
) -> Result<(), FederationError> {
    let peer = super::peers::find(ctx, peer).await?;
    let system = crate::systems::get(ctx, slug)
        .await
        .map_err(|_| FederationError::NotFound(format!("system '{slug}' here")))?;
    if system.instance != ctx.identity.instance_id {
        return Err(FederationError::Peer(format!(
            "{slug} is a remote system; only its primary instance decides who uses it"
        )));
    }
    let mut tx = ctx.db.begin_recording().await?;
    sqlx::query(
        "INSERT INTO use_policies (system_id, peer_id, level, subsystems, handbook, contacts, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (system_id, peer_id) DO UPDATE SET level = excluded.level, \
         subsystems = excluded.subsystems, handbook = excluded.handbook, contacts = excluded.contacts",
    )
    .bind(system.id.to_string())
    .bind(peer.instance_id.as_str())
    .bind(exposure.level.as_str())
    .bind(i64::from(exposure.subsystems))
    .bind(i64::from(exposure.handbook))
    .bind(i64::from(exposure.contacts))
    .bind(to_micros(ctx.now()))
    .execute(&mut *tx)
    .await?;
    on_system(
        ctx,
        &mut tx,
        actor,
        &system.id.to_string(),
        "federation.use_policy",
        format!(
            "Requests from {} to use this system are accepted at once ({})",
            peer.name,
            exposure.level.as_str()
        ),
        json!({"peer": peer.instance_id, "exposure": exposure}),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(())
}

/// A standing answer: requests of `peer` for `system` are accepted at once.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Policy {
    pub system: String,
    pub peer: String,
    pub peer_name: String,
    pub exposure: Exposure,
}

/// A page of standing policies, by system then peer, after (system slug,
/// peer id) of the previous page.
pub async fn policies_page(
    ctx: &Context,
    after: Option<(&str, &str)>,
    limit: i64,
) -> Result<Vec<Policy>, sqlx::Error> {
    let (slug, peer) = after.unwrap_or_default();
    let rows = sqlx::query(
        "SELECT s.slug, p.instance_id, p.name, u.level, u.subsystems, u.handbook, u.contacts \
         FROM use_policies u JOIN systems s ON s.id = u.system_id AND s.deleted_at IS NULL \
         JOIN peers p ON p.instance_id = u.peer_id \
         WHERE $1 = 0 OR s.slug > $2 OR (s.slug = $2 AND p.instance_id > $3) \
         ORDER BY s.slug, p.instance_id LIMIT $4",
    )
    .bind(i64::from(after.is_some()))
    .bind(slug)
    .bind(peer)
    .bind(limit)
    .fetch_all(ctx.db.reader())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Policy {
                system: r.try_get("slug")?,
                peer: r.try_get("instance_id")?,
                peer_name: r.try_get("name")?,
                exposure: Exposure::of_row(r)?,
            })
        })
        .collect()
}

/// Every standing policy, by system then peer.
pub async fn policies(ctx: &Context) -> Result<Vec<Policy>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT s.slug, p.instance_id, p.name, u.level, u.subsystems, u.handbook, u.contacts \
         FROM use_policies u JOIN systems s ON s.id = u.system_id AND s.deleted_at IS NULL \
         JOIN peers p ON p.instance_id = u.peer_id ORDER BY s.slug, p.name",
    )
    .fetch_all(ctx.db.reader())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Policy {
                system: r.try_get("slug")?,
                peer: r.try_get("instance_id")?,
                peer_name: r.try_get("name")?,
                exposure: Exposure::of_row(r)?,
            })
        })
        .collect()
}

/// Withdraws a standing policy: later requests wait for an admin again.
/// Uses it already accepted stay until undone.
pub async fn disallow(
    ctx: &Context,
    actor: &Actor,
    peer: &str,
    slug: &str,
) -> Result<(), FederationError> {
    let peer = super::peers::find(ctx, peer).await?;
    let system = crate::systems::get(ctx, slug)
        .await
        .map_err(|_| FederationError::NotFound(format!("system '{slug}' here")))?;
    let mut tx = ctx.db.begin_recording().await?;
    let gone = sqlx::query("DELETE FROM use_policies WHERE system_id = $1 AND peer_id = $2")
        .bind(system.id.to_string())
        .bind(peer.instance_id.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if gone == 0 {
        return Err(FederationError::NotFound(format!(
            "policy for {} on {slug}",
            peer.name
        )));
    }
    on_system(
        ctx,
        &mut tx,
        actor,
        &system.id.to_string(),
        "federation.use_policy_withdrawn",
        format!(
            "Requests from {} to use this system wait for an admin again",
            peer.name
        ),
        json!({"peer": peer.instance_id}),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(())
}

/// Where a mirrored system comes from: the peer and the use behind it.
#[derive(Debug, Clone)]
pub struct Origin {
    pub peer: String,
    pub peer_name: String,
    pub peer_url: String,
    pub use_id: String,
}

/// The origin of a system mirrored here, `None` for one of ours.
pub async fn origin_of(ctx: &Context, system_id: &str) -> Result<Option<Origin>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT r.peer_id, r.use_id, p.name, p.url FROM remote_systems r \
         JOIN peers p ON p.instance_id = r.peer_id WHERE r.system_id = $1",
    )
    .bind(system_id)
    .fetch_optional(ctx.db.reader())
    .await?;
    row.map(|r| {
        Ok(Origin {
            peer: r.try_get("peer_id")?,
            peer_name: r.try_get("name")?,
            peer_url: r.try_get("url")?,
            use_id: r.try_get("use_id")?,
        })
    })
    .transpose()
}

// ---- the provider's side of the wire --------------------------------------

/// Builds the snapshot of S (and what it exposes) for a use.
async fn snapshot(
    tx: &mut Tx,
    use_id: &str,
    system_id: &str,
    exposure: Exposure,
) -> Result<serde_json::Value, sqlx::Error> {
    let graph = systems_store::load_graph(tx).await?;
    let mirrors = mirror_ids(tx).await?;
    let ids = exposed(&graph, system_id, exposure.subsystems, &mirrors);
    let mut systems = systems_store::by_ids(tx, &ids).await?;
    let exposed_set: HashSet<&String> = ids.iter().collect();
    let mut edges = Vec::new();
    for id in &ids {
        for (kid, _) in graph.members(id) {
            if exposed_set.contains(&kid) {
                edges.push(json!([id, kid]));
            }
        }
    }
    let mut out = Vec::new();
    for s in systems.iter_mut() {
        if !exposure.handbook {
            s.handbook = String::new();
        }
        if !exposure.contacts {
            s.contacts = Vec::new();
        }
        s.selector = None;
        let states = states_of(tx, &s.id.to_string()).await?;
        out.push(json!({"system": s, "states": states}));
    }
    let mut events = Vec::new();
    if exposure.level == Level::Timeline {
        let mut size = 0usize;
        for e in recent_events(tx, &ids, 50).await? {
            let Some(v) = shared_event(&e, exposure) else {
                continue;
            };
            size += v.to_string().len();
            if size > 128 * 1024 {
                break;
            }
            events.push(json!({"system": e.system_id, "event": v}));
        }
    }
    Ok(json!({"use": use_id, "root": system_id, "systems": out, "edges": edges, "events": events}))
}

/// What a peer gets when a new epoch starts (its copy of our messages may
/// be gone or from another time): every use it has of ours accepted again
/// with a fresh snapshot, and every request of ours still open asked again.
/// Each handler takes a repeat as a no-op or a refresh.
pub async fn resync_messages(
    tx: &mut Tx,
    peer: &str,
) -> Result<Vec<(&'static str, serde_json::Value)>, sqlx::Error> {
    let rows = sqlx::query(&select_uses(
        "WHERE u.peer_id = $1 AND ((u.role = 'provider' AND u.state = 'accepted') OR (u.role = 'consumer' AND u.state = 'requested')) \
         ORDER BY u.created_at, u.id",
    ))
    .bind(peer)
    .fetch_all(&mut **tx)
    .await?;
    let mut out = Vec::new();
    for row in &rows {
        let u = use_from(row)?;
        let system_id: Option<String> = row.try_get("system_id")?;
        if u.role == "consumer" {
            out.push((
                "use.request",
                json!({"use": u.id, "system": u.system, "level": u.exposure.level.as_str()}),
            ));
            continue;
        }
        let Some(system_id) = system_id else { continue };
        out.push(("use.accepted", json!({"use": u.id, "exposure": u.exposure})));
        out.push((
            "system.snapshot",
            snapshot(tx, &u.id, &system_id, u.exposure).await?,
        ));
    }
    Ok(out)
}

/// An event as a use may see it. Changes to a system carry its fields in
/// their data (before and after): the handbook and contacts are taken out
/// unless the use shares them, selectors always; inclusions are withheld
/// when the use does not share subsystems, as they name them.
fn shared_event(e: &Event, exposure: Exposure) -> Option<serde_json::Value> {
    if !exposure.subsystems && matches!(e.kind.as_str(), "system.included" | "system.excluded") {
        return None;
    }
    let mut v = json!(e);
    if let Some(data) = v.get_mut("data") {
        let mut hidden = vec!["selector"];
        if !exposure.handbook {
            hidden.push("handbook");
        }
        if !exposure.contacts {
            hidden.push("contacts");
        }
        strip_keys(data, &hidden);
    }
    Some(v)
}

fn strip_keys(v: &mut serde_json::Value, keys: &[&str]) {
    match v {
        serde_json::Value::Object(fields) => {
            fields.retain(|k, _| !keys.contains(&k.as_str()));
            for field in fields.values_mut() {
                strip_keys(field, keys);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                strip_keys(item, keys);
            }
        }
        _ => {}
    }
}

/// S and, if the use shares them, the systems below it that live here.
fn exposed(
    graph: &crate::systems::graph::Graph,
    root: &str,
    subsystems: bool,
    mirrors: &HashSet<String>,
) -> Vec<String> {
    if !subsystems {
        return vec![root.to_owned()];
    }
    graph
        .closure(root)
        .into_iter()
        .filter(|id| id == root || !mirrors.contains(id))
        .collect()
}

async fn mirror_ids(tx: &mut Tx) -> Result<HashSet<String>, sqlx::Error> {
    let rows = sqlx::query("SELECT system_id FROM remote_systems")
        .fetch_all(&mut **tx)
        .await?;
    rows.iter().map(|r| r.try_get(0)).collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRow {
    source: String,
    severity: aramaki_protocol::Severity,
    summary: String,
    event_id: String,
    since: i64,
}

async fn states_of(tx: &mut Tx, id: &str) -> Result<Vec<StateRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT source, severity, summary, event_id, since FROM system_states WHERE system_id = $1 ORDER BY source",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(StateRow {
            source: r.try_get("source")?,
            severity: aramaki_protocol::Severity::from_rank(r.try_get("severity")?)
                .unwrap_or(aramaki_protocol::Severity::Info),
            summary: r.try_get("summary")?,
            event_id: r.try_get("event_id")?,
            since: r.try_get("since")?,
        });
    }
    Ok(out)
}

/// The newest events about `ids` that a consumer may see, oldest first.
async fn recent_events(tx: &mut Tx, ids: &[String], limit: i64) -> Result<Vec<Event>, sqlx::Error> {
    let mut sql = crate::db::Sql::new(
        "SELECT e.seq, e.id, e.system_id, s.slug, e.occurred_at, e.recorded_at, e.kind, e.severity, e.title, e.body, \
         e.actor_kind, e.actor_id, e.actor_name, e.data, e.origin, e.caused_by FROM events e JOIN systems s ON s.id = e.system_id \
         WHERE e.kind NOT LIKE 'federation.%' AND e.kind NOT LIKE 'peer.%' AND e.system_id IN ",
    );
    sql.bind_list(ids.iter());
    sql.push(" ORDER BY e.seq DESC LIMIT ").bind(limit);
    let rows = sql.query().fetch_all(&mut **tx).await?;
    let mut events: Vec<Event> = rows
        .iter()
        .map(timeline_store::event_from_row)
        .collect::<Result<_, _>>()?;
    events.reverse();
    Ok(events)
}

/// Whether an event is for this instance's users only.
fn private_kind(kind: &str) -> bool {
    kind.starts_with("federation.") || kind.starts_with("peer.")
}

fn is_state(kind: &str) -> bool {
    kind == "state" || kind.ends_with(".state_changed")
}

fn state_source(e: &Event) -> String {
    e.data
        .get("source")
        .or_else(|| e.data.get("check"))
        .and_then(|v| v.as_str())
        .map(|s| s.chars().take(100).collect())
        .unwrap_or_else(|| "default".to_owned())
}

/// An accepted use, as routing needs it.
#[derive(Debug, Clone)]
struct Route {
    peer: String,
    id: String,
    system_id: String,
    exposure: Exposure,
}

async fn routes(ctx: &Context) -> Result<Vec<Route>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT u.peer_id, u.id, u.system_id, u.level, u.subsystems, u.handbook, u.contacts FROM uses u \
         JOIN peers p ON p.instance_id = u.peer_id \
         WHERE u.role = 'provider' AND u.state = 'accepted' AND p.state IN ('active', 'unreachable', 'suspended') AND u.system_id IS NOT NULL",
    )
    .fetch_all(ctx.db.reader())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Route {
                peer: r.try_get("peer_id")?,
                id: r.try_get("id")?,
                system_id: r.try_get("system_id")?,
                exposure: Exposure::of_row(r)?,
            })
        })
        .collect()
}

/// Routes this instance's activity to the instances that use the systems
/// it is about, and to no one else. Durable: after a restart it resumes
/// at its cursor, and the outbox takes it from there.
#[derive(Debug, Default)]
pub struct FederationOut;

impl Subscriber for FederationOut {
    fn name(&self) -> &str {
        "federation-out"
    }

    fn durable(&self) -> bool {
        true
    }

    fn handle<'a>(
        &'a self,
        ctx: &'a Context,
        events: &'a [Event],
    ) -> BoxFuture<'a, Result<(), HandleError>> {
        Box::pin(async move {
            route(ctx, events)
                .await
                .map_err(|e| HandleError(e.to_string()))
        })
    }
}

async fn route(ctx: &Context, events: &[Event]) -> Result<(), sqlx::Error> {
    let me = &ctx.identity.instance_id;
    if !events
        .iter()
        .any(|e| &e.origin == me && !private_kind(&e.kind))
    {
        return Ok(());
    }
    let routes = routes(ctx).await?;
    if routes.is_empty() {
        return Ok(());
    }
    let mut tx = ctx.db.begin().await?;
    let graph = systems_store::load_graph(&mut tx).await?;
    let mirrors = mirror_ids(&mut tx).await?;
    let mut by_system: HashMap<String, Vec<&Route>> = HashMap::new();
    for r in &routes {
        for id in exposed(&graph, &r.system_id, r.exposure.subsystems, &mirrors) {
            by_system.entry(id).or_default().push(r);
        }
    }
    let mut out: BTreeMap<String, Vec<(&'static str, serde_json::Value)>> = BTreeMap::new();
    let mut resnap: Vec<&Route> = Vec::new();
    for e in events {
        if &e.origin != me || private_kind(&e.kind) || mirrors.contains(&e.system_id) {
            continue;
        }
        let Some(rs) = by_system.get(&e.system_id) else {
            // Its labels changed, and it may just have left a used system
            // that includes by selector: those uses get a fresh snapshot,
            // which no longer mirrors it.
            if e.kind == "system.updated" && e.data["after"].get("labels").is_some() {
                for r in routes.iter().filter(|r| r.exposure.subsystems) {
                    if !resnap.iter().any(|x| x.id == r.id) {
                        resnap.push(r);
                    }
                }
            }
            continue;
        };
        for r in rs {
            let msgs = out.entry(r.peer.clone()).or_default();
            if e.kind.starts_with("system.") && !resnap.iter().any(|x| x.id == r.id) {
                resnap.push(r);
            }
            match r.exposure.level {
                Level::Timeline => {
                    if let Some(shared) = shared_event(e, r.exposure) {
                        msgs.push((
                            "activity",
                            json!({"use": r.id, "system": e.system_id, "event": shared}),
                        ));
                    }
                }
                Level::Status if is_state(&e.kind) => msgs.push((
                    "status",
                    json!({"use": r.id, "system": e.system_id, "state": StateRow {
                        source: state_source(e),
                        severity: e.severity,
                        summary: e.title.clone(),
                        event_id: e.id.to_string(),
                        since: to_micros(e.occurred_at),
                    }}),
                )),
                Level::Status => {}
            }
        }
    }
    let mut gone = Vec::new();
    for r in resnap {
        if root_deleted(&mut tx, &r.system_id).await? {
            gone.push(r.id.clone());
            continue;
        }
        let snap = snapshot(&mut tx, &r.id, &r.system_id, r.exposure).await?;
        out.entry(r.peer.clone())
            .or_default()
            .push(("system.snapshot", snap));
    }
    let now = to_micros(ctx.now());
    for (peer, msgs) in &out {
        if !msgs.is_empty() {
            outbox::enqueue(&mut tx, peer, msgs, now).await?;
        }
    }
    tx.commit().await?;
    for peer in out.keys() {
        ctx.federation.wake(peer);
    }
    // A used system deleted here: its uses end, and the users are told.
    let actor = Actor::instance(me, "federation");
    for id in gone {
        match undo(ctx, &actor, &id).await {
            Ok(_) | Err(FederationError::Peer(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, use_id = id, "cannot end a use of a deleted system")
            }
        }
    }
    Ok(())
}

async fn root_deleted(tx: &mut Tx, system_id: &str) -> Result<bool, sqlx::Error> {
    let row = sqlx::query("SELECT deleted_at FROM systems WHERE id = $1")
        .bind(system_id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(match row {
        Some(r) => r.try_get::<Option<i64>, _>(0)?.is_some(),
        None => true,
    })
}

// ---- the receiving side ----------------------------------------------------

/// Why a message from a peer was not applied (it is counted and skipped).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Refused(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<FederationError> for Refusal {
    fn from(e: FederationError) -> Refusal {
        match e {
            FederationError::Db(d) => Refusal::Db(d),
            other => Refusal::Refused(other.to_string()),
        }
    }
}

fn field<'a>(data: &'a serde_json::Value, name: &str) -> Result<&'a str, Refusal> {
    data[name]
        .as_str()
        .ok_or_else(|| Refusal::Refused(format!("the message has no '{name}'")))
}

/// What applying a message costs, in rows it may write: counted against
/// `federation.max_work_per_second`, since frames alone say little (a
/// snapshot writes hundreds of rows, a status one).
pub fn work_of(kind: &str, data: &serde_json::Value) -> u64 {
    let len = |k: &str| data[k].as_array().map_or(0, |a| a.len() as u64);
    1 + match kind {
        "use.request" => 3,
        "system.snapshot" => 2 + 3 * len("systems") + len("edges") + len("events"),
        "activity" => 2,
        "status" => 1,
        _ => 2,
    }
}

/// Applies one message from `peer` in the caller's transaction.
pub async fn dispatch(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    kind: &str,
    data: &serde_json::Value,
) -> Result<(), Refusal> {
    match kind {
        "use.request" => on_request(ctx, tx, peer, data).await,
        "use.accepted" => on_answer(ctx, tx, peer, data, true).await,
        "use.rejected" => on_answer(ctx, tx, peer, data, false).await,
        "use.undo" => on_undo(ctx, tx, peer, data).await,
        "system.snapshot" => on_snapshot(ctx, tx, peer, data).await,
        "activity" => on_activity(ctx, tx, peer, data).await,
        "status" => on_status(ctx, tx, peer, data).await,
        other => Err(Refusal::Refused(format!("unknown message type {other}"))),
    }
}

async fn on_request(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
) -> Result<(), Refusal> {
    let id = field(data, "use")?;
    uuid::Uuid::parse_str(id).map_err(|_| Refusal::Refused("the use id is not a UUID".into()))?;
    let slug = field(data, "system")?;
    let level = Level::parse(field(data, "level")?)
        .ok_or_else(|| Refusal::Refused("level must be status or timeline".into()))?;
    if get_in(tx, &peer.id, id).await?.is_some() {
        return Ok(());
    }
    let actor = Actor::instance(&peer.id, &peer.name);
    let now = to_micros(ctx.now());
    if let Some(reason) = over_request_quota(ctx, tx, peer, now).await? {
        // Refused, signed, with nothing stored but the answer.
        outbox::enqueue(
            tx,
            &peer.id,
            &[(
                "use.rejected",
                json!({"use": id, "reason": reason, "quota": true}),
            )],
            now,
        )
        .await?;
        ctx.federation.refuse(&peer.name, "quota", &reason);
        return Ok(());
    }
    let system = systems_store::by_slug(tx, slug)
        .await?
        .filter(|s| s.instance == ctx.identity.instance_id);
    let insert = |state: &'static str, system_id: Option<String>| {
        sqlx::query(
            "INSERT INTO uses (peer_id, id, role, system_slug, system_id, state, level, requested_by, created_at, updated_at) \
             VALUES ($1, $2, 'provider', $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(peer.id.clone())
        .bind(id.to_owned())
        .bind(slug.to_owned())
        .bind(system_id)
        .bind(state)
        .bind(level.as_str())
        .bind(peer.name.clone())
        .bind(now)
    };
    let Some(system) = system else {
        insert("rejected", None).execute(&mut **tx).await?;
        let reason = format!("no system '{slug}' lives on this instance");
        outbox::enqueue(
            tx,
            &peer.id,
            &[("use.rejected", json!({"use": id, "reason": reason}))],
            now,
        )
        .await?;
        on_instance(
            ctx,
            tx,
            &actor,
            "federation.use_rejected",
            format!(
                "{} asked to use {slug}, which does not live here",
                peer.name
            ),
            json!({"use": id, "peer": peer.id, "system": slug}),
        )
        .await?;
        return Ok(());
    };
    let sid = system.id.to_string();
    insert("pending", Some(sid.clone()))
        .execute(&mut **tx)
        .await?;
    on_system(
        ctx,
        tx,
        &actor,
        &sid,
        "federation.use_requested",
        format!("{} asks to use this system ({})", peer.name, level.as_str()),
        json!({"use": id, "peer": peer.id, "level": level.as_str()}),
    )
    .await?;
    let policy = sqlx::query(
        "SELECT level, subsystems, handbook, contacts FROM use_policies WHERE system_id = $1 AND peer_id = $2",
    )
    .bind(sid.as_str())
    .bind(peer.id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(p) = policy {
        let allowed = Level::parse(&p.try_get::<String, _>("level")?).unwrap_or(Level::Status);
        let exposure = Exposure {
            level: if allowed == Level::Timeline {
                level
            } else {
                Level::Status
            },
            subsystems: p.try_get::<i64, _>("subsystems")? != 0,
            handbook: p.try_get::<i64, _>("handbook")? != 0,
            contacts: p.try_get::<i64, _>("contacts")? != 0,
        };
        let policy_actor = Actor::instance(&ctx.identity.instance_id, "use policy");
        accept_in(
            ctx,
            tx,
            &policy_actor,
            &peer.id,
            &peer.name,
            id,
            &sid,
            exposure,
        )
        .await?;
    }
    Ok(())
}

/// Why one more use request of `peer` would be too many, if it would.
async fn over_request_quota(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    now: i64,
) -> Result<Option<String>, sqlx::Error> {
    let q = &ctx.config.federation;
    let row = sqlx::query(
        "SELECT COALESCE(SUM(CASE WHEN state IN ('pending', 'accepted') THEN 1 ELSE 0 END), 0), \
         COALESCE(SUM(CASE WHEN created_at > $2 THEN 1 ELSE 0 END), 0) \
         FROM uses WHERE peer_id = $1 AND role = 'provider'",
    )
    .bind(peer.id.as_str())
    .bind(now - 3_600_000_000)
    .fetch_one(&mut **tx)
    .await?;
    let (kept, recent): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    Ok(if recent >= i64::from(q.max_use_requests_per_hour) {
        Some(format!(
            "too many use requests from {}: {recent} in the last hour, at most {} (federation.max_use_requests_per_hour)",
            peer.name, q.max_use_requests_per_hour
        ))
    } else if kept >= i64::from(q.max_open_uses_per_peer) {
        Some(format!(
            "too many use requests from {}: {kept} open (pending or accepted), at most {} (federation.max_open_uses_per_peer)",
            peer.name, q.max_open_uses_per_peer
        ))
    } else {
        None
    })
}

async fn consumer_use(
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
) -> Result<UseInfo, Refusal> {
    let id = field(data, "use")?;
    get_in(tx, &peer.id, id)
        .await?
        .filter(|u| u.role == "consumer")
        .ok_or_else(|| {
            Refusal::Refused(format!(
                "{} answers a use this instance never asked for",
                peer.name
            ))
        })
}

async fn on_answer(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
    accepted: bool,
) -> Result<(), Refusal> {
    let u = consumer_use(tx, peer, data).await?;
    if u.state != "requested" {
        return Ok(());
    }
    let actor = Actor::instance(&peer.id, &peer.name);
    if accepted {
        let exposure: Exposure = serde_json::from_value(data["exposure"].clone())
            .map_err(|e| Refusal::Refused(format!("exposure: {e}")))?;
        sqlx::query(
            "UPDATE uses SET state = 'accepted', level = $3, subsystems = $4, handbook = $5, contacts = $6, \
             decided_by = $7, updated_at = $8 WHERE peer_id = $1 AND id = $2",
        )
        .bind(peer.id.as_str())
        .bind(u.id.as_str())
        .bind(exposure.level.as_str())
        .bind(i64::from(exposure.subsystems))
        .bind(i64::from(exposure.handbook))
        .bind(i64::from(exposure.contacts))
        .bind(peer.name.as_str())
        .bind(to_micros(ctx.now()))
        .execute(&mut **tx)
        .await?;
        on_instance(
            ctx,
            tx,
            &actor,
            "federation.use_accepted",
            format!(
                "{} accepted: {} is used here now ({})",
                peer.name,
                u.system,
                exposure.level.as_str()
            ),
            json!({"use": u.id, "peer": peer.id, "system": u.system, "exposure": exposure}),
        )
        .await?;
    } else {
        set_use_state(tx, &peer.id, &u.id, "rejected", Some(&peer.name), ctx).await?;
        let reason = data["reason"].as_str().unwrap_or("");
        on_instance(
            ctx,
            tx,
            &actor,
            "federation.use_rejected",
            format!(
                "{} rejected the request to use {}{}",
                peer.name,
                u.system,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ),
            json!({"use": u.id, "peer": peer.id, "system": u.system, "reason": reason}),
        )
        .await?;
    }
    Ok(())
}

async fn on_undo(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
) -> Result<(), Refusal> {
    let id = field(data, "use")?;
    let Some(u) = get_in(tx, &peer.id, id).await? else {
        return Err(Refusal::Refused(format!(
            "{} ends a use that does not exist",
            peer.name
        )));
    };
    if !matches!(u.state.as_str(), "requested" | "pending" | "accepted") {
        return Ok(());
    }
    let actor = Actor::instance(&peer.id, &peer.name);
    end_in(ctx, tx, &actor, &u, &format!("ended by {}", peer.name)).await?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct SnapshotSystem {
    system: System,
    #[serde(default)]
    states: Vec<StateRow>,
}

async fn accepted_use(
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
) -> Result<UseInfo, Refusal> {
    let u = consumer_use(tx, peer, data).await?;
    if u.state != "accepted" {
        return Err(Refusal::Refused(format!(
            "use {} is {}, not accepted",
            u.id, u.state
        )));
    }
    Ok(u)
}

/// The refusal for activity about a system the issuer does not own.
fn not_primary(peer: &LinkPeer, what: &str) -> Refusal {
    Refusal::Refused(format!(
        "{} is not the primary instance of {what}: only a system's primary instance may issue activity about it",
        peer.name
    ))
}

async fn on_snapshot(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
) -> Result<(), Refusal> {
    let u = accepted_use(tx, peer, data).await?;
    let systems: Vec<SnapshotSystem> = serde_json::from_value(data["systems"].clone())
        .map_err(|e| Refusal::Refused(format!("snapshot: {e}")))?;
    let root = field(data, "root")?.to_owned();
    if let Some(s) = systems.iter().find(|s| s.system.instance != peer.id) {
        return Err(not_primary(peer, &s.system.slug.to_string()));
    }
    if !systems.iter().any(|s| s.system.id.to_string() == root) {
        return Err(Refusal::Refused(
            "the snapshot lacks its root system".into(),
        ));
    }
    answers_the_use(tx, peer, &u, &root, &systems, &data["edges"]).await?;
    let now = ctx.now();
    let mut local: HashMap<String, (String, String)> = HashMap::new();
    let actor = Actor::instance(&peer.id, &peer.name);
    for s in &systems {
        let remote = s.system.id.to_string();
        let (id, slug) = upsert_mirror(ctx, tx, peer, &u.id, &s.system).await?;
        sqlx::query("DELETE FROM system_states WHERE system_id = $1")
            .bind(id.as_str())
            .execute(&mut **tx)
            .await?;
        for st in &s.states {
            sqlx::query(
                "INSERT INTO system_states (system_id, source, severity, summary, event_id, since) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(id.as_str())
            .bind(st.source.as_str())
            .bind(st.severity.rank())
            .bind(st.summary.as_str())
            .bind(st.event_id.as_str())
            .bind(st.since)
            .execute(&mut **tx)
            .await?;
        }
        local.insert(remote, (id, slug));
    }
    // What the provider no longer exposes under this use (excluded from S,
    // say) is no longer mirrored.
    let kept: HashSet<&String> = local.keys().collect();
    let mirrored = sqlx::query(
        "SELECT system_id, remote_id FROM remote_systems WHERE peer_id = $1 AND use_id = $2",
    )
    .bind(peer.id.as_str())
    .bind(u.id.as_str())
    .fetch_all(&mut **tx)
    .await?;
    for row in mirrored {
        let (id, remote): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        if !kept.contains(&remote) {
            drop_mirror(tx, &id, to_micros(now)).await?;
        }
    }
    // The structure among the mirrored systems follows the provider's.
    let ids: Vec<&String> = local.values().map(|(id, _)| id).collect();
    for id in &ids {
        sqlx::query("DELETE FROM inclusions WHERE parent_id = $1")
            .bind(id.as_str())
            .execute(&mut **tx)
            .await?;
    }
    if let Some(edges) = data["edges"].as_array() {
        for edge in edges {
            let (Some(p), Some(c)) = (edge[0].as_str(), edge[1].as_str()) else {
                continue;
            };
            if let (Some((p, _)), Some((c, _))) = (local.get(p), local.get(c)) {
                systems_store::include(tx, p, c, to_micros(now)).await?;
            }
        }
    }
    let (root_id, root_slug) = local
        .get(&root)
        .cloned()
        .ok_or_else(|| Refusal::Refused("the snapshot lacks its root system".into()))?;
    let first = sqlx::query("UPDATE uses SET system_id = $3, updated_at = $4 WHERE peer_id = $1 AND id = $2 AND system_id IS NULL")
        .bind(peer.id.as_str())
        .bind(u.id.as_str())
        .bind(root_id.as_str())
        .bind(to_micros(now))
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1;
    if let Some(events) = data["events"].as_array() {
        for item in events {
            let remote = item["system"].as_str().unwrap_or_default();
            let Some((sid, slug)) = local.get(remote) else {
                continue;
            };
            let e: Event = serde_json::from_value(item["event"].clone())
                .map_err(|e| Refusal::Refused(format!("event: {e}")))?;
            insert_remote_event(ctx, tx, peer, sid, slug, e).await?;
        }
    }
    if first {
        crate::timeline::record(
            ctx,
            tx,
            &actor,
            Target {
                id: &root_id,
                slug: &root_slug,
            },
            "federation.mirrored",
            format!(
                "Mirrored from {}: {} is used here, read-only",
                peer.name, u.system
            ),
            json!({"use": u.id, "peer": peer.id, "remote": root}),
        )
        .await?;
    }
    Ok(())
}

/// A snapshot describes the system its use is about and what lies below
/// it, nothing else: the root is the system mirrored so far (or, for the
/// first snapshot, the one asked for by its slug), every other system is
/// reached from the root by the snapshot's own edges (and only if the use
/// shares subsystems), and no id is one of ours or another peer's.
async fn answers_the_use(
    tx: &mut Tx,
    peer: &LinkPeer,
    u: &UseInfo,
    root: &str,
    systems: &[SnapshotSystem],
    edges: &serde_json::Value,
) -> Result<(), Refusal> {
    let refuse = |why: String| {
        Err(Refusal::Refused(format!(
            "snapshot for use {}: {why}",
            u.id
        )))
    };
    let mirrored_root = sqlx::query(
        "SELECT r.remote_id FROM uses u JOIN remote_systems r ON r.system_id = u.system_id \
         WHERE u.peer_id = $1 AND u.id = $2",
    )
    .bind(peer.id.as_str())
    .bind(u.id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    match mirrored_root {
        Some(row) => {
            let known: String = row.try_get(0)?;
            if known != root {
                return refuse(format!(
                    "its root {root} is not {known}, the system this use mirrors"
                ));
            }
        }
        None => {
            let asked = systems
                .iter()
                .find(|s| s.system.id.to_string() == root)
                .map(|s| s.system.slug.to_string())
                .unwrap_or_default();
            if asked != u.system {
                return refuse(format!(
                    "its root is '{asked}', but the use asked for '{}'",
                    u.system
                ));
            }
        }
    }
    if !u.exposure.subsystems && systems.len() > 1 {
        return refuse("the use does not share subsystems, yet the snapshot has several".into());
    }
    let ids: HashSet<String> = systems.iter().map(|s| s.system.id.to_string()).collect();
    if ids.len() != systems.len() {
        return refuse("a system appears twice".into());
    }
    let mut below: HashMap<&str, Vec<&str>> = HashMap::new();
    for edge in edges.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let (Some(p), Some(c)) = (edge[0].as_str(), edge[1].as_str()) {
            below.entry(p).or_default().push(c);
        }
    }
    let mut reached: HashSet<&str> = HashSet::from([root]);
    let mut todo = vec![root];
    while let Some(next) = todo.pop() {
        for kid in below.get(next).map(Vec::as_slice).unwrap_or_default() {
            if ids.contains(*kid) && reached.insert(kid) {
                todo.push(kid);
            }
        }
    }
    for s in systems {
        let id = s.system.id.to_string();
        if !reached.contains(id.as_str()) {
            return refuse(format!("{} ({id}) is not below its root", s.system.slug));
        }
        let ours = sqlx::query("SELECT 1 FROM systems WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&mut **tx)
            .await?
            .is_some();
        let elsewhere =
            sqlx::query("SELECT 1 FROM remote_systems WHERE remote_id = $1 AND peer_id <> $2")
                .bind(id.as_str())
                .bind(peer.id.as_str())
                .fetch_optional(&mut **tx)
                .await?
                .is_some();
        if ours || elsewhere {
            return refuse(format!(
                "{} carries the id {id} of a system that is not {}'s",
                s.system.slug, peer.name
            ));
        }
    }
    Ok(())
}

/// Creates or refreshes the mirror of a remote system; returns its id and slug here.
async fn upsert_mirror(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    use_id: &str,
    remote: &System,
) -> Result<(String, String), Refusal> {
    let now = ctx.now();
    ensure_category(tx, &remote.category).await?;
    let existing =
        sqlx::query("SELECT system_id FROM remote_systems WHERE peer_id = $1 AND remote_id = $2")
            .bind(peer.id.as_str())
            .bind(remote.id.to_string())
            .fetch_optional(&mut **tx)
            .await?;
    if let Some(row) = existing {
        let id: String = row.try_get(0)?;
        let mine = systems_store::by_ids(tx, std::slice::from_ref(&id)).await?;
        if let Some(mut m) = mine.into_iter().next() {
            // Renamed on its instance: follow, as far as the name is free here.
            if !m.slug.as_str().starts_with(remote.slug.as_str()) {
                m.slug = free_slug(tx, &remote.slug, &peer.name).await?;
            }
            m.title = remote.title.clone();
            m.category = remote.category.clone();
            m.description = remote.description.clone();
            m.handbook = remote.handbook.clone();
            m.labels = remote.labels.clone();
            m.links = remote.links.clone();
            m.contacts = remote.contacts.clone();
            m.version += 1;
            m.updated_at = now;
            systems_store::update(tx, &m).await?;
            return Ok((id, m.slug.to_string()));
        }
    }
    let mirrors: i64 = sqlx::query("SELECT COUNT(*) FROM remote_systems WHERE peer_id = $1")
        .bind(peer.id.as_str())
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    let most = ctx.config.federation.max_mirrors_per_peer;
    if mirrors >= i64::from(most) {
        return Err(Refusal::Refused(format!(
            "quota: {} has {mirrors} systems mirrored here, at most {most} (federation.max_mirrors_per_peer)",
            peer.name
        )));
    }
    let slug = free_slug(tx, &remote.slug, &peer.name).await?;
    let mirror = System {
        id: new_id(),
        slug: slug.clone(),
        title: remote.title.clone(),
        category: remote.category.clone(),
        description: remote.description.clone(),
        handbook: remote.handbook.clone(),
        labels: remote.labels.clone(),
        links: remote.links.clone(),
        contacts: remote.contacts.clone(),
        selector: None,
        instance: peer.id.clone(),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    systems_store::insert(tx, &mirror).await?;
    let id = mirror.id.to_string();
    sqlx::query("INSERT INTO remote_systems (system_id, peer_id, remote_id, use_id) VALUES ($1, $2, $3, $4)")
        .bind(id.as_str())
        .bind(peer.id.as_str())
        .bind(remote.id.to_string())
        .bind(use_id)
        .execute(&mut **tx)
        .await?;
    Ok((id, slug.to_string()))
}

async fn ensure_category(tx: &mut Tx, c: &CategoryName) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO categories (name, title, description, builtin, created_at) VALUES ($1, $1, 'Arrived with a remote system.', 0, 0) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(c.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The remote slug if free here, else `<slug>-<peer>`, else numbered.
async fn free_slug(tx: &mut Tx, slug: &Slug, peer_name: &str) -> Result<Slug, Refusal> {
    let peer: String = peer_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let peer = peer.trim_matches('-').chars().take(20).collect::<String>();
    let base: String = slug.as_str().chars().take(40).collect();
    let mut candidates = vec![slug.to_string(), format!("{base}-{peer}")];
    candidates.extend((2..50).map(|n| format!("{base}-{peer}-{n}")));
    for c in candidates {
        let Ok(s) = Slug::try_from(c.as_str()) else {
            continue;
        };
        if systems_store::by_slug(tx, s.as_str()).await?.is_none() {
            return Ok(s);
        }
    }
    Err(Refusal::Refused(format!("no free slug for {slug} here")))
}

async fn insert_remote_event(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    system_id: &str,
    slug: &str,
    mut e: Event,
) -> Result<(), Refusal> {
    if e.origin != peer.id {
        return Err(not_primary(peer, &format!("the event {}", e.id)));
    }
    ctx.db.lock_timeline(tx).await?;
    if !timeline_store::existing_ids(tx, &[e.id]).await?.is_empty() {
        // Known already. On a mirror of this peer that went (a revocation,
        // an ended use) it moves to the mirror the peer's system has now,
        // so that peering again brings the history back; anywhere else it
        // is a redelivery.
        sqlx::query(
            "UPDATE events SET system_id = $2 WHERE id = $1 AND origin = $3 AND system_id <> $2 AND system_id IN \
             (SELECT id FROM systems WHERE instance_id = $3 AND deleted_at IS NOT NULL)",
        )
        .bind(e.id.to_string())
        .bind(system_id)
        .bind(peer.id.as_str())
        .execute(&mut **tx)
        .await?;
        return Ok(());
    }
    e.system_id = system_id.to_owned();
    e.system = slug.to_owned();
    e.recorded_at = ctx.now();
    let new_kind = crate::timeline::Kind::try_from(e.kind.clone()).map_err(Refusal::Refused)?;
    timeline_store::insert(tx, &e, None).await?;
    if new_kind.is_state() {
        let source = state_source(&e);
        timeline_store::set_state(tx, &e, &source).await?;
    }
    ctx.metrics.events_recorded(1);
    Ok(())
}

/// The mirror of `remote` under use `u` from `peer`, if there is one.
async fn mirror_of(
    tx: &mut Tx,
    peer: &LinkPeer,
    u: &UseInfo,
    remote: &str,
) -> Result<(String, String), Refusal> {
    let row = sqlx::query(
        "SELECT r.system_id, s.slug FROM remote_systems r JOIN systems s ON s.id = r.system_id \
         WHERE r.peer_id = $1 AND r.remote_id = $2 AND r.use_id = $3",
    )
    .bind(peer.id.as_str())
    .bind(remote)
    .bind(u.id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    match row {
        Some(r) => Ok((r.try_get(0)?, r.try_get(1)?)),
        None => Err(not_primary(
            peer,
            &format!("system {remote} (it is not one this instance uses from it)"),
        )),
    }
}

async fn on_activity(
    ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
) -> Result<(), Refusal> {
    let u = accepted_use(tx, peer, data).await?;
    let (sid, slug) = mirror_of(tx, peer, &u, field(data, "system")?).await?;
    let e: Event = serde_json::from_value(data["event"].clone())
        .map_err(|e| Refusal::Refused(format!("event: {e}")))?;
    insert_remote_event(ctx, tx, peer, &sid, &slug, e).await
}

async fn on_status(
    _ctx: &Context,
    tx: &mut Tx,
    peer: &LinkPeer,
    data: &serde_json::Value,
) -> Result<(), Refusal> {
    let u = accepted_use(tx, peer, data).await?;
    let (sid, _) = mirror_of(tx, peer, &u, field(data, "system")?).await?;
    let st: StateRow = serde_json::from_value(data["state"].clone())
        .map_err(|e| Refusal::Refused(format!("state: {e}")))?;
    sqlx::query(
        "INSERT INTO system_states (system_id, source, severity, summary, event_id, since) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (system_id, source) DO UPDATE SET severity = excluded.severity, summary = excluded.summary, \
         event_id = excluded.event_id, since = excluded.since",
    )
    .bind(sid.as_str())
    .bind(st.source.as_str())
    .bind(st.severity.rank())
    .bind(st.summary.as_str())
    .bind(st.event_id.as_str())
    .bind(st.since)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
