//! Systems: the things being managed. They aggregate top-down and N:M: a
//! system includes others (or selects them by labels); a subsystem has no
//! parent pointer and including never changes it. Every change records a
//! timeline event, in the same transaction, with actor, before and after.

pub mod forms;
pub mod graph;
pub mod http;
pub mod model;
pub mod pages;
pub mod status;
pub mod store;

use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use sqlx::Row;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::context::Context;
use crate::db::{is_unique_violation, new_id, to_micros, Tx};
use crate::timeline::{self, Actor, Target};
use graph::{Graph, Via};
use model::{
    check_text, CategoryName, Contact, Invalid, LabelSelector, Labels, Link, Slug, MAX_MARKDOWN,
};

/// A system as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct System {
    pub id: Uuid,
    pub slug: Slug,
    pub title: String,
    pub category: CategoryName,
    /// Markdown.
    pub description: String,
    /// Markdown: the rules — what may be touched, when to escalate, to whom.
    pub handbook: String,
    pub labels: Labels,
    pub links: Vec<Link>,
    /// In escalation order.
    pub contacts: Vec<Contact>,
    /// If set, the system is a dynamic aggregate of every system matching it.
    pub selector: Option<LabelSelector>,
    /// Id of the instance this system lives on (its primary instance).
    pub instance: String,
    /// Increases with every change.
    pub version: i64,
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: Timestamp,
}

/// A category of systems.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Category {
    pub name: CategoryName,
    pub title: String,
    pub description: String,
    /// Seeded at install time.
    pub builtin: bool,
    /// Number of live systems in it.
    pub systems: i64,
}

/// The body of `POST /api/v1/systems`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSystem {
    pub slug: Slug,
    pub title: String,
    pub category: CategoryName,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub handbook: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub links: Vec<Link>,
    #[serde(default)]
    pub contacts: Vec<Contact>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

/// The body of `PATCH /api/v1/systems/{slug}`: only the fields given change;
/// `labels`, `links` and `contacts` are replaced whole; `"selector": null`
/// turns a dynamic aggregate back into a plain system.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemPatch {
    pub slug: Option<Slug>,
    pub title: Option<String>,
    pub category: Option<CategoryName>,
    pub description: Option<String>,
    pub handbook: Option<String>,
    pub labels: Option<Labels>,
    pub links: Option<Vec<Link>>,
    pub contacts: Option<Vec<Contact>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub selector: Option<Option<LabelSelector>>,
}

/// Distinguishes a field set to `null` (Some(None)) from one left out (None).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The body of `POST /api/v1/categories`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCategory {
    pub name: CategoryName,
    pub title: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("no system '{0}'")]
    NotFound(String),
    #[error("a system with slug '{0}' already exists")]
    SlugTaken(String),
    #[error("unknown category '{0}'; see GET /api/v1/categories or create it first")]
    UnknownCategory(String),
    #[error("category '{0}' already exists")]
    CategoryTaken(String),
    #[error("including '{child}' in '{parent}' would close a cycle: {}", path.join(" → "))]
    Cycle {
        parent: String,
        child: String,
        path: Vec<String>,
    },
    #[error("this change would close a cycle: {}", path.join(" → "))]
    CycleByChange { path: Vec<String> },
    #[error("'{parent}' does not include '{child}'")]
    NotIncluded { parent: String, child: String },
    #[error("'{slug}' is still included by {}; exclude it first or delete with ?force=true", by.join(", "))]
    StillIncluded { slug: String, by: Vec<String> },
    #[error("'{0}' is a remote system, read-only here: only its primary instance changes it")]
    Remote(String),
    #[error("'{0}' is this instance's own system and holds its audit trail: it cannot be deleted")]
    InstanceSystem(String),
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Refuses changes to a system mirrored from another instance.
pub fn ensure_local(ctx: &Context, s: &System) -> Result<(), SystemError> {
    if s.instance == ctx.identity.instance_id {
        Ok(())
    } else {
        Err(SystemError::Remote(s.slug.to_string()))
    }
}

impl NewSystem {
    /// A plain system with nothing but its names; the rest can be added later.
    pub fn new(slug: Slug, title: &str, category: CategoryName) -> NewSystem {
        NewSystem {
            slug,
            title: title.to_owned(),
            category,
            description: String::new(),
            handbook: String::new(),
            labels: Labels::default(),
            links: Vec::new(),
            contacts: Vec::new(),
            selector: None,
        }
    }

    fn validate(&self) -> Result<(), Invalid> {
        check_text("title", &self.title, 1, 200)?;
        check_text("description", &self.description, 0, MAX_MARKDOWN)?;
        check_text("handbook", &self.handbook, 0, MAX_MARKDOWN)?;
        validate_lists(&self.links, &self.contacts)
    }
}

fn validate_lists(links: &[Link], contacts: &[Contact]) -> Result<(), Invalid> {
    if links.len() > 100 {
        return Err(Invalid::new("links", "at most 100 links"));
    }
    if contacts.len() > 100 {
        return Err(Invalid::new("contacts", "at most 100 contacts"));
    }
    for (i, l) in links.iter().enumerate() {
        l.validate(&format!("links[{i}]"))?;
    }
    for (i, c) in contacts.iter().enumerate() {
        c.validate(&format!("contacts[{i}]"))?;
    }
    Ok(())
}

fn sorted_contacts(mut contacts: Vec<Contact>) -> Vec<Contact> {
    contacts.sort_by_key(|c| c.escalation);
    contacts
}

async fn load(tx: &mut Tx, slug: &str) -> Result<System, SystemError> {
    store::by_slug(tx, slug)
        .await?
        .ok_or_else(|| SystemError::NotFound(slug.to_owned()))
}

async fn check_category(tx: &mut Tx, c: &CategoryName) -> Result<(), SystemError> {
    if store::category_exists(tx, c.as_str()).await? {
        Ok(())
    } else {
        Err(SystemError::UnknownCategory(c.to_string()))
    }
}

fn target(s: &System) -> (String, String) {
    (s.id.to_string(), s.slug.to_string())
}

async fn record(
    ctx: &Context,
    tx: &mut Tx,
    actor: &Actor,
    on: &System,
    kind: &str,
    title: String,
    data: serde_json::Value,
) -> Result<(), SystemError> {
    let (id, slug) = target(on);
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

/// Creates a system on this instance.
pub async fn create(ctx: &Context, actor: &Actor, new: NewSystem) -> Result<System, SystemError> {
    new.validate()?;
    let now = ctx.now();
    let system = System {
        id: new_id(),
        slug: new.slug,
        title: new.title.trim().to_owned(),
        category: new.category,
        description: new.description,
        handbook: new.handbook,
        labels: new.labels,
        links: new.links,
        contacts: sorted_contacts(new.contacts),
        selector: new.selector,
        instance: ctx.identity.instance_id.clone(),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    let mut tx = ctx.db.begin().await?;
    check_category(&mut tx, &system.category).await?;
    if let Err(e) = store::insert(&mut tx, &system).await {
        return Err(if is_unique_violation(&e) {
            SystemError::SlugTaken(system.slug.to_string())
        } else {
            e.into()
        });
    }
    if system.selector.is_some() || !system.labels.is_empty() {
        let graph = store::load_graph(&mut tx).await?;
        if let Some(path) = graph.cycle_through(&system.id.to_string()) {
            return Err(SystemError::CycleByChange { path });
        }
    }
    let title = format!("Created {} '{}'", system.category, system.title);
    record(
        ctx,
        &mut tx,
        actor,
        &system,
        "system.created",
        title,
        json!({ "after": system }),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(system)
}

/// Applies a patch; records the fields that changed, before and after.
pub async fn update(
    ctx: &Context,
    actor: &Actor,
    slug: &str,
    patch: SystemPatch,
) -> Result<System, SystemError> {
    let mut tx = ctx.db.begin().await?;
    let before = load(&mut tx, slug).await?;
    ensure_local(ctx, &before)?;
    let mut after = before.clone();
    if let Some(v) = patch.slug {
        after.slug = v;
    }
    if let Some(v) = patch.title {
        check_text("title", &v, 1, 200)?;
        after.title = v.trim().to_owned();
    }
    if let Some(v) = patch.category {
        check_category(&mut tx, &v).await?;
        after.category = v;
    }
    if let Some(v) = patch.description {
        check_text("description", &v, 0, MAX_MARKDOWN)?;
        after.description = v;
    }
    if let Some(v) = patch.handbook {
        check_text("handbook", &v, 0, MAX_MARKDOWN)?;
        after.handbook = v;
    }
    if let Some(v) = patch.labels {
        after.labels = v;
    }
    if let Some(v) = patch.links {
        after.links = v;
    }
    if let Some(v) = patch.contacts {
        after.contacts = sorted_contacts(v);
    }
    if let Some(v) = patch.selector {
        after.selector = v;
    }
    validate_lists(&after.links, &after.contacts)?;
    let (changed_before, changed_after) = diff(&before, &after);
    if changed_after.is_empty() {
        return Ok(before);
    }
    if after.labels != before.labels || after.selector != before.selector {
        let mut graph = store::load_graph(&mut tx).await?;
        let id = after.id.to_string();
        if let Some(node) = graph.node_mut(&id) {
            node.labels = after.labels.clone();
            node.selector = after.selector.clone();
        }
        if let Some(path) = graph.cycle_through(&id) {
            return Err(SystemError::CycleByChange { path });
        }
    }
    after.version += 1;
    after.updated_at = ctx.now();
    if let Err(e) = store::update(&mut tx, &after).await {
        return Err(if is_unique_violation(&e) {
            SystemError::SlugTaken(after.slug.to_string())
        } else {
            e.into()
        });
    }
    let fields: Vec<&String> = changed_after.keys().collect();
    let title = format!(
        "Changed {} of '{}'",
        fields
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        after.title
    );
    let data = json!({ "before": changed_before, "after": changed_after });
    record(ctx, &mut tx, actor, &after, "system.updated", title, data).await?;
    ctx.commit(tx).await?;
    Ok(after)
}

type Fields = serde_json::Map<String, serde_json::Value>;

/// The fields that differ between two versions, as (before, after).
fn diff(before: &System, after: &System) -> (Fields, Fields) {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(before), serde_json::to_value(after))
    else {
        return (Fields::new(), Fields::new());
    };
    let mut old = Fields::new();
    let mut new = Fields::new();
    for (k, v) in &b {
        if matches!(k.as_str(), "version" | "updated_at") {
            continue;
        }
        if a.get(k) != Some(v) {
            old.insert(
                k.clone(),
                a.get(k).cloned().unwrap_or(serde_json::Value::Null),
            );
            new.insert(k.clone(), v.clone());
        }
    }
    (old, new)
}

/// Deletes a system. Refused while other systems include it, unless forced,
/// in which case it is excluded from them first (each on their timelines).
/// Its events stay on the record.
pub async fn delete(
    ctx: &Context,
    actor: &Actor,
    slug: &str,
    force: bool,
) -> Result<(), SystemError> {
    let mut tx = ctx.db.begin().await?;
    let system = load(&mut tx, slug).await?;
    ensure_local(ctx, &system)?;
    let id = system.id.to_string();
    // The audit trail is append-only: its system stays, for everyone.
    let instance_system: Option<String> = sqlx::query("SELECT system_id FROM instance")
        .fetch_optional(&mut *tx)
        .await?
        .map(|row| row.try_get("system_id"))
        .transpose()?
        .flatten();
    if instance_system.as_deref() == Some(id.as_str()) {
        return Err(SystemError::InstanceSystem(slug.to_owned()));
    }
    let graph = store::load_graph(&mut tx).await?;
    let includers: Vec<String> = graph
        .parents(&id)
        .into_iter()
        .filter(|(_, via)| *via == Via::Include)
        .map(|(p, _)| p)
        .collect();
    if !includers.is_empty() && !force {
        let by = includers.iter().map(|p| graph.slug(p).to_owned()).collect();
        return Err(SystemError::StillIncluded {
            slug: slug.to_owned(),
            by,
        });
    }
    let parents = store::by_ids(&mut tx, &includers).await?;
    for parent in &parents {
        let title = format!("Excluded '{}' (deleted)", system.slug);
        let data = json!({ "child": system.slug, "child_id": id, "reason": "deleted" });
        record(ctx, &mut tx, actor, parent, "system.excluded", title, data).await?;
    }
    store::mark_deleted(&mut tx, &id, to_micros(ctx.now())).await?;
    let title = format!("Deleted {} '{}'", system.category, system.title);
    record(
        ctx,
        &mut tx,
        actor,
        &system,
        "system.deleted",
        title,
        json!({ "before": system }),
    )
    .await?;
    ctx.commit(tx).await?;
    Ok(())
}

/// Whether an include changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Included {
    Now,
    Already,
}

/// Includes `child` in `parent`; refuses a cycle with the path it would close.
pub async fn include(
    ctx: &Context,
    actor: &Actor,
    parent: &str,
    child: &str,
) -> Result<Included, SystemError> {
    let mut tx = ctx.db.begin().await?;
    let p = load(&mut tx, parent).await?;
    ensure_local(ctx, &p)?;
    let c = load(&mut tx, child).await?;
    let (pid, cid) = (p.id.to_string(), c.id.to_string());
    let graph = store::load_graph(&mut tx).await?;
    if graph.has_edge(&pid, &cid) {
        return Ok(Included::Already);
    }
    if let Some(path) = graph.cycle_if_included(&pid, &cid) {
        return Err(SystemError::Cycle {
            parent: parent.to_owned(),
            child: child.to_owned(),
            path,
        });
    }
    let before = explicit_children(&graph, &pid);
    store::include(&mut tx, &pid, &cid, to_micros(ctx.now())).await?;
    let mut after = before.clone();
    after.push(c.slug.to_string());
    after.sort();
    let title = format!("Included '{}'", c.slug);
    let data = json!({ "child": c.slug, "child_id": cid, "before": { "subsystems": before }, "after": { "subsystems": after } });
    record(ctx, &mut tx, actor, &p, "system.included", title, data).await?;
    ctx.commit(tx).await?;
    Ok(Included::Now)
}

pub async fn exclude(
    ctx: &Context,
    actor: &Actor,
    parent: &str,
    child: &str,
) -> Result<(), SystemError> {
    let mut tx = ctx.db.begin().await?;
    let p = load(&mut tx, parent).await?;
    ensure_local(ctx, &p)?;
    let c = load(&mut tx, child).await?;
    let (pid, cid) = (p.id.to_string(), c.id.to_string());
    let before = explicit_children(&store::load_graph(&mut tx).await?, &pid);
    if !store::exclude(&mut tx, &pid, &cid).await? {
        return Err(SystemError::NotIncluded {
            parent: parent.to_owned(),
            child: child.to_owned(),
        });
    }
    let after: Vec<String> = before
        .iter()
        .filter(|s| **s != c.slug.as_str())
        .cloned()
        .collect();
    let title = format!("Excluded '{}'", c.slug);
    let data = json!({ "child": c.slug, "child_id": cid, "before": { "subsystems": before }, "after": { "subsystems": after } });
    record(ctx, &mut tx, actor, &p, "system.excluded", title, data).await?;
    ctx.commit(tx).await?;
    Ok(())
}

/// Slugs of the systems `id` includes explicitly, sorted.
fn explicit_children(graph: &Graph, id: &str) -> Vec<String> {
    let mut slugs: Vec<String> = graph
        .members(id)
        .into_iter()
        .filter(|(_, via)| *via == Via::Include)
        .map(|(kid, _)| graph.slug(&kid).to_owned())
        .collect();
    slugs.sort();
    slugs
}

pub async fn get(ctx: &Context, slug: &str) -> Result<System, SystemError> {
    let mut conn = ctx.db.reader().acquire().await?;
    store::by_slug(&mut conn, slug)
        .await?
        .ok_or_else(|| SystemError::NotFound(slug.to_owned()))
}

/// A system seen from a neighbour, and how it is connected.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Member {
    #[serde(flatten)]
    pub system: System,
    pub via: Via,
}

/// Direct subsystems (`below = true`) or includers of a system.
pub async fn neighbours(
    ctx: &Context,
    slug: &str,
    below: bool,
    access: &crate::users::access::Access,
) -> Result<Vec<Member>, SystemError> {
    let mut conn = ctx.db.reader().acquire().await?;
    let system = store::by_slug(&mut conn, slug)
        .await?
        .ok_or_else(|| SystemError::NotFound(slug.to_owned()))?;
    let graph = access.view(store::load_graph(&mut conn).await?);
    let id = system.id.to_string();
    let edges = if below {
        graph.members(&id)
    } else {
        graph.parents(&id)
    };
    let ids: Vec<String> = edges.iter().map(|(i, _)| i.clone()).collect();
    let mut systems = store::by_ids(&mut conn, &ids).await?;
    systems.sort_by(|a, b| a.slug.cmp(&b.slug));
    Ok(systems
        .into_iter()
        .filter_map(|s| {
            let via = edges
                .iter()
                .find(|(i, _)| *i == s.id.to_string())
                .map(|(_, v)| *v)?;
            Some(Member { system: s, via })
        })
        .collect())
}

/// Anchors (systems no other system includes), grouped by category. For a
/// caller who sees only part of the estate (`visible`), the anchors are the
/// visible systems that no visible system includes.
pub async fn anchors(
    ctx: &Context,
    visible: Option<&std::collections::HashSet<String>>,
) -> Result<Vec<(CategoryName, Vec<System>)>, SystemError> {
    let mut conn = ctx.db.reader().acquire().await?;
    let graph = store::load_graph(&mut conn).await?;
    let ids: Vec<String> = match visible {
        None => graph
            .ids()
            .filter(|id| graph.is_anchor(id))
            .cloned()
            .collect(),
        Some(set) => set
            .iter()
            .filter(|id| graph.parents(id).iter().all(|(p, _)| !set.contains(p)))
            .cloned()
            .collect(),
    };
    let mut systems = store::by_ids(&mut conn, &ids).await?;
    systems.sort_by(|a, b| (&a.category, &a.slug).cmp(&(&b.category, &b.slug)));
    let mut groups: Vec<(CategoryName, Vec<System>)> = Vec::new();
    for s in systems {
        match groups.last_mut() {
            Some((c, list)) if *c == s.category => list.push(s),
            _ => groups.push((s.category.clone(), vec![s])),
        }
    }
    Ok(groups)
}

/// The ids a system's timeline rolls up: itself and everything below it
/// that `access` may see.
pub async fn closure(
    ctx: &Context,
    slug: &str,
    access: &crate::users::access::Access,
) -> Result<(System, Vec<String>), SystemError> {
    let mut conn = ctx.db.reader().acquire().await?;
    let system = store::by_slug(&mut conn, slug)
        .await?
        .ok_or_else(|| SystemError::NotFound(slug.to_owned()))?;
    let graph: Graph = access.view(store::load_graph(&mut conn).await?);
    let ids = graph.closure(&system.id.to_string());
    Ok((system, ids))
}

pub async fn categories(ctx: &Context) -> Result<Vec<Category>, SystemError> {
    let mut conn = ctx.db.reader().acquire().await?;
    Ok(store::categories(&mut conn).await?)
}

pub async fn create_category(ctx: &Context, new: NewCategory) -> Result<Category, SystemError> {
    check_text("title", &new.title, 1, 200)?;
    check_text("description", &new.description, 0, 2000)?;
    let category = Category {
        name: new.name,
        title: new.title.trim().to_owned(),
        description: new.description,
        builtin: false,
        systems: 0,
    };
    let mut tx = ctx.db.begin().await?;
    if let Err(e) = store::insert_category(&mut tx, &category, to_micros(ctx.now())).await {
        return Err(if is_unique_violation(&e) {
            SystemError::CategoryTaken(category.name.to_string())
        } else {
            e.into()
        });
    }
    tx.commit().await?;
    Ok(category)
}
