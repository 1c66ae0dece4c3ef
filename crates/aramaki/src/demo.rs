//! `aramaki server --demo`: a believable fictional estate, created through
//! the same domain code as real data, so that a newcomer sees a living
//! control plane at once. Only an instance without systems gets it.

use std::collections::BTreeMap;

use aramaki_protocol::Severity;
use jiff::SignedDuration;
use serde_json::json;

use std::sync::Arc;

use crate::context::{Clock, Context};
use crate::systems::model::{CategoryName, Contact, LabelSelector, Labels, Link, LinkKind, Slug};
use crate::systems::{self, NewSystem, SystemError};
use crate::timeline::{self, Actor, Kind, NewEvent, Target};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    System(#[from] SystemError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("demo data: {0}")]
    Data(String),
}

/// What was seeded.
#[derive(Debug, Default)]
pub struct Seeded {
    pub systems: usize,
    pub events: usize,
}

struct Spec {
    slug: &'static str,
    title: &'static str,
    category: &'static str,
    labels: &'static [(&'static str, &'static str)],
    description: &'static str,
}

const fn spec(
    slug: &'static str,
    title: &'static str,
    category: &'static str,
    labels: &'static [(&'static str, &'static str)],
    description: &'static str,
) -> Spec {
    Spec {
        slug,
        title,
        category,
        labels,
        description,
    }
}

const SYSTEMS: &[Spec] = &[
    spec(
        "dc-fra",
        "Data center Frankfurt",
        "infrastructure",
        &[("dc", "fra")],
        "Our primary site: two halls at the Hanauer Landstraße campus, power A+B, 2×100G upstream.",
    ),
    spec(
        "dc-ams",
        "Data center Amsterdam",
        "infrastructure",
        &[("dc", "ams")],
        "Secondary site in Amsterdam Science Park; warm standby for production databases.",
    ),
    spec(
        "storage-fra",
        "Ceph storage Frankfurt",
        "infrastructure",
        &[("dc", "fra"), ("role", "storage")],
        "Ceph Reef cluster, 3 nodes, 3× replication; RBD for VMs and S3 for backups.",
    ),
    spec(
        "storage-ams",
        "Ceph storage Amsterdam",
        "infrastructure",
        &[("dc", "ams"), ("role", "storage")],
        "Ceph cluster mirroring the Frankfurt RBD pools.",
    ),
    spec(
        "compute-fra",
        "KVM cluster Frankfurt",
        "infrastructure",
        &[("dc", "fra"), ("role", "compute")],
        "Proxmox VE cluster; live migration between all nodes.",
    ),
    spec(
        "compute-ams",
        "KVM cluster Amsterdam",
        "infrastructure",
        &[("dc", "ams"), ("role", "compute")],
        "Proxmox VE cluster; runs the standby databases.",
    ),
    spec(
        "stor-fra-01",
        "stor-fra-01",
        "host",
        &[("dc", "fra"), ("role", "storage-node")],
        "Ceph OSD node, 12× 7.68 TB NVMe.",
    ),
    spec(
        "stor-fra-02",
        "stor-fra-02",
        "host",
        &[("dc", "fra"), ("role", "storage-node")],
        "Ceph OSD node, 12× 7.68 TB NVMe.",
    ),
    spec(
        "stor-fra-03",
        "stor-fra-03",
        "host",
        &[("dc", "fra"), ("role", "storage-node")],
        "Ceph OSD node, 12× 7.68 TB NVMe.",
    ),
    spec(
        "stor-ams-01",
        "stor-ams-01",
        "host",
        &[("dc", "ams"), ("role", "storage-node")],
        "Ceph OSD node.",
    ),
    spec(
        "stor-ams-02",
        "stor-ams-02",
        "host",
        &[("dc", "ams"), ("role", "storage-node")],
        "Ceph OSD node.",
    ),
    spec(
        "kvm-fra-01",
        "kvm-fra-01",
        "host",
        &[("dc", "fra"), ("role", "hypervisor")],
        "Hypervisor, 2× EPYC 9354, 1.5 TB RAM.",
    ),
    spec(
        "kvm-fra-02",
        "kvm-fra-02",
        "host",
        &[("dc", "fra"), ("role", "hypervisor")],
        "Hypervisor, 2× EPYC 9354, 1.5 TB RAM.",
    ),
    spec(
        "kvm-ams-01",
        "kvm-ams-01",
        "host",
        &[("dc", "ams"), ("role", "hypervisor")],
        "Hypervisor.",
    ),
    spec(
        "postgres-main",
        "PostgreSQL main cluster",
        "service",
        &[("dc", "fra"), ("tier", "shared"), ("kind", "database")],
        "PostgreSQL 16 with Patroni; primary in Frankfurt, synchronous standby in Amsterdam.",
    ),
    spec(
        "redis-cache",
        "Redis cache",
        "service",
        &[("dc", "fra"), ("tier", "shared"), ("kind", "cache")],
        "Redis 7 with Sentinel; sessions and page fragments for the shops.",
    ),
    spec(
        "mail-relay",
        "Mail relay",
        "service",
        &[("dc", "fra"), ("tier", "shared"), ("kind", "mail")],
        "Postfix relay for all transactional mail; DKIM keys in Vault.",
    ),
    spec(
        "acme-shop",
        "Acme webshop",
        "project",
        &[("customer", "acme")],
        "Acme Corp's B2C webshop (Shopware behind Varnish). Peak season: November–December.",
    ),
    spec(
        "acme-staging",
        "Acme webshop · staging",
        "environment",
        &[("customer", "acme"), ("env", "staging")],
        "Deployed on every merge to main.",
    ),
    spec(
        "acme-production",
        "Acme webshop · production",
        "environment",
        &[("customer", "acme"), ("env", "production")],
        "Deployed by release tags; Varnish in front of 4 app VMs.",
    ),
    spec(
        "globex-portal",
        "Globex customer portal",
        "project",
        &[("customer", "globex")],
        "Self-service portal for Globex's business customers.",
    ),
    spec(
        "globex-staging",
        "Globex portal · staging",
        "environment",
        &[("customer", "globex"), ("env", "staging")],
        "Shared with Globex's QA team.",
    ),
    spec(
        "globex-production",
        "Globex portal · production",
        "environment",
        &[("customer", "globex"), ("env", "production")],
        "SLA 99.9 %, maintenance window Tuesdays 06:00–07:00.",
    ),
    spec(
        "initech-billing",
        "Initech billing API",
        "project",
        &[("customer", "initech")],
        "REST API that Initech's ERP calls for invoicing; PCI scope.",
    ),
    spec(
        "initech-staging",
        "Initech billing · staging",
        "environment",
        &[("customer", "initech"), ("env", "staging")],
        "Anonymised copy of production data, refreshed weekly.",
    ),
    spec(
        "initech-production",
        "Initech billing · production",
        "environment",
        &[("customer", "initech"), ("env", "production")],
        "Runs in both sites; failover tested monthly.",
    ),
];

const INCLUDES: &[(&str, &str)] = &[
    ("dc-fra", "storage-fra"),
    ("dc-fra", "compute-fra"),
    ("dc-ams", "storage-ams"),
    ("dc-ams", "compute-ams"),
    ("storage-fra", "stor-fra-01"),
    ("storage-fra", "stor-fra-02"),
    ("storage-fra", "stor-fra-03"),
    ("storage-ams", "stor-ams-01"),
    ("storage-ams", "stor-ams-02"),
    ("compute-fra", "kvm-fra-01"),
    ("compute-fra", "kvm-fra-02"),
    ("compute-ams", "kvm-ams-01"),
    ("acme-shop", "acme-staging"),
    ("acme-shop", "acme-production"),
    ("globex-portal", "globex-staging"),
    ("globex-portal", "globex-production"),
    ("initech-billing", "initech-staging"),
    ("initech-billing", "initech-production"),
    ("acme-production", "postgres-main"),
    ("acme-production", "redis-cache"),
    ("acme-production", "mail-relay"),
    ("acme-production", "compute-fra"),
    ("globex-production", "postgres-main"),
    ("globex-production", "mail-relay"),
    ("globex-production", "compute-fra"),
    ("initech-production", "postgres-main"),
    ("initech-production", "compute-fra"),
    ("initech-production", "compute-ams"),
    ("acme-staging", "compute-fra"),
    ("globex-staging", "compute-fra"),
    ("initech-staging", "compute-ams"),
];

fn handbook(slug: &str) -> String {
    match slug {
        "acme-production" => "## Rules\n\n- **Varnish** may be flushed by any on-call operator (`flush-cache`), at any time. Tell #acme-shop.\n- **Deploys** only Monday–Thursday 09:00–16:00 CET; from 15 November to 31 December only with Acme's release manager.\n- Never restart `postgres-main` yourself: call the DBA on duty.\n\n## Escalation\n\n1. On-call operator (PagerDuty *acme-prod*).\n2. After **15 minutes** without progress: Lena Fischer (team lead).\n3. Shop down for **30 minutes**: Acme's incident hotline — they decide about the maintenance page.\n".into(),
        "postgres-main" => "## Rules\n\n- Read-only queries on the standby are always fine.\n- **No restarts, failovers or `VACUUM FULL`** without the DBA on duty.\n- Replication lag above 30 s: check the Amsterdam link first (see runbook).\n\n## Escalation\n\nDBA on duty (phone below) → Jonas Weber → CTO.\n".into(),
        "storage-fra" => "## Rules\n\n- Never take more than **one OSD node** down at a time; wait for `HEALTH_OK` in between.\n- `noout` during planned maintenance only, and remove it afterwards.\n- A full pool (>85 %) is a P1: stop the backup jobs first.\n".into(),
        "initech-production" => "## Rules\n\nPCI scope: every change needs a ticket in Initech's change board, **including** restarts.\nLogs contain card tokens: never copy them into chat.\n\n## Escalation\n\nInitech's operations desk is available 24/7; call them before any failover.\n".into(),
        "mail-relay" => "## Rules\n\n- The queue may be flushed (`postqueue -f`) at any time.\n- Never delete deferred mail without asking the owning project.\n".into(),
        _ => String::new(),
    }
}

fn links(slug: &str) -> Vec<Link> {
    let link = |kind, title: &str, url: String| Link {
        title: title.into(),
        url,
        kind,
    };
    let mut out = vec![link(
        LinkKind::Dashboard,
        "Grafana overview",
        format!("https://grafana.example.net/d/{slug}/overview"),
    )];
    match slug {
        "dc-fra" | "dc-ams" => {
            out.push(link(
                LinkKind::Dashboard,
                "Power and cooling",
                format!("https://dcim.example.net/sites/{slug}"),
            ));
            out.push(link(
                LinkKind::Chat,
                "#datacenter",
                "https://chat.example.net/channels/datacenter".into(),
            ));
        }
        "storage-fra" | "storage-ams" => {
            out.push(link(
                LinkKind::Dashboard,
                "Ceph cluster",
                format!("https://grafana.example.net/d/ceph/{slug}"),
            ));
            out.push(link(
                LinkKind::Runbook,
                "Replace a failed OSD",
                "https://wiki.example.net/runbooks/ceph-osd-replace".into(),
            ));
        }
        "postgres-main" => {
            out.push(link(
                LinkKind::Runbook,
                "Replication lag",
                "https://wiki.example.net/runbooks/pg-replication-lag".into(),
            ));
            out.push(link(
                LinkKind::Repository,
                "Patroni configuration",
                "https://git.example.net/ops/patroni".into(),
            ));
        }
        "acme-shop" | "acme-production" => {
            out.push(link(
                LinkKind::Repository,
                "acme/shop",
                "https://git.example.net/acme/shop".into(),
            ));
            out.push(link(
                LinkKind::Runbook,
                "Shop down",
                "https://wiki.example.net/runbooks/acme-shop-down".into(),
            ));
            out.push(link(
                LinkKind::Chat,
                "#acme-shop",
                "https://chat.example.net/channels/acme-shop".into(),
            ));
        }
        "globex-portal" => out.push(link(
            LinkKind::Docs,
            "Portal architecture",
            "https://wiki.example.net/globex/portal".into(),
        )),
        "initech-billing" => out.push(link(
            LinkKind::Docs,
            "PCI responsibilities",
            "https://wiki.example.net/initech/pci".into(),
        )),
        _ => {}
    }
    out
}

fn contacts(slug: &str) -> Vec<Contact> {
    let c = |name: &str, role: &str, reach: &str, escalation| Contact {
        name: name.into(),
        role: role.into(),
        reach: reach.into(),
        escalation,
    };
    match slug {
        "dc-fra" | "dc-ams" | "storage-fra" | "storage-ams" | "compute-fra" | "compute-ams" => {
            vec![
                c(
                    "Infrastructure on-call",
                    "on-call",
                    "PagerDuty: infra-oncall",
                    1,
                ),
                c("Mehmet Yılmaz", "infrastructure lead", "+49 69 555 0142", 2),
            ]
        }
        "postgres-main" => vec![
            c("DBA on duty", "on-call", "+49 69 555 0199", 1),
            c("Jonas Weber", "database lead", "@jonas", 2),
        ],
        "acme-shop" | "acme-production" => vec![
            c("Operations on-call", "on-call", "PagerDuty: acme-prod", 1),
            c("Lena Fischer", "team lead", "+49 30 555 0117, @lena", 2),
            c("Acme incident hotline", "customer", "+1 555 0100 (24/7)", 3),
        ],
        "globex-portal" | "globex-production" => vec![
            c("Operations on-call", "on-call", "PagerDuty: globex", 1),
            c("Priya Raman", "project lead", "@priya", 2),
        ],
        "initech-billing" | "initech-production" => vec![
            c("Operations on-call", "on-call", "PagerDuty: initech", 1),
            c(
                "Initech operations desk",
                "customer",
                "+1 555 0177 (24/7)",
                2,
            ),
        ],
        _ => vec![],
    }
}

/// A small deterministic generator: the same demo every time.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// Seeds the demo estate unless the instance already has systems.
pub async fn seed(ctx: &Context) -> Result<Option<Seeded>, DemoError> {
    if has_systems(ctx).await? {
        return Ok(None);
    }
    // The estate was set up eight days ago; the week of events follows.
    let then = eight_days_ago(ctx);
    let mut seeded = Seeded::default();
    let admin = Actor::user("demo", "Demo setup");
    let bad = |e: String| DemoError::Data(e);
    for s in SYSTEMS {
        let labels: BTreeMap<String, String> = s
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut new = NewSystem::new(
            Slug::try_from(s.slug).map_err(bad)?,
            s.title,
            CategoryName::try_from(s.category.to_owned()).map_err(bad)?,
        );
        new.description = s.description.into();
        new.labels = Labels::try_from(labels).map_err(bad)?;
        new.handbook = handbook(s.slug);
        new.links = links(s.slug);
        new.contacts = contacts(s.slug);
        systems::create(&then, &admin, new).await?;
        seeded.systems += 1;
    }
    for (title, slug, selector) in [
        ("All production", "all-production", "env=production"),
        ("All storage", "all-storage", "role=storage"),
    ] {
        let mut new = NewSystem::new(
            Slug::try_from(slug).map_err(bad)?,
            title,
            CategoryName::try_from("environment".to_owned()).map_err(bad)?,
        );
        new.selector = Some(LabelSelector::try_from(selector).map_err(bad)?);
        new.description =
            format!("Every system labelled `{selector}`, whichever project or site it belongs to.");
        systems::create(&then, &admin, new).await?;
        seeded.systems += 1;
    }
    for (parent, child) in INCLUDES {
        systems::include(&then, &admin, parent, child).await?;
    }
    seeded.events = week_of_events(ctx).await?;
    Ok(Some(seeded))
}

/// Are there systems besides the one that stands for this instance?
async fn has_systems(ctx: &Context) -> Result<bool, sqlx::Error> {
    let row = sqlx::query(
        "SELECT COUNT(*) FROM systems WHERE deleted_at IS NULL \
         AND id NOT IN (SELECT system_id FROM instance WHERE system_id IS NOT NULL)",
    )
    .fetch_one(ctx.db.reader())
    .await?;
    Ok(sqlx::Row::try_get::<i64, _>(&row, 0)? > 0)
}

/// A clock running behind another.
#[derive(Debug)]
struct Behind(Arc<dyn Clock>, SignedDuration);

impl Clock for Behind {
    fn now(&self) -> jiff::Timestamp {
        let now = self.0.now();
        now.checked_sub(self.1).unwrap_or(now)
    }
}

/// The same instance, eight days ago: structure changes recorded through it
/// happened before the week of events.
fn eight_days_ago(ctx: &Context) -> Context {
    Context {
        config: ctx.config.clone(),
        data_dir: ctx.data_dir.clone(),
        db: ctx.db.clone(),
        clock: Arc::new(Behind(
            ctx.clock.clone(),
            SignedDuration::from_hours(8 * 24),
        )),
        identity: ctx.identity.clone(),
        timeline: crate::timeline::hub::TimelineHub::new(),
        appender: crate::timeline::batch::Appender::new(),
        agents: Default::default(),
        ingest: Default::default(),
        metrics: crate::metrics::Metrics::default(),
        federation: Default::default(),
    }
}

const PEOPLE: &[&str] = &[
    "Lena Fischer",
    "Mehmet Yılmaz",
    "Priya Raman",
    "Jonas Weber",
    "Tom Berger",
];

/// Deploys, notes, state changes and pipelines over the last seven days,
/// ending in a present with two warnings and one critical problem.
async fn week_of_events(ctx: &Context) -> Result<usize, DemoError> {
    let now = ctx.now();
    let mut rng = Lcg(42);
    let ids = systems::store::ids_by_slugs(
        &mut *ctx.db.reader().acquire().await?,
        &SYSTEMS
            .iter()
            .map(|s| s.slug.to_owned())
            .collect::<Vec<_>>(),
    )
    .await?;
    let mut n = 0;
    let record = |slug: &'static str,
                  hours_ago: f64,
                  kind: &'static str,
                  severity: Severity,
                  title: String,
                  body: &str,
                  data: serde_json::Value| {
        let at = now
            .checked_sub(SignedDuration::from_secs_f64(hours_ago * 3600.0))
            .unwrap_or(now);
        (slug, at, kind, severity, title, body.to_owned(), data)
    };
    let mut events = Vec::new();
    // Background: hosts and services report healthy, deploys and pipelines run.
    for day in 0..7 {
        let base = f64::from(day) * 24.0;
        for env in ["acme-staging", "globex-staging", "initech-staging"] {
            let version = format!("1.{}.{}", 20 + day, rng.next(9));
            events.push(record(
                env,
                base + 3.0 + rng.next(8) as f64,
                "deploy",
                Severity::Info,
                format!("Deployed {version}"),
                "",
                json!({"version": version, "by": "CI"}),
            ));
            events.push(record(
                env,
                base + 2.5 + rng.next(8) as f64,
                "ci.pipeline",
                Severity::Ok,
                format!("Pipeline #{} passed", 4100 + day * 7 + rng.next(7) as i32),
                "",
                json!({}),
            ));
        }
        if day % 2 == 1 {
            let who = PEOPLE[rng.next(PEOPLE.len())];
            events.push(record(
                "acme-production",
                base + 10.0,
                "deploy",
                Severity::Info,
                format!("Released shop 4.{}.0", 12 - day),
                "",
                json!({"by": who}),
            ));
        }
        for host in [
            "stor-fra-01",
            "stor-fra-02",
            "stor-fra-03",
            "kvm-fra-01",
            "kvm-fra-02",
            "stor-ams-01",
            "kvm-ams-01",
        ] {
            events.push(record(
                host,
                base + 20.0 + rng.next(3) as f64,
                "state",
                Severity::Ok,
                "All checks passing".into(),
                "",
                json!({"source": "health"}),
            ));
        }
    }
    // Stories, oldest first.
    events.push(record(
        "storage-fra",
        130.0,
        "note",
        Severity::Info,
        "Planned: firmware update of stor-fra-02".into(),
        "One node at a time; `noout` set from 14:00 to 15:30.",
        json!({}),
    ));
    events.push(record(
        "stor-fra-02",
        129.0,
        "state",
        Severity::Warning,
        "OSDs down for firmware update".into(),
        "",
        json!({"source": "ceph"}),
    ));
    events.push(record(
        "stor-fra-02",
        127.5,
        "state",
        Severity::Ok,
        "OSDs back, HEALTH_OK".into(),
        "",
        json!({"source": "ceph"}),
    ));
    events.push(record(
        "acme-production",
        97.0,
        "state",
        Severity::Critical,
        "Checkout returns 502".into(),
        "Varnish backend health checks failing after the 4.9.0 release.",
        json!({"source": "http-checkout"}),
    ));
    events.push(record(
        "acme-production",
        96.6,
        "note",
        Severity::Info,
        "Flushed the Varnish cache".into(),
        "Stale error pages were cached; flushed with `flush-cache`.",
        json!({"by": "Tom Berger"}),
    ));
    events.push(record(
        "acme-production",
        96.5,
        "state",
        Severity::Ok,
        "Checkout healthy again".into(),
        "",
        json!({"source": "http-checkout"}),
    ));
    events.push(record(
        "postgres-main",
        75.0,
        "state",
        Severity::Warning,
        "Replication lag 48 s to Amsterdam".into(),
        "",
        json!({"source": "replication"}),
    ));
    events.push(record(
        "postgres-main",
        74.0,
        "note",
        Severity::Info,
        "Lag caused by a vacuum on the billing schema".into(),
        "Link to Amsterdam fine. Will schedule vacuums at night.",
        json!({"by": "Jonas Weber"}),
    ));
    events.push(record(
        "postgres-main",
        73.5,
        "state",
        Severity::Ok,
        "Replication lag below 1 s".into(),
        "",
        json!({"source": "replication"}),
    ));
    events.push(record(
        "globex-production",
        50.0,
        "note",
        Severity::Info,
        "Maintenance window: kernel updates".into(),
        "Tuesday 06:00–07:00 as agreed with Globex.",
        json!({}),
    ));
    events.push(record(
        "acme-production",
        26.0,
        "state",
        Severity::Critical,
        "Checkout returns 502".into(),
        "Same symptoms as on Thursday.",
        json!({"source": "http-checkout"}),
    ));
    events.push(record(
        "acme-production",
        25.8,
        "note",
        Severity::Info,
        "Flushed the Varnish cache again".into(),
        "Second time this week — root cause ticket ACME-2291.",
        json!({"by": "Lena Fischer"}),
    ));
    events.push(record(
        "acme-production",
        25.7,
        "state",
        Severity::Ok,
        "Checkout healthy again".into(),
        "",
        json!({"source": "http-checkout"}),
    ));
    // The present: what the person at 3am finds.
    events.push(record(
        "stor-ams-02",
        5.0,
        "state",
        Severity::Warning,
        "Disk /var/lib/ceph 86 % full".into(),
        "",
        json!({"source": "disk"}),
    ));
    events.push(record(
        "redis-cache",
        2.0,
        "state",
        Severity::Warning,
        "Memory 91 % of maxmemory".into(),
        "Evictions rising since the newsletter went out.",
        json!({"source": "memory"}),
    ));
    events.push(record(
        "mail-relay",
        0.6,
        "state",
        Severity::Critical,
        "Queue: 12,480 deferred messages".into(),
        "Remote: 421 rate limited by a large freemail provider.",
        json!({"source": "queue"}),
    ));
    events.push(record(
        "mail-relay",
        0.3,
        "note",
        Severity::Info,
        "Looking into it — rate limit, not our IP reputation".into(),
        "Do not flush the queue yet.",
        json!({"by": "Mehmet Yılmaz"}),
    ));
    events.sort_by_key(|e| e.1);
    let actor_of = |data: &serde_json::Value, i: usize| -> Actor {
        match data.get("by").and_then(|b| b.as_str()) {
            Some("CI") => Actor {
                kind: aramaki_protocol::ActorKind::Integration,
                id: None,
                name: "GitLab CI".into(),
            },
            Some(who) => Actor {
                kind: aramaki_protocol::ActorKind::User,
                id: None,
                name: who.into(),
            },
            None => Actor {
                kind: aramaki_protocol::ActorKind::User,
                id: None,
                name: PEOPLE[i % PEOPLE.len()].into(),
            },
        }
    };
    let mut tx = ctx.db.begin().await?;
    for (i, (slug, at, kind, severity, title, body, data)) in events.into_iter().enumerate() {
        let Some(id) = ids.get(slug) else { continue };
        let kind = Kind::try_from(kind.to_owned()).map_err(DemoError::Data)?;
        let actor = if kind.is_state() {
            Actor {
                kind: aramaki_protocol::ActorKind::Integration,
                id: None,
                name: "monitoring".into(),
            }
        } else {
            actor_of(&data, i)
        };
        let mut data = data;
        if let Some(obj) = data.as_object_mut() {
            obj.remove("by");
        }
        let event = NewEvent {
            kind,
            severity,
            title,
            body,
            occurred_at: Some(at),
            data,
            caused_by: None,
            idempotency: None,
        };
        timeline::append(ctx, &mut tx, &actor, Target { id, slug }, event).await?;
        n += 1;
    }
    ctx.commit(tx).await?;
    Ok(n)
}
