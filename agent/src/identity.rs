//! The agent's client certificate for mutual TLS: a key pair generated on the host (the private key
//! never leaves it), a certificate signing request sent at enrollment and at renewal, and the signed
//! certificate, kept as `<state>/client.pem` and `<state>/client.key` (both mode 0600).
//!
//! The certificate in use sits behind a [`SharedIdentity`] that the TLS connector reads at every
//! handshake, so a renewal takes effect on the next connection without restarting anything.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, KeyPair};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

/// What went wrong with the client certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A certificate or key is unusable.
    #[error("client certificate: {0}")]
    Invalid(String),
}

/// A client certificate and its private key, as PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PEM, PKCS#8).
    pub key_pem: String,
}

/// A fresh key pair and a certificate signing request for it (PEM). The subject is left empty: the
/// coordinator names the agent.
pub fn new_request() -> Result<(String, String), IdentityError> {
    let key = KeyPair::generate().map_err(|e| IdentityError::Invalid(format!("key: {e}")))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| IdentityError::Invalid(format!("certificate request: {e}")))?;
    Ok((key.serialize_pem(), csr))
}

/// Path of the client certificate in `state_dir`.
pub fn cert_path(state_dir: &Path) -> PathBuf {
    state_dir.join("client.pem")
}

/// Path of the client certificate's key in `state_dir`.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("client.key")
}

/// Loads the client certificate, `None` when the agent has none (enrolled without mutual TLS).
pub fn load(state_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let read = |p: PathBuf| match std::fs::read_to_string(&p) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io { path: p, source }),
    };
    match (read(cert_path(state_dir))?, read(key_path(state_dir))?) {
        (Some(cert_pem), Some(key_pem)) => Ok(Some(Identity { cert_pem, key_pem })),
        (None, None) => Ok(None),
        _ => Err(IdentityError::Invalid(format!(
            "one of {} and {} is missing; delete both and credential.json to enroll again",
            cert_path(state_dir).display(),
            key_path(state_dir).display()
        ))),
    }
}

/// Stores the certificate and key with mode 0600, each written to a temporary file and renamed, the
/// key first (a crash between the two leaves the old certificate with a key it does not match, which
/// [`Identity::certified_key`] reports).
pub fn store(state_dir: &Path, id: &Identity) -> Result<(), IdentityError> {
    write_private(&key_path(state_dir), id.key_pem.as_bytes())?;
    write_private(&cert_path(state_dir), id.cert_pem.as_bytes())
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Identity {
    fn cert_der(&self) -> Result<CertificateDer<'static>, IdentityError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| IdentityError::Invalid(format!("bad PEM certificate: {e}")))
    }

    /// The certificate's validity as unix seconds: (not before, not after).
    pub fn validity(&self) -> Result<(i64, i64), IdentityError> {
        let der = self.cert_der()?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| IdentityError::Invalid(format!("cannot parse: {e}")))?;
        let v = cert.validity();
        Ok((v.not_before.timestamp(), v.not_after.timestamp()))
    }

    /// When to renew: two thirds into the validity, as a delay from now (zero when already due).
    pub fn renew_in(&self) -> Result<Duration, IdentityError> {
        let (from, until) = self.validity()?;
        let at = from + (until - from) * 2 / 3;
        Ok(Duration::from_secs(
            at.saturating_sub(unix_now()).max(0) as u64
        ))
    }

    /// True when the certificate's validity has ended.
    pub fn expired(&self) -> Result<bool, IdentityError> {
        Ok(self.validity()?.1 <= unix_now())
    }

    /// The rustls form: certificate and signing key, checked to belong together.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, IdentityError> {
        let provider = rustls::crypto::ring::default_provider();
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| IdentityError::Invalid(format!("bad private key: {e}")))?;
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| IdentityError::Invalid(format!("unusable private key: {e}")))?;
        let ck = CertifiedKey::new(vec![self.cert_der()?], signer);
        ck.keys_match()
            .map_err(|e| IdentityError::Invalid(format!("certificate and key differ: {e}")))?;
        Ok(Arc::new(ck))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The client certificate presented on new TLS connections; replaced by a renewal.
#[derive(Debug, Clone)]
pub struct SharedIdentity(Arc<Resolver>);

#[derive(Debug)]
struct Resolver {
    /// A std lock: read at each handshake, written at a renewal, never held across an await.
    current: RwLock<(Identity, Arc<CertifiedKey>)>,
}

impl SharedIdentity {
    /// Starts with `id`.
    pub fn new(id: Identity) -> Result<Self, IdentityError> {
        let ck = id.certified_key()?;
        Ok(SharedIdentity(Arc::new(Resolver {
            current: RwLock::new((id, ck)),
        })))
    }

    /// The identity in use.
    pub fn current(&self) -> Identity {
        self.0
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Uses `id` for connections made from now on.
    pub fn replace(&self, id: Identity) -> Result<(), IdentityError> {
        let ck = id.certified_key()?;
        *self.0.current.write().unwrap_or_else(|p| p.into_inner()) = (id, ck);
        Ok(())
    }

    /// The rustls certificate resolver reading this identity.
    pub fn resolver(&self) -> Arc<dyn ResolvesClientCert> {
        self.0.clone()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .1
                .clone(),
        )
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Renews the client certificate at two thirds of its validity, for as long as the agent runs: a new
/// key, a request signed over a connection presenting the current certificate, the result stored in
/// `state_dir` and used for the next connections. A failure is retried with backoff while the current
/// certificate lasts.
pub async fn keep_renewed(
    client: crate::client::AgentClient,
    identity: SharedIdentity,
    state_dir: PathBuf,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut backoff = crate::backoff::Backoff::default();
    loop {
        let wait = match identity.current().renew_in() {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("cannot schedule the client certificate's renewal: {e}");
                return;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        match renew_once(&client, &identity, &state_dir).await {
            Ok(until) => {
                tracing::info!(valid_until_unix = until, "renewed the client certificate");
                backoff.reset();
            }
            Err(e) => {
                tracing::warn!("renewing the client certificate failed (will retry): {e}");
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn renew_once(
    client: &crate::client::AgentClient,
    identity: &SharedIdentity,
    state_dir: &Path,
) -> Result<i64, String> {
    let (key_pem, csr) = new_request().map_err(|e| e.to_string())?;
    let cert_pem = crate::client::renew_certificate(client, &csr)
        .await
        .map_err(|e| e.to_string())?;
    let id = Identity { cert_pem, key_pem };
    let until = id.validity().map_err(|e| e.to_string())?.1;
    // Stored first: a restart right after uses the new certificate too.
    store(state_dir, &id).map_err(|e| e.to_string())?;
    identity.replace(id).map_err(|e| e.to_string())?;
    Ok(until)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn self_signed(key_pem: &str, days: i64) -> String {
        let key = KeyPair::from_pem(key_pem).unwrap();
        let mut p = CertificateParams::new(vec!["agent".into()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(days);
        p.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn stores_privately_and_knows_when_to_renew() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let (key_pem, csr) = new_request().unwrap();
        assert!(csr.contains("BEGIN CERTIFICATE REQUEST"));
        let id = Identity {
            cert_pem: self_signed(&key_pem, 2),
            key_pem,
        };
        store(dir.path(), &id).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(id.clone()));
        for p in [cert_path(dir.path()), key_path(dir.path())] {
            assert_eq!(
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        // Valid from a day ago for three days: renewal is due at two thirds, a day from now.
        let renew = id.renew_in().unwrap().as_secs();
        assert!((86_000..=86_400).contains(&renew), "{renew}");
        assert!(!id.expired().unwrap());
        let shared = SharedIdentity::new(id.clone()).unwrap();
        assert!(shared.resolver().has_certs());

        // A certificate with someone else's key is refused.
        let (other_key, _) = new_request().unwrap();
        let mixed = Identity {
            cert_pem: id.cert_pem.clone(),
            key_pem: other_key,
        };
        assert!(shared.replace(mixed).is_err());
        assert_eq!(shared.current(), id);

        std::fs::remove_file(key_path(dir.path())).unwrap();
        assert!(load(dir.path()).is_err());
    }
}
