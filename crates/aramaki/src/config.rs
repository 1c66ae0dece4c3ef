//! Configuration: defaults, then `aramaki.toml`, then `ARAMAKI_*` environment.
//!
//! Loaded and validated once at start-up; nothing below `main` reads the
//! environment. A bad value stops start-up with figment's message, which names
//! the key, the file it came from and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub const CONFIG_FILE: &str = "aramaki.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8764";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub instance: InstanceConfig,
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub web: WebConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub monitoring: MonitoringConfig,
    #[serde(default)]
    pub federation: FederationConfig,
    #[serde(default)]
    pub auth: AuthConfig,
}

/// Logins: one-time passwords, throttling, refused attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A one-time password stops working this many hours after it was set.
    pub one_time_password_hours: u32,
    /// Failed logins per account before each further attempt must wait,
    /// the wait doubling from one second…
    pub login_free_failures: u32,
    /// …and per source address (several people may share one).
    pub login_address_free_failures: u32,
    /// Reverse proxies whose `X-Forwarded-For` names the source address of
    /// a login. Default: none, the peer address counts.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// …up to this many seconds.
    pub login_max_delay_seconds: u32,
    /// After this many failures in a row the account or address is locked
    /// for `login_lockout_minutes` (an admin can unlock an account earlier).
    pub login_lockout_failures: u32,
    pub login_lockout_minutes: u32,
    /// Refused attempts are recorded once per caller and kind per window of
    /// this many minutes (counted in between).
    pub refusal_window_minutes: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            one_time_password_hours: 24,
            login_free_failures: 3,
            login_address_free_failures: 10,
            trusted_proxies: Vec::new(),
            login_max_delay_seconds: 300,
            login_lockout_failures: 20,
            login_lockout_minutes: 60,
            refusal_window_minutes: 10,
        }
    }
}

/// Peering with other instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Instances that join with a valid invite become active peers without
    /// an admin's approval. Default: they wait as pending.
    pub auto_approve: bool,
    /// Dial peers over plain `ws://` even when they are not on loopback
    /// (development only).
    pub allow_plaintext: bool,
    /// A peer no link reached for this long is marked unreachable (hours).
    pub unreachable_after_hours: u64,
    /// First delay before dialing a peer again, in milliseconds; it doubles
    /// with each failure (with jitter) up to `retry_max_seconds`.
    pub retry_initial_ms: u64,
    pub retry_max_seconds: u64,
    /// Messages a peer may send per second (sustained; twice that in a burst).
    pub max_messages_per_second: u32,
    /// Also listen here (`host:port`) for peers, with TLS from a certificate
    /// of the instance key: peers pin that key, no CA is involved. Unset:
    /// peers reach `instance.url` (TLS, if any, ends at a proxy).
    pub listen: Option<String>,
    /// How peers reach that listener (default `https://<listen>`).
    pub url: Option<String>,
    /// Work a peer's messages may cost per second, counted in rows they
    /// write (sustained; twice that in a burst).
    pub max_work_per_second: u32,
    /// Use requests of one peer applied per hour, and open (pending or
    /// accepted) at once; beyond them a request is answered with a signed
    /// refusal and stores nothing.
    pub max_use_requests_per_hour: u32,
    pub max_open_uses_per_peer: u32,
    /// Systems mirrored from one peer, at most.
    pub max_mirrors_per_peer: u32,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            auto_approve: false,
            allow_plaintext: false,
            unreachable_after_hours: 72,
            retry_initial_ms: 1_000,
            retry_max_seconds: 3_600,
            max_messages_per_second: 2_000,
            listen: None,
            url: None,
            max_work_per_second: 5_000,
            max_use_requests_per_hour: 100,
            max_open_uses_per_peer: 1_000,
            max_mirrors_per_peer: 5_000,
        }
    }
}

/// Agents, results and keepalives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    /// Seconds without a heartbeat before an agent's system turns WARNING.
    pub keepalive_warning: u64,
    /// Seconds without a heartbeat before it turns CRITICAL.
    pub keepalive_critical: u64,
    /// How often agents send heartbeats, in seconds.
    pub heartbeat: u32,
    /// Days of result history kept (every result, not a fixed count).
    pub retention_days: u32,
    /// Seconds between sweeps for missed keepalives, TTLs and old history.
    pub sweep_interval: u64,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            keepalive_warning: 120,
            keepalive_critical: 300,
            heartbeat: 20,
            retention_days: 30,
            sweep_interval: 5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Human name of this instance, shown to peers and in the UI.
    pub name: String,
    /// The URL peers and agents reach this instance at (default:
    /// `http://<server.listen>`).
    #[serde(default)]
    pub url: Option<String>,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        InstanceConfig {
            name: "aramaki".into(),
            url: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8764)),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://…` or `postgres://…`; empty means SQLite in the data directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    8
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Let anonymous clients use read-only endpoints. Default: closed.
    pub public_read: bool,
    /// Largest accepted request body in bytes.
    pub body_limit: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            public_read: false,
            body_limit: 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` without a token. Default: a token is required.
    pub public: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// A browser session ends after this many minutes without a request.
    pub session_idle_minutes: u32,
    /// …and after this many hours in any case.
    pub session_max_hours: u32,
    /// Mark cookies Secure; set it when users reach Aramaki over HTTPS.
    pub secure_cookies: bool,
    /// Seconds a client has to send a request's head (line and headers).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request's body, once its head arrived.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_secs: u64,
    /// HTTP connections served at once (both listeners), agents' and peers'
    /// WebSockets included; at the limit an idle one is closed to make
    /// room, or the new one is refused. Keep it well below the process's
    /// file descriptor limit, so that the limit, not `accept`, says no.
    #[serde(default = "default_web_max_connections")]
    pub max_connections: usize,
    /// Of those, how many may be long-lived (WebSockets, event streams),
    /// which are never closed for a newcomer; the rest stays for ordinary
    /// requests. Unset: three quarters of `max_connections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_long_lived_connections: Option<usize>,
    /// Long-lived connections one source address (an IPv6 /64) may hold.
    #[serde(default = "default_long_lived_per_source")]
    pub max_long_lived_per_source: usize,
}

fn default_long_lived_per_source() -> usize {
    256
}

fn default_header_read_timeout() -> u64 {
    10
}

fn default_body_read_timeout() -> u64 {
    30
}

fn default_web_max_connections() -> usize {
    8192
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            session_idle_minutes: 12 * 60,
            session_max_hours: 7 * 24,
            secure_cookies: false,
            header_read_timeout_secs: default_header_read_timeout(),
            body_read_timeout_secs: default_body_read_timeout(),
            max_connections: default_web_max_connections(),
            max_long_lived_connections: None,
            max_long_lived_per_source: default_long_lived_per_source(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `aramaki=debug,sqlx=warn`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            filter: "info".into(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance: InstanceConfig::default(),
            server: ServerConfig::default(),
            database: DatabaseConfig {
                url: None,
                max_connections: default_max_connections(),
            },
            api: ApiConfig::default(),
            metrics: MetricsConfig::default(),
            web: WebConfig::default(),
            log: LogConfig::default(),
            monitoring: MonitoringConfig::default(),
            federation: FederationConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

/// Start-up refused because the configuration is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
    #[error("configuration: cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Config {
    /// Loads defaults, then the TOML file if it exists, then the environment
    /// variables `ARAMAKI_SECTION__KEY` (for example `ARAMAKI_SERVER__LISTEN`).
    pub fn load(file: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let env_pairs: Vec<(String, String)> = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("ARAMAKI_")?;
                rest.contains("__").then(|| (k.clone(), v.clone()))
            })
            .collect();
        let figment = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            .merge(EnvVars(env_pairs));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Invalid(describe(e)))?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        if let Some(url) = &self.database.url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return Err(ConfigError::Invalid(format!(
                    "invalid value for key `database.url` in {}: expected a URL starting with sqlite: or postgres://, found {url:?}",
                    file.display()
                )));
            }
        }
        if self.database.max_connections == 0 {
            return Err(ConfigError::Invalid(format!(
                "invalid value for key `database.max_connections` in {}: expected at least 1",
                file.display()
            )));
        }
        if self.api.body_limit < 1024 {
            return Err(ConfigError::Invalid(format!(
                "invalid value for key `api.body_limit` in {}: expected at least 1024 bytes",
                file.display()
            )));
        }
        if self.web.session_idle_minutes == 0 || self.web.session_max_hours == 0 {
            return Err(ConfigError::Invalid(format!(
                "invalid value for key `web.session_idle_minutes` or `web.session_max_hours` in {}: expected at least 1",
                file.display()
            )));
        }
        let w = &self.web;
        for (key, value) in [
            ("header_read_timeout_secs", w.header_read_timeout_secs),
            ("body_read_timeout_secs", w.body_read_timeout_secs),
            (
                "max_connections",
                u64::try_from(w.max_connections).unwrap_or(u64::MAX),
            ),
            (
                "max_long_lived_connections",
                w.max_long_lived_connections
                    .map_or(1, |n| u64::try_from(n).unwrap_or(u64::MAX)),
            ),
            (
                "max_long_lived_per_source",
                u64::try_from(w.max_long_lived_per_source).unwrap_or(u64::MAX),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "invalid value for key `web.{key}` in {}: expected at least 1",
                    file.display()
                )));
            }
        }
        let a = &self.auth;
        if a.one_time_password_hours == 0
            || a.login_lockout_failures <= a.login_free_failures
            || a.login_lockout_minutes == 0
            || a.refusal_window_minutes == 0
        {
            return Err(ConfigError::Invalid(format!(
                "invalid value for a key of `auth` in {}: one_time_password_hours, login_lockout_minutes and refusal_window_minutes must be at least 1, and login_lockout_failures more than login_free_failures",
                file.display()
            )));
        }
        let m = &self.monitoring;
        if m.keepalive_warning == 0 || m.keepalive_critical <= m.keepalive_warning {
            return Err(ConfigError::Invalid(format!(
                "invalid value for key `monitoring.keepalive_critical` in {}: expected more than `monitoring.keepalive_warning` (which must be at least 1)",
                file.display()
            )));
        }
        if m.heartbeat == 0 || u64::from(m.heartbeat) >= m.keepalive_warning {
            return Err(ConfigError::Invalid(format!(
                "invalid value for key `monitoring.heartbeat` in {}: expected at least 1 and less than `monitoring.keepalive_warning`",
                file.display()
            )));
        }
        if m.retention_days == 0 || m.sweep_interval == 0 {
            return Err(ConfigError::Invalid(format!(
                "invalid value for key `monitoring.retention_days` or `monitoring.sweep_interval` in {}: expected at least 1",
                file.display()
            )));
        }
        if let Some(url) = &self.instance.url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(ConfigError::Invalid(format!(
                    "invalid value for key `instance.url` in {}: expected a URL starting with https:// or http://, found {url:?}",
                    file.display()
                )));
            }
        }
        if self.instance.name.trim().is_empty() {
            return Err(ConfigError::Invalid(format!(
                "invalid value for key `instance.name` in {}: expected a non-empty name",
                file.display()
            )));
        }
        Ok(())
    }

    /// The database URL, defaulting to SQLite inside the data directory.
    pub fn database_url(&self, data_dir: &Path) -> String {
        match &self.database.url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                data_dir.join("aramaki.db").display()
            ),
        }
    }
}

/// `ARAMAKI_SECTION__KEY` variables as a figment provider. Built from an
/// explicit list (not the process environment) so that `main` decides what is
/// read and tests need not touch the process environment.
struct EnvVars(Vec<(String, String)>);

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("environment variable(s) ARAMAKI_*")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for (key, raw) in &self.0 {
            let path: Vec<String> = key
                .trim_start_matches("ARAMAKI_")
                .to_ascii_lowercase()
                .split("__")
                .map(str::to_owned)
                .collect();
            // Parsed like figment's own Env: numbers and booleans, else strings.
            let value: figment::value::Value = match raw.parse() {
                Ok(v) => v,
                Err(never) => match never {},
            };
            insert_path(&mut dict, &path, value);
        }
        let mut map = figment::value::Map::new();
        map.insert(figment::Profile::Default, dict);
        Ok(map)
    }
}

fn insert_path(dict: &mut figment::value::Dict, path: &[String], value: figment::value::Value) {
    use figment::value::{Dict, Value};
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

fn describe(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The commented configuration written on first start.
pub fn default_file_text() -> String {
    format!(
        r#"# Aramaki configuration.
#
# Every key can also be set through the environment as ARAMAKI_SECTION__KEY,
# for example ARAMAKI_SERVER__LISTEN=0.0.0.0:8764; the environment wins.

[instance]
# The name peers and users see for this instance.
name = "aramaki"
# The URL peers reach it at, e.g. "https://aramaki.example.org"
# (default: http:// and server.listen).
# url = "https://aramaki.example.org"

[server]
# Address and port the HTTP server listens on.
listen = "{DEFAULT_LISTEN}"

[database]
# Empty: SQLite (WAL) in the data directory, nothing else needed.
# For larger installations or several server processes, use PostgreSQL:
# url = "postgres://aramaki@127.0.0.1:5432/aramaki"
max_connections = 8

[api]
# Let anonymous clients read systems and timelines. Default: closed.
public_read = false
# Largest accepted request body, in bytes.
body_limit = 1048576

[metrics]
# Serve /metrics without an API token.
public = false

[web]
# A browser session ends after this many minutes without a request…
session_idle_minutes = 720
# …and after this many hours in any case.
session_max_hours = 168
# Mark cookies Secure; set it when users reach Aramaki over HTTPS.
secure_cookies = false
# Seconds a client has to send a request's head, and then its body.
header_read_timeout_secs = 10
body_read_timeout_secs = 30
# Connections served at once, agents' WebSockets included; at the limit an
# idle one is closed to make room (or, if none is idle, the new one is refused).
# Keep it well below the process's file descriptor limit (ulimit -n).
max_connections = 8192
# Long-lived connections (WebSockets, event streams) are never closed for a
# newcomer, so they get a budget of their own, three quarters of the above
# unless set; the rest is kept for ordinary requests (pages, /health).
# max_long_lived_connections = 6144
# ... and at most this many from one source address (an IPv6 /64).
max_long_lived_per_source = 256

[log]
# "human" or "json".
format = "human"
# A tracing filter, for example "info" or "aramaki=debug,sqlx=warn".
filter = "info"

[monitoring]
# Seconds without an agent's heartbeat before its system turns WARNING…
keepalive_warning = 120
# …and CRITICAL.
keepalive_critical = 300
# How often agents send heartbeats, in seconds.
heartbeat = 20
# Days of check result history to keep (every result, not a fixed count).
retention_days = 30
# Seconds between sweeps for missed keepalives, TTLs and old history.
sweep_interval = 5

[federation]
# Instances that join with a valid invite become active peers at once
# (otherwise they wait, pending, for an admin: aramaki peer approve).
auto_approve = false
# Plain ws:// to peers that are not on loopback: development only.
allow_plaintext = false
# A peer no link reached for this long is marked unreachable; it catches up
# from its cursor when it returns.
unreachable_after_hours = 72
# Redial backoff: doubles from the first delay, with jitter, up to the cap.
retry_initial_ms = 1000
retry_max_seconds = 3600
# Messages a peer may send per second (twice that in a burst).
max_messages_per_second = 2000
# What one peer may make this instance do and store: rows its messages
# write per second, use requests applied per hour and open at once, mirrors.
max_work_per_second = 5000
max_use_requests_per_hour = 100
max_open_uses_per_peer = 1000
max_mirrors_per_peer = 5000

[auth]
# A one-time password (printed by `aramaki user add` or `passwd`) opens only
# the password page, and only for this many hours.
one_time_password_hours = 24
# Failed logins per account before each further attempt must wait (429
# with Retry-After), doubling from one second…
login_free_failures = 3
# …and per source address.
login_address_free_failures = 10
# Reverse proxies whose X-Forwarded-For names the client of a login, e.g.
# ["127.0.0.1"] behind a local nginx. Default: the peer address counts.
trusted_proxies = []
# …up to this many seconds.
login_max_delay_seconds = 300
# After this many failures in a row, the account or address is locked for
# login_lockout_minutes; `aramaki user unlock NAME` lifts it earlier.
login_lockout_failures = 20
login_lockout_minutes = 60
# Refused attempts on systems are recorded on the instance's timeline once
# per caller, kind and target (up to 20 targets) in each window of this many
# minutes, counted between.
refusal_window_minutes = 10
"#
    )
}

/// Writes the commented default configuration unless a file already exists.
pub fn write_default_file(path: &Path) -> Result<bool, ConfigError> {
    if path.exists() {
        return Ok(false);
    }
    std::fs::write(path, default_file_text()).map_err(|source| ConfigError::Write {
        path: path.to_owned(),
        source,
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_default_file_parses_to_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        assert!(write_default_file(&path).unwrap());
        assert!(!write_default_file(&path).unwrap());
        let config = Config::load(&path, &[]).unwrap();
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        assert!(!config.api.public_read);
        assert_eq!(config.api.body_limit, 1024 * 1024);
    }

    #[test]
    fn a_bad_value_names_file_key_and_expectation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, "[server]\nlisten = \"not an address\"\n").unwrap();
        let err = Config::load(&path, &[]).unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("socket address"), "{err}");
    }

    #[test]
    fn monitoring_and_instance_values_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        for (text, key) in [
            ("[instance]\nurl = \"aramaki.example\"\n", "instance.url"),
            (
                "[monitoring]\nkeepalive_warning = 300\nkeepalive_critical = 120\n",
                "monitoring.keepalive_critical",
            ),
            ("[monitoring]\nheartbeat = 500\n", "monitoring.heartbeat"),
            (
                "[monitoring]\nretention_days = 0\n",
                "monitoring.retention_days",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(&path, &[]).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn web_timeouts_and_connection_limit_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(
            &path,
            "[web]\nsession_idle_minutes = 60\nsession_max_hours = 24\nsecure_cookies = false\n",
        )
        .unwrap();
        let config = Config::load(&path, &[]).unwrap();
        assert_eq!(
            config.web.header_read_timeout_secs, 10,
            "older files keep working"
        );
        assert_eq!(config.web.max_connections, 8192);
        for key in [
            "header_read_timeout_secs",
            "body_read_timeout_secs",
            "max_connections",
            "max_long_lived_connections",
            "max_long_lived_per_source",
        ] {
            std::fs::write(&path, format!("[web]\nsession_idle_minutes = 60\nsession_max_hours = 24\nsecure_cookies = false\n{key} = 0\n")).unwrap();
            let err = Config::load(&path, &[]).unwrap_err().to_string();
            assert!(err.contains(&format!("`web.{key}`")), "{key}: {err}");
            assert_eq!(err.matches("`web.").count(), 1, "names only {key}: {err}");
        }
        std::fs::write(&path, "[web]\nsession_idle_minutes = 60\nsession_max_hours = 24\nsecure_cookies = false\nmax_connections = 0\n").unwrap();
        let env = vec![("ARAMAKI_WEB__MAX_CONNECTIONS".to_owned(), "64".to_owned())];
        assert_eq!(Config::load(&path, &env).unwrap().web.max_connections, 64);
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, "[server]\nlisten_on = \"127.0.0.1:1\"\n").unwrap();
        let err = Config::load(&path, &[]).unwrap_err().to_string();
        assert!(err.contains("listen_on"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        write_default_file(&path).unwrap();
        let env = vec![
            (
                "ARAMAKI_SERVER__LISTEN".to_owned(),
                "127.0.0.1:9999".to_owned(),
            ),
            ("ARAMAKI_API__PUBLIC_READ".to_owned(), "true".to_owned()),
            (
                "ARAMAKI_TOKEN".to_owned(),
                "client side, ignored".to_owned(),
            ),
        ];
        let config = Config::load(&path, &env).unwrap();
        assert_eq!(config.server.listen.port(), 9999);
        assert!(config.api.public_read);
    }

    #[test]
    fn a_bad_environment_value_names_the_variable_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        let env = vec![("ARAMAKI_API__BODY_LIMIT".to_owned(), "lots".to_owned())];
        let err = Config::load(&path, &env).unwrap_err().to_string();
        assert!(err.contains("api.body_limit"), "{err}");
    }
}
