//! The local push API for scripts, compatible with what Sensu users have:
//! `POST /events` with Sensu Go's event JSON on 127.0.0.1:3031, and Sensu
//! 1.x's JSON result socket on 127.0.0.1:3030. Both answer only after the
//! result is in the disk queue, so an accepted result is never lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use aramaki_protocol::agent::{CheckResult, RecordBody};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::runtime::Shared;

/// Largest request accepted.
const MAX_BODY: usize = 1024 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A pushed result that does not fit, with the reason.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

fn field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn check_name(name: &str) -> Result<String, Rejected> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(Rejected(format!(
            "check name '{name}' must be 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Names (the system, label keys and values) may not hold U+0000: the
/// server could not store the result. The output may; the server keeps it
/// with the NUL replaced.
fn names_without_nul(result: CheckResult) -> Result<CheckResult, Rejected> {
    let nul = |field: String| {
        Rejected(format!(
            "{field} contains a NUL character (U+0000), which is not allowed"
        ))
    };
    if result.system.as_deref().is_some_and(|s| s.contains('\0')) {
        return Err(nul("the system name".into()));
    }
    for (key, value) in &result.labels {
        if key.contains('\0') {
            return Err(nul("a label name".into()));
        }
        if value.contains('\0') {
            return Err(nul(format!("label '{key}'")));
        }
    }
    Ok(result)
}

fn status_of(v: Option<&Value>) -> Result<i32, Rejected> {
    match v {
        None => Ok(0),
        Some(s) => s
            .as_i64()
            .and_then(|s| i32::try_from(s).ok())
            .ok_or_else(|| Rejected("status must be an integer exit code".into())),
    }
}

fn now_micros() -> i64 {
    jiff::Timestamp::now().as_microsecond()
}

/// Sensu Go's event: `{"entity": {...}, "check": {"metadata": {"name", "labels"}, "status", "output", "executed", "duration"}}`.
/// A different `entity.metadata.name` names the system (a proxy result).
pub fn from_sensu_go(body: &[u8]) -> Result<CheckResult, Rejected> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| Rejected(format!("the body is not JSON: {e}")))?;
    let check = v
        .get("check")
        .ok_or_else(|| Rejected("a Sensu event needs a 'check' object".into()))?;
    let name = field(check, &["metadata", "name"])
        .and_then(Value::as_str)
        .ok_or_else(|| Rejected("check.metadata.name is missing".into()))?;
    let labels: BTreeMap<String, String> = field(check, &["metadata", "labels"])
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let executed = check
        .get("executed")
        .and_then(Value::as_i64)
        .filter(|s| *s > 0)
        .map(|s| s.saturating_mul(1_000_000))
        .unwrap_or_else(now_micros);
    let duration_ms = check
        .get("duration")
        .and_then(Value::as_f64)
        .map(|d| (d * 1000.0).max(0.0) as u64)
        .unwrap_or(0);
    let output = check
        .get("output")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let system = field(&v, &["entity", "metadata", "name"])
        .and_then(Value::as_str)
        .map(str::to_owned);
    names_without_nul(CheckResult {
        check: check_name(name)?,
        system,
        labels,
        status: status_of(check.get("status"))?,
        metrics: crate::nagios::parse(&output).metrics,
        output,
        executed_at: executed,
        duration_ms,
        source: "push".to_owned(),
    })
}

/// Longest ttl accepted (one week), as for check definitions.
const MAX_TTL: u64 = 7 * 24 * 3600;

/// A `ttl` in seconds: absent or 0 means none (as in Sensu).
fn ttl_of(v: Option<&Value>) -> Result<Option<u32>, Rejected> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(t) => match t.as_u64() {
            Some(0) => Ok(None),
            Some(secs) if secs <= MAX_TTL => Ok(u32::try_from(secs).ok()),
            _ => Err(Rejected(format!(
                "ttl must be a whole number of seconds from 0 to {MAX_TTL}, got {t}"
            ))),
        },
    }
}

/// The record for a pushed result: with a ttl, the server expects the
/// next result of the check within that many seconds (a dead-man's switch).
fn record_of(result: CheckResult, ttl: Option<u32>) -> RecordBody {
    match ttl {
        Some(ttl_secs) => RecordBody::Pushed { result, ttl_secs },
        None => RecordBody::Result(result),
    }
}

/// [`from_sensu_go`] with the event's `check.ttl`.
pub fn sensu_go_record(body: &[u8]) -> Result<RecordBody, Rejected> {
    let result = from_sensu_go(body)?;
    let v: Value = serde_json::from_slice(body).map_err(|e| Rejected(e.to_string()))?;
    let ttl = ttl_of(field(&v, &["check", "ttl"]))?;
    Ok(record_of(result, ttl))
}

/// [`from_sensu_1`] with the result's `ttl`.
pub fn sensu_1_record(body: &[u8]) -> Result<RecordBody, Rejected> {
    let result = from_sensu_1(body)?;
    let v: Value = serde_json::from_slice(body).map_err(|e| Rejected(e.to_string()))?;
    let ttl = ttl_of(v.get("ttl"))?;
    Ok(record_of(result, ttl))
}

/// Sensu 1.x's result: `{"name": "...", "status": 1, "output": "..."}`,
/// optionally with `"source"` naming another system.
pub fn from_sensu_1(body: &[u8]) -> Result<CheckResult, Rejected> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Rejected(format!("not JSON: {e}")))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| Rejected("'name' is missing".into()))?;
    let output = v
        .get("output")
        .and_then(Value::as_str)
        .ok_or_else(|| Rejected("'output' is missing".into()))?
        .to_owned();
    names_without_nul(CheckResult {
        check: check_name(name)?,
        system: v.get("source").and_then(Value::as_str).map(str::to_owned),
        labels: BTreeMap::new(),
        status: status_of(v.get("status"))?,
        metrics: crate::nagios::parse(&output).metrics,
        output,
        executed_at: now_micros(),
        duration_ms: 0,
        source: "push".to_owned(),
    })
}

/// Serves the HTTP push API until the task is dropped.
pub async fn serve_http(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = http_connection(stream, shared).await {
                tracing::debug!(error = %e, "push API connection ended");
            }
        });
    }
}

async fn http_connection(mut stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let (status, message) =
        match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream, &mut buf)).await {
            Err(_) => (408, "request timed out".to_owned()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(Err((status, message)))) => (status, message),
            Ok(Ok(Ok(body))) => match sensu_go_record(&body) {
                Err(e) => (400, e.0),
                Ok(record) => match shared.push(vec![record]).await {
                    Ok(seqs) => (
                        202,
                        format!("queued as #{}", seqs.first().copied().unwrap_or(0)),
                    ),
                    Err(e) => (503, format!("cannot queue the result: {e}")),
                },
            },
        };
    let reason = match status {
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        _ => "Service Unavailable",
    };
    let body = serde_json::json!({ "message": message }).to_string();
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

type HttpOutcome = Result<Vec<u8>, (u16, String)>;

/// Reads one request; answers the body of a `POST /events`.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<HttpOutcome> {
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err((400, "incomplete request".into())));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => continue,
            Ok(httparse::Status::Partial) => return Ok(Err((413, "headers too large".into()))),
            Err(e) => return Ok(Err((400, format!("malformed request: {e}")))),
        };
        if req.path != Some("/events") {
            return Ok(Err((404, "the push API has only POST /events".into())));
        }
        if req.method != Some("POST") {
            return Ok(Err((405, "use POST /events".into())));
        }
        let length = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        let Some(length) = length else {
            return Ok(Err((400, "content-length is required".into())));
        };
        if length > MAX_BODY {
            return Ok(Err((
                413,
                format!("the body is larger than {MAX_BODY} bytes"),
            )));
        }
        while buf.len() < head_len + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(Err((400, "the body is shorter than content-length".into())));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Ok(Ok(buf[head_len..head_len + length].to_vec()));
    }
}

/// Serves the Sensu 1.x socket: one JSON result per connection, answered
/// `ok` once queued or `invalid` with the reason.
pub async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = tcp_connection(stream, shared).await {
                tracing::debug!(error = %e, "push socket connection ended");
            }
        });
    }
}

async fn tcp_connection(mut stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // A client may keep the socket open after writing: stop once the JSON
    // object is complete.
    let answer = loop {
        let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk)).await;
        let n = match read {
            Err(_) => break "invalid: timed out waiting for a result".to_owned(),
            Ok(r) => r?,
        };
        buf.extend_from_slice(&chunk[..n]);
        let complete = serde_json::from_slice::<Value>(&buf).is_ok();
        if n == 0 || complete || buf.len() > MAX_BODY {
            break match sensu_1_record(&buf) {
                Err(e) => format!("invalid: {e}"),
                Ok(record) => match shared.push(vec![record]).await {
                    Ok(_) => "ok".to_owned(),
                    Err(e) => format!("invalid: cannot queue the result: {e}"),
                },
            };
        }
    };
    stream.write_all(answer.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensu_go_events_become_results() {
        let body = br#"{"entity":{"metadata":{"name":"db-1"}},
            "check":{"metadata":{"name":"backup","labels":{"kind":"nightly"}},
            "status":2,"output":"BACKUP CRITICAL - 3 days old|age=259200s;86400;172800","executed":1700000000,"duration":1.5}}"#;
        let r = from_sensu_go(body).unwrap();
        assert_eq!(r.check, "backup");
        assert_eq!(r.system.as_deref(), Some("db-1"));
        assert_eq!(r.status, 2);
        assert_eq!(r.labels.get("kind").map(String::as_str), Some("nightly"));
        assert_eq!(r.executed_at, 1_700_000_000_000_000);
        assert_eq!(r.duration_ms, 1500);
        assert_eq!(r.metrics.len(), 1);
        assert_eq!(r.source, "push");
    }

    #[test]
    fn bad_events_say_what_is_wrong() {
        assert!(from_sensu_go(b"nope").unwrap_err().0.contains("not JSON"));
        assert!(from_sensu_go(b"{}").unwrap_err().0.contains("'check'"));
        assert!(from_sensu_go(br#"{"check":{"metadata":{}}}"#)
            .unwrap_err()
            .0
            .contains("name"));
        assert!(from_sensu_go(br#"{"check":{"metadata":{"name":"a b"}}}"#).is_err());
        assert!(from_sensu_go(br#"{"check":{"metadata":{"name":"a"},"status":"x"}}"#).is_err());
    }

    #[test]
    fn a_nul_in_a_name_is_refused_and_kept_in_the_output() {
        let err = from_sensu_go(
            br#"{"entity":{"metadata":{"name":"db\u0000-1"}},"check":{"metadata":{"name":"backup"},"output":"x"}}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("the system name contains a NUL"), "{err}");
        let err = from_sensu_go(
            br#"{"check":{"metadata":{"name":"backup","labels":{"env":"a\u0000b"}},"output":"x"}}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("label 'env' contains a NUL"), "{err}");
        let err = from_sensu_go(
            br#"{"check":{"metadata":{"name":"backup","labels":{"e\u0000nv":"a"}},"output":"x"}}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("a label name contains a NUL"), "{err}");
        assert!(
            from_sensu_go(br#"{"check":{"metadata":{"name":"back\u0000up"},"output":"x"}}"#)
                .unwrap_err()
                .0
                .contains("must be 1 to 64")
        );
        let err =
            from_sensu_1(br#"{"name":"cron","source":"web\u0000","output":"x"}"#).unwrap_err();
        assert!(err.0.contains("the system name contains a NUL"), "{err}");
        // Output is free text: kept, the server replaces the NUL.
        let r = from_sensu_1(br#"{"name":"cron","status":0,"output":"a\u0000b"}"#).unwrap();
        assert_eq!(r.output, "a\0b");
    }

    #[test]
    fn sensu_1_results_become_results() {
        let r = from_sensu_1(br#"{"name":"cron-job","status":1,"output":"late"}"#).unwrap();
        assert_eq!(
            (r.check.as_str(), r.status, r.output.as_str()),
            ("cron-job", 1, "late")
        );
        assert!(from_sensu_1(br#"{"status":1,"output":"x"}"#).is_err());
        assert!(from_sensu_1(br#"{"name":"x","status":1}"#).is_err());
    }

    #[test]
    fn a_ttl_makes_a_dead_mans_switch() {
        let go = br#"{"check":{"metadata":{"name":"backup"},"status":0,"output":"ok","ttl":90}}"#;
        let RecordBody::Pushed { result, ttl_secs } = sensu_go_record(go).unwrap() else {
            panic!("a ttl gives a pushed record");
        };
        assert_eq!((result.check.as_str(), ttl_secs), ("backup", 90));
        let one = br#"{"name":"cron","status":0,"output":"ok","ttl":30}"#;
        assert!(matches!(
            sensu_1_record(one).unwrap(),
            RecordBody::Pushed { ttl_secs: 30, .. }
        ));
        for none in [
            &br#"{"name":"cron","status":0,"output":"ok"}"#[..],
            br#"{"name":"cron","status":0,"output":"ok","ttl":0}"#,
        ] {
            assert!(matches!(
                sensu_1_record(none).unwrap(),
                RecordBody::Result(_)
            ));
        }
        for bad in ["-5", "\"30\"", "1.5", "999999999"] {
            let body = format!(r#"{{"name":"cron","status":0,"output":"ok","ttl":{bad}}}"#);
            let err = sensu_1_record(body.as_bytes()).unwrap_err();
            assert!(err.0.contains("ttl must be"), "{bad}: {err}");
        }
    }
}
