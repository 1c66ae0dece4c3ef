//! What instances publish about themselves and, later, say to each other.
//!
//! `GET /.well-known/aramaki` serves a [`SignedDocument`]: the instance's
//! name, URL and current key, with the keys it retired, signed by the
//! current key over [`document_transcript`].

use serde::{Deserialize, Serialize};

/// Version of the instance document and the federation protocol.
pub const FEDERATION_VERSION: u32 = 1;

/// Path of the self-signed instance document.
pub const WELL_KNOWN_PATH: &str = "/.well-known/aramaki";

/// An instance as it describes itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceDocument {
    pub version: u32,
    pub instance_id: String,
    pub name: String,
    /// Where peers reach it (`https://…`).
    pub url: String,
    /// The current Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// Its fingerprint, as people compare it (`ABCD-EFGH-IJKL-MNOP`).
    pub fingerprint: String,
    /// Keys it used before: they only verify history now.
    #[serde(default)]
    pub retired_keys: Vec<RetiredKey>,
    /// µs since the Unix epoch.
    pub issued_at: i64,
    /// It serves TLS with a certificate of its current key (no CA): dial
    /// it only when the certificate carries the pinned key.
    #[serde(default)]
    pub tls_pinned: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredKey {
    pub public_key: String,
    /// µs since the Unix epoch.
    pub retired_at: i64,
}

/// The document with the current key's signature (hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDocument {
    pub document: InstanceDocument,
    pub signature: String,
}

/// What the instance signs: a domain and every field, length-prefixed.
pub fn document_transcript(d: &InstanceDocument) -> Vec<u8> {
    let mut parts: Vec<Vec<u8>> = vec![
        b"aramaki-instance-v1".to_vec(),
        d.version.to_be_bytes().to_vec(),
        d.instance_id.as_bytes().to_vec(),
        d.name.as_bytes().to_vec(),
        d.url.as_bytes().to_vec(),
        d.public_key.as_bytes().to_vec(),
        d.fingerprint.as_bytes().to_vec(),
        d.issued_at.to_be_bytes().to_vec(),
        vec![u8::from(d.tls_pinned)],
    ];
    for k in &d.retired_keys {
        parts.push(k.public_key.as_bytes().to_vec());
        parts.push(k.retired_at.to_be_bytes().to_vec());
    }
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(&part);
    }
    out
}

/// One step of an instance's key history: the new key, signed by the key
/// before it over [`rotation_transcript`]. A peer that pinned an older key
/// walks these steps to the current one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotation {
    pub public_key: String,
    /// µs since the Unix epoch.
    pub rotated_at: i64,
    /// The previous key's signature (hex).
    pub proof: String,
}

/// What the retiring key signs when it hands over to `new_key`.
pub fn rotation_transcript(instance_id: &str, new_key: &str, rotated_at: i64) -> Vec<u8> {
    let parts: [&[u8]; 4] = [
        b"aramaki-key-rotation-v1",
        instance_id.as_bytes(),
        new_key.as_bytes(),
        &rotated_at.to_be_bytes(),
    ];
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transcript_covers_every_field() {
        let d = InstanceDocument {
            version: 1,
            instance_id: "i".into(),
            name: "hosting".into(),
            url: "https://a.example".into(),
            public_key: "00".repeat(32),
            fingerprint: "AAAA".into(),
            retired_keys: vec![],
            issued_at: 1,
            tls_pinned: false,
        };
        let t = document_transcript(&d);
        let mut other = d.clone();
        other.url = "https://b.example".into();
        assert_ne!(t, document_transcript(&other));
        let mut other = d.clone();
        other.retired_keys.push(RetiredKey {
            public_key: "11".repeat(32),
            retired_at: 0,
        });
        assert_ne!(t, document_transcript(&other));
        let mut other = d.clone();
        other.tls_pinned = true;
        assert_ne!(t, document_transcript(&other));
    }
}

/// Every message between instances: signed by the issuer over
/// [`Envelope::signing_bytes`] (a canonical encoding of everything but the
/// signature), for one audience, valid for a short time, never twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    /// UUIDv7; the receiver refuses an id it has seen (replay).
    pub id: String,
    /// What the body is, such as `use.request` or `activity`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The sending instance's id.
    pub issuer: String,
    /// The receiving instance's id.
    pub audience: String,
    /// µs since the Unix epoch.
    pub issued_at: i64,
    pub expires_at: i64,
    pub body: serde_json::Value,
    /// Ed25519 over [`Envelope::signing_bytes`], hex.
    pub signature: String,
}

impl Envelope {
    /// The bytes the issuer signs: a domain, then each field but the
    /// signature, length-prefixed; the body as canonical JSON.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let parts: [Vec<u8>; 8] = [
            b"aramaki-envelope-v1".to_vec(),
            self.version.to_be_bytes().to_vec(),
            self.id.as_bytes().to_vec(),
            self.kind.as_bytes().to_vec(),
            self.issuer.as_bytes().to_vec(),
            self.audience.as_bytes().to_vec(),
            [self.issued_at.to_be_bytes(), self.expires_at.to_be_bytes()].concat(),
            canonical_json(&self.body).into_bytes(),
        ];
        let mut out = Vec::new();
        for part in parts {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(&part);
        }
        out
    }
}

/// JSON with object keys sorted at every level and no insignificant
/// whitespace, so that both sides sign and verify the same bytes whatever
/// order a map was built in.
pub fn canonical_json(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical_json(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", inner.join(","))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use serde_json::json;

    fn envelope() -> Envelope {
        Envelope {
            version: FEDERATION_VERSION,
            id: "01a2".into(),
            kind: "activity".into(),
            issuer: "a".into(),
            audience: "b".into(),
            issued_at: 10,
            expires_at: 20,
            body: json!({"b": 1, "a": [true, {"y": null, "x": "é"}]}),
            signature: String::new(),
        }
    }

    #[test]
    fn canonical_json_ignores_key_order_and_spacing() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1, "a":[true,{"y":null,"x":"é"}]}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "a" : [ true , { "x" : "é" , "y" : null } ] , "b" : 1 }"#)
                .unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(
            canonical_json(&a),
            r#"{"a":[true,{"x":"é","y":null}],"b":1}"#
        );
    }

    #[test]
    fn every_field_but_the_signature_is_signed() {
        let e = envelope();
        let bytes = e.signing_bytes();
        let mut signed = e.clone();
        signed.signature = "ff".into();
        assert_eq!(bytes, signed.signing_bytes());
        let changes: [fn(&mut Envelope); 7] = [
            |e| e.id.push('x'),
            |e| e.kind.push('x'),
            |e| e.issuer.push('x'),
            |e| e.audience.push('x'),
            |e| e.issued_at += 1,
            |e| e.expires_at += 1,
            |e| e.body["b"] = json!(2),
        ];
        for change in changes {
            let mut other = e.clone();
            change(&mut other);
            assert_ne!(bytes, other.signing_bytes());
        }
    }

    #[test]
    fn envelopes_are_strict_on_the_wire() {
        let text = serde_json::to_string(&envelope()).unwrap();
        assert!(text.contains(r#""type":"activity""#));
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["extra"] = json!(1);
        assert!(serde_json::from_value::<Envelope>(v).is_err());
    }
}
