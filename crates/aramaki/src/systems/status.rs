//! Decomposed status: a system's own state and, recursively, each layer
//! below it — never only a summary. A subsystem reached by several paths
//! appears under each of them, each time with the path that reached it.

use std::collections::HashMap;

use aramaki_protocol::Severity;
use jiff::Timestamp;
use serde::Serialize;
use utoipa::ToSchema;

use super::graph::{Graph, Via};
use super::{store, SystemError};
use crate::context::Context;
use crate::db::from_micros;
use crate::timeline::store::{states_for, StateRow};

/// A system's state: the Nagios verdicts plus `unknown` (nothing said yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Unknown,
    Warning,
    Critical,
}

impl State {
    fn of(severity: Severity) -> State {
        match severity {
            Severity::Info => State::Unknown,
            Severity::Ok => State::Ok,
            Severity::Warning => State::Warning,
            Severity::Critical => State::Critical,
        }
    }

    /// The worse of two states, where `unknown` means "nothing said" and
    /// gives way to any verdict.
    fn worse(self, other: State) -> State {
        match (self, other) {
            (State::Unknown, x) | (x, State::Unknown) => x,
            (a, b) => a.max(b),
        }
    }
}

/// One source of a system's own state.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SourceState {
    pub source: String,
    pub state: State,
    pub summary: String,
    pub event: String,
    #[schema(value_type = String, format = DateTime)]
    pub since: Timestamp,
}

/// A system and everything below it, layer by layer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Layer {
    pub slug: String,
    pub title: String,
    pub category: String,
    /// Slugs from the system asked about down to this one.
    pub path: Vec<String>,
    /// How this layer is reached from the one above (absent at the top).
    pub via: Option<Via>,
    /// The system's own state: the worst of its sources, `unknown` if none.
    pub state: State,
    pub sources: Vec<SourceState>,
    /// The worst verdict in this layer and everything below it (`unknown`
    /// only if nothing here has a state yet).
    pub worst: State,
    #[schema(no_recursion)]
    pub layers: Vec<Layer>,
}

/// Answer of `GET /api/v1/systems/{slug}/status`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Status {
    #[serde(flatten)]
    pub top: Layer,
    /// True if the tree was cut at [`MAX_NODES`] layers.
    pub truncated: bool,
}

/// A pathological N:M structure can repeat a subsystem under many paths;
/// beyond this many layers the tree is cut and marked.
pub const MAX_NODES: usize = 5000;

struct Builder<'a> {
    graph: &'a Graph,
    meta: HashMap<String, (String, String)>,
    states: HashMap<String, Vec<StateRow>>,
    nodes: usize,
    truncated: bool,
}

impl Builder<'_> {
    fn layer(&mut self, id: &str, path: &[String], via: Option<Via>) -> Layer {
        self.nodes += 1;
        let slug = self.graph.slug(id).to_owned();
        let mut path = path.to_vec();
        path.push(slug.clone());
        let sources: Vec<SourceState> = self
            .states
            .get(id)
            .map(|rows| {
                rows.iter()
                    .map(|r| SourceState {
                        source: r.source.clone(),
                        state: State::of(r.severity),
                        summary: r.summary.clone(),
                        event: r.event_id.clone(),
                        since: from_micros(r.since),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let state = sources
            .iter()
            .map(|s| s.state)
            .max()
            .unwrap_or(State::Unknown);
        let mut layers = Vec::new();
        for (kid, kid_via) in self.graph.members(id) {
            if self.nodes >= MAX_NODES {
                self.truncated = true;
                break;
            }
            // The graph has no cycles, but stay safe against a damaged store.
            if path.iter().any(|p| p == self.graph.slug(&kid)) {
                continue;
            }
            layers.push(self.layer(&kid, &path, Some(kid_via)));
        }
        let worst = layers.iter().map(|l| l.worst).fold(state, State::worse);
        let (title, category) = self.meta.get(id).cloned().unwrap_or_default();
        Layer {
            slug,
            title,
            category,
            path,
            via,
            state,
            sources,
            worst,
            layers,
        }
    }
}

/// The status of `slug` as `access` may see it: layers out of the caller's
/// sight are left out (they neither appear nor count towards `worst`).
pub async fn status(
    ctx: &Context,
    slug: &str,
    access: &crate::users::access::Access,
) -> Result<Status, SystemError> {
    let mut conn = ctx.db.reader().acquire().await?;
    let system = store::by_slug(&mut conn, slug)
        .await?
        .ok_or_else(|| SystemError::NotFound(slug.to_owned()))?;
    let graph = access.view(store::load_graph(&mut conn).await?);
    let id = system.id.to_string();
    let ids = graph.closure(&id);
    let meta = store::by_ids(&mut conn, &ids)
        .await?
        .into_iter()
        .map(|s| (s.id.to_string(), (s.title, s.category.to_string())))
        .collect();
    drop(conn);
    let states = states_for(ctx.db.reader(), &ids).await?;
    let mut b = Builder {
        graph: &graph,
        meta,
        states,
        nodes: 0,
        truncated: false,
    };
    let top = b.layer(&id, &[], None);
    Ok(Status {
        top,
        truncated: b.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_ranks_between_ok_and_warning() {
        assert!(State::Ok < State::Unknown);
        assert!(State::Unknown < State::Warning);
        assert_eq!(State::of(Severity::Critical), State::Critical);
        assert_eq!(State::Unknown.worse(State::Ok), State::Ok);
        assert_eq!(State::Warning.worse(State::Unknown), State::Warning);
        assert_eq!(State::Warning.worse(State::Critical), State::Critical);
        assert_eq!(State::Unknown.worse(State::Unknown), State::Unknown);
    }
}
