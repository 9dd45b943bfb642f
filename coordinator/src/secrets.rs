//! Secrets: named values encrypted at rest with ChaCha20-Poly1305, decrypted into memory at start so the
//! engine can put them into an Assignment without touching the store.
//!
//! The 32-byte key comes from `DROVER_SECRETS_KEY` (64 hex digits) or from `<data>/secrets.key` (hex,
//! mode 0600, created with the first secret). Each value is sealed with a fresh random nonce and its name
//! as associated data, so a ciphertext copied onto another name does not open. Values never leave the
//! coordinator except inside the Assignment for the attempt that names them.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::engine::now_ms;
use crate::error::{CoordError, CoordResult};
use crate::store::{SecretRow, Store};

/// Environment variable holding the key as 64 hex digits (wins over the key file).
pub const KEY_ENV: &str = "DROVER_SECRETS_KEY";
/// Environment variable with the new key for `rotate-secrets-key` when the key comes from the environment.
pub const NEW_KEY_ENV: &str = "DROVER_NEW_SECRETS_KEY";
/// Largest secret value accepted.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// Longest secret name accepted.
pub const MAX_SECRET_NAME: usize = 128;

/// A 256-bit secrets key.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// A new random key.
    pub fn generate() -> CoordResult<SecretKey> {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .map_err(|_| CoordError::Internal("no randomness for a secrets key".into()))?;
        Ok(SecretKey(k))
    }

    /// Parses 64 hex digits (surrounding whitespace ignored); `what` names the source in errors.
    pub fn from_hex(text: &str, what: &str) -> CoordResult<SecretKey> {
        let bytes = hex::decode(text.trim()).map_err(|e| {
            CoordError::InvalidArgument(format!(
                "{what}: the secrets key must be 64 hex digits: {e}"
            ))
        })?;
        let k: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            CoordError::InvalidArgument(format!(
                "{what}: the secrets key must be 32 bytes (64 hex digits), found {} bytes",
                b.len()
            ))
        })?;
        Ok(SecretKey(k))
    }

    fn hex(&self) -> String {
        hex::encode(self.0)
    }

    fn aead(&self) -> CoordResult<LessSafeKey> {
        UnboundKey::new(&CHACHA20_POLY1305, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| CoordError::Internal("bad secrets key length".into()))
    }

    /// Seals `value` under `name`.
    pub fn seal(&self, name: &str, value: &[u8]) -> CoordResult<(Vec<u8>, Vec<u8>)> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CoordError::Internal("no randomness for a nonce".into()))?;
        let mut buf = value.to_vec();
        self.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut buf,
            )
            .map_err(|_| CoordError::Internal(format!("cannot encrypt secret {name:?}")))?;
        Ok((nonce.to_vec(), buf))
    }

    /// Opens a sealed value; fails on a wrong key, a wrong name or a tampered row.
    pub fn open(&self, name: &str, nonce: &[u8], ciphertext: &[u8]) -> CoordResult<Vec<u8>> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| {
            CoordError::Internal(format!("secret {name:?}: stored nonce has a wrong length"))
        })?;
        let mut buf = ciphertext.to_vec();
        let plain = self
            .aead()?
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
            .map_err(|_| {
                CoordError::Internal(format!(
                    "secret {name:?} does not decrypt: wrong secrets key ({KEY_ENV} or secrets.key) \
                     or a tampered row"
                ))
            })?;
        Ok(plain.to_vec())
    }
}

/// Where the key file lives.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets.key")
}

/// Checks a secret name: it becomes an environment variable, so letters, digits and `_`, not starting
/// with a digit.
pub fn check_name(name: &str) -> CoordResult<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SECRET_NAME
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(CoordError::InvalidArgument(format!(
            "invalid secret name {name:?}: expected letters, digits and _, not starting with a digit, \
             at most {MAX_SECRET_NAME} characters"
        )))
    }
}

/// The key from the environment, if set.
fn env_key() -> CoordResult<Option<SecretKey>> {
    match std::env::var(KEY_ENV) {
        Ok(v) if !v.trim().is_empty() => SecretKey::from_hex(&v, KEY_ENV).map(Some),
        _ => Ok(None),
    }
}

/// The key from the environment or the key file, if either exists.
pub fn load_key(data_dir: &Path) -> CoordResult<Option<SecretKey>> {
    if let Some(k) = env_key()? {
        return Ok(Some(k));
    }
    let path = key_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::from_hex(&text, &path.display().to_string()).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CoordError::Internal(format!(
            "cannot read the secrets key {}: {e}",
            path.display()
        ))),
    }
}

/// Writes `key` to `path` with mode 0600 (through a temporary file, so a crash leaves the old key or the
/// new one, never half a key).
fn write_key(path: &Path, key: &SecretKey) -> CoordResult<()> {
    let tmp = path.with_extension("key.tmp");
    let r = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", key.hex()).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    r.map_err(|e| {
        CoordError::Internal(format!(
            "cannot write the secrets key {}: {e}",
            path.display()
        ))
    })
}

#[derive(Debug, Default)]
struct State {
    key: Option<SecretKey>,
    /// name -> (value, updated_ms).
    values: BTreeMap<String, (String, i64)>,
}

/// The secrets of a coordinator: sealed in the store, open in memory. Clone is cheap.
#[derive(Debug, Clone)]
pub struct Secrets {
    store: Store,
    data_dir: PathBuf,
    /// A std mutex: held for a lookup or an insert, never across an await.
    state: Arc<Mutex<State>>,
}

impl Secrets {
    /// Loads and decrypts every stored secret. Fails when secrets exist but no key does, or the key does
    /// not open them: starting without them would fail every job that names one.
    pub async fn open(store: Store, data_dir: &Path) -> CoordResult<Secrets> {
        let rows = store.secrets().await?;
        let mut state = State {
            key: load_key(data_dir)?,
            ..State::default()
        };
        if !rows.is_empty() {
            let key = state.key.clone().ok_or_else(|| {
                CoordError::Internal(format!(
                    "the store holds {} secret(s) but there is no secrets key: {} is missing and {KEY_ENV} \
                     is not set",
                    rows.len(),
                    key_path(data_dir).display()
                ))
            })?;
            for r in rows {
                let plain = key.open(&r.name, &r.nonce, &r.ciphertext)?;
                let value = String::from_utf8(plain).map_err(|_| {
                    CoordError::Internal(format!("secret {:?} is not UTF-8", r.name))
                })?;
                state.values.insert(r.name, (value, r.updated_ms));
            }
        }
        Ok(Secrets {
            store,
            data_dir: data_dir.to_path_buf(),
            state: Arc::new(Mutex::new(state)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key, creating the key file on first use.
    fn key(&self) -> CoordResult<SecretKey> {
        if let Some(k) = self.lock().key.clone() {
            return Ok(k);
        }
        let key = SecretKey::generate()?;
        std::fs::create_dir_all(&self.data_dir).map_err(|e| {
            CoordError::Internal(format!("cannot create {}: {e}", self.data_dir.display()))
        })?;
        write_key(&key_path(&self.data_dir), &key)?;
        tracing::info!(path = %key_path(&self.data_dir).display(), "created the secrets key");
        self.lock().key = Some(key.clone());
        Ok(key)
    }

    /// Stores (creates or replaces) a secret; returns its update time.
    pub async fn set(&self, name: &str, value: &[u8]) -> CoordResult<i64> {
        check_name(name)?;
        if value.is_empty() || value.len() > MAX_SECRET_BYTES {
            return Err(CoordError::InvalidArgument(format!(
                "secret {name:?} has {} bytes: expected 1 to {MAX_SECRET_BYTES}",
                value.len()
            )));
        }
        let text = std::str::from_utf8(value)
            .ok()
            .filter(|t| !t.contains('\0'))
            .ok_or_else(|| {
                CoordError::InvalidArgument(format!(
                    "secret {name:?} must be UTF-8 text without NUL: it becomes an environment variable"
                ))
            })?;
        let key = self.key()?;
        let (nonce, ciphertext) = key.seal(name, value)?;
        let updated_ms = now_ms();
        self.store
            .put_secret(SecretRow {
                name: name.to_string(),
                nonce,
                ciphertext,
                updated_ms,
            })
            .await?;
        self.lock()
            .values
            .insert(name.to_string(), (text.to_string(), updated_ms));
        Ok(updated_ms)
    }

    /// Deletes a secret; whether it existed.
    pub async fn delete(&self, name: &str) -> CoordResult<bool> {
        let existed = self.store.delete_secret(name).await?;
        self.lock().values.remove(name);
        Ok(existed)
    }

    /// Names and update times, by name.
    pub fn list(&self) -> Vec<(String, i64)> {
        self.lock()
            .values
            .iter()
            .map(|(n, (_, t))| (n.clone(), *t))
            .collect()
    }

    /// Whether a secret exists.
    pub fn contains(&self, name: &str) -> bool {
        self.lock().values.contains_key(name)
    }

    /// The values of `names` that exist (for an Assignment).
    pub fn values(&self, names: &[String]) -> BTreeMap<String, String> {
        let st = self.lock();
        names
            .iter()
            .filter_map(|n| st.values.get(n).map(|(v, _)| (n.clone(), v.clone())))
            .collect()
    }
}

/// Re-encrypts every secret under a new key: the one in [`NEW_KEY_ENV`] when the current key comes from
/// [`KEY_ENV`], else a new random key written to `<data>/secrets.key`. The coordinator must be stopped.
/// Returns a line for the operator.
///
/// Order: the new key file is written beside the old one first, then the rows are replaced in one
/// transaction, then the new file replaces the old; a crash in between leaves `secrets.key.new`, and a
/// rerun with it as the current key (rename it) finishes the job.
pub async fn rotate_key(store: &Store, data_dir: &Path) -> CoordResult<String> {
    let old = load_key(data_dir)?;
    let rows = store.secrets().await?;
    let Some(old) = old else {
        if rows.is_empty() {
            return Ok("no secrets and no secrets key: nothing to rotate".into());
        }
        return Err(CoordError::FailedPrecondition(format!(
            "{} secret(s) stored but no key: {} is missing and {KEY_ENV} is not set",
            rows.len(),
            key_path(data_dir).display()
        )));
    };
    let from_env = env_key()?.is_some();
    let new = if from_env {
        let v = std::env::var(NEW_KEY_ENV).map_err(|_| {
            CoordError::InvalidArgument(format!(
                "the key comes from {KEY_ENV}: put the new key (64 hex digits, e.g. `openssl rand -hex 32`) \
                 in {NEW_KEY_ENV}"
            ))
        })?;
        SecretKey::from_hex(&v, NEW_KEY_ENV)?
    } else {
        SecretKey::generate()?
    };
    let mut sealed = Vec::with_capacity(rows.len());
    for r in &rows {
        let plain = old.open(&r.name, &r.nonce, &r.ciphertext)?;
        let (nonce, ciphertext) = new.seal(&r.name, &plain)?;
        sealed.push(SecretRow {
            name: r.name.clone(),
            nonce,
            ciphertext,
            updated_ms: r.updated_ms,
        });
    }
    let path = key_path(data_dir);
    let staged = data_dir.join("secrets.key.new");
    if !from_env {
        write_key(&staged, &new)?;
    }
    store.replace_secrets(sealed).await?;
    if from_env {
        return Ok(format!(
            "re-encrypted {} secret(s) with the key in {NEW_KEY_ENV}: start the coordinator with \
             {KEY_ENV} set to that key",
            rows.len()
        ));
    }
    std::fs::rename(&staged, &path).map_err(|e| {
        CoordError::Internal(format!(
            "the secrets are re-encrypted with the key in {} but it could not replace {}: {e}; \
             rename it by hand",
            staged.display(),
            path.display()
        ))
    })?;
    Ok(format!(
        "re-encrypted {} secret(s) with a new key in {}",
        rows.len(),
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sealed_at_rest_open_in_memory_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.sqlite");
        let store = Store::open(&db).unwrap();
        let s = Secrets::open(store.clone(), dir.path()).await.unwrap();
        assert!(!key_path(dir.path()).exists(), "the key is made lazily");
        s.set("DEPLOY_KEY", b"hunter2-very-secret").await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(s.contains("DEPLOY_KEY"));
        assert_eq!(
            s.values(&["DEPLOY_KEY".into(), "NOPE".into()]),
            BTreeMap::from([("DEPLOY_KEY".into(), "hunter2-very-secret".into())])
        );
        // Not in the database file in plaintext.
        drop(s);
        let raw = std::fs::read(&db).unwrap();
        let wal = std::fs::read(dir.path().join("s.sqlite-wal")).unwrap_or_default();
        for bytes in [&raw, &wal] {
            assert!(!bytes.windows(8).any(|w| w == b"hunter2-"));
        }
        // Reopen decrypts; a moved ciphertext does not open under another name.
        let again = Secrets::open(store.clone(), dir.path()).await.unwrap();
        assert_eq!(again.list().len(), 1);
        let row = store.secret("DEPLOY_KEY").await.unwrap().unwrap();
        let key = load_key(dir.path()).unwrap().unwrap();
        assert!(key.open("OTHER", &row.nonce, &row.ciphertext).is_err());
        // Rotation: a new key that opens the same values; the old one no longer does.
        let msg = rotate_key(&store, dir.path()).await.unwrap();
        assert!(msg.contains("re-encrypted 1"), "{msg}");
        let new_key = load_key(dir.path()).unwrap().unwrap();
        assert_ne!(new_key.hex(), key.hex());
        let row = store.secret("DEPLOY_KEY").await.unwrap().unwrap();
        assert!(key.open("DEPLOY_KEY", &row.nonce, &row.ciphertext).is_err());
        let rotated = Secrets::open(store.clone(), dir.path()).await.unwrap();
        assert_eq!(
            rotated.values(&["DEPLOY_KEY".into()])["DEPLOY_KEY"],
            "hunter2-very-secret"
        );
        // A wrong key refuses to start rather than run jobs without their secrets.
        std::fs::write(key_path(dir.path()), format!("{}\n", "00".repeat(32))).unwrap();
        let e = Secrets::open(store.clone(), dir.path()).await.unwrap_err();
        assert!(e.to_string().contains("does not decrypt"), "{e}");
        std::fs::remove_file(key_path(dir.path())).unwrap();
        let e = Secrets::open(store, dir.path()).await.unwrap_err();
        assert!(e.to_string().contains("no secrets key"), "{e}");
    }

    #[tokio::test]
    async fn names_and_values_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = Secrets::open(Store::open_in_memory().unwrap(), dir.path())
            .await
            .unwrap();
        for bad in ["", "1X", "A-B", "A B", "a.b"] {
            assert!(s.set(bad, b"v").await.is_err(), "{bad:?}");
        }
        assert!(s.set("OK", b"").await.is_err());
        assert!(s.set("OK", b"a\0b").await.is_err());
        assert!(s.set("OK", &[0xff, 0xfe]).await.is_err());
        assert!(s
            .set("OK", &vec![b'x'; MAX_SECRET_BYTES + 1])
            .await
            .is_err());
        s.set("ok_2", b"v").await.unwrap();
        assert!(s.delete("ok_2").await.unwrap());
        assert!(!s.delete("ok_2").await.unwrap());
        assert!(s.list().is_empty());
    }
}
