//! What checks sent by the server may execute on this host: the agent's
//! own configuration decides, as it does for actions.
//!
//! ```toml
//! [check_policy]
//! allow_dirs = ["/usr/lib/nagios/plugins", "/usr/lib/monitoring-plugins", "/usr/local/lib/nagios/plugins"]
//! allow_commands = ["/usr/local/bin/check_backup_age"]
//! allow_shell = false   # shell checks are refused unless set
//! allow_probes = true   # the built-in probes
//! allow_env = []        # environment names allowed beyond the built-in rule
//! ```
//!
//! A command check runs only if its program, with symbolic links and `..`
//! resolved, is one of `allow_commands` or lies under one of `allow_dirs`
//! (themselves resolved), it is not a wrapper that runs a command from its
//! arguments (`negate`, `urlize`, `check_by_ssh`, `check_oracle`, `check_apt`
//! with apt-get options) unless `allow_commands` names it, and its
//! environment sets only upper-case names outside the families that change
//! what a program loads or runs (`LD_*`, `PYTHON*`, `BASH_FUNC_*`, `PATH`,
//! `HOME`, …) or names listed in `allow_env`. A refused check
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

/// Plugins that run a program or command given to them as an argument
/// (`negate /bin/sh -c …`, `urlize`, `check_by_ssh -o ProxyCommand=…`,
/// `check_oracle --oracle_home`, which runs `$ORACLE_HOME/bin/…`): a
/// server-sent check may use them only if `allow_commands` names them.
pub const WRAPPERS: [&str; 4] = ["negate", "urlize", "check_by_ssh", "check_oracle"];

/// Options of `check_apt` that hand their value to `apt-get` as options
/// (`-o APT::Update::Pre-Invoke::=…` runs a command, and dropping `-s`
/// upgrades for real); refused unless `allow_commands` names `check_apt`.
/// Short ones may be grouped (`-nU…`), long ones abbreviated (`--upd`).
const APT_SHORT: [char; 3] = ['u', 'U', 'd'];
const APT_LONG: [&str; 3] = ["update", "upgrade", "dist-upgrade"];

/// Prefixes of environment variables a server-sent check may not set: each
/// family changes what the loader, an interpreter or a library loads or runs.
const DENIED_ENV_PREFIXES: [&str; 23] = [
    "LD_",
    "DYLD_",
    "GLIBC_",
    "MALLOC_",
    "BASH_FUNC_",
    "PYTHON",
    "PERL",
    "RUBY",
    "GEM_",
    "BUNDLE_",
    "NODE_",
    "NPM_",
    "LUA_",
    "JAVA_",
    "JDK_",
    "GCONV_",
    "OPENSSL_",
    "SSL_",
    "GIT_",
    "XDG_",
    "TCL",
    "SSH_",
    "GNUTLS_",
];

/// Environment variables a server-sent check may not set, by name.
const DENIED_ENV: [&str; 35] = [
    "PATH",
    "HOME",
    "TMPDIR",
    "TMP",
    "TEMP",
    "IFS",
    "ENV",
    "BASH_ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "SHELL",
    "ZDOTDIR",
    "PS4",
    "PROMPT_COMMAND",
    "CDPATH",
    "GLOBIGNORE",
    "BROWSER",
    "PAGER",
    "EDITOR",
    "VISUAL",
    "LESSOPEN",
    "LESSCLOSE",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "RES_OPTIONS",
    "RESOLV_HOST_CONF",
    "NLSPATH",
    "LOCPATH",
    "TERMINFO",
    "TERMINFO_DIRS",
    "CLASSPATH",
    "CURL_HOME",
    "WGETRC",
    "PERL5DB",
    "MAGIC",
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
    /// Environment variables a check may set although the built-in rule
    /// refuses them (exact names).
    pub allow_env: Vec<String>,
}

impl Default for CheckPolicy {
    fn default() -> Self {
        CheckPolicy {
            allow_commands: Vec::new(),
            allow_dirs: DEFAULT_DIRS.iter().map(PathBuf::from).collect(),
            allow_shell: false,
            allow_probes: true,
            allow_env: Vec::new(),
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
            Runner::Shell { env, .. } if self.allow_shell => self.admit_env(env),
            Runner::Shell { .. } => Err(
                "shell checks are refused: this agent's configuration does not set check_policy.allow_shell = true"
                    .into(),
            ),
            Runner::Command { argv, env, .. } => {
                let named = self.admit_program(argv.first().map(String::as_str))?;
                if !named {
                    admit_arguments(argv)?;
                }
                self.admit_env(env)
            }
        }
    }

    /// Ok(true) if `allow_commands` names the program, Ok(false) if it is
    /// allowed by its directory only.
    fn admit_program(&self, program: Option<&str>) -> Result<bool, String> {
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
        if allowed_command {
            return Ok(true);
        }
        if allowed_dir {
            return Ok(false);
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

impl CheckPolicy {
    /// A check's environment: upper-case names (`PGPASSWORD`, `LC_ALL`,
    /// `TZ`) except those that change what runs, plus `allow_env`.
    fn admit_env(&self, env: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
        match env
            .keys()
            .find(|k| !self.allow_env.contains(k) && !plain_env(k))
        {
            Some(k) => Err(format!(
                "the check sets {k}, which this agent does not let a check set (it can change what the program loads or runs); check_policy.allow_env can name it"
            )),
            None => Ok(()),
        }
    }
}

/// An environment variable a check may set without `allow_env`: a name
/// of `A-Z`, `0-9` and `_` beginning with a letter, outside the denied
/// names and families.
fn plain_env(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && !DENIED_ENV.contains(&name)
        && !DENIED_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Wrapper plugins and `check_apt`'s apt-get options, for a program the
/// policy admits by its directory only.
fn admit_arguments(argv: &[String]) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Ok(());
    };
    // The name as given and the name it resolves to: a link called
    // check_x that points at negate is negate.
    let names: Vec<String> = [
        Some(PathBuf::from(program)),
        std::fs::canonicalize(program).ok(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    .collect();
    if let Some(wrapper) = names.iter().find(|n| WRAPPERS.contains(&n.as_str())) {
        return Err(format!(
            "'{program}' is {wrapper}, which runs a command given in its arguments: only check_policy.allow_commands can allow it"
        ));
    }
    if names.iter().any(|n| n == "check_apt") {
        let passes_options = argv.iter().skip(1).any(|a| {
            if let Some(long) = a.strip_prefix("--") {
                let name = long.split('=').next().unwrap_or_default();
                !name.is_empty() && APT_LONG.iter().any(|o| o.starts_with(name))
            } else if let Some(short) = a.strip_prefix('-') {
                short.chars().any(|c| APT_SHORT.contains(&c))
            } else {
                false
            }
        });
        if passes_options {
            return Err(format!(
                "'{program}' is check_apt with options for apt-get (-u, -U, -d), which can run commands: only check_policy.allow_commands can allow it"
            ));
        }
    }
    Ok(())
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
    fn wrapper_plugins_run_only_when_named_in_allow_commands() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "negate",
            "urlize",
            "check_by_ssh",
            "check_oracle",
            "check_apt",
        ] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        // A link with an innocent name to a wrapper is the wrapper.
        std::os::unix::fs::symlink(dir.path().join("negate"), dir.path().join("check_ok")).unwrap();
        let at = |name: &str| dir.path().join(name).display().to_string();
        let policy = policy_with_dir(dir.path());
        let attacks: [Vec<String>; 6] = [
            vec![at("negate"), "/bin/sh".into(), "-c".into(), "id".into()],
            vec![at("urlize"), "/bin/sh".into(), "-c".into(), "id".into()],
            vec![
                at("check_by_ssh"),
                "-H".into(),
                "x".into(),
                "-o".into(),
                "ProxyCommand=sh -c id".into(),
            ],
            vec![
                at("check_oracle"),
                "--oracle_home".into(),
                "/tmp/evil".into(),
            ],
            vec![at("check_ok"), "/bin/sh".into(), "-c".into(), "id".into()],
            vec![at("check_apt")],
        ];
        for argv in &attacks[..5] {
            let run = command(&argv.iter().map(String::as_str).collect::<Vec<_>>());
            let err = policy.admit(&run).unwrap_err();
            assert!(err.contains("allow_commands"), "{argv:?}: {err}");
        }
        // check_apt checks, but does not pass options to apt-get.
        assert_eq!(policy.admit(&command(&[&at("check_apt")])), Ok(()));
        assert_eq!(
            policy.admit(&command(&[&at("check_apt"), "-c", "1", "-t", "30"])),
            Ok(())
        );
        for options in [
            vec!["-u", "-o APT::Update::Pre-Invoke::=id"],
            vec!["-U-y"],
            vec!["-nd"],
            vec!["--upgrade=-y"],
            vec!["--upd", "-o x"],
            vec!["--dist-upgrade"],
        ] {
            let mut argv = vec![attacks[5][0].as_str()];
            argv.extend(options.iter().copied());
            let err = policy.admit(&command(&argv)).unwrap_err();
            assert!(err.contains("check_apt"), "{argv:?}: {err}");
        }
        // Named explicitly, the operator has decided.
        let named = CheckPolicy {
            allow_commands: vec![dir.path().join("negate"), dir.path().join("check_apt")],
            ..policy.clone()
        };
        let negate = command(&[&at("negate"), "/usr/lib/nagios/plugins/check_dummy", "2"]);
        assert_eq!(named.admit(&negate), Ok(()));
        assert_eq!(named.admit(&command(&[&at("check_apt"), "-u"])), Ok(()));
    }

    #[test]
    fn the_environment_is_an_allow_list() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("check_thing");
        std::fs::write(&plugin, "").unwrap();
        let policy = policy_with_dir(dir.path());
        let with = |policy: &CheckPolicy, key: &str| {
            policy.admit(&Runner::Command {
                argv: vec![plugin.display().to_string()],
                env: BTreeMap::from([(key.to_owned(), "x".to_owned())]),
                cwd: None,
            })
        };
        for key in [
            "BASH_FUNC_check%%",
            "BASH_FUNC_x",
            "PYTHONWARNINGS",
            "PERL5DB",
            "BROWSER",
            "OPENSSL_CONF",
            "LUA_INIT",
            "JAVA_TOOL_OPTIONS",
            "_JAVA_OPTIONS",
            "HOME",
            "TMPDIR",
            "GIT_SSH_COMMAND",
            "GLIBC_TUNABLES",
            "lower_case",
            "",
            "1X",
        ] {
            let err = with(&policy, key).unwrap_err();
            assert!(err.contains("allow_env"), "{key}: {err}");
        }
        for key in [
            "PGPASSWORD",
            "LC_ALL",
            "LANG",
            "TZ",
            "MYSQL_PWD",
            "SNMP_COMMUNITY",
        ] {
            assert_eq!(with(&policy, key), Ok(()), "{key}");
        }
        // The shell runner is held to the same rule.
        let open = CheckPolicy {
            allow_shell: true,
            ..policy.clone()
        };
        let shell = Runner::Shell {
            script: "true".into(),
            env: BTreeMap::from([("PYTHONSTARTUP".to_owned(), "/tmp/x".to_owned())]),
            cwd: None,
        };
        assert!(open.admit(&shell).is_err());
        // allow_env names what the operator wants anyway.
        let named: CheckPolicy = toml::from_str(&format!(
            "allow_dirs = [{:?}]\nallow_env = [\"HOME\"]",
            dir.path()
        ))
        .unwrap();
        assert_eq!(with(&named, "HOME"), Ok(()));
        assert!(with(&named, "TMPDIR").is_err());
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
