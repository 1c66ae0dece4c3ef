//! HTTP plumbing shared by every domain: problem responses, extractors that
//! turn bad input into 4xx problems, role extractors, router assembly,
//! request metrics, health, metrics and the OpenAPI document.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::context::Context;
use crate::users::access::Access;
use crate::users::{Principal, Role};

pub type AppState = Arc<Context>;

/// An RFC 9457 problem: what went wrong, in words that name the problem.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The body of an `application/problem+json` response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Machine-readable problem code, such as `cycle` or `not_found`.
    pub code: String,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            code,
            detail: detail.into(),
            extra: serde_json::Map::new(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad_request", detail)
    }

    pub fn unprocessable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn with(mut self, key: &str, value: serde_json::Value) -> Problem {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// A failure that is ours, not the caller's: logged in full, reported
    /// without internals.
    pub fn internal(error: &dyn std::fmt::Display) -> Problem {
        tracing::error!(error = %error, "internal error");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred; it has been logged",
        )
    }
}

impl From<sqlx::Error> for Problem {
    fn from(e: sqlx::Error) -> Problem {
        Problem::internal(&e)
    }
}

impl From<crate::systems::model::Invalid> for Problem {
    fn from(e: crate::systems::model::Invalid) -> Problem {
        Problem::unprocessable(e.to_string()).with("field", serde_json::Value::String(e.field))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = serde_json::Map::new();
        body.insert("type".into(), "about:blank".into());
        body.insert(
            "title".into(),
            self.status.canonical_reason().unwrap_or("Error").into(),
        );
        body.insert("status".into(), self.status.as_u16().into());
        body.insert("detail".into(), self.detail.into());
        body.insert("code".into(), self.code.into());
        for (k, v) in self.extra {
            body.insert(k, v);
        }
        let mut response = (self.status, Json(serde_json::Value::Object(body))).into_response();
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"aramaki\""),
            );
        }
        response
    }
}

/// JSON body extractor whose rejections are problems naming what is wrong.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Parsed to a value first, then read strictly: an object at the top,
        // no NUL anywhere, no array in place of a struct (crate::input).
        let value = match Json::<serde_json::Value>::from_request(req, state).await {
            Ok(Json(v)) => v,
            Err(rejection) => return Err(json_problem(rejection)),
        };
        crate::input::from_value(value).map(ApiJson).map_err(|e| {
            let field = e.field().to_owned();
            let problem = Problem::unprocessable(format!("invalid request body: {e}"));
            if field.is_empty() {
                problem
            } else {
                problem.with("field", field.into())
            }
        })
    }
}

fn json_problem(rejection: JsonRejection) -> Problem {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected a request body with Content-Type: application/json",
        ),
        JsonRejection::JsonSyntaxError(e) => {
            Problem::bad_request(format!("malformed JSON: {}", e.body_text()))
        }
        JsonRejection::JsonDataError(e) => Problem::unprocessable(format!(
            "invalid request body: {}",
            e.body_text()
                .trim_start_matches("Failed to deserialize the JSON body into the target type: ")
        )),
        JsonRejection::BytesRejection(e) if timed_out(&e) => body_timeout(),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is larger than the configured limit (api.body_limit)",
            )
        }
        other => Problem::new(other.status(), "bad_request", other.body_text()),
    }
}

/// Query-string extractor whose rejections are problems.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                Err(Problem::bad_request(format!(
                    "invalid query string: {}",
                    e.body_text()
                        .trim_start_matches("Failed to deserialize query string: ")
                )))
            }
            Err(other) => Err(Problem::bad_request(other.body_text())),
        }
    }
}

/// Refuses U+0000 in a path parameter, a query parameter or a form field,
/// and invalid UTF-8 in the latter two, before any handler sees it (JSON bodies are checked by [`ApiJson`]):
/// PostgreSQL cannot store it and SQLite would, so both refuse it here.
async fn refuse_nul(State(ctx): State<AppState>, req: Request, next: Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    if req.uri().path().contains("%00") {
        let name = path_parameter_with_nul(&req);
        let e = crate::input::EncodedError::Nul(name);
        return nul_refused(api, StatusCode::BAD_REQUEST, "path parameter", &e);
    }
    if let Some(Err(e)) = req
        .uri()
        .query()
        .map(|q| crate::input::check_encoded(q.as_bytes()))
    {
        return nul_refused(api, StatusCode::BAD_REQUEST, "query parameter", &e);
    }
    let form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            // Media types are case-insensitive, and so is axum's Form.
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !form {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, ctx.config.api.body_limit).await {
        Ok(bytes) => bytes,
        Err(e) => return body_problem(&e).into_response(),
    };
    if let Err(e) = crate::input::check_encoded(&bytes) {
        return nul_refused(api, StatusCode::UNPROCESSABLE_ENTITY, "form field", &e);
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// The name of the route's `{parameter}` whose segment holds `%00`.
fn path_parameter_with_nul(req: &Request) -> String {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_default();
    let at = req
        .uri()
        .path()
        .split('/')
        .position(|segment| segment.contains("%00"));
    at.and_then(|i| template.split('/').nth(i))
        .and_then(|s| s.strip_prefix('{'))
        .map(|s| s.trim_start_matches('*').trim_end_matches('}').to_owned())
        .unwrap_or_else(|| "path".to_owned())
}

fn nul_refused(
    api: bool,
    status: StatusCode,
    what: &str,
    e: &crate::input::EncodedError,
) -> Response {
    let (crate::input::EncodedError::Nul(name) | crate::input::EncodedError::NotUtf8(name)) = e;
    let detail = format!("{what} {e}");
    if api {
        Problem::new(status, "invalid", detail)
            .with("field", name.clone().into())
            .into_response()
    } else {
        let escaped = detail
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        (
            status,
            axum::response::Html(format!(
                "<!doctype html><title>Bad request</title><p>{escaped}</p>"
            )),
        )
            .into_response()
    }
}

/// A request body that could not be read: too large, too slow, or cut off.
fn body_problem(e: &axum::Error) -> Problem {
    if timed_out(e) {
        return body_timeout();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.to_string().contains("length limit exceeded") {
            return Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                "request body is larger than the configured limit (api.body_limit)",
            );
        }
        source = err.source();
    }
    Problem::bad_request("the request body could not be read")
}

/// Whether reading a body failed because of `web.body_read_timeout_secs`.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if err.is::<BodyTimeout>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn body_timeout() -> Problem {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        "the request body did not arrive in time (web.body_read_timeout_secs)",
    )
}

/// Gives a request's body `web.body_read_timeout_secs` to arrive, from the
/// moment its head did; a slower body fails to read ([`BodyTimeout`]).
async fn body_deadline(State(ctx): State<AppState>, req: Request, next: Next) -> Response {
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let limit = std::time::Duration::from_secs(ctx.config.web.body_read_timeout_secs);
    let (parts, body) = req.into_parts();
    let body = Deadline {
        body,
        deadline: Box::pin(tokio::time::sleep(limit)),
        ctx: ctx.clone(),
        expired: false,
    };
    next.run(Request::from_parts(parts, axum::body::Body::new(body)))
        .await
}

struct Deadline {
    body: axum::body::Body,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    ctx: AppState,
    expired: bool,
}

impl http_body::Body for Deadline {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        if self.expired {
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimeout))));
        }
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match std::future::Future::poll(self.deadline.as_mut(), cx) {
            Poll::Ready(()) => {
                self.expired = true;
                self.ctx.metrics.timeout(true);
                Poll::Ready(Some(Err(axum::Error::new(BodyTimeout))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        !self.expired && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The request body took longer than `web.body_read_timeout_secs`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the body read timeout")]
pub struct BodyTimeout;

/// The caller, if the request carries a valid bearer token.
async fn principal(headers: &HeaderMap, ctx: &Context) -> Result<Option<Principal>, Problem> {
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be 'Bearer <token>'"))?;
    match crate::users::authenticate(ctx, token.trim()).await? {
        Some(p) => Ok(Some(p)),
        None => Err(unauthorized("the API token is invalid, expired or revoked")),
    }
}

fn unauthorized(detail: &str) -> Problem {
    Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

pub fn forbidden(detail: String) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
}

pub fn needs_token() -> Problem {
    unauthorized("this needs an API token: send 'Authorization: Bearer <token>'")
}

/// Any authenticated caller (or, with `api.public_read`, an anonymous
/// reader), with their roles. Handlers check the role a route needs on the
/// system it touches through [`crate::systems::http::authorize`].
pub struct Caller(pub Access);

/// The instance admin: may create systems and categories.
pub struct InstanceAdmin(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, ctx: &AppState) -> Result<Self, Problem> {
        match principal(&parts.headers, ctx).await? {
            Some(p) => Ok(Caller(Access::of(ctx, p).await?)),
            None if ctx.config.api.public_read => Ok(Caller(Access::public_reader())),
            None => Err(needs_token()),
        }
    }
}

impl FromRequestParts<AppState> for InstanceAdmin {
    type Rejection = Problem;
    async fn from_request_parts(parts: &mut Parts, ctx: &AppState) -> Result<Self, Problem> {
        let p = principal(&parts.headers, ctx)
            .await?
            .ok_or_else(needs_token)?;
        if p.may_everywhere(Role::Admin) {
            Ok(InstanceAdmin(p))
        } else {
            Err(forbidden("this needs the instance admin".into()))
        }
    }
}

/// The Content-Security-Policy of every response: scripts, styles and
/// images only from this site (no inline script or style anywhere), no
/// framing, forms post only here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";

/// Security headers on every page and API response.
async fn security_headers(req: Request, next: Next) -> Response {
    use axum::http::header::{
        CONTENT_SECURITY_POLICY as CSP, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
    };
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    headers.insert(CSP, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    response
}

/// Records count and latency of every request by its route template.
async fn track(State(ctx): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    ctx.metrics.observe_request(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Aramaki API", description = "The REST API of an Aramaki instance. Errors are application/problem+json (RFC 9457). Each operation names the role it needs in x-aramaki-role: public (no token), user (any token), or viewer, operator, admin — held on the system the operation touches, through a grant on it or on a system that includes it, or instance-wide; creating systems and categories needs the instance admin."),
    modifiers(&BearerAuth),
    components(schemas(ProblemBody))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Errors are `application/problem+json`, and some come from the plumbing
/// rather than the handler: a missing or bad token (401), a missing role
/// (403), a malformed, oversized, mistyped or invalid body (400, 413, 415,
/// 422, 408), a bad path or query parameter (400). The document says so for
/// every operation they can happen on.
fn describe_problems(doc: &mut serde_json::Value) {
    let problem = |why: &str| serde_json::json!({"description": why, "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemBody"}}}});
    let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for item in paths.values_mut().filter_map(|i| i.as_object_mut()) {
        for op in item.values_mut().filter_map(|o| o.as_object_mut()) {
            let secured = op
                .get("security")
                .and_then(|s| s.as_array())
                .is_some_and(|s| !s.is_empty());
            let role = op
                .get("x-aramaki-role")
                .and_then(|r| r.as_str())
                .unwrap_or("public")
                .to_owned();
            let body = op.contains_key("requestBody");
            let params = op
                .get("parameters")
                .and_then(|p| p.as_array())
                .is_some_and(|p| p.iter().any(|p| p["in"] == "query" || p["in"] == "path"));
            let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) else {
                continue;
            };
            for (status, response) in responses.iter_mut() {
                if !(status.starts_with('4') || status.starts_with('5')) {
                    continue;
                }
                if let Some(content) = response.get_mut("content").and_then(|c| c.as_object_mut()) {
                    if let Some(json) = content.remove("application/json") {
                        content.insert("application/problem+json".into(), json);
                    }
                }
            }
            let mut add = |status: &str, why: &str| {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| problem(why));
            };
            if secured {
                add("401", "No valid API token");
                if !matches!(role.as_str(), "user" | "public") {
                    add("403", "The caller does not hold the role this needs");
                }
            }
            if body {
                add("400", "Malformed JSON");
                add("408", "The body did not arrive in time");
                add("413", "The body is larger than api.body_limit");
                add("415", "The body is not application/json");
                add("422", "The body is not valid for this operation");
            }
            if params {
                add("400", "An invalid path or query parameter");
            }
        }
    }
}

/// Builds the whole application router and its OpenAPI document.
pub fn app(ctx: AppState) -> Router {
    let api = OpenApiRouter::new()
        .merge(crate::systems::http::routes())
        .merge(crate::timeline::http::routes())
        .merge(crate::users::http::routes())
        .merge(crate::agents::http::routes())
        .merge(crate::monitoring::http::routes())
        .merge(crate::actions::http::routes())
        .merge(crate::federation::http::api())
        .routes(routes!(health));
    let (api_router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api)
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    let mut doc = serde_json::to_value(&doc).unwrap_or_default();
    describe_problems(&mut doc);
    let doc = Arc::new(doc);
    let body_limit = ctx.config.api.body_limit;
    Router::new()
        .merge(api_router)
        .merge(crate::ui::assets())
        .merge(crate::users::pages::routes())
        .merge(crate::systems::pages::routes())
        .merge(crate::agents::pages::routes())
        .merge(crate::federation::http::routes())
        .merge(crate::federation::pages::routes())
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .route("/metrics", axum::routing::get(metrics))
        .fallback(|| async { Problem::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this resource does not support that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            refuse_nul,
        ))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            body_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), track))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(ctx)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the instance can serve requests.
    pub status: String,
    /// Liveness: the process answers.
    pub live: bool,
    /// Readiness: the database answers.
    pub ready: bool,
    pub database: String,
    pub backend: String,
    pub version: String,
}

/// Liveness and readiness. Role: public, so load balancers can ask.
#[utoipa::path(get, path = "/health", tag = "health",
    extensions(("x-aramaki-role" = json!("public"))),
    responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn health(State(ctx): State<AppState>) -> (StatusCode, Json<Health>) {
    let db = ctx.db.ping().await;
    let ready = db.is_ok();
    if let Err(e) = &db {
        tracing::warn!(error = %e, "readiness: database does not answer");
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Health {
            status: if ready { "ok" } else { "unavailable" }.into(),
            live: true,
            ready,
            database: if ready { "ok" } else { "unreachable" }.into(),
            backend: ctx.db.backend().name().into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    )
}

/// Prometheus metrics. Role: any token holder, or public when `metrics.public` is set.
async fn metrics(State(ctx): State<AppState>, headers: HeaderMap) -> Result<Response, Problem> {
    if !ctx.config.metrics.public {
        principal(&headers, &ctx).await?.ok_or_else(needs_token)?;
    }
    let mut body = ctx.metrics.render(ctx.db.pool_stats());
    ctx.metrics.render_agents(&mut body, ctx.agents.count());
    ctx.federation.render(&mut body);
    Ok(([(CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response())
}
