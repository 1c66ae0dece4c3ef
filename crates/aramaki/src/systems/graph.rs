//! The structure of systems as a pure graph: static inclusions plus dynamic
//! aggregates (label selectors), with the walks the domain needs. Loaded from
//! the store per question, so it is always the current structure.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use super::model::{LabelSelector, Labels};

/// How a subsystem is reached from its parent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Included explicitly.
    Include,
    /// Matched by the parent's label selector.
    Selector,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub slug: String,
    pub labels: Labels,
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    nodes: HashMap<String, Node>,
    children: HashMap<String, BTreeSet<String>>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    pub fn add_node(&mut self, id: String, node: Node) {
        self.nodes.insert(id, node);
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn node_mut(&mut self, id: &str) -> Option<&mut Node> {
        self.nodes.get_mut(id)
    }

    pub fn add_edge(&mut self, parent: &str, child: &str) {
        self.children
            .entry(parent.to_owned())
            .or_default()
            .insert(child.to_owned());
    }

    pub fn remove_edge(&mut self, parent: &str, child: &str) {
        if let Some(set) = self.children.get_mut(parent) {
            set.remove(child);
        }
    }

    pub fn has_edge(&self, parent: &str, child: &str) -> bool {
        self.children.get(parent).is_some_and(|s| s.contains(child))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.nodes.keys()
    }

    /// Direct subsystems of `id`, ordered by slug: explicit inclusions first
    /// win over selector matches when both apply.
    pub fn members(&self, id: &str) -> Vec<(String, Via)> {
        let mut out: BTreeMap<String, (String, Via)> = BTreeMap::new();
        if let Some(node) = self.nodes.get(id) {
            if let Some(sel) = &node.selector {
                for (other, n) in &self.nodes {
                    if other != id && sel.matches(&n.labels) {
                        out.insert(n.slug.clone(), (other.clone(), Via::Selector));
                    }
                }
            }
        }
        if let Some(kids) = self.children.get(id) {
            for kid in kids {
                if let Some(n) = self.nodes.get(kid) {
                    out.insert(n.slug.clone(), (kid.clone(), Via::Include));
                }
            }
        }
        out.into_values().collect()
    }

    /// `id` and every system below it, each once.
    pub fn closure(&self, id: &str) -> Vec<String> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut order = Vec::new();
        let mut queue = VecDeque::from([id.to_owned()]);
        while let Some(next) = queue.pop_front() {
            if !seen.insert(next.clone()) {
                continue;
            }
            for (kid, _) in self.members(&next) {
                if !seen.contains(&kid) {
                    queue.push_back(kid);
                }
            }
            order.push(next);
        }
        order
    }

    /// Systems that include `id`, explicitly or by selector.
    pub fn parents(&self, id: &str) -> Vec<(String, Via)> {
        let mut out = Vec::new();
        for other in self.nodes.keys() {
            if other == id {
                continue;
            }
            if self.has_edge(other, id) {
                out.push((other.clone(), Via::Include));
            } else if let (Some(p), Some(me)) = (self.nodes.get(other), self.nodes.get(id)) {
                if p.selector.as_ref().is_some_and(|s| s.matches(&me.labels)) {
                    out.push((other.clone(), Via::Selector));
                }
            }
        }
        out.sort_by(|a, b| self.slug(&a.0).cmp(self.slug(&b.0)));
        out
    }

    /// Every system above `id`, each once, nearest first.
    pub fn ancestors(&self, id: &str) -> Vec<String> {
        let mut seen: HashSet<String> = HashSet::from([id.to_owned()]);
        let mut order = Vec::new();
        let mut queue: VecDeque<String> = self.parents(id).into_iter().map(|(p, _)| p).collect();
        while let Some(next) = queue.pop_front() {
            if !seen.insert(next.clone()) {
                continue;
            }
            queue.extend(self.parents(&next).into_iter().map(|(p, _)| p));
            order.push(next);
        }
        order
    }

    pub fn slug<'a>(&'a self, id: &'a str) -> &'a str {
        self.nodes.get(id).map(|n| n.slug.as_str()).unwrap_or(id)
    }

    /// A path of ids from `from` down to `to`, if `to` is reachable.
    pub fn path(&self, from: &str, to: &str) -> Option<Vec<String>> {
        let mut prev: HashMap<String, String> = HashMap::new();
        let mut seen: HashSet<String> = HashSet::from([from.to_owned()]);
        let mut queue = VecDeque::from([from.to_owned()]);
        while let Some(next) = queue.pop_front() {
            if next == to {
                let mut path = vec![next.clone()];
                let mut cur = next;
                while let Some(p) = prev.get(&cur) {
                    path.push(p.clone());
                    cur = p.clone();
                }
                path.reverse();
                return Some(path);
            }
            for (kid, _) in self.members(&next) {
                if seen.insert(kid.clone()) {
                    prev.insert(kid.clone(), next.clone());
                    queue.push_back(kid);
                }
            }
        }
        None
    }

    /// If including `child` in `parent` would close a cycle, the cycle as
    /// slugs: `parent → child → … → parent`.
    pub fn cycle_if_included(&self, parent: &str, child: &str) -> Option<Vec<String>> {
        let back = self.path(child, parent)?;
        let mut cycle = vec![self.slug(parent).to_owned()];
        cycle.extend(back.iter().map(|id| self.slug(id).to_owned()));
        Some(cycle)
    }

    /// Any cycle through `id` (after a change of its labels or selector), as
    /// slugs starting and ending at the same system.
    pub fn cycle_through(&self, id: &str) -> Option<Vec<String>> {
        // A cycle through id exists iff some member of id reaches id.
        for (kid, _) in self.members(id) {
            if let Some(back) = self.path(&kid, id) {
                let mut cycle = vec![self.slug(id).to_owned()];
                cycle.extend(back.iter().map(|n| self.slug(n).to_owned()));
                return Some(cycle);
            }
        }
        // A label change on id can also close a cycle elsewhere: a selector
        // above id that now matches it while id reaches that selector's owner.
        for (parent, _) in self.parents(id) {
            if let Some(back) = self.path(id, &parent) {
                let mut cycle = vec![self.slug(&parent).to_owned()];
                cycle.extend(back.iter().map(|n| self.slug(n).to_owned()));
                return Some(cycle);
            }
        }
        None
    }

    /// `id` and every system below it through explicit inclusions only, each
    /// once: the reach of a grant on `id` (grants never flow through selectors).
    pub fn explicit_closure(&self, id: &str) -> Vec<String> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut order = Vec::new();
        let mut queue = VecDeque::from([id.to_owned()]);
        while let Some(next) = queue.pop_front() {
            if !self.nodes.contains_key(&next) || !seen.insert(next.clone()) {
                continue;
            }
            if let Some(kids) = self.children.get(&next) {
                queue.extend(kids.iter().filter(|k| !seen.contains(*k)).cloned());
            }
            order.push(next);
        }
        order
    }

    /// Every system above `id` through explicit inclusions only, each once:
    /// the systems whose grants hold on `id`.
    pub fn explicit_ancestors(&self, id: &str) -> Vec<String> {
        let mut seen: HashSet<String> = HashSet::from([id.to_owned()]);
        let mut order = Vec::new();
        let parents_of = |child: &str| -> Vec<String> {
            self.children
                .iter()
                .filter(|(p, kids)| kids.contains(child) && self.nodes.contains_key(*p))
                .map(|(p, _)| p.clone())
                .collect()
        };
        let mut queue: VecDeque<String> = parents_of(id).into();
        while let Some(next) = queue.pop_front() {
            if !seen.insert(next.clone()) {
                continue;
            }
            queue.extend(parents_of(&next));
            order.push(next);
        }
        order
    }

    /// The graph as seen by someone who may see only `keep` (`None`: all).
    /// Other systems are gone, so selectors cannot match them, walks cannot
    /// cross them, and a rollup or status built on it shows nothing of them.
    pub fn restricted(mut self, keep: Option<&HashSet<String>>) -> Graph {
        let Some(keep) = keep else { return self };
        self.nodes.retain(|id, _| keep.contains(id));
        self.children.retain(|id, _| keep.contains(id));
        for kids in self.children.values_mut() {
            kids.retain(|k| keep.contains(k));
        }
        self
    }

    /// True if `id` is included by no other system.
    pub fn is_anchor(&self, id: &str) -> bool {
        self.parents(id).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(slug: &str, labels: &[(&str, &str)], selector: Option<&str>) -> Node {
        let map: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Node {
            slug: slug.to_owned(),
            labels: Labels::try_from(map).unwrap(),
            selector: selector.map(|s| LabelSelector::try_from(s).unwrap()),
        }
    }

    fn sample() -> Graph {
        let mut g = Graph::new();
        g.add_node("dc1".into(), node("dc1", &[], None));
        g.add_node(
            "st1".into(),
            node("st1", &[("role", "storage"), ("dc", "dc1")], None),
        );
        g.add_node(
            "st2".into(),
            node("st2", &[("role", "storage"), ("dc", "dc2")], None),
        );
        g.add_node("h1".into(), node("h1", &[], None));
        g.add_node("all".into(), node("all-storage", &[], Some("role=storage")));
        g.add_edge("dc1", "st1");
        g.add_edge("st1", "h1");
        g.add_edge("st2", "h1");
        g
    }

    #[test]
    fn closure_follows_includes_and_selectors_once() {
        let g = sample();
        let mut c = g.closure("all");
        c.sort();
        assert_eq!(c, vec!["all", "h1", "st1", "st2"]);
        let mut c = g.closure("dc1");
        c.sort();
        assert_eq!(c, vec!["dc1", "h1", "st1"]);
    }

    #[test]
    fn cycles_are_found_with_their_path() {
        let g = sample();
        assert_eq!(
            g.cycle_if_included("h1", "dc1"),
            Some(vec!["h1".into(), "dc1".into(), "st1".into(), "h1".into()])
        );
        assert_eq!(g.cycle_if_included("dc1", "st2"), None);
        assert_eq!(
            g.cycle_if_included("h1", "h1"),
            Some(vec!["h1".into(), "h1".into()])
        );
    }

    #[test]
    fn a_label_change_that_closes_a_cycle_is_seen() {
        let mut g = sample();
        // all-storage includes st1 (selector); st1 → h1; now h1 includes all-storage's
        // owner statically: h1 → all closes all → st1 → h1 → all.
        g.add_edge("h1", "all");
        assert!(g.cycle_through("all").is_some());
        let mut g = sample();
        g.add_edge("h1", "all");
        g.remove_edge("h1", "all");
        assert!(g.cycle_through("all").is_none());
    }

    #[test]
    fn parents_and_anchors() {
        let g = sample();
        let parents: Vec<String> = g.parents("st1").into_iter().map(|(p, _)| p).collect();
        assert_eq!(parents, vec!["all", "dc1"]);
        assert!(g.is_anchor("dc1"));
        assert!(!g.is_anchor("h1"));
        let mut anc = g.ancestors("h1");
        anc.sort();
        assert_eq!(anc, vec!["all", "dc1", "st1", "st2"]);
    }
}
