//! Connecting to the coordinator and turning gRPC failures into one-line messages.

use std::fmt::Display;
use std::time::Duration;

use drover_proto::v1::control_service_client::ControlServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

/// The generated ControlService client over a channel that carries the API token.
pub(crate) type ControlClient = ControlServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Debug, Clone)]
pub(crate) struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A connected `ControlService` client that remembers where it is connected, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct Coordinator {
    /// The generated client; cheap to clone (shares the channel).
    pub(crate) client: ControlClient,
    url: String,
}

/// Accepts `host:port` as well as a full URL, since that is what people type.
fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

pub(crate) use drover_proto::errors::error_chain;

impl Coordinator {
    /// Connects eagerly, so an unreachable coordinator is reported before any work is done.
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Self> {
        let url = normalize_url(url);
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| anyhow::anyhow!("invalid coordinator URL {url:?}: {}", error_chain(&e)))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            // Logs and artifacts arrive in 128 KiB chunks; explicit windows keep a few in flight.
            .initial_stream_window_size(Some(2 * 1024 * 1024))
            .initial_connection_window_size(Some(8 * 1024 * 1024))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let settings = crate::settings::current();
        let endpoint = if url.starts_with("https://") {
            let tls = match &settings.ca_file {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        anyhow::anyhow!("cannot read CA file {}: {e}", path.display())
                    })?;
                    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
                }
                None => ClientTlsConfig::new().with_native_roots(),
            };
            endpoint
                .tls_config(tls)
                .map_err(|e| anyhow::anyhow!("TLS setup for {url}: {}", error_chain(&e)))?
        } else {
            endpoint
        };
        let token = match &settings.token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                anyhow::anyhow!("the API token contains characters not allowed in a header")
            })?),
            None => None,
        };
        let channel = endpoint.connect().await.map_err(|e| {
            anyhow::anyhow!("cannot reach coordinator at {url}: {}", error_chain(&e))
        })?;
        let client = ControlServiceClient::with_interceptor(channel, BearerToken(token))
            .max_decoding_message_size(drover_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(drover_proto::MAX_MESSAGE_BYTES);
        Ok(Self { client, url })
    }

    /// A fresh handle to the same connection, for concurrent streams.
    pub(crate) fn client(&self) -> ControlClient {
        self.client.clone()
    }

    /// Describes a failed call on `what` (e.g. `run r-1`) as one line.
    pub(crate) fn error(&self, status: Status, what: impl Display) -> anyhow::Error {
        anyhow::anyhow!(describe_status(&self.url, &status, &what.to_string()))
    }
}

/// The one-line text for a failed call; never a Debug dump of the status.
pub(crate) fn describe_status(url: &str, status: &Status, what: &str) -> String {
    let message = status.message().trim();
    match status.code() {
        Code::Unavailable => {
            if message.is_empty() {
                format!("cannot reach coordinator at {url}")
            } else {
                format!("cannot reach coordinator at {url}: {message}")
            }
        }
        Code::NotFound => {
            // The coordinator's message names exactly what is missing (`run X has no job "y"`).
            if message.is_empty() {
                format!("{what} not found")
            } else {
                message.to_string()
            }
        }
        Code::DeadlineExceeded => format!("{what}: the coordinator at {url} did not answer in time"),
        Code::Unimplemented => format!(
            "{what}: the coordinator at {url} does not support this request (is it an older version?)"
        ),
        Code::Unauthenticated | Code::PermissionDenied => {
            format!("{what}: not allowed by the coordinator: {message}")
        }
        code => {
            if message.is_empty() {
                format!("{what}: {}", code.description())
            } else {
                format!("{what}: {message}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_gets_a_scheme() {
        assert_eq!(normalize_url("127.0.0.1:7330"), "http://127.0.0.1:7330");
        assert_eq!(normalize_url("https://ci:1"), "https://ci:1");
    }

    #[test]
    fn statuses_read_as_one_line() {
        let url = "http://c:1";
        assert_eq!(
            describe_status(url, &Status::not_found(""), "run r-1"),
            "run r-1 not found"
        );
        assert_eq!(
            describe_status(url, &Status::not_found("run r-1 not found"), "run r-1"),
            "run r-1 not found"
        );
        assert_eq!(
            describe_status(url, &Status::unavailable("connection refused"), "run r-1"),
            "cannot reach coordinator at http://c:1: connection refused"
        );
        assert_eq!(
            describe_status(
                url,
                &Status::failed_precondition("run is finished"),
                "cancel run r-1"
            ),
            "cancel run r-1: run is finished"
        );
    }

    #[tokio::test]
    async fn unreachable_coordinator_is_named() {
        // Port 1 on loopback refuses connections.
        let err = Coordinator::connect("http://127.0.0.1:1")
            .await
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.starts_with("cannot reach coordinator at http://127.0.0.1:1: "),
            "{text}"
        );
        let err = Coordinator::connect("http://bad host").await.unwrap_err();
        assert!(
            format!("{err:#}").starts_with("invalid coordinator URL"),
            "{err:#}"
        );
    }
}
