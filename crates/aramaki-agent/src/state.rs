//! The agent's state directory: its own key (mode 0600), the server key it
//! pinned at enrollment, its registration, the last check definitions the
//! server sent, and the result queue.

use std::io::Write;
use std::path::{Path, PathBuf};

use aramaki_protocol::agent::CheckDefinition;
use aramaki_protocol::keys::{hex, unhex_array};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

pub const KEY_FILE: &str = "agent.key";
pub const SERVER_KEY_FILE: &str = "server.key";
pub const REGISTRATION_FILE: &str = "registration.json";
pub const CHECKS_FILE: &str = "checks.json";
pub const QUEUE_DIR: &str = "queue";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged: {what}")]
    Damaged { path: PathBuf, what: String },
    #[error("this agent is not enrolled yet (no {0}); run `aramaki-agent enroll --server URL --token TOKEN` first")]
    NotEnrolled(PathBuf),
    #[error("no randomness available: {0}")]
    Random(String),
}

/// What enrollment recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub agent_id: String,
    pub name: String,
    pub system: String,
    /// The server's base URL (`http(s)://host:port`).
    pub server: String,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl StateDir {
    /// Opens (and creates, mode 0700) the directory.
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A fresh key, replacing any earlier one (enrollment only).
    pub fn new_key(&self) -> Result<SigningKey, StateError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| StateError::Random(e.to_string()))?;
        self.write_key(&seed)?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// Stores the key's seed (mode 0600).
    pub fn write_key(&self, seed: &[u8; 32]) -> Result<(), StateError> {
        write_private(&self.path(KEY_FILE), format!("{}\n", hex(seed)).as_bytes())
    }

    pub fn key(&self) -> Result<SigningKey, StateError> {
        let path = self.path(KEY_FILE);
        if !path.exists() {
            return Err(StateError::NotEnrolled(path));
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let seed = unhex_array::<32>(text.trim()).ok_or_else(|| StateError::Damaged {
            path: path.clone(),
            what: "expected 64 hex digits".into(),
        })?;
        Ok(SigningKey::from_bytes(&seed))
    }

    pub fn pin_server_key(&self, key: &VerifyingKey) -> Result<(), StateError> {
        write_private(
            &self.path(SERVER_KEY_FILE),
            format!("{}\n", hex(key.as_bytes())).as_bytes(),
        )
    }

    pub fn server_key(&self) -> Result<VerifyingKey, StateError> {
        let path = self.path(SERVER_KEY_FILE);
        if !path.exists() {
            return Err(StateError::NotEnrolled(path));
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        unhex_array::<32>(text.trim())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .ok_or_else(|| StateError::Damaged {
                path,
                what: "expected an Ed25519 public key in 64 hex digits".into(),
            })
    }

    pub fn save_registration(&self, r: &Registration) -> Result<(), StateError> {
        let text = serde_json::to_vec_pretty(r).map_err(|e| StateError::Damaged {
            path: self.path(REGISTRATION_FILE),
            what: e.to_string(),
        })?;
        write_private(&self.path(REGISTRATION_FILE), &text)
    }

    pub fn registration(&self) -> Result<Registration, StateError> {
        let path = self.path(REGISTRATION_FILE);
        if !path.exists() {
            return Err(StateError::NotEnrolled(path));
        }
        let text = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&text).map_err(|e| StateError::Damaged {
            path,
            what: e.to_string(),
        })
    }

    /// The checks the server sent last, so they keep running after a
    /// restart while the server is unreachable.
    pub fn save_checks(&self, checks: &[CheckDefinition]) -> Result<(), StateError> {
        let text = serde_json::to_vec(checks).map_err(|e| StateError::Damaged {
            path: self.path(CHECKS_FILE),
            what: e.to_string(),
        })?;
        write_private(&self.path(CHECKS_FILE), &text)
    }

    pub fn checks(&self) -> Vec<CheckDefinition> {
        std::fs::read(self.path(CHECKS_FILE))
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .unwrap_or_default()
    }

    pub fn queue_dir(&self) -> PathBuf {
        self.path(QUEUE_DIR)
    }
}

/// Writes a file readable by its owner only, atomically (temp + rename).
fn write_private(path: &Path, content: &[u8]) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io(&tmp))?;
    file.write_all(content).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("s")).unwrap();
        assert!(matches!(state.key(), Err(StateError::NotEnrolled(_))));
        let key = state.new_key().unwrap();
        assert_eq!(state.key().unwrap().to_bytes(), key.to_bytes());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("s").join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        state.pin_server_key(&key.verifying_key()).unwrap();
        assert_eq!(state.server_key().unwrap(), key.verifying_key());
    }
}
