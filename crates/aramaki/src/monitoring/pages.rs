//! Observations and checks on the system page: the latest result of every
//! check with its recent history on demand, the checks that run there and,
//! for instance admins (checks run commands on hosts), adding and deleting
//! them. Validated by the same domain code as the API.

use std::collections::BTreeMap;

use aramaki_protocol::agent::CheckState;
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use jiff::Timestamp;
use serde::Deserialize;

use super::checks::CheckSpec;
use super::{store, Check, MonitoringError};
use crate::cli::encode;
use crate::systems::model::Invalid;
use crate::ui::{check_form, page_error, render, Page};
use crate::users::access::Access;
use crate::users::sessions::Session;
use crate::users::Role;
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/systems/{slug}/observations/{check}/history",
            get(history_fragment),
        )
        .route("/systems/{slug}/checks", post(add_check))
        .route("/systems/{slug}/checks/{name}/delete", post(delete_check))
}

/// How long ago `then` was, in the largest whole unit.
pub(crate) fn ago(now: Timestamp, then: Timestamp) -> String {
    let secs = now.duration_since(then).as_secs();
    if secs < 0 {
        "just now".to_owned()
    } else {
        format!("{} ago", span(secs))
    }
}

/// A span of seconds in its largest whole unit: `45 s`, `3 min`, `2 d`.
pub(crate) fn span(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

#[derive(Template)]
#[template(path = "monitoring/notice.html")]
struct Notice<'a> {
    user: Option<String>,
    csrf: String,
    title: &'a str,
    text: &'a str,
}

/// A short page saying why a request was not served.
fn notice(session: &Session, status: StatusCode, title: &str, text: &str) -> Response {
    render(
        status,
        &Notice {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            title,
            text,
        },
    )
}

/// Refuses someone logged in without the needed role.
pub(crate) fn forbidden(session: &Session, why: &str) -> Response {
    notice(session, StatusCode::FORBIDDEN, "Not allowed", why)
}

/// Absent and invisible look the same: a 404.
pub(crate) fn not_found(session: &Session, what: &str) -> Response {
    notice(
        session,
        StatusCode::NOT_FOUND,
        "Not found",
        &format!("There is no {what} here."),
    )
}

/// After a form: htmx is told to load `to` as a whole page (a redirect it
/// would follow and swap into the form), a browser gets a 303.
pub(crate) fn go_to(headers: &HeaderMap, to: &str) -> Response {
    if headers.contains_key("hx-request") {
        (StatusCode::OK, [("hx-redirect", to.to_owned())]).into_response()
    } else {
        Redirect::to(to).into_response()
    }
}

/// The first line of a check's output, cut to a readable length.
fn first_line(output: &str) -> String {
    output
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect()
}

/// `k=v,k2=v2`, the way history links name a label set.
fn labels_param(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The system's id and the caller's role on it; `None` when the system is
/// absent or invisible to the caller (both are a 404).
async fn role_on(
    ctx: &AppState,
    session: &Session,
    slug: &str,
) -> Result<Option<(String, Role)>, sqlx::Error> {
    let access = Access::of(ctx, session.principal.clone()).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let Some(id) = crate::systems::store::ids_by_slugs(&mut conn, &[slug.to_owned()])
        .await?
        .remove(slug)
    else {
        return Ok(None);
    };
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    Ok(access.role_on(&graph, &id).map(|role| (id, role)))
}

/// Whether a check runs on (or reports for) the system `slug`.
fn applies_to(check: &Check, slug: &str) -> bool {
    let subscription = format!("system:{slug}");
    check
        .spec
        .system
        .as_ref()
        .is_some_and(|s| s.as_str() == slug)
        || check.spec.subscriptions.contains(&subscription)
}

struct ObservationLine {
    check: String,
    labels: Vec<String>,
    state: String,
    first_line: String,
    at: String,
    age: String,
    occurrences: i64,
    history_url: String,
}

struct CheckLine {
    name: String,
    run: String,
    schedule: String,
    timeout: u32,
    ttl: Option<u32>,
    occurrences: u32,
    delete_url: String,
}

impl CheckLine {
    fn of(c: &Check, slug: &str) -> CheckLine {
        let redacted = c.spec.redacted();
        let s = &redacted;
        let run = match (&s.command, &s.shell, &s.probe) {
            (Some(argv), _, _) => argv.join(" "),
            (None, Some(script), _) => format!("sh -c {script}"),
            (None, None, Some(probe)) => {
                format!("probe {}", serde_json::to_string(probe).unwrap_or_default())
            }
            (None, None, None) => String::new(),
        };
        let schedule = match (&s.cron, s.interval) {
            (Some(expr), _) => format!("cron {expr}"),
            (None, Some(secs)) => format!("every {secs} s"),
            (None, None) => String::new(),
        };
        CheckLine {
            name: s.name.clone(),
            run,
            schedule,
            timeout: s.timeout,
            ttl: s.ttl,
            occurrences: s.occurrences,
            delete_url: format!(
                "/systems/{}/checks/{}/delete",
                encode(slug),
                encode(&s.name)
            ),
        }
    }
}

/// One input of the add-a-check form, with its error if it had one.
struct Field {
    name: &'static str,
    label: &'static str,
    hint: &'static str,
    value: String,
    required: bool,
    error: Option<String>,
}

/// The add-a-check form, as typed.
#[derive(Debug, Default, Deserialize)]
struct CheckInput {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    command: String,
    #[serde(default)]
    interval: String,
    #[serde(default)]
    timeout: String,
    #[serde(default)]
    ttl: String,
    #[serde(default)]
    occurrences: String,
}

const FORM_FIELDS: [&str; 6] = [
    "name",
    "command",
    "interval",
    "timeout",
    "ttl",
    "occurrences",
];

struct CheckForm {
    action: String,
    fields: Vec<Field>,
    general_error: Option<String>,
}

impl CheckInput {
    /// The form with these values and `errors` placed next to their fields.
    fn form(&self, slug: &str, errors: &[Invalid]) -> CheckForm {
        let error_of = |name: &str| {
            errors
                .iter()
                .find(|e| e.field == name)
                .map(|e| e.message.clone())
        };
        let field = |name, label, hint, value: &str, required| Field {
            name,
            label,
            hint,
            value: value.to_owned(),
            required,
            error: error_of(name),
        };
        let general: Vec<String> = errors
            .iter()
            .filter(|e| !FORM_FIELDS.contains(&e.field.as_str()))
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        CheckForm {
            action: format!("/systems/{}/checks", encode(slug)),
            fields: vec![
                field(
                    "name",
                    "Name",
                    "Lowercase letters, digits, '-', '_' and '.', such as disk-root.",
                    &self.name,
                    true,
                ),
                field(
                    "command",
                    "Command",
                    "The program and its arguments, split on spaces; no shell.",
                    &self.command,
                    true,
                ),
                field("interval", "Interval (seconds)", "", &self.interval, true),
                field(
                    "timeout",
                    "Timeout (seconds)",
                    "Default 60.",
                    &self.timeout,
                    false,
                ),
                field(
                    "ttl",
                    "TTL (seconds)",
                    "Optional: critical when no result arrives for this long.",
                    &self.ttl,
                    false,
                ),
                field(
                    "occurrences",
                    "Occurrences",
                    "A non-OK result must repeat this often to count; default 1.",
                    &self.occurrences,
                    false,
                ),
            ],
            general_error: (!general.is_empty()).then(|| general.join("; ")),
        }
    }

    /// The check the form describes, run by the system's agents
    /// (`system:<slug>`), or what is wrong with it.
    fn spec(&self, slug: &str) -> Result<CheckSpec, Vec<Invalid>> {
        fn number(field: &str, text: &str, default: Option<u32>) -> Result<Option<u32>, Invalid> {
            match text.trim() {
                "" => Ok(default),
                t => t
                    .parse()
                    .map(Some)
                    .map_err(|_| Invalid::new(field, "must be a whole number")),
            }
        }
        let mut errors = Vec::new();
        let mut take = |r: Result<Option<u32>, Invalid>| {
            r.unwrap_or_else(|e| {
                errors.push(e);
                None
            })
        };
        let interval = take(number("interval", &self.interval, None));
        let timeout = take(number("timeout", &self.timeout, Some(60)));
        let ttl = take(number("ttl", &self.ttl, None));
        let occurrences = take(number("occurrences", &self.occurrences, Some(1)));
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut spec = CheckSpec::new(self.name.trim(), vec![format!("system:{slug}")]);
        spec.command = Some(self.command.split_whitespace().map(str::to_owned).collect());
        spec.interval = interval;
        spec.timeout = timeout.unwrap_or(60);
        spec.ttl = ttl;
        spec.occurrences = occurrences.unwrap_or(1);
        spec.validate().map_err(|e| vec![e])?;
        Ok(spec)
    }
}

#[derive(Template)]
#[template(path = "monitoring/section.html")]
struct Section {
    csrf: String,
    slug: String,
    observations: Vec<ObservationLine>,
    checks: Vec<CheckLine>,
    can_manage: bool,
    form: Option<CheckForm>,
}

/// The observations and checks of a system, as HTML for its page. The
/// caller has checked the viewer role. A template error shows as a note in
/// place, so the rest of the page still renders.
pub async fn section(
    ctx: &AppState,
    session: &Session,
    system_id: &str,
    slug: &str,
) -> Result<String, sqlx::Error> {
    let mut conn = ctx.db.reader().acquire().await?;
    let now = ctx.now();
    let observations = store::observations(&mut conn, Some(&[system_id.to_owned()]))
        .await?
        .into_iter()
        .map(|o| ObservationLine {
            history_url: format!(
                "/systems/{}/observations/{}/history?labels={}",
                encode(slug),
                encode(&o.check),
                encode(&labels_param(&o.labels))
            ),
            labels: o.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            state: o.state,
            first_line: first_line(&o.output),
            at: o.executed_at.to_string(),
            age: ago(now, o.executed_at),
            occurrences: o.occurrences,
            check: o.check,
        })
        .collect();
    let checks = store::checks(&mut conn)
        .await?
        .iter()
        .filter(|c| applies_to(c, slug))
        .map(|c| CheckLine::of(c, slug))
        .collect();
    let can_manage = session.principal.may_everywhere(Role::Admin);
    let section = Section {
        csrf: session.csrf.clone(),
        slug: slug.to_owned(),
        observations,
        checks,
        can_manage,
        form: can_manage.then(|| CheckInput::default().form(slug, &[])),
    };
    Ok(section.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "observations section failed");
        "<p class=\"error\">Observations could not be shown; this has been logged.</p>".to_owned()
    }))
}

struct SampleLine {
    at: String,
    at_short: String,
    state: String,
    first_line: String,
}

#[derive(Template)]
#[template(path = "monitoring/history.html")]
struct HistoryFragment {
    samples: Vec<SampleLine>,
}

#[derive(Deserialize)]
struct HistoryQuery {
    /// The label set, as `k=v,k2=v2`; absent for every label set.
    labels: Option<String>,
}

/// The last 50 results of a check on a system, as a fragment for the
/// observation's `<details>`. Role: viewer on the system.
async fn history_fragment(
    State(ctx): State<AppState>,
    Page(session): Page,
    Path((slug, check)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let result = async {
        let Some((id, _)) = role_on(&ctx, &session, &slug).await? else {
            return Ok(None);
        };
        let labels_key = q.labels.as_deref().map(|l| {
            let set: BTreeMap<&str, &str> = l
                .split(',')
                .filter_map(|pair| pair.split_once('='))
                .collect();
            serde_json::to_string(&set).unwrap_or_default()
        });
        let mut conn = ctx.db.reader().acquire().await?;
        let samples = store::history(&mut conn, &id, &check, labels_key.as_deref(), None, 50)
            .await?
            .into_iter()
            .map(|s| SampleLine {
                at: s.executed_at.to_string(),
                at_short: s.executed_at.strftime("%a %d %b %H:%M:%S").to_string(),
                state: CheckState::from_exit(s.status).as_str().to_owned(),
                first_line: first_line(&s.output),
            })
            .collect();
        Ok::<_, sqlx::Error>(Some(HistoryFragment { samples }))
    };
    match result.await {
        Ok(Some(fragment)) => render(StatusCode::OK, &fragment),
        Ok(None) => not_found(&session, &format!("system '{slug}'")),
        Err(e) => page_error(&e),
    }
}

#[derive(Template)]
#[template(path = "monitoring/check_page.html")]
struct CheckPage {
    user: Option<String>,
    csrf: String,
    slug: String,
    form: CheckForm,
}

/// Adds a check run by the system's agents; a refused form comes back with
/// the errors next to their fields. Role: instance admin.
async fn add_check(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path(slug): Path<String>,
    Form(input): Form<CheckInput>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&input.csrf)) {
        return refused.into_response();
    }
    match role_on(&ctx, &session, &slug).await {
        Ok(Some(_)) => {}
        Ok(None) => return not_found(&session, &format!("system '{slug}'")),
        Err(e) => return page_error(&e),
    }
    if !session.principal.may_everywhere(Role::Admin) {
        return forbidden(
            &session,
            "Adding checks needs the instance admin role: checks run commands on hosts.",
        );
    }
    let refused = |errors: Vec<Invalid>| {
        render(
            StatusCode::UNPROCESSABLE_ENTITY,
            &CheckPage {
                user: Some(session.principal.display_name.clone()),
                csrf: session.csrf.clone(),
                slug: slug.clone(),
                form: input.form(&slug, &errors),
            },
        )
    };
    let spec = match input.spec(&slug) {
        Ok(spec) => spec,
        Err(errors) => return refused(errors),
    };
    match super::save_check(&ctx, &session.principal.actor(), spec, false).await {
        Ok(_) => go_to(&headers, &format!("/systems/{}#checks", encode(&slug))),
        Err(MonitoringError::Invalid(i)) => refused(vec![i]),
        Err(e @ MonitoringError::Exists(_)) => refused(vec![Invalid::new("name", e.to_string())]),
        Err(
            e @ (MonitoringError::UnknownSystem(_)
            | MonitoringError::NotFound(_)
            | MonitoringError::Remote(_)),
        ) => refused(vec![Invalid::new("system", e.to_string())]),
        Err(MonitoringError::Db(e)) => page_error(&e),
        Err(e @ MonitoringError::Audit(_)) => page_error(&e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Deletes a check that applies to this system; agents stop running it at
/// once, its results stay. Role: instance admin.
async fn delete_check(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path((slug, name)): Path<(String, String)>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    let result = async {
        if role_on(&ctx, &session, &slug).await?.is_none() {
            return Ok(Err(not_found(&session, &format!("system '{slug}'"))));
        }
        if !session.principal.may_everywhere(Role::Admin) {
            return Ok(Err(forbidden(
                &session,
                "Deleting checks needs the instance admin role.",
            )));
        }
        let mut conn = ctx.db.reader().acquire().await?;
        let check = store::check(&mut conn, &name).await?;
        drop(conn);
        if !check.is_some_and(|c| applies_to(&c, &slug)) {
            return Ok(Err(not_found(
                &session,
                &format!("check '{name}' on '{slug}'"),
            )));
        }
        super::delete_check(&ctx, &session.principal.actor(), &name).await?;
        Ok::<_, MonitoringError>(Ok(()))
    };
    match result.await {
        Ok(Ok(())) => go_to(&headers, &format!("/systems/{}#checks", encode(&slug))),
        Ok(Err(refusal)) => refusal,
        Err(MonitoringError::NotFound(_)) => not_found(&session, &format!("check '{name}'")),
        Err(e) => page_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_the_largest_whole_unit() {
        let now: Timestamp = "2026-11-23T08:00:00Z".parse().unwrap();
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        assert_eq!(ago(now, at("2026-11-23T07:59:30Z")), "30 s ago");
        assert_eq!(ago(now, at("2026-11-23T07:30:00Z")), "30 min ago");
        assert_eq!(ago(now, at("2026-11-23T05:00:00Z")), "3 h ago");
        assert_eq!(ago(now, at("2026-11-20T08:00:00Z")), "3 d ago");
    }

    #[test]
    fn the_form_splits_argv_and_fills_defaults() {
        let input = CheckInput {
            name: "disk".into(),
            command: " check_disk  -w 10% ".into(),
            interval: "60".into(),
            ..CheckInput::default()
        };
        let spec = input.spec("shop").unwrap();
        assert_eq!(spec.command.unwrap(), ["check_disk", "-w", "10%"]);
        assert_eq!(spec.subscriptions, ["system:shop"]);
        assert_eq!((spec.timeout, spec.occurrences, spec.ttl), (60, 1, None));
        let bad = CheckInput {
            interval: "soon".into(),
            ..input
        };
        assert_eq!(bad.spec("shop").unwrap_err()[0].field, "interval");
    }
}
