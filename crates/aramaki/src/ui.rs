//! What every page shares: the session extractor (log in or be sent to the
//! login page), CSRF and origin checks for forms, HTML responses, and the
//! embedded assets. Pages themselves live in each domain's `pages.rs`.

use axum::extract::FromRequestParts;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, HOST, ORIGIN};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::users::sessions::{self, Session};
use crate::web::AppState;

/// A logged-in browser. Without a valid session the request is sent to the
/// login page, which brings the user back afterwards.
pub struct Page(pub Session);

impl FromRequestParts<AppState> for Page {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctx: &AppState) -> Result<Self, Response> {
        let to_login = || {
            let next = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            Redirect::to(&format!("/login?next={}", crate::cli::encode(next))).into_response()
        };
        let Some(secret) = session_cookie(&parts.headers) else {
            return Err(to_login());
        };
        match sessions::resume(ctx, &secret).await {
            // A one-time password opens the password page (and logout) only.
            Ok(Some(session))
                if session.must_change_password
                    && !matches!(
                        parts.uri.path(),
                        "/account/password" | "/logout" | "/logout/everywhere"
                    ) =>
            {
                let here = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                Err(Redirect::to(&crate::users::pages::password_page_then(here)).into_response())
            }
            Ok(Some(session)) => Ok(Page(session)),
            Ok(None) => Err(to_login()),
            Err(e) => Err(page_error(&e)),
        }
    }
}

/// The session cookie's value, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == sessions::COOKIE)
        .map(|(_, value)| value.to_owned())
}

/// Refuses a state-changing request from another site: its Origin, when the
/// browser sends one, must be this host.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .map(|(_, rest)| rest == host)
        .unwrap_or(false)
}

/// A form that did not come from this site, or whose token has expired.
pub struct Refused;

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (
            StatusCode::FORBIDDEN,
            Html("<!doctype html><title>Refused</title><p>This form has expired or did not come from this site. Go back, reload the page and try again.</p>"),
        )
            .into_response()
    }
}

/// Checks a form's CSRF token (or htmx's `X-CSRF-Token` header) and origin.
pub fn check_form(
    session: &Session,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Result<(), Refused> {
    let header = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
    let given = token.filter(|t| !t.is_empty()).or(header).unwrap_or("");
    if same_origin(headers) && session.csrf_ok(given) {
        Ok(())
    } else {
        Err(Refused)
    }
}

/// Renders a template as a page, or a plain error page if that fails.
pub fn render<T: askama::Template>(status: StatusCode, template: &T) -> Response {
    match template.render() {
        Ok(html) => (status, [(CACHE_CONTROL, "no-store")], Html(html)).into_response(),
        Err(e) => page_error(&e),
    }
}

pub fn page_error(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "page failed");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Html("<!doctype html><title>Error</title><p>Something went wrong on our side; it has been logged.</p>"),
    )
        .into_response()
}

const CSS: &str = include_str!("../assets/aramaki.css");
/// The few behaviours that would otherwise be inline script (forbidden by
/// the Content-Security-Policy), as one file.
const JS: &str = include_str!("../assets/aramaki.js");
/// Vendored with `scripts/vendor-htmx`; the version is in the file name.
pub const HTMX_PATH: &str = "/assets/htmx.min.2.0.11.js";
const HTMX: &str = include_str!("../vendor/htmx/htmx.min.2.0.11.js");
pub const SSE_PATH: &str = "/assets/sse.min.2.2.4.js";
const SSE: &str = include_str!("../vendor/htmx/sse.min.2.2.4.js");

/// Assets served from the binary; nothing comes from a CDN. Versioned files
/// may be cached for ever.
pub fn assets() -> Router<AppState> {
    let js = |body: &'static str| {
        get(move || async move {
            (
                [
                    (CONTENT_TYPE, "text/javascript; charset=utf-8"),
                    (CACHE_CONTROL, "public, max-age=31536000, immutable"),
                ],
                body,
            )
        })
    };
    Router::new()
        .route(
            "/assets/aramaki.css",
            get(|| async {
                (
                    [
                        (CONTENT_TYPE, "text/css; charset=utf-8"),
                        (CACHE_CONTROL, "public, max-age=3600"),
                    ],
                    CSS,
                )
            }),
        )
        .route(
            "/assets/aramaki.js",
            get(|| async {
                (
                    [
                        (CONTENT_TYPE, "text/javascript; charset=utf-8"),
                        (CACHE_CONTROL, "public, max-age=3600"),
                    ],
                    JS,
                )
            }),
        )
        .route(HTMX_PATH, js(HTMX))
        .route(SSE_PATH, js(SSE))
}

/// Keeps a `next` parameter on this site: a path, never another host.
pub fn local_path(next: &str) -> &str {
    // Browsers drop tabs and newlines from a URL and read `\` as `/`, so
    // `/\t/evil.example` and `/\\evil.example` both mean `//evil.example`.
    let odd = next.contains('\\') || next.chars().any(|c| c.is_control());
    if next.starts_with('/') && !next.starts_with("//") && !odd {
        next
    } else {
        "/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendored_files_match_their_checksums() {
        use sha2::{Digest, Sha256};
        let sums = include_str!("../vendor/htmx/SHA256SUMS");
        for (name, body) in [("htmx.min.2.0.11.js", HTMX), ("sse.min.2.2.4.js", SSE)] {
            let digest = crate::federation::identity::hex(&Sha256::digest(body.as_bytes()));
            assert!(
                sums.contains(&format!("{digest}  {name}")),
                "{name} does not match SHA256SUMS"
            );
        }
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(local_path("/systems/shop"), "/systems/shop");
        assert_eq!(local_path("https://evil.example"), "/");
        assert_eq!(local_path("//evil.example"), "/");
        assert_eq!(local_path("/\\evil.example"), "/");
        for tricky in [
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r/evil.example",
            "\t//evil.example",
            "/\u{0}/evil.example",
            "/\u{7f}/evil.example",
            "/\u{85}/evil.example",
            "\\\\evil.example",
            "/\\/evil.example",
            "/%5C/x\\y",
            " //evil.example",
            "///evil.example",
            "",
            "evil.example",
            "javascript:alert(1)",
        ] {
            assert_eq!(local_path(tricky), "/", "{tricky:?}");
        }
        assert_eq!(local_path("/systems?q=a%09b#x"), "/systems?q=a%09b#x");
    }

    #[test]
    fn origins_must_match_the_host() {
        let mut h = HeaderMap::new();
        h.insert(HOST, "127.0.0.1:8764".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(ORIGIN, "http://127.0.0.1:8764".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            "theme=dark; aramaki_session=abc; x=1".parse().unwrap(),
        );
        assert_eq!(session_cookie(&h).as_deref(), Some("abc"));
    }
}

/// Renders Markdown to HTML that is safe to embed: raw HTML in the source is
/// shown as text, links may only point to http(s), mailto or this site, and
/// only images from this site are shown — an image from elsewhere becomes a
/// link to it, so reading a handbook tells no other site who read it (and the
/// Content-Security-Policy would block it anyway). (A handbook is written by
/// people with edit rights, read by everyone; it must not be able to run
/// script or track its readers.)
pub fn markdown(source: &str) -> String {
    use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd};
    let local = |lower: &str| {
        // Browsers read `/\x` and `/<tab>/x` as `//x`: another host.
        let odd = lower.contains('\\') || lower.chars().any(|c| c.is_ascii_control());
        !odd && ((lower.starts_with('/') && !lower.starts_with("//")) || lower.starts_with('#'))
    };
    let safe = |url: &CowStr| {
        let lower = url.trim().to_ascii_lowercase();
        lower.starts_with("http://")
            || lower.starts_with("https://")
            || lower.starts_with("mailto:")
            || local(&lower)
    };
    // For each open image: whether it was turned into a link.
    let mut images: Vec<bool> = Vec::new();
    let events = Parser::new_ext(
        source,
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH,
    )
    .map(|event| match event {
        Event::Html(html) | Event::InlineHtml(html) => Event::Text(html),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) if !safe(&dest_url) => Event::Start(Tag::Link {
            link_type,
            dest_url: CowStr::from("#"),
            title,
            id,
        }),
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => {
            let here = local(dest_url.trim().to_ascii_lowercase().as_str());
            images.push(!here);
            if here {
                Event::Start(Tag::Image {
                    link_type,
                    dest_url,
                    title,
                    id,
                })
            } else {
                let dest_url = if safe(&dest_url) {
                    dest_url
                } else {
                    CowStr::from("#")
                };
                Event::Start(Tag::Link {
                    link_type,
                    dest_url,
                    title,
                    id,
                })
            }
        }
        Event::End(TagEnd::Image) => {
            if images.pop().unwrap_or(false) {
                Event::End(TagEnd::Link)
            } else {
                Event::End(TagEnd::Image)
            }
        }
        other => other,
    });
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, events);
    html
}

#[cfg(test)]
mod markdown_tests {
    use super::markdown;

    #[test]
    fn script_is_inert() {
        let html =
            markdown("Hello <script>alert(1)</script> **world**\n\n<img src=x onerror=alert(1)>");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("<strong>world</strong>"));
    }

    #[test]
    fn only_safe_links() {
        let html = markdown(
            "[a](javascript:alert(1)) [b](https://x.example) [c](/systems/shop) [d]( JAVASCRIPT:x)",
        );
        assert!(!html.to_lowercase().contains("javascript:"), "{html}");
        assert!(html.contains("href=\"https://x.example\""));
        assert!(html.contains("href=\"/systems/shop\""));
    }

    #[test]
    fn images_from_elsewhere_become_links() {
        let html = markdown(
            "![pixel](https://tracker.example/p.gif) ![diagram](/assets/diagram.png) ![x](//evil.example/p.gif) ![y](javascript:alert(1))",
        );
        assert!(
            !html.contains("<img src=\"https://tracker.example"),
            "{html}"
        );
        assert!(
            html.contains("<a href=\"https://tracker.example/p.gif\">pixel</a>"),
            "{html}"
        );
        assert!(
            html.contains("<img src=\"/assets/diagram.png\" alt=\"diagram\""),
            "{html}"
        );
        assert!(!html.contains("<img src=\"//evil"), "{html}");
        assert_eq!(html.matches("<img").count(), 1, "{html}");
        assert!(!html.to_lowercase().contains("javascript:"), "{html}");
    }
}
