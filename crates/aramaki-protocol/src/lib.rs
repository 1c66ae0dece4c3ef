//! Wire types shared by the Aramaki server, its agents and its peers.
//!
//! This crate deliberately has no server dependencies (no tokio, no sqlx): the
//! agent depends on it alone, and federation peers must agree on these shapes
//! byte for byte. Every type here is part of a versioned protocol; changing a
//! shape means bumping [`PROTOCOL_VERSION`].

pub mod agent;
pub mod cron;
pub mod federation;
pub mod frames;
pub mod keys;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Version of the wire protocol spoken between agents, servers and peers.
pub const PROTOCOL_VERSION: u32 = 1;

/// How much attention an event or a state deserves, in increasing order.
///
/// `info` is news without a verdict; `ok` says something is (again) fine;
/// `warning` and `critical` follow the Nagios convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Ok,
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] = [
        Severity::Info,
        Severity::Ok,
        Severity::Warning,
        Severity::Critical,
    ];

    /// Stable numeric rank, used for ordering and storage.
    pub fn rank(self) -> i64 {
        match self {
            Severity::Info => 0,
            Severity::Ok => 1,
            Severity::Warning => 2,
            Severity::Critical => 3,
        }
    }

    pub fn from_rank(rank: i64) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| s.rank() == rank)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not one of the known names of an enumeration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{given}', expected one of: {expected}")]
pub struct UnknownName {
    pub what: &'static str,
    pub given: String,
    pub expected: &'static str,
}

impl FromStr for Severity {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "severity",
                given: s.to_owned(),
                expected: "info, ok, warning, critical",
            })
    }
}

/// Who caused something: a person, an agent, a peer instance or an integration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    User,
    Agent,
    Instance,
    Integration,
}

impl ActorKind {
    pub const ALL: [ActorKind; 4] = [
        ActorKind::User,
        ActorKind::Agent,
        ActorKind::Instance,
        ActorKind::Integration,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::User => "user",
            ActorKind::Agent => "agent",
            ActorKind::Instance => "instance",
            ActorKind::Integration => "integration",
        }
    }
}

impl fmt::Display for ActorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ActorKind {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ActorKind::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "actor kind",
                given: s.to_owned(),
                expected: "user, agent, instance, integration",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_orders_by_attention() {
        assert!(Severity::Info < Severity::Ok);
        assert!(Severity::Ok < Severity::Warning);
        assert!(Severity::Warning < Severity::Critical);
        for s in Severity::ALL {
            assert_eq!(Severity::from_rank(s.rank()), Some(s));
            assert_eq!(s.as_str().parse::<Severity>(), Ok(s));
        }
        assert_eq!(Severity::from_rank(9), None);
    }

    #[test]
    fn unknown_names_are_explained() {
        let err = "fatal".parse::<Severity>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown severity 'fatal', expected one of: info, ok, warning, critical"
        );
        assert!("robot".parse::<ActorKind>().is_err());
    }

    #[test]
    fn wire_names_are_lowercase() {
        assert_eq!(
            serde_json::to_string(&Severity::Critical).unwrap(),
            "\"critical\""
        );
        assert_eq!(
            serde_json::from_str::<ActorKind>("\"integration\"").unwrap(),
            ActorKind::Integration
        );
    }
}
