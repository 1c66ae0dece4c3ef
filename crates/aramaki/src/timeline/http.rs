//! `/api/v1` routes for timelines and events, including the live tail as
//! server-sent events.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;

use aramaki_protocol::Severity;
use axum::extract::{Path, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::batch::{BatchError, Outcome, Request};
use super::store::{self, Cursor, Filter};
use super::{Event, Idempotency, Kind, NewEvent};
use crate::context::Context;
use crate::db::to_micros;
use crate::federation::identity::hex;
use crate::systems::http::authorize;
use crate::systems::http::path_slug;
use crate::systems::model::Slug;
use crate::users::access::Access;
use crate::users::Role;
use crate::web::{forbidden, ApiJson, ApiQuery, AppState, Caller, Problem};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_timeline))
        .routes(routes!(stream_timeline))
        .routes(routes!(record_event))
        .routes(routes!(record_events))
        .routes(routes!(get_event))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    pub items: Vec<Event>,
    /// Pass as `cursor` for older events; null on the last page.
    pub next: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TimelineQuery {
    /// From the previous page's `next`.
    cursor: Option<String>,
    /// Page size, 1 to 200 (default 50).
    limit: Option<i64>,
    /// Only events that occurred at or after this time (RFC 3339).
    since: Option<String>,
    /// Only events that occurred before this time (RFC 3339).
    until: Option<String>,
    /// Comma-separated kinds; `system.*` matches a whole namespace.
    kind: Option<String>,
    /// Minimum severity: info, ok, warning or critical.
    severity: Option<String>,
    /// Text to find in title or body.
    q: Option<String>,
    /// Actor name or id.
    actor: Option<String>,
}

fn parse_time(field: &str, raw: &str) -> Result<i64, Problem> {
    raw.parse::<Timestamp>().map(to_micros).map_err(|e| {
        Problem::bad_request(format!(
            "{field} must be an RFC 3339 time such as 2026-11-23T10:00:00Z: {e}"
        ))
    })
}

impl TimelineQuery {
    fn filter(&self) -> Result<Filter, Problem> {
        let mut f = Filter {
            since: self
                .since
                .as_deref()
                .map(|s| parse_time("since", s))
                .transpose()?,
            until: self
                .until
                .as_deref()
                .map(|s| parse_time("until", s))
                .transpose()?,
            min_severity: self
                .severity
                .as_deref()
                .map(|s| s.parse::<Severity>())
                .transpose()
                .map_err(|e| Problem::bad_request(e.to_string()))?,
            text: self.q.clone().filter(|q| !q.trim().is_empty()),
            actor: self.actor.clone().filter(|a| !a.is_empty()),
            ..Filter::default()
        };
        for part in self
            .kind
            .iter()
            .flat_map(|k| k.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (name, prefix) = match part.strip_suffix(".*") {
                Some(ns) => (ns, true),
                None => (part, false),
            };
            let kind = Kind::try_from(name.to_owned())
                .map_err(|e| Problem::bad_request(format!("invalid kind filter: {e}")))?;
            if prefix {
                f.kind_prefixes.push(kind.to_string());
            } else {
                f.kinds.push(kind.to_string());
            }
        }
        Ok(f)
    }
}

/// A system's timeline: its own events and those of everything below it,
/// each once, newest first. Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/timeline", tag = "timeline", params(("slug" = String, Path, description = "the system's slug"), TimelineQuery),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = EventPage), (status = 400, body = crate::web::ProblemBody),
              (status = 404, body = crate::web::ProblemBody)))]
async fn get_timeline(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
    ApiQuery(q): ApiQuery<TimelineQuery>,
) -> Result<Json<EventPage>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(Problem::bad_request("limit must be between 1 and 200"));
    }
    let filter = q.filter()?;
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            Cursor::decode(c).ok_or_else(|| Problem::bad_request(format!("invalid cursor '{c}'")))
        })
        .transpose()?;
    let (_, ids) = crate::systems::closure(&ctx, slug.as_str(), &access).await?;
    let mut items = store::page(ctx.db.reader(), &ids, &filter, before.as_ref(), limit + 1).await?;
    let next = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|e| Cursor::of(e).encode())
    } else {
        None
    };
    Ok(Json(EventPage { items, next }))
}

/// The live tail of a system's timeline as server-sent events (`event:
/// timeline`, `id:` the event's sequence). Send `Last-Event-ID` to resume
/// after a reconnect without losing events. Takes the timeline's filters
/// (not `cursor` or `limit`). Role: viewer.
#[utoipa::path(get, path = "/systems/{slug}/timeline/stream", tag = "timeline",
    params(("slug" = String, Path, description = "the system's slug"), TimelineQuery, ("Last-Event-ID" = Option<String>, Header, description = "resume after this event's sequence")),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, content_type = "text/event-stream", description = "A stream of events"),
              (status = 404, body = crate::web::ProblemBody)))]
async fn stream_timeline(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(slug): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<TimelineQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    let slug = path_slug(&slug)?;
    authorize(&ctx, &access, slug.as_str(), Role::Viewer).await?;
    if q.cursor.is_some() || q.limit.is_some() {
        return Err(Problem::bad_request(
            "a stream takes no cursor or limit; send Last-Event-ID to resume",
        ));
    }
    let filter = q.filter()?;
    let resume = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    Problem::bad_request("Last-Event-ID must be an event sequence number")
                })?,
        ),
        None => None,
    };
    let watcher = match headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        Some(token) => Watcher::Token(token.trim().to_owned()),
        None => Watcher::Public,
    };
    let events = live(ctx.clone(), slug, filter, resume, access, watcher).await?;
    let stream = futures_util::StreamExt::map(events, |event| {
        let sse = SseEvent::default()
            .event("timeline")
            .id(event.sequence.to_string())
            .json_data(&event)
            .unwrap_or_else(|_| SseEvent::default().comment("unserialisable event"));
        Ok(sse)
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// How a live stream's watcher proved who they are, so that the stream can
/// ask again: a grant revoked, a token revoked, a logout or a disabled
/// account ends or narrows a stream that is already open.
pub enum Watcher {
    /// An anonymous reader under `api.public_read`.
    Public,
    /// An API token (the bearer value).
    Token(String),
    /// A browser session (the cookie's value).
    Session(String),
}

impl Watcher {
    /// The watcher's roles now, or `None` when they may no longer watch.
    async fn access(&self, ctx: &Context) -> Result<Option<Access>, sqlx::Error> {
        let principal = match self {
            Watcher::Public if ctx.config.api.public_read => {
                return Ok(Some(Access::public_reader()))
            }
            Watcher::Public => return Ok(None),
            Watcher::Token(token) => crate::users::authenticate(ctx, token).await?,
            Watcher::Session(secret) => crate::users::sessions::resume(ctx, secret)
                .await?
                .filter(|s| !s.must_change_password)
                .map(|s| s.principal),
        };
        match principal {
            Some(p) => Ok(Some(Access::of(ctx, p).await?)),
            None => Ok(None),
        }
    }
}

/// How often (by the Context's clock) an open stream asks again who is
/// watching, besides on every `user.*` or `token.*` event.
const RECHECK_SECS: i64 = 30;

/// The live tail of a system's timeline: events committed from now on (or
/// after `resume`, a sequence number), filtered, each once. The caller has
/// checked access already; `watcher` is how they proved who they are, asked
/// again while the stream is open.
pub async fn live(
    ctx: Arc<Context>,
    slug: Slug,
    filter: Filter,
    resume: Option<i64>,
    access: Access,
    watcher: Watcher,
) -> Result<impl Stream<Item = Event>, crate::systems::SystemError> {
    // Listen first, then look: nothing committed in between is missed.
    let rx = ctx.timeline.listen();
    let (_, ids) = crate::systems::closure(&ctx, slug.as_str(), &access).await?;
    let head = store::max_seq(ctx.db.reader()).await?;
    let last = resume.unwrap_or(head);
    let tail = Tail {
        ctx: ctx.clone(),
        closing: ctx.timeline.closing(),
        filter,
        slug,
        checked_at: ctx.now(),
        access,
        watcher,
        rx,
        ids: ids.into_iter().collect(),
        pending: VecDeque::new(),
        last,
        replay: resume.is_some(),
    };
    Ok(futures_util::stream::unfold(tail, |mut tail| async move {
        let event = tail.next().await?;
        Some((event, tail))
    }))
}

/// One SSE connection's position in the timeline.
struct Tail {
    ctx: Arc<Context>,
    closing: tokio::sync::watch::Receiver<bool>,
    filter: Filter,
    slug: Slug,
    access: Access,
    watcher: Watcher,
    checked_at: Timestamp,
    rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
    ids: HashSet<String>,
    pending: VecDeque<Event>,
    last: i64,
    replay: bool,
}

impl Tail {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.replay && self.pending.is_empty() {
                self.replay = false;
                self.catch_up().await;
            }
            if let Some(e) = self.pending.pop_front() {
                if !self.still_allowed(false).await {
                    return None;
                }
                self.last = self.last.max(e.sequence);
                if self.filter.matches(&e) {
                    return Some(e);
                }
                continue;
            }
            if *self.closing.borrow() {
                return None;
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                _ = self.closing.changed() => return None,
            };
            match received {
                Ok(e) => {
                    let about_callers = e.kind.starts_with("user.") || e.kind.starts_with("token.");
                    if !self.still_allowed(about_callers).await {
                        return None;
                    }
                    if e.kind.starts_with("system.") {
                        self.refresh().await;
                    }
                    if e.sequence > self.last && self.ids.contains(&e.system_id) {
                        self.last = e.sequence;
                        if self.filter.matches(&e) {
                            return Some(e.as_ref().clone());
                        }
                    }
                }
                // Too slow for the live feed: read what we missed from the store.
                Err(RecvError::Lagged(_)) => self.replay = true,
                Err(RecvError::Closed) => return None,
            }
        }
    }

    async fn catch_up(&mut self) {
        let ids: Vec<String> = self.ids.iter().cloned().collect();
        match store::after_seq_for(self.ctx.db.reader(), &ids, self.last, 1000).await {
            Ok(events) => {
                if events.len() == 1000 {
                    self.replay = true;
                }
                self.pending.extend(events);
            }
            Err(e) => tracing::warn!(error = %e, "live tail: cannot replay from the store"),
        }
    }

    /// Asks again who is watching — now when `now` (an event about users or
    /// tokens), else once every [`RECHECK_SECS`] by the Context's clock — and
    /// narrows the stream to their current roles. False when they may no
    /// longer watch this system (the stream ends; a database error ends it
    /// too, rather than stream on unchecked).
    async fn still_allowed(&mut self, now: bool) -> bool {
        let at = self.ctx.now();
        let due = self
            .checked_at
            .checked_add(SignedDuration::from_secs(RECHECK_SECS))
            .map_or(true, |t| t <= at);
        if !now && !due {
            return true;
        }
        self.checked_at = at;
        let access = match self.watcher.access(&self.ctx).await {
            Ok(Some(access)) => access,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(error = %e, "live tail: cannot check who is watching");
                return false;
            }
        };
        if authorize(&self.ctx, &access, self.slug.as_str(), Role::Viewer)
            .await
            .is_err()
        {
            return false;
        }
        self.access = access;
        self.refresh().await;
        true
    }

    /// The structure changed: the set of systems below may have too.
    async fn refresh(&mut self) {
        if let Ok((_, ids)) =
            crate::systems::closure(&self.ctx, self.slug.as_str(), &self.access).await
        {
            self.ids = ids.into_iter().collect();
        }
    }
}

/// The body of `POST /api/v1/events`, and one item of a batch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEventRequest {
    /// Slug of the system the event is about.
    pub system: Slug,
    pub kind: Kind,
    pub title: String,
    /// Default: info.
    #[schema(value_type = Option<String>)]
    pub severity: Option<Severity>,
    /// Markdown.
    pub body: Option<String>,
    /// Default: now. At most one hour ahead.
    #[schema(value_type = Option<String>, format = DateTime)]
    pub occurred_at: Option<Timestamp>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<serde_json::Value>,
    /// Id of the event that caused this one.
    pub caused_by: Option<Uuid>,
    /// Record at most once under this key (the `Idempotency-Key` header does
    /// the same for a single event).
    pub idempotency_key: Option<String>,
}

/// The body of `POST /api/v1/events/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    /// 1 to 1000 events, recorded all or none, in one transaction.
    pub events: Vec<NewEventRequest>,
}

/// One answer of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    #[serde(flatten)]
    pub event: Event,
    /// True if an earlier request already recorded it under its key.
    pub replayed: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    pub items: Vec<BatchItem>,
}

fn idempotency_key(raw: &str) -> Result<String, Problem> {
    let key = raw.trim();
    if key.is_empty() || key.len() > 200 || !key.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        return Err(Problem::bad_request(
            "an idempotency key must be 1 to 200 visible ASCII characters",
        ));
    }
    Ok(key.to_owned())
}

/// Checks one request and turns it into a queued append. `at` prefixes the
/// field names in problems (`events[3].`).
fn prepare(
    ctx: &Context,
    access: &Access,
    mut req: NewEventRequest,
    header_key: Option<String>,
    at: &str,
) -> Result<Request, Problem> {
    let field = |f: &str| serde_json::Value::String(format!("{at}{f}"));
    if req.kind.is_reserved() {
        return Err(Problem::unprocessable(format!(
            "{at}kind '{}' is reserved for events Aramaki records itself",
            req.kind
        ))
        .with("field", field("kind")));
    }
    if let Some(t) = req.occurred_at {
        if t > ctx
            .now()
            .checked_add(SignedDuration::from_hours(1))
            .unwrap_or(t)
        {
            return Err(Problem::unprocessable(format!(
                "{at}occurred_at is more than an hour in the future"
            ))
            .with("field", field("occurred_at")));
        }
    }
    let key = match (header_key, req.idempotency_key.take()) {
        (Some(h), Some(b)) if idempotency_key(&b)? != h => {
            return Err(Problem::bad_request(
                "the Idempotency-Key header and idempotency_key differ",
            ));
        }
        (Some(h), _) => Some(h),
        (None, Some(b)) => Some(idempotency_key(&b)?),
        (None, None) => None,
    };
    // The key stays out of the hash: it names the request, the rest is it.
    let canonical = serde_json::to_string(&req).unwrap_or_default();
    let idempotency = key.map(|key| Idempotency {
        scope: access
            .principal()
            .map(|p| p.user_id.clone())
            .unwrap_or_else(|| "anonymous".into()),
        key,
        request_hash: hex(&Sha256::digest(canonical.as_bytes())),
    });
    let new = NewEvent {
        kind: req.kind,
        severity: req.severity.unwrap_or(Severity::Info),
        title: req.title,
        body: req.body.unwrap_or_default(),
        occurred_at: req.occurred_at,
        data: req.data.unwrap_or_else(|| serde_json::json!({})),
        caused_by: req.caused_by,
        idempotency,
    };
    new.validate()
        .map_err(|e| Problem::unprocessable(format!("{at}{e}")).with("field", field(&e.field)))?;
    Ok(Request {
        actor: access.actor(),
        system: req.system.to_string(),
        event: new,
    })
}

/// Turns a refused outcome into the problem that explains it.
fn refusal(outcome: &Outcome, at: &str) -> Option<Problem> {
    let field = |f: &str| serde_json::Value::String(format!("{at}{f}"));
    match outcome {
        Outcome::KeyReused => Some(
            Problem::unprocessable(format!(
                "{at}this idempotency key was already used for a different event"
            ))
            .with("field", field("idempotency_key")),
        ),
        Outcome::UnknownSystem(slug) => Some(
            Problem::unprocessable(format!("{at}no system '{slug}'"))
                .with("field", field("system")),
        ),
        Outcome::UnknownCause(id) => Some(
            Problem::unprocessable(format!("{at}caused_by: no event {id}"))
                .with("field", field("caused_by")),
        ),
        _ => None,
    }
}

/// Systems mirrored from a peer are read-only: only their primary
/// instance records activity about them.
pub(crate) async fn refuse_remote(
    ctx: &Context,
    requests: &[Request],
    batch: bool,
) -> Result<(), Problem> {
    let slugs: Vec<&str> = requests.iter().map(|r| r.system.as_str()).collect();
    for chunk in slugs.chunks(500) {
        let mut sql = crate::db::Sql::new(
            "SELECT slug FROM systems WHERE deleted_at IS NULL AND instance_id <> ",
        );
        sql.bind(ctx.identity.instance_id.as_str())
            .push(" AND slug IN ")
            .bind_list(chunk.iter().copied());
        if let Some(row) = sql.query().fetch_optional(ctx.db.reader()).await? {
            let slug: String = sqlx::Row::try_get(&row, 0)?;
            let at = match requests.iter().position(|r| r.system == slug) {
                Some(i) if batch => format!("events[{i}]."),
                _ => String::new(),
            };
            return Err(Problem::conflict(
                "remote_system",
                format!("{at}system: '{slug}' is a remote system, read-only here: only its primary instance records activity about it"),
            )
            .with("field", format!("{at}system").into()));
        }
    }
    Ok(())
}

/// Checks that the caller may record on every system named. A system the
/// caller cannot see reads as unknown (422), like one that does not exist.
async fn may_record(
    ctx: &Context,
    access: &Access,
    requests: &[Request],
    batch: bool,
) -> Result<(), Problem> {
    refuse_remote(ctx, requests, batch).await?;
    if access.everywhere(Role::Operator) {
        return Ok(());
    }
    let mut conn = ctx.db.reader().acquire().await?;
    let slugs: Vec<String> = requests.iter().map(|r| r.system.clone()).collect();
    let ids = crate::systems::store::ids_by_slugs(&mut conn, &slugs).await?;
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    for (i, r) in requests.iter().enumerate() {
        let at = if batch {
            format!("events[{i}].")
        } else {
            String::new()
        };
        match ids.get(&r.system).and_then(|id| access.role_on(&graph, id)) {
            None => {
                return Err(
                    Problem::unprocessable(format!("{at}no system '{}'", r.system))
                        .with("field", format!("{at}system").into()),
                )
            }
            Some(_) if access.principal().is_none() => return Err(crate::web::needs_token()),
            Some(role) if role < Role::Operator => {
                return Err(forbidden(format!(
                    "{at}recording on '{}' needs the operator role",
                    r.system
                )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn batch_problem(e: BatchError) -> Problem {
    match e {
        BatchError::Db(e) => e.into(),
        e @ BatchError::Stopped => Problem::internal(&e),
    }
}

/// Record an external event (a deploy marker, a note). Idempotent by the
/// optional `Idempotency-Key` header. Role: operator.
#[utoipa::path(post, path = "/events", tag = "timeline", request_body = NewEventRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "The same key twice records one event")),
    extensions(("x-aramaki-role" = json!("operator"))), security(("token" = [])),
    responses((status = 201, body = Event), (status = 200, body = Event, description = "Replayed by Idempotency-Key"),
              (status = 422, body = crate::web::ProblemBody)))]
async fn record_event(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    headers: HeaderMap,
    ApiJson(req): ApiJson<NewEventRequest>,
) -> Result<Response, Problem> {
    let header_key = match headers.get("idempotency-key") {
        Some(v) => Some(idempotency_key(v.to_str().map_err(|_| {
            Problem::bad_request("Idempotency-Key must be visible ASCII")
        })?)?),
        None => None,
    };
    let request = prepare(&ctx, &access, req, header_key, "")?;
    may_record(&ctx, &access, std::slice::from_ref(&request), false).await?;
    let outcome = ctx
        .appender
        .append(&ctx, vec![request])
        .await
        .map_err(batch_problem)?
        .pop();
    match outcome {
        Some(Outcome::Appended(event)) => {
            let mut response = (StatusCode::CREATED, Json(&event)).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/api/v1/events/{}", event.id)) {
                response.headers_mut().insert(LOCATION, v);
            }
            Ok(response)
        }
        Some(Outcome::Replayed(event)) => {
            let mut response = (StatusCode::OK, Json(event)).into_response();
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            Ok(response)
        }
        Some(other) => {
            Err(refusal(&other, "").unwrap_or_else(|| Problem::internal(&"event not written")))
        }
        None => Err(Problem::internal(&"the event writer gave no answer")),
    }
}

/// Record up to 1000 events at once, all or none. Each may carry its own
/// `idempotency_key`. Role: operator.
#[utoipa::path(post, path = "/events/batch", tag = "timeline", request_body = EventBatch,
    extensions(("x-aramaki-role" = json!("operator"))), security(("token" = [])),
    responses((status = 201, body = BatchResult), (status = 422, body = crate::web::ProblemBody)))]
async fn record_events(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    ApiJson(batch): ApiJson<EventBatch>,
) -> Result<(StatusCode, Json<BatchResult>), Problem> {
    if batch.events.is_empty() || batch.events.len() > 1000 {
        return Err(
            Problem::unprocessable("events: a batch holds 1 to 1000 events")
                .with("field", "events".into()),
        );
    }
    let requests = batch
        .events
        .into_iter()
        .enumerate()
        .map(|(i, req)| prepare(&ctx, &access, req, None, &format!("events[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    may_record(&ctx, &access, &requests, true).await?;
    let outcomes = ctx
        .appender
        .append(&ctx, requests)
        .await
        .map_err(batch_problem)?;
    if let Some(problem) = outcomes
        .iter()
        .enumerate()
        .find_map(|(i, o)| refusal(o, &format!("events[{i}].")))
    {
        return Err(problem);
    }
    let items = outcomes
        .into_iter()
        .filter_map(|o| match o {
            Outcome::Appended(event) => Some(BatchItem {
                event,
                replayed: false,
            }),
            Outcome::Replayed(event) => Some(BatchItem {
                event,
                replayed: true,
            }),
            _ => None,
        })
        .collect();
    Ok((StatusCode::CREATED, Json(BatchResult { items })))
}

/// Read one event. Role: viewer.
#[utoipa::path(get, path = "/events/{id}", tag = "timeline", params(("id" = String, Path, description = "the event's id (a UUID)")),
    extensions(("x-aramaki-role" = json!("viewer"))), security(("token" = [])),
    responses((status = 200, body = Event), (status = 400, body = crate::web::ProblemBody),
              (status = 404, body = crate::web::ProblemBody)))]
async fn get_event(
    State(ctx): State<AppState>,
    Caller(access): Caller,
    Path(id): Path<String>,
) -> Result<Json<Event>, Problem> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| Problem::bad_request(format!("invalid event id '{id}': expected a UUID")))?;
    let event = store::get(ctx.db.reader(), id)
        .await?
        .ok_or_else(|| Problem::not_found(format!("no event {id}")))?;
    // An event on a system the caller may not see does not exist for them.
    crate::systems::http::authorize_id(&ctx, &access, &event.system_id, Role::Viewer, "event.read")
        .await
        .map_err(|_| Problem::not_found(format!("no event {id}")))?;
    Ok(Json(event))
}
