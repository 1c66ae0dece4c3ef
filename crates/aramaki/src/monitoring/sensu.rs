//! `aramaki import sensu FILE`: turns the CheckConfig resources of a
//! `sensuctl dump` into [`CheckSpec`]s, without touching a database.
//!
//! Nothing in the dump is lost quietly: whatever has no Aramaki equivalent is
//! listed in [`Import::unmapped`], other resource types in [`Import::skipped`],
//! and checks that cannot be expressed in [`Import::errors`]. Fields that sit at
//! Sensu's zero value (`null`, `false`, `0`, `""`, `[]`, `{}`) carry no
//! information and are not listed, or every check would list a dozen of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::{Map, Value};
// yaml-rust2: pure, safe Rust, maintained, few dependencies, and it loads
// multi-document streams with line numbers in its errors. serde_yaml is
// deprecated and its forks wrap a C-to-Rust translation of libyaml.
use yaml_rust2::{Yaml, YamlLoader};

use crate::monitoring::checks::{validate_name, CheckSpec};
use crate::systems::model::{check_label_key, check_label_value, Labels, Slug};

/// The dump cannot be read at all; names the document so the user can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SensuError {
    #[error("document {document} (line {line}): not valid YAML: {message}")]
    Yaml {
        document: usize,
        line: usize,
        message: String,
    },
    #[error("document {document} (line {line}, column {column}): not valid JSON: {message}")]
    Json {
        document: usize,
        line: usize,
        column: usize,
        message: String,
    },
    /// `line` is where the document starts (for an item of a list, where the
    /// list starts).
    #[error("document {document} (line {line}): not a Sensu resource: {reason}")]
    NotSensu {
        document: usize,
        line: usize,
        reason: String,
    },
    #[error("no Sensu resources found: expected `sensuctl dump` output in YAML or wrapped JSON")]
    Empty,
}

/// Everything read from a dump, ready for [`plan`] and [`report`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Import {
    pub checks: Vec<ImportedCheck>,
    pub skipped: Vec<Skipped>,
    pub unmapped: Vec<Unmapped>,
    /// Checks that could not be imported, each starting with its resource.
    pub errors: Vec<String>,
}

/// One CheckConfig turned into a spec that passes [`CheckSpec::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedCheck {
    /// Such as `CheckConfig default/check-cpu`.
    pub source: String,
    /// The Sensu namespace it came from (Aramaki has none).
    pub namespace: String,
    pub spec: CheckSpec,
    /// What changed on the way and why.
    pub notes: Vec<String>,
}

/// A resource of another type than CheckConfig, which is not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The Sensu type, such as `Handler`.
    pub kind: String,
    /// `namespace/name`, or only the name for cluster-wide resources.
    pub name: String,
}

/// A field of an imported resource that has no Aramaki equivalent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmapped {
    /// Such as `CheckConfig default/check-cpu`.
    pub resource: String,
    /// Path in the resource, such as `spec.handlers`.
    pub field: String,
    /// The value, shortened for the report.
    pub value: String,
    pub why: String,
}

/// What applying an import would do to one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Create(String),
    Update { name: String, fields: Vec<String> },
    Unchanged(String),
}

impl Change {
    fn name(&self) -> &str {
        match self {
            Change::Create(n) | Change::Unchanged(n) => n,
            Change::Update { name, .. } => name,
        }
    }
}

/// Reads a `sensuctl dump` in YAML (`---`-separated documents) or wrapped
/// JSON (objects one after another, or a JSON array of them).
pub fn parse_dump(text: &str) -> Result<Import, SensuError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let docs = if text.trim_start().starts_with(['{', '[']) {
        read_json(text)?
    } else {
        read_yaml(text)?
    };
    let mut resources = Vec::new();
    for doc in docs {
        resources.push(Resource::from_doc(doc)?);
    }
    if resources.is_empty() {
        return Err(SensuError::Empty);
    }

    let mut import = Import::default();
    let mut checks = Vec::new();
    for r in resources {
        if r.kind == "CheckConfig" {
            checks.push(r);
        } else {
            import.skipped.push(Skipped {
                name: r.display_name(),
                kind: r.kind,
            });
        }
    }

    let names = assign_names(&checks);
    let mut taken: BTreeMap<String, String> = BTreeMap::new();
    for (r, naming) in checks.iter().zip(names) {
        let source = r.source();
        let result = naming.and_then(|(name, note)| {
            if let Some(first) = taken.get(&name) {
                return Err(format!("the name '{name}' is already taken by {first}"));
            }
            convert(r, &source, name, note, &mut import.unmapped)
        });
        match result {
            Ok(check) => {
                taken.insert(check.spec.name.clone(), source);
                import.checks.push(check);
            }
            Err(e) => import.errors.push(format!("{source}: {e}")),
        }
    }
    Ok(import)
}

/// Compares imported checks with the ones Aramaki has, by name. All fields
/// are compared, so an update would also reset what was tuned in Aramaki
/// since (such as `occurrences`); existing checks missing from the import are
/// left alone and not listed.
pub fn plan(existing: &[CheckSpec], import: &Import) -> Vec<Change> {
    import
        .checks
        .iter()
        .map(|c| match existing.iter().find(|e| e.name == c.spec.name) {
            None => Change::Create(c.spec.name.clone()),
            Some(old) => {
                // The server shows secrets only as `(set)`: compare like with like.
                let fields = differing_fields(&old.redacted(), &c.spec.redacted());
                if fields.is_empty() {
                    Change::Unchanged(c.spec.name.clone())
                } else {
                    Change::Update {
                        name: c.spec.name.clone(),
                        fields,
                    }
                }
            }
        })
        .collect()
}

/// A text report for the terminal: the plan with each check's notes, then
/// unmapped fields, skipped resources and errors.
pub fn report(import: &Import, plan: &[Change], dry_run: bool) -> String {
    let count = |f: fn(&Change) -> bool| plan.iter().filter(|c| f(c)).count();
    let (creates, updates, same) = (
        count(|c| matches!(c, Change::Create(_))),
        count(|c| matches!(c, Change::Update { .. })),
        count(|c| matches!(c, Change::Unchanged(_))),
    );
    let mut out = String::new();
    let (head, create, update) = if dry_run {
        (
            "Sensu import (dry run: nothing was changed)",
            "would create",
            "would update",
        )
    } else {
        ("Sensu import", "created", "updated")
    };
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{head}");
    let _ = writeln!(
        out,
        "{} checks read: {creates} {create}, {updates} {update}, {same} unchanged; {} not imported; {} resources skipped",
        import.checks.len(),
        import.errors.len(),
        import.skipped.len()
    );

    if !import.checks.is_empty() {
        let _ = writeln!(out, "\nChecks:");
        for c in &import.checks {
            let change = plan.iter().find(|p| p.name() == c.spec.name);
            let (what, fields) = match change {
                Some(Change::Create(_)) => (create, String::new()),
                Some(Change::Update { fields, .. }) => {
                    (update, format!(" ({})", fields.join(", ")))
                }
                Some(Change::Unchanged(_)) => ("unchanged", String::new()),
                None => ("not planned", String::new()),
            };
            let _ = writeln!(
                out,
                "  {what:<12} {:<28} from {}{fields}",
                c.spec.name, c.source
            );
            for note in &c.notes {
                let _ = writeln!(out, "      note: {note}");
            }
        }
    }

    if !import.unmapped.is_empty() {
        let _ = writeln!(
            out,
            "\nSensu fields not carried over (fields at Sensu's defaults are not listed):"
        );
        let mut last = "";
        for u in &import.unmapped {
            if u.resource != last {
                let _ = writeln!(out, "  {}", u.resource);
                last = &u.resource;
            }
            let _ = writeln!(out, "      {} = {}  ({})", u.field, u.value, u.why);
        }
    }

    if !import.skipped.is_empty() {
        let _ = writeln!(out, "\nSkipped resources (only CheckConfig is imported):");
        for s in &import.skipped {
            let _ = writeln!(out, "  {} {}", s.kind, s.name);
        }
    }

    if !import.errors.is_empty() {
        let _ = writeln!(out, "\nNot imported:");
        for e in &import.errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    out
}

/// One top-level document (or one item of a top-level list) and where it is.
struct Doc {
    document: usize,
    line: usize,
    value: Value,
}

/// Splits YAML at `---` lines itself, so each document is numbered and an
/// error names the document it is in.
fn read_yaml(text: &str) -> Result<Vec<Doc>, SensuError> {
    let mut chunks: Vec<(usize, String)> = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        match chunks.last_mut() {
            Some((_, chunk)) if !marker => chunk.push_str(line),
            _ => chunks.push((i + 1, line.to_owned())),
        }
    }
    let mut docs = Vec::new();
    let mut document = 0;
    for (start, chunk) in chunks {
        if chunk.lines().all(is_blank_yaml_line) {
            continue;
        }
        document += 1;
        let loaded = YamlLoader::load_from_str(&chunk).map_err(|e| SensuError::Yaml {
            document,
            line: start + e.marker().line().saturating_sub(1),
            message: e.info().to_owned(),
        })?;
        let line = start
            + chunk
                .lines()
                .position(|l| !is_blank_yaml_line(l))
                .unwrap_or(0);
        for yaml in loaded {
            push_doc(&mut docs, document, line, yaml_to_json(yaml));
        }
    }
    Ok(docs)
}

/// Lines that hold no content: blank, comments, bare markers, directives.
fn is_blank_yaml_line(line: &str) -> bool {
    let t = line.trim();
    t.is_empty()
        || t.starts_with('#')
        || t == "---"
        || t == "..."
        || line.starts_with('%')
        || line
            .strip_prefix("---")
            .is_some_and(|rest| rest.trim_start().starts_with('#'))
}

/// A top-level list holds several resources; `null` documents hold none.
fn push_doc(docs: &mut Vec<Doc>, document: usize, line: usize, value: Value) {
    match value {
        Value::Null => {}
        Value::Array(items) => docs.extend(items.into_iter().map(|value| Doc {
            document,
            line,
            value,
        })),
        value => docs.push(Doc {
            document,
            line,
            value,
        }),
    }
}

fn yaml_to_json(yaml: Yaml) -> Value {
    match yaml {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Value::String(s), Value::Number),
        Yaml::Integer(i) => Value::from(i),
        Yaml::String(s) => Value::String(s),
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Array(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Yaml::Hash(hash) => Value::Object(
            hash.into_iter()
                .map(|(k, v)| {
                    let key = match yaml_to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

/// Wrapped JSON: any number of values back to back, each an object or a
/// list of objects.
fn read_json(text: &str) -> Result<Vec<Doc>, SensuError> {
    let mut docs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let mut document = 0;
    loop {
        let rest = text.get(stream.byte_offset()..).unwrap_or("");
        let start = text.len() - rest.trim_start().len();
        let line = 1 + text.get(..start).unwrap_or("").matches('\n').count();
        match stream.next() {
            None => break,
            Some(Ok(value)) => {
                document += 1;
                push_doc(&mut docs, document, line, value);
            }
            Some(Err(e)) => {
                let message = e.to_string();
                let suffix = format!(" at line {} column {}", e.line(), e.column());
                return Err(SensuError::Json {
                    document: document + 1,
                    line: e.line(),
                    column: e.column(),
                    message: message.strip_suffix(&suffix).unwrap_or(&message).to_owned(),
                });
            }
        }
    }
    Ok(docs)
}

/// A Sensu resource: `{type, api_version, metadata, spec}`.
struct Resource {
    kind: String,
    api_version: Option<String>,
    metadata: Map<String, Value>,
    spec: Map<String, Value>,
    /// Top-level fields besides the four above.
    extra: Map<String, Value>,
}

impl Resource {
    fn from_doc(doc: Doc) -> Result<Resource, SensuError> {
        let not_sensu = |reason: String| SensuError::NotSensu {
            document: doc.document,
            line: doc.line,
            reason,
        };
        let Value::Object(mut top) = doc.value else {
            return Err(not_sensu(format!(
                "expected a mapping with type, api_version, metadata and spec, got {}",
                short(&doc.value)
            )));
        };
        let kind = match top.remove("type") {
            Some(Value::String(k)) if !k.trim().is_empty() => k,
            Some(other) => return Err(not_sensu(format!("'type' is {}", short(&other)))),
            None => return Err(not_sensu("it has no 'type'".into())),
        };
        let mut spec = match top.remove("spec") {
            Some(Value::Object(s)) => s,
            Some(other) => return Err(not_sensu(format!("'spec' of {kind} is {}", short(&other)))),
            None => return Err(not_sensu(format!("{kind} has no 'spec'"))),
        };
        let api_version = match top.remove("api_version") {
            None | Some(Value::Null) => None,
            Some(Value::String(v)) => Some(v),
            Some(other) => return Err(not_sensu(format!("'api_version' is {}", short(&other)))),
        };
        // Older dumps keep the metadata inside the spec; prefer the outer one.
        let inner = spec.remove("metadata");
        let metadata = match top.remove("metadata").or(inner.clone()) {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => return Err(not_sensu(format!("'metadata' is {}", short(&other)))),
        };
        if let Some(inner) = inner {
            if inner != Value::Object(metadata.clone()) {
                spec.insert("metadata".into(), inner);
            }
        }
        Ok(Resource {
            kind,
            api_version,
            metadata,
            spec,
            extra: top,
        })
    }

    fn name(&self) -> Option<&str> {
        self.metadata
            .get("name")
            .or_else(|| self.spec.get("name"))
            .and_then(Value::as_str)
    }

    /// Sensu fills in `default` when a namespaced resource names none.
    fn namespace(&self) -> &str {
        self.metadata
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    }

    fn display_name(&self) -> String {
        let name = self.name().unwrap_or("(unnamed)");
        match self.metadata.get("namespace").and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
            _ => name.to_owned(),
        }
    }

    fn source(&self) -> String {
        format!(
            "{} {}/{}",
            self.kind,
            self.namespace(),
            self.name().unwrap_or("(unnamed)")
        )
    }
}

/// Makes a Sensu name fit [`validate_name`]: lowercase, anything else
/// becomes `-`, leading punctuation dropped, at most 64 characters.
fn sanitize_name(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    mapped
        .trim_start_matches(['-', '_', '.'])
        .chars()
        .take(64)
        .collect()
}

type Naming = Result<(String, Option<String>), String>;

/// Aramaki has no namespaces: a name used in several Sensu namespaces gets
/// the namespace as prefix, on every check that shares it, so none of them
/// silently wins.
fn assign_names(checks: &[Resource]) -> Vec<Naming> {
    let mut spaces: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for r in checks {
        if let Some(raw) = r.name() {
            spaces
                .entry(sanitize_name(raw))
                .or_default()
                .insert(r.namespace());
        }
    }
    checks
        .iter()
        .map(|r| {
            let raw = r.name().ok_or("it has no metadata.name")?;
            let base = sanitize_name(raw);
            let shared = spaces.get(&base).filter(|s| s.len() > 1);
            let (name, note) = match shared {
                Some(namespaces) => {
                    let name = sanitize_name(&format!("{}-{raw}", r.namespace()));
                    let list: Vec<&str> = namespaces.iter().copied().collect();
                    let note = format!(
                        "named '{name}': namespaces {} each have a check '{base}'",
                        list.join(", ")
                    );
                    (name, Some(note))
                }
                None if base != raw => (
                    base.clone(),
                    Some(format!(
                        "renamed from '{raw}' to '{base}': check names use a-z, 0-9, '-', '_' and '.'"
                    )),
                ),
                None => (base, None),
            };
            validate_name(&name).map_err(|e| e.message)?;
            Ok((name, note))
        })
        .collect()
}

/// Collects what a resource has that Aramaki does not take.
struct Leftovers<'a> {
    resource: &'a str,
    list: &'a mut Vec<Unmapped>,
}

impl Leftovers<'_> {
    fn add(&mut self, field: &str, value: &Value, why: &str) {
        self.list.push(Unmapped {
            resource: self.resource.to_owned(),
            field: field.to_owned(),
            value: short(value),
            why: why.to_owned(),
        });
    }

    /// Lists a field whose value must not be printed, showing `shown`.
    fn add_withheld(&mut self, field: &str, shown: &str, why: &str) {
        self.list.push(Unmapped {
            resource: self.resource.to_owned(),
            field: field.to_owned(),
            value: shown.to_owned(),
            why: why.to_owned(),
        });
    }

    /// Lists a field unless it holds Sensu's zero value.
    fn unless_default(&mut self, field: &str, value: &Value) {
        if !is_zero(value) {
            self.add(field, value, why_unmapped(field));
        }
    }
}

fn why_unmapped(field: &str) -> &'static str {
    match field {
        "spec.handlers" => "Sensu handlers are not imported",
        "spec.high_flap_threshold" | "spec.low_flap_threshold" => {
            "Aramaki has no flap detection yet"
        }
        "spec.runtime_assets" => "Aramaki has no assets: install the plugin on the agents' hosts",
        "spec.check_hooks" => "Aramaki has no check hooks",
        "spec.stdin" => "Aramaki agents do not write the event to the check's standard input",
        "spec.output_metric_format"
        | "spec.output_metric_handlers"
        | "spec.output_metric_tags"
        | "spec.output_metric_thresholds" => "Aramaki does not extract metrics from check output",
        "spec.round_robin" => "Aramaki has no round-robin scheduling",
        "spec.proxy_requests" => "Aramaki has no proxy requests: a check names one system instead",
        "spec.silenced" => "silences are not imported",
        "spec.subdue" => "Aramaki has no subdue windows",
        "spec.pipelines" => "Aramaki has no pipelines",
        "spec.secrets" => "Aramaki has no secrets provider for checks",
        "spec.scheduler" => "Sensu-internal",
        "spec.discard_output" => "Aramaki keeps output up to the output limit",
        "spec.metadata" => "differs from the resource's metadata",
        "metadata.created_by" => "Sensu bookkeeping",
        "api_version" => "not core/v2",
        _ => "unknown to this importer",
    }
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// A value as compact JSON, cut to fit on a report line.
fn short(v: &Value) -> String {
    let full = v.to_string();
    if full.chars().count() <= 60 {
        full
    } else {
        let cut: String = full.chars().take(57).collect();
        format!("{cut}…")
    }
}

/// Strings as they are, numbers and booleans written out.
fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn take(map: &mut Map<String, Value>, key: &str) -> Option<Value> {
    map.remove(key).filter(|v| !v.is_null())
}

fn take_u32(map: &mut Map<String, Value>, key: &str) -> Result<Option<u32>, String> {
    match take(map, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "spec.{key} must be a whole number of seconds, got {}",
                    short(&v)
                )
            }),
    }
}

/// Longest ttl Aramaki accepts (one week), as in `CheckSpec::validate`.
const MAX_TTL: u32 = 7 * 24 * 3600;

fn convert(
    r: &Resource,
    source: &str,
    name: String,
    rename: Option<String>,
    unmapped: &mut Vec<Unmapped>,
) -> Result<ImportedCheck, String> {
    let mut left = Leftovers {
        resource: source,
        list: unmapped,
    };
    let mut notes: Vec<String> = rename.into_iter().collect();
    let mut spec = r.spec.clone();
    let mut meta = r.metadata.clone();

    if let Some(v) = r.api_version.as_deref().filter(|v| *v != "core/v2") {
        left.add(
            "api_version",
            &Value::String(v.to_owned()),
            why_unmapped("api_version"),
        );
    }
    for (k, v) in &r.extra {
        left.unless_default(k, v);
    }

    // Command: argv when /bin/sh would only split words and drop quotes.
    let command = match take(&mut spec, "command") {
        Some(Value::String(c)) if !c.trim().is_empty() => c,
        Some(other) if !is_zero(&other) => {
            return Err(format!("spec.command is {}, not a string", short(&other)))
        }
        _ => return Err("it has no command".into()),
    };
    if command.contains("{{") {
        // Run as written, the tokens would reach /bin/sh as a pipeline
        // (`{{ .labels.x | default 80 }}`): refused, never run wrong.
        return Err(
            "the command uses Sensu token substitution ({{ … }}), which Aramaki does not perform: \
             not imported; write the values into the command (one check per distinct value)"
                .into(),
        );
    }
    let mut check = CheckSpec::new(&name, Vec::new());
    match split_command(&command) {
        Some(argv) => check.command = Some(argv),
        None => {
            check.shell = Some(command);
            notes.push("runs through /bin/sh because it uses shell syntax".into());
        }
    }

    // Schedule.
    let interval = take_u32(&mut spec, "interval")?.filter(|i| *i > 0);
    let cron = take(&mut spec, "cron");
    match cron.as_ref().and_then(Value::as_str).map(str::trim) {
        Some(expr) if !expr.is_empty() => {
            if let Some(i) = interval {
                notes.push(format!("interval {i} s dropped: cron is set too"));
            }
            convert_cron(expr, &mut check, &mut notes)?;
        }
        _ => {
            if let Some(other) = cron.filter(|c| !is_zero(c)) {
                return Err(format!("spec.cron is {}, not a string", short(&other)));
            }
            check.interval =
                Some(interval.ok_or("it has neither an interval nor a cron schedule")?);
        }
    }

    // Timeout and ttl: 0 means none in Sensu; Aramaki always has a timeout.
    match take_u32(&mut spec, "timeout")?.unwrap_or(0) {
        0 => notes.push(format!(
            "Sensu had no timeout; Aramaki needs one and uses {} s",
            check.timeout
        )),
        t if t > 3600 => {
            notes.push(format!("timeout {t} s is over Aramaki's limit: 3600 s"));
            check.timeout = 3600;
        }
        t => check.timeout = t,
    }
    if let Some(ttl) = take_u32(&mut spec, "ttl")?.filter(|t| *t > 0) {
        let period = check.interval.unwrap_or(60);
        if ttl <= period {
            notes.push(format!(
                "ttl {ttl} s dropped: it must be longer than the interval ({period} s)"
            ));
        } else if ttl > MAX_TTL {
            notes.push(format!(
                "ttl {ttl} s dropped: Aramaki allows at most a week"
            ));
        } else {
            check.ttl = Some(ttl);
        }
    }

    match take(&mut spec, "publish") {
        Some(Value::Bool(p)) => check.publish = p,
        None => {
            check.publish = false;
            notes.push("publish was not set, which Sensu reads as false: kept unpublished".into());
        }
        Some(other) => {
            return Err(format!(
                "spec.publish is {}, not true or false",
                short(&other)
            ))
        }
    }

    // Subscriptions: Sensu refuses a check without any, so do we.
    let subs = match take(&mut spec, "subscriptions") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or("spec.subscriptions must be a list of strings")?,
        None => Vec::new(),
        Some(other) => return Err(format!("spec.subscriptions is {}", short(&other))),
    };
    if subs.is_empty() {
        return Err("it has no subscriptions, which Sensu requires".into());
    }
    for s in subs.iter().filter(|s| s.starts_with("entity:")) {
        notes.push(format!(
            "subscription '{s}' kept as given; Aramaki agents subscribe to 'agent:<name>' instead"
        ));
    }
    check.subscriptions = subs;

    // A proxy entity is the system the results belong to.
    if let Some(v) = take(&mut spec, "proxy_entity_name").filter(|v| !is_zero(v)) {
        let name = as_text(&v).unwrap_or_else(|| short(&v));
        match Slug::try_from(name.as_str()) {
            Ok(slug) => check.system = Some(slug),
            Err(e) => notes.push(format!(
                "proxy_entity_name '{name}' not used as system: {e}; set the system by hand"
            )),
        }
    }

    if let Some(size) = take_u32(&mut spec, "max_output_size")?.filter(|s| *s > 0) {
        let limit = size.clamp(256, 1024 * 1024);
        if limit != size {
            notes.push(format!(
                "max_output_size {size} is outside Aramaki's 256 bytes to 1 MiB: {limit}"
            ));
        }
        check.output_limit = Some(limit);
    }

    // env_vars: ["KEY=VALUE", …].
    if let Some(v) = take(&mut spec, "env_vars") {
        let items = match v {
            Value::Array(items) => items,
            // Environment values are often secrets: the report shows at
            // most a variable's name, never its value.
            _ => {
                left.add_withheld("spec.env_vars", "…", "not a list of KEY=VALUE");
                Vec::new()
            }
        };
        for (i, item) in items.iter().enumerate() {
            let pair = item.as_str().and_then(|s| s.split_once('='));
            match pair.filter(|(k, _)| is_env_name(k)) {
                Some((k, val)) => {
                    if check.env.insert(k.to_owned(), val.to_owned()).is_some() {
                        notes.push(format!("env_vars sets {k} twice: the last value is kept"));
                    }
                }
                None => {
                    let shown = pair.map_or_else(
                        || "…".to_owned(),
                        |(k, _)| format!("{}=…", short(&Value::String(k.to_owned()))),
                    );
                    left.add_withheld(
                        &format!("spec.env_vars[{i}]"),
                        &shown,
                        "not KEY=VALUE with a valid variable name",
                    )
                }
            }
        }
    }

    // Labels from metadata, then any in the spec; Aramaki's rules are
    // stricter than Sensu's, so pairs that do not fit are listed.
    let mut labels = BTreeMap::new();
    for (path, value) in [
        ("metadata.labels", take(&mut meta, "labels")),
        ("spec.labels", take(&mut spec, "labels")),
    ] {
        let Some(value) = value else { continue };
        let Value::Object(map) = value else {
            left.unless_default(path, &value);
            continue;
        };
        for (k, v) in map {
            let field = format!("{path}.{k}");
            let Some(text) = as_text(&v) else {
                left.add(&field, &v, "label values must be text");
                continue;
            };
            if let Err(e) = check_label_key(&k).and_then(|_| check_label_value(&k, &text)) {
                left.add(&field, &v, &e);
            } else if let std::collections::btree_map::Entry::Vacant(slot) = labels.entry(k) {
                slot.insert(text);
            } else {
                left.add(&field, &v, "metadata.labels sets this label already");
            }
        }
    }
    check.labels = Labels::try_from(labels)?;

    if let Some(value) = take(&mut meta, "annotations") {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let text = as_text(&v).unwrap_or_else(|| v.to_string());
                    check.annotations.insert(k, text);
                }
            }
            other => left.unless_default("metadata.annotations", &other),
        }
    }

    meta.remove("name");
    meta.remove("namespace");
    for (k, v) in &meta {
        left.unless_default(&format!("metadata.{k}"), v);
    }
    for (k, v) in &spec {
        left.unless_default(&format!("spec.{k}"), v);
    }
    let runtime_assets = r.spec.get("runtime_assets").filter(|v| !is_zero(v));
    if runtime_assets.is_some() {
        notes.push("the command came from Sensu assets: install it on the agents' hosts".into());
    }

    check
        .validate()
        .map_err(|e| format!("the result is not a valid check: {e}"))?;
    Ok(ImportedCheck {
        source: source.to_owned(),
        namespace: r.namespace().to_owned(),
        spec: check,
        notes,
    })
}

fn is_env_name(k: &str) -> bool {
    k.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Sensu's cron (robfig/cron) also takes `CRON_TZ=`/`TZ=` prefixes,
/// `@every <duration>` and `@daily`-style names; turn those into Aramaki's
/// timezone, interval or a plain five-field expression.
fn convert_cron(expr: &str, check: &mut CheckSpec, notes: &mut Vec<String>) -> Result<(), String> {
    let mut expr = expr;
    let mut timezone = None;
    for prefix in ["CRON_TZ=", "TZ="] {
        if let Some(rest) = expr.strip_prefix(prefix) {
            let (tz, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            timezone = Some(tz.to_owned());
            expr = rest.trim_start();
        }
    }
    if let Some(duration) = expr.strip_prefix("@every") {
        let secs = go_duration_secs(duration.trim())
            .ok_or_else(|| format!("cron '{expr}' has a duration this importer cannot read"))?;
        notes.push(format!("cron '{expr}' became interval {secs} s"));
        check.interval = Some(secs);
        return Ok(());
    }
    let named = match expr {
        "@yearly" | "@annually" => Some("0 0 1 1 *"),
        "@monthly" => Some("0 0 1 * *"),
        "@weekly" => Some("0 0 * * 0"),
        "@daily" | "@midnight" => Some("0 0 * * *"),
        "@hourly" => Some("0 * * * *"),
        _ => None,
    };
    if let Some(five) = named {
        notes.push(format!("cron '{expr}' written as '{five}'"));
    }
    check.cron = Some(named.unwrap_or(expr).to_owned());
    check.timezone = timezone;
    Ok(())
}

/// Go durations as `@every` takes them (`90s`, `1h30m`), in whole seconds.
fn go_duration_secs(s: &str) -> Option<u32> {
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest.get(..digits)?.parse().ok()?;
        rest = rest.get(digits..)?;
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match rest.get(..unit_len)? {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += number * scale;
        rest = rest.get(unit_len..)?;
    }
    let secs = total.ceil();
    (1.0..=f64::from(MAX_TTL))
        .contains(&secs)
        .then_some(secs as u32)
}

/// Splits a command line into argv the way `/bin/sh` would, or `None` if the
/// shell would do more than split at blanks and remove simple quotes.
///
/// Special: operators `| & ; < > ( )`, expansions `$` and backquote, escapes,
/// globs `* ? [ ]`, `~` (anywhere, to be safe), `#` starting a word, control
/// characters, a first word that assigns (`A=b cmd`), is a reserved word or
/// a builtin. Not special: `%` (only job control uses it, and Nagios
/// thresholds like `10%` are common), `=` and `{ } !` after the first word.
fn split_command(cmd: &str) -> Option<Vec<String>> {
    if cmd.chars().any(|c| c.is_control() && c != '\t') {
        return None;
    }
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = cmd.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        ch => word.push(ch),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '$' | '`' | '\\' => return None,
                        ch => word.push(ch),
                    }
                }
            }
            '#' if !in_word => return None,
            '|' | '&' | ';' | '<' | '>' | '(' | ')' | '$' | '`' | '\\' | '*' | '?' | '[' | ']'
            | '~' => return None,
            ch => {
                in_word = true;
                word.push(ch);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    let first = words.first()?;
    let assigns = first
        .split_once('=')
        .is_some_and(|(name, _)| is_env_name(name));
    const SHELL_WORDS: &[&str] = &[
        "!", "{", "}", "if", "then", "else", "elif", "fi", "do", "done", "case", "esac", "while",
        "until", "for", "in", "function", "select", "time", ".", ":", "source", "exec", "eval",
        "export", "cd", "set", "unset", "alias", "ulimit", "umask", "trap", "read", "shift",
        "wait", "exit", "return", "break", "continue", "readonly", "local",
    ];
    if assigns || SHELL_WORDS.contains(&first.as_str()) {
        return None;
    }
    Some(words)
}

/// Names the fields that differ. Destructuring every field makes the
/// compiler point here when `CheckSpec` grows one.
fn differing_fields(old: &CheckSpec, new: &CheckSpec) -> Vec<String> {
    let CheckSpec {
        name: _,
        command,
        shell,
        probe,
        subscriptions,
        interval,
        cron,
        timezone,
        splay,
        timeout,
        ttl,
        occurrences,
        labels,
        annotations,
        system,
        env,
        cwd,
        output_limit,
        publish,
    } = new;
    let mut fields = Vec::new();
    let mut diff = |differs: bool, field: &str| {
        if differs {
            fields.push(field.to_owned());
        }
    };
    diff(old.command != *command, "command");
    diff(old.shell != *shell, "shell");
    diff(old.probe != *probe, "probe");
    diff(old.subscriptions != *subscriptions, "subscriptions");
    diff(old.interval != *interval, "interval");
    diff(old.cron != *cron, "cron");
    diff(old.timezone != *timezone, "timezone");
    diff(old.splay != *splay, "splay");
    diff(old.timeout != *timeout, "timeout");
    diff(old.ttl != *ttl, "ttl");
    diff(old.occurrences != *occurrences, "occurrences");
    diff(old.labels != *labels, "labels");
    diff(old.annotations != *annotations, "annotations");
    diff(old.system != *system, "system");
    diff(old.env != *env, "env");
    diff(old.cwd != *cwd, "cwd");
    diff(old.output_limit != *output_limit, "output_limit");
    diff(old.publish != *publish, "publish");
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = include_str!("../../tests/fixtures/sensu-dump.yaml");
    const JSON: &str = include_str!("../../tests/fixtures/sensu-dump.json");

    fn fixture() -> Import {
        parse_dump(YAML).unwrap()
    }

    fn check<'a>(import: &'a Import, name: &str) -> &'a ImportedCheck {
        import
            .checks
            .iter()
            .find(|c| c.spec.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    fn has_note(c: &ImportedCheck, part: &str) -> bool {
        c.notes.iter().any(|n| n.contains(part))
    }

    #[test]
    fn yaml_and_wrapped_json_give_the_same_import() {
        let yaml = fixture();
        assert_eq!(parse_dump(JSON).unwrap(), yaml);
        // The same objects as one JSON array, and compact back to back.
        let values: Vec<Value> = serde_json::Deserializer::from_str(JSON)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap();
        let array = serde_json::to_string_pretty(&values).unwrap();
        assert_eq!(parse_dump(&array).unwrap(), yaml);
        let compact: String = values.iter().map(Value::to_string).collect();
        assert_eq!(parse_dump(&compact).unwrap(), yaml);
    }

    #[test]
    fn fixture_checks_map_as_expected() {
        let import = fixture();
        let names: Vec<&str> = import.checks.iter().map(|c| c.spec.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "default-check-cpu",
                "check-backup-age",
                "check-nginx-workers",
                "check-website",
                "check_disk_root",
                "check-ntp",
                "production-check-cpu",
            ]
        );
        for c in &import.checks {
            c.spec.validate().unwrap();
        }

        let cpu = check(&import, "default-check-cpu");
        assert_eq!(cpu.source, "CheckConfig default/check-cpu");
        assert_eq!(cpu.namespace, "default");
        assert_eq!(
            cpu.spec.command.as_deref(),
            Some(&["check-cpu-usage", "-w", "75", "-c", "90"].map(String::from)[..])
        );
        assert_eq!(cpu.spec.timeout, 60);
        assert!(has_note(
            cpu,
            "namespaces default, production each have a check 'check-cpu'"
        ));
        assert!(has_note(cpu, "no timeout"));
        assert_eq!(cpu.spec.labels.get("sensu.io/managed_by"), Some("sensuctl"));
        let prod = check(&import, "production-check-cpu");
        assert_eq!(prod.namespace, "production");
        assert!(has_note(prod, "'entity:db01' kept as given"));

        let backup = check(&import, "check-backup-age");
        assert_eq!(backup.spec.cron.as_deref(), Some("30 2 * * *"));
        assert_eq!(backup.spec.timezone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(backup.spec.interval, None);
        assert_eq!(backup.spec.timeout, 120);

        let nginx = check(&import, "check-nginx-workers");
        assert_eq!(nginx.spec.command, None);
        assert_eq!(
            nginx.spec.shell.as_deref(),
            Some("ps -C nginx --no-headers | wc -l | xargs check-count --min 2")
        );
        assert!(has_note(
            nginx,
            "runs through /bin/sh because it uses shell syntax"
        ));
        assert_eq!(nginx.spec.ttl, None);
        assert!(has_note(nginx, "ttl 30 s dropped"));

        let web = check(&import, "check-website");
        assert_eq!(
            web.spec.system.as_ref().map(Slug::as_str),
            Some("www-example-com")
        );

        let disk = check(&import, "check_disk_root");
        assert!(has_note(disk, "renamed from 'Check_Disk_Root'"));
        assert_eq!(
            disk.spec.command.as_deref(),
            Some(&["check_disk", "-w", "10%", "-c", "5%", "-p", "/"].map(String::from)[..])
        );
        assert_eq!(disk.spec.ttl, Some(300));
        assert!(!disk.spec.publish);
        assert_eq!(disk.spec.output_limit, Some(2048));
        assert_eq!(disk.spec.env.get("LC_ALL").map(String::as_str), Some("C"));
        assert_eq!(disk.spec.labels.get("tier"), Some("storage"));
        assert_eq!(disk.spec.labels.get("team"), None);
        assert_eq!(
            disk.spec.annotations.get("runbook").map(String::as_str),
            Some("https://wiki.example.com/runbooks/disk-full")
        );

        let ntp = check(&import, "check-ntp");
        assert_eq!(
            (ntp.spec.interval, ntp.spec.cron.as_deref()),
            (Some(300), None)
        );

        assert_eq!(import.errors.len(), 2, "{:?}", import.errors);
        assert!(import.errors[0].starts_with("CheckConfig default/check-orphan: "));
        assert!(import.errors[0].contains("no subscriptions"));
        // Token substitution is refused rather than run through the shell.
        assert!(
            import.errors[1].starts_with("CheckConfig production/check-postgres: "),
            "{:?}",
            import.errors
        );
        assert!(import.errors[1].contains("token substitution"));
        assert!(import.errors[1].contains("not imported"));

        let skipped: Vec<String> = import
            .skipped
            .iter()
            .map(|s| format!("{} {}", s.kind, s.name))
            .collect();
        assert_eq!(
            skipped,
            [
                "Namespace default",
                "Namespace production",
                "Asset default/sensu/check-cpu-usage",
                "Handler default/slack",
                "Filter default/only-production",
                "Entity default/web01",
            ]
        );
    }

    #[test]
    fn every_unmapped_field_is_in_the_report() {
        let import = fixture();
        let listed: BTreeSet<(&str, &str)> = import
            .unmapped
            .iter()
            .map(|u| (u.resource.as_str(), u.field.as_str()))
            .collect();
        let disk = "CheckConfig default/Check_Disk_Root";
        for field in [
            "spec.handlers",
            "spec.check_hooks",
            "spec.runtime_assets",
            "spec.high_flap_threshold",
            "spec.low_flap_threshold",
            "spec.output_metric_format",
            "spec.output_metric_handlers",
            "spec.output_metric_thresholds",
            "spec.secrets",
            "spec.stdin",
            "metadata.created_by",
            "metadata.labels.team",
        ] {
            assert!(listed.contains(&(disk, field)), "{field} not listed");
        }
        for (resource, field) in [
            ("CheckConfig default/check-website", "spec.round_robin"),
            ("CheckConfig default/check-ntp", "spec.scheduler"),
        ] {
            assert!(listed.contains(&(resource, field)), "{field} not listed");
        }
        // Zero values are not noise in the list.
        assert!(!listed.contains(&("CheckConfig default/check-cpu", "spec.stdin")));

        let text = report(&import, &plan(&[], &import), true);
        for u in &import.unmapped {
            assert!(text.contains(&u.resource), "{}", u.resource);
            assert!(
                text.contains(&format!("{} = {}", u.field, u.value)),
                "{} missing from report:\n{text}",
                u.field
            );
        }
        for s in &import.skipped {
            assert!(text.contains(&format!("{} {}", s.kind, s.name)));
        }
        assert!(text.contains(&import.errors[0]));
        assert!(text.contains("would create"));
        assert!(text.contains("dry run"));
    }

    #[test]
    fn env_values_are_never_in_the_report() {
        let text = r#"{"type":"CheckConfig","api_version":"core/v2","metadata":{"name":"c","namespace":"default"},
            "spec":{"command":"true","interval":10,"publish":true,"subscriptions":["a"],"timeout":5,
            "env_vars":["GOOD=fine","1DB_PASSWORD=hunter2","NOEQUALSs3cret",{"K":"t0ken"}]}}"#;
        let import = parse_dump(text).unwrap();
        let env: Vec<(&str, &str)> = import
            .unmapped
            .iter()
            .filter(|u| u.field.starts_with("spec.env_vars"))
            .map(|u| (u.field.as_str(), u.value.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("spec.env_vars[1]", "\"1DB_PASSWORD\"=…"),
                ("spec.env_vars[2]", "…"),
                ("spec.env_vars[3]", "…"),
            ]
        );
        let printed = report(&import, &plan(&[], &import), true);
        assert!(
            printed.contains("spec.env_vars[1] = \"1DB_PASSWORD\"=…"),
            "{printed}"
        );
        for secret in ["hunter2", "s3cret", "t0ken"] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        let text = text.replace(
            r#"["GOOD=fine","1DB_PASSWORD=hunter2","NOEQUALSs3cret",{"K":"t0ken"}]"#,
            r#""DB_PASSWORD=hunter2""#,
        );
        let import = parse_dump(&text).unwrap();
        let printed = report(&import, &plan(&[], &import), true);
        assert!(printed.contains("spec.env_vars = …"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn unknown_fields_are_listed_too() {
        let text = r#"{"type":"CheckConfig","api_version":"core/v2","metadata":{"name":"c","namespace":"default","uid":"x1"},
            "spec":{"command":"true","interval":10,"publish":true,"subscriptions":["a"],"timeout":5,"frobnicate":{"x":1},"silenced":["a:c"]}}"#;
        let import = parse_dump(text).unwrap();
        let fields: Vec<&str> = import.unmapped.iter().map(|u| u.field.as_str()).collect();
        assert_eq!(fields, ["metadata.uid", "spec.frobnicate", "spec.silenced"]);
    }

    #[test]
    fn plan_detects_create_update_and_unchanged() {
        let import = fixture();
        let backup = check(&import, "check-backup-age").spec.clone();
        let mut disk = check(&import, "check_disk_root").spec.clone();
        disk.timeout = 5;
        disk.labels = Labels::default();
        let changes = plan(&[backup, disk], &import);
        assert_eq!(changes.len(), import.checks.len());
        assert!(changes.contains(&Change::Unchanged("check-backup-age".into())));
        assert!(changes.contains(&Change::Update {
            name: "check_disk_root".into(),
            fields: vec!["timeout".into(), "labels".into()],
        }));
        assert!(changes.contains(&Change::Create("check-ntp".into())));

        let text = report(&import, &changes, false);
        assert!(
            text.contains("7 checks read: 5 created, 1 updated, 1 unchanged; 2 not imported"),
            "{text}"
        );
        assert!(text.contains("(timeout, labels)"));
        assert!(!text.contains("dry run"));
    }

    #[test]
    fn bad_yaml_names_the_document() {
        let text = "type: Handler\nspec: {}\n---\ntype: CheckConfig\nspec:\n  command: [unclosed\n";
        match parse_dump(text) {
            Err(SensuError::Yaml { document, line, .. }) => {
                assert_eq!(document, 2);
                assert!(line >= 4, "line {line}");
            }
            other => panic!("expected a YAML error, got {other:?}"),
        }
        let err = parse_dump(text).unwrap_err().to_string();
        assert!(err.starts_with("document 2 (line "), "{err}");
    }

    #[test]
    fn bad_json_and_non_resources_name_the_document() {
        let err = parse_dump("{\"type\":\"Handler\",\"spec\":{}}\n{\"type\": }").unwrap_err();
        assert!(
            matches!(
                err,
                SensuError::Json {
                    document: 2,
                    line: 2,
                    ..
                }
            ),
            "{err:?}"
        );

        let err = parse_dump("# dump\n---\ntype: Handler\nspec: {}\n---\n\nname: x\n").unwrap_err();
        assert_eq!(
            err,
            SensuError::NotSensu {
                document: 2,
                line: 7,
                reason: "it has no 'type'".into()
            }
        );
        assert_eq!(parse_dump("\n# nothing\n---\n"), Err(SensuError::Empty));
        assert!(matches!(
            parse_dump("- 1\n"),
            Err(SensuError::NotSensu { .. })
        ));
    }

    #[test]
    fn commands_split_only_when_the_shell_would_just_split() {
        let argv = |s: &str| split_command(s).map(|v| v.join("|"));
        assert_eq!(
            argv("check_disk -w 10% -c 5%").as_deref(),
            Some("check_disk|-w|10%|-c|5%")
        );
        assert_eq!(
            argv("a --x=1 'b c' \"d e\"").as_deref(),
            Some("a|--x=1|b c|d e")
        );
        assert_eq!(argv("a it''s '' x\"y\"z").as_deref(), Some("a|its||xyz"));
        assert_eq!(argv("a\t b ").as_deref(), Some("a|b"));
        assert_eq!(argv("a b#c").as_deref(), Some("a|b#c"));
        for shell in [
            "a | b",
            "a && b",
            "a; b",
            "a > f",
            "a $HOME",
            "a \"$HOME\"",
            "a `b`",
            "a *.log",
            "a ~/x",
            "a # c",
            "A=1 a",
            "cd /tmp",
            "if true",
            "a 'open",
            "a\nb",
            "a \\x",
            "a (b)",
            "a [x]",
            "a ?",
        ] {
            assert_eq!(split_command(shell), None, "{shell}");
        }
    }

    #[test]
    fn cron_forms_of_sensu() {
        let mut c = CheckSpec::new("x", vec!["a".into()]);
        let mut notes = Vec::new();
        convert_cron("@hourly", &mut c, &mut notes).unwrap();
        assert_eq!(c.cron.as_deref(), Some("0 * * * *"));
        convert_cron("TZ=UTC */5 * * * *", &mut c, &mut notes).unwrap();
        assert_eq!(
            (c.cron.as_deref(), c.timezone.as_deref()),
            (Some("*/5 * * * *"), Some("UTC"))
        );
        assert_eq!(go_duration_secs("1h30m"), Some(5400));
        assert_eq!(go_duration_secs("1.5s"), Some(2));
        assert_eq!(go_duration_secs("10x"), None);
        assert_eq!(go_duration_secs("0s"), None);
    }
}
