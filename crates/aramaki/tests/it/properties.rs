//! Property: for random include/exclude sequences, cycles are always refused
//! and a timeline rollup equals the transitive closure, each event once.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use aramaki::config::Config;
use aramaki::context::{Context, TestClock};
use aramaki::systems::model::{CategoryName, Slug};
use aramaki::systems::{self, NewSystem, SystemError};
use aramaki::timeline::store::{page, Filter};
use aramaki::timeline::{self, Actor, NewEvent, Target};
use aramaki_protocol::Severity;
use proptest::prelude::*;

use crate::support::{fresh_postgres_schema, postgres_url, start_time};

const N: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    Include(usize, usize),
    Exclude(usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..N, 0..N).prop_map(|(a, b)| Op::Include(a, b)),
        1 => (0..N, 0..N).prop_map(|(a, b)| Op::Exclude(a, b)),
    ]
}

fn reaches(edges: &BTreeSet<(usize, usize)>, from: usize, to: usize) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![from];
    while let Some(n) = stack.pop() {
        if n == to {
            return true;
        }
        if seen.insert(n) {
            stack.extend(edges.iter().filter(|(p, _)| *p == n).map(|(_, c)| *c));
        }
    }
    false
}

fn slug(i: usize) -> String {
    format!("s{i}")
}

async fn context(postgres: bool) -> (Arc<Context>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    if postgres {
        config.database.url = fresh_postgres_schema().await;
    }
    config.database.max_connections = 2;
    let setup = aramaki::setup::init(dir.path(), config, Arc::new(TestClock::new(start_time())))
        .await
        .unwrap();
    (setup.context, dir)
}

async fn check(ops: Vec<Op>, postgres: bool) {
    let (ctx, _dir) = context(postgres).await;
    let actor = Actor::user("prop", "Property");
    let mut ids = Vec::new();
    for i in 0..N {
        let new = NewSystem::new(
            Slug::try_from(slug(i)).unwrap(),
            &slug(i),
            CategoryName::try_from("host".to_owned()).unwrap(),
        );
        let s = systems::create(&ctx, &actor, new).await.unwrap();
        let (id, sl) = (s.id.to_string(), s.slug.to_string());
        let mut tx = ctx.db.begin().await.unwrap();
        let e = NewEvent::internal("note", Severity::Info, slug(i), serde_json::json!({}));
        timeline::append(&ctx, &mut tx, &actor, Target { id: &id, slug: &sl }, e)
            .await
            .unwrap();
        ctx.commit(tx).await.unwrap();
        ids.push(id);
    }
    let mut edges: BTreeSet<(usize, usize)> = BTreeSet::new();
    for op in ops {
        match op {
            Op::Include(a, b) => {
                let result = systems::include(&ctx, &actor, &slug(a), &slug(b)).await;
                if a == b || reaches(&edges, b, a) {
                    match result {
                        Err(SystemError::Cycle { path, .. }) => {
                            assert_eq!(path.first(), Some(&slug(a)));
                            assert_eq!(path.last(), Some(&slug(a)));
                            assert!(path.len() >= 2);
                        }
                        other => {
                            panic!("include {a} → {b} must be refused as a cycle, got {other:?}")
                        }
                    }
                } else {
                    assert!(result.is_ok(), "include {a} → {b}: {result:?}");
                    edges.insert((a, b));
                }
            }
            Op::Exclude(a, b) => {
                let result = systems::exclude(&ctx, &actor, &slug(a), &slug(b)).await;
                if edges.remove(&(a, b)) {
                    assert!(result.is_ok(), "{result:?}");
                } else {
                    assert!(
                        matches!(result, Err(SystemError::NotIncluded { .. })),
                        "{result:?}"
                    );
                }
            }
        }
    }
    let filter = Filter {
        kinds: vec!["note".into()],
        ..Filter::default()
    };
    for i in 0..N {
        let (_, closure) = systems::closure(
            &ctx,
            &slug(i),
            &aramaki::users::access::Access::public_reader(),
        )
        .await
        .unwrap();
        let events = page(ctx.db.reader(), &closure, &filter, None, 100)
            .await
            .unwrap();
        let got: Vec<String> = events.iter().map(|e| e.title.clone()).collect();
        let unique: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(
            got.len(),
            unique.len(),
            "an event appeared twice in {}'s timeline: {got:?}",
            slug(i)
        );
        let expected: BTreeSet<String> = (0..N)
            .filter(|&j| reaches(&edges, i, j))
            .map(slug)
            .collect();
        assert_eq!(
            unique,
            expected,
            "rollup of {} with edges {edges:?}",
            slug(i)
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn cycles_refused_and_rollup_is_the_closure_sqlite(ops in proptest::collection::vec(op(), 1..40)) {
        runtime().block_on(check(ops, false));
    }

    #[test]
    fn cycles_refused_and_rollup_is_the_closure_postgres(ops in proptest::collection::vec(op(), 1..40)) {
        if postgres_url().is_some() {
            runtime().block_on(check(ops, true));
        }
    }
}
