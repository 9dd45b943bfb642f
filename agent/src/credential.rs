//! The agent's identity after enrollment: `<state>/credential.json`, readable by its owner only.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What enrollment gave this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The agent id.
    pub agent_id: String,
    /// The secret credential.
    pub credential: String,
    /// The coordinator that issued it.
    pub coordinator: String,
}

/// The credential file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// I/O on the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid credential.
    #[error("{path} is not a valid credential file ({message}); delete it to enroll again")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Path of the credential file in `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("credential.json")
}

/// Loads the credential, `None` if the agent has not enrolled yet.
pub fn load(state_dir: &Path) -> Result<Option<Credential>, CredentialError> {
    let p = path(state_dir);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CredentialError::Io { path: p, source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| CredentialError::Invalid {
            path: p,
            message: e.to_string(),
        })
}

/// Stores the credential atomically with mode 0600.
pub fn store(state_dir: &Path, cred: &Credential) -> Result<(), CredentialError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CredentialError::Io { path, source }
    };
    std::fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    let final_path = path(state_dir);
    let tmp = state_dir.join("credential.json.tmp");
    let json = serde_json::to_vec_pretty(cred).map_err(|e| CredentialError::Invalid {
        path: final_path.clone(),
        message: e.to_string(),
    })?;
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(&json).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
    Ok(())
}

/// Path of the CA certificate the agent enrolled with, in `state_dir`.
pub fn ca_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ca.pem")
}

/// The CA certificate (PEM) to trust: `ca_file` when given, else the one kept at enrollment, else none
/// (plaintext, or an https:// coordinator the system roots trust).
pub fn load_ca(
    state_dir: &Path,
    ca_file: Option<&Path>,
) -> Result<Option<Vec<u8>>, CredentialError> {
    let p = match ca_file {
        Some(p) => p.to_path_buf(),
        None => ca_path(state_dir),
    };
    match std::fs::read(&p) {
        Ok(pem) if pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") => Ok(Some(pem)),
        Ok(_) => Err(CredentialError::Invalid {
            path: p,
            message: "no PEM CERTIFICATE block".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && ca_file.is_none() => Ok(None),
        Err(source) => Err(CredentialError::Io { path: p, source }),
    }
}

/// Keeps the CA certificate the agent enrolled with beside its credential.
pub fn store_ca(state_dir: &Path, pem: &[u8]) -> Result<(), CredentialError> {
    let p = ca_path(state_dir);
    std::fs::write(&p, pem).map_err(|source| CredentialError::Io { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trips_with_owner_only_mode() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        assert_eq!(load(&state).unwrap(), None);
        let cred = Credential {
            agent_id: "a1".into(),
            credential: "secret".into(),
            coordinator: "http://127.0.0.1:1".into(),
        };
        store(&state, &cred).unwrap();
        assert_eq!(load(&state).unwrap(), Some(cred));
        let mode = std::fs::metadata(path(&state))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(path(&state), "{").unwrap();
        assert!(matches!(load(&state), Err(CredentialError::Invalid { .. })));
    }
}
