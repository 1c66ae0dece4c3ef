//! What checks sent by the server may execute on this host: the agent's
//! own configuration decides, as it does for actions.
//!
//! ```toml
//! [check_policy]
//! allow_dirs = ["/usr/lib/nagios/plugins", "/usr/lib/monitoring-plugins", "/usr/local/lib/nagios/plugins"]
//! allow_commands = ["/usr/local/bin/check_backup_age"]
//! allow_shell = false   # shell checks are refused unless set
//! allow_probes = true   # the built-in probes
//! ```
//!
//! A command check runs only if its program, with symbolic links and `..`
//! resolved, is one of `allow_commands` or lies under one of `allow_dirs`
//! (themselves resolved), and its environment does not set variables that
//! change what a program loads or runs (`LD_*`, `PATH`, …). A refused check
//! is not run; every time it is due it reports UNKNOWN with the reason, so
//! the refusal shows on the system page. Checks from the agent's own
//! configuration file are the operator's and are not filtered.

use std::path::{Path, PathBuf};

use aramaki_protocol::agent::{CheckDefinition, CheckResult, Runner};
use serde::Deserialize;

/// The directories Debian, Ubuntu and the source builds put Nagios plugins in.
pub const DEFAULT_DIRS: [&str; 3] = [
    "/usr/lib/nagios/plugins",
    "/usr/lib/monitoring-plugins",
    "/usr/local/lib/nagios/plugins",
];

/// Environment variables a server-sent check may not set: each changes what
/// an allowed program loads or runs.
const FORBIDDEN_ENV: [&str; 17] = [
    "PATH",
    "IFS",
    "ENV",
    "BASH_ENV",
    "SHELLOPTS",
    "PS4",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "PYTHONPATH",
    "PYTHONSTARTUP",
    "PYTHONHOME",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "GCONV_PATH",
    "HOSTALIASES",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckPolicy {
    /// Programs allowed by full path.
    pub allow_commands: Vec<PathBuf>,
    /// Directories whose programs (and subdirectories') are allowed.
    pub allow_dirs: Vec<PathBuf>,
    /// Whether `shell` checks (`/bin/sh -c`) may run at all.
    pub allow_shell: bool,
    /// Whether the built-in probes may run.
    pub allow_probes: bool,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        CheckPolicy {
            allow_commands: Vec::new(),
            allow_dirs: DEFAULT_DIRS.iter().map(PathBuf::from).collect(),
            allow_shell: false,
            allow_probes: true,
        }
    }
}

impl CheckPolicy {
    /// Ok if the check may run here; otherwise the reason, in words an
    /// operator can act on.
    pub fn admit(&self, run: &Runner) -> Result<(), String> {
        match run {
            Runner::Probe(_) if self.allow_probes => Ok(()),
            Runner::Probe(_) => {
                Err("built-in probes are refused: check_policy.allow_probes is false".into())
            }
            Runner::Shell { env, .. } if self.allow_shell => admit_env(env),
            Runner::Shell { .. } => Err(
                "shell checks are refused: this agent's configuration does not set check_policy.allow_shell = true"
                    .into(),
            ),
            Runner::Command { argv, env, .. } => {
                self.admit_program(argv.first().map(String::as_str))?;
                admit_env(env)
            }
        }
    }

    fn admit_program(&self, program: Option<&str>) -> Result<(), String> {
        let Some(program) = program.filter(|p| !p.is_empty()) else {
            return Err("the check names no program".into());
        };
        let path = Path::new(program);
        if !path.is_absolute() {
            return Err(format!(
                "'{program}' is not an absolute path: a check must name its program by full path"
            ));
        }
        // Resolve links and `..` first: /usr/lib/nagios/plugins/../../../bin/sh
        // is /usr/bin/sh, not a plugin.
        let real =
            std::fs::canonicalize(path).map_err(|e| format!("cannot resolve '{program}': {e}"))?;
        let allowed_command = self
            .allow_commands
            .iter()
            .filter_map(|c| std::fs::canonicalize(c).ok())
            .any(|c| c == real);
        let allowed_dir = self
            .allow_dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(&d) && real != d);
        if allowed_command || allowed_dir {
            return Ok(());
        }
        let dirs: Vec<String> = self
            .allow_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let shown = if real == path {
            format!("'{program}'")
        } else {
            format!("'{program}' (that is {})", real.display())
        };
        Err(format!(
            "{shown} is neither in check_policy.allow_commands nor under check_policy.allow_dirs ({})",
            if dirs.is_empty() {
                "none".to_owned()
            } else {
                dirs.join(", ")
            }
        ))
    }
}

fn admit_env(env: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    match env
        .keys()
        .find(|k| k.starts_with("LD_") || FORBIDDEN_ENV.contains(&k.as_str()))
    {
        Some(k) => Err(format!(
            "the check sets {k}, which changes what the program loads or runs"
        )),
        None => Ok(()),
    }
}

/// The result a refused check reports each time it is due: UNKNOWN, with
/// the reason.
pub fn refused(def: &CheckDefinition, reason: &str) -> CheckResult {
    CheckResult {
        check: def.name.clone(),
        system: def.system.clone(),
        labels: def.labels.clone(),
        status: 3,
        output: format!("UNKNOWN - refused by this agent's check policy: {reason}"),
        metrics: Vec::new(),
        executed_at: jiff::Timestamp::now().as_microsecond(),
        duration_ms: 0,
        source: "check".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aramaki_protocol::agent::Probe;

    use super::*;

    fn command(argv: &[&str]) -> Runner {
        Runner::Command {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
        }
    }

    fn policy_with_dir(dir: &Path) -> CheckPolicy {
        CheckPolicy {
            allow_dirs: vec![dir.to_path_buf()],
            ..CheckPolicy::default()
        }
    }

    #[test]
    fn plugins_in_allowed_dirs_run_and_escapes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let plugin = plugins.join("check_thing");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/bin/sh", plugins.join("check_sh")).unwrap();
        let policy = policy_with_dir(&plugins);
        assert_eq!(
            policy.admit(&command(&[plugin.to_str().unwrap(), "-w", "1"])),
            Ok(())
        );
        // `..` out of the directory, a link out of it, a program elsewhere.
        let dotdot = format!("{}/../../../../../../bin/sh", plugins.display());
        let err = policy.admit(&command(&[&dotdot])).unwrap_err();
        assert!(
            err.contains("neither in check_policy.allow_commands"),
            "{err}"
        );
        assert!(err.contains("that is"), "the resolved path is named: {err}");
        let link = plugins.join("check_sh");
        assert!(policy.admit(&command(&[link.to_str().unwrap()])).is_err());
        assert!(policy.admit(&command(&["/bin/true"])).is_err());
        // The directory itself is not a program; a relative name is refused.
        assert!(policy
            .admit(&command(&[plugins.to_str().unwrap()]))
            .is_err());
        let err = policy.admit(&command(&["check_thing"])).unwrap_err();
        assert!(err.contains("absolute path"), "{err}");
        assert!(policy.admit(&command(&[])).is_err());
        let err = policy.admit(&command(&["/no/such/check"])).unwrap_err();
        assert!(err.contains("cannot resolve"), "{err}");
        // Allowed by name.
        let by_name = CheckPolicy {
            allow_commands: vec![PathBuf::from("/bin/true")],
            ..policy.clone()
        };
        assert_eq!(by_name.admit(&command(&["/bin/true"])), Ok(()));
    }

    #[test]
    fn shell_is_refused_unless_allowed_and_probes_are_allowed() {
        let shell = Runner::Shell {
            script: "touch /tmp/pwned".into(),
            env: BTreeMap::new(),
            cwd: None,
        };
        let policy = CheckPolicy::default();
        let err = policy.admit(&shell).unwrap_err();
        assert!(err.contains("allow_shell"), "{err}");
        assert_eq!(policy.admit(&Runner::Probe(Probe::Keepalive)), Ok(()));
        let open = CheckPolicy {
            allow_shell: true,
            ..CheckPolicy::default()
        };
        assert_eq!(open.admit(&shell), Ok(()));
        let closed = CheckPolicy {
            allow_probes: false,
            ..CheckPolicy::default()
        };
        assert!(closed.admit(&Runner::Probe(Probe::Keepalive)).is_err());
    }

    #[test]
    fn the_environment_cannot_change_what_runs() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("check_thing");
        std::fs::write(&plugin, "").unwrap();
        let policy = policy_with_dir(dir.path());
        for key in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "PATH",
            "PERL5OPT",
            "BASH_ENV",
        ] {
            let run = Runner::Command {
                argv: vec![plugin.display().to_string()],
                env: BTreeMap::from([(key.to_owned(), "/tmp/evil".to_owned())]),
                cwd: None,
            };
            let err = policy.admit(&run).unwrap_err();
            assert!(err.contains(key), "{err}");
        }
        let fine = Runner::Command {
            argv: vec![plugin.display().to_string()],
            env: BTreeMap::from([("LC_ALL".to_owned(), "C".to_owned())]),
            cwd: None,
        };
        assert_eq!(policy.admit(&fine), Ok(()));
    }

    #[test]
    fn defaults_are_the_plugin_dirs() {
        let p: CheckPolicy = toml::from_str("").unwrap();
        assert_eq!(p, CheckPolicy::default());
        assert!(!p.allow_shell);
        assert_eq!(p.allow_dirs.len(), 3);
        assert!(toml::from_str::<CheckPolicy>("allow_everything = true").is_err());
    }
}
