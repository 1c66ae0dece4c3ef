//! Prometheus text-format metrics, kept by hand: a few counters and one
//! latency histogram do not justify a metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::db::PoolStats;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    http: Mutex<Http>,
    events_recorded: AtomicU64,
    results_ingested: AtomicU64,
    results_duplicate: AtomicU64,
    /// Connections: open now, closed by the limit, and timeouts.
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    connections_evicted: AtomicU64,
    header_timeouts: AtomicU64,
    body_timeouts: AtomicU64,
    frames_refused: AtomicU64,
    records_refused: AtomicU64,
    nul_replaced: AtomicU64,
}

#[derive(Debug, Default)]
struct Http {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<(String, String), Histogram>,
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Metrics {
    /// Records one HTTP request by method, route template (never the raw
    /// path, to keep label cardinality bounded) and status.
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        let Ok(mut http) = self.http.lock() else {
            return;
        };
        *http
            .requests
            .entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        let h = http
            .latency
            .entry((method.to_owned(), route.to_owned()))
            .or_default();
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += secs;
        h.count += 1;
    }

    /// An HTTP connection was accepted (on any listener).
    pub fn connection_opened(&self) {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
    }

    /// An HTTP connection was closed.
    pub fn connection_closed(&self) {
        let _ = self
            .connections_open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// A new connection turned away (`evicted` false) or an idle one closed
    /// to make room (`evicted` true) at `web.max_connections`.
    pub fn connection_refused(&self, evicted: bool) {
        let counter = if evicted {
            &self.connections_evicted
        } else {
            &self.connections_refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection whose request head (`body` false) or body (`body` true)
    /// did not arrive in time.
    pub fn timeout(&self, body: bool) {
        let counter = if body {
            &self.body_timeouts
        } else {
            &self.header_timeouts
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn events_recorded(&self, n: u64) {
        self.events_recorded.fetch_add(n, Ordering::Relaxed);
    }

    /// Agent results committed, and replays skipped as duplicates.
    pub fn results(&self, ingested: u64, duplicates: u64) {
        self.results_ingested.fetch_add(ingested, Ordering::Relaxed);
        self.results_duplicate
            .fetch_add(duplicates, Ordering::Relaxed);
    }

    /// An agent session's frame failed its integrity check.
    pub fn frame_refused(&self) {
        self.frames_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Agent records acknowledged but not stored (a name holding U+0000).
    pub fn records_refused(&self, n: u64) {
        self.records_refused.fetch_add(n, Ordering::Relaxed);
    }

    /// NUL characters replaced by U+FFFD in agents' free text.
    pub fn nul_replaced(&self, n: u64) {
        self.nul_replaced.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds the agent figures: connected sessions of this process.
    pub fn render_agents(&self, out: &mut String, connected: usize) {
        let counters = [
            (
                "aramaki_agent_records_committed_total",
                "Agent records committed by this process.",
                &self.results_ingested,
            ),
            (
                "aramaki_agent_records_duplicate_total",
                "Agent records skipped as replays (already committed).",
                &self.results_duplicate,
            ),
            (
                "aramaki_agent_frames_refused_total",
                "Agent session frames refused: forged, replayed or reordered.",
                &self.frames_refused,
            ),
            (
                "aramaki_agent_records_refused_total",
                "Agent records acknowledged but not stored: a name or identifier holds U+0000.",
                &self.records_refused,
            ),
            (
                "aramaki_agent_nul_replaced_total",
                "NUL characters (U+0000) replaced by U+FFFD in agents' output and other free text.",
                &self.nul_replaced,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP aramaki_agents_connected Agent sessions open on this process."
        );
        let _ = writeln!(out, "# TYPE aramaki_agents_connected gauge");
        let _ = writeln!(out, "aramaki_agents_connected {connected}");
    }

    pub fn render(&self, pool: PoolStats) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP aramaki_http_requests_total HTTP requests by method, route and status."
        );
        let _ = writeln!(out, "# TYPE aramaki_http_requests_total counter");
        let http = self
            .http
            .lock()
            .map(|h| (h.requests.clone(), h.latency.clone()));
        let (requests, latency) = http.unwrap_or_default();
        for ((method, route, status), n) in &requests {
            let _ = writeln!(
                out,
                "aramaki_http_requests_total{{method=\"{}\",route=\"{}\",status=\"{status}\"}} {n}",
                escape(method),
                escape(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP aramaki_http_request_duration_seconds HTTP request latency."
        );
        let _ = writeln!(
            out,
            "# TYPE aramaki_http_request_duration_seconds histogram"
        );
        for ((method, route), h) in &latency {
            let labels = format!("method=\"{}\",route=\"{}\"", escape(method), escape(route));
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "aramaki_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "aramaki_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "aramaki_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "aramaki_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP aramaki_events_recorded_total Timeline events recorded by this process."
        );
        let _ = writeln!(out, "# TYPE aramaki_events_recorded_total counter");
        let _ = writeln!(
            out,
            "aramaki_events_recorded_total {}",
            self.events_recorded.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP aramaki_db_pool_connections Open database connections."
        );
        let _ = writeln!(out, "# TYPE aramaki_db_pool_connections gauge");
        let _ = writeln!(out, "aramaki_db_pool_connections {}", pool.size);
        let _ = writeln!(
            out,
            "# HELP aramaki_db_pool_idle_connections Idle database connections."
        );
        let _ = writeln!(out, "# TYPE aramaki_db_pool_idle_connections gauge");
        let _ = writeln!(out, "aramaki_db_pool_idle_connections {}", pool.idle);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP aramaki_http_connections_open HTTP connections open now."
        );
        let _ = writeln!(out, "# TYPE aramaki_http_connections_open gauge");
        let _ = writeln!(
            out,
            "aramaki_http_connections_open {}",
            load(&self.connections_open)
        );
        let _ = writeln!(out, "# HELP aramaki_http_connections_refused_total Connections closed at web.max_connections: new ones turned away, idle ones closed to make room.");
        let _ = writeln!(out, "# TYPE aramaki_http_connections_refused_total counter");
        let _ = writeln!(
            out,
            "aramaki_http_connections_refused_total{{which=\"new\"}} {}",
            load(&self.connections_refused)
        );
        let _ = writeln!(
            out,
            "aramaki_http_connections_refused_total{{which=\"idle\"}} {}",
            load(&self.connections_evicted)
        );
        let _ = writeln!(out, "# HELP aramaki_http_timeouts_total Connections cut because the request head or body did not arrive in time.");
        let _ = writeln!(out, "# TYPE aramaki_http_timeouts_total counter");
        let _ = writeln!(
            out,
            "aramaki_http_timeouts_total{{phase=\"header\"}} {}",
            load(&self.header_timeouts)
        );
        let _ = writeln!(
            out,
            "aramaki_http_timeouts_total{{phase=\"body\"}} {}",
            load(&self.body_timeouts)
        );
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.observe_request("GET", "/api/v1/systems", 200, Duration::from_millis(3));
        m.observe_request("GET", "/api/v1/systems", 200, Duration::from_millis(30));
        m.events_recorded(5);
        let text = m.render(PoolStats { size: 2, idle: 1 });
        assert!(text.contains(
            "aramaki_http_requests_total{method=\"GET\",route=\"/api/v1/systems\",status=\"200\"} 2"
        ));
        assert!(text.contains("le=\"0.005\"} 1"));
        assert!(text.contains("le=\"0.05\"} 2"));
        assert!(text.contains("aramaki_events_recorded_total 5"));
        assert!(text.contains("aramaki_db_pool_connections 2"));
        m.results(7, 2);
        let mut text = String::new();
        m.render_agents(&mut text, 3);
        assert!(text.contains("aramaki_agent_records_committed_total 7"));
        assert!(text.contains("aramaki_agent_records_duplicate_total 2"));
        assert!(text.contains("aramaki_agents_connected 3"));
    }

    #[test]
    fn counts_connections_refusals_and_timeouts() {
        let m = Metrics::default();
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        m.connection_closed();
        m.connection_closed();
        m.connection_opened();
        m.connection_refused(false);
        m.connection_refused(true);
        m.connection_refused(true);
        m.timeout(false);
        m.timeout(true);
        m.timeout(true);
        m.timeout(true);
        let text = m.render(PoolStats { size: 0, idle: 0 });
        assert!(text.contains("aramaki_http_connections_open 1\n"), "{text}");
        assert!(text.contains("aramaki_http_connections_refused_total{which=\"new\"} 1"));
        assert!(text.contains("aramaki_http_connections_refused_total{which=\"idle\"} 2"));
        assert!(text.contains("aramaki_http_timeouts_total{phase=\"header\"} 1"));
        assert!(text.contains("aramaki_http_timeouts_total{phase=\"body\"} 3"));
    }
}
