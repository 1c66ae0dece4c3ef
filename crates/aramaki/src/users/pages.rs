//! Pages: log in, log out (here or everywhere), change the password.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;

use super::sessions::{self, PasswordError, COOKIE};
use crate::ui::{check_form, local_path, page_error, render, same_origin, Page};
use crate::web::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/logout/everywhere", post(logout_everywhere))
        .route(
            "/account/password",
            get(password_form).post(change_password),
        )
}

#[derive(Template)]
#[template(path = "users/login.html")]
struct LoginPage {
    user: Option<String>,
    csrf: String,
    next: String,
    username: String,
    error: Option<String>,
}

#[derive(Deserialize)]
struct NextQuery {
    next: Option<String>,
}

/// Role: public.
async fn login_form(Query(q): Query<NextQuery>) -> Response {
    let next = local_path(q.next.as_deref().unwrap_or("/")).to_owned();
    render(
        StatusCode::OK,
        &LoginPage {
            user: None,
            csrf: String::new(),
            next,
            username: String::new(),
            error: None,
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    #[serde(default)]
    next: String,
}

fn cookie(ctx: &AppState, value: &str, max_age: i64) -> String {
    let secure = if ctx.config.web.secure_cookies {
        "; Secure"
    } else {
        ""
    };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}")
}

/// The address a request came from, when the listener knows it; behind a
/// trusted proxy (`auth.trusted_proxies`), the nearest untrusted address in
/// its `X-Forwarded-For`.
pub struct SourceAddr(pub Option<std::net::IpAddr>);

impl axum::extract::FromRequestParts<AppState> for SourceAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        ctx: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let trusted = &ctx.config.auth.trusted_proxies;
        let Some(peer) = peer.filter(|p| trusted.contains(p)) else {
            return Ok(SourceAddr(peer));
        };
        let forwarded: Vec<std::net::IpAddr> = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        let client = forwarded.into_iter().rev().find(|a| !trusted.contains(a));
        Ok(SourceAddr(Some(client.unwrap_or(peer))))
    }
}

/// Where a one-time password leads: the password page, then `next`.
pub fn password_page_then(next: &str) -> String {
    match local_path(next) {
        "/" | "/account/password" => "/account/password".to_owned(),
        other => format!("/account/password?next={}", crate::cli::encode(other)),
    }
}

/// Role: public. Refused from other sites (login CSRF). Throttled per
/// account and per source address.
async fn login(
    State(ctx): State<AppState>,
    SourceAddr(addr): SourceAddr,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = local_path(&form.next).to_owned();
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-site login refused").into_response();
    }
    let refused = |status: StatusCode, error: String| {
        render(
            status,
            &LoginPage {
                user: None,
                csrf: String::new(),
                next: next.clone(),
                username: form.username.clone(),
                error: Some(error),
            },
        )
    };
    match sessions::login(&ctx, form.username.trim(), &form.password, addr).await {
        Ok(sessions::Login::Opened(secret, session)) => {
            let max_age = i64::from(ctx.config.web.session_max_hours) * 3600;
            let to = if session.must_change_password {
                password_page_then(&next)
            } else {
                next.clone()
            };
            (
                [(SET_COOKIE, cookie(&ctx, &secret, max_age))],
                Redirect::to(&to),
            )
                .into_response()
        }
        Ok(sessions::Login::Refused) => refused(
            StatusCode::UNAUTHORIZED,
            "Wrong username or password.".into(),
        ),
        Ok(sessions::Login::Expired) => refused(
            StatusCode::UNAUTHORIZED,
            "This one-time password has expired. Ask an administrator for a new one.".into(),
        ),
        Ok(sessions::Login::Throttled(wait)) => {
            let why = if wait.locked {
                "Logins are locked after too many failures"
            } else {
                "Too many failed logins"
            };
            let mut page = refused(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{why}; try again in {} s.", wait.retry_after),
            );
            if let Ok(v) = axum::http::HeaderValue::from_str(&wait.retry_after.to_string()) {
                page.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
            page
        }
        Err(e) => page_error(&e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

fn logged_out(ctx: &AppState) -> Response {
    ([(SET_COOKIE, cookie(ctx, "", 0))], Redirect::to("/login")).into_response()
}

/// Role: any logged-in user.
async fn logout(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    match sessions::logout(&ctx, &session.id).await {
        Ok(()) => logged_out(&ctx),
        Err(e) => page_error(&e),
    }
}

/// Role: any logged-in user.
async fn logout_everywhere(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    match sessions::logout_everywhere(&ctx, &session.principal.user_id).await {
        Ok(_) => logged_out(&ctx),
        Err(e) => page_error(&e),
    }
}

#[derive(Template)]
#[template(path = "users/password.html")]
struct PasswordPage {
    user: Option<String>,
    csrf: String,
    must_change: bool,
    error: Option<String>,
    done: bool,
    next: String,
}

/// Role: any logged-in user.
async fn password_form(Page(session): Page, Query(q): Query<NextQuery>) -> Response {
    render(
        StatusCode::OK,
        &PasswordPage {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            must_change: session.must_change_password,
            error: None,
            done: false,
            next: local_path(q.next.as_deref().unwrap_or("")).to_owned(),
        },
    )
}

#[derive(Deserialize)]
struct PasswordForm {
    #[serde(default)]
    csrf: String,
    current: String,
    new: String,
    confirm: String,
    /// Where to continue after a one-time password was replaced.
    #[serde(default)]
    next: String,
}

/// Role: any logged-in user.
async fn change_password(
    State(ctx): State<AppState>,
    Page(session): Page,
    headers: HeaderMap,
    Form(form): Form<PasswordForm>,
) -> Response {
    if let Err(refused) = check_form(&session, &headers, Some(&form.csrf)) {
        return refused.into_response();
    }
    let page = |error: Option<String>, done: bool| PasswordPage {
        user: Some(session.principal.display_name.clone()),
        csrf: session.csrf.clone(),
        must_change: session.must_change_password && !done,
        error,
        done,
        next: local_path(&form.next).to_owned(),
    };
    if form.new != form.confirm {
        return render(
            StatusCode::UNPROCESSABLE_ENTITY,
            &page(Some("The two new passwords differ.".into()), false),
        );
    }
    match sessions::change_password(&ctx, &session, &form.current, &form.new).await {
        // After a one-time password, continue to where the user was going.
        Ok(()) if session.must_change_password => {
            Redirect::to(local_path(&form.next)).into_response()
        }
        Ok(()) => render(StatusCode::OK, &page(None, true)),
        Err(PasswordError::User(e)) => page_error(&e),
        Err(e @ PasswordError::Throttled(_)) => render(
            StatusCode::TOO_MANY_REQUESTS,
            &page(Some(format!("{}.", capitalise(&e.to_string()))), false),
        ),
        Err(e) => render(
            StatusCode::UNPROCESSABLE_ENTITY,
            &page(Some(format!("{}.", capitalise(&e.to_string()))), false),
        ),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
