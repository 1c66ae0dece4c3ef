//! Actions on the system page and their runs: what each action does, who
//! may run it and when, its last runs, a form to run it for those holding
//! its role, and a run's page with live output. The rules (role, parameters,
//! windows, confirmation) are the domain's, in `runs::start`; these pages
//! ask and show.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use jiff::Timestamp;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::model::ParamType;
use super::runs::{Run, RunRequest};
use super::{runs, store, Action, ActionError};
use crate::cli::encode;
use crate::monitoring::pages::{ago, forbidden, go_to, not_found};
use crate::ui::{check_form, page_error, render, Page};
use crate::users::access::Access;
use crate::users::sessions::Session;
use crate::users::Role;
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/systems/{slug}/actions/{name}/run", post(run_action))
        .route("/systems/{slug}/actions", post(define_action))
        .route("/actions/runs/{id}", get(run_page))
        .route("/actions/runs/{id}/stream", get(run_stream))
        .route("/actions/runs/{id}/cancel", post(cancel_run))
}

/// A moment as people read it in a sentence; the exact time is in
/// `datetime` attributes.
fn when(at: Timestamp) -> String {
    at.strftime("%a %d %b %H:%M:%S UTC").to_string()
}

fn run_url(id: &str) -> String {
    format!("/actions/runs/{}", encode(id))
}

/// The caller's access and role on the system `slug`, with its id; `None`
/// when the system is absent or invisible to them (both are a 404).
async fn role_on(
    ctx: &AppState,
    session: &Session,
    slug: &str,
) -> Result<Option<(Access, String, Role)>, sqlx::Error> {
    let access = Access::of(ctx, session.principal.clone()).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let Some((id, _)) = crate::agents::store::system_by_slug(&mut conn, slug).await? else {
        return Ok(None);
    };
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    Ok(access.role_on(&graph, &id).map(|role| (access, id, role)))
}

/// A run with the caller's access and role on its system; `None` when
/// the run is absent or its system invisible to them.
async fn visible_run(
    ctx: &AppState,
    session: &Session,
    id: &str,
) -> Result<Option<(Run, Access, Role)>, sqlx::Error> {
    let run = {
        let mut conn = ctx.db.reader().acquire().await?;
        store::run(&mut conn, id).await?
    };
    let Some(run) = run else { return Ok(None) };
    // By the run's system id (a slug may since name another system), and
    // only the targets the viewer may see.
    let access = Access::of(ctx, session.principal.clone()).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let graph = crate::systems::store::load_graph(&mut conn).await?;
    let role = graph
        .node(&run.system_id)
        .and_then(|_| access.role_on(&graph, &run.system_id));
    Ok(role.map(|role| (run.seen_by(&access, &graph), access, role)))
}

/// One input of a run form, with the value as typed and its error.
struct ParamField {
    name: String,
    /// `params.<name>`: the form field, and the field a refusal names.
    field: String,
    /// string, enum, integer or boolean: which input to show.
    kind: &'static str,
    description: String,
    value: String,
    checked: bool,
    required: bool,
    pattern: Option<String>,
    max_len: usize,
    min: Option<i64>,
    max: Option<i64>,
    options: Vec<String>,
    /// An enum without a default starts unchosen.
    blank_option: bool,
    error: Option<String>,
}

/// A form to run one action, as first shown or as sent back refused.
struct RunForm {
    id: String,
    url: String,
    params: Vec<ParamField>,
    /// The window policy, when the action is outside its windows now: a
    /// run then needs a reason.
    override_policy: Option<String>,
    override_reason: String,
    /// Why the last submission was refused.
    refusal: Option<String>,
    /// The question when it ran here recently; answering resubmits with
    /// `confirm=true`.
    confirm: Option<String>,
    /// The run a refusal refers to (the recent or the running one).
    related: Option<String>,
    submit: &'static str,
}

/// What a run form sent, field by field.
type Posted = HashMap<String, String>;

impl RunForm {
    /// The form for `action`, filled with what was posted, else the defaults.
    fn new(action: &Action, slug: &str, now: Timestamp, posted: Option<&Posted>) -> RunForm {
        let spec = &action.spec;
        let params = spec
            .params
            .iter()
            .map(|p| {
                let field = format!("params.{}", p.name);
                let given = posted.map(|f| f.get(&field).cloned().unwrap_or_default());
                let default = p.default.clone().unwrap_or_default();
                ParamField {
                    kind: match p.kind {
                        ParamType::String => "string",
                        ParamType::Enum => "enum",
                        ParamType::Integer => "integer",
                        ParamType::Boolean => "boolean",
                    },
                    checked: given.as_deref().unwrap_or(&default) == "true",
                    value: given.unwrap_or(default),
                    name: p.name.clone(),
                    field,
                    description: p.description.clone(),
                    required: p.required,
                    pattern: p.pattern.clone(),
                    max_len: p.max_len,
                    min: p.min,
                    max: p.max,
                    options: p.values.clone(),
                    blank_option: p.default.is_none(),
                    error: None,
                }
            })
            .collect();
        let override_policy = (!spec.in_window(now)).then(|| {
            format!(
                "It may run {}; it is outside now. To run it anyway, say why: the run is flagged on the timeline as an emergency override.",
                spec.describe_windows()
            )
        });
        RunForm {
            id: format!("run-{}", spec.name),
            url: format!(
                "/systems/{}/actions/{}/run",
                encode(slug),
                encode(&spec.name)
            ),
            params,
            override_policy,
            override_reason: posted
                .and_then(|f| f.get("override_reason").cloned())
                .unwrap_or_default(),
            refusal: None,
            confirm: None,
            related: None,
            submit: "Run",
        }
    }

    /// Places a refusal: next to its field, as a question, or on top.
    fn refused(
        &mut self,
        code: &str,
        message: String,
        details: &serde_json::Value,
        title: &str,
        now: Timestamp,
    ) {
        let field = details["field"].as_str().unwrap_or("");
        self.related = details["run"].as_str().map(run_url);
        if code == "invalid_params" {
            if let Some(p) = self.params.iter_mut().find(|p| p.field == field) {
                let prefix = format!("{field}: ");
                p.error = Some(message.strip_prefix(&prefix).unwrap_or(&message).to_owned());
                self.refusal = Some("Fix the marked parameter and run it again.".into());
                return;
            }
        }
        if code == "confirm" {
            let by = details["by"].as_str().unwrap_or("someone");
            let state = details["state"].as_str().unwrap_or("");
            let when = details["at"]
                .as_str()
                .and_then(|at| at.parse::<Timestamp>().ok())
                .map(|at| format!("{} ({})", ago(now, at), when(at)))
                .unwrap_or_default();
            self.confirm = Some(format!(
                "“{title}” ran on these targets {when} by {by} ({state}). Run it again?"
            ));
            self.submit = "Yes, run it again";
            return;
        }
        self.refusal = Some(message);
    }

    /// The run request the posted form makes. An unchecked box is `false`;
    /// an empty field takes the parameter's default. The override reason
    /// counts only outside the windows (it flags the run).
    fn request(&self, posted: &Posted) -> RunRequest {
        let params = self
            .params
            .iter()
            .filter_map(|p| {
                let given = posted.get(&p.field).map(String::as_str).unwrap_or("");
                let value = match p.kind {
                    "boolean" => (given == "true").to_string(),
                    "integer" if !given.trim().is_empty() => given.trim().to_owned(),
                    _ if !given.trim().is_empty() => given.to_owned(),
                    _ => return None,
                };
                Some((p.name.clone(), serde_json::Value::String(value)))
            })
            .collect();
        RunRequest {
            params,
            confirm: posted.get("confirm").is_some_and(|c| c == "true"),
            override_reason: self
                .override_policy
                .as_ref()
                .and(posted.get("override_reason").cloned()),
        }
    }
}

/// One of an action's last runs, as a table row.
struct RunLine {
    url: String,
    who: String,
    at: String,
    age: String,
    params: Vec<String>,
    /// (agent, state)
    targets: Vec<(String, String)>,
}

fn param_list(params: &BTreeMap<String, String>) -> Vec<String> {
    params.iter().map(|(k, v)| format!("{k}={v}")).collect()
}

struct ActionCard {
    name: String,
    title: String,
    description_html: String,
    role: String,
    windows: String,
    in_window: bool,
    read_only: bool,
    runs: Vec<RunLine>,
    form: Option<RunForm>,
}

#[derive(Template)]
#[template(path = "actions/section.html")]
struct Section {
    csrf: String,
    actions: Vec<ActionCard>,
    /// For admins of the system: defining (or redefining) an action.
    define: Option<DefineForm>,
}

/// The JSON definition form, with the error of a refused attempt.
#[derive(Debug, Clone)]
struct DefineForm {
    slug: String,
    spec: String,
    error: Option<String>,
}

/// What the form starts with: every rule, so that it can be edited in place.
const SPEC_TEMPLATE: &str = r#"{
  "name": "flush-cache",
  "title": "Flush the cache",
  "description": "What it does, and when to use it.",
  "params": [{"name": "path", "type": "string", "pattern": "/[A-Za-z0-9/._-]*", "default": "/"}],
  "role": "operator",
  "timeout": 60,
  "concurrency": 1,
  "confirm_within_minutes": 30,
  "windows": [],
  "timezone": "UTC",
  "read_only": false
}"#;

/// The actions of a system, as HTML for its page. Role: viewer on the
/// system (checked by the caller, who passes the role) sees them and their
/// last runs; a run form shows for whoever holds an action's role. A
/// template error shows as a note in place.
pub async fn section(
    ctx: &AppState,
    session: &Session,
    system_id: &str,
    slug: &str,
    role: Role,
) -> Result<String, sqlx::Error> {
    let mut conn = ctx.db.reader().acquire().await?;
    let now = ctx.now();
    let mut actions = Vec::new();
    for action in store::actions(&mut conn, Some(&[system_id.to_owned()])).await? {
        // A deleted action that has runs is kept under another name.
        let current = store::action(&mut conn, system_id, &action.spec.name).await?;
        if current.is_none_or(|c| c.id != action.id) {
            continue;
        }
        let runs = store::runs_of(&mut conn, &action.id, 5)
            .await?
            .into_iter()
            .map(|r| RunLine {
                url: run_url(&r.id),
                who: r.actor.name,
                at: r.started_at.to_string(),
                age: ago(now, r.started_at),
                params: param_list(&r.params),
                targets: r.targets.into_iter().map(|t| (t.agent, t.state)).collect(),
            })
            .collect();
        let spec = &action.spec;
        let may_run = spec.required_role().is_ok_and(|needed| role >= needed);
        actions.push(ActionCard {
            name: spec.name.clone(),
            title: spec.title.clone(),
            description_html: crate::ui::markdown(&spec.description),
            role: spec.role.clone(),
            windows: if spec.windows.is_empty() {
                "any time".into()
            } else {
                spec.describe_windows()
            },
            in_window: spec.in_window(now),
            read_only: spec.read_only,
            runs,
            form: may_run.then(|| RunForm::new(&action, slug, now, None)),
        });
    }
    let section = Section {
        csrf: session.csrf.clone(),
        actions,
        define: (role >= Role::Admin).then(|| DefineForm {
            slug: slug.to_owned(),
            spec: SPEC_TEMPLATE.to_owned(),
            error: None,
        }),
    };
    Ok(section.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "actions section failed");
        "<p class=\"error\">Actions could not be shown; this has been logged.</p>".to_owned()
    }))
}

#[derive(Template)]
#[template(path = "actions/define_page.html")]
struct DefinePage {
    user: Option<String>,
    csrf: String,
    define: DefineForm,
}

#[derive(Deserialize)]
struct DefineInput {
    #[serde(default)]
    csrf: String,
    spec: String,
}

/// Defines or redefines an action from its JSON on the system page; a
/// refused definition comes back (422) with the problem named. Role: admin
/// on the system.
async fn define_action(
    State(ctx): State<AppState>,
    Page(session): Page,
    Path(slug): Path<String>,
    headers: HeaderMap,
    Form(input): Form<DefineInput>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&input.csrf)) {
        return refused.into_response();
    }
    let access = match role_on(&ctx, &session, &slug).await {
        Ok(Some((access, _, role))) if role >= Role::Admin => access,
        Ok(Some(_)) => {
            return forbidden(
                &session,
                "defining actions needs the admin role on this system",
            )
        }
        Ok(None) => return not_found(&session, &format!("system '{slug}'")),
        Err(e) => return page_error(&e),
    };
    let again = |error: String| {
        let page = DefinePage {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            define: DefineForm {
                slug: slug.clone(),
                spec: input.spec.clone(),
                error: Some(error),
            },
        };
        render(StatusCode::UNPROCESSABLE_ENTITY, &page)
    };
    // The same strict reading as the API's JSON bodies: no U+0000, no
    // arrays in place of objects, errors that name the field.
    let spec: super::model::ActionSpec =
        match serde_json::from_str::<serde_json::Value>(&input.spec)
            .map_err(|e| e.to_string())
            .and_then(|value| crate::input::from_value(value).map_err(|e| e.to_string()))
        {
            Ok(spec) => spec,
            Err(e) => return again(format!("the definition is not valid: {e}")),
        };
    match super::save(&ctx, &access.actor(), &slug, spec, true).await {
        Ok((action, _)) => go_to(
            &headers,
            &format!("/systems/{}#action-{}", encode(&slug), action.spec.name),
        ),
        Err(ActionError::Invalid(i)) => again(format!("{}: {}", i.field, i.message)),
        Err(ActionError::Db(e)) => page_error(&e),
        Err(e) => again(e.to_string()),
    }
}

#[derive(Template)]
#[template(path = "actions/form_page.html")]
struct FormPage {
    user: Option<String>,
    csrf: String,
    slug: String,
    title: String,
    form: RunForm,
}

/// Runs an action from its form: to the run's page when it starts, else
/// the form again (422) with the refusal on top, next to the parameter it
/// concerns, or as the question whether to run it again. Role: the
/// action's role on the system, enforced by `runs::start`.
async fn run_action(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path((slug, name)): Path<(String, String)>,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let posted: Posted = fields.into_iter().collect();
    let csrf = posted.get("csrf").map(String::as_str);
    if let Err(refused) = check_form(&session, &headers, csrf) {
        return refused.into_response();
    }
    let found = async {
        let Some((access, system_id, _)) = role_on(&ctx, &session, &slug).await? else {
            // A system out of sight (or missing): on the record, as in the API.
            let access = crate::users::access::Access::of(&ctx, session.principal.clone()).await?;
            crate::users::refusals::record(&ctx, &access, "action.run", &slug).await;
            return Ok(None);
        };
        let mut conn = ctx.db.reader().acquire().await?;
        let action = store::action(&mut conn, &system_id, &name).await?;
        Ok::<_, sqlx::Error>(action.map(|a| (access, a)))
    };
    let (access, action) = match found.await {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(&session, &format!("action '{name}' on '{slug}'")),
        Err(e) => return page_error(&e),
    };
    let now = ctx.now();
    let mut form = RunForm::new(&action, &slug, now, Some(&posted));
    let request = form.request(&posted);
    match runs::start(&ctx, &access, &action, request).await {
        Ok(run) => go_to(&headers, &run_url(&run.id)),
        Err(ActionError::Refused {
            code: "forbidden",
            message,
            ..
        }) => forbidden(&session, &message),
        Err(ActionError::Refused {
            code,
            message,
            details,
        }) => {
            form.refused(code, message, &details, &action.spec.title, now);
            render(
                StatusCode::UNPROCESSABLE_ENTITY,
                &FormPage {
                    user: Some(session.principal.display_name.clone()),
                    csrf: session.csrf.clone(),
                    slug,
                    title: action.spec.title.clone(),
                    form,
                },
            )
        }
        Err(ActionError::NotFound { .. } | ActionError::UnknownSystem(_)) => {
            not_found(&session, &format!("action '{name}' on '{slug}'"))
        }
        Err(e) => page_error(&e),
    }
}

struct TargetView {
    /// The id of the target's `<pre>`, which live output is appended to.
    pre: String,
    agent: String,
    state: String,
    exit_code: Option<i32>,
    message: String,
    output: String,
    /// "first N of M bytes" when the output was cut.
    cut: Option<String>,
    /// The timeout the agent applies, when it differs from the run's
    /// ("timeout 60 s (this agent's cap)").
    timeout: Option<String>,
}

/// One distinct answer of a read-only run and the agents that gave it.
#[derive(Debug)]
struct Answer {
    agents: Vec<String>,
    output: String,
}

fn pre_id(index: usize) -> String {
    format!("output-{index}")
}

/// How a grouped answer reads on the page: text as it came, JSON pretty.
fn answer_view(a: &super::runs::Answer) -> Answer {
    let output = match &a.answer {
        serde_json::Value::String(text) => text.clone(),
        json => serde_json::to_string_pretty(json).unwrap_or_default(),
    };
    Answer {
        agents: a.agents.clone(),
        output,
    }
}

#[derive(Template)]
#[template(path = "actions/run.html")]
struct RunPage {
    user: Option<String>,
    csrf: String,
    url: String,
    /// Set while the run runs: its live output.
    stream_url: Option<String>,
    /// Set while it runs, for operators.
    cancel_url: Option<String>,
    action: String,
    title: String,
    system: String,
    actor: String,
    started_at: String,
    started_ago: String,
    /// (exact, readable)
    finished_at: Option<(String, String)>,
    params: Vec<String>,
    override_reason: Option<String>,
    state: String,
    /// "600 s" (the action's; agents may cap it).
    timeout: Option<String>,
    /// Who asked to cancel it.
    cancelled_by: Option<String>,
    targets: Vec<TargetView>,
    /// Grouped outputs of a finished read-only run on several targets.
    answers: Vec<Answer>,
}

/// A run: who ran what with which parameters, and per target its state,
/// exit code and output, streamed live while it runs. Role: viewer of the
/// run's system (else 404); cancelling shows for operators.
async fn run_page(
    State(ctx): State<AppState>,
    Page(session): Page,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let Some((run, _, role)) = visible_run(&ctx, &session, &id).await? else {
            return Ok(None);
        };
        let mut conn = ctx.db.reader().acquire().await?;
        let action = match crate::agents::store::system_by_slug(&mut conn, &run.system).await? {
            Some((system_id, _)) => store::action(&mut conn, &system_id, &run.action).await?,
            None => None,
        };
        Ok::<_, sqlx::Error>(Some((run, role, action)))
    };
    let (run, role, action) = match result.await {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(&session, &format!("run '{id}'")),
        Err(e) => return page_error(&e),
    };
    let running = run.state == "running";
    let read_only = action.as_ref().is_some_and(|a| a.spec.read_only);
    let answers = if read_only && !running && run.targets.len() > 1 {
        run.answers.iter().map(answer_view).collect()
    } else {
        Vec::new()
    };
    let url = run_url(&run.id);
    let page = RunPage {
        user: Some(session.principal.display_name.clone()),
        csrf: session.csrf.clone(),
        stream_url: running.then(|| format!("{url}/stream")),
        cancel_url: (running && role >= Role::Operator).then(|| format!("{url}/cancel")),
        url,
        title: action
            .map(|a| a.spec.title)
            .unwrap_or_else(|| run.action.clone()),
        action: run.action,
        system: run.system,
        actor: run.actor.name,
        started_at: run.started_at.to_string(),
        started_ago: ago(ctx.now(), run.started_at),
        finished_at: run.finished_at.map(|f| (f.to_string(), when(f))),
        params: param_list(&run.params),
        override_reason: run.override_reason,
        state: run.state,
        timeout: run.timeout_secs.map(|t| format!("{t} s")),
        cancelled_by: run.cancelled_by.map(|a| a.name),
        targets: run
            .targets
            .into_iter()
            .enumerate()
            .map(|(i, t)| TargetView {
                timeout: t.timeout_secs.map(|applied| match run.timeout_secs {
                    Some(asked) if applied < asked => {
                        format!(
                            "timeout {applied} s (this agent's cap; the action allows {asked} s)"
                        )
                    }
                    _ => format!("timeout {applied} s"),
                }),
                pre: pre_id(i),
                cut: (t.output_size > t.output.len() as i64)
                    .then(|| format!("first {} of {} bytes", t.output.len(), t.output_size)),
                agent: t.agent,
                state: t.state,
                exit_code: t.exit_code,
                message: t.message,
                output: t.output,
            })
            .collect(),
        answers,
    };
    render(StatusCode::OK, &page)
}

/// Text for a target's `<pre>`: htmx swaps it out of band, `beforeend` for
/// a live chunk, `innerHTML` for what is stored so far.
#[derive(Template)]
#[template(
    source = "{% for (swap, pre, text) in parts %}<span hx-swap-oob=\"{{ swap }}:#{{ pre }}\">{{ text }}</span>{% endfor %}",
    ext = "html"
)]
struct OutputFragment {
    parts: Vec<(&'static str, String, String)>,
}

/// An `output` event: the fragment, carriage returns dropped (an SSE field
/// may not carry one; the `<pre>` keeps the newlines).
fn output_event(parts: Vec<(&'static str, String, String)>) -> SseEvent {
    let html = OutputFragment { parts }.render().unwrap_or_default();
    SseEvent::default()
        .event("output")
        .data(html.replace('\r', ""))
}

/// One viewer following one run until every target is final.
struct Follow {
    ctx: AppState,
    run_id: String,
    /// Agent name → the id of its `<pre>`.
    pres: HashMap<String, String>,
    output: tokio::sync::broadcast::Receiver<crate::agents::hub::LiveOutput>,
    timeline: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::timeline::Event>>,
    closing: tokio::sync::watch::Receiver<bool>,
    /// A safety net for a missed "finished" event.
    tick: tokio::time::Interval,
    pending: VecDeque<SseEvent>,
    finished: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<SseEvent> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        if self.finished {
            return None;
        }
        loop {
            let finished = tokio::select! {
                received = self.output.recv() => match received {
                    Ok(o) if o.run_id == self.run_id => {
                        if let Some(pre) = self.pres.get(&o.agent) {
                            return Some(output_event(vec![("beforeend", pre.clone(), o.chunk)]));
                        }
                        false
                    }
                    // A lagging viewer misses chunks; the final page has them all.
                    Ok(_) | Err(RecvError::Lagged(_)) => false,
                    Err(RecvError::Closed) => return None,
                },
                received = self.timeline.recv() => match received {
                    Ok(e) => e.kind == "action.finished" && e.data["run"] == self.run_id.as_str(),
                    Err(RecvError::Lagged(_)) => self.is_final().await,
                    Err(RecvError::Closed) => return None,
                },
                _ = self.tick.tick() => self.is_final().await,
                _ = self.closing.changed() => return None,
            };
            if finished {
                self.finished = true;
                return Some(SseEvent::default().event("done").data("done"));
            }
        }
    }

    async fn is_final(&self) -> bool {
        let Ok(mut conn) = self.ctx.db.reader().acquire().await else {
            return false;
        };
        match store::run(&mut conn, &self.run_id).await {
            Ok(run) => run.is_none_or(|r| r.state != "running"),
            Err(_) => false,
        }
    }
}

/// A run's output as server-sent events for htmx's SSE extension: first
/// what is stored so far, then each chunk as it arrives (`event: output`,
/// fragments swapped into each target's `<pre>`), and `event: done` once
/// every target is final. Role: viewer of the run's system (else 404).
async fn run_stream(
    State(ctx): State<AppState>,
    Page(session): Page,
    Path(id): Path<String>,
) -> Response {
    // Listen first, then look: nothing between the two is missed.
    let output = ctx.agents.watch_output();
    let timeline = ctx.timeline.listen();
    let run = match visible_run(&ctx, &session, &id).await {
        Ok(Some((run, _, _))) => run,
        Ok(None) => return not_found(&session, &format!("run '{id}'")),
        Err(e) => return page_error(&e),
    };
    let pres: HashMap<String, String> = run
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| (t.agent.clone(), pre_id(i)))
        .collect();
    let running = run.state == "running";
    let mut pending = VecDeque::new();
    if running {
        let stored = run
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| ("innerHTML", pre_id(i), t.output.clone()))
            .collect();
        pending.push_back(output_event(stored));
    } else {
        pending.push_back(SseEvent::default().event("done").data("done"));
    }
    let follow = Follow {
        closing: ctx.timeline.closing(),
        ctx,
        run_id: run.id,
        pres,
        output,
        timeline,
        tick: tokio::time::interval(Duration::from_secs(2)),
        pending,
        finished: !running,
    };
    let stream = futures_util::stream::unfold(follow, |mut follow| async move {
        let event = follow.next().await?;
        Some((Ok::<_, Infallible>(event), follow))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Asks the agents of a running run to stop it. Role: operator on the
/// run's system (404 for those who cannot see it).
async fn cancel_run(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    let access = match visible_run(&ctx, &session, &id).await {
        Ok(Some((_, access, _))) => access,
        Ok(None) => return not_found(&session, &format!("run '{id}'")),
        Err(e) => return page_error(&e),
    };
    match runs::cancel(&ctx, &access, &id).await {
        Ok(run) => go_to(&headers, &run_url(&run.id)),
        // It ended meanwhile: the run page says how.
        Err(ActionError::Refused {
            code: "not_running",
            ..
        }) => go_to(&headers, &run_url(&id)),
        Err(ActionError::Refused { message, .. }) => forbidden(&session, &message),
        Err(ActionError::UnknownRun(_)) => not_found(&session, &format!("run '{id}'")),
        Err(e) => page_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_chunks_are_escaped_and_routed_to_their_pre() {
        let html = OutputFragment {
            parts: vec![("beforeend", pre_id(1), "<b>hi</b>\n".into())],
        }
        .render()
        .unwrap();
        assert_eq!(
            html,
            "<span hx-swap-oob=\"beforeend:#output-1\">&lt;b&gt;hi&lt;/b&gt;\n</span>"
        );
    }
}
