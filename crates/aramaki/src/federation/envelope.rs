//! Sealing and opening envelopes between instances.
//!
//! Opening checks, in this order: size, shape, audience, issuer is a peer
//! that may talk (a suspended or revoked peer is refused before any
//! signature work), signature against its pinned key, issue time within
//! ±5 minutes, expiry, and last the id against the ids seen — only after
//! the signature verified, so a forger cannot fill the seen-set.

use aramaki_protocol::federation::{Envelope, FEDERATION_VERSION};
use aramaki_protocol::keys::{hex, unhex_array};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use super::identity::Identity;

/// Largest envelope accepted, in bytes.
pub const MAX_ENVELOPE_BYTES: usize = 256 * 1024;
/// How far an envelope's issue time may be from our clock.
pub const MAX_SKEW_MICROS: i64 = 5 * 60 * 1_000_000;
/// An envelope may live this long at most (µs): its id is remembered until
/// it expires, so a peer cannot make the seen-set keep ids for ever.
pub const MAX_LIFETIME_MICROS: i64 = 15 * 60 * 1_000_000;

/// Where a peering stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Pending,
    Active,
    Unreachable,
    Suspended,
    Revoked,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Pending => "pending",
            PeerState::Active => "active",
            PeerState::Unreachable => "unreachable",
            PeerState::Suspended => "suspended",
            PeerState::Revoked => "revoked",
        }
    }

    /// The state an admin's change leads to: `approve`, `suspend`, `resume`
    /// or `revoke` (the words of the API, the command line and the page).
    pub fn after_change(change: &str) -> Option<PeerState> {
        match change {
            "approve" | "resume" => Some(PeerState::Active),
            "suspend" => Some(PeerState::Suspended),
            "revoke" => Some(PeerState::Revoked),
            _ => None,
        }
    }

    /// Whether messages from a peer in this state are read at all.
    fn may_send(self) -> bool {
        matches!(self, PeerState::Active | PeerState::Unreachable)
    }
}

/// A peer as the receiver knows it: its state and pinned key.
#[derive(Debug, Clone)]
pub struct Peer {
    pub instance_id: String,
    pub state: PeerState,
    pub key: VerifyingKey,
}

/// Why an envelope was not accepted; each is logged and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the envelope is larger than {MAX_ENVELOPE_BYTES} bytes")]
    TooLarge,
    #[error("not an envelope: {0}")]
    Malformed(String),
    #[error("envelope version {0} is not supported")]
    Version(u32),
    #[error("the envelope is for {0}, not for this instance")]
    WrongAudience(String),
    #[error("{0} is not a peer of this instance")]
    NotAPeer(String),
    #[error("peer {0} is {1}")]
    PeerBlocked(String, &'static str),
    #[error("the signature does not verify against the peer's pinned key")]
    BadSignature,
    #[error("issued {0} s away from this instance's clock (at most 300 s)")]
    Skewed(i64),
    #[error("the envelope expired")]
    Expired,
    #[error("the envelope would live {0} s, longer than the {max} s allowed", max = MAX_LIFETIME_MICROS / 1_000_000)]
    Lifetime(i64),
    #[error("envelope {0} was seen before (replay)")]
    Replayed(String),
}

impl Refused {
    /// A short, stable name for counting.
    pub fn key(&self) -> &'static str {
        match self {
            Refused::TooLarge => "too_large",
            Refused::Malformed(_) => "malformed",
            Refused::Version(_) => "version",
            Refused::WrongAudience(_) => "wrong_audience",
            Refused::NotAPeer(_) => "not_a_peer",
            Refused::PeerBlocked(_, _) => "peer_blocked",
            Refused::BadSignature => "bad_signature",
            Refused::Skewed(_) => "skewed",
            Refused::Expired => "expired",
            Refused::Lifetime(_) => "lifetime",
            Refused::Replayed(_) => "replayed",
        }
    }
}

/// An envelope that passed every check; `rotated_to` is the issuer's new
/// key when it proved a rotation from the pinned one (see [`rotated_key`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Opened {
    pub envelope: Envelope,
    pub rotated_to: Option<VerifyingKey>,
}

/// Kinds that open a link: they may carry the issuer's key history.
const CARRY_KEYS: [&str; 2] = ["link.hello", "link.welcome"];

/// Signs an envelope from this instance to `audience`.
pub fn seal(
    me: &Identity,
    audience: &str,
    kind: &str,
    body: serde_json::Value,
    now: i64,
    ttl_micros: i64,
) -> Envelope {
    let mut envelope = Envelope {
        version: FEDERATION_VERSION,
        id: crate::db::new_id().to_string(),
        kind: kind.to_owned(),
        issuer: me.instance_id.clone(),
        audience: audience.to_owned(),
        issued_at: now,
        expires_at: now.saturating_add(ttl_micros),
        body,
        signature: String::new(),
    };
    envelope.signature = hex(&me.sign(&envelope.signing_bytes()).to_bytes());
    envelope
}

/// Opens a received envelope. `peer` looks an issuer up; `first_time`
/// records an id (until its expiry) and says whether it is new.
pub fn open(
    raw: &[u8],
    me: &str,
    now: i64,
    peer: impl Fn(&str) -> Option<Peer>,
    mut first_time: impl FnMut(&str, i64) -> bool,
) -> Result<Opened, Refused> {
    if raw.len() > MAX_ENVELOPE_BYTES {
        return Err(Refused::TooLarge);
    }
    let envelope: Envelope =
        serde_json::from_slice(raw).map_err(|e| Refused::Malformed(e.to_string()))?;
    if envelope.version != FEDERATION_VERSION {
        return Err(Refused::Version(envelope.version));
    }
    if envelope.audience != me {
        return Err(Refused::WrongAudience(envelope.audience.clone()));
    }
    let sender =
        peer(&envelope.issuer).ok_or_else(|| Refused::NotAPeer(envelope.issuer.clone()))?;
    if !sender.state.may_send() {
        return Err(Refused::PeerBlocked(
            envelope.issuer.clone(),
            sender.state.as_str(),
        ));
    }
    let signature = unhex_array::<64>(&envelope.signature)
        .map(|b| Signature::from_bytes(&b))
        .ok_or(Refused::BadSignature)?;
    let rotated_to = if sender
        .key
        .verify(&envelope.signing_bytes(), &signature)
        .is_ok()
    {
        None
    } else {
        let key = rotated_key(&envelope, &sender.key).ok_or(Refused::BadSignature)?;
        key.verify(&envelope.signing_bytes(), &signature)
            .map_err(|_| Refused::BadSignature)?;
        Some(key)
    };
    let skew = envelope.issued_at - now;
    if skew.abs() > MAX_SKEW_MICROS {
        return Err(Refused::Skewed(skew / 1_000_000));
    }
    if envelope.expires_at <= now {
        return Err(Refused::Expired);
    }
    let lifetime = envelope.expires_at.saturating_sub(envelope.issued_at);
    if lifetime > MAX_LIFETIME_MICROS {
        return Err(Refused::Lifetime(lifetime / 1_000_000));
    }
    if !first_time(&envelope.id, envelope.expires_at) {
        return Err(Refused::Replayed(envelope.id.clone()));
    }
    Ok(Opened {
        envelope,
        rotated_to,
    })
}

/// Walks the key history a link-opening envelope carries (`body.keys`),
/// from the pinned key: each step must be signed by the key before it.
/// Returns the last key reached, if it differs from the pinned one.
pub fn rotated_key(envelope: &Envelope, pinned: &VerifyingKey) -> Option<VerifyingKey> {
    use aramaki_protocol::federation::{rotation_transcript, KeyRotation};
    if !CARRY_KEYS.contains(&envelope.kind.as_str()) {
        return None;
    }
    let steps: Vec<KeyRotation> =
        serde_json::from_value(envelope.body.get("keys")?.clone()).ok()?;
    let mut current = *pinned;
    for step in steps {
        let Some(next) =
            unhex_array::<32>(&step.public_key).and_then(|b| VerifyingKey::from_bytes(&b).ok())
        else {
            continue;
        };
        let Some(proof) = unhex_array::<64>(&step.proof).map(|b| Signature::from_bytes(&b)) else {
            continue;
        };
        let transcript = rotation_transcript(&envelope.issuer, &step.public_key, step.rotated_at);
        if current.verify(&transcript, &proof).is_ok() {
            current = next;
        }
    }
    (current != *pinned).then_some(current)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use ed25519_dalek::SigningKey;
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000_000_000;
    const MINUTE: i64 = 60_000_000;

    fn instance(id: &str, seed: u8) -> Identity {
        Identity::new(id.into(), id.into(), SigningKey::from_bytes(&[seed; 32]))
    }

    fn peers(a: &Identity, state: PeerState) -> impl Fn(&str) -> Option<Peer> + '_ {
        move |id| {
            (id == a.instance_id).then(|| Peer {
                instance_id: id.to_owned(),
                state,
                key: a.public_key(),
            })
        }
    }

    fn raw(e: &Envelope) -> Vec<u8> {
        serde_json::to_vec(e).unwrap()
    }

    #[test]
    fn a_sealed_envelope_opens_once() {
        let a = instance("a", 1);
        let sealed = seal(
            &a,
            "b",
            "activity",
            json!({"system": "storage"}),
            NOW,
            MINUTE,
        );
        let mut seen = HashSet::new();
        let mut first = |id: &str, _| seen.insert(id.to_owned());
        let opened = open(
            &raw(&sealed),
            "b",
            NOW,
            peers(&a, PeerState::Active),
            &mut first,
        )
        .unwrap();
        assert_eq!(opened.envelope.body["system"], "storage");
        assert_eq!(opened.rotated_to, None);
        let again = open(
            &raw(&sealed),
            "b",
            NOW,
            peers(&a, PeerState::Active),
            &mut first,
        );
        assert_eq!(again, Err(Refused::Replayed(sealed.id.clone())));
    }

    #[test]
    fn every_way_to_be_wrong_is_refused_with_its_reason() {
        let a = instance("a", 1);
        let mallory = instance("a", 9);
        let ok = |_: &str, _| true;
        let good = seal(&a, "b", "activity", json!({}), NOW, MINUTE);
        let active = || peers(&a, PeerState::Active);

        let forged = seal(&mallory, "b", "activity", json!({}), NOW, MINUTE);
        assert_eq!(
            open(&raw(&forged), "b", NOW, active(), ok),
            Err(Refused::BadSignature)
        );
        let mut tampered = good.clone();
        tampered.body = json!({"system": "elsewhere"});
        assert_eq!(
            open(&raw(&tampered), "b", NOW, active(), ok),
            Err(Refused::BadSignature)
        );
        assert_eq!(
            open(&raw(&good), "c", NOW, active(), ok),
            Err(Refused::WrongAudience("b".into()))
        );
        let stranger = seal(&instance("z", 3), "b", "activity", json!({}), NOW, MINUTE);
        assert_eq!(
            open(&raw(&stranger), "b", NOW, active(), ok),
            Err(Refused::NotAPeer("z".into()))
        );
        for state in [PeerState::Suspended, PeerState::Revoked, PeerState::Pending] {
            assert!(matches!(
                open(&raw(&good), "b", NOW, peers(&a, state), ok),
                Err(Refused::PeerBlocked(_, _))
            ));
        }
        let early = seal(
            &a,
            "b",
            "activity",
            json!({}),
            NOW + 10 * MINUTE,
            20 * MINUTE,
        );
        assert!(matches!(
            open(&raw(&early), "b", NOW, active(), ok),
            Err(Refused::Skewed(_))
        ));
        let lasting = seal(&a, "b", "activity", json!({}), NOW, 24 * 60 * MINUTE);
        assert_eq!(
            open(&raw(&lasting), "b", NOW, active(), ok),
            Err(Refused::Lifetime(86_400)),
            "its id would have to be kept for a day"
        );
        let long_enough = seal(&a, "b", "activity", json!({}), NOW, 15 * MINUTE);
        assert!(open(&raw(&long_enough), "b", NOW, active(), ok).is_ok());
        let stale = seal(&a, "b", "activity", json!({}), NOW - 2 * MINUTE, MINUTE);
        assert_eq!(
            open(&raw(&stale), "b", NOW, active(), ok),
            Err(Refused::Expired)
        );
        assert!(matches!(
            open(b"{}", "b", NOW, active(), ok),
            Err(Refused::Malformed(_))
        ));
        let huge = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(open(&huge, "b", NOW, active(), ok), Err(Refused::TooLarge));
    }

    #[test]
    fn forgeries_do_not_fill_the_seen_set() {
        let a = instance("a", 1);
        let mut forged = seal(&a, "b", "activity", json!({}), NOW, MINUTE);
        forged.body = json!({"x": 1});
        let mut seen = HashSet::new();
        let mut first = |id: &str, _| seen.insert(id.to_owned());
        assert!(open(
            &raw(&forged),
            "b",
            NOW,
            peers(&a, PeerState::Active),
            &mut first
        )
        .is_err());
        assert!(seen.is_empty());
    }
}
