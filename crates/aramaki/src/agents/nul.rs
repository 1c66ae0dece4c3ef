//! U+0000 in what an agent sends, before anything reaches the database.
//!
//! PostgreSQL TEXT cannot store NUL (the statement fails, and with it the
//! results writer's whole batch, other agents' records included); SQLite
//! would store it. So both behave the same, decided per field:
//!
//! - free text produced by programs (check output, action output, notice
//!   messages, fact values, metric units and thresholds) keeps its content
//!   with each NUL replaced by U+FFFD, counted in a metric;
//! - identifiers and names (check names, systems, label keys and values,
//!   sources, metric names, fact names, run ids) with a NUL refuse the
//!   record: it is acknowledged as refused, naming the field, so that the
//!   agent drops it instead of sending it forever.

use aramaki_protocol::agent::{ActionUpdate, CheckResult, Record, RecordBody, RecordRefusal};

/// What replaces a NUL in free text.
pub const REPLACEMENT: char = '\u{FFFD}';

/// Records ready for the database, and those refused.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub records: Vec<Record>,
    pub refused: Vec<RecordRefusal>,
    /// NUL characters replaced in free text.
    pub replaced: u64,
}

/// Replaces every NUL in `text`; returns how many there were.
pub fn replace(text: &mut String) -> u64 {
    let n = text.matches('\0').count() as u64;
    if n > 0 {
        *text = text.replace('\0', &REPLACEMENT.to_string());
    }
    n
}

/// Refuses a name holding NUL, naming `field`.
fn name(field: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        Err(field.to_owned())
    } else {
        Ok(())
    }
}

/// Sorts the records of one `records` message.
pub fn records(records: Vec<Record>) -> Cleaned {
    let mut out = Cleaned::default();
    for mut record in records {
        match body(&mut record.body) {
            Ok(replaced) => {
                out.replaced += replaced;
                out.records.push(record);
            }
            Err(field) => out.refused.push(RecordRefusal {
                seq: record.seq,
                message: format!(
                    "`{field}` contains a NUL character (U+0000), which is not allowed in a name; the record is not stored"
                ),
                field,
            }),
        }
    }
    out
}

/// Cleans one record body: the count of NULs replaced, or the field that
/// refuses it.
fn body(body: &mut RecordBody) -> Result<u64, String> {
    match body {
        RecordBody::Result(result) | RecordBody::Pushed { result, .. } => check_result(result),
        RecordBody::Dropped { .. } => Ok(0),
        RecordBody::Facts { facts } => {
            let mut n = 0;
            for (key, value) in facts.iter_mut() {
                name("facts", key)?;
                n += replace(value);
            }
            Ok(n)
        }
        RecordBody::Action(update) => action(update),
        RecordBody::Notice { message, .. } => Ok(replace(message)),
    }
}

fn check_result(result: &mut CheckResult) -> Result<u64, String> {
    name("check", &result.check)?;
    if let Some(system) = &result.system {
        name("system", system)?;
    }
    name("source", &result.source)?;
    for (key, value) in &result.labels {
        name("labels", key)?;
        name(&format!("labels.{key}"), value)?;
    }
    let mut n = replace(&mut result.output);
    for (i, metric) in result.metrics.iter_mut().enumerate() {
        name(&format!("metrics[{i}].name"), &metric.name)?;
        n += replace(&mut metric.unit);
        for text in [&mut metric.warn, &mut metric.crit].into_iter().flatten() {
            n += replace(text);
        }
    }
    Ok(n)
}

/// Cleans an action update (queued outcome or live output).
pub fn action(update: &mut ActionUpdate) -> Result<u64, String> {
    name("run_id", &update.run_id)?;
    let mut n = replace(&mut update.output);
    if let Some(code) = &mut update.refusal {
        n += replace(code);
    }
    Ok(n)
}

/// The first field of a handshake message holding a NUL, if any.
pub fn in_message(message: &aramaki_protocol::agent::AgentMessage) -> Option<String> {
    let value = serde_json::to_value(message).ok()?;
    crate::input::nul_path(&value, &mut String::new())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn result(check: &str, output: &str) -> Record {
        Record {
            seq: 1,
            body: RecordBody::Result(CheckResult {
                check: check.into(),
                system: None,
                labels: BTreeMap::new(),
                status: 0,
                output: output.into(),
                metrics: vec![],
                executed_at: 0,
                duration_ms: 0,
                source: "check".into(),
            }),
        }
    }

    #[test]
    fn free_text_is_kept_with_nul_replaced() {
        let out = records(vec![result("disk", "a\0b\0")]);
        assert!(out.refused.is_empty());
        assert_eq!(out.replaced, 2);
        let RecordBody::Result(r) = &out.records[0].body else {
            panic!("a result")
        };
        assert_eq!(r.output, "a\u{FFFD}b\u{FFFD}");
    }

    #[test]
    fn a_name_with_nul_refuses_only_its_record() {
        let mut labelled = result("disk", "ok");
        if let RecordBody::Result(r) = &mut labelled.body {
            r.labels.insert("mount".into(), "/\0".into());
        }
        labelled.seq = 2;
        let out = records(vec![result("di\0sk", "ok"), labelled, result("load", "ok")]);
        assert_eq!(out.records.len(), 1);
        let fields: Vec<(u64, &str)> = out
            .refused
            .iter()
            .map(|r| (r.seq, r.field.as_str()))
            .collect();
        assert_eq!(fields, vec![(1, "check"), (2, "labels.mount")]);
        assert!(out.refused[0].message.contains("NUL"));
    }
}
