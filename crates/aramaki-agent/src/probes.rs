//! Probes built into the agent, so that the common checks (load, memory,
//! disks, ports, web endpoints, processes, units) need no plugin installed.
//!
//! Each probe answers like a Nagios plugin: a status code, a first line such
//! as `LOAD OK - …`, and metrics. Everything reads `/proc` or talks to the
//! network directly; nothing goes through a shell.

use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aramaki_protocol::agent::{CheckState, Metric, Probe};
use jiff::Timestamp;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// What a probe found, in the Nagios convention.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutcome {
    /// 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    pub status: i32,
    /// First line `NAME STATE - summary`, then optional detail lines.
    pub output: String,
    pub metrics: Vec<Metric>,
}

/// Why a probe could not produce a verdict (reported as UNKNOWN).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{0}: unexpected format")]
    Format(&'static str),
    #[error("no real file systems found in /proc/self/mounts")]
    NoMounts,
    #[error("{0}")]
    Url(#[from] UrlError),
    #[error("probe task failed: {0}")]
    Task(String),
}

/// Runs a probe, giving up after `timeout`.
///
/// A network probe that times out is CRITICAL (the service did not answer in
/// time); any other probe that times out is UNKNOWN (the host is the problem,
/// not the thing measured).
pub async fn run(probe: &Probe, timeout: Duration) -> ProbeOutcome {
    let critical = matches!(probe, Probe::Tcp { .. } | Probe::Http { .. });
    bounded(probe_name(probe), critical, timeout, run_unbounded(probe)).await
}

/// The name a probe's output starts with.
fn probe_name(probe: &Probe) -> &'static str {
    match probe {
        Probe::Keepalive => "KEEPALIVE",
        Probe::Load { .. } => "LOAD",
        Probe::Memory { .. } => "MEMORY",
        Probe::Disk { .. } => "DISK",
        Probe::Tcp { .. } => "TCP",
        Probe::Http { .. } => "HTTP",
        Probe::Process { .. } => "PROCS",
        Probe::Systemd { .. } => "SYSTEMD",
    }
}

/// Applies the timeout to a probe future.
async fn bounded(
    name: &str,
    critical: bool,
    timeout: Duration,
    probe: impl Future<Output = ProbeOutcome>,
) -> ProbeOutcome {
    match tokio::time::timeout(timeout, probe).await {
        Ok(outcome) => outcome,
        Err(_) => {
            let status = if critical { 2 } else { 3 };
            outcome(
                name,
                status,
                format!("timed out after {}", seconds(timeout)),
                vec![],
            )
        }
    }
}

async fn run_unbounded(probe: &Probe) -> ProbeOutcome {
    let name = probe_name(probe);
    let result = match probe {
        Probe::Keepalive => Ok(outcome(name, 0, "agent running", vec![])),
        Probe::Load { warn, crit } => load(*warn, *crit).await,
        Probe::Memory { warn_pct, crit_pct } => memory(*warn_pct, *crit_pct).await,
        Probe::Disk {
            mount,
            warn_pct,
            crit_pct,
        } => disk(mount.clone(), *warn_pct, *crit_pct).await,
        Probe::Tcp { host, port } => Ok(tcp(host, *port).await),
        Probe::Http {
            url,
            expect_status,
            body_contains,
            cert_warn_days,
            cert_crit_days,
        } => {
            let expect = Expect {
                status: *expect_status,
                body_contains: body_contains.as_deref(),
                cert_warn_days: i64::from(*cert_warn_days),
                cert_crit_days: i64::from(*cert_crit_days),
            };
            http(url, &expect, tls_config).await
        }
        Probe::Process {
            name: proc,
            min,
            max,
        } => process(proc, *min, *max).await,
        Probe::Systemd { unit } => Ok(systemd(unit).await),
    };
    result.unwrap_or_else(|e| outcome(name, 3, e, vec![]))
}

/// Builds an outcome with the `NAME STATE - text` first line.
fn outcome(
    name: &str,
    status: i32,
    text: impl std::fmt::Display,
    metrics: Vec<Metric>,
) -> ProbeOutcome {
    let state = CheckState::from_exit(status).as_str().to_uppercase();
    ProbeOutcome {
        status,
        output: format!("{name} {state} - {text}"),
        metrics,
    }
}

/// A metric without thresholds or bounds.
fn metric(name: impl Into<String>, value: f64, unit: &str) -> Metric {
    Metric {
        name: name.into(),
        value,
        unit: unit.to_owned(),
        warn: None,
        crit: None,
        min: None,
        max: None,
    }
}

/// A metric with thresholds and bounds, for graphs that show the limits.
fn bounded_metric(
    name: impl Into<String>,
    value: f64,
    unit: &str,
    limits: [f64; 2],
    range: [Option<f64>; 2],
) -> Metric {
    Metric {
        warn: Some(limits[0].to_string()),
        crit: Some(limits[1].to_string()),
        min: range[0],
        max: range[1],
        ..metric(name, value, unit)
    }
}

/// 2 above `crit`, 1 above `warn`, else 0 (Nagios: a plain threshold `10`
/// alerts when the value exceeds 10).
fn threshold(value: f64, warn: f64, crit: f64) -> i32 {
    if value > crit {
        2
    } else if value > warn {
        1
    } else {
        0
    }
}

/// An I/O error without the `(os error N)` suffix, for human output.
pub(crate) fn io_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// `1.5 s`, `0.250 s`: how long something took.
fn seconds(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs} s")
    } else {
        format!("{secs:.3} s")
    }
}

/// Bytes in binary units, for summaries.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

async fn read_proc(path: &'static str) -> Result<String, ProbeError> {
    tokio::fs::read_to_string(path)
        .await
        .map_err(|e| ProbeError::Read {
            path: path.to_owned(),
            reason: io_text(&e),
        })
}

/// Runs blocking work (statvfs can hang on a dead NFS server) off the
/// runtime, so that the timeout still fires.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ProbeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProbeError::Task(e.to_string()))
}

// ---------------------------------------------------------------- load

async fn load(warn: f64, crit: f64) -> Result<ProbeOutcome, ProbeError> {
    let text = read_proc("/proc/loadavg").await?;
    let loads = parse_loadavg(&text).ok_or(ProbeError::Format("/proc/loadavg"))?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(load_outcome(loads, cpus, warn, crit))
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Judges the worst of the three averages per CPU, as `check_load` does with
/// equal thresholds for all three.
fn load_outcome(loads: [f64; 3], cpus: usize, warn: f64, crit: f64) -> ProbeOutcome {
    let n = cpus.max(1) as f64;
    let per_cpu = loads.map(|l| l / n);
    let status = per_cpu
        .iter()
        .map(|&l| threshold(l, warn, crit))
        .max()
        .unwrap_or(0);
    let metrics = ["load1", "load5", "load15"]
        .iter()
        .zip(loads)
        .map(|(name, value)| {
            bounded_metric(*name, value, "", [warn * n, crit * n], [Some(0.0), None])
        })
        .collect();
    let text = format!(
        "load average: {:.2}, {:.2}, {:.2} on {cpus} CPUs ({:.2}, {:.2}, {:.2} per CPU)",
        loads[0], loads[1], loads[2], per_cpu[0], per_cpu[1], per_cpu[2]
    );
    outcome("LOAD", status, text, metrics)
}

// ---------------------------------------------------------------- memory

async fn memory(warn: f64, crit: f64) -> Result<ProbeOutcome, ProbeError> {
    let text = read_proc("/proc/meminfo").await?;
    let (total, available) = parse_meminfo(&text).ok_or(ProbeError::Format("/proc/meminfo"))?;
    Ok(memory_outcome(total, available, warn, crit))
}

/// Total and available bytes. Kernels before 3.14 lack `MemAvailable`;
/// free plus buffers plus page cache is the usual stand-in there.
fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some(kib * 1024)
        })
    };
    let total = field("MemTotal").filter(|&t| t > 0)?;
    let available = match field("MemAvailable") {
        Some(a) => a,
        None => field("MemFree")? + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0),
    };
    Some((total, available.min(total)))
}

fn memory_outcome(total: u64, available: u64, warn: f64, crit: f64) -> ProbeOutcome {
    let used = total.saturating_sub(available);
    let pct = used as f64 * 100.0 / total as f64;
    let metrics = vec![
        bounded_metric("used_pct", pct, "%", [warn, crit], [Some(0.0), Some(100.0)]),
        Metric {
            min: Some(0.0),
            max: Some(total as f64),
            ..metric("used", used as f64, "B")
        },
    ];
    let text = format!("{pct:.1}% used ({} of {})", human(used), human(total));
    outcome("MEMORY", threshold(pct, warn, crit), text, metrics)
}

// ---------------------------------------------------------------- disk

/// File systems that hold no user data and would only add noise.
const PSEUDO_FS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
    "fuse.lxcfs",
    "fuse.gvfsd-fuse",
    "fuse.portal",
    "nfsd",
    "iso9660",
];

/// Space on one mounted file system, as `df` counts it.
#[derive(Debug, Clone, PartialEq)]
struct Usage {
    mount: String,
    /// Bytes in use.
    used: u64,
    /// Bytes an unprivileged user can still write.
    avail: u64,
    /// Size of the file system.
    total: u64,
}

impl Usage {
    /// Percent used of what users can have (root's reserve excluded), like
    /// `df`.
    fn pct(&self) -> f64 {
        let usable = self.used + self.avail;
        if usable == 0 {
            0.0
        } else {
            self.used as f64 * 100.0 / usable as f64
        }
    }
}

async fn disk(mount: Option<String>, warn: f64, crit: f64) -> Result<ProbeOutcome, ProbeError> {
    let usages = match mount {
        Some(mount) => {
            let usage = blocking(move || statvfs(&mount).map_err(|e| (mount, e))).await?;
            match usage {
                Ok(u) => vec![u],
                Err((mount, e)) => {
                    return Err(ProbeError::Read {
                        path: mount,
                        reason: io_text(&e),
                    })
                }
            }
        }
        None => {
            let mounts = read_proc("/proc/self/mounts").await?;
            blocking(move || real_mounts(&mounts)).await?
        }
    };
    if usages.is_empty() {
        return Err(ProbeError::NoMounts);
    }
    Ok(disk_outcome(&usages, warn, crit))
}

/// Usage of every real file system, once per device (bind mounts and
/// containers' file bind mounts repeat the same device).
fn real_mounts(mounts: &str) -> Vec<Usage> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for (mount, fstype) in parse_mounts(mounts) {
        if PSEUDO_FS.contains(&fstype.as_str()) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&mount) else {
            continue;
        };
        if seen.contains(&meta.dev()) {
            continue;
        }
        seen.push(meta.dev());
        if let Ok(usage) = statvfs(&mount) {
            if usage.total > 0 {
                out.push(usage);
            }
        }
    }
    out
}

/// Mount points and file system types from `/proc/self/mounts`.
fn parse_mounts(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let _device = fields.next()?;
            let mount = unescape_mount(fields.next()?);
            Some((mount, fields.next()?.to_owned()))
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in mount points as
/// three-digit octal escapes (`\040`).
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Space on the file system holding `path`.
fn statvfs(path: &str) -> io::Result<Usage> {
    let c_path = std::ffi::CString::new(path)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and st a valid,
    // exclusively borrowed out-parameter for the duration of the call.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field types differ between platforms (u32 or u64).
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let (blocks, free, avail, frsize) = (
        st.f_blocks as u64,
        st.f_bfree as u64,
        st.f_bavail as u64,
        st.f_frsize as u64,
    );
    Ok(Usage {
        mount: path.to_owned(),
        used: blocks.saturating_sub(free).saturating_mul(frsize),
        avail: avail.saturating_mul(frsize),
        total: blocks.saturating_mul(frsize),
    })
}

/// The worst mount decides; the first line names the mounts in that state,
/// the following lines list every mount.
fn disk_outcome(usages: &[Usage], warn: f64, crit: f64) -> ProbeOutcome {
    let judged: Vec<(i32, &Usage)> = usages
        .iter()
        .map(|u| (threshold(u.pct(), warn, crit), u))
        .collect();
    let status = judged.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let line = |u: &Usage| {
        format!(
            "{} {:.0}% used ({} of {})",
            u.mount,
            u.pct(),
            human(u.used),
            human(u.total)
        )
    };
    let mut worst: Vec<&Usage> = judged
        .iter()
        .filter(|(s, _)| *s == status)
        .map(|(_, u)| *u)
        .collect();
    worst.sort_by(|a, b| b.pct().total_cmp(&a.pct()));
    let mut text = worst.iter().map(|u| line(u)).collect::<Vec<_>>().join(", ");
    if usages.len() > 1 {
        for u in usages {
            text.push('\n');
            text.push_str(&line(u));
        }
    }
    let metrics = usages
        .iter()
        .flat_map(|u| {
            [
                bounded_metric(
                    u.mount.clone(),
                    u.pct(),
                    "%",
                    [warn, crit],
                    [Some(0.0), Some(100.0)],
                ),
                Metric {
                    min: Some(0.0),
                    max: Some(u.total as f64),
                    ..metric(format!("{} bytes", u.mount), u.used as f64, "B")
                },
            ]
        })
        .collect();
    outcome("DISK", status, text, metrics)
}

// ---------------------------------------------------------------- tcp

async fn tcp(host: &str, port: u16) -> ProbeOutcome {
    let start = Instant::now();
    let target = display_addr(host, port);
    match TcpStream::connect((host, port)).await {
        Ok(_) => {
            let took = start.elapsed();
            let metrics = vec![Metric {
                min: Some(0.0),
                ..metric("time", took.as_secs_f64(), "s")
            }];
            outcome(
                "TCP",
                0,
                format!("connected to {target} in {}", seconds(took)),
                metrics,
            )
        }
        Err(e) => outcome(
            "TCP",
            2,
            format!("cannot connect to {target}: {}", io_text(&e)),
            vec![],
        ),
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

// ---------------------------------------------------------------- http

/// The most of a response the probe reads.
const HTTP_READ_LIMIT: u64 = 1024 * 1024;

/// A URL the http probe can fetch.
#[derive(Debug, Clone, PartialEq)]
struct Url {
    tls: bool,
    /// Host name or IP address, without brackets.
    host: String,
    port: u16,
    /// Path and query, at least `/`.
    path: String,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum UrlError {
    #[error("URL must start with http:// or https://: {0}")]
    Scheme(String),
    #[error("URL has no host: {0}")]
    NoHost(String),
    #[error("URL has a bad port: {0}")]
    Port(String),
    #[error("URL with user info is not supported: {0}")]
    UserInfo(String),
    #[error("URL has an unclosed IPv6 bracket: {0}")]
    Bracket(String),
}

impl Url {
    fn parse(url: &str) -> Result<Url, UrlError> {
        let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
        let (tls, rest) = if lower.starts_with("https://") {
            (true, &url[8..])
        } else if lower.starts_with("http://") {
            (false, &url[7..])
        } else {
            return Err(UrlError::Scheme(url.to_owned()));
        };
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(UrlError::UserInfo(url.to_owned()));
        }
        let (host, port) =
            split_authority(authority).ok_or_else(|| UrlError::Bracket(url.to_owned()))?;
        if host.is_empty() {
            return Err(UrlError::NoHost(url.to_owned()));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(p) => p
                .parse()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| UrlError::Port(url.to_owned()))?,
        };
        let path = match path.chars().next() {
            None => "/".to_owned(),
            Some('?') => format!("/{path}"),
            Some(_) => path.to_owned(),
        };
        Ok(Url {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The `Host` header: the port only when it is not the scheme's default.
    fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        match (self.host.contains(':'), self.port == default) {
            (true, true) => format!("[{}]", self.host),
            (false, true) => self.host.clone(),
            _ => display_addr(&self.host, self.port),
        }
    }
}

/// Splits `host[:port]` or `[v6][:port]`; `None` for an unclosed bracket.
fn split_authority(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    Some(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

/// What the http probe checks.
#[derive(Clone, Copy)]
struct Expect<'a> {
    status: u16,
    body_contains: Option<&'a str>,
    cert_warn_days: i64,
    cert_crit_days: i64,
}

/// A response as far as the probe cares.
struct Fetched {
    status: u16,
    reason: String,
    body: Vec<u8>,
    /// Bytes read in total, headers included.
    size: usize,
    /// For https: the end-entity certificate's `notAfter`, if readable.
    not_after: Option<Option<Timestamp>>,
}

#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(String, String),
    #[error("TLS setup failed: {0}")]
    Config(String),
    #[error("invalid server name {0}")]
    Name(String),
    #[error("request to {0} failed: {1}")]
    Exchange(String, String),
    #[error("malformed response from {0}")]
    Malformed(String),
}

/// Where https gets its client configuration (tests bring their own CA).
type TlsSource = fn() -> Result<Arc<rustls::ClientConfig>, HttpError>;

async fn http(url: &str, expect: &Expect<'_>, tls: TlsSource) -> Result<ProbeOutcome, ProbeError> {
    let url = Url::parse(url)?;
    let start = Instant::now();
    Ok(match fetch(&url, tls).await {
        Ok(fetched) => http_outcome(&fetched, expect, start.elapsed(), Timestamp::now()),
        Err(e) => outcome("HTTP", 2, e, vec![]),
    })
}

async fn fetch(url: &Url, tls: TlsSource) -> Result<Fetched, HttpError> {
    let target = display_addr(&url.host, url.port);
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| HttpError::Connect(target.clone(), io_text(&e)))?;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: aramaki-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path,
        url.host_header()
    );
    if !url.tls {
        let raw = exchange(tcp, request.as_bytes()).await;
        return parse_response(&target, raw, None);
    }
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|_| HttpError::Name(url.host.clone()))?;
    let tls = tokio_rustls::TlsConnector::from(tls()?)
        .connect(name, tcp)
        .await
        .map_err(|e| HttpError::Tls(target.clone(), io_text(&e)))?;
    let not_after = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| cert_not_after(cert));
    let raw = exchange(tls, request.as_bytes()).await;
    parse_response(&target, raw, Some(not_after))
}

/// The client configuration, built once: the webpki roots with ring.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, HttpError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(HttpError::Config)
}

/// Sends the request and reads the response until the server closes or the
/// read limit is reached.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> io::Result<Vec<u8>> {
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut buf = Vec::new();
    match (&mut stream)
        .take(HTTP_READ_LIMIT)
        .read_to_end(&mut buf)
        .await
    {
        Ok(_) => Ok(buf),
        // Many servers close TLS without close_notify; with Connection:
        // close the response is complete anyway.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !buf.is_empty() => Ok(buf),
        Err(e) => Err(e),
    }
}

fn parse_response(
    target: &str,
    raw: io::Result<Vec<u8>>,
    not_after: Option<Option<Timestamp>>,
) -> Result<Fetched, HttpError> {
    let raw = raw.map_err(|e| HttpError::Exchange(target.to_owned(), io_text(&e)))?;
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = response.parse(&raw) else {
        return Err(HttpError::Malformed(target.to_owned()));
    };
    let status = response
        .code
        .ok_or_else(|| HttpError::Malformed(target.to_owned()))?;
    Ok(Fetched {
        status,
        reason: response.reason.unwrap_or("").to_owned(),
        size: raw.len(),
        body: raw[head..].to_vec(),
        not_after,
    })
}

/// Judges a response: status, body, certificate; the worst finding wins.
fn http_outcome(
    fetched: &Fetched,
    expect: &Expect<'_>,
    took: Duration,
    now: Timestamp,
) -> ProbeOutcome {
    let mut status = 0;
    let mut parts = Vec::new();
    let reason = format!("{} {}", fetched.status, fetched.reason);
    if fetched.status == expect.status {
        parts.push(reason.trim_end().to_owned());
    } else {
        status = 2;
        parts.push(format!(
            "status {}, expected {}",
            reason.trim_end(),
            expect.status
        ));
    }
    if let Some(needle) = expect.body_contains {
        let found = String::from_utf8_lossy(&fetched.body).contains(needle);
        if !found {
            status = 2;
            parts.push(format!("body does not contain {needle:?}"));
        }
    }
    if let Some(not_after) = fetched.not_after {
        let (cert_status, text) = cert_verdict(not_after, now, expect);
        status = status.max(cert_status);
        parts.push(text);
    }
    parts.push(format!("{} bytes in {}", fetched.size, seconds(took)));
    let metrics = vec![
        Metric {
            min: Some(0.0),
            ..metric("time", took.as_secs_f64(), "s")
        },
        Metric {
            min: Some(0.0),
            ..metric("size", fetched.size as f64, "B")
        },
    ];
    outcome("HTTP", status, parts.join("; "), metrics)
}

/// Status and words for a certificate that expires at `not_after`.
fn cert_verdict(
    not_after: Option<Timestamp>,
    now: Timestamp,
    expect: &Expect<'_>,
) -> (i32, String) {
    let Some(not_after) = not_after else {
        return (1, "cannot read the certificate's expiry".to_owned());
    };
    let days = (not_after.as_second() - now.as_second()).div_euclid(86_400);
    let status = if days < expect.cert_crit_days {
        2
    } else if days < expect.cert_warn_days {
        1
    } else {
        0
    };
    let date = not_after.strftime("%Y-%m-%d");
    (
        status,
        format!("certificate expires in {days} days ({date})"),
    )
}

/// Reads one DER element: tag, contents and what follows. Only the short
/// tag form is needed for certificates.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        // Zero is BER's indefinite length, which DER forbids.
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        (
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
            rest,
        )
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

const DER_SEQUENCE: u8 = 0x30;
const DER_INTEGER: u8 = 0x02;
const DER_VERSION: u8 = 0xa0;
const DER_UTC_TIME: u8 = 0x17;
const DER_GENERALIZED_TIME: u8 = 0x18;

/// The `notAfter` of an X.509 certificate: Certificate → tbsCertificate →
/// [0] version (optional), serial, signature algorithm, issuer → validity →
/// its second time.
fn cert_not_after(der: &[u8]) -> Option<Timestamp> {
    let (DER_SEQUENCE, cert, _) = der_element(der)? else {
        return None;
    };
    let (DER_SEQUENCE, tbs, _) = der_element(cert)? else {
        return None;
    };
    let mut rest = tbs;
    if let Some((DER_VERSION, _, after)) = der_element(rest) {
        rest = after;
    }
    for expected in [DER_INTEGER, DER_SEQUENCE, DER_SEQUENCE] {
        let (tag, _, after) = der_element(rest)?;
        if tag != expected {
            return None;
        }
        rest = after;
    }
    let (DER_SEQUENCE, validity, _) = der_element(rest)? else {
        return None;
    };
    let (_, _, after_not_before) = der_element(validity)?;
    let (tag, time, _) = der_element(after_not_before)?;
    der_time(tag, time)
}

/// Reads `YYMMDDHHMMSSZ` (UTCTime, years 1950–2049) or `YYYYMMDDHHMMSSZ`
/// (GeneralizedTime), the only forms RFC 5280 allows.
fn der_time(tag: u8, bytes: &[u8]) -> Option<Timestamp> {
    let digits = std::str::from_utf8(bytes).ok()?.strip_suffix('Z')?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, digits.len()) {
        (DER_UTC_TIME, 12) => {
            let yy: i16 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (DER_GENERALIZED_TIME, 14) => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let two = |i: usize| rest.get(i..i + 2)?.parse::<i8>().ok();
    let civil =
        jiff::civil::DateTime::new(year, two(0)?, two(2)?, two(4)?, two(6)?, two(8)?, 0).ok()?;
    civil
        .to_zoned(jiff::tz::TimeZone::UTC)
        .ok()
        .map(|z| z.timestamp())
}

// ---------------------------------------------------------------- process

async fn process(name: &str, min: u32, max: Option<u32>) -> Result<ProbeOutcome, ProbeError> {
    let wanted = name.to_owned();
    let count = blocking(move || count_processes(&wanted))
        .await?
        .map_err(|e| ProbeError::Read {
            path: "/proc".to_owned(),
            reason: io_text(&e),
        })?;
    Ok(process_outcome(name, count, min, max))
}

/// Processes whose `comm` or whose argv[0] basename is `name` (comm is cut
/// at 15 bytes, so long names only match through argv[0]).
fn count_processes(name: &str) -> io::Result<u32> {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes may exit while we look; a vanished one simply does not count.
        let dir = Path::new("/proc").join(pid);
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let matches =
            comm.trim_end_matches('\n') == name || argv0_basename(&dir).is_some_and(|b| b == name);
        count += u32::from(matches);
    }
    Ok(count)
}

fn argv0_basename(dir: &Path) -> Option<String> {
    let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
    let argv0 = cmdline.split(|&b| b == 0).next()?;
    let base = argv0.rsplit(|&b| b == b'/').next()?;
    (!base.is_empty()).then(|| String::from_utf8_lossy(base).into_owned())
}

fn process_outcome(name: &str, count: u32, min: u32, max: Option<u32>) -> ProbeOutcome {
    let expected = match max {
        Some(max) => format!("{min}..{max}"),
        None => format!("at least {min}"),
    };
    let status = if count < min || max.is_some_and(|m| count > m) {
        2
    } else {
        0
    };
    let metrics = vec![Metric {
        min: Some(0.0),
        ..metric("procs", f64::from(count), "")
    }];
    let text = format!("{count} processes named {name} (expected {expected})");
    outcome("PROCS", status, text, metrics)
}

// ---------------------------------------------------------------- systemd

async fn systemd(unit: &str) -> ProbeOutcome {
    // The directory exists exactly when systemd is PID 1 (sd_booted).
    if tokio::fs::metadata("/run/systemd/system").await.is_err() {
        return outcome("SYSTEMD", 3, "systemd is not running on this host", vec![]);
    }
    // `--` so that a unit name starting with `-` is not taken for an option;
    // kill_on_drop so that the probe's timeout also ends systemctl.
    let result = tokio::process::Command::new("systemctl")
        .args(["is-active", "--", unit])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match result {
        Ok(out) => systemd_outcome(unit, String::from_utf8_lossy(&out.stdout).trim()),
        Err(e) => outcome(
            "SYSTEMD",
            3,
            format!("cannot run systemctl: {}", io_text(&e)),
            vec![],
        ),
    }
}

fn systemd_outcome(unit: &str, state: &str) -> ProbeOutcome {
    let status = match state {
        "active" => 0,
        "activating" | "reloading" => 1,
        _ => 2,
    };
    let state = if state.is_empty() { "unknown" } else { state };
    outcome("SYSTEMD", status, format!("{unit} is {state}"), vec![])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A self-signed P-256 certificate made with `openssl req -x509 -days
    /// 3650` on 2026-11-23: notAfter is UTCTime `361120164556Z`.
    const CERT_UTC_TIME: &[u8] = &[
        0x30, 0x82, 0x01, 0x83, 0x30, 0x82, 0x01, 0x29, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x14,
        0x65, 0xcd, 0xdf, 0x8c, 0xb3, 0x4d, 0xb9, 0xde, 0xc4, 0x4c, 0x13, 0xb0, 0xe9, 0x3a, 0x4d,
        0xde, 0x19, 0xae, 0xe9, 0xcd, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
        0x03, 0x02, 0x30, 0x17, 0x31, 0x15, 0x30, 0x13, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x0c,
        0x61, 0x72, 0x61, 0x6d, 0x61, 0x6b, 0x69, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x30, 0x1e, 0x17,
        0x0d, 0x32, 0x36, 0x31, 0x31, 0x32, 0x33, 0x31, 0x36, 0x34, 0x35, 0x35, 0x36, 0x5a, 0x17,
        0x0d, 0x33, 0x36, 0x31, 0x31, 0x32, 0x30, 0x31, 0x36, 0x34, 0x35, 0x35, 0x36, 0x5a, 0x30,
        0x17, 0x31, 0x15, 0x30, 0x13, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x0c, 0x61, 0x72, 0x61,
        0x6d, 0x61, 0x6b, 0x69, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x30, 0x59, 0x30, 0x13, 0x06, 0x07,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03,
        0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0xba, 0x3f, 0x08, 0x41, 0xb8, 0x73, 0xd8, 0x59, 0xca,
        0xdc, 0x06, 0xfb, 0x1d, 0xa8, 0x1d, 0x4a, 0xe9, 0x4a, 0xf7, 0xb4, 0x65, 0x55, 0x4a, 0x8f,
        0x78, 0x01, 0x35, 0x41, 0x02, 0xfe, 0xc6, 0x57, 0x82, 0x01, 0xf6, 0xd5, 0xd6, 0xfe, 0xa5,
        0xa4, 0x36, 0xb0, 0x46, 0xe9, 0x45, 0x7b, 0x7c, 0xbc, 0x28, 0xc2, 0x60, 0xa0, 0x29, 0x06,
        0x6d, 0x11, 0xef, 0xec, 0xef, 0x3b, 0xc3, 0x5f, 0xbd, 0x56, 0xa3, 0x53, 0x30, 0x51, 0x30,
        0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14, 0x41, 0xf8, 0x29, 0x5d, 0x23,
        0x6e, 0x6e, 0x92, 0x4c, 0x6d, 0xbe, 0xd2, 0x9b, 0x17, 0xd2, 0x02, 0xd0, 0x34, 0x0e, 0xbd,
        0x30, 0x1f, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x18, 0x30, 0x16, 0x80, 0x14, 0x41, 0xf8,
        0x29, 0x5d, 0x23, 0x6e, 0x6e, 0x92, 0x4c, 0x6d, 0xbe, 0xd2, 0x9b, 0x17, 0xd2, 0x02, 0xd0,
        0x34, 0x0e, 0xbd, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x05,
        0x30, 0x03, 0x01, 0x01, 0xff, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
        0x03, 0x02, 0x03, 0x48, 0x00, 0x30, 0x45, 0x02, 0x21, 0x00, 0xbc, 0x1e, 0x6f, 0xeb, 0x85,
        0x1f, 0x34, 0xdc, 0xc1, 0xcc, 0x7f, 0x8e, 0x56, 0xde, 0xf8, 0x16, 0xc3, 0x1a, 0x87, 0x47,
        0xf0, 0x3a, 0x5d, 0xc1, 0x01, 0x2b, 0x5d, 0x91, 0x51, 0x29, 0x19, 0x6b, 0x02, 0x20, 0x6b,
        0xc0, 0xbe, 0x42, 0x09, 0x7e, 0x87, 0x85, 0x98, 0x5e, 0x97, 0xdd, 0x98, 0x7b, 0x5a, 0x30,
        0x91, 0xa4, 0xc7, 0x1f, 0xfb, 0x56, 0xc1, 0x78, 0xb7, 0x43, 0x53, 0x2c, 0x08, 0x36, 0x43,
        0xcf,
    ];

    /// The same with `-days 10000`: notAfter is GeneralizedTime
    /// `20540410164556Z`.
    const CERT_GENERALIZED_TIME: &[u8] = &[
        0x30, 0x82, 0x01, 0x86, 0x30, 0x82, 0x01, 0x2b, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x14,
        0x0e, 0xd1, 0x42, 0xb4, 0xdd, 0xcf, 0x8e, 0xd5, 0xbc, 0x3b, 0xf8, 0x6d, 0x6a, 0x35, 0x7f,
        0x0d, 0xf5, 0x11, 0xb8, 0x9e, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
        0x03, 0x02, 0x30, 0x17, 0x31, 0x15, 0x30, 0x13, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x0c,
        0x61, 0x72, 0x61, 0x6d, 0x61, 0x6b, 0x69, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x30, 0x20, 0x17,
        0x0d, 0x32, 0x36, 0x31, 0x31, 0x32, 0x33, 0x31, 0x36, 0x34, 0x35, 0x35, 0x36, 0x5a, 0x18,
        0x0f, 0x32, 0x30, 0x35, 0x34, 0x30, 0x34, 0x31, 0x30, 0x31, 0x36, 0x34, 0x35, 0x35, 0x36,
        0x5a, 0x30, 0x17, 0x31, 0x15, 0x30, 0x13, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x0c, 0x61,
        0x72, 0x61, 0x6d, 0x61, 0x6b, 0x69, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x30, 0x59, 0x30, 0x13,
        0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
        0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0x95, 0x14, 0xaa, 0x7e, 0xc3, 0x66, 0x0c,
        0x0c, 0x3f, 0x61, 0xa5, 0xd7, 0x11, 0x21, 0xfc, 0x44, 0x54, 0xf2, 0x09, 0xef, 0x6c, 0xe3,
        0xf9, 0x44, 0x8a, 0x7e, 0xf2, 0xbb, 0xea, 0x48, 0x44, 0x51, 0xe4, 0x89, 0x0e, 0x6c, 0x36,
        0x03, 0xd0, 0x17, 0x36, 0x16, 0xdc, 0x02, 0x09, 0x8f, 0x9d, 0xa6, 0x00, 0xd7, 0xb3, 0x68,
        0x53, 0x9e, 0xcf, 0x00, 0xc5, 0x47, 0xf6, 0xab, 0x5d, 0x65, 0x65, 0xc8, 0xa3, 0x53, 0x30,
        0x51, 0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04, 0x14, 0x34, 0x02, 0x29,
        0xc5, 0xe9, 0xf3, 0xc5, 0x21, 0x32, 0x8f, 0x3c, 0x93, 0x45, 0xfd, 0xd9, 0x56, 0x8d, 0xa5,
        0xd8, 0x30, 0x30, 0x1f, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x18, 0x30, 0x16, 0x80, 0x14,
        0x34, 0x02, 0x29, 0xc5, 0xe9, 0xf3, 0xc5, 0x21, 0x32, 0x8f, 0x3c, 0x93, 0x45, 0xfd, 0xd9,
        0x56, 0x8d, 0xa5, 0xd8, 0x30, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff,
        0x04, 0x05, 0x30, 0x03, 0x01, 0x01, 0xff, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
        0x3d, 0x04, 0x03, 0x02, 0x03, 0x49, 0x00, 0x30, 0x46, 0x02, 0x21, 0x00, 0xb2, 0xe8, 0x4a,
        0xef, 0x65, 0xe2, 0x29, 0x2c, 0x40, 0x02, 0x81, 0x88, 0xcd, 0x13, 0xdd, 0x45, 0x71, 0x31,
        0x2c, 0x74, 0xf6, 0x42, 0x87, 0x67, 0xfb, 0x4b, 0x76, 0x45, 0x30, 0x6b, 0x9b, 0x94, 0x02,
        0x21, 0x00, 0xb6, 0xd5, 0x5c, 0x02, 0x3f, 0xdc, 0x47, 0x3e, 0xa2, 0x38, 0xab, 0x41, 0x30,
        0xcc, 0x43, 0x3a, 0x2f, 0xd5, 0x85, 0xf1, 0x05, 0x4d, 0x38, 0x47, 0x61, 0x5b, 0x8b, 0x0f,
        0xb4, 0x78, 0x74, 0x3a,
    ];

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn reads_not_after_from_der() {
        assert_eq!(
            cert_not_after(CERT_UTC_TIME),
            Some(ts("2036-11-20T16:45:56Z"))
        );
        assert_eq!(
            cert_not_after(CERT_GENERALIZED_TIME),
            Some(ts("2054-04-10T16:45:56Z"))
        );
        assert_eq!(
            der_time(DER_UTC_TIME, b"491231235959Z"),
            Some(ts("2049-12-31T23:59:59Z"))
        );
        assert_eq!(
            der_time(DER_UTC_TIME, b"500101000000Z"),
            Some(ts("1950-01-01T00:00:00Z"))
        );
        for bad in [
            &b"5001010000Z"[..],
            b"500101000000",
            b"5001010000000Z",
            b"501301000000Z",
            b"50010100000aZ",
        ] {
            assert_eq!(der_time(DER_UTC_TIME, bad), None, "{bad:?}");
        }
        assert_eq!(der_time(DER_GENERALIZED_TIME, b"500101000000Z"), None);
    }

    #[test]
    fn der_walk_survives_garbage() {
        for n in 0..CERT_UTC_TIME.len() {
            // Every truncation is rejected, never a panic.
            assert_eq!(cert_not_after(&CERT_UTC_TIME[..n]), None, "{n}");
        }
        for i in 0..CERT_UTC_TIME.len() {
            let mut bent = CERT_UTC_TIME.to_vec();
            bent[i] ^= 0xff;
            let _ = cert_not_after(&bent);
        }
        assert_eq!(cert_not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(cert_not_after(&[0x30, 0x80, 0, 0]), None);
    }

    #[test]
    fn certificate_thresholds() {
        let expect = Expect {
            status: 200,
            body_contains: None,
            cert_warn_days: 21,
            cert_crit_days: 7,
        };
        let now = ts("2026-01-01T00:00:00Z");
        let verdict = |at: &str| cert_verdict(Some(ts(at)), now, &expect).0;
        assert_eq!(verdict("2026-03-01T00:00:00Z"), 0);
        assert_eq!(verdict("2026-01-22T00:00:00Z"), 0);
        assert_eq!(verdict("2026-01-21T23:59:59Z"), 1);
        assert_eq!(verdict("2026-01-08T00:00:00Z"), 1);
        assert_eq!(verdict("2026-01-07T12:00:00Z"), 2);
        assert_eq!(verdict("2025-12-01T00:00:00Z"), 2);
        assert_eq!(cert_verdict(None, now, &expect).0, 1);
        let (_, text) = cert_verdict(Some(ts("2026-01-31T00:00:00Z")), now, &expect);
        assert_eq!(text, "certificate expires in 30 days (2026-01-31)");
    }

    #[test]
    fn parses_urls() {
        let url = Url::parse("HTTPS://example.com/a/b?c=d#frag").unwrap();
        assert_eq!(
            url,
            Url {
                tls: true,
                host: "example.com".into(),
                port: 443,
                path: "/a/b?c=d".into()
            }
        );
        assert_eq!(url.host_header(), "example.com");
        let url = Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            (url.port, url.path.as_str(), url.host_header().as_str()),
            (8080, "/", "127.0.0.1:8080")
        );
        let url = Url::parse("http://h?x=1").unwrap();
        assert_eq!(url.path, "/?x=1");
        let url = Url::parse("http://[::1]:81/x").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.host_header().as_str()),
            ("::1", 81, "[::1]:81")
        );
        assert_eq!(Url::parse("https://[::1]/").unwrap().host_header(), "[::1]");
        for bad in [
            "ftp://x/",
            "http://",
            "http://:80/",
            "http://h:0/",
            "http://h:99999/",
            "http://u@h/",
            "http://[::1/",
            "http://[::1]x/",
            "x",
            "",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    /// Serves one canned response per connection and hands back each
    /// request it read.
    async fn serve(
        response: &'static str,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
                conn.write_all(response.as_bytes()).await.unwrap();
            }
        });
        (format!("http://{addr}/health?full=1"), rx)
    }

    fn http_probe(url: String, body_contains: Option<&str>) -> Probe {
        Probe::Http {
            url,
            expect_status: 200,
            body_contains: body_contains.map(str::to_owned),
            cert_warn_days: 21,
            cert_crit_days: 7,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// A test CA and a leaf for 127.0.0.1 and localhost signed by it (P-256,
    /// `-days 3650` on 2026-11-23, so the leaf's notAfter is
    /// 2036-11-20T16:52:03Z), and the leaf's PKCS#8 key.
    const TEST_CA: &[u8] = &[
        0x30, 0x82, 0x01, 0x99, 0x30, 0x82, 0x01, 0x3f, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x14,
        0x26, 0x48, 0x6a, 0x14, 0xc5, 0x1c, 0x1d, 0x29, 0x1d, 0xb6, 0x0c, 0x68, 0xbf, 0x96, 0xdd,
        0x9a, 0x6b, 0x4e, 0x61, 0xd2, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
        0x03, 0x02, 0x30, 0x1a, 0x31, 0x18, 0x30, 0x16, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x0f,
        0x61, 0x72, 0x61, 0x6d, 0x61, 0x6b, 0x69, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x63, 0x61,
        0x30, 0x1e, 0x17, 0x0d, 0x32, 0x36, 0x31, 0x31, 0x32, 0x33, 0x31, 0x36, 0x35, 0x32, 0x30,
        0x33, 0x5a, 0x17, 0x0d, 0x33, 0x36, 0x31, 0x31, 0x32, 0x30, 0x31, 0x36, 0x35, 0x32, 0x30,
        0x33, 0x5a, 0x30, 0x1a, 0x31, 0x18, 0x30, 0x16, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x0f,
        0x61, 0x72, 0x61, 0x6d, 0x61, 0x6b, 0x69, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x63, 0x61,
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0x68, 0xab, 0x00,
        0xcc, 0xf5, 0x42, 0xc2, 0x26, 0x13, 0xd1, 0x52, 0x1b, 0x8a, 0x4f, 0xdb, 0x1f, 0x06, 0xfb,
        0x0c, 0x04, 0x30, 0x53, 0x7d, 0x9e, 0x7c, 0xfc, 0xb2, 0x78, 0x75, 0xb6, 0x52, 0xb4, 0xf2,
        0x40, 0xe4, 0x64, 0x46, 0x60, 0x38, 0x75, 0x29, 0x93, 0x74, 0xef, 0x37, 0x55, 0xa6, 0xe5,
        0x22, 0xe0, 0x3e, 0xa1, 0x88, 0xc6, 0xf0, 0x9b, 0xa9, 0xc5, 0x3a, 0xf4, 0x59, 0x7b, 0xea,
        0x6c, 0xa3, 0x63, 0x30, 0x61, 0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04,
        0x14, 0xed, 0x6b, 0x69, 0x8f, 0xbc, 0xd6, 0xa1, 0x61, 0xcf, 0x38, 0x76, 0x36, 0x3e, 0x9d,
        0xac, 0x41, 0x18, 0xc8, 0x58, 0xf4, 0x30, 0x1f, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x18,
        0x30, 0x16, 0x80, 0x14, 0xed, 0x6b, 0x69, 0x8f, 0xbc, 0xd6, 0xa1, 0x61, 0xcf, 0x38, 0x76,
        0x36, 0x3e, 0x9d, 0xac, 0x41, 0x18, 0xc8, 0x58, 0xf4, 0x30, 0x0f, 0x06, 0x03, 0x55, 0x1d,
        0x13, 0x01, 0x01, 0xff, 0x04, 0x05, 0x30, 0x03, 0x01, 0x01, 0xff, 0x30, 0x0e, 0x06, 0x03,
        0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x02, 0x04, 0x30, 0x0a, 0x06,
        0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x03, 0x48, 0x00, 0x30, 0x45, 0x02,
        0x20, 0x2e, 0x66, 0x60, 0x8f, 0x58, 0xfb, 0x52, 0x63, 0x7f, 0x32, 0x4f, 0x23, 0x1e, 0x46,
        0x58, 0x7e, 0x6d, 0x90, 0x52, 0x07, 0x58, 0x3d, 0xe8, 0x1e, 0x4b, 0x68, 0x0f, 0xa7, 0xd3,
        0x37, 0x95, 0xa2, 0x02, 0x21, 0x00, 0xdb, 0x9e, 0xf4, 0x20, 0xe7, 0x03, 0xf4, 0x39, 0x98,
        0xcc, 0x6f, 0x84, 0x9e, 0x8a, 0xbf, 0x17, 0xc8, 0xcf, 0x90, 0x23, 0x11, 0x0a, 0x35, 0xf7,
        0xcb, 0x63, 0x40, 0x34, 0xd2, 0xf5, 0xd2, 0xf6,
    ];
    const TEST_LEAF: &[u8] = &[
        0x30, 0x82, 0x01, 0xc3, 0x30, 0x82, 0x01, 0x69, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x14,
        0x48, 0x78, 0x17, 0xdf, 0x7f, 0xfa, 0x63, 0x5b, 0x39, 0xd6, 0x35, 0x32, 0xc0, 0x53, 0xb6,
        0x30, 0xe3, 0xf1, 0x3b, 0xb6, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
        0x03, 0x02, 0x30, 0x1a, 0x31, 0x18, 0x30, 0x16, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x0f,
        0x61, 0x72, 0x61, 0x6d, 0x61, 0x6b, 0x69, 0x2d, 0x74, 0x65, 0x73, 0x74, 0x2d, 0x63, 0x61,
        0x30, 0x1e, 0x17, 0x0d, 0x32, 0x36, 0x31, 0x31, 0x32, 0x33, 0x31, 0x36, 0x35, 0x32, 0x30,
        0x33, 0x5a, 0x17, 0x0d, 0x33, 0x36, 0x31, 0x31, 0x32, 0x30, 0x31, 0x36, 0x35, 0x32, 0x30,
        0x33, 0x5a, 0x30, 0x14, 0x31, 0x12, 0x30, 0x10, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x09,
        0x6c, 0x6f, 0x63, 0x61, 0x6c, 0x68, 0x6f, 0x73, 0x74, 0x30, 0x59, 0x30, 0x13, 0x06, 0x07,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03,
        0x01, 0x07, 0x03, 0x42, 0x00, 0x04, 0xeb, 0x7c, 0x80, 0xbf, 0x4b, 0x22, 0xe2, 0x48, 0x75,
        0xb9, 0xf5, 0xbe, 0x95, 0xca, 0x76, 0xe4, 0x8a, 0xe5, 0x14, 0xa1, 0xdf, 0x53, 0x36, 0x60,
        0x20, 0xe1, 0x20, 0x7a, 0x46, 0xdb, 0x0d, 0x58, 0xce, 0xd7, 0x33, 0x6f, 0xb1, 0xf6, 0x8b,
        0x36, 0xe0, 0x86, 0x48, 0xd7, 0x5d, 0x47, 0xa1, 0x1f, 0x0a, 0x9a, 0xe5, 0x02, 0x5c, 0xed,
        0xc6, 0xc8, 0x4c, 0xf4, 0x4a, 0x49, 0x74, 0x0d, 0x8a, 0x0c, 0xa3, 0x81, 0x92, 0x30, 0x81,
        0x8f, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x1d, 0x13, 0x01, 0x01, 0xff, 0x04, 0x02, 0x30, 0x00,
        0x30, 0x0e, 0x06, 0x03, 0x55, 0x1d, 0x0f, 0x01, 0x01, 0xff, 0x04, 0x04, 0x03, 0x02, 0x07,
        0x80, 0x30, 0x13, 0x06, 0x03, 0x55, 0x1d, 0x25, 0x04, 0x0c, 0x30, 0x0a, 0x06, 0x08, 0x2b,
        0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01, 0x30, 0x1a, 0x06, 0x03, 0x55, 0x1d, 0x11, 0x04,
        0x13, 0x30, 0x11, 0x87, 0x04, 0x7f, 0x00, 0x00, 0x01, 0x82, 0x09, 0x6c, 0x6f, 0x63, 0x61,
        0x6c, 0x68, 0x6f, 0x73, 0x74, 0x30, 0x1d, 0x06, 0x03, 0x55, 0x1d, 0x0e, 0x04, 0x16, 0x04,
        0x14, 0xf0, 0x58, 0xd3, 0x68, 0x8e, 0x95, 0xb9, 0x53, 0x2c, 0x9e, 0xd4, 0x0d, 0x84, 0xd2,
        0x1b, 0x06, 0xd5, 0x3d, 0xe6, 0x76, 0x30, 0x1f, 0x06, 0x03, 0x55, 0x1d, 0x23, 0x04, 0x18,
        0x30, 0x16, 0x80, 0x14, 0xed, 0x6b, 0x69, 0x8f, 0xbc, 0xd6, 0xa1, 0x61, 0xcf, 0x38, 0x76,
        0x36, 0x3e, 0x9d, 0xac, 0x41, 0x18, 0xc8, 0x58, 0xf4, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86,
        0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x03, 0x48, 0x00, 0x30, 0x45, 0x02, 0x20, 0x39, 0xea,
        0x34, 0x48, 0xd7, 0x9c, 0xb6, 0xf5, 0xf3, 0xc9, 0x1e, 0xf4, 0x90, 0x19, 0xb2, 0x84, 0x1a,
        0xeb, 0x9c, 0x25, 0x3f, 0x7f, 0xac, 0x2c, 0xcd, 0xda, 0x23, 0xf9, 0x3e, 0xda, 0xde, 0x8b,
        0x02, 0x21, 0x00, 0xa4, 0xa2, 0x60, 0x43, 0x01, 0xb4, 0x4a, 0xa8, 0x94, 0x61, 0x21, 0x18,
        0x40, 0x71, 0xcf, 0x7a, 0xe8, 0x73, 0x55, 0xfb, 0x8d, 0x44, 0x67, 0x8d, 0x72, 0xb0, 0xb3,
        0x6c, 0x9a, 0x68, 0x1a, 0xa3,
    ];
    const TEST_LEAF_KEY: &[u8] = &[
        0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
        0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30,
        0x6b, 0x02, 0x01, 0x01, 0x04, 0x20, 0x93, 0x97, 0x02, 0xa8, 0xa8, 0xf4, 0x8f, 0xa9, 0xc8,
        0x23, 0xab, 0x7a, 0x80, 0x6b, 0xe7, 0x3e, 0xed, 0xe6, 0xb6, 0x0e, 0x99, 0x81, 0x16, 0x0f,
        0x34, 0x94, 0xa0, 0xd6, 0x57, 0x64, 0xc4, 0x79, 0xa1, 0x44, 0x03, 0x42, 0x00, 0x04, 0xeb,
        0x7c, 0x80, 0xbf, 0x4b, 0x22, 0xe2, 0x48, 0x75, 0xb9, 0xf5, 0xbe, 0x95, 0xca, 0x76, 0xe4,
        0x8a, 0xe5, 0x14, 0xa1, 0xdf, 0x53, 0x36, 0x60, 0x20, 0xe1, 0x20, 0x7a, 0x46, 0xdb, 0x0d,
        0x58, 0xce, 0xd7, 0x33, 0x6f, 0xb1, 0xf6, 0x8b, 0x36, 0xe0, 0x86, 0x48, 0xd7, 0x5d, 0x47,
        0xa1, 0x1f, 0x0a, 0x9a, 0xe5, 0x02, 0x5c, 0xed, 0xc6, 0xc8, 0x4c, 0xf4, 0x4a, 0x49, 0x74,
        0x0d, 0x8a, 0x0c,
    ];

    fn ring() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A client configuration that trusts only the test CA.
    fn test_ca_config() -> Result<Arc<rustls::ClientConfig>, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(TEST_CA.to_vec().into()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(ring());
        let builder = builder.with_safe_default_protocol_versions().unwrap();
        Ok(Arc::new(
            builder.with_root_certificates(roots).with_no_client_auth(),
        ))
    }

    /// Serves one canned response per TLS connection with the test leaf,
    /// closing without close_notify as many servers do.
    async fn serve_tls(response: &'static str) -> String {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(TEST_LEAF_KEY.to_vec().into());
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![TEST_LEAF.to_vec().into()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut conn) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.flush().await;
            }
        });
        format!("https://127.0.0.1:{port}/")
    }

    #[tokio::test]
    async fn https_reads_the_certificate() {
        let url = serve_tls("HTTP/1.1 200 OK\r\n\r\nsecure hello").await;
        let expect = Expect {
            status: 200,
            body_contains: Some("secure"),
            cert_warn_days: 21,
            cert_crit_days: 7,
        };
        let out = http(&url, &expect, test_ca_config).await.unwrap();
        assert_eq!(out.status, 0, "{}", out.output);
        assert!(
            out.output
                .starts_with("HTTP OK - 200 OK; certificate expires in "),
            "{}",
            out.output
        );
        assert!(
            out.output.contains(" days (2036-11-20); 31 bytes in "),
            "{}",
            out.output
        );
        let soon = Expect {
            cert_warn_days: 100_000,
            ..expect
        };
        assert_eq!(http(&url, &soon, test_ca_config).await.unwrap().status, 1);
        let sooner = Expect {
            cert_crit_days: 100_000,
            ..soon
        };
        assert_eq!(http(&url, &sooner, test_ca_config).await.unwrap().status, 2);
        // The public roots do not know the test CA.
        let out = run(&http_probe(url, None), SECOND).await;
        assert_eq!(out.status, 2, "{}", out.output);
        assert!(
            out.output.contains("TLS handshake with 127.0.0.1:"),
            "{}",
            out.output
        );
    }

    #[tokio::test]
    async fn http_ok_with_body_match() {
        let (url, mut requests) =
            serve("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall systems go").await;
        let out = run(&http_probe(url.clone(), Some("systems go")), SECOND).await;
        assert_eq!(out.status, 0, "{}", out.output);
        assert!(
            out.output.starts_with("HTTP OK - 200 OK; 59 bytes in "),
            "{}",
            out.output
        );
        assert_eq!(out.metrics[0].name, "time");
        assert_eq!(out.metrics[1].value, 59.0);
        let request = requests.recv().await.unwrap();
        let host = url.trim_start_matches("http://").split('/').next().unwrap();
        assert!(
            request.starts_with("GET /health?full=1 HTTP/1.0\r\n"),
            "{request}"
        );
        assert!(
            request.contains(&format!("\r\nHost: {host}\r\n")),
            "{request}"
        );
        assert!(
            request.contains("\r\nUser-Agent: aramaki-agent\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
    }

    #[tokio::test]
    async fn http_body_mismatch_is_critical() {
        let (url, _requests) = serve("HTTP/1.0 200 OK\r\n\r\nmaintenance").await;
        let out = run(&http_probe(url, Some("systems go")), SECOND).await;
        assert_eq!(out.status, 2, "{}", out.output);
        assert!(
            out.output.contains("body does not contain \"systems go\""),
            "{}",
            out.output
        );
    }

    #[tokio::test]
    async fn http_500_is_critical() {
        let (url, _requests) =
            serve("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops").await;
        let out = run(&http_probe(url, None), SECOND).await;
        assert_eq!(out.status, 2, "{}", out.output);
        assert!(
            out.output
                .starts_with("HTTP CRITICAL - status 500 Internal Server Error, expected 200"),
            "{}",
            out.output
        );
    }

    #[tokio::test]
    async fn http_garbage_is_critical() {
        let (url, _requests) = serve("SSH-2.0-OpenSSH_9.6\r\n").await;
        let out = run(&http_probe(url, None), SECOND).await;
        assert_eq!(out.status, 2, "{}", out.output);
        assert!(out.output.contains("malformed response"), "{}", out.output);
    }

    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn refused_connections_are_critical() {
        let port = closed_port().await;
        let out = run(
            &http_probe(format!("http://127.0.0.1:{port}/"), None),
            SECOND,
        )
        .await;
        assert_eq!(out.status, 2, "{}", out.output);
        assert!(out.output.contains("Connection refused"), "{}", out.output);
        let out = run(
            &Probe::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            SECOND,
        )
        .await;
        assert_eq!(out.status, 2, "{}", out.output);
        assert_eq!(
            out.output,
            format!("TCP CRITICAL - cannot connect to 127.0.0.1:{port}: Connection refused")
        );
    }

    #[tokio::test]
    async fn silent_server_times_out_critical() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let out = run(&http_probe(url, None), Duration::from_millis(200)).await;
        assert_eq!(out.output, "HTTP CRITICAL - timed out after 0.200 s");
        drop(listener);
    }

    #[tokio::test]
    async fn bad_url_is_unknown() {
        let out = run(&http_probe("gopher://x/".into(), None), SECOND).await;
        assert_eq!(out.status, 3, "{}", out.output);
    }

    #[tokio::test]
    async fn tcp_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let out = run(
            &Probe::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            SECOND,
        )
        .await;
        assert_eq!(out.status, 0, "{}", out.output);
        assert_eq!(out.metrics[0].name, "time");
        assert_eq!(out.metrics[0].unit, "s");
    }

    #[tokio::test]
    async fn slow_local_probes_are_unknown() {
        let out = bounded(
            "DISK",
            false,
            Duration::from_millis(10),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.status, 3);
        assert_eq!(out.output, "DISK UNKNOWN - timed out after 0.010 s");
    }

    #[tokio::test]
    async fn keepalive() {
        let out = run(&Probe::Keepalive, SECOND).await;
        assert_eq!(
            (out.status, out.output.as_str()),
            (0, "KEEPALIVE OK - agent running")
        );
    }

    #[tokio::test]
    async fn load_on_this_host() {
        let out = run(
            &Probe::Load {
                warn: 1000.0,
                crit: 2000.0,
            },
            SECOND,
        )
        .await;
        assert_eq!(out.status, 0, "{}", out.output);
        let names: Vec<_> = out.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["load1", "load5", "load15"]);
    }

    #[test]
    fn load_is_judged_per_cpu() {
        assert_eq!(
            parse_loadavg("0.05 0.10 0.08 1/123 4567\n"),
            Some([0.05, 0.10, 0.08])
        );
        assert_eq!(parse_loadavg("0.05 x"), None);
        let out = load_outcome([3.0, 1.0, 1.0], 2, 1.0, 2.0);
        assert_eq!(out.status, 1, "{}", out.output);
        assert_eq!(out.metrics[0].warn.as_deref(), Some("2"));
        assert_eq!(load_outcome([3.0, 1.0, 1.0], 4, 1.0, 2.0).status, 0);
        assert_eq!(load_outcome([1.0, 1.0, 9.0], 4, 1.0, 2.0).status, 2);
        assert!(out
            .output
            .starts_with("LOAD WARNING - load average: 3.00, 1.00, 1.00 on 2 CPUs"));
    }

    #[tokio::test]
    async fn memory_on_this_host() {
        let out = run(
            &Probe::Memory {
                warn_pct: 100.0,
                crit_pct: 100.0,
            },
            SECOND,
        )
        .await;
        assert_eq!(out.status, 0, "{}", out.output);
        assert!(out.output.starts_with("MEMORY OK - "), "{}", out.output);
    }

    #[test]
    fn memory_is_judged_by_available() {
        let info = "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n";
        assert_eq!(parse_meminfo(info), Some((1_024_000, 409_600)));
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n";
        assert_eq!(parse_meminfo(old), Some((1_024_000, 409_600)));
        assert_eq!(parse_meminfo("MemFree: 1 kB"), None);
        let out = memory_outcome(1000, 40, 85.0, 95.0);
        assert_eq!(out.status, 2);
        assert_eq!(out.output, "MEMORY CRITICAL - 96.0% used (960 B of 1000 B)");
        assert_eq!(memory_outcome(1000, 100, 85.0, 95.0).status, 1);
    }

    #[tokio::test]
    async fn disk_on_this_host() {
        let root = Probe::Disk {
            mount: Some("/".into()),
            warn_pct: 100.0,
            crit_pct: 100.0,
        };
        let out = run(&root, SECOND).await;
        assert_eq!(out.status, 0, "{}", out.output);
        assert!(out.output.starts_with("DISK OK - / "), "{}", out.output);
        assert_eq!(out.metrics[0].name, "/");
        assert_eq!(out.metrics[1].name, "/ bytes");
        let all = Probe::Disk {
            mount: None,
            warn_pct: 100.0,
            crit_pct: 100.0,
        };
        let out = run(&all, SECOND).await;
        eprintln!("{}\n{:?}", out.output, out.metrics);
        assert_eq!(out.status, 0, "{}", out.output);
        assert!(!out.metrics.is_empty());
        let missing = Probe::Disk {
            mount: Some("/no/such/mount".into()),
            warn_pct: 1.0,
            crit_pct: 2.0,
        };
        let out = run(&missing, SECOND).await;
        assert_eq!(out.status, 3);
        assert_eq!(
            out.output,
            "DISK UNKNOWN - cannot read /no/such/mount: No such file or directory"
        );
    }

    #[test]
    fn disk_reports_the_worst_mounts() {
        let usage = |mount: &str, used: u64, avail: u64| Usage {
            mount: mount.into(),
            used,
            avail,
            total: used + avail + 5,
        };
        let usages = [
            usage("/", 97, 3),
            usage("/home", 10, 90),
            usage("/var", 99, 1),
        ];
        let out = disk_outcome(&usages, 85.0, 95.0);
        assert_eq!(out.status, 2);
        let first = out.output.lines().next().unwrap();
        assert_eq!(
            first,
            "DISK CRITICAL - /var 99% used (99 B of 105 B), / 97% used (97 B of 105 B)"
        );
        assert_eq!(out.output.lines().count(), 4);
        assert_eq!(out.metrics.len(), 6);
        assert_eq!(out.metrics[2].value, 10.0);
    }

    #[test]
    fn mount_table_is_decoded_and_filtered() {
        let table = "overlay / overlay rw 0 0\nproc /proc proc rw 0 0\n\
                     /dev/sda1 /mnt/my\\040disk ext4 rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        let mounts = parse_mounts(table);
        assert_eq!(mounts[2], ("/mnt/my disk".to_owned(), "ext4".to_owned()));
        let real: Vec<_> = mounts
            .iter()
            .filter(|(_, t)| !PSEUDO_FS.contains(&t.as_str()))
            .collect();
        assert_eq!(real.len(), 2);
        assert_eq!(unescape_mount("a\\134b\\011\\0"), "a\\b\t\\0");
    }

    #[tokio::test]
    async fn counts_processes() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let found = Probe::Process {
            name: "sleep".into(),
            min: 1,
            max: None,
        };
        let out = run(&found, SECOND).await;
        assert_eq!(out.status, 0, "{}", out.output);
        let too_many = Probe::Process {
            name: "sleep".into(),
            min: 0,
            max: Some(0),
        };
        assert_eq!(run(&too_many, SECOND).await.status, 2);
        let missing = Probe::Process {
            name: "no-such-process-aramaki".into(),
            min: 1,
            max: None,
        };
        let out = run(&missing, SECOND).await;
        assert_eq!(
            out.output,
            "PROCS CRITICAL - 0 processes named no-such-process-aramaki (expected at least 1)"
        );
        child.kill().await.unwrap();
    }

    #[tokio::test]
    async fn systemd_units() {
        assert_eq!(systemd_outcome("a.service", "active").status, 0);
        assert_eq!(systemd_outcome("a.service", "reloading").status, 1);
        assert_eq!(
            systemd_outcome("a.service", "failed").output,
            "SYSTEMD CRITICAL - a.service is failed"
        );
        assert_eq!(systemd_outcome("a.service", "").status, 2);
        let out = run(
            &Probe::Systemd {
                unit: "-.mount".into(),
            },
            Duration::from_secs(5),
        )
        .await;
        if Path::new("/run/systemd/system").exists() {
            assert!(out.status <= 2, "{}", out.output);
        } else {
            assert_eq!(
                out.output,
                "SYSTEMD UNKNOWN - systemd is not running on this host"
            );
        }
    }
}
