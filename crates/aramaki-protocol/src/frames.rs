//! Frame integrity for agent sessions (agent protocol 2).
//!
//! The handshake authenticates both ends; this module makes every frame
//! after it carry that authentication, with or without TLS. Both sides
//! contribute an ephemeral X25519 key to the handshake (each signed by its
//! owner inside the handshake transcript, so a relay cannot substitute
//! one); the Diffie-Hellman secret and the transcript give one key per
//! direction. Every frame after the handshake is then
//!
//! ```json
//! {"n": 7, "mac": "<32 bytes hex>", "body": "{\"type\":\"ack\",\"up_to\":42}"}
//! ```
//!
//! where `n` counts this direction's frames from 0 and `mac` is
//! HMAC-SHA256 under the direction's key over the direction label, `n` and
//! `body`. A receiver accepts only exactly the next `n` with a valid MAC:
//! an injected frame fails the MAC, a replayed, reordered or dropped one
//! the counter, and a frame from another session (or the other direction)
//! both. The relay learns nothing that lets it forge: it sees only public
//! exchange keys.

use ed25519_dalek::SigningKey;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{hex, unhex_array};

/// HMAC-SHA256 (RFC 2104), a few lines over SHA-256.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner);
    outer.finalize().into()
}

/// Compares without an early exit, so that timing tells nothing about how
/// much of a MAC was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One side's ephemeral key for the session's Diffie-Hellman exchange.
///
/// An Ed25519 key used only as an X25519 key (its Montgomery form): the
/// public half travels as 32 bytes hex in `hello` and `challenge`.
pub struct Exchange(SigningKey);

impl Exchange {
    /// From 32 fresh random bytes (the caller owns randomness).
    pub fn from_seed(seed: [u8; 32]) -> Exchange {
        Exchange(SigningKey::from_bytes(&seed))
    }

    pub fn public_hex(&self) -> String {
        hex(self.0.verifying_key().as_bytes())
    }

    /// The shared secret with the peer's public exchange key; None for a
    /// key that is not a valid point, a weak (small-order) one, or one that
    /// yields the all-zero secret.
    pub fn agree(&self, peer_hex: &str) -> Option<[u8; 32]> {
        let peer = unhex_array::<32>(peer_hex).and_then(|b| VerifyingKey::from_bytes(&b).ok())?;
        if peer.is_weak() {
            return None;
        }
        let shared = peer
            .to_montgomery()
            .mul_clamped(self.0.to_scalar_bytes())
            .to_bytes();
        (shared != [0u8; 32]).then_some(shared)
    }
}

/// Which way a frame travels; each direction has its own key and counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    AgentToServer,
    ServerToAgent,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Direction::AgentToServer => b"aramaki-frames-v2 agent->server",
            Direction::ServerToAgent => b"aramaki-frames-v2 server->agent",
        }
    }
}

/// The keys of one session, derived from the exchange and the transcript.
pub struct SessionKeys {
    agent_to_server: [u8; 32],
    server_to_agent: [u8; 32],
    /// A short name for the session in logs and events (not secret).
    pub session_id: String,
}

impl SessionKeys {
    /// `transcript` is [`crate::agent::session_transcript`]: both nonces,
    /// both long-term keys, both exchange keys and the agent id.
    pub fn derive(shared: &[u8; 32], transcript: &[u8]) -> SessionKeys {
        let prk = hmac_sha256(b"aramaki-frames-v2", &[shared]);
        let key = |d: Direction| hmac_sha256(&prk, &[d.label(), transcript]);
        let id = hmac_sha256(&prk, &[b"aramaki-frames-v2 session id", transcript]);
        SessionKeys {
            agent_to_server: key(Direction::AgentToServer),
            server_to_agent: key(Direction::ServerToAgent),
            session_id: hex(&id[..8]),
        }
    }

    /// The agent's pair: it seals upward and opens downward.
    pub fn for_agent(&self) -> (Sealer, Opener) {
        (
            Sealer::new(self.agent_to_server, Direction::AgentToServer),
            Opener::new(self.server_to_agent, Direction::ServerToAgent),
        )
    }

    /// The server's pair: it seals downward and opens upward.
    pub fn for_server(&self) -> (Sealer, Opener) {
        (
            Sealer::new(self.server_to_agent, Direction::ServerToAgent),
            Opener::new(self.agent_to_server, Direction::AgentToServer),
        )
    }
}

/// A frame on the wire after the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    pub n: u64,
    pub mac: String,
    pub body: String,
}

fn mac(key: &[u8; 32], direction: Direction, n: u64, body: &str) -> [u8; 32] {
    hmac_sha256(key, &[direction.label(), &n.to_be_bytes(), body.as_bytes()])
}

/// Seals the frames one side sends.
pub struct Sealer {
    key: [u8; 32],
    direction: Direction,
    next: u64,
}

impl Sealer {
    fn new(key: [u8; 32], direction: Direction) -> Sealer {
        Sealer {
            key,
            direction,
            next: 0,
        }
    }

    /// The frame text for `body` (a protocol message as JSON).
    pub fn seal(&mut self, body: String) -> String {
        let n = self.next;
        self.next += 1;
        let sealed = Sealed {
            n,
            mac: hex(&mac(&self.key, self.direction, n, &body)),
            body,
        };
        // A struct of a number and strings always serialises.
        serde_json::to_string(&sealed).unwrap_or_default()
    }
}

/// Why a frame was refused; the session ends on any of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame without a valid seal ({0})")]
    NotSealed(String),
    #[error("frame {got} arrived where {expected} was due (replayed, reordered or dropped)")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("frame {0} fails its integrity check (forged or altered)")]
    BadMac(u64),
}

/// Checks the frames one side receives.
pub struct Opener {
    key: [u8; 32],
    direction: Direction,
    next: u64,
}

impl Opener {
    fn new(key: [u8; 32], direction: Direction) -> Opener {
        Opener {
            key,
            direction,
            next: 0,
        }
    }

    /// The body of the next frame, if it is exactly the next one and
    /// authentic. After an error the session must end.
    pub fn open(&mut self, text: &str) -> Result<String, FrameError> {
        let sealed: Sealed =
            serde_json::from_str(text).map_err(|e| FrameError::NotSealed(e.to_string()))?;
        let given = unhex_array::<32>(&sealed.mac)
            .ok_or_else(|| FrameError::NotSealed("the mac is not 32 bytes in hex".into()))?;
        let expected = mac(&self.key, self.direction, sealed.n, &sealed.body);
        if !constant_time_eq(&given, &expected) {
            return Err(FrameError::BadMac(sealed.n));
        }
        if sealed.n != self.next {
            return Err(FrameError::OutOfOrder {
                expected: self.next,
                got: sealed.n,
            });
        }
        self.next += 1;
        Ok(sealed.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        let a = Exchange::from_seed([1; 32]);
        let s = Exchange::from_seed([2; 32]);
        let shared_a = a.agree(&s.public_hex()).unwrap();
        let shared_s = s.agree(&a.public_hex()).unwrap();
        assert_eq!(shared_a, shared_s, "both sides agree on the secret");
        (
            SessionKeys::derive(&shared_a, b"transcript"),
            SessionKeys::derive(&shared_s, b"transcript"),
        )
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn frames_pass_in_order_and_nothing_else_does() {
        let (agent, server) = pair();
        let (mut up, mut down_open) = agent.for_agent();
        let (mut down, mut up_open) = server.for_server();
        let f0 = up.seal(r#"{"type":"heartbeat","queue_depth":0}"#.into());
        let f1 = up.seal("second".into());
        assert_eq!(
            up_open.open(&f0).unwrap(),
            r#"{"type":"heartbeat","queue_depth":0}"#
        );
        // Replaying frame 0 is refused; so is skipping ahead.
        assert_eq!(
            up_open.open(&f0),
            Err(FrameError::OutOfOrder {
                expected: 1,
                got: 0
            })
        );
        assert_eq!(up_open.open(&f1).unwrap(), "second");
        // An unsealed message, an altered body, a frame of the other direction.
        assert!(matches!(
            down_open.open(r#"{"type":"checks","checks":[]}"#),
            Err(FrameError::NotSealed(_))
        ));
        let good = down.seal("ack".into());
        let mut altered: Sealed = serde_json::from_str(&good).unwrap();
        altered.body = "checks".into();
        assert_eq!(
            down_open.open(&serde_json::to_string(&altered).unwrap()),
            Err(FrameError::BadMac(0))
        );
        let mut other = agent.for_agent().0;
        assert_eq!(
            down_open.open(&other.seal("ack".into())),
            Err(FrameError::BadMac(0)),
            "the agent's own key does not open the server's direction"
        );
        assert_eq!(down_open.open(&good).unwrap(), "ack");
    }

    #[test]
    fn another_session_has_other_keys() {
        let (agent, _) = pair();
        let a = Exchange::from_seed([1; 32]);
        let s = Exchange::from_seed([3; 32]);
        let other = SessionKeys::derive(&a.agree(&s.public_hex()).unwrap(), b"transcript");
        let frame = agent.for_agent().0.seal("x".into());
        assert!(matches!(
            other.for_server().1.open(&frame),
            Err(FrameError::BadMac(0))
        ));
        let (_, s2) = pair();
        let same_exchange_other_transcript = SessionKeys::derive(
            &Exchange::from_seed([2; 32])
                .agree(&Exchange::from_seed([1; 32]).public_hex())
                .unwrap(),
            b"another transcript",
        );
        assert_ne!(s2.session_id, same_exchange_other_transcript.session_id);
        assert!(Exchange::from_seed([1; 32]).agree("00").is_none());
        // The identity point is weak: refused rather than agreeing on zero.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(Exchange::from_seed([1; 32])
            .agree(&hex(&identity))
            .is_none());
    }
}
