//! Mutual TLS for agents: the CA that signs agents' client certificates, and the per-call check that
//! the certificate the connection presented names the agent whose credential the call carries.
//!
//! The TLS handshake verifies a presented client certificate against this CA (rustls'
//! `WebPkiClientVerifier`) but lets a connection without one through, because `Enroll` (token only) and
//! the ControlService (API tokens) are served on the same listener. Every other AgentService call is
//! checked here, from the peer certificates tonic exposes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::error::{CoordError, CoordResult};
use crate::tls::TlsError;

/// Default validity of an agent's client certificate. Agents renew at two thirds of it.
pub const DEFAULT_AGENT_CERT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Largest certificate signing request accepted (a P-256 or RSA-4096 request is well below this).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Clock skew tolerated between coordinator and agents: certificates are valid from this long ago.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The URI subject alternative name naming an agent: `urn:drover:agent:<id>`.
pub const AGENT_URI_PREFIX: &str = "urn:drover:agent:";

/// The CA that issues agents' client certificates.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    ttl: Duration,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl AgentCa {
    /// Loads a CA certificate (PEM) and its private key (PEM, PKCS#8). `ttl` bounds the certificates
    /// it issues.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        ttl: Duration,
    ) -> Result<Arc<AgentCa>, TlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let pem_err = |path: &Path, message: String| TlsError::Pem {
            path: path.to_path_buf(),
            message,
        };
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| pem_err(key_path, format!("bad agent CA key: {e}")))?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| pem_err(cert_path, format!("bad agent CA certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| pem_err(cert_path, format!("unusable agent CA certificate: {e}")))?;
        Ok(Arc::new(AgentCa { issuer, cert, ttl }))
    }

    /// The CA certificate, the one root client certificates are verified against.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// How long the certificates it issues are valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Parses and verifies (proof of key possession) a PEM certificate signing request.
    pub fn parse_csr(pem: &str) -> CoordResult<CertificateSigningRequestParams> {
        if pem.trim().is_empty() {
            return Err(CoordError::InvalidArgument(
                "csr_pem: empty; this coordinator runs mutual TLS and signs a client certificate \
                 at enrollment, so the agent must send a certificate request (upgrade drover-agent)"
                    .into(),
            ));
        }
        if pem.len() > MAX_CSR_BYTES {
            return Err(CoordError::InvalidArgument(format!(
                "csr_pem: {} bytes; the limit is {MAX_CSR_BYTES}",
                pem.len()
            )));
        }
        CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
            CoordError::InvalidArgument(format!(
                "csr_pem: not a valid PEM certificate signing request: {e}"
            ))
        })
    }

    /// Issues a client certificate for `agent_id` to the key of `csr`: CN and a URI SAN name the agent,
    /// client-auth only, valid from a few minutes ago for the CA's ttl. Returns it as PEM.
    pub fn issue(
        &self,
        csr: &CertificateSigningRequestParams,
        agent_id: &str,
    ) -> CoordResult<String> {
        let internal = |e: rcgen::Error| {
            CoordError::Internal(format!("issuing the client certificate of {agent_id}: {e}"))
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        dn.push(DnType::OrganizationName, "Drover agents");
        params.distinguished_name = dn;
        let uri = format!("{AGENT_URI_PREFIX}{agent_id}")
            .try_into()
            .map_err(internal)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        // Backdated for clock skew, by at most a tenth of the validity so that agents still renew at
        // two thirds of the time they were given.
        params.not_before = now - BACKDATE.min(self.ttl / 10);
        params.not_after = now + self.ttl;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        }
        .signed_by(&self.issuer)
        .map_err(internal)?;
        Ok(signed.pem())
    }

    /// Checks the certificates the connection presented (already verified against this CA by the
    /// handshake) name `agent_id`, the agent whose credential the call carries.
    pub fn check_peer(
        &self,
        peer_certs: Option<&[CertificateDer<'_>]>,
        agent_id: &str,
    ) -> CoordResult<()> {
        let Some(leaf) = peer_certs.and_then(|c| c.first()) else {
            return Err(CoordError::Unauthenticated(format!(
                "agent {agent_id}: this coordinator runs mutual TLS and the connection presented no \
                 client certificate; agents present the one they got at enrollment (an agent enrolled \
                 before mutual TLS was on must enroll again)"
            )));
        };
        let named = agent_of_cert(leaf)
            .map_err(|e| CoordError::PermissionDenied(format!("client certificate: {e}")))?;
        if named != agent_id {
            return Err(CoordError::PermissionDenied(format!(
                "the client certificate is agent {named}'s but the credential is agent {agent_id}'s"
            )));
        }
        Ok(())
    }
}

/// The agent a client certificate names: its `urn:drover:agent:` URI SAN (the common name must agree).
pub fn agent_of_cert(der: &CertificateDer<'_>) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("cannot parse: {e}"))?;
    let uri = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(AGENT_URI_PREFIX),
                _ => None,
            })
        })
        .ok_or_else(|| format!("no {AGENT_URI_PREFIX}<id> name; not an agent certificate"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    if cn != Some(uri) {
        return Err(format!(
            "common name {cn:?} does not match its agent name {uri:?}"
        ));
    }
    Ok(uri.to_string())
}

/// Seconds since the epoch (for tests and logs).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(dir: &Path, name: &str) -> Arc<AgentCa> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        AgentCa::load(&c, &k, Duration::from_secs(3600)).unwrap()
    }

    fn csr() -> String {
        let key = KeyPair::generate().unwrap();
        CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap()
    }

    #[test]
    fn issues_a_certificate_naming_the_agent_and_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca(dir.path(), "ca");
        let pem = ca
            .issue(&AgentCa::parse_csr(&csr()).unwrap(), "agent-a")
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(agent_of_cert(&der).unwrap(), "agent-a");
        let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let left = x.validity().not_after.timestamp() as u64 - unix_now();
        assert!((3500..=3600).contains(&left), "{left}");
        ca.check_peer(Some(std::slice::from_ref(&der)), "agent-a")
            .unwrap();
        let e = ca
            .check_peer(Some(std::slice::from_ref(&der)), "agent-b")
            .unwrap_err();
        assert!(matches!(e, CoordError::PermissionDenied(_)), "{e}");
        assert!(e.to_string().contains("agent agent-a's"), "{e}");
        let e = ca.check_peer(None, "agent-a").unwrap_err();
        assert!(matches!(e, CoordError::Unauthenticated(_)), "{e}");
        // The CA's own certificate is no agent certificate.
        assert!(agent_of_cert(ca.cert()).is_err());
    }

    #[test]
    fn bad_requests_are_refused_clearly() {
        for bad in [
            "",
            "hello",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let e = AgentCa::parse_csr(bad).unwrap_err();
            assert!(e.to_string().contains("csr_pem"), "{e}");
        }
        let huge = "x".repeat(MAX_CSR_BYTES + 1);
        assert!(AgentCa::parse_csr(&huge)
            .unwrap_err()
            .to_string()
            .contains("limit"));
    }
}
