//! Forms for systems: create, edit (title, category, description, handbook,
//! labels, selector, links, contacts), include and exclude. Validated by the
//! same domain code as the API; errors are shown next to their field.

use std::collections::{BTreeMap, HashMap};

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::model::{CategoryName, Contact, LabelSelector, Labels, Link, LinkKind, Slug};
use super::pages::{esc, not_found};
use super::{NewSystem, System, SystemError, SystemPatch};
use crate::context::Context;
use crate::ui::{check_form, page_error, render, Page};
use crate::users::access::Access;
use crate::users::Role;
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/systems/new", get(new_form).post(create))
        .route("/systems/{slug}/edit", get(edit_form).post(save))
        .route("/systems/{slug}/include", post(include))
        .route("/systems/{slug}/exclude/{child}", post(exclude))
}

struct Field {
    name: &'static str,
    label: &'static str,
    hint: &'static str,
    value: String,
    multiline: bool,
    rows: u32,
    required: bool,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "systems/edit.html")]
struct EditPage {
    user: Option<String>,
    csrf: String,
    creating: bool,
    slug: String,
    action: String,
    fields: Vec<Field>,
    general_error: Option<String>,
}

/// The form's fields as text, the way people type them.
#[derive(Debug, Default, Deserialize)]
struct SystemForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    slug: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    category: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    handbook: String,
    /// `key=value`, one a line.
    #[serde(default)]
    labels: String,
    #[serde(default)]
    selector: String,
    /// `kind | title | url`, one a line.
    #[serde(default)]
    links: String,
    /// `name | role | how to reach | order`, one a line.
    #[serde(default)]
    contacts: String,
}

impl SystemForm {
    fn of(s: &System) -> SystemForm {
        SystemForm {
            csrf: String::new(),
            slug: s.slug.to_string(),
            title: s.title.clone(),
            category: s.category.to_string(),
            description: s.description.clone(),
            handbook: s.handbook.clone(),
            labels: s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("\n"),
            selector: s
                .selector
                .as_ref()
                .map(|x| x.to_string())
                .unwrap_or_default(),
            links: s
                .links
                .iter()
                .map(|l| format!("{} | {} | {}", kind_word(l.kind), l.title, l.url))
                .collect::<Vec<_>>()
                .join("\n"),
            contacts: s
                .contacts
                .iter()
                .map(|c| format!("{} | {} | {} | {}", c.name, c.role, c.reach, c.escalation))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    fn fields(&self, creating: bool, errors: &HashMap<&'static str, String>) -> Vec<Field> {
        let f = |name: &'static str,
                 label: &'static str,
                 hint: &'static str,
                 value: &str,
                 multiline: bool,
                 rows: u32,
                 required: bool| Field {
            name,
            label,
            hint,
            value: value.to_owned(),
            multiline,
            rows,
            required,
            error: errors.get(name).cloned(),
        };
        let mut out = Vec::new();
        if creating {
            out.push(f(
                "slug",
                "Slug",
                "Lowercase letters, digits and '-', such as storage-dc1.",
                &self.slug,
                false,
                1,
                true,
            ));
        }
        out.extend([
            f("title", "Title", "", &self.title, false, 1, true),
            f("category", "Category", "infrastructure, service, project, environment, host, or one you added.", &self.category, false, 1, true),
            f("description", "Description", "Markdown.", &self.description, true, 3, false),
            f("handbook", "Handbook", "Markdown: what may be touched, when to escalate, to whom.", &self.handbook, true, 8, false),
            f("labels", "Labels", "key=value, one a line.", &self.labels, true, 3, false),
            f("selector", "Selector", "Makes this a dynamic aggregate of every system matching it, such as role=storage,dc=dc1.", &self.selector, false, 1, false),
            f("links", "Links", "kind | title | URL, one a line; kinds: dashboard, docs, repository, runbook, chat, other.", &self.links, true, 4, false),
            f("contacts", "Contacts", "name | role | how to reach | escalation order, one a line.", &self.contacts, true, 4, false),
        ]);
        out
    }

    /// Parses the text fields; errors by field name.
    fn parse(&self) -> Result<Parsed, HashMap<&'static str, String>> {
        let mut errors = HashMap::new();
        let category = CategoryName::try_from(self.category.trim().to_owned())
            .map_err(|e| errors.insert("category", e))
            .ok();
        let mut labels = BTreeMap::new();
        for (i, line) in lines(&self.labels) {
            match line.split_once('=') {
                Some((k, v)) => {
                    labels.insert(k.trim().to_owned(), v.trim().to_owned());
                }
                None => {
                    errors.insert("labels", format!("line {i}: '{line}' is not key=value"));
                }
            }
        }
        let labels = Labels::try_from(labels)
            .map_err(|e| errors.entry("labels").or_insert(e).clone())
            .ok();
        let selector = match self.selector.trim() {
            "" => Some(None),
            s => LabelSelector::try_from(s)
                .map(Some)
                .map_err(|e| errors.insert("selector", e))
                .ok(),
        };
        let mut links = Vec::new();
        for (i, line) in lines(&self.links) {
            let parts: Vec<&str> = line.splitn(3, '|').map(str::trim).collect();
            match parts.as_slice() {
                [kind, title, url] => match parse_kind(kind) {
                    Some(kind) => links.push(Link {
                        title: (*title).to_owned(),
                        url: (*url).to_owned(),
                        kind,
                    }),
                    None => {
                        errors.insert("links", format!("line {i}: unknown kind '{kind}'"));
                    }
                },
                _ => {
                    errors.insert("links", format!("line {i}: expected kind | title | URL"));
                }
            }
        }
        let mut contacts = Vec::new();
        for (i, line) in lines(&self.contacts) {
            let parts: Vec<&str> = line.split('|').map(str::trim).collect();
            let escalation = match parts.get(3) {
                Some(n) => n
                    .parse::<u32>()
                    .map_err(|_| {
                        errors.insert(
                            "contacts",
                            format!("line {i}: escalation order '{n}' is not a number"),
                        )
                    })
                    .ok(),
                None => Some(1),
            };
            if let (Some(name), Some(escalation)) =
                (parts.first().filter(|n| !n.is_empty()), escalation)
            {
                contacts.push(Contact {
                    name: (*name).to_owned(),
                    role: parts.get(1).map(|s| (*s).to_owned()).unwrap_or_default(),
                    reach: parts.get(2).map(|s| (*s).to_owned()).unwrap_or_default(),
                    escalation,
                });
            } else if escalation.is_some() {
                errors.insert("contacts", format!("line {i}: a contact needs a name"));
            }
        }
        match (category, labels, selector) {
            (Some(category), Some(labels), Some(selector)) if errors.is_empty() => Ok(Parsed {
                category,
                labels,
                selector,
                links,
                contacts,
            }),
            _ => Err(errors),
        }
    }
}

struct Parsed {
    category: CategoryName,
    labels: Labels,
    selector: Option<LabelSelector>,
    links: Vec<Link>,
    contacts: Vec<Contact>,
}

fn lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| (i + 1, l))
}

fn kind_word(kind: LinkKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn parse_kind(word: &str) -> Option<LinkKind> {
    serde_json::from_value(serde_json::Value::String(word.to_ascii_lowercase())).ok()
}

/// Where a domain error belongs in the form.
fn field_of(e: &SystemError) -> &'static str {
    match e {
        SystemError::SlugTaken(_) => "slug",
        SystemError::UnknownCategory(_) => "category",
        SystemError::CycleByChange { .. } => "labels",
        SystemError::Invalid(i) => {
            let f = i.field.split(['[', '.']).next().unwrap_or("");
            [
                "slug",
                "title",
                "category",
                "description",
                "handbook",
                "labels",
                "selector",
                "links",
                "contacts",
            ]
            .into_iter()
            .find(|known| *known == f)
            .unwrap_or("title")
        }
        _ => "title",
    }
}

fn page(
    session: &crate::users::sessions::Session,
    creating: bool,
    slug: &str,
    form: &SystemForm,
    errors: HashMap<&'static str, String>,
) -> EditPage {
    EditPage {
        user: Some(session.principal.display_name.clone()),
        csrf: session.csrf.clone(),
        creating,
        slug: slug.to_owned(),
        action: if creating {
            "/systems/new".into()
        } else {
            format!("/systems/{slug}/edit")
        },
        fields: form.fields(creating, &errors),
        general_error: (!errors.is_empty())
            .then(|| "Please correct the fields marked below.".to_owned()),
    }
}

async fn role_on(
    ctx: &Context,
    session: &crate::users::sessions::Session,
    slug: &str,
) -> Result<Option<Role>, SystemError> {
    let access = Access::of(ctx, session.principal.clone()).await?;
    let mut conn = ctx.db.reader().acquire().await?;
    let Some(id) = super::store::ids_by_slugs(&mut conn, &[slug.to_owned()])
        .await?
        .remove(slug)
    else {
        return Ok(None);
    };
    let graph = super::store::load_graph(&mut conn).await?;
    Ok(access.role_on(&graph, &id))
}

fn forbidden(what: &str) -> Response {
    (
        StatusCode::FORBIDDEN,
        Html(format!(
            "<!doctype html><title>Not allowed</title><p>{}</p><p><a href=\"/\">Back</a></p>",
            esc(what)
        )),
    )
        .into_response()
}

/// After a successful form: htmx navigates (`HX-Redirect`), a plain
/// browser follows a redirect.
fn done(headers: &HeaderMap, to: &str) -> Response {
    if headers.contains_key("hx-request") {
        ([("HX-Redirect", to.to_owned())], Html(String::new())).into_response()
    } else {
        Redirect::to(to).into_response()
    }
}

/// Refuses (403, or 404 for a system out of sight) unless the session's
/// user administers the system.
async fn may_change(
    ctx: &Context,
    session: &crate::users::sessions::Session,
    slug: &str,
) -> Option<Response> {
    let refused = match role_on(ctx, session, slug).await {
        Ok(Some(Role::Admin)) => return None,
        Ok(Some(_)) => forbidden("Changing this system needs the admin role on it."),
        Ok(None) => not_found(slug),
        Err(e) => return Some(page_error(&e)),
    };
    // On the record like a refusal through the API.
    if let Ok(access) = Access::of(ctx, session.principal.clone()).await {
        crate::users::refusals::record(ctx, &access, "system.change", slug).await;
    }
    Some(refused)
}

/// Role: instance admin.
async fn new_form(Page(session): Page) -> Response {
    if !session.principal.may_everywhere(Role::Admin) {
        return forbidden("Creating systems needs the instance admin.");
    }
    render(
        StatusCode::OK,
        &page(&session, true, "", &SystemForm::default(), HashMap::new()),
    )
}

/// Role: instance admin.
async fn create(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<SystemForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    if !session.principal.may_everywhere(Role::Admin) {
        return forbidden("Creating systems needs the instance admin.");
    }
    let mut errors = match form.parse() {
        Ok(parsed) => match Slug::try_from(form.slug.trim()) {
            Ok(slug) => {
                let mut new = NewSystem::new(slug, &form.title, parsed.category);
                new.description = form.description.clone();
                new.handbook = form.handbook.clone();
                new.labels = parsed.labels;
                new.selector = parsed.selector;
                new.links = parsed.links;
                new.contacts = parsed.contacts;
                match super::create(&ctx, &session.principal.actor(), new).await {
                    Ok(s) => return done(&headers, &format!("/systems/{}", s.slug)),
                    Err(SystemError::Db(e)) => return page_error(&e),
                    Err(e) => HashMap::from([(field_of(&e), e.to_string())]),
                }
            }
            Err(e) => HashMap::from([("slug", e)]),
        },
        Err(errors) => errors,
    };
    if form.title.trim().is_empty() {
        errors
            .entry("title")
            .or_insert_with(|| "title: must not be empty".into());
    }
    render(
        StatusCode::UNPROCESSABLE_ENTITY,
        &page(&session, true, "", &form, errors),
    )
}

/// Role: admin on the system.
async fn edit_form(
    State(ctx): State<AppState>,
    Page(session): Page,
    Path(slug): Path<String>,
) -> Response {
    match role_on(&ctx, &session, &slug).await {
        Ok(Some(Role::Admin)) => {}
        Ok(Some(_)) => return forbidden("Editing this system needs the admin role on it."),
        Ok(None) => return not_found(&slug),
        Err(e) => return page_error(&e),
    }
    match super::get(&ctx, &slug).await {
        Ok(system) => render(
            StatusCode::OK,
            &page(
                &session,
                false,
                &slug,
                &SystemForm::of(&system),
                HashMap::new(),
            ),
        ),
        Err(e) => page_error(&e),
    }
}

/// Role: admin on the system.
async fn save(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path(slug): Path<String>,
    Form(form): Form<SystemForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    if let Some(refused) = may_change(&ctx, &session, &slug).await {
        return refused;
    }
    let errors = match form.parse() {
        Ok(parsed) => {
            let patch = SystemPatch {
                slug: None,
                title: Some(form.title.clone()),
                category: Some(parsed.category),
                description: Some(form.description.clone()),
                handbook: Some(form.handbook.clone()),
                labels: Some(parsed.labels),
                links: Some(parsed.links),
                contacts: Some(parsed.contacts),
                selector: Some(parsed.selector),
            };
            match super::update(&ctx, &session.principal.actor(), &slug, patch).await {
                Ok(_) => return done(&headers, &format!("/systems/{slug}")),
                Err(SystemError::Db(e)) => return page_error(&e),
                Err(e) => {
                    let e = match Access::of(&ctx, session.principal.clone()).await {
                        Ok(access) => crate::systems::http::masked(&ctx, &access, e).await,
                        Err(db) => return page_error(&db),
                    };
                    HashMap::from([(field_of(&e), e.to_string())])
                }
            }
        }
        Err(errors) => errors,
    };
    render(
        StatusCode::UNPROCESSABLE_ENTITY,
        &page(&session, false, &slug, &form, errors),
    )
}

#[derive(Deserialize)]
struct IncludeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    child: String,
}

/// The outcome of an include or exclude: with htmx a fragment for the
/// result box (status 200, as htmx swaps only successes), else a page.
fn outcome(htmx: bool, slug: &str, error: Option<String>) -> Response {
    match (htmx, error) {
        (true, None) => ([("HX-Redirect", format!("/systems/{slug}"))], Html(String::new())).into_response(),
        (true, Some(e)) => Html(format!("<p class=\"error\" role=\"alert\">{}</p>", esc(&e))).into_response(),
        (false, None) => Redirect::to(&format!("/systems/{slug}")).into_response(),
        (false, Some(e)) => (
            StatusCode::CONFLICT,
            Html(format!(
                "<!doctype html><title>Refused</title><link rel=\"stylesheet\" href=\"/assets/aramaki.css\"><main><p class=\"error\" role=\"alert\">{}</p><p><a href=\"/systems/{}\">Back to {}</a></p></main>",
                esc(&e),
                esc(slug),
                esc(slug)
            )),
        )
            .into_response(),
    }
}

/// Includes a subsystem. Role: admin on both systems.
async fn include(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path(slug): Path<String>,
    Form(form): Form<IncludeForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    let htmx = headers.contains_key("hx-request");
    let child = form.child.trim().to_owned();
    if let Some(refused) = may_change(&ctx, &session, &slug).await {
        return refused;
    }
    let result = async {
        let access = Access::of(&ctx, session.principal.clone())
            .await
            .map_err(|e| e.to_string())?;
        let child = Slug::try_from(child.as_str()).map_err(|e| e.to_string())?;
        crate::systems::http::authorize(&ctx, &access, child.as_str(), Role::Admin)
            .await
            .map_err(|p| p.detail)?;
        if let Err(e) =
            super::include(&ctx, &session.principal.actor(), &slug, child.as_str()).await
        {
            return Err(crate::systems::http::masked(&ctx, &access, e)
                .await
                .to_string());
        }
        Ok::<_, String>(())
    };
    outcome(htmx, &slug, result.await.err())
}

/// Excludes a subsystem. Role: admin on the parent.
async fn exclude(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Path((slug, child)): Path<(String, String)>,
    Form(form): Form<IncludeForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    let htmx = headers.contains_key("hx-request");
    if let Some(refused) = may_change(&ctx, &session, &slug).await {
        return refused;
    }
    let result = async {
        let access = crate::users::access::Access::of(&ctx, session.principal.clone())
            .await
            .map_err(|e| e.to_string())?;
        // A child out of sight reads like a missing one: no slug probing.
        super::http::authorize_for(
            &ctx,
            &access,
            &child,
            crate::users::Role::Viewer,
            "system.exclude",
        )
        .await
        .map_err(|_| super::http::not_a_subsystem(&slug, &child))?;
        super::exclude(&ctx, &session.principal.actor(), &slug, &child)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    outcome(htmx, &slug, result.await.err())
}
