//! Action definitions: typed parameters, role, concurrency, confirmation
//! rule and allowed time windows.

use std::collections::BTreeMap;

use jiff::civil::Weekday;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::systems::model::{check_text, Invalid, MAX_MARKDOWN};
use crate::users::Role;

/// An action as an admin defines it on a system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// The name agents know it by (their allow-list), such as `flush-cache`.
    pub name: String,
    pub title: String,
    /// Markdown: what it does and when to use it.
    #[serde(default)]
    pub description: String,
    /// Target the agents of systems this one includes, too.
    #[serde(default)]
    pub include_subsystems: bool,
    /// Only agents with one of these subscriptions (empty: all).
    #[serde(default)]
    pub subscriptions: Vec<String>,
    #[serde(default)]
    pub params: Vec<ParamSpec>,
    /// viewer, operator (default) or admin, on the system.
    #[serde(default = "operator")]
    pub role: String,
    /// Seconds before an agent kills the run.
    #[serde(default = "sixty")]
    pub timeout: u32,
    /// Runs at once per target (a further one is refused).
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Ask for confirmation if it ran on a target this recently (minutes;
    /// null: never ask).
    #[serde(default = "thirty")]
    pub confirm_within_minutes: Option<u32>,
    /// When it may run (empty: any time); outside needs a written override.
    #[serde(default)]
    pub windows: Vec<Window>,
    /// IANA time zone of the windows (default UTC).
    #[serde(default)]
    pub timezone: Option<String>,
    /// Changes nothing: may run across many targets for discovery.
    #[serde(default)]
    pub read_only: bool,
}

fn operator() -> String {
    "operator".into()
}
fn sixty() -> u32 {
    60
}
fn one() -> u32 {
    1
}
fn thirty() -> Option<u32> {
    Some(30)
}

/// One typed parameter. (Flat, not a tagged enum, so that unknown fields
/// are refused: serde cannot combine that with `flatten`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    /// string, enum, integer or boolean.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// string: a regular expression the whole value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// string: longest value in characters (default 200).
    #[serde(default = "max_len")]
    pub max_len: usize,
    /// enum: the allowed values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// integer: bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default)]
    pub description: String,
    /// Accept values that begin with `-` (refused otherwise: the command
    /// could read them as options). Agents apply their own rule too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_leading_dash: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Enum,
    Integer,
    Boolean,
}

fn max_len() -> usize {
    200
}

/// Days and a daily time span (`16:00`–`18:00`, end exclusive).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// `mon` … `sun`.
    pub days: Vec<String>,
    pub from: String,
    pub to: String,
}

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

fn minutes(hhmm: &str) -> Option<i32> {
    let (h, m) = hhmm.split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=24).contains(&h) && (0..60).contains(&m) && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

impl Window {
    fn validate(&self) -> Result<(), Invalid> {
        if self.days.is_empty() || self.days.iter().any(|d| !DAYS.iter().any(|(n, _)| n == d)) {
            return Err(Invalid::new(
                "windows",
                "days must be some of mon, tue, wed, thu, fri, sat, sun",
            ));
        }
        match (minutes(&self.from), minutes(&self.to)) {
            (Some(a), Some(b)) if a < b => Ok(()),
            _ => Err(Invalid::new(
                "windows",
                format!(
                    "'{}'–'{}' must be HH:MM to a later HH:MM",
                    self.from, self.to
                ),
            )),
        }
    }

    fn contains(&self, day: Weekday, minute: i32) -> bool {
        let on_day = self
            .days
            .iter()
            .any(|d| DAYS.iter().any(|(n, w)| n == d && *w == day));
        on_day
            && minutes(&self.from).is_some_and(|a| minute >= a)
            && minutes(&self.to).is_some_and(|b| minute < b)
    }

    pub fn describe(&self) -> String {
        format!("{} {}–{}", self.days.join(","), self.from, self.to)
    }
}

impl ActionSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        crate::monitoring::checks::validate_name(&self.name).map_err(|mut e| {
            e.message = e.message.replace("check name", "action name");
            e
        })?;
        check_text("title", &self.title, 1, 200)?;
        check_text("description", &self.description, 0, MAX_MARKDOWN)?;
        self.required_role()?;
        if !(1..=24 * 3600).contains(&self.timeout) {
            return Err(Invalid::new("timeout", "must be 1 second to a day"));
        }
        if !(1..=100).contains(&self.concurrency) {
            return Err(Invalid::new("concurrency", "must be 1 to 100"));
        }
        for w in &self.windows {
            w.validate()?;
        }
        if let Some(tz) = &self.timezone {
            jiff::tz::TimeZone::get(tz).map_err(|_| {
                Invalid::new("timezone", format!("'{tz}' is not a known IANA time zone"))
            })?;
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.params {
            crate::monitoring::checks::validate_name(&p.name).map_err(|_| {
                Invalid::new(
                    "params",
                    format!(
                        "parameter name '{}' must be lowercase letters, digits, '-', '_'",
                        p.name
                    ),
                )
            })?;
            if !names.insert(p.name.as_str()) {
                return Err(Invalid::new(
                    "params",
                    format!("parameter '{}' is defined twice", p.name),
                ));
            }
            if let Some(pat) = &p.pattern {
                regex::Regex::new(pat).map_err(|e| {
                    Invalid::new(
                        "params",
                        format!("parameter '{}': pattern does not compile: {e}", p.name),
                    )
                })?;
            }
            if let Some(v) = p.values.iter().find(|v| v.starts_with('-')) {
                if !p.allow_leading_dash {
                    return Err(Invalid::new(
                        "params",
                        format!(
                            "parameter '{}': value '{v}' begins with '-'; set allow_leading_dash to allow it",
                            p.name
                        ),
                    ));
                }
            }
            match p.kind {
                ParamType::Enum if p.values.is_empty() => {
                    return Err(Invalid::new(
                        "params",
                        format!("parameter '{}' needs enum values", p.name),
                    ))
                }
                ParamType::Integer if p.min.unwrap_or(i64::MIN) > p.max.unwrap_or(i64::MAX) => {
                    return Err(Invalid::new(
                        "params",
                        format!("parameter '{}': min is above max", p.name),
                    ))
                }
                _ => {}
            }
            if let Some(d) = &p.default {
                p.check(d)
                    .map_err(|m| Invalid::new("params", format!("default of '{}': {m}", p.name)))?;
            }
        }
        Ok(())
    }

    pub fn required_role(&self) -> Result<Role, Invalid> {
        Role::parse(&self.role)
            .ok_or_else(|| Invalid::new("role", "must be viewer, operator or admin"))
    }

    /// Checks given values against the parameters; returns every value as
    /// text (defaults filled in).
    pub fn check_params(
        &self,
        given: &BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, String>, Invalid> {
        for name in given.keys() {
            if !self.params.iter().any(|p| &p.name == name) {
                return Err(Invalid::new(
                    format!("params.{name}"),
                    format!("action '{}' has no parameter '{name}'", self.name),
                ));
            }
        }
        let mut out = BTreeMap::new();
        for p in &self.params {
            let value = match given.get(&p.name) {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
                Some(serde_json::Value::Null) | None => p.default.clone(),
                Some(_) => {
                    return Err(Invalid::new(
                        format!("params.{}", p.name),
                        "must be a string, number or boolean",
                    ))
                }
            };
            match value {
                Some(v) => {
                    p.check(&v)
                        .map_err(|m| Invalid::new(format!("params.{}", p.name), m))?;
                    out.insert(p.name.clone(), v);
                }
                None if p.required => {
                    return Err(Invalid::new(format!("params.{}", p.name), "is required"))
                }
                None => {}
            }
        }
        Ok(out)
    }

    /// Whether `at` is inside an allowed window (always, without windows).
    pub fn in_window(&self, at: Timestamp) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let tz = self
            .timezone
            .as_deref()
            .and_then(|t| jiff::tz::TimeZone::get(t).ok())
            .unwrap_or(jiff::tz::TimeZone::UTC);
        let local = at.to_zoned(tz);
        let minute = i32::from(local.hour()) * 60 + i32::from(local.minute());
        self.windows
            .iter()
            .any(|w| w.contains(local.weekday(), minute))
    }

    pub fn describe_windows(&self) -> String {
        let spans: Vec<String> = self.windows.iter().map(Window::describe).collect();
        format!(
            "{} ({})",
            spans.join("; "),
            self.timezone.as_deref().unwrap_or("UTC")
        )
    }
}

impl ParamSpec {
    fn check(&self, v: &str) -> Result<(), String> {
        if v.starts_with('-') && !self.allow_leading_dash {
            return Err(
                "must not begin with '-' (a command could read it as an option); the parameter needs allow_leading_dash to take such values"
                    .into(),
            );
        }
        match self.kind {
            ParamType::String => {
                if v.chars().count() > self.max_len {
                    return Err(format!("must be at most {} characters", self.max_len));
                }
                if v.chars().any(char::is_control) {
                    return Err("must not contain control characters".into());
                }
                if let Some(pat) = &self.pattern {
                    let re =
                        regex::Regex::new(&format!("^(?:{pat})$")).map_err(|e| e.to_string())?;
                    if !re.is_match(v) {
                        return Err(format!("'{v}' does not match the pattern {pat}"));
                    }
                }
                Ok(())
            }
            ParamType::Enum => self
                .values
                .iter()
                .any(|x| x == v)
                .then_some(())
                .ok_or_else(|| format!("must be one of {}", self.values.join(", "))),
            ParamType::Integer => {
                let (min, max) = (self.min.unwrap_or(i64::MIN), self.max.unwrap_or(i64::MAX));
                match v.parse::<i64>() {
                    Ok(n) if (min..=max).contains(&n) => Ok(()),
                    _ => Err(format!("must be an integer from {min} to {max}")),
                }
            }
            ParamType::Boolean => matches!(v, "true" | "false")
                .then_some(())
                .ok_or_else(|| "must be true or false".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flush() -> ActionSpec {
        serde_json::from_value(json!({
            "name": "flush-cache", "title": "Flush the cache",
            "params": [
                {"name": "path", "type": "string", "pattern": "/[a-z0-9/._-]*", "default": "/"},
                {"name": "level", "type": "integer", "min": 1, "max": 3},
                {"name": "mode", "type": "enum", "values": ["soft", "hard"], "required": true},
                {"name": "dry", "type": "boolean"}
            ],
            "windows": [{"days": ["mon", "tue", "wed", "thu", "fri"], "from": "16:00", "to": "18:00"}],
            "timezone": "Europe/Berlin"
        }))
        .unwrap()
    }

    #[test]
    fn parameters_are_typed_and_checked() {
        let a = flush();
        a.validate().unwrap();
        let ok = a
            .check_params(&BTreeMap::from([
                ("mode".into(), json!("soft")),
                ("level".into(), json!(2)),
            ]))
            .unwrap();
        assert_eq!(ok["path"], "/");
        assert_eq!(ok["level"], "2");
        for (given, field) in [
            (
                json!({"mode": "soft", "path": "/; rm -rf /"}),
                "params.path",
            ),
            (json!({"mode": "nuke"}), "params.mode"),
            (json!({}), "params.mode"),
            (json!({"mode": "soft", "level": 9}), "params.level"),
            (json!({"mode": "soft", "dry": "yes"}), "params.dry"),
            (json!({"mode": "soft", "cmd": "x"}), "params.cmd"),
        ] {
            let given: BTreeMap<String, serde_json::Value> = serde_json::from_value(given).unwrap();
            assert_eq!(
                a.check_params(&given).unwrap_err().field,
                field,
                "{given:?}"
            );
        }
    }

    #[test]
    fn values_beginning_with_a_dash_need_an_explicit_opt_in() {
        let du: ActionSpec = serde_json::from_value(json!({
            "name": "disk-usage", "title": "Disk usage",
            "params": [{"name": "path", "type": "string"}, {"name": "delta", "type": "integer"}]
        }))
        .unwrap();
        du.validate().unwrap();
        for given in [
            json!({"path": "--files0-from=/etc/shadow"}),
            json!({"path": "-"}),
            json!({"delta": -5}),
        ] {
            let given: BTreeMap<String, serde_json::Value> = serde_json::from_value(given).unwrap();
            let refused = du.check_params(&given).unwrap_err();
            assert!(
                refused.field.starts_with("params.") && refused.message.contains("'-'"),
                "{given:?}: {refused:?}"
            );
        }
        let mut opted = du.clone();
        opted.params[1].allow_leading_dash = true;
        let ok = opted
            .check_params(&BTreeMap::from([("delta".into(), json!(-5))]))
            .unwrap();
        assert_eq!(ok["delta"], "-5");
        let mut bad_enum = du.clone();
        bad_enum.params[0].kind = ParamType::Enum;
        bad_enum.params[0].values = vec!["-rf".into()];
        assert!(bad_enum
            .validate()
            .unwrap_err()
            .message
            .contains("allow_leading_dash"));
    }

    #[test]
    fn lengths_are_counted_in_characters() {
        let spec: ActionSpec = serde_json::from_value(json!({
            "name": "greet", "title": "Greet",
            "params": [{"name": "who", "type": "string", "max_len": 4}]
        }))
        .unwrap();
        let given = |v: &str| BTreeMap::from([("who".to_owned(), json!(v))]);
        assert!(
            spec.check_params(&given("ÄÖÜß")).is_ok(),
            "four characters, eight bytes"
        );
        let refused = spec.check_params(&given("ÄÖÜßa")).unwrap_err();
        assert_eq!(refused.message, "must be at most 4 characters");
    }

    /// README's flush-cache definition, as written, refuses a dashed path.
    #[test]
    fn the_readme_flush_cache_definition_is_safe() {
        let readme = include_str!("../../../../README.md");
        let block = readme
            .split("```json\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .find(|b| b.contains("\"flush-cache\""))
            .expect("README defines flush-cache");
        let spec: ActionSpec = serde_json::from_str(block).unwrap();
        spec.validate().unwrap();
        let given = |v: &str| BTreeMap::from([("path".to_owned(), json!(v))]);
        assert_eq!(
            spec.check_params(&given("/product")).unwrap()["path"],
            "/product"
        );
        for bad in ["-S/etc/shadow", "--help", "/a b", "product"] {
            assert!(spec.check_params(&given(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn windows_are_judged_in_their_time_zone() {
        let a = flush();
        // Monday 2026-11-23, 16:30 in Berlin is 15:30 UTC.
        assert!(a.in_window("2026-11-23T15:30:00Z".parse().unwrap()));
        assert!(
            !a.in_window("2026-11-23T17:00:00Z".parse().unwrap()),
            "18:00 Berlin is outside"
        );
        assert!(
            !a.in_window("2026-11-22T15:30:00Z".parse().unwrap()),
            "Sunday"
        );
        assert!(flush().describe_windows().contains("Europe/Berlin"));
        let mut bad = flush();
        bad.windows[0].from = "18:00".into();
        assert_eq!(bad.validate().unwrap_err().field, "windows");
    }
}
