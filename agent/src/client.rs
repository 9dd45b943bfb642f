//! The gRPC channel to the coordinator, the credential interceptor and the calls that are not
//! part of the session (enroll, blobs, artifacts, the log transport).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::agent_service_client::AgentServiceClient;
use drover_proto::v1::{
    artifact_chunk, ArtifactChunk, ArtifactHeader, ArtifactUploaded, BlobRequest, EnrollRequest,
    EnrollResponse, LogChunk, RenewCertificateRequest, UploadQuery,
};
use drover_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::identity::SharedIdentity;
use crate::logs::{LogStream, LogTransport};

/// Connecting to the coordinator gives up after this long (then the session backs off).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval: finds a dead connection even when nothing is being sent.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A PING unanswered for this long closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 stream window: room for several data chunks in flight.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// HTTP/2 connection window, shared by the session, log and artifact streams.
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// Errors talking to the coordinator outside the session.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinator URL is not valid.
    #[error("invalid coordinator URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The credential cannot be sent as a header.
    #[error("the credential contains characters not allowed in a header")]
    InvalidCredential,
    /// The coordinator answered with an error.
    #[error("{what}: {status}")]
    Rpc {
        /// The call.
        what: String,
        /// The status.
        status: Status,
    },
    /// A downloaded blob did not match its digest or size.
    #[error("blob {digest}: {reason}")]
    Corrupt {
        /// Expected digest.
        digest: String,
        /// What did not match.
        reason: String,
    },
    /// Local file I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl ClientError {
    fn rpc(what: impl Into<String>, status: Status) -> Self {
        Self::Rpc {
            what: what.into(),
            status,
        }
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// A lazily connecting channel to `url` with timeouts, keepalive and explicit HTTP/2 windows.
/// It reconnects by itself on the next call after a failure.
pub fn channel(url: &str) -> Result<Channel, ClientError> {
    channel_with_ca(url, None)
}

/// [`channel`], trusting `ca_pem` (a PEM CA certificate) for an `https://` URL; without it an
/// `https://` coordinator must present a certificate the system's roots trust. TLS 1.3 is what the
/// coordinator speaks.
pub fn channel_with_ca(url: &str, ca_pem: Option<&[u8]>) -> Result<Channel, ClientError> {
    channel_with_tls(url, ca_pem, None)
}

/// [`channel_with_ca`], presenting the client certificate `identity` holds on every TLS connection
/// (mutual TLS). The certificate is read at each handshake, so a renewal applies to the next
/// connection. `identity` is unused for an `http://` URL.
pub fn channel_with_tls(
    url: &str,
    ca_pem: Option<&[u8]>,
    identity: Option<&SharedIdentity>,
) -> Result<Channel, ClientError> {
    let invalid = |reason: String| ClientError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(invalid("expected http://host:port".to_string()));
    }
    if let (Some(identity), Some(rest)) = (identity, url.strip_prefix("https://")) {
        // tonic's own TLS takes a fixed identity; this connector does the handshake itself so that it
        // can present whichever certificate is current. The endpoint then speaks h2 over it as if plain.
        let connector = MtlsConnector::new(url, ca_pem, identity).map_err(invalid)?;
        let endpoint = tuned(
            Endpoint::from_shared(format!("http://{rest}")).map_err(|e| invalid(e.to_string()))?,
        );
        return Ok(endpoint.connect_with_connector_lazy(connector));
    }
    let endpoint =
        tuned(Endpoint::from_shared(url.to_string()).map_err(|e| invalid(e.to_string()))?);
    let endpoint = if url.starts_with("https://") {
        let tls = match ca_pem {
            Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        endpoint
            .tls_config(tls)
            .map_err(|e| invalid(format!("TLS: {e}")))?
    } else {
        endpoint
    };
    Ok(endpoint.connect_lazy())
}

/// Timeouts, keepalive and HTTP/2 windows shared by every channel.
fn tuned(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

/// Connects TCP to the coordinator and runs a TLS 1.3 handshake presenting the current client
/// certificate.
#[derive(Clone)]
struct MtlsConnector {
    config: Arc<rustls::ClientConfig>,
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for MtlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MtlsConnector")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl MtlsConnector {
    fn new(url: &str, ca_pem: Option<&[u8]>, identity: &SharedIdentity) -> Result<Self, String> {
        let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        let host = uri.host().ok_or("no host")?;
        let port = uri.port_u16().unwrap_or(443);
        // An IPv6 literal comes bracketed in the URL, bare in the certificate's SAN.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare.to_string())
            .map_err(|e| format!("TLS server name {bare:?}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        match ca_pem {
            Some(pem) => {
                for c in CertificateDer::pem_slice_iter(pem) {
                    let c = c.map_err(|e| format!("CA file: {e}"))?;
                    roots.add(c).map_err(|e| format!("CA file: {e}"))?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                let _ = roots.add_parsable_certificates(native.certs);
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_client_cert_resolver(identity.resolver());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(MtlsConnector {
            config: Arc::new(config),
            host: bare.to_string(),
            port,
            server_name,
        })
    }
}

type ConnectFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
            > + Send,
    >,
>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for MtlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((this.host.as_str(), this.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(this.config)
                .connect(this.server_name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Adds `authorization: Bearer <credential>` to every call.
#[derive(Debug, Clone)]
pub struct AuthInterceptor {
    header: MetadataValue<Ascii>,
}

impl AuthInterceptor {
    /// An interceptor for `credential`.
    pub fn new(credential: &str) -> Result<Self, ClientError> {
        let header = format!("Bearer {credential}")
            .parse()
            .map_err(|_| ClientError::InvalidCredential)?;
        Ok(Self { header })
    }
}

impl Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

/// The authenticated agent client.
pub type AgentClient = AgentServiceClient<InterceptedService<Channel, AuthInterceptor>>;

/// A client on `channel` that authenticates with `credential`.
pub fn agent_client(channel: Channel, credential: &str) -> Result<AgentClient, ClientError> {
    Ok(
        AgentServiceClient::with_interceptor(channel, AuthInterceptor::new(credential)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Exchanges an enrollment token for an agent id and credential, and `csr_pem` (a certificate
/// request for the agent's key) for a client certificate when the coordinator runs mutual TLS.
pub async fn enroll(
    channel: Channel,
    token: &str,
    labels: HashMap<String, String>,
    hostname: &str,
    csr_pem: &str,
) -> Result<EnrollResponse, ClientError> {
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let response = client
        .enroll(EnrollRequest {
            token: token.to_string(),
            labels,
            hostname: hostname.to_string(),
            csr_pem: csr_pem.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc("enrolling", s))?;
    Ok(response.into_inner())
}

/// Asks for a fresh client certificate for the key of `csr_pem`; the call presents the current one.
pub async fn renew_certificate(client: &AgentClient, csr_pem: &str) -> Result<String, ClientError> {
    let mut c = client.clone();
    let r = c
        .renew_certificate(RenewCertificateRequest {
            csr_pem: csr_pem.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc("renewing the client certificate", s))?;
    Ok(r.into_inner().client_cert_pem)
}

/// Tries of one artifact or blob transfer: a broken connection costs one, and the next try resumes
/// where the last one stopped. With the backoff between tries, about half a minute of flaky network.
pub const TRANSFER_TRIES: u32 = 8;

pub use drover_proto::errors::is_transient;

impl ClientError {
    /// Whether retrying the transfer may succeed (see [`is_transient`]).
    pub fn is_transient(&self) -> bool {
        matches!(self, ClientError::Rpc { status, .. } if is_transient(status))
    }
}

/// Downloads blob `digest` of `attempt_id` into `dest`, verifying its sha256 (and size when
/// known). A broken connection is retried up to [`TRANSFER_TRIES`] times, each try resuming at the
/// bytes already written. A partial file is removed on failure.
pub async fn download_blob(
    client: &AgentClient,
    attempt_id: &str,
    digest: &str,
    expected_size: Option<u64>,
    dest: &Path,
) -> Result<(), ClientError> {
    let result = async {
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| ClientError::io(format!("creating {}", dest.display()), e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut backoff = crate::backoff::Backoff::default();
        let mut tries = 1;
        loop {
            match download_from(
                client,
                attempt_id,
                digest,
                dest,
                &mut file,
                &mut hasher,
                &mut size,
            )
            .await
            {
                Ok(()) => break,
                Err(e) if e.is_transient() && tries < TRANSFER_TRIES => {
                    tries += 1;
                    tracing::warn!(blob = %digest, received = size, error = %e, "blob download interrupted; resuming");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e),
            }
        }
        file.flush()
            .await
            .map_err(|e| ClientError::io(format!("writing {}", dest.display()), e))?;
        let actual = hex::encode(hasher.finalize());
        if !actual.eq_ignore_ascii_case(digest) {
            return Err(ClientError::Corrupt {
                digest: digest.to_string(),
                reason: format!("received content has sha256 {actual}"),
            });
        }
        if let Some(expected) = expected_size.filter(|&e| e != size) {
            return Err(ClientError::Corrupt {
                digest: digest.to_string(),
                reason: format!("received {size} bytes, expected {expected}"),
            });
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(dest).await;
    }
    result
}

/// One try of a download: asks for the blob from `*size` on and appends to `file`; `hasher` and
/// `size` always cover exactly the bytes written.
async fn download_from(
    client: &AgentClient,
    attempt_id: &str,
    digest: &str,
    dest: &Path,
    file: &mut tokio::fs::File,
    hasher: &mut Sha256,
    size: &mut u64,
) -> Result<(), ClientError> {
    let mut client = client.clone();
    let mut stream = client
        .download_blob(BlobRequest {
            attempt_id: attempt_id.to_string(),
            digest: digest.to_string(),
            offset: *size,
        })
        .await
        .map_err(|s| ClientError::rpc(format!("downloading blob {digest}"), s))?
        .into_inner();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| ClientError::rpc(format!("downloading blob {digest}"), s))?;
        file.write_all(&chunk.data)
            .await
            .map_err(|e| ClientError::io(format!("writing {}", dest.display()), e))?;
        hasher.update(&chunk.data);
        *size += chunk.data.len() as u64;
    }
    Ok(())
}

/// Uploads the local file `source` as artifact `header.path`; the header carries size, mode and
/// digest computed beforehand. The upload gets an id (unless the header has one), so a broken
/// connection is retried up to [`TRANSFER_TRIES`] times, each try asking the coordinator how much it
/// holds ([`query_upload`]) and sending only the rest.
pub async fn upload_artifact(
    client: &AgentClient,
    mut header: ArtifactHeader,
    source: &Path,
    source_offset: u64,
) -> Result<ArtifactUploaded, ClientError> {
    if header.upload_id.is_empty() {
        header.upload_id = uuid::Uuid::new_v4().simple().to_string();
    }
    let mut backoff = crate::backoff::Backoff::default();
    let mut tries = 1;
    // `None`: ask the coordinator where to continue.
    let mut next_offset = Some(header.offset);
    loop {
        let outcome = match next_offset {
            Some(offset) => {
                header.offset = offset;
                upload_from(client, header.clone(), source, source_offset).await
            }
            None => query_upload(client, &header.upload_id).await.map(|held| {
                next_offset = Some(held);
                None
            }),
        };
        let e = match outcome {
            Ok(Some(uploaded)) => return Ok(uploaded),
            Ok(None) => continue,
            Err(e) => e,
        };
        // Another try may fix a broken connection, or an offset that raced with the coordinator
        // noticing the previous connection's end.
        let offset_raced = matches!(&e, ClientError::Rpc { status, .. }
            if status.code() == Code::FailedPrecondition && status.message().contains("a resumed upload must start there"));
        if (e.is_transient() || offset_raced) && tries < TRANSFER_TRIES {
            tries += 1;
            tracing::warn!(artifact = %header.path, upload = %header.upload_id, error = %e, "artifact upload interrupted; resuming");
            tokio::time::sleep(backoff.next_delay()).await;
            next_offset = None;
            continue;
        }
        return Err(e);
    }
}

/// Uploads the files a scan streams (see [`crate::artifacts::Live`]) one after the other as they
/// arrive, each with an empty digest: the coordinator stores what arrived under its digest and
/// returns it. Returns, by upload id, the answers of the uploads that completed with the digest
/// the scan computed; a file missing there (a broken connection, a scan that failed) is for the
/// caller to resume or upload from the fetched archive.
pub async fn stream_artifacts(
    client: &AgentClient,
    attempt_id: &str,
    epoch: u64,
    mut files: mpsc::Receiver<crate::artifacts::Live>,
) -> HashMap<String, ArtifactUploaded> {
    use crate::artifacts::Live;
    struct Current {
        upload_id: String,
        path: String,
        /// None once the call stopped taking data.
        data: Option<mpsc::Sender<ArtifactChunk>>,
        call: tokio::task::JoinHandle<Result<ArtifactUploaded, Status>>,
    }
    let mut done = HashMap::new();
    let mut current: Option<Current> = None;
    while let Some(item) = files.recv().await {
        match item {
            Live::Start {
                path,
                mode,
                size,
                upload_id,
            } => {
                // A file without its end (its scan failed) is abandoned.
                if let Some(c) = current.take() {
                    c.call.abort();
                }
                let (data, rx) = mpsc::channel::<ArtifactChunk>(4);
                let header = ArtifactHeader {
                    attempt_id: attempt_id.to_string(),
                    epoch,
                    path: path.clone(),
                    mode,
                    size,
                    digest: String::new(),
                    upload_id: upload_id.clone(),
                    offset: 0,
                };
                // The channel is empty: the header always fits.
                let _ = data.try_send(ArtifactChunk {
                    part: Some(artifact_chunk::Part::Header(header)),
                });
                let mut c = client.clone();
                let call = tokio::spawn(async move {
                    c.upload_artifact(ReceiverStream::new(rx))
                        .await
                        .map(tonic::Response::into_inner)
                });
                current = Some(Current {
                    upload_id,
                    path,
                    data: Some(data),
                    call,
                });
            }
            Live::Data(bytes) => {
                let Some(c) = current.as_mut() else { continue };
                let Some(data) = &c.data else { continue };
                let n = bytes.len() as u64;
                let chunk = ArtifactChunk {
                    part: Some(artifact_chunk::Part::Data(bytes)),
                };
                if data.send(chunk).await.is_err() {
                    c.data = None;
                } else {
                    crate::metrics::metrics().artifact_uploaded(n);
                }
            }
            Live::End { digest } => {
                let Some(c) = current.take() else { continue };
                drop(c.data);
                match c.call.await {
                    Ok(Ok(uploaded)) if uploaded.digest == digest => {
                        done.insert(c.upload_id, uploaded);
                    }
                    Ok(Ok(uploaded)) => tracing::warn!(
                        artifact = %c.path,
                        stored = %uploaded.digest,
                        read = %digest,
                        "a streamed artifact was stored with another digest than the agent read; uploading it again"
                    ),
                    Ok(Err(status)) => tracing::warn!(
                        artifact = %c.path,
                        upload = %c.upload_id,
                        %status,
                        "streaming an artifact failed; resuming it from the fetched archive"
                    ),
                    Err(e) => {
                        tracing::warn!(artifact = %c.path, error = %e, "the streamed upload's task failed")
                    }
                }
            }
        }
    }
    if let Some(c) = current {
        c.call.abort();
    }
    done
}

/// How many bytes of the upload `upload_id` the coordinator holds: where a resumed upload starts.
pub async fn query_upload(client: &AgentClient, upload_id: &str) -> Result<u64, ClientError> {
    let mut c = client.clone();
    let r = c
        .query_upload(UploadQuery {
            upload_id: upload_id.to_string(),
        })
        .await
        .map_err(|s| ClientError::rpc(format!("asking about upload {upload_id}"), s))?;
    Ok(r.into_inner().held_bytes)
}

/// One try of an upload: the artifact's bytes from `header.offset` on, read from `source`, where
/// the artifact starts at `source_offset` and is `header.size` bytes long (the source may hold more,
/// e.g. the tar it was fetched in). `Ok(None)` never happens; the option lets [`upload_artifact`]
/// share one match with [`query_upload`].
async fn upload_from(
    client: &AgentClient,
    header: ArtifactHeader,
    source: &Path,
    source_offset: u64,
) -> Result<Option<ArtifactUploaded>, ClientError> {
    let mut file = tokio::fs::File::open(source)
        .await
        .map_err(|e| ClientError::io(format!("opening {}", source.display()), e))?;
    let start = source_offset.saturating_add(header.offset);
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ClientError::io(format!("seeking in {}", source.display()), e))?;
    }
    let mut remaining = header.size.saturating_sub(header.offset);
    let path = header.path.clone();
    let (tx, rx) = mpsc::channel::<ArtifactChunk>(4);
    let source_name = source.display().to_string();
    // The file is read beside the call so the request body streams while the call runs, a MiB per
    // trip to the blocking pool (a trip per 128 KiB chunk would cost more than the read).
    let reader = tokio::spawn(async move {
        let mut file = tokio::io::BufReader::with_capacity(FILE_BUFFER, file);
        if tx
            .send(ArtifactChunk {
                part: Some(artifact_chunk::Part::Header(header)),
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        while remaining > 0 {
            let mut buf = vec![0u8; remaining.min(CHUNK_BYTES as u64) as usize];
            let n = read_full(&mut file, &mut buf)
                .await
                .map_err(|e| ClientError::io(format!("reading {source_name}"), e))?;
            if n < buf.len() {
                return Err(ClientError::io(
                    format!("reading {source_name}"),
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the file ends {remaining} bytes before the artifact's end"),
                    ),
                ));
            }
            remaining -= n as u64;
            if tx
                .send(ArtifactChunk {
                    part: Some(artifact_chunk::Part::Data(buf)),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            crate::metrics::metrics().artifact_uploaded(n as u64);
        }
        Ok(())
    });
    let mut c = client.clone();
    let response = c.upload_artifact(ReceiverStream::new(rx)).await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => {
            return Err(ClientError::io(
                "reading the artifact",
                std::io::Error::other(e.to_string()),
            ))
        }
    }
    response
        .map(|r| Some(r.into_inner()))
        .map_err(|s| ClientError::rpc(format!("uploading artifact {path:?}"), s))
}

/// Buffer between large files and the blocking pool.
const FILE_BUFFER: usize = 1 << 20;

async fn read_full(
    file: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

impl LogTransport for AgentClient {
    async fn open(&self) -> Result<LogStream, Status> {
        let (chunks, rx) = mpsc::channel::<LogChunk>(8);
        let (ack_tx, acks) = mpsc::channel(32);
        let mut client = self.clone();
        // The call resolves only once the coordinator answers, which it may do after the first
        // chunk: run it beside the shipper so chunks can flow first.
        tokio::spawn(async move {
            match client.push_logs(ReceiverStream::new(rx)).await {
                Ok(response) => {
                    let mut inbound = response.into_inner();
                    loop {
                        tokio::select! {
                            item = inbound.next() => {
                                let Some(item) = item else { return };
                                let failed = item.is_err();
                                if ack_tx.send(item).await.is_err() || failed {
                                    return;
                                }
                            }
                            // The shipper moved on: drop this stream.
                            () = ack_tx.closed() => return,
                        }
                    }
                }
                Err(status) => {
                    let _ = ack_tx.send(Err(status)).await;
                }
            }
        });
        Ok(LogStream { chunks, acks })
    }
}
