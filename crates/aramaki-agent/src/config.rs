//! The agent's local configuration file (TOML): subscriptions, local checks,
//! the local push API, the queue bound and the allow-listed actions.
//!
//! ```toml
//! subscriptions = ["linux", "web"]
//! queue_capacity = 100000
//! push_http = "127.0.0.1:3031"   # "" turns it off
//! push_tcp = "127.0.0.1:3030"
//!
//! [[checks]]
//! name = "root-disk"
//! timeout_secs = 10
//! run = { kind = "command", argv = ["/usr/lib/nagios/plugins/check_disk", "-w", "10%", "-c", "5%", "-p", "/"] }
//! schedule = { kind = "interval", secs = 60 }
//!
//! [check_policy]                # what checks from the server may run
//! allow_dirs = ["/usr/lib/nagios/plugins", "/usr/lib/monitoring-plugins", "/usr/local/lib/nagios/plugins"]
//! allow_commands = []
//! allow_shell = false
//!
//! [actions.flush-cache]
//! argv = ["/usr/bin/varnishadm", "--", "ban", "req.url", "~", "{path}"]
//! params = ["path"]
//! timeout_secs = 60            # this agent's cap; the default is 60 s
//! allow.path = { pattern = "/[A-Za-z0-9/._-]*" }
//! ```
//!
//! A run's timeout is the action's (sent by the server), capped by the
//! action's `timeout_secs` here: the agent decides, and reports the timeout
//! it applies when the run starts.

use std::collections::BTreeMap;
use std::path::Path;

use aramaki_protocol::agent::CheckDefinition;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub subscriptions: Vec<String>,
    /// Most results kept while the server is unreachable.
    pub queue_capacity: u64,
    /// Address of the Sensu-Go-compatible HTTP push API ("" = off).
    pub push_http: String,
    /// Address of the Sensu-1.x-compatible TCP socket ("" = off).
    pub push_tcp: String,
    /// Checks defined on this host (besides those the server sends).
    pub checks: Vec<CheckDefinition>,
    /// The only actions the server may ask for, by name.
    pub actions: BTreeMap<String, ActionConfig>,
    /// What checks sent by the server may execute here.
    pub check_policy: crate::policy::CheckPolicy,
    /// CA certificates (PEM) to trust besides the public roots, for a
    /// server whose TLS certificate comes from a private CA.
    pub ca_file: Option<std::path::PathBuf>,
}

/// An allow-listed action: a fixed command line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// The command; `{name}` in an element is replaced by that parameter's
    /// value (always inside that one element, never through a shell, in
    /// one pass: a value is never expanded again).
    pub argv: Vec<String>,
    /// The parameters the server may send.
    #[serde(default)]
    pub params: Vec<String>,
    /// The longest this agent lets a run take, whatever the server asks
    /// (the run gets the smaller of the two). Default 60 s.
    #[serde(default = "default_action_timeout")]
    pub timeout_secs: u32,
    /// What each parameter's values may be, judged here whatever the
    /// server checked. A value beginning with `-` is refused unless its
    /// rule allows it (a command could read it as an option).
    #[serde(default)]
    pub allow: BTreeMap<String, ValueRule>,
}

/// The values this agent accepts for one parameter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueRule {
    /// A regular expression the whole value must match.
    #[serde(default)]
    pub pattern: Option<String>,
    /// The only values accepted.
    #[serde(default)]
    pub one_of: Vec<String>,
    /// Accept values that begin with `-`.
    #[serde(default)]
    pub allow_leading_dash: bool,
}

impl ValueRule {
    /// The pattern anchored to the whole value.
    pub fn regex(&self) -> Option<Result<regex::Regex, regex::Error>> {
        self.pattern
            .as_deref()
            .map(|p| regex::Regex::new(&format!("^(?:{p})$")))
    }
}

fn default_action_timeout() -> u32 {
    60
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            subscriptions: Vec::new(),
            queue_capacity: 100_000,
            push_http: "127.0.0.1:3031".into(),
            push_tcp: "127.0.0.1:3030".into(),
            checks: Vec::new(),
            actions: BTreeMap::new(),
            check_policy: crate::policy::CheckPolicy::default(),
            ca_file: None,
        }
    }
}

impl AgentConfig {
    /// Reads the file, or the defaults when no file is given.
    pub fn load(path: Option<&Path>) -> Result<AgentConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(AgentConfig::default());
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let config: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: shown,
            message,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.queue_capacity < 10 {
            return Err("queue_capacity must be at least 10".into());
        }
        for check in &self.checks {
            crate::schedule::validate(&check.schedule)
                .map_err(|e| format!("check '{}': {e}", check.name))?;
        }
        for (name, action) in &self.actions {
            if action.argv.is_empty() {
                return Err(format!("action '{name}' needs argv"));
            }
            if action.timeout_secs == 0 {
                return Err(format!("action '{name}': timeout_secs must be at least 1"));
            }
            for (param, rule) in &action.allow {
                if !action.params.contains(param) {
                    return Err(format!(
                        "action '{name}': allow.{param} names a parameter not in params"
                    ));
                }
                if let Some(Err(e)) = rule.regex() {
                    return Err(format!(
                        "action '{name}': allow.{param}.pattern does not compile: {e}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses() {
        let text = r#"
subscriptions = ["linux"]
[[checks]]
name = "root-disk"
timeout_secs = 10
run = { kind = "command", argv = ["/bin/true"] }
schedule = { kind = "interval", secs = 60 }
[actions.flush-cache]
argv = ["/bin/true"]
"#;
        let c: AgentConfig = toml::from_str(text).unwrap();
        assert_eq!(c.checks.len(), 1);
        assert_eq!(c.queue_capacity, 100_000);
        assert!(c.validate().is_ok());
        assert!(toml::from_str::<AgentConfig>("unknown = 1").is_err());
    }
}

#[cfg(test)]
mod action_rules {
    use super::*;

    #[test]
    fn value_rules_must_name_a_parameter_and_compile() {
        let parse = |t: &str| toml::from_str::<AgentConfig>(t).unwrap().validate();
        assert!(parse(
            "[actions.a]\nargv = [\"/bin/true\"]\nparams = [\"p\"]\nallow.p = { pattern = \"[a-z]+\" }"
        )
        .is_ok());
        let unknown = parse(
            "[actions.a]\nargv = [\"/bin/true\"]\nparams = [\"p\"]\nallow.q = { pattern = \"x\" }",
        );
        assert!(unknown.unwrap_err().contains("allow.q"));
        let broken = parse(
            "[actions.a]\nargv = [\"/bin/true\"]\nparams = [\"p\"]\nallow.p = { pattern = \"(\" }",
        );
        assert!(broken.unwrap_err().contains("does not compile"));
        assert!(toml::from_str::<AgentConfig>(
            "[actions.a]\nargv = [\"/bin/true\"]\nallow.p = { colour = \"red\" }"
        )
        .is_err());
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    #[test]
    fn the_shipped_example_configuration_is_valid() {
        let text = include_str!("../../../packaging/agent.toml");
        let config: AgentConfig = toml::from_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.checks[0].name, "root-disk");
    }
}
