//! The gRPC server: binds the listener, serves AgentService, ControlService, `grpc.health.v1` and server
//! reflection, runs the lease timer and the HTTP side ([`crate::http`]), and shuts down when told.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use drover_proto::v1::agent_service_server::AgentServiceServer;
use drover_proto::v1::control_service_server::ControlServiceServer;
use drover_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{AgentApi, ControlApi};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::CoordError;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Opening the stores or loading state failed. The message already holds the cause, so it is not
    /// also given as the error's source (a `{:#}` chain would print it three times).
    #[error("cannot open the coordinator state: {0}")]
    Engine(CoordError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The transport failed.
    #[error("gRPC server")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptor sets.
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// TLS could not be set up, or plaintext was refused beyond loopback.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The HTTP server failed.
    #[error("HTTP server on {addr}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl From<CoordError> for ServerError {
    fn from(e: CoordError) -> Self {
        ServerError::Engine(e)
    }
}

/// A bound, not yet serving coordinator.
#[derive(Debug)]
pub struct Server {
    engine: Engine,
    listener: TcpListener,
    addr: SocketAddr,
    http_listener: TcpListener,
    http_addr: SocketAddr,
    tls: Option<crate::tls::ServerTls>,
    access: crate::access::AccessControl,
    admin_token_created: Option<std::path::PathBuf>,
}

impl Server {
    /// Open the data directory, load state and bind `config.listen` (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let listen = config.listen;
        let http_listen = config.http_listen;
        // Decided before anything is opened: a refused plaintext listener must change nothing.
        let tls = crate::tls::resolve(listen, &config.tls, &config.data_dir)?;
        if tls.is_none() && !listen.ip().is_loopback() {
            tracing::warn!(
                %listen,
                "--insecure: serving plaintext gRPC beyond loopback; credentials, tokens and secrets cross the network in the clear"
            );
        }
        let data_dir = config.data_dir.clone();
        let engine = Engine::open(config).await?;
        let (access, admin_token_created) =
            crate::access::AccessControl::open(engine.store().clone(), &data_dir).await?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| ServerError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
        let http_listener =
            TcpListener::bind(http_listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: http_listen,
                    source,
                })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                addr: http_listen,
                source,
            })?;
        // Tests and scripts wait for this exact line to learn the port.
        eprintln!("drover-coordinator http on {http_addr}");
        Ok(Server {
            engine,
            listener,
            addr,
            http_listener,
            http_addr,
            tls,
            access,
            admin_token_created,
        })
    }

    /// The API tokens (roles on the ControlService).
    pub fn access(&self) -> &crate::access::AccessControl {
        &self.access
    }

    /// Where the first start wrote the bootstrap admin token (`None` when tokens already existed).
    pub fn admin_token_created(&self) -> Option<&std::path::Path> {
        self.admin_token_created.as_deref()
    }

    /// True when the gRPC listener speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True when agents must present a client certificate from the coordinator's agent CA.
    pub fn is_mtls(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.agent_ca.is_some())
    }

    /// The CA certificate clients should trust (`--ca-file`), when the coordinator made its own.
    pub fn tls_ca_file(&self) -> Option<&std::path::Path> {
        self.tls.as_ref().and_then(|t| t.ca_file.as_deref())
    }

    /// The HTTP address actually bound (dashboard, `/metrics`, probes).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The domain core.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Serve until `shutdown` completes, then close agent sessions and streams and return.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let engine = self.engine.clone();
        let leases = engine.spawn_lease_timer();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AgentServiceServer<AgentApi>>().await;
        health
            .set_serving::<ControlServiceServer<ControlApi>>()
            .await;
        let agent_ca = self.tls.as_ref().and_then(|t| t.agent_ca.clone());
        let agent = AgentServiceServer::new(AgentApi::new(engine.clone()).with_mtls(agent_ca))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let control = ControlServiceServer::new(
            ControlApi::new(engine.clone()).with_access(self.access.clone()),
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
        // Every ControlService call needs an API token with the method's role.
        let control = crate::api::guard::RoleGuard::new(control, self.access.clone());
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(drover_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // v1 is the standard; v1alpha is what older grpcurl and grpcui still ask for.
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let http_addr = self.http_addr;
        let mut http_closing = engine.closing();
        let mut http = tokio::spawn(crate::http::serve(
            self.http_listener,
            engine.clone(),
            self.access.clone(),
            async move {
                let _ = http_closing.wait_for(|c| *c).await;
            },
        ));
        let closing = engine.clone();
        let shutdown = async move {
            shutdown.await;
            // Long-lived streams (Attach, WatchRun, FollowLogs) end so the graceful shutdown can finish.
            closing.shutdown();
        };
        let router = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Windows and frames sized for log and artifact uploads: an agent may have a few MiB of a
            // fast log in flight (so a short stall of this process does not stop its shipper), sent
            // in frames that hold a whole 128 KiB chunk rather than eight 16 KiB ones.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .max_frame_size(Some(1 << 20))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(agent)
            .add_service(control);
        let result = match self.tls {
            Some(tls) => {
                router
                    .serve_with_incoming_shutdown(
                        crate::tls::incoming(self.listener, tls.config),
                        shutdown,
                    )
                    .await
            }
            None => {
                router
                    // `tcp_nodelay` above is ignored for a caller-supplied listener: set it on each
                    // accepted socket, or Nagle holds small replies (results, acks) for up to 40 ms.
                    .serve_with_incoming_shutdown(
                        tonic::transport::server::TcpIncoming::from(self.listener)
                            .with_nodelay(Some(true))
                            // Dead peers are found by the kernel's keepalive, not HTTP/2 PINGs
                            // (see `tls::KEEPALIVE_IDLE`).
                            .with_keepalive(Some(crate::tls::KEEPALIVE_IDLE))
                            .with_keepalive_interval(Some(crate::tls::KEEPALIVE_INTERVAL))
                            .with_keepalive_retries(Some(crate::tls::KEEPALIVE_PROBES)),
                        shutdown,
                    )
                    .await
            }
        };
        engine.shutdown();
        leases.abort();
        // Open log streams end with the engine; give the HTTP side a bounded grace to finish.
        let http_result = match tokio::time::timeout(Duration::from_secs(5), &mut http).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(std::io::Error::other(format!("HTTP task: {e}"))),
            Err(_) => {
                http.abort();
                Ok(())
            }
        };
        result.map_err(ServerError::from)?;
        http_result.map_err(|source| ServerError::Http {
            addr: http_addr,
            source,
        })
    }

    /// Serve on a background task; for tests and embedding.
    pub fn spawn(self) -> RunningServer {
        let addr = self.addr;
        let scheme = if self.is_tls() { "https" } else { "http" };
        let http_addr = self.http_addr;
        let engine = self.engine.clone();
        let access = self.access.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(self.serve(async move {
            let _ = stopped.await;
        }));
        RunningServer {
            addr,
            scheme,
            access,
            http_addr,
            engine,
            stop: Some(stop),
            handle,
        }
    }
}

/// A coordinator serving on a background task.
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    scheme: &'static str,
    access: crate::access::AccessControl,
    http_addr: SocketAddr,
    engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bound HTTP address (dashboard, `/metrics`, probes).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://ADDR`, or `https://ADDR` when the listener speaks TLS, for clients.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The domain core.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The API tokens: tests and embedders create their clients' tokens here.
    pub fn access(&self) -> &crate::access::AccessControl {
        &self.access
    }

    /// A ControlService client of this server carrying a new token with `role`.
    pub async fn control_client(
        &self,
        role: crate::access::Role,
    ) -> Result<crate::access::ControlClient, CoordError> {
        crate::access::connect_with_role(&self.url(), &self.access, role).await
    }

    /// Stop serving and wait (at most 5 s) for the server to finish.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match tokio::time::timeout(Duration::from_secs(5), &mut self.handle).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(ServerError::Engine(CoordError::Internal(format!(
                "server task: {e}"
            )))),
            Err(_) => {
                self.handle.abort();
                Ok(())
            }
        }
    }
}
