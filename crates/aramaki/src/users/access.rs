//! Who may do what where. Deny by default: a caller holds a role on a system
//! only through their instance-wide role or a grant on that system or on a
//! system that (transitively, and explicitly) includes it. Grants never flow
//! through selector membership: a selector is defined by one system's admin
//! but matches systems by labels that other admins set, so letting it carry
//! a grant would let either side give themselves rights. Only an inclusion,
//! which needs admin on both ends, extends a grant.

use std::collections::HashSet;

use super::{store, Principal, Role};
use crate::context::Context;
use crate::systems::graph::Graph;
use crate::timeline::Actor;

/// One caller's roles, loaded once per request.
#[derive(Debug, Clone)]
pub struct Access {
    principal: Option<Principal>,
    instance: Option<Role>,
    grants: Vec<(String, Role)>,
}

impl Access {
    /// An anonymous caller where `api.public_read` opens reading.
    pub fn public_reader() -> Access {
        Access {
            principal: None,
            instance: Some(Role::Viewer),
            grants: Vec::new(),
        }
    }

    /// The roles of an authenticated caller.
    pub async fn of(ctx: &Context, principal: Principal) -> Result<Access, sqlx::Error> {
        let grants = if principal.may_everywhere(Role::Admin) {
            Vec::new()
        } else {
            store::grants_of(ctx.db.reader(), &principal.user_id).await?
        };
        Ok(Access {
            instance: principal.role,
            principal: Some(principal),
            grants,
        })
    }

    pub fn principal(&self) -> Option<&Principal> {
        self.principal.as_ref()
    }

    /// Who is acting, for the timeline.
    pub fn actor(&self) -> Actor {
        match &self.principal {
            Some(p) => p.actor(),
            None => Actor {
                kind: aramaki_protocol::ActorKind::User,
                id: None,
                name: "anonymous".into(),
            },
        }
    }

    /// Holds `needed` on every system, with no need to look at the structure?
    pub fn everywhere(&self, needed: Role) -> bool {
        self.instance.is_some_and(|r| r >= needed)
    }

    pub fn has_grants(&self) -> bool {
        !self.grants.is_empty()
    }

    /// The caller's role on a system: the best of the instance-wide role and
    /// the grants on it and on every system above it.
    pub fn role_on(&self, graph: &Graph, system_id: &str) -> Option<Role> {
        let mut best = self.instance;
        if self.grants.is_empty() {
            return best;
        }
        let mut scope: HashSet<String> = graph.explicit_ancestors(system_id).into_iter().collect();
        scope.insert(system_id.to_owned());
        for (granted_on, role) in &self.grants {
            if scope.contains(granted_on) && best.is_none_or(|b| *role > b) {
                best = Some(*role);
            }
        }
        best
    }

    /// The systems the caller may see, or `None` for all of them.
    pub fn visible(&self, graph: &Graph) -> Option<HashSet<String>> {
        if self.everywhere(Role::Viewer) {
            return None;
        }
        let mut out = HashSet::new();
        for (granted_on, _) in &self.grants {
            if graph.node(granted_on).is_some() {
                out.extend(graph.explicit_closure(granted_on));
            }
        }
        Some(out)
    }

    /// The structure as this caller may see it: systems out of their sight
    /// are taken out, so members, rollups and status built on the result
    /// show nothing of them (a selector aggregate then shows only the
    /// matching systems the caller may see anyway).
    pub fn view(&self, graph: Graph) -> Graph {
        let visible = self.visible(&graph);
        graph.restricted(visible.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::systems::graph::Node;
    use crate::systems::model::Labels;

    fn graph() -> Graph {
        let mut g = Graph::new();
        for id in ["dc1", "storage", "host", "other"] {
            g.add_node(
                id.into(),
                Node {
                    slug: id.into(),
                    labels: Labels::default(),
                    selector: None,
                },
            );
        }
        g.add_edge("dc1", "storage");
        g.add_edge("storage", "host");
        g
    }

    fn access(instance: Option<Role>, grants: &[(&str, Role)]) -> Access {
        Access {
            principal: None,
            instance,
            grants: grants.iter().map(|(s, r)| (s.to_string(), *r)).collect(),
        }
    }

    #[test]
    fn grants_are_inherited_downwards_only() {
        let g = graph();
        let a = access(None, &[("storage", Role::Operator)]);
        assert_eq!(a.role_on(&g, "storage"), Some(Role::Operator));
        assert_eq!(a.role_on(&g, "host"), Some(Role::Operator));
        assert_eq!(a.role_on(&g, "dc1"), None);
        assert_eq!(a.role_on(&g, "other"), None);
        let mut visible: Vec<String> = a.visible(&g).unwrap().into_iter().collect();
        visible.sort();
        assert_eq!(visible, ["host", "storage"]);
    }

    #[test]
    fn grants_never_flow_through_selectors() {
        let mut g = graph();
        let labels = |pairs: &[(&str, &str)]| {
            Labels::try_from(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .unwrap()
        };
        g.add_node(
            "agg".into(),
            Node {
                slug: "agg".into(),
                labels: Labels::default(),
                selector: Some(crate::systems::model::LabelSelector::try_from("owner").unwrap()),
            },
        );
        g.add_node(
            "theirs".into(),
            Node {
                slug: "theirs".into(),
                labels: labels(&[("owner", "y")]),
                selector: None,
            },
        );
        let a = access(None, &[("agg", Role::Admin), ("host", Role::Viewer)]);
        assert_eq!(
            a.role_on(&g, "theirs"),
            None,
            "matched by the selector only"
        );
        let mut visible: Vec<String> = a.visible(&g).unwrap().into_iter().collect();
        visible.sort();
        assert_eq!(visible, ["agg", "host"]);
        let view = a.view(g.clone());
        assert!(view.node("theirs").is_none());
        assert_eq!(view.closure("agg"), ["agg"]);
    }

    #[test]
    fn the_best_role_wins() {
        let g = graph();
        let a = access(
            Some(Role::Viewer),
            &[("dc1", Role::Operator), ("host", Role::Admin)],
        );
        assert_eq!(a.role_on(&g, "other"), Some(Role::Viewer));
        assert_eq!(a.role_on(&g, "storage"), Some(Role::Operator));
        assert_eq!(a.role_on(&g, "host"), Some(Role::Admin));
        assert!(
            a.visible(&g).is_none(),
            "an instance-wide viewer sees everything"
        );
        assert!(
            access(None, &[]).visible(&g).unwrap().is_empty(),
            "deny by default"
        );
    }
}
