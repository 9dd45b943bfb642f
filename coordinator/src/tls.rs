//! TLS 1.3 for the gRPC listener: deciding whether to use it, the coordinator's own CA and server
//! certificate (created with rcgen under `<data>/tls/`), or an operator's certificate and key, and the
//! rustls acceptor the server runs every accepted connection through.
//!
//! Plaintext is served only on loopback, or beyond it when the operator says `--insecure`: agent
//! credentials, API tokens and secrets cross this connection.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

/// Whether the gRPC listener speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS beyond loopback (unless `--insecure`), plaintext on loopback.
    #[default]
    Auto,
    /// Always TLS, also on loopback.
    On,
    /// Never TLS: allowed beyond loopback only with `--insecure`.
    Off,
}

/// The TLS settings of the coordinator's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// Mode.
    pub mode: TlsMode,
    /// Accept plaintext beyond loopback (logged as a warning).
    pub insecure: bool,
    /// Operator-provided certificate chain (PEM); with `key`, replaces the coordinator's own CA.
    pub cert: Option<PathBuf>,
    /// Operator-provided private key (PEM).
    pub key: Option<PathBuf>,
    /// Extra subject alternative names (DNS names or IP addresses) for the generated server certificate.
    pub sans: Vec<String>,
    /// CA certificate (PEM) that signs agents' client certificates, with `agent_ca_key`. Default: the
    /// coordinator's own CA; with operator certificates and no agent CA, mutual TLS is off.
    pub agent_ca_cert: Option<PathBuf>,
    /// Private key (PEM) of `agent_ca_cert`.
    pub agent_ca_key: Option<PathBuf>,
    /// Validity of the client certificates issued to agents (`None`: 30 days).
    pub agent_cert_ttl: Option<Duration>,
}

/// Why TLS could not be set up, or why plaintext was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Plaintext beyond loopback without `--insecure`.
    #[error(
        "refusing to serve plaintext gRPC on {addr}, which is beyond loopback: agent credentials, API \
         tokens and secrets would cross the network in the clear. Use TLS (drop `--tls off`; the \
         coordinator then creates its own CA under the data directory, or pass --tls-cert/--tls-key), \
         or pass --insecure to accept the risk"
    )]
    PlaintextRefused {
        /// The listen address.
        addr: SocketAddr,
    },
    /// Only one of `--tls-cert` and `--tls-key` was given.
    #[error("--tls-cert and --tls-key go together: give both or neither")]
    HalfPair,
    /// Only one of `--agent-ca-cert` and `--agent-ca-key` was given.
    #[error("--agent-ca-cert and --agent-ca-key go together: give both or neither")]
    HalfAgentCa,
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// Generating a certificate failed.
    #[error("generating the {what}: {source}")]
    Generate {
        /// Which certificate.
        what: &'static str,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// rustls refused the certificate and key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The resolved TLS side of the listener.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The rustls configuration: TLS 1.3 only, ALPN h2.
    pub config: Arc<ServerConfig>,
    /// The CA clients should trust, when the coordinator made its own (`<data>/tls/ca.pem`).
    pub ca_file: Option<PathBuf>,
    /// The CA that signs agents' client certificates: mutual TLS is on for agents when set.
    pub agent_ca: Option<Arc<crate::mtls::AgentCa>>,
}

/// Decide whether to serve TLS on `listen` and build its configuration. `Ok(None)` means plaintext,
/// which is allowed on loopback or with `insecure` (the caller logs the warning).
pub fn resolve(
    listen: SocketAddr,
    settings: &TlsSettings,
    data_dir: &Path,
) -> Result<Option<ServerTls>, TlsError> {
    let operator_pair = match (&settings.cert, &settings.key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => return Err(TlsError::HalfPair),
    };
    let operator_agent_ca = match (&settings.agent_ca_cert, &settings.agent_ca_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => return Err(TlsError::HalfAgentCa),
    };
    let loopback = listen.ip().is_loopback();
    let use_tls = match settings.mode {
        TlsMode::On => true,
        // An operator's certificate is a request for TLS.
        TlsMode::Auto => operator_pair.is_some() || (!loopback && !settings.insecure),
        TlsMode::Off => false,
    };
    if !use_tls {
        if !loopback && !settings.insecure {
            return Err(TlsError::PlaintextRefused { addr: listen });
        }
        return Ok(None);
    }
    let ttl = settings
        .agent_cert_ttl
        .unwrap_or(crate::mtls::DEFAULT_AGENT_CERT_TTL);
    let (chain, key, ca_file, own_ca) = match operator_pair {
        Some((cert, key)) => (read_certs(&cert)?, read_key(&key)?, None, None),
        None => {
            let dir = data_dir.join("tls");
            let (chain, key) = own_ca_server_cert(&dir, listen, &settings.sans)?;
            let own = (dir.join("ca.pem"), dir.join("ca.key"));
            (chain, key, Some(dir.join("ca.pem")), Some(own))
        }
    };
    let agent_ca = match operator_agent_ca.or(own_ca) {
        Some((cert, key)) => Some(crate::mtls::AgentCa::load(&cert, &key, ttl)?),
        None => {
            tracing::warn!(
                "mutual TLS for agents is off: the coordinator serves an operator certificate and has                  no CA key to sign agents' client certificates (give --agent-ca-cert/--agent-ca-key);                  agents authenticate with their bearer credential only"
            );
            None
        }
    };
    Ok(Some(ServerTls {
        config: server_config(chain, key, agent_ca.as_ref().map(|c| c.cert().clone()))?,
        ca_file,
        agent_ca,
    }))
}

/// The rustls server configuration: TLS 1.3 only, one explicit crypto provider (ring), ALPN h2.
/// With `client_ca`, a client certificate is verified against it when presented, and a connection
/// without one is let through: Enroll and the ControlService do not use one, and the AgentService
/// checks per call ([`crate::mtls::AgentCa::check_peer`]).
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<CertificateDer<'static>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| rustls::Error::General(format!("client certificate verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// How long a client may take to finish the TLS handshake before its connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Idle time before the kernel probes a quiet connection (TCP keepalive), the time between probes and
/// how many go unanswered before it drops the connection: a vanished peer's connection is gone
/// within a minute. The kernel does this, not HTTP/2 PING frames, so ten thousand idle agent
/// connections cost the coordinator no timer, wake-up or frame of its own.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_PROBES: u32 = 3;

/// Turns TCP keepalive on for an accepted connection ([`KEEPALIVE_IDLE`]).
pub fn keep_alive(tcp: &TcpStream) -> std::io::Result<()> {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&ka)
}

/// Accepted connections after their TLS handshake, for `serve_with_incoming_shutdown`. Each handshake
/// runs on its own task with a timeout, so a slow or plaintext client neither blocks others nor ends the
/// listener; failed handshakes are logged and dropped. The accept loop stops when the server drops the
/// stream.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let acceptor = TlsAcceptor::from(config);
    // Bounded: a burst of handshakes waits for the server to take the previous connections.
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => break,
            };
            let _ = tcp.set_nodelay(true);
            if let Err(e) = keep_alive(&tcp) {
                tracing::warn!(%peer, "cannot turn TCP keepalive on: {e}");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem {
        path: path.to_path_buf(),
        message,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        message: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })
}

/// The current year, for certificate validity, without a date library.
fn this_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    // The issuer is rebuilt from these same parameters on every start, so the subject must not vary.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Drover coordinator CA");
    dn.push(DnType::OrganizationName, "Drover");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    params
}

/// Write `data` to `path` readable by its owner only (private keys).
fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)
}

fn write_public(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    std::fs::write(path, data).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The machine's host name, for the server certificate.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Names and addresses the server certificate covers: localhost and the loopback addresses, the host
/// name and what it resolves to, the listen address when it is a specific one, and the operator's extras.
pub fn server_sans(listen: SocketAddr, extra: &[String]) -> Vec<SanType> {
    let mut names: Vec<String> = vec!["localhost".into()];
    let mut ips: Vec<IpAddr> = vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
    if !listen.ip().is_unspecified() {
        ips.push(listen.ip());
    }
    if let Some(h) = hostname() {
        if let Ok(addrs) = (h.as_str(), 0).to_socket_addrs() {
            ips.extend(addrs.map(|a| a.ip()));
        }
        names.push(h);
    }
    for e in extra {
        match e.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => names.push(e.clone()),
        }
    }
    names.sort();
    names.dedup();
    ips.sort();
    ips.dedup();
    let mut sans: Vec<SanType> = Vec::new();
    for n in names {
        if let Ok(dns) = n.as_str().try_into() {
            sans.push(SanType::DnsName(dns));
        } else {
            tracing::warn!(name = %n, "not a valid DNS name; left out of the server certificate");
        }
    }
    sans.extend(ips.into_iter().map(SanType::IpAddress));
    sans
}

/// Load (or create on first start) the CA under `dir`, and issue a fresh server certificate for the
/// current names and addresses. The server certificate is re-issued on every start so that a new host
/// name, listen address or `--tls-san` takes effect without touching the CA clients trust.
fn own_ca_server_cert(
    dir: &Path,
    listen: SocketAddr,
    extra_sans: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_pem = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca_key = if ca_pem.exists() && ca_key_path.exists() {
        let text = std::fs::read_to_string(&ca_key_path).map_err(|source| TlsError::Io {
            path: ca_key_path.clone(),
            source,
        })?;
        KeyPair::from_pem(&text).map_err(|e| TlsError::Pem {
            path: ca_key_path.clone(),
            message: format!(
                "bad CA key: {e}; delete {} to create a new CA",
                dir.display()
            ),
        })?
    } else {
        let key = KeyPair::generate().map_err(|source| TlsError::Generate {
            what: "CA key",
            source,
        })?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                what: "CA certificate",
                source,
            })?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        write_public(&ca_pem, cert.pem().as_bytes())?;
        tracing::info!(ca = %ca_pem.display(), "created the coordinator's certificate authority");
        key
    };
    let ca_cert_pem = std::fs::read_to_string(&ca_pem).map_err(|source| TlsError::Io {
        path: ca_pem.clone(),
        source,
    })?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "drover-coordinator");
    params.distinguished_name = dn;
    params.subject_alt_names = server_sans(listen, extra_sans);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let key = KeyPair::generate().map_err(|source| TlsError::Generate {
        what: "server key",
        source,
    })?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| TlsError::Generate {
            what: "server certificate",
            source,
        })?;
    // Kept on disk for operators (openssl s_client, curl); the listener uses the in-memory copies.
    write_public(
        &dir.join("server.pem"),
        format!("{}{}", cert.pem(), ca_cert_pem).as_bytes(),
    )?;
    write_private(&dir.join("server.key"), key.serialize_pem().as_bytes())?;
    let ca_der =
        CertificateDer::from_pem_slice(ca_cert_pem.as_bytes()).map_err(|e| TlsError::Pem {
            path: ca_pem.clone(),
            message: format!("bad CA certificate: {e}"),
        })?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Pem {
        path: dir.join("server.key"),
        message: e.to_string(),
    })?;
    Ok((vec![cert.der().clone(), ca_der], key_der))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: TlsMode, insecure: bool) -> TlsSettings {
        TlsSettings {
            mode,
            insecure,
            ..TlsSettings::default()
        }
    }

    #[test]
    fn plaintext_only_on_loopback_or_insecure() {
        let dir = tempfile::tempdir().unwrap();
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert!(resolve(lo, &settings(TlsMode::Auto, false), dir.path())
            .unwrap()
            .is_none());
        let e = resolve(any, &settings(TlsMode::Off, false), dir.path()).unwrap_err();
        assert!(e.to_string().contains("refusing to serve plaintext"), "{e}");
        assert!(resolve(any, &settings(TlsMode::Off, true), dir.path())
            .unwrap()
            .is_none());
        assert!(resolve(any, &settings(TlsMode::Auto, true), dir.path())
            .unwrap()
            .is_none());
        let tls = resolve(any, &settings(TlsMode::Auto, false), dir.path())
            .unwrap()
            .expect("tls beyond loopback");
        assert_eq!(tls.ca_file, Some(dir.path().join("tls/ca.pem")));
    }

    #[test]
    fn ca_is_kept_and_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        resolve(lo, &settings(TlsMode::On, false), dir.path()).unwrap();
        let ca1 = std::fs::read(dir.path().join("tls/ca.pem")).unwrap();
        let mode = std::fs::metadata(dir.path().join("tls/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        resolve(lo, &settings(TlsMode::On, false), dir.path()).unwrap();
        assert_eq!(ca1, std::fs::read(dir.path().join("tls/ca.pem")).unwrap());
        // The operator's own pair replaces the CA.
        let s = TlsSettings {
            mode: TlsMode::Auto,
            cert: Some(dir.path().join("tls/server.pem")),
            key: Some(dir.path().join("tls/server.key")),
            ..TlsSettings::default()
        };
        let t = resolve(lo, &s, dir.path()).unwrap().expect("tls");
        assert!(t.ca_file.is_none());
        let half = TlsSettings {
            cert: Some(dir.path().join("x")),
            ..TlsSettings::default()
        };
        assert!(matches!(
            resolve(lo, &half, dir.path()),
            Err(TlsError::HalfPair)
        ));
    }
}
