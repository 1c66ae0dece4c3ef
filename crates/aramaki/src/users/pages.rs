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

/// Role: public. Refused from other sites (login CSRF).
async fn login(
    State(ctx): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = local_path(&form.next).to_owned();
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-site login refused").into_response();
    }
    match sessions::login(&ctx, form.username.trim(), &form.password).await {
        Ok(Some((secret, session))) => {
            let max_age = i64::from(ctx.config.web.session_max_hours) * 3600;
            let to = if session.must_change_password {
                "/account/password".to_owned()
            } else {
                next
            };
            (
                [(SET_COOKIE, cookie(&ctx, &secret, max_age))],
                Redirect::to(&to),
            )
                .into_response()
        }
        Ok(None) => render(
            StatusCode::UNAUTHORIZED,
            &LoginPage {
                user: None,
                csrf: String::new(),
                next,
                username: form.username,
                error: Some("Wrong username or password.".into()),
            },
        ),
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
}

/// Role: any logged-in user.
async fn password_form(Page(session): Page) -> Response {
    render(
        StatusCode::OK,
        &PasswordPage {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            must_change: session.must_change_password,
            error: None,
            done: false,
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
    };
    if form.new != form.confirm {
        return render(
            StatusCode::UNPROCESSABLE_ENTITY,
            &page(Some("The two new passwords differ.".into()), false),
        );
    }
    match sessions::change_password(&ctx, &session, &form.current, &form.new).await {
        Ok(()) => render(StatusCode::OK, &page(None, true)),
        Err(PasswordError::User(e)) => page_error(&e),
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
