//! `/api/v1/…/actions`: definitions, runs, cancel.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::ActionSpec;
use super::runs::{Run, RunRequest};
use super::{store, Action, ActionError};
use crate::context::Context;
use crate::systems::http::{authorize, path_slug, visible};
use crate::users::Role;
use crate::web::{ApiJson, AppState, Caller, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(all_actions))
        .routes(routes!(system_actions, create_action))
        .routes(routes!(show_action, put_action, delete_action))
        .routes(routes!(run_action, recent_runs))
        .routes(routes!(show_run))
        .routes(routes!(cancel_run))
}

impl From<ActionError> for Problem {
    fn from(e: ActionError) -> Problem {
        match e {
            ActionError::UnknownSystem(_)
            | ActionError::NotFound { .. }
            | ActionError::UnknownRun(_) => Problem::not_found(e.to_string()),
            ActionError::Exists(_) => Problem::conflict("action_exists", e.to_string()),
            ActionError::Remote(_) => Problem::conflict("remote_system", e.to_string()),
            ActionError::Invalid(i) => i.into(),
            ActionError::Refused {
                code,
                message,
                details,
            } => {
                let status = match code {
                    "forbidden" | "outside_window" => StatusCode::FORBIDDEN,
                    "invalid_params" => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::CONFLICT,
                };
                let field = details.get("field").cloned();
                let mut p = Problem::new(status, code, message).with("details", details);
                if let Some(f) = field {
                    p = p.with("field", f);
                }
                p
            }
            ActionError::Db(db) => db.into(),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ActionList {
    pub items: Vec<Action>,
}

async fn find(ctx: &Context, slug: &str, name: &str) -> Result<Action, Problem> {
    let mut conn = ctx.db.reader().acquire().await?;
    let (system_id, _) = crate::agents::store::system_by_slug(&mut conn, slug)
        .await?
        .ok_or_else(|| ActionError::UnknownSystem(slug.to_owned()))?;
    Ok(store::action(&mut conn, &system_id, name)
        .await?
        .ok_or_else(|| ActionError::NotFound {
            system: slug.to_owned(),
            name: name.to_owned(),
        })?)
}

/// Every action on the systems the caller may see. Role: viewer.
#[utoipa::path(get, path = "/actions", tag = "actions",
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = ActionList)))]
async fn all_actions(
    State(ctx): State<AppState>,
    Caller(access): Caller,
) -> Result<Json<ActionList>, Problem> {
    let allowed: Option<Vec<String>> = visible(&ctx, &access)
        .await?
        .map(|s| s.into_iter().collect());
    let mut conn = ctx.db.reader().acquire().await?;
    Ok(Json(ActionList {
        items: store::actions(&mut conn, allowed.as_deref()).await?,
    }))
}

/// The actions of a system. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/actions", tag = "actions", params(("slug" = String, Path)),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = ActionList), (status = 404, body = crate::web::ProblemBody)))]
async fn system_actions(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
) -> Result<Json<ActionList>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let (id, _) = crate::agents::store::system_by_slug(&mut conn, slug.as_str())
        .await?
        .ok_or_else(|| ActionError::UnknownSystem(slug.to_string()))?;
    Ok(Json(ActionList {
        items: store::actions(&mut conn, Some(&[id])).await?,
    }))
}

/// Define an action on a system. Role: admin on the system.
#[utoipa::path(post, path = "/systems/{slug}/actions", tag = "actions", params(("slug" = String, Path)), request_body = ActionSpec,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 201, body = Action), (status = 409, body = crate::web::ProblemBody), (status = 422, body = crate::web::ProblemBody)))]
async fn create_action(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
    ApiJson(spec): ApiJson<ActionSpec>,
) -> Result<(StatusCode, Json<Action>), Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Admin).await?;
    let (action, _) = super::save(&ctx, &access.actor(), slug.as_str(), spec, false).await?;
    Ok((StatusCode::CREATED, Json(action)))
}

/// One action. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/actions/{name}", tag = "actions",
    params(("slug" = String, Path), ("name" = String, Path)),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = Action), (status = 404, body = crate::web::ProblemBody)))]
async fn show_action(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path((slug, name)): Path<(String, String)>,
) -> Result<Json<Action>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    Ok(Json(find(&ctx, slug.as_str(), &name).await?))
}

/// Create or replace an action by name. Role: admin on the system.
#[utoipa::path(put, path = "/systems/{slug}/actions/{name}", tag = "actions",
    params(("slug" = String, Path), ("name" = String, Path)), request_body = ActionSpec,
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 200, body = Action), (status = 201, body = Action), (status = 422, body = crate::web::ProblemBody)))]
async fn put_action(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path((slug, name)): Path<(String, String)>,
    ApiJson(spec): ApiJson<ActionSpec>,
) -> Result<(StatusCode, Json<Action>), Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Admin).await?;
    if spec.name != name {
        return Err(Problem::unprocessable(format!(
            "the body names action '{}' but the path '{name}'",
            spec.name
        ))
        .with("field", "name".into()));
    }
    let (action, created) = super::save(&ctx, &access.actor(), slug.as_str(), spec, true).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(action)))
}

/// Remove an action (its runs stay on record). Role: admin on the system.
#[utoipa::path(delete, path = "/systems/{slug}/actions/{name}", tag = "actions",
    params(("slug" = String, Path), ("name" = String, Path)),
    extensions(("x-aramaki-role" = json!("admin"))), security(("token" = [])),
    responses((status = 204), (status = 404, body = crate::web::ProblemBody)))]
async fn delete_action(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path((slug, name)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Admin).await?;
    super::delete(&ctx, &access.actor(), slug.as_str(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Run an action on its targets. Role: the action's role (default
/// operator) on the system; refusals (role, parameters, window,
/// concurrency) are problems with a `code` and are recorded on the
/// timeline; `confirm` answers code `confirm`.
#[utoipa::path(post, path = "/systems/{slug}/actions/{name}/runs", tag = "actions",
    params(("slug" = String, Path), ("name" = String, Path)), request_body = RunRequest,
    extensions(("x-aramaki-role" = json!("operator"))), security(("token" = [])),
    responses((status = 202, body = Run), (status = 403, body = crate::web::ProblemBody),
        (status = 409, body = crate::web::ProblemBody), (status = 422, body = crate::web::ProblemBody)))]
async fn run_action(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path((slug, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<RunRequest>,
) -> Result<(StatusCode, Json<Run>), Problem> {
    let slug = path_slug(&slug)?;
    crate::systems::http::authorize_for(&ctx, &access, slug.as_str(), Role::Viewer, "action.run")
        .await?;
    let action = find(&ctx, slug.as_str(), &name).await?;
    let run = super::runs::start(&ctx, &access, &action, req).await?;
    Ok((StatusCode::ACCEPTED, Json(run)))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    pub items: Vec<Run>,
}

/// The last 20 runs of an action. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/actions/{name}/runs", tag = "actions",
    params(("slug" = String, Path), ("name" = String, Path)),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = RunList)))]
async fn recent_runs(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path((slug, name)): Path<(String, String)>,
) -> Result<Json<RunList>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    let action = find(&ctx, slug.as_str(), &name).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    let items = store::runs_of(&mut conn, &action.id, 20).await?;
    Ok(Json(RunList {
        items: items
            .into_iter()
            .map(|run| run.seen_by(&access, &graph))
            .collect(),
    }))
}

/// One run with each target's state and output. Role: viewer of its system.
#[utoipa::path(get, path = "/actions/runs/{id}", tag = "actions", params(("id" = String, Path)),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = Run), (status = 404, body = crate::web::ProblemBody)))]
async fn show_run(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(id): Path<String>,
) -> Result<Json<Run>, Problem> {
    let mut conn = ctx.db.reader().acquire().await?;
    let run = store::run(&mut conn, &id)
        .await?
        .ok_or_else(|| ActionError::UnknownRun(id.clone()))?;
    drop(conn);
    crate::systems::http::authorize_id(&ctx, &access, &run.system_id, Role::Viewer, "run.read")
        .await
        .map_err(|_| Problem::from(ActionError::UnknownRun(id)))?;
    let mut conn = ctx.db.reader().acquire().await?;
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    Ok(Json(run.seen_by(&access, &graph)))
}

/// Cancel a run: its agents kill the process groups; the canceller is
/// recorded (`cancelled_by`, an `action.cancelled` event). A run that no
/// longer runs answers 409 `not_running`. Role: operator.
#[utoipa::path(post, path = "/actions/runs/{id}/cancel", tag = "actions", params(("id" = String, Path)),
    extensions(("x-aramaki-role" = json!("operator"))), security(("token" = [])),
    responses((status = 202, body = Run), (status = 404, body = crate::web::ProblemBody),
        (status = 409, body = crate::web::ProblemBody)))]
async fn cancel_run(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Run>), Problem> {
    let run = super::runs::cancel(&ctx, &access, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(run)))
}
