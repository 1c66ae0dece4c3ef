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
    Router::new().route("/", get(dashboard))
}

struct Tile {
    slug: String,
    title: String,
    worst: String,
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
}

#[derive(Template)]
#[template(path = "systems/dashboard.html")]
struct Dashboard {
    user: Option<String>,
    csrf: String,
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
        let mut groups = Vec::new();
        for (category, systems) in super::anchors(&ctx, visible.as_ref()).await? {
            let mut tiles = Vec::new();
            for s in systems {
                let status = super::status::status(&ctx, s.slug.as_str()).await?;
                tiles.push(Tile {
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
        let ids: Vec<String> = match visible {
            Some(set) => set.into_iter().collect(),
            None => graph.ids().cloned().collect(),
        };
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
            .map(|e| Line {
                at: e.occurred_at.to_string(),
                at_short: e.occurred_at.strftime("%a %H:%M").to_string(),
                system: e.system,
                title: e.title,
                actor: e.actor.name,
                severity: e.severity.to_string(),
            })
            .collect();
        Ok::<_, super::SystemError>(Dashboard {
            user: Some(session.principal.display_name.clone()),
            csrf: session.csrf.clone(),
            groups,
            events,
        })
    };
    match result.await {
        Ok(page) => render(StatusCode::OK, &page),
        Err(e) => page_error(&e),
    }
}
