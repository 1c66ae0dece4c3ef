//! Actions the server may ask for by name. Only names in the local
//! configuration's allow-list run, with the argv written there; parameter
//! values become argv elements (never a shell). Every request must carry the
//! server's signature, this agent as its audience, an unexpired deadline and
//! a run id never seen before.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use aramaki_protocol::agent::{action_transcript, ActionState, ActionUpdate, SignedAction};
use aramaki_protocol::keys::unhex_array;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot};

use crate::config::{ActionConfig, ValueRule};

/// Most output streamed per run; the rest is drained and counted.
pub const OUTPUT_LIMIT: usize = 256 * 1024;

/// Why a request is not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("action '{0}' is not in this agent's allow-list")]
    NotAllowed(String),
    #[error("the request's signature does not verify against the pinned server key")]
    BadSignature,
    #[error("the request is for agent {0}, not this one")]
    WrongAudience(String),
    #[error("the request expired")]
    Expired,
    #[error("run id {0} was seen before (replay)")]
    Replayed(String),
    #[error("action '{action}' takes no parameter '{param}'")]
    UnknownParam { action: String, param: String },
    #[error("action '{action}' needs parameter '{param}'")]
    MissingParam { action: String, param: String },
    #[error("parameter '{param}' of '{action}' begins with '-', which this agent's allow-list does not allow (a command could read it as an option)")]
    LeadingDash { action: String, param: String },
    #[error("parameter '{param}' of '{action}': {why}")]
    ValueNotAllowed {
        action: String,
        param: String,
        why: String,
    },
}

impl Refused {
    /// The code sent with the refusal (`ActionUpdate::refusal`). The server
    /// closes a run's target only for a refusal of a request it signed and
    /// this agent had not seen: any other is a security event.
    pub fn code(&self) -> &'static str {
        match self {
            Refused::NotAllowed(_) => "not_allowed",
            Refused::BadSignature => "bad_signature",
            Refused::WrongAudience(_) => "wrong_audience",
            Refused::Expired => "expired",
            Refused::Replayed(_) => "replayed",
            Refused::UnknownParam { .. } => "unknown_param",
            Refused::MissingParam { .. } => "missing_param",
            Refused::LeadingDash { .. } => "leading_dash",
            Refused::ValueNotAllowed { .. } => "value_not_allowed",
        }
    }

    /// The final update that reports this refusal for `run_id`.
    pub fn update(&self, run_id: String) -> ActionUpdate {
        ActionUpdate {
            run_id,
            state: ActionState::Refused,
            exit_code: None,
            output: self.to_string(),
            refusal: Some(self.code().to_owned()),
            timeout_secs: None,
        }
    }
}

/// An admitted request: what to run, and for how long at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub argv: Vec<String>,
    /// The request's timeout capped by the allow-list's `timeout_secs`
    /// (at least one second).
    pub timeout_secs: u32,
}

/// Run ids already accepted, kept until their requests expire (on disk, so
/// a restart does not reopen the replay window).
#[derive(Debug)]
pub struct Seen {
    path: PathBuf,
    ids: HashMap<String, i64>,
}

impl Seen {
    pub fn load(path: PathBuf) -> Seen {
        let ids = std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default();
        Seen { path, ids }
    }

    /// Records `id` (until `expires_at`); false if it was seen before.
    fn first_time(&mut self, id: &str, expires_at: i64, now: i64) -> bool {
        self.ids.retain(|_, exp| *exp > now);
        if self.ids.contains_key(id) {
            return false;
        }
        self.ids.insert(id.to_owned(), expires_at);
        if let Ok(text) = serde_json::to_vec(&self.ids) {
            let tmp = self.path.with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &self.path);
            }
        }
        true
    }
}

/// Checks a request; returns the argv to run and its timeout.
pub fn admit(
    signed: &SignedAction,
    me: &str,
    server_key: &VerifyingKey,
    allow: &BTreeMap<String, ActionConfig>,
    seen: &mut Seen,
    now: i64,
) -> Result<Admitted, Refused> {
    let r = &signed.request;
    let signature = unhex_array::<64>(&signed.signature)
        .map(|b| Signature::from_bytes(&b))
        .ok_or(Refused::BadSignature)?;
    server_key
        .verify(&action_transcript(r), &signature)
        .map_err(|_| Refused::BadSignature)?;
    if r.audience != me {
        return Err(Refused::WrongAudience(r.audience.clone()));
    }
    if r.expires_at <= now {
        return Err(Refused::Expired);
    }
    if !seen.first_time(&r.run_id, r.expires_at, now) {
        return Err(Refused::Replayed(r.run_id.clone()));
    }
    let config = allow
        .get(&r.action)
        .ok_or_else(|| Refused::NotAllowed(r.action.clone()))?;
    Ok(Admitted {
        argv: argv(&r.action, config, &r.params)?,
        timeout_secs: effective_timeout(r.timeout_secs, config),
    })
}

/// The timeout a run gets: the server's, capped by this agent's.
pub fn effective_timeout(requested: u32, config: &ActionConfig) -> u32 {
    requested.min(config.timeout_secs).max(1)
}

/// Judges one value against the allow-list's rule for its parameter.
fn check_value(
    action: &str,
    param: &str,
    value: &str,
    rule: Option<&ValueRule>,
) -> Result<(), Refused> {
    let not_allowed = |why: String| Refused::ValueNotAllowed {
        action: action.to_owned(),
        param: param.to_owned(),
        why,
    };
    if value.contains('\0') {
        return Err(not_allowed("contains a NUL character".into()));
    }
    if value.starts_with('-') && !rule.is_some_and(|r| r.allow_leading_dash) {
        return Err(Refused::LeadingDash {
            action: action.to_owned(),
            param: param.to_owned(),
        });
    }
    let Some(rule) = rule else { return Ok(()) };
    if !rule.one_of.is_empty() && !rule.one_of.iter().any(|v| v == value) {
        return Err(not_allowed(format!(
            "'{value}' is not one of {}",
            rule.one_of.join(", ")
        )));
    }
    match rule.regex() {
        Some(Ok(re)) if !re.is_match(value) => Err(not_allowed(format!(
            "'{value}' does not match {}",
            rule.pattern.as_deref().unwrap_or_default()
        ))),
        Some(Err(e)) => Err(not_allowed(format!(
            "the local pattern does not compile: {e}"
        ))),
        _ => Ok(()),
    }
}

/// The allow-listed argv with `{name}` placeholders replaced by values.
/// A value is always (part of) one argv element: no shell, no splitting,
/// and one pass over the template, so a value that contains `{other}`
/// stays literal.
pub fn argv(
    action: &str,
    config: &ActionConfig,
    params: &BTreeMap<String, String>,
) -> Result<Vec<String>, Refused> {
    for (name, value) in params {
        if !config.params.contains(name) {
            return Err(Refused::UnknownParam {
                action: action.to_owned(),
                param: name.clone(),
            });
        }
        check_value(action, name, value, config.allow.get(name))?;
    }
    config
        .argv
        .iter()
        .map(|element| substitute(action, element, config, params))
        .collect()
}

/// One argv element with its placeholders replaced, left to right.
fn substitute(
    action: &str,
    template: &str,
    config: &ActionConfig,
    params: &BTreeMap<String, String>,
) -> Result<String, Refused> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let name = after.find('}').map(|close| &after[..close]);
        match name.filter(|n| config.params.iter().any(|p| p == n)) {
            Some(name) => {
                let value = params.get(name).ok_or_else(|| Refused::MissingParam {
                    action: action.to_owned(),
                    param: name.to_owned(),
                })?;
                out.push_str(value);
                rest = &after[name.len() + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Runs an admitted action: `Started`, `Output` chunks, then one final
/// update. A message on `cancel` kills the process group.
pub async fn run(
    run_id: String,
    argv: Vec<String>,
    timeout: Duration,
    updates: mpsc::UnboundedSender<ActionUpdate>,
    cancel: oneshot::Receiver<()>,
) -> ActionUpdate {
    // Every update but output chunks says which timeout applies: the
    // outcome travels through the queue and may arrive before `started`.
    let applied = u32::try_from(timeout.as_secs()).ok();
    let update = |state, exit_code, output: String| ActionUpdate {
        run_id: run_id.clone(),
        state,
        exit_code,
        output,
        refusal: None,
        timeout_secs: applied,
    };
    let Some((program, args)) = argv.split_first() else {
        return update(
            ActionState::Failed,
            None,
            "the allow-listed argv is empty".into(),
        );
    };
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return update(
                ActionState::Failed,
                None,
                format!("cannot run {program}: {e}"),
            )
        }
    };
    let _ = updates.send(update(ActionState::Started, None, String::new()));
    let mut group = crate::exec::Group::of(&child);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    for pipe in [stdout.map(boxed), stderr.map(boxed)].into_iter().flatten() {
        tokio::spawn(pump(pipe, tx.clone()));
    }
    drop(tx);
    let mut sent = 0usize;
    let mut forward = |chunk: Vec<u8>| {
        let room = OUTPUT_LIMIT.saturating_sub(sent).min(chunk.len());
        sent += chunk.len();
        if room > 0 {
            let text = String::from_utf8_lossy(&chunk[..room]).into_owned();
            let _ = updates.send(ActionUpdate {
                timeout_secs: None,
                ..update(ActionState::Output, None, text)
            });
        }
    };
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    tokio::pin!(cancel);
    let mut output_done = false;
    let ending = loop {
        tokio::select! {
            chunk = rx.recv(), if !output_done => match chunk {
                Some(c) => forward(c),
                None => output_done = true,
            },
            status = child.wait(), if output_done => break status.map_err(|e| e.to_string()),
            _ = &mut deadline => {
                group.kill();
                let _ = child.wait().await;
                group.disarm();
                return update(ActionState::TimedOut, None, format!("timed out after {} s; process group killed", timeout.as_secs()));
            }
            _ = &mut cancel => {
                group.kill();
                let _ = child.wait().await;
                group.disarm();
                return update(ActionState::Cancelled, None, "cancelled; process group killed".into());
            }
        }
    };
    group.disarm();
    let note = if sent > OUTPUT_LIMIT {
        format!("{sent} bytes of output, {OUTPUT_LIMIT} streamed")
    } else {
        String::new()
    };
    match ending {
        Ok(status) if status.success() => update(ActionState::Succeeded, Some(0), note),
        Ok(status) => update(ActionState::Failed, status.code(), note),
        Err(e) => update(ActionState::Failed, None, e),
    }
}

fn boxed<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
) -> Box<dyn tokio::io::AsyncRead + Unpin + Send> {
    Box::new(r)
}

async fn pump(
    mut pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut buf = vec![0u8; 8192];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        if tx.send(buf[..n].to_vec()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aramaki_protocol::agent::ActionRequest;
    use aramaki_protocol::keys::hex;
    use ed25519_dalek::{Signer, SigningKey};

    fn allow() -> BTreeMap<String, ActionConfig> {
        BTreeMap::from([(
            "echo".to_owned(),
            ActionConfig {
                argv: vec!["/bin/echo".into(), "path={path}".into()],
                params: vec!["path".into()],
                timeout_secs: 5,
                allow: BTreeMap::new(),
            },
        )])
    }

    fn signed(key: &SigningKey, f: impl FnOnce(&mut ActionRequest)) -> SignedAction {
        let mut request = ActionRequest {
            run_id: "run-1".into(),
            audience: "me".into(),
            action: "echo".into(),
            params: BTreeMap::from([("path".into(), "/; rm -rf / $(id)".into())]),
            expires_at: 2_000,
            timeout_secs: 5,
        };
        f(&mut request);
        let signature = hex(&key.sign(&action_transcript(&request)).to_bytes());
        SignedAction { request, signature }
    }

    #[test]
    fn only_signed_fresh_requests_for_me_on_the_allow_list_run() {
        let dir = tempfile::tempdir().unwrap();
        let server = SigningKey::from_bytes(&[1; 32]);
        let pinned = server.verifying_key();
        let mut seen = Seen::load(dir.path().join("seen.json"));
        let ok = signed(&server, |_| {});
        let argv = admit(&ok, "me", &pinned, &allow(), &mut seen, 1_000)
            .unwrap()
            .argv;
        assert_eq!(
            argv,
            ["/bin/echo", "path=/; rm -rf / $(id)"],
            "values stay one inert argv element"
        );
        assert_eq!(
            admit(&ok, "me", &pinned, &allow(), &mut seen, 1_000),
            Err(Refused::Replayed("run-1".into()))
        );
        // Replays are remembered across restarts.
        let mut reloaded = Seen::load(dir.path().join("seen.json"));
        assert!(matches!(
            admit(&ok, "me", &pinned, &allow(), &mut reloaded, 1_000),
            Err(Refused::Replayed(_))
        ));

        let forged = signed(&SigningKey::from_bytes(&[2; 32]), |r| {
            r.run_id = "run-2".into()
        });
        assert_eq!(
            admit(&forged, "me", &pinned, &allow(), &mut seen, 1_000),
            Err(Refused::BadSignature)
        );
        let mut tampered = signed(&server, |r| r.run_id = "run-3".into());
        tampered
            .request
            .params
            .insert("path".into(), "/other".into());
        assert_eq!(
            admit(&tampered, "me", &pinned, &allow(), &mut seen, 1_000),
            Err(Refused::BadSignature)
        );
        let other = signed(&server, |r| {
            r.run_id = "run-4".into();
            r.audience = "you".into();
        });
        assert_eq!(
            admit(&other, "me", &pinned, &allow(), &mut seen, 1_000),
            Err(Refused::WrongAudience("you".into()))
        );
        let late = signed(&server, |r| r.run_id = "run-5".into());
        assert_eq!(
            admit(&late, "me", &pinned, &allow(), &mut seen, 3_000),
            Err(Refused::Expired)
        );
        let unknown = signed(&server, |r| {
            r.run_id = "run-6".into();
            r.action = "reboot".into();
        });
        assert_eq!(
            admit(&unknown, "me", &pinned, &allow(), &mut seen, 1_000),
            Err(Refused::NotAllowed("reboot".into()))
        );
        let extra = signed(&server, |r| {
            r.run_id = "run-7".into();
            r.params.insert("cmd".into(), "x".into());
        });
        assert!(matches!(
            admit(&extra, "me", &pinned, &allow(), &mut seen, 1_000),
            Err(Refused::UnknownParam { .. })
        ));
        let missing = signed(&server, |r| {
            r.run_id = "run-8".into();
            r.params.clear();
        });
        assert!(matches!(
            admit(&missing, "me", &pinned, &allow(), &mut seen, 1_000),
            Err(Refused::MissingParam { .. })
        ));
    }

    fn config(argv: &[&str], params: &[&str], allow: &str) -> ActionConfig {
        let text = format!(
            "argv = {}\nparams = {}\n{allow}",
            serde_json::to_string(argv).unwrap(),
            serde_json::to_string(params).unwrap()
        );
        toml::from_str(&text).unwrap()
    }

    fn values(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn values_beginning_with_a_dash_are_refused_unless_allowed() {
        let du = config(&["/usr/bin/du", "-sh", "{path}"], &["path"], "");
        assert_eq!(
            argv("du", &du, &values(&[("path", "--files0-from=/etc/shadow")])),
            Err(Refused::LeadingDash {
                action: "du".into(),
                param: "path".into()
            })
        );
        assert_eq!(
            argv("du", &du, &values(&[("path", "-")])).map_err(|e| e.code()),
            Err("leading_dash")
        );
        assert_eq!(
            argv("du", &du, &values(&[("path", "/var/log")])).unwrap(),
            ["/usr/bin/du", "-sh", "/var/log"]
        );
        let opted = config(
            &["/bin/echo", "{n}"],
            &["n"],
            "allow.n = { allow_leading_dash = true }",
        );
        assert_eq!(
            argv("echo", &opted, &values(&[("n", "-5")])).unwrap(),
            ["/bin/echo", "-5"]
        );
    }

    #[test]
    fn the_allow_list_constrains_each_value() {
        let c = config(
            &["/usr/sbin/service", "{name}", "{verb}"],
            &["name", "verb"],
            "[allow]\nname = { pattern = \"[a-z][a-z0-9-]*\" }\nverb = { one_of = [\"reload\", \"restart\"] }",
        );
        assert_eq!(
            argv("svc", &c, &values(&[("name", "nginx"), ("verb", "reload")])).unwrap(),
            ["/usr/sbin/service", "nginx", "reload"]
        );
        for bad in [
            values(&[("name", "nginx x"), ("verb", "reload")]),
            values(&[("name", "/etc"), ("verb", "reload")]),
            values(&[("name", "nginx"), ("verb", "stop")]),
        ] {
            let refused = argv("svc", &c, &bad).unwrap_err();
            assert_eq!(refused.code(), "value_not_allowed", "{bad:?}: {refused}");
        }
        // The anchor is the whole value: a match inside it is not enough.
        let refused = argv(
            "svc",
            &c,
            &values(&[("name", "ok\n/etc"), ("verb", "reload")]),
        );
        assert!(refused.is_err());
    }

    #[test]
    fn substitution_is_single_pass() {
        let c = config(
            &["/bin/echo", "{a}", "x={b}", "{a}{b}", "{c}", "{{a}}"],
            &["a", "b"],
            "",
        );
        let got = argv("echo", &c, &values(&[("a", "{b}"), ("b", "B{a}")])).unwrap();
        assert_eq!(
            got,
            ["/bin/echo", "{b}", "x=B{a}", "{b}B{a}", "{c}", "{{b}}"]
        );
    }

    #[test]
    fn the_agent_caps_the_timeout_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let server = SigningKey::from_bytes(&[1; 32]);
        let mut seen = Seen::load(dir.path().join("seen.json"));
        let long = signed(&server, |r| {
            r.run_id = "long".into();
            r.timeout_secs = 600;
            r.params = values(&[("path", "/")]);
        });
        let admitted = admit(
            &long,
            "me",
            &server.verifying_key(),
            &allow(),
            &mut seen,
            1_000,
        );
        assert_eq!(admitted.unwrap().timeout_secs, 5, "the local cap wins");
        let short = signed(&server, |r| {
            r.run_id = "short".into();
            r.timeout_secs = 2;
            r.params = values(&[("path", "/")]);
        });
        let admitted = admit(
            &short,
            "me",
            &server.verifying_key(),
            &allow(),
            &mut seen,
            1_000,
        );
        assert_eq!(
            admitted.unwrap().timeout_secs,
            2,
            "the action's, when shorter"
        );
    }

    #[test]
    fn refusals_say_what_kind_they_are() {
        let update = Refused::Replayed("r".into()).update("r".into());
        assert_eq!(update.state, ActionState::Refused);
        assert_eq!(update.refusal.as_deref(), Some("replayed"));
        assert!(update.output.contains("replay"));
    }

    /// The README's allow-list entry, as written, is safe.
    #[test]
    fn the_readme_flush_cache_example_refuses_dashed_values() {
        let readme = include_str!("../../../README.md");
        let block = readme
            .split("```toml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("[actions.flush-cache]"))
            .expect("README has the flush-cache allow-list entry");
        let config: crate::config::AgentConfig = toml::from_str(block).unwrap();
        let flush = &config.actions["flush-cache"];
        let ok = argv("flush-cache", flush, &values(&[("path", "/product")])).unwrap();
        assert_eq!(ok.last().map(String::as_str), Some("/product"));
        let dash = ok.iter().position(|e| e == "--");
        let ban = ok.iter().position(|e| e == "ban");
        assert!(
            dash.is_some() && dash < ban,
            "options end before the command: {ok:?}"
        );
        for bad in ["-S/etc/shadow", "--help", "/x y", "."] {
            assert!(
                argv("flush-cache", flush, &values(&[("path", bad)])).is_err(),
                "{bad} must be refused"
            );
        }
    }

    #[tokio::test]
    async fn runs_stream_output_and_can_be_cancelled() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (_keep, cancel) = oneshot::channel();
        let done = run(
            "r1".into(),
            vec!["/bin/echo".into(), "hello".into()],
            Duration::from_secs(5),
            tx,
            cancel,
        )
        .await;
        assert_eq!(
            (done.state, done.timeout_secs),
            (ActionState::Succeeded, Some(5)),
            "the outcome says it too: it may arrive first"
        );
        let started = rx.recv().await.unwrap();
        assert_eq!(
            (started.state, started.timeout_secs),
            (ActionState::Started, Some(5)),
            "the start reports the timeout applied"
        );
        let out = rx.recv().await.unwrap();
        assert_eq!(
            (out.state, out.output.as_str()),
            (ActionState::Output, "hello\n")
        );

        let (tx, _rx) = mpsc::unbounded_channel();
        let (stop, cancel) = oneshot::channel();
        let task = tokio::spawn(run(
            "r2".into(),
            vec!["/bin/sleep".into(), "30".into()],
            Duration::from_secs(20),
            tx,
            cancel,
        ));
        let _ = stop.send(());
        let done = task.await.unwrap();
        assert_eq!(done.state, ActionState::Cancelled);

        let (tx, _rx) = mpsc::unbounded_channel();
        let (_keep, cancel) = oneshot::channel();
        let done = run(
            "r3".into(),
            vec!["/bin/sleep".into(), "30".into()],
            Duration::from_millis(200),
            tx,
            cancel,
        )
        .await;
        assert_eq!(done.state, ActionState::TimedOut);

        let (tx, _rx) = mpsc::unbounded_channel();
        let (_keep, cancel) = oneshot::channel();
        let done = run(
            "r4".into(),
            vec!["/bin/false".into()],
            Duration::from_secs(5),
            tx,
            cancel,
        )
        .await;
        assert_eq!((done.state, done.exit_code), (ActionState::Failed, Some(1)));
    }
}
