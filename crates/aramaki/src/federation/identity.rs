//! The instance identity: an Ed25519 key kept in the data directory (mode
//! 0600) and a stable instance id kept in the database.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, RwLock};

use aramaki_protocol::federation::{rotation_transcript, KeyRotation, RetiredKey};

use ed25519_dalek::{SigningKey, VerifyingKey};

pub const KEY_FILE: &str = "instance.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write the identity key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the identity key {path} is damaged: expected 64 hex digits")]
    Damaged { path: String },
    #[error("no randomness available: {0}")]
    Random(String),
}

/// This instance: its id, its name and its signing key. Clones share the
/// key, so a rotation reaches every holder at once.
#[derive(Clone)]
pub struct Identity {
    pub instance_id: String,
    pub name: String,
    keys: Arc<RwLock<KeyBook>>,
}

/// The current key and the history peers need to follow it.
struct KeyBook {
    key: SigningKey,
    /// Each rotation, oldest first, signed by the key before it.
    rotations: Vec<KeyRotation>,
    retired: Vec<RetiredKey>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("instance_id", &self.instance_id)
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn new(instance_id: String, name: String, key: SigningKey) -> Identity {
        Identity {
            instance_id,
            name,
            keys: Arc::new(RwLock::new(KeyBook {
                key,
                rotations: Vec::new(),
                retired: Vec::new(),
            })),
        }
    }

    fn book(&self) -> std::sync::RwLockReadGuard<'_, KeyBook> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn book_mut(&self) -> std::sync::RwLockWriteGuard<'_, KeyBook> {
        self.keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current signing key, for TLS: the listener's certificate is made
    /// from it.
    pub fn signing_key(&self) -> SigningKey {
        self.book().key.clone()
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.book().key.verifying_key()
    }

    /// The rotations so far, oldest first (sent when a link opens).
    pub fn rotations(&self) -> Vec<KeyRotation> {
        self.book().rotations.clone()
    }

    /// Keys this instance used before, with when they were retired.
    pub fn retired_keys(&self) -> Vec<RetiredKey> {
        self.book().retired.clone()
    }

    /// Sets the key history read from the database at start.
    pub fn set_history(&self, rotations: Vec<KeyRotation>, retired: Vec<RetiredKey>) {
        let mut book = self.book_mut();
        book.rotations = rotations;
        book.retired = retired;
    }

    /// The current key's signature handing over to `next` (not yet used).
    pub fn rotation_step(&self, next: &VerifyingKey, at: i64) -> KeyRotation {
        use ed25519_dalek::Signer;
        let public_key = hex(next.as_bytes());
        let proof = self
            .book()
            .key
            .sign(&rotation_transcript(&self.instance_id, &public_key, at));
        KeyRotation {
            public_key,
            rotated_at: at,
            proof: hex(&proof.to_bytes()),
        }
    }

    /// Switches to `next` once the rotation is recorded: the current key
    /// is retired.
    pub fn complete_rotation(&self, next: SigningKey, step: KeyRotation) {
        let mut book = self.book_mut();
        let old = hex(book.key.verifying_key().as_bytes());
        book.retired.push(RetiredKey {
            public_key: old,
            retired_at: step.rotated_at,
        });
        book.rotations.push(step);
        book.key = next;
    }

    pub fn public_key_hex(&self) -> String {
        hex(self.public_key().as_bytes())
    }

    /// Signs `message` with the instance key (agents and peers verify it
    /// against the key they pinned).
    pub fn sign(&self, message: &[u8]) -> ed25519_dalek::Signature {
        use ed25519_dalek::Signer;
        self.book().key.sign(message)
    }

    /// A short, readable fingerprint of the public key.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.public_key())
    }
}

/// `ABCD-EFGH-IJKL-MNOP`: the first 80 bits of SHA-256 over the key, base32.
pub fn fingerprint(key: &VerifyingKey) -> String {
    aramaki_protocol::keys::fingerprint(key.as_bytes())
}

/// Loads the key from `dir/instance.key`, generating it (mode 0600) if absent.
/// Returns the key and whether it was created now.
pub fn load_or_create_key(dir: &Path) -> Result<(SigningKey, bool), IdentityError> {
    let path = dir.join(KEY_FILE);
    let shown = path.display().to_string();
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(|source| IdentityError::Io {
            path: shown.clone(),
            source,
        })?;
        let bytes = unhex(text.trim()).ok_or(IdentityError::Damaged {
            path: shown.clone(),
        })?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| IdentityError::Damaged { path: shown })?;
        return Ok((SigningKey::from_bytes(&seed), false));
    }
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
    write_private(&path, format!("{}\n", hex(&seed)).as_bytes()).map_err(|source| {
        IdentityError::Io {
            path: shown,
            source,
        }
    })?;
    Ok((SigningKey::from_bytes(&seed), true))
}

/// Where a rotation writes the next key before the database knows it.
pub const NEXT_KEY_FILE: &str = "instance.key.next";

/// Generates a new key and writes it to `dir/instance.key.next` (0600).
pub fn create_next_key(dir: &Path) -> Result<SigningKey, IdentityError> {
    let path = dir.join(NEXT_KEY_FILE);
    let shown = path.display().to_string();
    let _ = std::fs::remove_file(&path);
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
    write_private(&path, format!("{}\n", hex(&seed)).as_bytes()).map_err(|source| {
        IdentityError::Io {
            path: shown,
            source,
        }
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Makes the next key the key (after the database recorded it).
pub fn promote_next_key(dir: &Path) -> Result<(), IdentityError> {
    let path = dir.join(KEY_FILE);
    std::fs::rename(dir.join(NEXT_KEY_FILE), &path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// At start: finishes a rotation the database recorded but a crash kept
/// from renaming, or drops one it never recorded.
pub fn settle_next_key(dir: &Path, recorded_public_key: &str) -> Result<(), IdentityError> {
    let next = dir.join(NEXT_KEY_FILE);
    if !next.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&next).map_err(|source| IdentityError::Io {
        path: next.display().to_string(),
        source,
    })?;
    let matches = unhex(text.trim())
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(|seed| hex(SigningKey::from_bytes(&seed).verifying_key().as_bytes()))
        .is_some_and(|k| k == recorded_public_key);
    if matches {
        promote_next_key(dir)
    } else {
        std::fs::remove_file(&next).map_err(|source| IdentityError::Io {
            path: next.display().to_string(),
            source,
        })
    }
}

/// Creates a file readable by its owner only, refusing to overwrite.
fn write_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

pub use aramaki_protocol::keys::{base32, hex, unhex};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (key, created) = load_or_create_key(dir.path()).unwrap();
        assert!(created);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (again, created) = load_or_create_key(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(key.to_bytes(), again.to_bytes());
    }

    #[test]
    fn damaged_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "zz").unwrap();
        assert!(matches!(
            load_or_create_key(dir.path()),
            Err(IdentityError::Damaged { .. })
        ));
    }

    #[test]
    fn fingerprint_is_grouped_base32() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let fp = fingerprint(&key.verifying_key());
        assert_eq!(fp.len(), 19);
        assert_eq!(fp.matches('-').count(), 3);
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(unhex(&hex(&[0, 255, 16])), Some(vec![0, 255, 16]));
    }
}
