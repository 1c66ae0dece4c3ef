//! `/api/v1/checks` and observations.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::checks::CheckSpec;
use super::{store, Check, MonitoringError, Observation, Sample};
use crate::systems::http::{authorize, path_slug, visible};
use crate::users::Role;
use crate::web::{ApiJson, ApiQuery, AppState, Caller, InstanceAdmin, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_checks, create_check))
        .routes(routes!(show_check, put_check, delete_check))
        .routes(routes!(list_observations))
        .routes(routes!(system_observations))
        .routes(routes!(check_history))
}

impl From<MonitoringError> for Problem {
    fn from(e: MonitoringError) -> Problem {
        match e {
            MonitoringError::NotFound(_) => Problem::not_found(e.to_string()),
            MonitoringError::Exists(_) => Problem::conflict("check_exists", e.to_string()),
            MonitoringError::UnknownSystem(_) => {
                Problem::unprocessable(e.to_string()).with("field", "system".into())
            }
            MonitoringError::Remote(_) => {
                Problem::conflict("remote_system", e.to_string()).with("field", "system".into())
            }
            MonitoringError::Invalid(i) => i.into(),
            MonitoringError::Db(db) => db.into(),
            MonitoringError::Audit(_) => Problem::internal(&e),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckList {
    pub items: Vec<Check>,
}

impl Check {
    /// The check as it may be shown: secrets only as `(set)`.
    pub fn redacted(mut self) -> Check {
        self.spec = self.spec.redacted();
        self
    }
}

/// The checks `access` may read: all for an instance-wide viewer; for
/// others, those concerning a system they may see. A check concerns the
/// system its results belong to (`system`), or else every system it runs
/// on: one named by a `system:<slug>` subscription, or the system of an
/// agent whose subscriptions meet it.
async fn readable(
    ctx: &crate::context::Context,
    access: &crate::users::access::Access,
    checks: Vec<Check>,
) -> Result<Vec<Check>, Problem> {
    let Some(visible) = visible(ctx, access).await? else {
        return Ok(checks);
    };
    let mut conn = ctx.db.reader().acquire().await?;
    let agents = crate::agents::store::agents(&mut conn).await?;
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    let seen_slugs: std::collections::HashSet<&str> =
        visible.iter().map(|id| graph.slug(id)).collect();
    let concerns_visible = |c: &Check| match &c.spec.system {
        Some(slug) => seen_slugs.contains(slug.as_str()),
        None => {
            c.spec.subscriptions.iter().any(|s| {
                s.strip_prefix("system:")
                    .is_some_and(|slug| seen_slugs.contains(slug))
            }) || agents.iter().any(|a| {
                !a.revoked
                    && visible.contains(&a.system_id)
                    && super::agent_subscriptions(a)
                        .iter()
                        .any(|s| c.spec.subscriptions.contains(s))
            })
        }
    };
    Ok(checks.into_iter().filter(concerns_visible).collect())
}

/// The check definitions concerning systems the caller may see, secrets
/// shown only as `(set)`. Role: viewer (of a system the check concerns).
#[utoipa::path(get, path = "/checks", tag = "monitoring",
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = CheckList), (status = 401, body = crate::web::ProblemBody)))]
async fn list_checks(
    State(ctx): State<AppState>,
    Caller(access): Caller,
) -> Result<Json<CheckList>, Problem> {
    if !access.everywhere(Role::Viewer) && !access.has_grants() {
        return Err(crate::web::forbidden("this needs the viewer role".into()));
    }
    let mut conn = ctx.db.reader().acquire().await?;
    let all = store::checks(&mut conn).await?;
    drop(conn);
    let items = readable(&ctx, &access, all).await?;
    Ok(Json(CheckList {
        items: items.into_iter().map(Check::redacted).collect(),
    }))
}

/// Define a check; connected agents receive it at once. Role: instance admin
/// (checks run commands on hosts).
#[utoipa::path(post, path = "/checks", tag = "monitoring", request_body = CheckSpec,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = Check), (status = 409, body = crate::web::ProblemBody),
        (status = 422, body = crate::web::ProblemBody)))]
async fn create_check(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    ApiJson(spec): ApiJson<CheckSpec>,
) -> Result<(StatusCode, Json<Check>), Problem> {
    let (check, _) = super::save_check(&ctx, &admin.actor(), spec, false).await?;
    Ok((StatusCode::CREATED, Json(check.redacted())))
}

/// One check definition, secrets shown only as `(set)`; a check that
/// concerns no system the caller may see is not found. Role: viewer (of a
/// system the check concerns).
#[utoipa::path(get, path = "/checks/{name}", tag = "monitoring",
    params(("name" = String, Path)),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = Check), (status = 404, body = crate::web::ProblemBody)))]
async fn show_check(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(name): Path<String>,
) -> Result<Json<Check>, Problem> {
    if !access.everywhere(Role::Viewer) && !access.has_grants() {
        return Err(crate::web::forbidden("this needs the viewer role".into()));
    }
    let mut conn = ctx.db.reader().acquire().await?;
    let check = store::check(&mut conn, &name).await?;
    drop(conn);
    let check = readable(&ctx, &access, check.into_iter().collect())
        .await?
        .pop()
        .ok_or(MonitoringError::NotFound(name))?;
    Ok(Json(check.redacted()))
}

/// Create or replace a check by name. Role: instance admin.
#[utoipa::path(put, path = "/checks/{name}", tag = "monitoring", request_body = CheckSpec,
    params(("name" = String, Path)),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = Check), (status = 201, body = Check),
        (status = 422, body = crate::web::ProblemBody)))]
async fn put_check(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    Path(name): Path<String>,
    ApiJson(spec): ApiJson<CheckSpec>,
) -> Result<(StatusCode, Json<Check>), Problem> {
    if spec.name != name {
        return Err(Problem::unprocessable(format!(
            "the body names check '{}' but the path '{name}'",
            spec.name
        ))
        .with("field", "name".into()));
    }
    let (check, created) = super::save_check(&ctx, &admin.actor(), spec, true).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(check.redacted())))
}

/// Delete a check; agents stop running it at once. Its observations and
/// history stay. Role: instance admin.
#[utoipa::path(delete, path = "/checks/{name}", tag = "monitoring",
    params(("name" = String, Path)),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody)))]
async fn delete_check(
    State(ctx): State<AppState>,
    InstanceAdmin(admin): InstanceAdmin,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    super::delete_check(&ctx, &admin.actor(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ObservationList {
    pub items: Vec<Observation>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ObservationQuery {
    /// Only results in this state: ok, warning, critical, unknown.
    pub state: Option<String>,
}

/// The latest result of every check on every system the caller may see.
/// Role: viewer (of each system listed).
#[utoipa::path(get, path = "/observations", tag = "monitoring", params(ObservationQuery),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = ObservationList)))]
async fn list_observations(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    ApiQuery(q): ApiQuery<ObservationQuery>,
) -> Result<Json<ObservationList>, Problem> {
    if let Some(s) = &q.state {
        if !["ok", "warning", "critical", "unknown"].contains(&s.as_str()) {
            return Err(Problem::bad_request(format!(
                "state '{s}' must be ok, warning, critical or unknown"
            )));
        }
    }
    let allowed = visible(&ctx, &access).await?;
    let ids: Option<Vec<String>> = allowed.map(|set| set.into_iter().collect());
    let mut conn = ctx.db.reader().acquire().await?;
    let mut items = store::observations(&mut conn, ids.as_deref()).await?;
    if let Some(s) = &q.state {
        items.retain(|o| &o.state == s);
    }
    Ok(Json(ObservationList { items }))
}

/// The latest results on one system. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/observations", tag = "monitoring",
    params(("slug" = String, Path)),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = ObservationList), (status = 404, body = crate::web::ProblemBody)))]
async fn system_observations(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
) -> Result<Json<ObservationList>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let (id, _) = crate::agents::store::system_by_slug(&mut conn, slug.as_str())
        .await?
        .ok_or_else(|| Problem::not_found(format!("no system '{slug}'")))?;
    let items = store::observations(&mut conn, Some(&[id])).await?;
    Ok(Json(ObservationList { items }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Only results with exactly these labels, as `k=v,k2=v2`.
    pub labels: Option<String>,
    /// Only results executed before this time (RFC 3339), for paging.
    pub before: Option<String>,
    /// At most this many (1 to 1000, default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    pub items: Vec<Sample>,
    /// Pass as `before` for the next page; null on the last page.
    pub next: Option<String>,
}

/// Every result of a check on a system, newest first, kept for the
/// configured retention. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/observations/{check}/history", tag = "monitoring",
    params(("slug" = String, Path), ("check" = String, Path), HistoryQuery),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = History), (status = 400, body = crate::web::ProblemBody)))]
async fn check_history(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path((slug, check)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> Result<Json<History>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 1000"));
    }
    let before = q
        .before
        .as_deref()
        .map(|b| {
            b.parse::<jiff::Timestamp>().map_err(|e| {
                Problem::bad_request(format!("before '{b}' is not an RFC 3339 time: {e}"))
            })
        })
        .transpose()?;
    let labels_key = q
        .labels
        .as_deref()
        .map(|l| {
            let mut map = BTreeMap::new();
            for pair in l.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    Problem::bad_request(format!("label '{pair}' must be key=value"))
                })?;
                map.insert(k.to_owned(), v.to_owned());
            }
            serde_json::to_string(&map).map_err(|e| Problem::internal(&e))
        })
        .transpose()?;
    let mut conn = ctx.db.reader().acquire().await?;
    let (id, _) = crate::agents::store::system_by_slug(&mut conn, slug.as_str())
        .await?
        .ok_or_else(|| Problem::not_found(format!("no system '{slug}'")))?;
    let items = store::history(
        &mut conn,
        &id,
        &check,
        labels_key.as_deref(),
        before.map(crate::db::to_micros),
        limit,
    )
    .await?;
    let next = (items.len() as i64 == limit)
        .then(|| items.last().map(|s| s.executed_at.to_string()))
        .flatten();
    Ok(Json(History { items, next }))
}
