//! The values a System is made of. Each newtype parses its input once, at the
//! boundary, so invalid data cannot exist past it and every message about it
//! comes from one place.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Something the caller sent is not acceptable; names the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// Checks the shape shared by slugs and category names.
fn check_name(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!(
            "{what} must be 1 to 63 characters long, got {}",
            s.len()
        ));
    }
    if !s.chars().all(is_name_char) {
        return Err(format!(
            "{what} '{s}' may contain only lowercase letters, digits and '-'"
        ));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(format!("{what} '{s}' must not start or end with '-'"));
    }
    Ok(())
}

/// A system's unique human name, such as `storage-dc1`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "storage-dc1")]
pub struct Slug(String);

impl Slug {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Slug {
    type Error = String;
    fn try_from(s: String) -> Result<Slug, String> {
        check_name("slug", &s)?;
        Ok(Slug(s))
    }
}

impl TryFrom<&str> for Slug {
    type Error = String;
    fn try_from(s: &str) -> Result<Slug, String> {
        Slug::try_from(s.to_owned())
    }
}

impl From<Slug> for String {
    fn from(s: Slug) -> String {
        s.0
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a category (`infrastructure`, `service`, …).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "infrastructure")]
pub struct CategoryName(String);

impl CategoryName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CategoryName {
    type Error = String;
    fn try_from(s: String) -> Result<CategoryName, String> {
        check_name("category", &s)?;
        Ok(CategoryName(s))
    }
}

impl From<CategoryName> for String {
    fn from(c: CategoryName) -> String {
        c.0
    }
}

impl fmt::Display for CategoryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Label keys look like `role` or `app.kubernetes.io/name`.
pub fn check_label_key(k: &str) -> Result<(), String> {
    let ok_char = |c: char| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.' | '_' | '/')
    };
    if k.is_empty() || k.len() > 63 {
        return Err(format!(
            "label key must be 1 to 63 characters long, got {}",
            k.len()
        ));
    }
    if !k.chars().all(ok_char) {
        return Err(format!(
            "label key '{k}' may contain only lowercase letters, digits, '-', '.', '_' and '/'"
        ));
    }
    Ok(())
}

/// Label values are short words: no spaces, commas, '=' or '!', which the
/// selector syntax uses.
pub fn check_label_value(k: &str, v: &str) -> Result<(), String> {
    let ok_char =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '/' | ':' | '@' | '+');
    if v.is_empty() || v.len() > 128 {
        return Err(format!(
            "value of label '{k}' must be 1 to 128 characters long"
        ));
    }
    if !v.chars().all(ok_char) {
        return Err(format!(
            "value of label '{k}' ('{v}') may contain only letters, digits and - . _ / : @ +"
        ));
    }
    Ok(())
}

/// `key=value` pairs that describe a system and drive dynamic aggregates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
#[schema(value_type = BTreeMap<String, String>, example = json!({"role": "storage", "dc": "dc1"}))]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Builds labels from storage, which holds only validated pairs.
    pub fn from_trusted(map: BTreeMap<String, String>) -> Labels {
        Labels(map)
    }

    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0.clone()
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = String;
    fn try_from(map: BTreeMap<String, String>) -> Result<Labels, String> {
        if map.len() > 64 {
            return Err("at most 64 labels per system".into());
        }
        for (k, v) in &map {
            check_label_key(k)?;
            check_label_value(k, v)?;
        }
        Ok(Labels(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0
    }
}

/// One term of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

/// `role=storage,dc=dc1`: all terms must hold. Also `key!=value`, `key`
/// (the label exists) and `!key` (it does not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(try_from = "String", into = "String")]
#[schema(value_type = String, example = "role=storage,dc=dc1")]
pub struct LabelSelector(Vec<Term>);

impl LabelSelector {
    pub fn terms(&self) -> &[Term] {
        &self.0
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v.as_str()),
            Term::NotEquals(k, v) => labels.get(k) != Some(v.as_str()),
            Term::Exists(k) => labels.get(k).is_some(),
            Term::Absent(k) => labels.get(k).is_none(),
        })
    }
}

impl TryFrom<String> for LabelSelector {
    type Error = String;
    fn try_from(s: String) -> Result<LabelSelector, String> {
        LabelSelector::try_from(s.as_str())
    }
}

impl TryFrom<&str> for LabelSelector {
    type Error = String;
    fn try_from(s: &str) -> Result<LabelSelector, String> {
        let mut terms = Vec::new();
        for raw in s.split(',') {
            let part = raw.trim();
            if part.is_empty() {
                return Err(format!("label selector '{s}' has an empty term"));
            }
            let term = if let Some((k, v)) = part.split_once("!=") {
                let (k, v) = (k.trim(), v.trim());
                check_label_key(k)?;
                check_label_value(k, v)?;
                Term::NotEquals(k.to_owned(), v.to_owned())
            } else if let Some((k, v)) = part.split_once('=') {
                let (k, v) = (k.trim(), v.trim());
                check_label_key(k)?;
                check_label_value(k, v)?;
                Term::Equals(k.to_owned(), v.to_owned())
            } else if let Some(k) = part.strip_prefix('!') {
                check_label_key(k.trim())?;
                Term::Absent(k.trim().to_owned())
            } else {
                check_label_key(part)?;
                Term::Exists(part.to_owned())
            };
            terms.push(term);
        }
        if terms.len() > 16 {
            return Err("a label selector has at most 16 terms".into());
        }
        Ok(LabelSelector(terms))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|t| match t {
                Term::Equals(k, v) => format!("{k}={v}"),
                Term::NotEquals(k, v) => format!("{k}!={v}"),
                Term::Exists(k) => k.clone(),
                Term::Absent(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl From<LabelSelector> for String {
    fn from(s: LabelSelector) -> String {
        s.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    Dashboard,
    Docs,
    Repository,
    Runbook,
    Chat,
    Other,
}

/// A link to somewhere that helps with the system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub title: String,
    /// An `http://` or `https://` URL.
    pub url: String,
    #[serde(default = "other_kind")]
    pub kind: LinkKind,
}

fn other_kind() -> LinkKind {
    LinkKind::Other
}

impl Link {
    pub fn validate(&self, at: &str) -> Result<(), Invalid> {
        check_text(&format!("{at}.title"), &self.title, 1, 200)?;
        let url = self.url.trim();
        let lower = url.to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) || url.len() < 10 {
            return Err(Invalid::new(
                format!("{at}.url"),
                format!("'{}' is not an http:// or https:// URL", self.url),
            ));
        }
        if url.len() > 2000 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Invalid::new(
                format!("{at}.url"),
                "URL is too long or contains spaces",
            ));
        }
        Ok(())
    }
}

/// Someone to reach, in escalation order (1 first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Contact {
    pub name: String,
    #[serde(default)]
    pub role: String,
    /// How to reach them: phone, chat handle, e-mail, pager.
    #[serde(default)]
    pub reach: String,
    /// Escalation order: 1 is called first.
    #[serde(default = "first")]
    pub escalation: u32,
}

fn first() -> u32 {
    1
}

impl Contact {
    pub fn validate(&self, at: &str) -> Result<(), Invalid> {
        check_text(&format!("{at}.name"), &self.name, 1, 200)?;
        check_text(&format!("{at}.role"), &self.role, 0, 200)?;
        check_text(&format!("{at}.reach"), &self.reach, 0, 500)?;
        if self.escalation == 0 || self.escalation > 100 {
            return Err(Invalid::new(
                format!("{at}.escalation"),
                "must be between 1 and 100",
            ));
        }
        Ok(())
    }
}

/// Checks a free-text field's length (in characters) after trimming.
pub fn check_text(field: &str, value: &str, min: usize, max: usize) -> Result<(), Invalid> {
    let n = value.trim().chars().count();
    if n < min {
        return Err(Invalid::new(
            field,
            if min == 1 {
                "must not be empty".to_owned()
            } else {
                format!("needs at least {min} characters")
            },
        ));
    }
    if value.chars().count() > max {
        return Err(Invalid::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

pub const MAX_MARKDOWN: usize = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_lowercase_words() {
        assert!(Slug::try_from("storage-dc1").is_ok());
        assert!(Slug::try_from("a").is_ok());
        for bad in [
            "",
            "Storage",
            "a b",
            "-a",
            "a-",
            "a_b",
            "ä",
            &"x".repeat(64),
        ] {
            assert!(Slug::try_from(bad).is_err(), "{bad:?} accepted");
        }
        let err = Slug::try_from("Storage DC").unwrap_err();
        assert!(err.contains("lowercase"), "{err}");
    }

    #[test]
    fn selectors_parse_and_match() {
        let sel = LabelSelector::try_from("role=storage, dc!=dc2,tier,!retired").unwrap();
        assert_eq!(sel.to_string(), "role=storage,dc!=dc2,tier,!retired");
        let labels = |pairs: &[(&str, &str)]| {
            Labels::try_from(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            )
            .unwrap()
        };
        assert!(sel.matches(&labels(&[
            ("role", "storage"),
            ("dc", "dc1"),
            ("tier", "1")
        ])));
        assert!(!sel.matches(&labels(&[
            ("role", "storage"),
            ("dc", "dc2"),
            ("tier", "1")
        ])));
        assert!(!sel.matches(&labels(&[
            ("role", "storage"),
            ("tier", "1"),
            ("retired", "yes")
        ])));
        assert!(!sel.matches(&labels(&[("role", "storage")])));
        for bad in ["", "role=", "=x", "role=a b", "a,,b", "Role=x"] {
            assert!(LabelSelector::try_from(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn links_must_be_web_urls() {
        let link = |url: &str| Link {
            title: "x".into(),
            url: url.into(),
            kind: LinkKind::Docs,
        };
        assert!(link("https://grafana.example/d/1")
            .validate("links[0]")
            .is_ok());
        let err = link("javascript:alert(1)")
            .validate("links[0]")
            .unwrap_err();
        assert_eq!(err.field, "links[0].url");
        assert!(link("https://a b.example").validate("l").is_err());
    }

    #[test]
    fn labels_are_validated() {
        let mut m = BTreeMap::new();
        m.insert("role".to_owned(), "storage".to_owned());
        assert!(Labels::try_from(m.clone()).is_ok());
        m.insert("bad key".to_owned(), "x".to_owned());
        assert!(Labels::try_from(m).is_err());
    }
}
