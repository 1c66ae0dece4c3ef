//! Encodings of keys and fingerprints that servers, agents and peers must
//! compute identically.

use sha2::{Digest, Sha256};

/// `ABCD-EFGH-IJKL-MNOP`: the first 80 bits of SHA-256 over a public key,
/// base32, in groups of four.
pub fn fingerprint(public_key: &[u8]) -> String {
    let digest = Sha256::digest(public_key);
    let encoded = base32(&digest[..10]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join("-")
}

/// The fingerprint as carried in tokens: without dashes.
pub fn compact_fingerprint(public_key: &[u8]) -> String {
    fingerprint(public_key).replace('-', "")
}

/// Splits a token `<prefix>_<id>_<secret>_<fingerprint>` (each part
/// non-empty ASCII letters and digits) into id, secret and fingerprint.
pub fn split_token(prefix: &str, s: &str) -> Option<(String, String, String)> {
    let mut parts = s.trim().split('_');
    let (Some(p), Some(id), Some(secret), Some(fp), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let plain = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric());
    (p == prefix && plain(id) && plain(secret) && plain(fp))
        .then(|| (id.to_owned(), secret.to_owned(), fp.to_owned()))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

/// Exactly `N` bytes from hex, or nothing.
pub fn unhex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    unhex(s)?.try_into().ok()
}

/// RFC 4648 base32 without padding.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(unhex("000fff"), Some(vec![0, 15, 255]));
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex_array::<2>("0102"), Some([1, 2]));
        assert_eq!(unhex_array::<3>("0102"), None);
    }

    #[test]
    fn base32_follows_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn fingerprints_are_grouped() {
        let fp = fingerprint(&[7u8; 32]);
        assert_eq!(fp.len(), 19);
        assert_eq!(fp.matches('-').count(), 3);
        assert_eq!(compact_fingerprint(&[7u8; 32]), fp.replace('-', ""));
    }
}
