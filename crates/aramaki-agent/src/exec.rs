//! Running one check: a program (argv, no shell), a shell script (only when
//! the definition asks for one) or a built-in probe, turned into a
//! [`CheckResult`].
//!
//! A check must never wedge the agent: the program runs in its own process
//! group so that a timeout kills everything it started, output is capped but
//! always drained (a child blocked on a full pipe would never exit), and a
//! grandchild that keeps the pipes open after the program exited is killed
//! after a short grace period instead of holding the result until timeout.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aramaki_protocol::agent::{CheckDefinition, CheckResult, Metric, Runner};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use crate::{nagios, probes};

/// How long the pipes may stay open after the program exited: long enough
/// for the last writes to arrive, short enough not to delay the result.
const PIPE_GRACE: Duration = Duration::from_millis(100);

/// Runs a check once and reports the result; never fails, since a check
/// that cannot run is itself a result (UNKNOWN).
pub async fn run(def: &CheckDefinition) -> CheckResult {
    let executed_at = jiff::Timestamp::now().as_microsecond();
    let start = Instant::now();
    // A zero timeout would make every check fail; one second is the floor.
    let timeout = Duration::from_secs(u64::from(def.timeout_secs.max(1)));
    let limit = usize::try_from(def.output_limit).unwrap_or(usize::MAX);
    let (outcome, source) = match &def.run {
        Runner::Command { argv, env, cwd } => {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            (
                run_process(&argv, env, cwd.as_deref(), timeout, limit).await,
                "check",
            )
        }
        Runner::Shell { script, env, cwd } => {
            let argv = ["/bin/sh", "-c", script.as_str()];
            (
                run_process(&argv, env, cwd.as_deref(), timeout, limit).await,
                "check",
            )
        }
        Runner::Probe(probe) => {
            let found = probes::run(probe, timeout).await;
            (
                Outcome::new(found.status, found.output, found.metrics),
                "probe",
            )
        }
    };
    CheckResult {
        check: def.name.clone(),
        system: def.system.clone(),
        labels: def.labels.clone(),
        status: outcome.status,
        output: outcome.output,
        metrics: outcome.metrics,
        executed_at,
        duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        source: source.to_owned(),
    }
}

/// Status, output and metrics of a run.
#[derive(Debug)]
struct Outcome {
    status: i32,
    output: String,
    metrics: Vec<Metric>,
}

impl Outcome {
    fn new(status: i32, output: String, metrics: Vec<Metric>) -> Outcome {
        Outcome {
            status,
            output,
            metrics,
        }
    }

    /// UNKNOWN with a message from the agent.
    fn unknown(message: String) -> Outcome {
        Outcome::new(3, message, Vec::new())
    }
}

/// Why a program could not be started or watched.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("cannot run a check with an empty argv")]
    EmptyArgv,
    #[error("cannot run {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("cannot run {program} in {cwd}: {reason}")]
    SpawnIn {
        program: String,
        cwd: String,
        reason: String,
    },
    #[error("lost track of {program}: {reason}")]
    Wait { program: String, reason: String },
}

async fn run_process(
    argv: &[&str],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    timeout: Duration,
    limit: usize,
) -> Outcome {
    let mut child = match spawn(argv, env, cwd) {
        Ok(child) => child,
        Err(e) => return Outcome::unknown(e.to_string()),
    };
    let watched = supervise(&mut child, timeout, limit).await;
    let program = argv.first().copied().unwrap_or_default();
    judge(program, watched, timeout, limit)
}

/// Starts the program in a process group of its own, stdin closed, both
/// output streams piped.
fn spawn(
    argv: &[&str],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> Result<Child, ExecError> {
    let (program, args) = argv.split_first().ok_or(ExecError::EmptyArgv)?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    command.spawn().map_err(|e| {
        let (program, reason) = ((*program).to_owned(), probes::io_text(&e));
        match cwd {
            Some(cwd) => ExecError::SpawnIn {
                program,
                cwd: cwd.to_owned(),
                reason,
            },
            None => ExecError::Spawn { program, reason },
        }
    })
}

/// How the program ended.
#[derive(Debug)]
enum Ending {
    Exited(ExitStatus),
    TimedOut,
    WaitFailed(io::Error),
}

/// Everything learned from watching the program.
#[derive(Debug)]
struct Watched {
    ending: Ending,
    stdout: Capture,
    stderr: Capture,
}

/// Waits for the program while draining its output; kills the process
/// group on timeout, or when the pipes outlive the program by more than
/// [`PIPE_GRACE`].
async fn supervise(child: &mut Child, timeout: Duration, limit: usize) -> Watched {
    let mut group = Group::of(child);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // A few bytes beyond the limit show whether the cut splits a character.
    let keep = limit.saturating_add(4);
    let (mut out, mut err) = (Capture::new(keep), Capture::new(keep));
    let ending = {
        let reading = async { tokio::join!(out.fill(stdout), err.fill(stderr)) };
        tokio::pin!(reading);
        let wait = child.wait();
        tokio::pin!(wait);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut drained = false;
        let ending = loop {
            tokio::select! {
                _ = &mut reading, if !drained => drained = true,
                status = &mut wait => break status.map_or_else(Ending::WaitFailed, Ending::Exited),
                _ = &mut deadline => break Ending::TimedOut,
            }
        };
        let must_kill = match ending {
            Ending::Exited(_) => {
                !drained
                    && tokio::time::timeout(PIPE_GRACE, &mut reading)
                        .await
                        .is_err()
            }
            Ending::TimedOut | Ending::WaitFailed(_) => true,
        };
        if must_kill {
            group.kill();
            // What the killed processes wrote is still in the pipes; a
            // process that left the group may hold them open, hence the bound.
            let _ = tokio::time::timeout(PIPE_GRACE, &mut reading).await;
        }
        ending
    };
    if matches!(ending, Ending::TimedOut) {
        // Reap the killed program; SIGKILL cannot be ignored, so this is quick.
        let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
    }
    group.disarm();
    Watched {
        ending,
        stdout: out,
        stderr: err,
    }
}

/// The program's process group, killed on drop unless disarmed, so that a
/// cancelled check does not leave its processes behind.
pub(crate) struct Group {
    pgid: Option<libc::pid_t>,
}

impl Group {
    /// The group led by `child` (spawned with `process_group(0)`, so its
    /// group id is its pid).
    pub(crate) fn of(child: &Child) -> Group {
        let pgid = child.id().and_then(|id| libc::pid_t::try_from(id).ok());
        // 0 and 1 would address our own group or every process: never.
        Group {
            pgid: pgid.filter(|&p| p > 1),
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill has no memory effects; -pgid addresses exactly
            // the program's own group (pgid > 1 is checked in `of`).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }

    pub(crate) fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One output stream, kept up to a limit and drained beyond it.
#[derive(Debug)]
struct Capture {
    bytes: Vec<u8>,
    limit: usize,
    /// Bytes were read and thrown away.
    overflowed: bool,
}

impl Capture {
    fn new(limit: usize) -> Capture {
        Capture {
            bytes: Vec::new(),
            limit,
            overflowed: false,
        }
    }

    /// Reads until end of stream or error; bytes past the limit are
    /// discarded so that the writer never blocks.
    async fn fill(&mut self, pipe: Option<impl AsyncRead + Unpin>) {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = pipe.read(&mut chunk).await {
            let room = self.limit.saturating_sub(self.bytes.len()).min(n);
            self.bytes.extend_from_slice(&chunk[..room]);
            self.overflowed |= room < n;
        }
    }
}

/// Turns what was watched into status, output and metrics.
fn judge(program: &str, watched: Watched, timeout: Duration, limit: usize) -> Outcome {
    let (text, truncated) = combine(watched.stdout, watched.stderr, limit);
    let (status, output, metrics) = match watched.ending {
        Ending::TimedOut => {
            let note = format!(
                "timed out after {} s; process group killed",
                timeout.as_secs()
            );
            (3, prepend(note, text), Vec::new())
        }
        Ending::WaitFailed(e) => {
            let note = ExecError::Wait {
                program: program.to_owned(),
                reason: probes::io_text(&e),
            };
            (3, prepend(note.to_string(), text), Vec::new())
        }
        Ending::Exited(status) => exited(status, text),
    };
    let output = if truncated {
        append(output, format!("[output truncated at {limit} bytes]"))
    } else {
        output
    };
    Outcome::new(status, output, metrics)
}

/// Nagios semantics of an exit: 0–3 as they are, any other code UNKNOWN
/// with the code noted, a signal UNKNOWN with the signal named.
fn exited(status: ExitStatus, text: String) -> (i32, String, Vec<Metric>) {
    match (status.code(), status.signal()) {
        (Some(code @ 0..=3), _) => {
            let metrics = nagios::parse(&text).metrics;
            let text = if text.is_empty() {
                format!("(no output; exit code {code})")
            } else {
                text
            };
            (code, text, metrics)
        }
        (Some(code), _) => (3, append(text, format!("[exit code {code}]")), Vec::new()),
        (None, Some(signal)) => (
            3,
            prepend(format!("killed by signal {}", signal_name(signal)), text),
            Vec::new(),
        ),
        (None, None) => (
            3,
            prepend("ended without exit code or signal".to_owned(), text),
            Vec::new(),
        ),
    }
}

/// `first` as the first line, then `rest` if any.
fn prepend(first: String, rest: String) -> String {
    append(first, rest)
}

/// `text`, then `line` on a line of its own.
fn append(mut text: String, line: String) -> String {
    if !text.is_empty() && !line.is_empty() {
        text.push('\n');
    }
    text.push_str(&line);
    text
}

/// Stdout, then stderr if any, cut to `limit` bytes on a character
/// boundary; also says whether anything was cut.
fn combine(stdout: Capture, stderr: Capture, limit: usize) -> (String, bool) {
    let mut truncated = stdout.overflowed || stderr.overflowed;
    let mut bytes = stdout.bytes;
    if !stderr.bytes.is_empty() {
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(&stderr.bytes);
    }
    if bytes.len() > limit {
        truncated = true;
        bytes.truncate(utf8_cut(&bytes, limit));
    }
    (
        String::from_utf8_lossy(&bytes).trim_end().to_owned(),
        truncated,
    )
}

/// The largest length up to `max` that does not split a UTF-8 character.
fn utf8_cut(bytes: &[u8], max: usize) -> usize {
    if bytes.len() <= max {
        return bytes.len();
    }
    let is_continuation = |i: usize| bytes[i] & 0xc0 == 0x80;
    let mut cut = max;
    // A character is at most four bytes: look back at most three.
    while cut > 0 && max - cut < 3 && is_continuation(cut) {
        cut -= 1;
    }
    if is_continuation(cut) {
        max
    } else {
        cut
    }
}

/// `SIGTERM` for 15, and so on; the number for the rare others.
fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        other => return format!("{other}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aramaki_protocol::agent::{Probe, Schedule};
    use std::path::Path;

    fn def(run: Runner) -> CheckDefinition {
        CheckDefinition {
            name: "test-check".into(),
            run,
            schedule: Schedule::Interval {
                secs: 60,
                splay: false,
            },
            timeout_secs: 10,
            ttl_secs: None,
            system: Some("web".into()),
            labels: BTreeMap::from([("role".to_owned(), "db".to_owned())]),
            output_limit: 64 * 1024,
        }
    }

    fn command(argv: &[&str]) -> CheckDefinition {
        def(Runner::Command {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
        })
    }

    fn shell(script: &str) -> CheckDefinition {
        def(Runner::Shell {
            script: script.into(),
            env: BTreeMap::new(),
            cwd: None,
        })
    }

    /// Whether the process is gone; a zombie counts as gone, since a
    /// container's init may not reap orphans.
    fn gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .unwrap()
                .trim_start()
                .starts_with('Z'),
        }
    }

    /// Polls for the end of a SIGKILLed process (delivery is asynchronous).
    async fn wait_gone(pid: i32) -> bool {
        for _ in 0..100 {
            if gone(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn read_pid(path: &Path) -> i32 {
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn fills_the_result() {
        let before = jiff::Timestamp::now().as_microsecond();
        let result = run(&shell("echo 'OK - fine | m=1;2;3'")).await;
        assert_eq!(result.check, "test-check");
        assert_eq!(result.system.as_deref(), Some("web"));
        assert_eq!(result.labels["role"], "db");
        assert_eq!(result.source, "check");
        assert_eq!(result.status, 0);
        assert_eq!(result.output, "OK - fine | m=1;2;3");
        assert_eq!(result.metrics.len(), 1);
        assert_eq!(result.metrics[0].crit.as_deref(), Some("3"));
        assert!(result.executed_at >= before && result.executed_at - before < 5_000_000);
        assert!(result.duration_ms < 5_000);
    }

    #[tokio::test]
    async fn exit_codes_follow_nagios() {
        for code in 0..=3 {
            let result = run(&shell(&format!("echo state {code}; exit {code}"))).await;
            assert_eq!(result.status, code);
            assert_eq!(result.output, format!("state {code}"));
        }
        let result = run(&shell("echo 'sh: frobnicate: not found' >&2; exit 127")).await;
        assert_eq!(result.status, 3);
        assert_eq!(result.output, "sh: frobnicate: not found\n[exit code 127]");
        let result = run(&shell("exit 0")).await;
        assert_eq!(result.output, "(no output; exit code 0)");
    }

    #[tokio::test]
    async fn signals_are_named() {
        let result = run(&shell("echo dying; kill -TERM $$")).await;
        assert_eq!(result.status, 3);
        assert_eq!(result.output, "killed by signal SIGTERM\ndying");
    }

    #[tokio::test]
    async fn stdout_then_stderr() {
        let result = run(&shell("echo out; echo err >&2")).await;
        assert_eq!(result.output, "out\nerr");
        let result = run(&shell("printf out; printf err >&2")).await;
        assert_eq!(result.output, "out\nerr");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let mut check = def(Runner::Shell {
            script: "sleep 30 & echo $! > \"$PIDFILE\"; echo started; sleep 30".into(),
            env: BTreeMap::from([("PIDFILE".to_owned(), pidfile.display().to_string())]),
            cwd: None,
        });
        check.timeout_secs = 1;
        let start = Instant::now();
        let result = run(&check).await;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(result.status, 3);
        assert_eq!(
            result.output,
            "timed out after 1 s; process group killed\nstarted"
        );
        assert!(
            wait_gone(read_pid(&pidfile)).await,
            "the background sleep survived"
        );
    }

    #[tokio::test]
    async fn lingering_grandchildren_do_not_delay_the_result() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let check = def(Runner::Shell {
            script: "sleep 30 & echo $! > \"$PIDFILE\"; echo 'OK - done'".into(),
            env: BTreeMap::from([("PIDFILE".to_owned(), pidfile.display().to_string())]),
            cwd: None,
        });
        let start = Instant::now();
        let result = run(&check).await;
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!((result.status, result.output.as_str()), (0, "OK - done"));
        assert!(
            wait_gone(read_pid(&pidfile)).await,
            "the background sleep survived"
        );
    }

    #[tokio::test]
    async fn output_is_capped_and_drained() {
        let mut check = shell("head -c 1048576 /dev/zero | tr '\\0' a; echo 'OK - end'");
        check.output_limit = 1000;
        let start = Instant::now();
        let result = run(&check).await;
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(result.status, 0, "the writer was not blocked");
        assert_eq!(
            result.output,
            format!("{}\n[output truncated at 1000 bytes]", "a".repeat(1000))
        );
    }

    #[tokio::test]
    async fn cap_never_splits_a_character() {
        let mut check = command(&["printf", "%s", "ééé"]);
        check.output_limit = 3;
        let result = run(&check).await;
        assert_eq!(result.output, "é\n[output truncated at 3 bytes]");
        assert_eq!(utf8_cut("aé".as_bytes(), 2), 1);
        assert_eq!(utf8_cut("a€".as_bytes(), 3), 1);
        assert_eq!(utf8_cut("a€".as_bytes(), 4), 4);
        assert_eq!(utf8_cut(&[0x80; 8], 5), 5, "garbage is cut anywhere");
    }

    #[tokio::test]
    async fn env_and_cwd_apply() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path().canonicalize().unwrap();
        let check = def(Runner::Shell {
            script: "printf '%s:%s:%s' \"$GREETING\" \"$(pwd)\" \"${PATH:+inherited}\"".into(),
            env: BTreeMap::from([("GREETING".to_owned(), "hello world".to_owned())]),
            cwd: Some(cwd.display().to_string()),
        });
        let result = run(&check).await;
        assert_eq!(
            result.output,
            format!("hello world:{}:inherited", cwd.display())
        );
    }

    #[tokio::test]
    async fn argv_is_not_interpreted() {
        let args = ["%s\n", "a b", "x;y", "$(id)", "`id`", "*", "$HOME", "'q'"];
        let mut argv = vec!["printf"];
        argv.extend(args);
        let result = run(&command(&argv)).await;
        assert_eq!(result.status, 0);
        assert_eq!(result.output, args[1..].join("\n"));
    }

    #[tokio::test]
    async fn programs_that_cannot_run() {
        let result = run(&command(&["/x/y"])).await;
        assert_eq!(result.status, 3);
        assert_eq!(result.output, "cannot run /x/y: No such file or directory");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "#!/bin/sh\necho hi\n").unwrap();
        let result = run(&command(&[plain.to_str().unwrap()])).await;
        assert_eq!(result.status, 3);
        assert_eq!(
            result.output,
            format!("cannot run {}: Permission denied", plain.display())
        );
        let result = run(&command(&[])).await;
        assert_eq!(result.output, "cannot run a check with an empty argv");
        let mut check = command(&["true"]);
        check.run = Runner::Command {
            argv: vec!["true".into()],
            env: BTreeMap::new(),
            cwd: Some("/no/such/dir".into()),
        };
        let result = run(&check).await;
        assert_eq!(
            result.output,
            "cannot run true in /no/such/dir: No such file or directory"
        );
    }

    #[tokio::test]
    async fn probes_are_delegated() {
        let result = run(&def(Runner::Probe(Probe::Keepalive))).await;
        assert_eq!(result.source, "probe");
        assert_eq!(
            (result.status, result.output.as_str()),
            (0, "KEEPALIVE OK - agent running")
        );
    }

    #[tokio::test]
    async fn nagios_check_dummy() {
        let plugin = "/usr/lib/nagios/plugins/check_dummy";
        if !Path::new(plugin).exists() {
            eprintln!("skipped: {plugin} is not installed");
            return;
        }
        let result = run(&command(&[plugin, "1", "hello"])).await;
        assert_eq!(result.status, 1);
        assert_eq!(nagios::parse(&result.output).summary, "WARNING: hello");
    }
}
