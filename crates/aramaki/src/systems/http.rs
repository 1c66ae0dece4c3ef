//! `/api/v1` routes for systems, their structure, status and categories.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{LabelSelector, Slug};
use super::status::Status;
use super::{Category, Included, Member, NewCategory, NewSystem, System, SystemError, SystemPatch};
use crate::context::Context;
use crate::users::access::Access;
use crate::users::Role;
use crate::web::{
    forbidden, needs_token, ApiJson, ApiQuery, AppState, Caller, InstanceAdmin, Problem,
};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_systems, create_system))
        .routes(routes!(get_system, update_system, delete_system))
        .routes(routes!(list_subsystems, include_subsystem))
        .routes(routes!(exclude_subsystem))
        .routes(routes!(list_includers))
        .routes(routes!(get_status))
        .routes(routes!(list_anchors))
        .routes(routes!(list_categories, create_category))
}

impl From<SystemError> for Problem {
    fn from(e: SystemError) -> Problem {
        let detail = e.to_string();
        match e {
            SystemError::NotFound(_) => Problem::not_found(detail),
            SystemError::SlugTaken(_) => Problem::conflict("slug_taken", detail),
            SystemError::Remote(_) => Problem::conflict("remote_system", detail),
            SystemError::InstanceSystem(_) => Problem::conflict("instance_system", detail),
            SystemError::CategoryTaken(_) => Problem::conflict("category_taken", detail),
            SystemError::UnknownCategory(_) => {
                Problem::unprocessable(detail).with("field", "category".into())
            }
            SystemError::Cycle { path, .. } | SystemError::CycleByChange { path } => {
                Problem::conflict("cycle", detail).with("path", serde_json::json!(path))
            }
            SystemError::NotIncluded { .. } => Problem::not_found(detail),
            SystemError::StillIncluded { by, .. } => Problem::conflict("still_included", detail)
                .with("included_by", serde_json::json!(by)),
            SystemError::Invalid(invalid) => invalid.into(),
            SystemError::Db(db) => Problem::internal(&db),
        }
    }
}

/// Checks that the caller holds `needed` on the system `slug`. A system the
/// caller may not see at all is reported as not found, like one that does
/// not exist, so that slugs do not leak.
pub async fn authorize(
    ctx: &Context,
    access: &Access,
    slug: &str,
    needed: Role,
) -> Result<(), Problem> {
    let kind = match needed {
        Role::Viewer => "system.read",
        Role::Operator => "system.operate",
        Role::Admin => "system.change",
    };
    authorize_for(ctx, access, slug, needed, kind).await
}

/// Like [`authorize`], naming what was attempted (`kind`) for the record:
/// every refusal — of a system out of sight, missing, or with too low a
/// role — is counted on the instance's audit trail (`users::refusals`),
/// the same way whether or not the system exists.
pub async fn authorize_for(
    ctx: &Context,
    access: &Access,
    slug: &str,
    needed: Role,
    kind: &str,
) -> Result<(), Problem> {
    if access.everywhere(needed) {
        return Ok(());
    }
    let mut conn = ctx.db.reader().acquire().await?;
    let id = super::store::ids_by_slugs(&mut conn, &[slug.to_owned()])
        .await?
        .remove(slug);
    let graph = super::store::load_graph(&mut conn).await?;
    drop(conn);
    let refused = match id.and_then(|id| access.role_on(&graph, &id)) {
        None => Err(SystemError::NotFound(slug.to_owned()).into()),
        Some(_) if access.principal().is_none() => Err(needs_token()),
        Some(role) if role < needed => Err(forbidden(format!(
            "this needs the {needed} role on '{slug}'"
        ))),
        Some(_) => return Ok(()),
    };
    crate::users::refusals::record(ctx, access, kind, slug).await;
    refused
}

/// Like [`authorize_for`], for the live system with this id: for what
/// belongs to one system for good (an event, a run), since a slug names
/// whichever live system holds it now (a deleted system's slug can be taken
/// by another). A deleted or unknown system is refused like one out of
/// sight. Refusals are recorded under the id.
pub async fn authorize_id(
    ctx: &Context,
    access: &Access,
    system_id: &str,
    needed: Role,
    kind: &str,
) -> Result<(), Problem> {
    if access.everywhere(needed) {
        return Ok(());
    }
    let mut conn = ctx.db.reader().acquire().await?;
    let graph = super::store::load_graph(&mut conn).await?;
    drop(conn);
    let refused = match graph
        .node(system_id)
        .and_then(|_| access.role_on(&graph, system_id))
    {
        None => Err(SystemError::NotFound(system_id.to_owned()).into()),
        Some(_) if access.principal().is_none() => Err(needs_token()),
        Some(role) if role < needed => Err(forbidden(format!(
            "this needs the {needed} role on this system"
        ))),
        Some(_) => return Ok(()),
    };
    crate::users::refusals::record(ctx, access, kind, system_id).await;
    refused
}

/// A cycle refused for a caller who sees only part of the estate names the
/// systems out of their sight as `…`: the refusal stands (the structure is
/// one), but it must not tell them what lies beyond their grants.
pub async fn masked(ctx: &Context, access: &Access, e: SystemError) -> SystemError {
    let hide = |path: Vec<String>, seen: &std::collections::HashSet<String>| {
        path.into_iter()
            .map(|s| {
                if seen.contains(&s) {
                    s
                } else {
                    "…".to_owned()
                }
            })
            .collect::<Vec<_>>()
    };
    if access.everywhere(Role::Viewer) {
        return e;
    }
    let seen = async {
        let mut conn = ctx.db.reader().acquire().await?;
        let graph = super::store::load_graph(&mut conn).await?;
        let ids = access.visible(&graph).unwrap_or_default();
        Ok::<_, sqlx::Error>(
            ids.iter()
                .map(|id| graph.slug(id).to_owned())
                .collect::<std::collections::HashSet<String>>(),
        )
    };
    match e {
        SystemError::CycleByChange { path } => match seen.await {
            Ok(seen) => SystemError::CycleByChange {
                path: hide(path, &seen),
            },
            Err(db) => SystemError::Db(db),
        },
        SystemError::Cycle {
            parent,
            child,
            path,
        } => match seen.await {
            Ok(seen) => SystemError::Cycle {
                parent,
                child,
                path: hide(path, &seen),
            },
            Err(db) => SystemError::Db(db),
        },
        other => other,
    }
}

/// The ids of the systems the caller may see, or `None` for all.
pub async fn visible(
    ctx: &Context,
    access: &Access,
) -> Result<Option<std::collections::HashSet<String>>, Problem> {
    if access.everywhere(Role::Viewer) {
        return Ok(None);
    }
    let mut conn = ctx.db.reader().acquire().await?;
    let graph = super::store::load_graph(&mut conn).await?;
    Ok(access.visible(&graph))
}

/// Parses a slug from the path, or answers 400 naming the problem.
pub fn path_slug(raw: &str) -> Result<Slug, Problem> {
    Slug::try_from(raw).map_err(|e| Problem::bad_request(format!("invalid slug in path: {e}")))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SystemPage {
    pub items: Vec<System>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MemberList {
    pub items: Vec<Member>,
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only systems of this category.
    category: Option<String>,
    /// A label selector: `role=storage,dc=dc1`, `tier`, `!retired`, `env!=prod`.
    label: Option<String>,
    /// Text to find in slug, title, description or labels.
    q: Option<String>,
    /// From the previous page's `next`.
    cursor: Option<String>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<i64>,
}

/// List systems. Role: viewer.
#[utoipa::path(get, path = "/systems", tag = "systems", params(ListQuery),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = SystemPage), (status = 400, body = crate::web::ProblemBody)))]
async fn list_systems(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<SystemPage>, Problem> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 500"));
    }
    let labels = q
        .label
        .as_deref()
        .map(LabelSelector::try_from)
        .transpose()
        .map_err(|e| Problem::bad_request(format!("invalid label selector: {e}")))?;
    let after_slug = q
        .cursor
        .as_deref()
        .map(|c| path_slug(c).map_err(|_| Problem::bad_request(format!("invalid cursor '{c}'"))))
        .transpose()?;
    let filter = super::store::ListFilter {
        category: q.category,
        labels,
        text: q.q.filter(|t| !t.trim().is_empty()),
        after_slug: after_slug.map(String::from),
        only_ids: visible(&ctx, &access)
            .await?
            .map(|set| set.into_iter().collect()),
    };
    let mut conn = ctx.db.reader().acquire().await?;
    let mut items = super::store::list(&mut conn, &filter, limit + 1).await?;
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|s| s.slug.to_string())
    } else {
        None
    };
    Ok(Json(SystemPage { items, next }))
}

/// Create a system. Role: admin.
#[utoipa::path(post, path = "/systems", tag = "systems", request_body = NewSystem,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = System), (status = 409, body = crate::web::ProblemBody),
              (status = 422, body = crate::web::ProblemBody)))]
async fn create_system(
    State(ctx): State<AppState>,
    InstanceAdmin(p): InstanceAdmin,
    ApiJson(new): ApiJson<NewSystem>,
) -> Result<(StatusCode, Json<System>), Problem> {
    let system = super::create(&ctx, &p.actor(), new).await?;
    Ok((StatusCode::CREATED, Json(system)))
}

/// Read a system. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}", tag = "systems", params(("slug" = String, Path, description = "the system's slug")),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = System), (status = 404, body = crate::web::ProblemBody)))]
async fn get_system(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
) -> Result<Json<System>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    Ok(Json(super::get(&ctx, slug.as_str()).await?))
}

/// Change a system: only the fields given change. Role: admin.
#[utoipa::path(patch, path = "/systems/{slug}", tag = "systems", request_body = SystemPatch, params(("slug" = String, Path, description = "the system's slug")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = System), (status = 404, body = crate::web::ProblemBody),
              (status = 409, body = crate::web::ProblemBody), (status = 422, body = crate::web::ProblemBody)))]
async fn update_system(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
    ApiJson(patch): ApiJson<SystemPatch>,
) -> Result<Json<System>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Admin).await?;
    match super::update(&ctx, &access.actor(), slug.as_str(), patch).await {
        Ok(system) => Ok(Json(system)),
        Err(e) => Err(masked(&ctx, &access, e).await.into()),
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Exclude the system from every system that includes it, then delete.
    #[serde(default)]
    force: bool,
}

/// Delete a system; refused while included somewhere unless `force`. Role: admin.
#[utoipa::path(delete, path = "/systems/{slug}", tag = "systems", params(("slug" = String, Path, description = "the system's slug"), DeleteQuery),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody), (status = 409, body = crate::web::ProblemBody)))]
async fn delete_system(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Admin).await?;
    super::delete(&ctx, &access.actor(), slug.as_str(), q.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Direct subsystems: included ones and selector matches. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/subsystems", tag = "systems", params(("slug" = String, Path, description = "the system's slug")),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = MemberList), (status = 404, body = crate::web::ProblemBody)))]
async fn list_subsystems(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
) -> Result<Json<MemberList>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    let items = super::neighbours(&ctx, slug.as_str(), true, &access).await?;
    Ok(Json(MemberList { items, next: None }))
}

/// The systems that include this one. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/includers", tag = "systems", params(("slug" = String, Path, description = "the system's slug")),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = MemberList), (status = 404, body = crate::web::ProblemBody)))]
async fn list_includers(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
) -> Result<Json<MemberList>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    let mut items = super::neighbours(&ctx, slug.as_str(), false, &access).await?;
    if let Some(visible) = visible(&ctx, &access).await? {
        items.retain(|m| visible.contains(&m.system.id.to_string()));
    }
    Ok(Json(MemberList { items, next: None }))
}

/// The body of `POST /api/v1/systems/{slug}/subsystems`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IncludeRequest {
    /// Slug of the system to include.
    pub slug: Slug,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IncludeResult {
    pub parent: String,
    pub child: String,
    /// False if it was included already (nothing changed).
    pub created: bool,
}

/// Include a subsystem; a cycle is refused with its path. Role: admin on both.
#[utoipa::path(post, path = "/systems/{slug}/subsystems", tag = "systems", request_body = IncludeRequest, params(("slug" = String, Path, description = "the system's slug")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = IncludeResult), (status = 200, body = IncludeResult),
              (status = 404, body = crate::web::ProblemBody), (status = 409, body = crate::web::ProblemBody)))]
async fn include_subsystem(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
    ApiJson(req): ApiJson<IncludeRequest>,
) -> Result<Response, Problem> {
    let parent = path_slug(&slug)?;
    authorize(&ctx, &access, parent.as_str(), Role::Admin).await?;
    // Including extends the parent's grants to the child: only someone who
    // administers both may do it, or a grant would grow by itself.
    authorize(&ctx, &access, req.slug.as_str(), Role::Admin).await?;
    let outcome =
        match super::include(&ctx, &access.actor(), parent.as_str(), req.slug.as_str()).await {
            Ok(outcome) => outcome,
            Err(e) => return Err(masked(&ctx, &access, e).await.into()),
        };
    let created = outcome == Included::Now;
    let body = IncludeResult {
        parent: parent.to_string(),
        child: req.slug.to_string(),
        created,
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(body)).into_response())
}

/// Exclude a subsystem. Role: admin.
#[utoipa::path(delete, path = "/systems/{slug}/subsystems/{child}", tag = "systems",
    params(("slug" = String, Path, description = "the system's slug"), ("child" = String, Path, description = "the included system's slug")),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody)))]
async fn exclude_subsystem(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path((slug, child)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let parent = path_slug(&slug)?;
    let child = path_slug(&child)?;
    authorize(&ctx, &access, parent.as_str(), Role::Admin).await?;
    // A child out of the caller's sight is answered like a missing one, so
    // that exclude cannot probe which slugs exist.
    authorize_for(
        &ctx,
        &access,
        child.as_str(),
        Role::Viewer,
        "system.exclude",
    )
    .await
    .map_err(|_| Problem::not_found(not_a_subsystem(parent.as_str(), child.as_str())))?;
    super::exclude(&ctx, &access.actor(), parent.as_str(), child.as_str()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What exclude answers for a child the caller may not see, whether or not
/// it exists.
pub fn not_a_subsystem(parent: &str, child: &str) -> String {
    format!("no subsystem '{child}' of '{parent}' (not found or not included)")
}

/// The system's own state and, recursively, each layer below it. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/status", tag = "systems", params(("slug" = String, Path, description = "the system's slug")),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = Status), (status = 404, body = crate::web::ProblemBody)))]
async fn get_status(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
) -> Result<Json<Status>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    Ok(Json(
        super::status::status(&ctx, slug.as_str(), &access).await?,
    ))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnchorGroup {
    pub category: String,
    pub systems: Vec<System>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnchorList {
    pub items: Vec<AnchorGroup>,
    pub next: Option<String>,
}

/// Anchors: systems that no other system includes, grouped by category. Role: viewer.
#[utoipa::path(get, path = "/anchors", tag = "systems",
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = AnchorList)))]
async fn list_anchors(
    State(ctx): State<AppState>,
    Caller(access): Caller,
) -> Result<Json<AnchorList>, Problem> {
    let visible = visible(&ctx, &access).await?;
    let items = super::anchors(&ctx, visible.as_ref())
        .await?
        .into_iter()
        .map(|(c, systems)| AnchorGroup {
            category: c.to_string(),
            systems,
        })
        .collect();
    Ok(Json(AnchorList { items, next: None }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CategoryList {
    pub items: Vec<Category>,
    pub next: Option<String>,
}

/// List categories. Role: viewer.
#[utoipa::path(get, path = "/categories", tag = "systems",
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = CategoryList)))]
async fn list_categories(
    State(ctx): State<AppState>,
    _: Caller,
) -> Result<Json<CategoryList>, Problem> {
    Ok(Json(CategoryList {
        items: super::categories(&ctx).await?,
        next: None,
    }))
}

/// Add a category. Role: admin.
#[utoipa::path(post, path = "/categories", tag = "systems", request_body = NewCategory,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = Category), (status = 409, body = crate::web::ProblemBody)))]
async fn create_category(
    State(ctx): State<AppState>,
    _: InstanceAdmin,
    ApiJson(new): ApiJson<NewCategory>,
) -> Result<(StatusCode, Json<Category>), Problem> {
    Ok((
        StatusCode::CREATED,
        Json(super::create_category(&ctx, new).await?),
    ))
}
