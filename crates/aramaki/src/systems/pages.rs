//! Pages about systems. For now the dashboard: anchors by category with
//! their worst state, and the last 24 hours across everything visible.

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use jiff::SignedDuration;

use crate::db::to_micros;
use crate::timeline::store::{page, Filter};
use crate::ui::{page_error, render, Page};
use crate::users::access::Access;
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(super::forms::routes())
        .merge(crate::monitoring::pages::routes())
        .merge(crate::actions::pages::routes())
        .route("/", get(dashboard))
        .route("/systems/{slug}", get(system_page))
        .route("/systems/{slug}/notes", axum::routing::post(add_note))
        .route("/search", get(search))
        .route("/systems/{slug}/events", get(events_fragment))
        .route("/systems/{slug}/live", get(live_fragments))
}

struct Tile {
    slug: String,
    title: String,
    worst: String,
    /// The peer a remote system comes from.
    from: Option<String>,
}

struct Group {
    category: String,
    systems: Vec<Tile>,
}

struct Line {
    at: String,
    at_short: String,
    system: String,
    title: String,
    actor: String,
    severity: String,
    /// The peer a remote event comes from.
    from: Option<String>,
}

/// Names the peer an event or system comes from; `None` for our own.
pub(crate) struct Origins {
    me: String,
    names: std::collections::HashMap<String, String>,
}

impl Origins {
    pub(crate) async fn load(ctx: &crate::context::Context) -> Result<Origins, sqlx::Error> {
        Ok(Origins {
            me: ctx.identity.instance_id.clone(),
            names: crate::federation::peers::names(ctx).await?,
        })
    }

    pub(crate) fn of(&self, instance: &str) -> Option<String> {
        (instance != self.me).then(|| {
            self.names
                .get(instance)
                .cloned()
                .unwrap_or_else(|| instance.to_owned())
        })
    }
}

/// The ids of the systems a caller may see (`visible`, or all of them).
fn within_reach(
    graph: &super::graph::Graph,
    visible: Option<std::collections::HashSet<String>>,
) -> Vec<String> {
    match visible {
        Some(set) => set.into_iter().collect(),
        None => graph.ids().cloned().collect(),
    }
}

impl Line {
    /// An event as one line of a strip, its time shown with `format`.
    fn of(e: crate::timeline::Event, format: &str, origins: &Origins) -> Line {
        Line {
            from: origins.of(&e.origin),
            at: e.occurred_at.to_string(),
            at_short: e.occurred_at.strftime(format).to_string(),
            system: e.system,
            title: e.title,
            actor: e.actor.name,
            severity: e.severity.to_string(),
        }
    }
}

#[derive(Template)]
#[template(path = "systems/dashboard.html")]
struct Dashboard {
    user: Option<String>,
    csrf: String,
    can_create: bool,
    groups: Vec<Group>,
    events: Vec<Line>,
}

fn as_word<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Role: any logged-in user; shows only what they may see.
async fn dashboard(State(ctx): State<AppState>, Page(session): Page) -> Response {
    let result = async {
        let access = Access::of(&ctx, session.principal.clone()).await?;
        let mut conn = ctx.db.reader().acquire().await?;
        let graph = super::store::load_graph(&mut conn).await?;
        drop(conn);
        let visible = access.visible(&graph);
        let origins = Origins::load(&ctx).await?;
        let mut groups = Vec::new();
        for (category, systems) in super::anchors(&ctx, visible.as_ref()).await? {
            let mut tiles = Vec::new();
            for s in systems {
                let status = super::status::status(&ctx, s.slug.as_str(), &access).await?;
                tiles.push(Tile {
                    from: origins.of(&s.instance),
                    slug: s.slug.to_string(),
                    title: s.title,
                    worst: as_word(&status.top.worst),
                });
            }
            groups.push(Group {
                category: category.to_string(),
                systems: tiles,
            });
        }
        let ids = within_reach(&graph, visible);
        let since = ctx
            .now()
            .checked_sub(SignedDuration::from_hours(24))
            .unwrap_or(ctx.now());
        let filter = Filter {
            since: Some(to_micros(since)),
            ..Filter::default()
        };
        let events = page(ctx.db.reader(), &ids, &filter, None, 40)
            .await?
            .into_iter()
            .map(|e| Line::of(e, "%a %H:%M", &origins))
            .collect();
        Ok::<_, super::SystemError>(Dashboard {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            can_create: session.principal.may_everywhere(crate::users::Role::Admin),
            groups,
            events,
        })
    };
    match result.await {
        Ok(page) => render(StatusCode::OK, &page),
        Err(e) => page_error(&e),
    }
}

/// Escapes text for HTML built outside templates.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The status tree as nested `<details>`: every layer expands in place,
/// recursively, with no script and without leaving the page.
fn layers_html(layer: &super::status::Layer, top: bool) -> String {
    let state = as_word(&layer.state);
    let worst = as_word(&layer.worst);
    let mut out = format!(
        "<details class=\"layer{}\"{}><summary><span class=\"badge {worst}\">{worst}</span> <a href=\"/systems/{slug}\">{title}</a> <span class=\"via\">{via}own state: {state}</span></summary>",
        if top { " layer-top" } else { "" },
        if top { " open" } else { "" },
        slug = esc(&layer.slug),
        title = esc(&layer.title),
        via = if layer.via == Some(super::graph::Via::Selector) { "by selector · " } else { "" },
    );
    if !layer.sources.is_empty() {
        out.push_str("<ul class=\"sources\">");
        for src in &layer.sources {
            out.push_str(&format!(
                "<li>{}: {} — {}</li>",
                esc(&src.source),
                as_word(&src.state),
                esc(&src.summary)
            ));
        }
        out.push_str("</ul>");
    }
    for sub in &layer.layers {
        out.push_str(&layers_html(sub, false));
    }
    out.push_str("</details>");
    out
}

struct LinkLine {
    title: String,
    url: String,
    inherited_from: Option<String>,
}

struct LinkGroup {
    kind: String,
    links: Vec<LinkLine>,
}

struct EventLine {
    /// Recorded after the user's previous visit.
    new: bool,
    /// The first event the user had seen before: the marker goes above it.
    first_seen: bool,
    recorded: i64,
    at: String,
    at_short: String,
    kind: String,
    system: String,
    title: String,
    actor: String,
    severity: String,
    body_html: String,
    /// The peer a remote event comes from.
    from: Option<String>,
}

#[derive(Template)]
#[template(path = "systems/system.html")]
struct SystemPage {
    user: Option<String>,
    csrf: String,
    slug: String,
    title: String,
    category: String,
    labels: Vec<String>,
    selector: Option<String>,
    status_html: String,
    /// Observations and checks, rendered by `monitoring::pages`.
    monitoring_html: String,
    /// Actions and their last runs, rendered by `actions::pages`.
    actions_html: String,
    handbook_html: String,
    description_html: String,
    contacts: Vec<crate::systems::model::Contact>,
    links: Vec<LinkGroup>,
    subsystems: Vec<(String, String, bool)>,
    includers: Vec<(String, String, bool)>,
    events: Vec<EventLine>,
    more: Option<More>,
    live: String,
    can_note: bool,
    can_edit: bool,
    /// Where a remote system lives; it is read-only here.
    origin: Option<crate::federation::uses::Origin>,
    severities: Vec<String>,
    periods: Vec<(String, String)>,
    filter_since: String,
    filter_kind: String,
    filter_severity: String,
    filter_q: String,
}

#[derive(serde::Deserialize, Default)]
struct TimelineFilter {
    kind: Option<String>,
    severity: Option<String>,
    q: Option<String>,
    /// Hours back from now: 24, 168, 720; empty for all.
    since: Option<String>,
    cursor: Option<String>,
}

pub(super) fn not_found(slug: &str) -> Response {
    use axum::response::IntoResponse;
    (StatusCode::NOT_FOUND, axum::response::Html(format!("<!doctype html><title>Not found</title><p>No system '{}'. <a href=\"/\">All systems</a></p>", esc(slug)))).into_response()
}

/// One screen per system. Role: viewer on the system.
async fn system_page(
    State(ctx): State<AppState>,
    Page(session): Page,
    axum::extract::Path(slug): axum::extract::Path<String>,
    axum::extract::Query(f): axum::extract::Query<TimelineFilter>,
) -> Response {
    let result = async {
        let access = Access::of(&ctx, session.principal.clone()).await?;
        let mut conn = ctx.db.reader().acquire().await?;
        let Some(system) = super::store::by_slug(&mut conn, &slug).await? else {
            return Ok(None);
        };
        let graph = super::store::load_graph(&mut conn).await?;
        let id = system.id.to_string();
        let Some(role) = access.role_on(&graph, &id) else {
            return Ok(None);
        };
        let visible = access.visible(&graph);
        let graph = graph.restricted(visible.as_ref());
        let can_see = |sid: &str| visible.as_ref().is_none_or(|v| v.contains(sid));
        // Links of the systems above, marked with where they come from.
        let mut links: Vec<(crate::systems::model::LinkKind, LinkLine)> = system
            .links
            .iter()
            .map(|l| {
                (
                    l.kind,
                    LinkLine {
                        title: l.title.clone(),
                        url: l.url.clone(),
                        inherited_from: None,
                    },
                )
            })
            .collect();
        let ancestors: Vec<String> = graph
            .ancestors(&id)
            .into_iter()
            .filter(|a| can_see(a))
            .collect();
        for above in super::store::by_ids(&mut conn, &ancestors).await? {
            for l in &above.links {
                links.push((
                    l.kind,
                    LinkLine {
                        title: l.title.clone(),
                        url: l.url.clone(),
                        inherited_from: Some(above.slug.to_string()),
                    },
                ));
            }
        }
        links.sort_by_key(|(k, _)| *k);
        let mut groups: Vec<LinkGroup> = Vec::new();
        for (kind, line) in links {
            let kind = as_word(&kind);
            match groups.last_mut() {
                Some(g) if g.kind == kind => g.links.push(line),
                _ => groups.push(LinkGroup {
                    kind,
                    links: vec![line],
                }),
            }
        }
        let named = |edges: Vec<(String, super::graph::Via)>| -> Vec<(String, String, bool)> {
            edges
                .into_iter()
                .filter(|(sid, _)| can_see(sid))
                .map(|(sid, via)| {
                    (
                        graph.slug(&sid).to_owned(),
                        graph.slug(&sid).to_owned(),
                        via == super::graph::Via::Selector,
                    )
                })
                .collect()
        };
        let subsystems = named(graph.members(&id));
        let includers = named(graph.parents(&id));
        drop(conn);
        let status = super::status::status(&ctx, &slug, &access).await?;
        let origin = crate::federation::uses::origin_of(&ctx, &id).await?;
        // Checks and actions of a remote system belong to its primary
        // instance; here it shows the status and timeline it shares.
        let (monitoring_html, actions_html) = if origin.is_some() {
            (String::new(), String::new())
        } else {
            (
                crate::monitoring::pages::section(&ctx, &session, &id, &slug).await?,
                crate::actions::pages::section(&ctx, &session, &id, &slug, role).await?,
            )
        };
        let closure = graph.closure(&id);
        let (mut events, more) = timeline_part(&ctx, &closure, &slug, &f).await?;
        let previous = super::store::visit(&ctx, &session.principal.user_id, &id).await?;
        if let (Some(seen), None) = (previous, &f.cursor) {
            mark_new(&mut events, seen);
        }
        Ok::<_, super::SystemError>(Some(SystemPage {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            slug: system.slug.to_string(),
            title: system.title.clone(),
            category: system.category.to_string(),
            labels: system
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            selector: system.selector.as_ref().map(|s| s.to_string()),
            status_html: layers_html(&status.top, true),
            monitoring_html,
            actions_html,
            handbook_html: crate::ui::markdown(&system.handbook),
            description_html: crate::ui::markdown(&system.description),
            contacts: system.contacts.clone(),
            links: groups,
            subsystems,
            includers,
            events,
            more,
            live: format!(
                "/systems/{}/live{}",
                crate::cli::encode(&slug),
                filter_query(&f, None)
            ),
            can_note: role >= crate::users::Role::Operator && origin.is_none(),
            can_edit: role >= crate::users::Role::Admin && origin.is_none(),
            origin,
            severities: ["info", "ok", "warning", "critical"]
                .map(String::from)
                .to_vec(),
            periods: [
                ("", "any time"),
                ("24", "24 hours"),
                ("168", "7 days"),
                ("720", "30 days"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .to_vec(),
            filter_since: f.since.clone().unwrap_or_default(),
            filter_kind: f.kind.clone().unwrap_or_default(),
            filter_severity: f.severity.clone().unwrap_or_else(|| "info".into()),
            filter_q: f.q.clone().unwrap_or_default(),
        }))
    };
    match result.await {
        Ok(Some(page)) => render(StatusCode::OK, &page),
        Ok(None) => not_found(&slug),
        Err(e) => page_error(&e),
    }
}

#[derive(serde::Deserialize)]
struct NoteForm {
    #[serde(default)]
    csrf: String,
    title: String,
    #[serde(default)]
    body: String,
}

/// Adds a note to the timeline. Role: operator on the system.
async fn add_note(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: axum::http::HeaderMap,
    axum::extract::Path(slug): axum::extract::Path<String>,
    axum::Form(form): axum::Form<NoteForm>,
) -> Response {
    use axum::response::IntoResponse;
    if let Err(refused) = crate::ui::check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    let result = async {
        let access = Access::of(&ctx, session.principal.clone()).await?;
        if let Err(p) =
            crate::systems::http::authorize(&ctx, &access, &slug, crate::users::Role::Operator)
                .await
        {
            return Err(if p.status == StatusCode::NOT_FOUND {
                NoteError::Absent
            } else {
                NoteError::Forbidden(p.detail)
            });
        }
        let event = crate::timeline::NewEvent {
            kind: crate::timeline::Kind::try_from("note".to_owned()).map_err(|e| e.to_string())?,
            severity: aramaki_protocol::Severity::Info,
            title: form.title.clone(),
            body: form.body.clone(),
            occurred_at: None,
            data: serde_json::json!({}),
            caused_by: None,
            idempotency: None,
        };
        event.validate().map_err(|e| e.to_string())?;
        let request = crate::timeline::batch::Request {
            actor: access.actor(),
            system: slug.clone(),
            event,
        };
        let requests = vec![request];
        crate::timeline::http::refuse_remote(&ctx, &requests, false)
            .await
            .map_err(|p| NoteError::Refused(p.detail))?;
        ctx.appender
            .append(&ctx, requests)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, NoteError>(())
    };
    let htmx = headers.contains_key("hx-request");
    match result.await {
        // With htmx the note arrives through the live timeline; say so in place.
        Ok(()) if htmx => axum::response::Html("<span class=\"ok\">Noted.</span>").into_response(),
        Ok(()) => axum::response::Redirect::to(&format!("/systems/{}", crate::cli::encode(&slug))).into_response(),
        Err(NoteError::Refused(why)) if htmx => {
            (StatusCode::UNPROCESSABLE_ENTITY, axum::response::Html(format!("<span class=\"error\" role=\"alert\">{}</span>", esc(&why)))).into_response()
        }
        Err(NoteError::Refused(why)) => (StatusCode::UNPROCESSABLE_ENTITY, axum::response::Html(format!(
            "<!doctype html><title>Note refused</title><p class=\"error\">{}</p><p><a href=\"/systems/{}\">Back</a></p>",
            esc(&why), esc(&slug)
        ))).into_response(),
        Err(NoteError::Forbidden(why)) => (StatusCode::FORBIDDEN, axum::response::Html(format!(
            "<!doctype html><title>Not allowed</title><p class=\"error\">{}</p><p><a href=\"/systems/{}\">Back</a></p>",
            esc(&why), esc(&slug)
        ))).into_response(),
        Err(NoteError::Absent) => not_found(&slug),
        Err(NoteError::Db(e)) => page_error(&e),
    }
}

/// Why a note was not added.
#[derive(Debug, thiserror::Error)]
enum NoteError {
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("no such system")]
    Absent,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<String> for NoteError {
    fn from(s: String) -> NoteError {
        NoteError::Refused(s)
    }
}

#[derive(Template)]
#[template(path = "systems/search.html")]
struct SearchPage {
    user: Option<String>,
    csrf: String,
    q: String,
    systems: Vec<(String, String, String)>,
    events: Vec<Line>,
}

#[derive(serde::Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
}

/// Systems (slug, title, labels, description) and events (title, body) the
/// caller may see. Role: any logged-in user.
async fn search(
    State(ctx): State<AppState>,
    Page(session): Page,
    axum::extract::Query(sq): axum::extract::Query<SearchQuery>,
) -> Response {
    let q = sq.q.trim().chars().take(200).collect::<String>();
    let result = async {
        let mut systems = Vec::new();
        let mut events = Vec::new();
        if !q.is_empty() {
            let access = Access::of(&ctx, session.principal.clone()).await?;
            let mut conn = ctx.db.reader().acquire().await?;
            let graph = super::store::load_graph(&mut conn).await?;
            let visible = access.visible(&graph);
            let filter = super::store::ListFilter {
                text: Some(q.clone()),
                only_ids: visible.as_ref().map(|v| v.iter().cloned().collect()),
                ..Default::default()
            };
            systems = super::store::list(&mut conn, &filter, 50)
                .await?
                .into_iter()
                .map(|s| (s.slug.to_string(), s.title, s.category.to_string()))
                .collect();
            drop(conn);
            let ids = within_reach(&graph, visible);
            let filter = Filter {
                text: Some(q.clone()),
                ..Filter::default()
            };
            let origins = Origins::load(&ctx).await?;
            events = page(ctx.db.reader(), &ids, &filter, None, 30)
                .await?
                .into_iter()
                .map(|e| Line::of(e, "%a %d %b %H:%M", &origins))
                .collect();
        }
        Ok::<_, super::SystemError>(SearchPage {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            q: q.clone(),
            systems,
            events,
        })
    };
    match result.await {
        Ok(page) => render(StatusCode::OK, &page),
        Err(e) => page_error(&e),
    }
}

/// The link to the next, older page of a timeline: a whole page without
/// JavaScript, a fragment for htmx's infinite scroll.
pub struct More {
    page: String,
    fragment: String,
}

/// `?kind=…&severity=…&q=…` (and a cursor) for links that keep the filter.
fn filter_query(f: &TimelineFilter, cursor: Option<String>) -> String {
    let mut q: Vec<(&str, String)> = Vec::new();
    q.extend(cursor.map(|c| ("cursor", c)));
    q.extend(
        f.kind
            .clone()
            .filter(|v| !v.is_empty())
            .map(|k| ("kind", k)),
    );
    q.extend(
        f.severity
            .clone()
            .filter(|v| !v.is_empty())
            .map(|k| ("severity", k)),
    );
    q.extend(f.q.clone().filter(|v| !v.is_empty()).map(|k| ("q", k)));
    q.extend(
        f.since
            .clone()
            .filter(|v| !v.is_empty())
            .map(|k| ("since", k)),
    );
    if q.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{k}={}", crate::cli::encode(v)))
        .collect();
    format!("?{}", parts.join("&"))
}

fn parse_filter(ctx: &crate::context::Context, f: &TimelineFilter) -> Filter {
    let mut filter = Filter {
        text: f.q.clone().filter(|q| !q.trim().is_empty()),
        ..Filter::default()
    };
    for part in f
        .kind
        .iter()
        .flat_map(|k| k.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match part.strip_suffix(".*") {
            Some(ns) => filter.kind_prefixes.push(ns.to_owned()),
            None => filter.kinds.push(part.to_owned()),
        }
    }
    filter.min_severity = f.severity.as_deref().and_then(|s| s.parse().ok());
    filter.since = f
        .since
        .as_deref()
        .and_then(|h| h.parse::<i64>().ok())
        .filter(|h| (1..=24 * 366).contains(h))
        .and_then(|h| ctx.now().checked_sub(SignedDuration::from_hours(h)).ok())
        .map(to_micros);
    filter
}

/// Marks the events recorded after `seen` (microseconds), and where the
/// already seen ones begin.
fn mark_new(events: &mut [EventLine], seen: i64) {
    let mut any_new = false;
    for e in events.iter_mut() {
        e.new = e.recorded > seen;
        if e.new {
            any_new = true;
        } else if any_new {
            e.first_seen = true;
            break;
        }
    }
}

fn event_line(e: crate::timeline::Event, origins: &Origins) -> EventLine {
    EventLine {
        from: origins.of(&e.origin),
        new: false,
        first_seen: false,
        recorded: to_micros(e.recorded_at),
        at: e.occurred_at.to_string(),
        at_short: e.occurred_at.strftime("%a %d %b %H:%M").to_string(),
        kind: e.kind,
        system: e.system,
        title: e.title,
        actor: e.actor.name,
        severity: e.severity.to_string(),
        body_html: crate::ui::markdown(&e.body),
    }
}

/// A page of 50 events of the closure, and the link to the next.
async fn timeline_part(
    ctx: &crate::context::Context,
    closure: &[String],
    slug: &str,
    f: &TimelineFilter,
) -> Result<(Vec<EventLine>, Option<More>), super::SystemError> {
    let filter = parse_filter(ctx, f);
    let before = f
        .cursor
        .as_deref()
        .and_then(crate::timeline::store::Cursor::decode);
    let mut events = page(ctx.db.reader(), closure, &filter, before.as_ref(), 51).await?;
    let more = if events.len() > 50 {
        events.truncate(50);
        events.last().map(|e| {
            let qs = filter_query(f, Some(crate::timeline::store::Cursor::of(e).encode()));
            let slug = crate::cli::encode(slug);
            More {
                page: format!("/systems/{slug}{qs}"),
                fragment: format!("/systems/{slug}/events{qs}"),
            }
        })
    } else {
        None
    };
    let origins = Origins::load(ctx).await?;
    Ok((
        events
            .into_iter()
            .map(|e| event_line(e, &origins))
            .collect(),
        more,
    ))
}

#[derive(Template)]
#[template(path = "systems/events.html")]
struct EventsFragment {
    slug: String,
    events: Vec<EventLine>,
    more: Option<More>,
}

/// Checks the session's role on a system; `None` if the system is not there
/// for this user. Returns the closure the user's view of it rolls up.
async fn viewable(
    ctx: &crate::context::Context,
    session: &crate::users::sessions::Session,
    slug: &str,
) -> Result<Option<Vec<String>>, super::SystemError> {
    let access = Access::of(ctx, session.principal.clone()).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let Some(id) = super::store::ids_by_slugs(&mut conn, &[slug.to_owned()])
        .await?
        .remove(slug)
    else {
        return Ok(None);
    };
    let graph = super::store::load_graph(&mut conn).await?;
    let role = access.role_on(&graph, &id);
    Ok(role.map(|_| access.view(graph).closure(&id)))
}

/// The next page of events, as list items (infinite scroll). Role: viewer.
async fn events_fragment(
    State(ctx): State<AppState>,
    Page(session): Page,
    axum::extract::Path(slug): axum::extract::Path<String>,
    axum::extract::Query(f): axum::extract::Query<TimelineFilter>,
) -> Response {
    let result = async {
        let Some(closure) = viewable(&ctx, &session, &slug).await? else {
            return Ok(None);
        };
        let (events, more) = timeline_part(&ctx, &closure, &slug, &f).await?;
        Ok::<_, super::SystemError>(Some(EventsFragment {
            slug: slug.clone(),
            events,
            more,
        }))
    };
    match result.await {
        Ok(Some(fragment)) => render(StatusCode::OK, &fragment),
        Ok(None) => not_found(&slug),
        Err(e) => page_error(&e),
    }
}

/// New events as they are recorded, as list items over server-sent events
/// (`event: event`), for htmx's SSE extension. Role: viewer.
async fn live_fragments(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: axum::http::HeaderMap,
    axum::extract::Path(slug): axum::extract::Path<String>,
    axum::extract::Query(f): axum::extract::Query<TimelineFilter>,
) -> Response {
    use axum::response::sse::{Event as Sse, KeepAlive};
    use axum::response::IntoResponse;
    let allowed = match viewable(&ctx, &session, &slug).await {
        Ok(Some(_)) => true,
        Ok(None) => false,
        Err(e) => return page_error(&e),
    };
    let Ok(parsed) = crate::systems::model::Slug::try_from(slug.as_str()) else {
        return not_found(&slug);
    };
    if !allowed {
        return not_found(&slug);
    }
    let access = match Access::of(&ctx, session.principal.clone()).await {
        Ok(access) => access,
        Err(e) => return page_error(&e),
    };
    let events = match crate::timeline::http::live(
        ctx.clone(),
        parsed,
        parse_filter(&ctx, &f),
        None,
        access,
        crate::timeline::http::Watcher::Session(
            crate::ui::session_cookie(&headers).unwrap_or_default(),
        ),
    )
    .await
    {
        Ok(events) => events,
        Err(e) => return page_error(&e),
    };
    let origins = match Origins::load(&ctx).await {
        Ok(origins) => origins,
        Err(e) => return page_error(&e),
    };
    let slug_for_items = slug.clone();
    let stream = futures_util::StreamExt::map(events, move |e| {
        let fragment = EventsFragment {
            slug: slug_for_items.clone(),
            events: vec![event_line(e, &origins)],
            more: None,
        };
        let html = askama::Template::render(&fragment).unwrap_or_default();
        // SSE data lines must not contain newlines.
        Ok::<_, std::convert::Infallible>(
            Sse::default().event("event").data(html.replace('\n', " ")),
        )
    });
    axum::response::Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
