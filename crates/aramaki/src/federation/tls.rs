//! TLS between peers with the peer's key pinned.
//!
//! With `federation.listen` set, an instance serves TLS with a certificate
//! made from its Ed25519 instance key, so there is no CA to trust: a peer
//! that dials it accepts the connection only if the certificate carries the
//! key it pinned at peering (and the handshake proves the private key). An
//! invite pins by fingerprint before any key is known. Peers behind a
//! reverse proxy with a public certificate are verified with the public
//! roots instead; their envelopes stay pinned either way.

use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

use super::identity::Identity;

/// `id-Ed25519` (1.3.101.112) as an AlgorithmIdentifier.
const ED25519_ALG: [u8; 7] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend([0x81, len as u8]);
    } else {
        out.extend([0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    der(0x30, &parts.concat())
}

/// A self-signed X.509 v3 certificate for `key`, named after the instance.
/// Validity is unbounded: trust comes from the pinned key, not from dates.
pub fn certificate(key: &SigningKey, name: &str) -> Vec<u8> {
    let public = key.verifying_key();
    let mut serial = Sha256::digest(public.as_bytes())[..16].to_vec();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    let cn: String = name.chars().take(64).collect();
    let rdn = seq(&[&der(
        0x31,
        &seq(&[&der(0x06, &[0x55, 0x04, 0x03]), &der(0x0c, cn.as_bytes())]),
    )]);
    let validity = seq(&[&der(0x17, b"000101000000Z"), &der(0x18, b"99991231235959Z")]);
    let mut key_bits = vec![0x00];
    key_bits.extend_from_slice(public.as_bytes());
    let spki = seq(&[&ED25519_ALG, &der(0x03, &key_bits)]);
    let tbs = seq(&[
        &der(0xa0, &der(0x02, &[0x02])),
        &der(0x02, &serial),
        &ED25519_ALG,
        &rdn,
        &validity,
        &rdn,
        &spki,
    ]);
    let mut signature = vec![0x00];
    signature.extend_from_slice(&key.sign(&tbs).to_bytes());
    seq(&[&tbs, &ED25519_ALG, &der(0x03, &signature)])
}

/// The key as PKCS#8 v1 (RFC 8410), which rustls loads.
fn pkcs8(key: &SigningKey) -> Vec<u8> {
    let inner = der(0x04, key.as_bytes());
    seq(&[&der(0x02, &[0x00]), &ED25519_ALG, &der(0x04, &inner)])
}

/// One DER element: (tag, content, rest).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(*rest.first()?) << 8 | usize::from(*rest.get(1)?),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The Ed25519 key a certificate carries, read from its
/// subjectPublicKeyInfo by structure (never by searching the bytes).
pub fn ed25519_key(cert: &[u8]) -> Option<[u8; 32]> {
    let (0x30, cert, _) = element(cert)? else {
        return None;
    };
    let (0x30, mut tbs, _) = element(cert)? else {
        return None;
    };
    if tbs.first() == Some(&0xa0) {
        tbs = element(tbs)?.2;
    }
    // serial, signature, issuer, validity, subject, then the key.
    for _ in 0..5 {
        tbs = element(tbs)?.2;
    }
    let (0x30, spki, _) = element(tbs)? else {
        return None;
    };
    let (0x30, alg, bits) = element(spki)? else {
        return None;
    };
    if der(0x30, alg) != ED25519_ALG {
        return None;
    }
    let (0x03, bits, _) = element(bits)? else {
        return None;
    };
    match bits.split_first() {
        Some((0, key)) => key.try_into().ok(),
        _ => None,
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves the certificate of the instance's current key; a rotation takes
/// effect with the next handshake.
#[derive(Debug)]
struct InstanceCert {
    identity: Identity,
    current: Mutex<Option<([u8; 32], Arc<CertifiedKey>)>>,
    provider: Arc<CryptoProvider>,
}

impl InstanceCert {
    fn certified(&self) -> Option<Arc<CertifiedKey>> {
        let key = self.identity.signing_key();
        let public = *key.verifying_key().as_bytes();
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((k, certified)) = current.as_ref() {
            if *k == public {
                return Some(certified.clone());
            }
        }
        let cert = CertificateDer::from(certificate(&key, &self.identity.name));
        let private = PrivateKeyDer::Pkcs8(pkcs8(&key).into());
        let signer = match self.provider.key_provider.load_private_key(private) {
            Ok(signer) => signer,
            Err(e) => {
                tracing::error!(error = %e, "cannot load the instance key for TLS");
                return None;
            }
        };
        let certified = Arc::new(CertifiedKey::new(vec![cert], signer));
        *current = Some((public, certified.clone()));
        Some(certified)
    }
}

impl ResolvesServerCert for InstanceCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certified()
    }
}

/// The listener's TLS configuration: the instance key's certificate.
pub fn server_config(identity: Identity) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = provider();
    let resolver = InstanceCert {
        identity,
        current: Mutex::new(None),
        provider: provider.clone(),
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What a dialer expects of the certificate.
#[derive(Debug, Clone)]
pub enum Pin {
    /// The peer's pinned key.
    Key([u8; 32]),
    /// The compact fingerprint from an invite, before any key is pinned.
    Fingerprint(String),
}

impl Pin {
    fn admits(&self, key: &[u8; 32]) -> bool {
        use subtle::ConstantTimeEq;
        match self {
            Pin::Key(pinned) => bool::from(pinned.ct_eq(key)),
            Pin::Fingerprint(f) => {
                let seen = aramaki_protocol::keys::compact_fingerprint(key);
                bool::from(seen.as_bytes().ct_eq(f.as_bytes()))
            }
        }
    }
}

/// Accepts a certificate that carries the pinned key; otherwise, unless
/// strict, one the public roots vouch for (a peer behind a proxy).
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: Pin,
    public_roots: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if ed25519_key(end_entity).is_some_and(|k| self.pin.admits(&k)) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.public_roots {
            Some(roots) => roots
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
                .map_err(|e| {
                    rustls::Error::General(format!(
                        "the certificate does not carry the peer's pinned key, nor do public roots vouch for it ({e})"
                    ))
                }),
            None => Err(rustls::Error::General(
                "the certificate does not carry the peer's pinned key".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration for dialing a peer: `strict` once the peer is
/// known to serve its instance key, so no CA can stand in for it.
pub fn client_config(pin: Pin, strict: bool) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = provider();
    let public_roots = if strict {
        None
    } else {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Some(
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?,
        )
    };
    let verifier = PinnedVerifier {
        pin,
        public_roots,
        provider: provider.clone(),
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The federation listener: TCP, then TLS with the instance key. Each
/// handshake runs in its own task, so a slow client holds up nobody.
pub struct Listener {
    incoming: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

impl Listener {
    pub fn new(tcp: tokio::net::TcpListener, config: Arc<rustls::ServerConfig>) -> Listener {
        let local = tcp
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, incoming) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "federation listener cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        acceptor.accept(stream),
                    );
                    match handshake.await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, addr)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Listener { incoming, local }
    }
}

impl axum::serve::Listener for Listener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(accepted) => accepted,
            // The accept task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_carries_its_key_and_only_that() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let cert = certificate(&key, "hosting");
        assert_eq!(ed25519_key(&cert), Some(*key.verifying_key().as_bytes()));
        let other = SigningKey::from_bytes(&[8; 32]);
        assert_ne!(ed25519_key(&cert), Some(*other.verifying_key().as_bytes()));
        // Truncated or mangled input is no key, not a panic.
        for cut in [0, 1, 10, cert.len() / 2, cert.len() - 1] {
            assert_eq!(ed25519_key(&cert[..cut]), None, "cut at {cut}");
        }
        let mut wrong_alg = cert.clone();
        // The algorithm occurs three times: signature, key, signature again.
        let at = cert
            .windows(ED25519_ALG.len())
            .enumerate()
            .filter(|(_, w)| *w == ED25519_ALG)
            .map(|(i, _)| i)
            .nth(1)
            .unwrap();
        wrong_alg[at + 6] = 0x71; // id-Ed448
        assert_eq!(ed25519_key(&wrong_alg), None);
    }

    #[test]
    fn pins_admit_their_key_alone() {
        let key = *SigningKey::from_bytes(&[7; 32]).verifying_key().as_bytes();
        let other = *SigningKey::from_bytes(&[8; 32]).verifying_key().as_bytes();
        assert!(Pin::Key(key).admits(&key));
        assert!(!Pin::Key(key).admits(&other));
        let fp = Pin::Fingerprint(aramaki_protocol::keys::compact_fingerprint(&key));
        assert!(fp.admits(&key));
        assert!(!fp.admits(&other));
    }

    async fn handshake(server_key: SigningKey, pin: Pin) -> Result<(), String> {
        let identity = Identity::new("i".into(), "hosting".into(), server_key);
        let server = server_config(identity).map_err(|e| e.to_string())?;
        let client = client_config(pin, true).map_err(|e| e.to_string())?;
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            tokio_rustls::TlsAcceptor::from(server)
                .accept(a)
                .await
                .map(|_| ())
        });
        let name = ServerName::try_from("peer.example").map_err(|e| e.to_string())?;
        let connected = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, b)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = accept.await;
        connected
    }

    #[tokio::test]
    async fn a_dialer_accepts_the_pinned_key_and_refuses_any_other() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = *key.verifying_key().as_bytes();
        handshake(key.clone(), Pin::Key(public)).await.unwrap();
        handshake(
            key.clone(),
            Pin::Fingerprint(aramaki_protocol::keys::compact_fingerprint(&public)),
        )
        .await
        .unwrap();
        let impostor = SigningKey::from_bytes(&[9; 32]);
        let refused = handshake(impostor, Pin::Key(public)).await.unwrap_err();
        assert!(refused.contains("pinned key"), "{refused}");
    }
}
