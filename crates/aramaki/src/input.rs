//! Strict reading of request input, before any type sees it.
//!
//! - JSON bodies are parsed to a [`Value`] first. The top level must be an
//!   object, no string or key may hold U+0000 (PostgreSQL cannot store it,
//!   SQLite would), and the value is then deserialised through [`Strict`],
//!   which refuses an array wherever a struct is expected — serde's derive
//!   would otherwise accept `["slug","title","service"]` by position and skip
//!   the unknown-field check. Errors name the field path (`labels.env`,
//!   `links[0].url`).
//! - URL-encoded text (query strings, form bodies) is decoded name by name
//!   and value by value: U+0000 (`%00` or a raw byte) and invalid UTF-8 are
//!   refused, naming the parameter.

use std::cell::RefCell;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, VariantAccess, Visitor,
};
use serde_json::Value;

/// Why a JSON body was refused, with the field path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("`{0}` contains a NUL character (U+0000), which is not allowed")]
    Nul(String),
    #[error("{}{message}", prefix(path))]
    Invalid { path: String, message: String },
}

fn prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

impl InputError {
    /// The field path the error is about (empty for the whole body).
    pub fn field(&self) -> &str {
        match self {
            InputError::NotAnObject(_) => "",
            InputError::Nul(path) | InputError::Invalid { path, .. } => path,
        }
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a request body value into `T`, strictly (see the module docs).
pub fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, InputError> {
    if !value.is_object() {
        return Err(InputError::NotAnObject(kind(&value)));
    }
    if let Some(path) = nul_path(&value, &mut String::new()) {
        return Err(InputError::Nul(path));
    }
    let failed = RefCell::new(None);
    let result = T::deserialize(Strict {
        value,
        path: String::new(),
        failed: &failed,
    });
    result.map_err(|e| InputError::Invalid {
        path: failed.into_inner().unwrap_or_default(),
        message: e.to_string(),
    })
}

/// The path of the first string or key holding U+0000, if any.
pub fn nul_path(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::String(s) if s.contains('\0') => Some(path.clone()),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = nul_path(item, path);
            path.truncate(len);
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let len = path.len();
            push_key(path, key);
            let found = if key.contains('\0') {
                Some(path.replace('\0', "\\u0000"))
            } else {
                nul_path(item, path)
            };
            path.truncate(len);
            found
        }),
        _ => None,
    }
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

/// Why URL-encoded text (a query string or a form body) was refused, with
/// the name of the parameter it concerns.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodedError {
    #[error("`{0}` contains a NUL character (U+0000), which is not allowed")]
    Nul(String),
    #[error("`{0}` is not valid UTF-8")]
    NotUtf8(String),
}

/// Checks every name and value of URL-encoded text (`a=b&c=d`) as it will be
/// decoded: none may hold U+0000 (encoded as `%00` or sent as a raw byte)
/// and all must be UTF-8 (axum's `Form` and `Query` would otherwise replace
/// invalid bytes with U+FFFD without a word).
pub fn check_encoded(encoded: &[u8]) -> Result<(), EncodedError> {
    for pair in encoded.split(|b| *b == b'&') {
        let mut halves = pair.splitn(2, |b| *b == b'=');
        let name = percent_decode(halves.next().unwrap_or_default());
        let value = percent_decode(halves.next().unwrap_or_default());
        let shown = || String::from_utf8_lossy(&name).replace('\0', "\\u0000");
        if name.contains(&0) || value.contains(&0) {
            return Err(EncodedError::Nul(shown()));
        }
        if std::str::from_utf8(&name).is_err() || std::str::from_utf8(&value).is_err() {
            return Err(EncodedError::NotUtf8(shown()));
        }
    }
    Ok(())
}

/// Percent-decoding as `application/x-www-form-urlencoded` does it (`+` is a
/// space; a `%` not followed by two hex digits stays as it is).
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    let hex = |b: u8| (b as char).to_digit(16);
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        match b {
            b'%' => match tail {
                [h, l, after @ ..] => match (hex(*h), hex(*l)) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        rest = after;
                    }
                    _ => out.push(b'%'),
                },
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    out
}

/// A deserializer over a JSON value that refuses sequences for structs and
/// remembers where the first error happened.
struct Strict<'f> {
    value: Value,
    path: String,
    failed: &'f RefCell<Option<String>>,
}

impl<'f> Strict<'f> {
    /// Notes the path of an error the first time one is seen (the deepest).
    fn note<T>(
        failed: &RefCell<Option<String>>,
        path: &str,
        r: Result<T, serde_json::Error>,
    ) -> Result<T, serde_json::Error> {
        if r.is_err() {
            let mut slot = failed.borrow_mut();
            if slot.is_none() {
                *slot = Some(path.to_owned());
            }
        }
        r
    }
}

impl<'de> de::Deserializer<'de> for Strict<'_> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        let Strict {
            value,
            path,
            failed,
        } = self;
        match value {
            // An internally tagged enum (`{"probe": "tcp", ...}`) asks for
            // any value and would also take a sequence, tag first; only its
            // visitor's description tells it from a list.
            Value::Array(_) if expects_an_object(&visitor) => {
                Err(de::Error::invalid_type(Unexpected::Seq, &"a JSON object"))
            }
            Value::Array(items) => visitor.visit_seq(Seq {
                items: items.into_iter().enumerate(),
                path,
                failed,
            }),
            Value::Object(map) => visitor.visit_map(Map {
                entries: map.into_iter(),
                value: None,
                path,
                failed,
            }),
            Value::String(s) => visitor.visit_string(s),
            Value::Number(n) => de::Deserializer::deserialize_any(n, visitor),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::Null => visitor.visit_unit(),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match &self.value {
            Value::Object(_) => self.deserialize_any(visitor),
            other => Err(de::Error::invalid_type(unexpected(other), &"a JSON object")),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::String(s) => visitor.visit_enum(s.into_deserializer()),
            Value::Object(map) if map.len() == 1 => {
                let Some((variant, value)) = map.into_iter().next() else {
                    return Err(de::Error::custom("expected one variant"));
                };
                let path = join(&self.path, &variant);
                visitor.visit_enum(Enum {
                    variant,
                    inner: Strict {
                        value,
                        path,
                        failed: self.failed,
                    },
                })
            }
            other => Err(de::Error::invalid_type(
                unexpected(&other),
                &"a string or an object with one key",
            )),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map identifier
    }
}

/// Whether a visitor that asked for any value describes itself as wanting
/// a struct or an internally tagged enum (serde's derive says so).
fn expects_an_object<'de, V: Visitor<'de>>(visitor: &V) -> bool {
    struct Expecting<'a, V>(&'a V);
    impl<'de, V: Visitor<'de>> std::fmt::Display for Expecting<'_, V> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            self.0.expecting(f)
        }
    }
    let wants = Expecting(visitor).to_string();
    wants.starts_with("internally tagged enum") || wants.starts_with("struct ")
}

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(_) => Unexpected::Other("a number"),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

fn join(path: &str, key: &str) -> String {
    let mut p = path.to_owned();
    push_key(&mut p, key);
    p
}

struct Seq<'f> {
    items: std::iter::Enumerate<std::vec::IntoIter<Value>>,
    path: String,
    failed: &'f RefCell<Option<String>>,
}

impl<'de> SeqAccess<'de> for Seq<'_> {
    type Error = serde_json::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Self::Error> {
        let Some((i, value)) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{i}]", self.path);
        let r = seed.deserialize(Strict {
            value,
            path: path.clone(),
            failed: self.failed,
        });
        Strict::note(self.failed, &path, r).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct Map<'f> {
    entries: serde_json::map::IntoIter,
    value: Option<(String, Value)>,
    path: String,
    failed: &'f RefCell<Option<String>>,
}

impl<'de> MapAccess<'de> for Map<'_> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        let Some((key, value)) = self.entries.next() else {
            return Ok(None);
        };
        let path = join(&self.path, &key);
        let r = seed.deserialize(IntoDeserializer::<serde_json::Error>::into_deserializer(
            key,
        ));
        let r = Strict::note(self.failed, &path, r);
        self.value = Some((path, value));
        r.map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let Some((path, value)) = self.value.take() else {
            return Err(de::Error::custom("a value without a key"));
        };
        let r = seed.deserialize(Strict {
            value,
            path: path.clone(),
            failed: self.failed,
        });
        Strict::note(self.failed, &path, r)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

struct Enum<'f> {
    variant: String,
    inner: Strict<'f>,
}

impl<'de, 'f> EnumAccess<'de> for Enum<'f> {
    type Error = serde_json::Error;
    type Variant = Strict<'f>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), Self::Error> {
        let v = seed.deserialize(IntoDeserializer::<serde_json::Error>::into_deserializer(
            self.variant,
        ))?;
        Ok((v, self.inner))
    }
}

impl<'de> VariantAccess<'de> for Strict<'_> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        match self.value {
            Value::Null => Ok(()),
            other => Err(de::Error::invalid_type(unexpected(&other), &"null")),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, Self::Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_any(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Link {
        title: String,
        url: String,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        slug: String,
        #[serde(default)]
        links: Vec<Link>,
        #[serde(default)]
        labels: std::collections::BTreeMap<String, String>,
        #[serde(default)]
        limit: Option<u32>,
    }

    #[test]
    fn objects_are_read_as_before() {
        let b: Body = from_value(json!({"slug": "a", "links": [{"title": "t", "url": "u"}], "labels": {"env": "prod"}, "limit": 3})).unwrap();
        assert_eq!(b.links[0].url, "u");
        assert_eq!(b.labels["env"], "prod");
        assert_eq!(b.limit, Some(3));
    }

    #[test]
    fn arrays_are_not_structs_at_any_depth() {
        let e = from_value::<Body>(json!(["a", [], {}, null])).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected a JSON object, found an array"),
            "{e}"
        );
        let e = from_value::<Body>(json!({"slug": "a", "links": [["t", "u"]]})).unwrap_err();
        assert_eq!(e.field(), "links[0]");
        assert!(e.to_string().contains("expected a JSON object"), "{e}");
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(tag = "probe", rename_all = "snake_case", deny_unknown_fields)]
    enum Probe {
        Tcp { host: String, port: u16 },
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Check {
        probe: Probe,
    }

    #[test]
    fn internally_tagged_enums_are_objects_too() {
        let c: Check =
            from_value(json!({"probe": {"probe": "tcp", "host": "h", "port": 22}})).unwrap();
        assert_eq!(
            c.probe,
            Probe::Tcp {
                host: "h".into(),
                port: 22
            }
        );
        let e = from_value::<Check>(json!({"probe": ["tcp", "h", 22]})).unwrap_err();
        assert_eq!(e.field(), "probe");
        assert!(e.to_string().contains("expected a JSON object"), "{e}");
    }

    #[test]
    fn nul_is_refused_with_its_path() {
        let e =
            from_value::<Body>(json!({"slug": "a", "labels": {"env": "pr\u{0}od"}})).unwrap_err();
        assert_eq!(e.field(), "labels.env");
        let e = from_value::<Body>(json!({"slug": "a", "links": [{"title": "\u{0}", "url": "u"}]}))
            .unwrap_err();
        assert_eq!(e.field(), "links[0].title");
        let e = from_value::<Body>(json!({"slug": "a", "labels": {"e\u{0}": "x"}})).unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = from_value::<Body>(json!({"slug": "a", "limit": "many"})).unwrap_err();
        assert_eq!(e.field(), "limit");
        assert!(e.to_string().starts_with("limit: invalid type"), "{e}");
        let e = from_value::<Body>(json!({"slug": "a", "colour": "red"})).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn encoded_nul_names_the_parameter() {
        let nul = |name: &str| Err(EncodedError::Nul(name.to_owned()));
        assert_eq!(check_encoded(b"a=1&text=x%00y"), nul("text"));
        assert_eq!(check_encoded(b"a%20b=%00"), nul("a b"));
        assert_eq!(check_encoded(b"a+b=%00"), nul("a b"));
        assert_eq!(check_encoded(b"a=%2500&b=%25%30%30&c=%"), Ok(()));
        assert_eq!(check_encoded(b"a=1&b=2&c&=&&"), Ok(()));
    }

    #[test]
    fn raw_nul_and_invalid_utf8_are_refused() {
        assert_eq!(
            check_encoded(b"a=1&title=x\0y"),
            Err(EncodedError::Nul("title".into()))
        );
        assert_eq!(
            check_encoded(b"ti\0tle=x"),
            Err(EncodedError::Nul("ti\\u0000tle".into()))
        );
        assert_eq!(
            check_encoded(b"a=1&body=caf\xe9"),
            Err(EncodedError::NotUtf8("body".into()))
        );
        assert_eq!(
            check_encoded(b"a=1&body=caf%E9"),
            Err(EncodedError::NotUtf8("body".into()))
        );
        // The first parameter that is wrong is named.
        assert_eq!(
            check_encoded(b"a=%FF&b=%00"),
            Err(EncodedError::NotUtf8("a".into()))
        );
        assert_eq!(check_encoded("caf\u{e9}=%C3%A9".as_bytes()), Ok(()));
    }
}
