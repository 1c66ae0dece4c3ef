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
    }
}
