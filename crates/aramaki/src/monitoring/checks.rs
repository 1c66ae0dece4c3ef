//! Check definitions as users write them, and what agents receive.

use std::collections::BTreeMap;

use aramaki_protocol::agent::{self, CheckDefinition, Probe, Runner, Schedule};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::systems::model::{Invalid, Labels, Slug};

/// A check definition: what to run, where, when, and how to judge it.
///
/// Exactly one of `command` (argv, no shell), `shell` (a command line for
/// `/bin/sh -c`, only when asked for) or `probe` (built into the agent);
/// exactly one of `interval` (seconds) or `cron`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// Lowercase letters, digits, `-`, `_` and `.`; unique per instance.
    #[schema(example = "disk-root")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(["/usr/lib/nagios/plugins/check_disk", "-w", "10%", "-c", "5%", "-p", "/"]))]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>, example = json!({"probe": "tcp", "host": "127.0.0.1", "port": 22}))]
    pub probe: Option<Probe>,
    /// Agents whose subscriptions meet these run the check. Every agent is
    /// also subscribed to `agent:<name>` and `system:<slug>`.
    pub subscriptions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "*/5 * * * *")]
    pub cron: Option<String>,
    /// IANA time zone for `cron` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Spread agents over the interval instead of firing all at once.
    #[serde(default = "yes")]
    pub splay: bool,
    /// Seconds before the run is killed and reported UNKNOWN.
    #[serde(default = "default_timeout")]
    pub timeout: u32,
    /// Dead-man's switch: CRITICAL when no result arrives for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u32>,
    /// A non-OK state must repeat this many times before it counts.
    #[serde(default = "one")]
    pub occurrences: u32,
    #[serde(default)]
    #[schema(value_type = BTreeMap<String, String>)]
    pub labels: Labels,
    /// Free-form notes kept with the check (not sent to agents).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The system results belong to; absent means the running agent's own
    /// (a check naming another system works like a proxy check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub system: Option<Slug>,
    /// Environment for the command. Write-only: every API, page, event and
    /// export shows each value as `(set)`; sending `(set)` back keeps the
    /// value stored for that name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Output beyond this many bytes is cut (default 64 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_limit: Option<u32>,
    /// Unpublished checks are kept but not scheduled.
    #[serde(default = "yes")]
    pub publish: bool,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn default_timeout() -> u32 {
    60
}

/// What every API, page and event shows instead of a secret value.
pub const SECRET_SET: &str = "(set)";

/// Longest interval, TTL or timeout accepted: one week.
const MAX_SECS: u32 = 7 * 24 * 3600;

impl CheckSpec {
    /// A spec with the defaults, for code that builds one field by field.
    pub fn new(name: &str, subscriptions: Vec<String>) -> CheckSpec {
        CheckSpec {
            name: name.to_owned(),
            command: None,
            shell: None,
            probe: None,
            subscriptions,
            interval: None,
            cron: None,
            timezone: None,
            splay: true,
            timeout: default_timeout(),
            ttl: None,
            occurrences: 1,
            labels: Labels::default(),
            annotations: BTreeMap::new(),
            system: None,
            env: BTreeMap::new(),
            cwd: None,
            output_limit: None,
            publish: true,
        }
    }

    /// The spec as it may be shown: secret values (the environment) only as
    /// `(set)`, and no credentials in an HTTP probe's URL.
    pub fn redacted(&self) -> CheckSpec {
        let mut out = self.clone();
        for value in out.env.values_mut() {
            *value = SECRET_SET.to_owned();
        }
        if let Some(Probe::Http { url, .. }) = &mut out.probe {
            *url = without_userinfo(url);
        }
        out
    }

    /// Puts back the stored value of every environment variable sent as
    /// `(set)` (a spec read from the API and sent back unchanged keeps its
    /// secrets); refuses `(set)` for a name that has no stored value.
    pub fn keep_secrets(&mut self, stored: Option<&CheckSpec>) -> Result<(), Invalid> {
        for (key, value) in self.env.iter_mut() {
            if value != SECRET_SET {
                continue;
            }
            match stored.and_then(|s| s.env.get(key)) {
                Some(old) => value.clone_from(old),
                None => {
                    return Err(Invalid::new(
                        "env",
                        format!(
                        "'{key}' is sent as '{SECRET_SET}' but has no stored value; give the value"
                    ),
                    ))
                }
            }
        }
        if let (Some(Probe::Http { url, .. }), Some(Probe::Http { url: old, .. })) =
            (&mut self.probe, stored.and_then(|s| s.probe.as_ref()))
        {
            // The redacted form of the stored URL stands for the stored URL.
            if *url != *old && *url == without_userinfo(old) {
                url.clone_from(old);
            }
        }
        Ok(())
    }

    /// Checks everything a server can know without its database.
    pub fn validate(&self) -> Result<(), Invalid> {
        validate_name(&self.name)?;
        let runners = [
            self.command.is_some(),
            self.shell.is_some(),
            self.probe.is_some(),
        ];
        if runners.iter().filter(|r| **r).count() != 1 {
            return Err(Invalid::new(
                "command",
                "give exactly one of command (argv), shell (a command line) or probe",
            ));
        }
        if let Some(argv) = &self.command {
            if argv.first().is_none_or(|p| p.trim().is_empty()) {
                return Err(Invalid::new("command", "needs at least the program to run"));
            }
        }
        if self.shell.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(Invalid::new("shell", "must not be empty"));
        }
        self.validate_schedule()?;
        if self.subscriptions.is_empty() {
            return Err(Invalid::new(
                "subscriptions",
                "name at least one subscription (every agent has 'agent:<name>' and 'system:<slug>')",
            ));
        }
        for s in &self.subscriptions {
            if s.is_empty()
                || s.len() > 100
                || s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(Invalid::new(
                    "subscriptions",
                    format!("subscription '{s}' must be 1 to 100 characters without spaces"),
                ));
            }
        }
        if !(1..=3600).contains(&self.timeout) {
            return Err(Invalid::new("timeout", "must be 1 to 3600 seconds"));
        }
        if let Some(ttl) = self.ttl {
            let period = self.interval.unwrap_or(60);
            if ttl <= period || ttl > MAX_SECS {
                return Err(Invalid::new(
                    "ttl",
                    format!("must be longer than the interval ({period} s) and at most a week"),
                ));
            }
        }
        if !(1..=1000).contains(&self.occurrences) {
            return Err(Invalid::new("occurrences", "must be 1 to 1000"));
        }
        if let Some(limit) = self.output_limit {
            if !(256..=1024 * 1024).contains(&limit) {
                return Err(Invalid::new("output_limit", "must be 256 bytes to 1 MiB"));
            }
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') {
                return Err(Invalid::new("cwd", "must be an absolute path"));
            }
        }
        for key in self.env.keys() {
            let ok = key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(Invalid::new(
                    "env",
                    format!("'{key}' is not a valid environment variable name"),
                ));
            }
        }
        Ok(())
    }

    fn validate_schedule(&self) -> Result<(), Invalid> {
        match (self.interval, &self.cron) {
            (Some(secs), None) => {
                if !(1..=MAX_SECS).contains(&secs) {
                    return Err(Invalid::new("interval", "must be 1 second to a week"));
                }
                if self.timezone.is_some() {
                    return Err(Invalid::new("timezone", "only applies to cron schedules"));
                }
            }
            (None, Some(expr)) => {
                aramaki_protocol::cron::Cron::parse(expr)
                    .map_err(|e| Invalid::new("cron", e.to_string()))?;
                if let Some(tz) = &self.timezone {
                    jiff::tz::TimeZone::get(tz).map_err(|_| {
                        Invalid::new("timezone", format!("'{tz}' is not a known IANA time zone"))
                    })?;
                }
            }
            _ => {
                return Err(Invalid::new(
                    "interval",
                    "give exactly one of interval (seconds) or cron",
                ))
            }
        }
        Ok(())
    }

    /// What an agent receives for this check.
    pub fn definition(&self) -> CheckDefinition {
        let run = match (&self.command, &self.shell, &self.probe) {
            (Some(argv), _, _) => Runner::Command {
                argv: argv.clone(),
                env: self.env.clone(),
                cwd: self.cwd.clone(),
            },
            (None, Some(script), _) => Runner::Shell {
                script: script.clone(),
                env: self.env.clone(),
                cwd: self.cwd.clone(),
            },
            (None, None, Some(probe)) => Runner::Probe(probe.clone()),
            // validate() rules this out; keep agents safe with a no-op.
            (None, None, None) => Runner::Probe(Probe::Keepalive),
        };
        let schedule = match (&self.cron, self.interval) {
            (Some(expr), _) => Schedule::Cron {
                expr: expr.clone(),
                timezone: self.timezone.clone(),
            },
            (None, secs) => Schedule::Interval {
                secs: secs.unwrap_or(60),
                splay: self.splay,
            },
        };
        CheckDefinition {
            name: self.name.clone(),
            run,
            schedule,
            timeout_secs: self.timeout,
            ttl_secs: self.ttl,
            system: self.system.as_ref().map(|s| s.to_string()),
            labels: self.labels.to_map(),
            output_limit: self
                .output_limit
                .unwrap_or_else(agent::default_output_limit),
        }
    }
}

/// A URL with any `user:password@` replaced by `(set)@`.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest
        .get(..authority_end)
        .and_then(|authority| authority.rfind('@'));
    match at.and_then(|at| rest.get(at..)) {
        Some(host_and_path) => format!("{scheme}://{SECRET_SET}{host_and_path}"),
        None => url.to_owned(),
    }
}

/// Check names: 1–64 of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), Invalid> {
    let ok = name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            "name",
            format!("check name '{name}' must be 1 to 64 of a-z, 0-9, '-', '_' or '.', starting with a letter or digit"),
        ))
    }
}

#[cfg(test)]
mod redaction_tests {
    use super::*;

    #[test]
    fn credentials_in_urls_are_hidden() {
        assert_eq!(
            without_userinfo("https://u:p@host:8443/x?y=1"),
            "https://(set)@host:8443/x?y=1"
        );
        assert_eq!(without_userinfo("https://host/a@b"), "https://host/a@b");
        assert_eq!(without_userinfo("not a url"), "not a url");
    }
}
