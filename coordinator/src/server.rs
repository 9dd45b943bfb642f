//! The gRPC server: binds the listener, serves AgentService, ControlService and `grpc.health.v1`, runs the
//! lease timer, and shuts down when told.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use drover_proto::v1::agent_service_server::AgentServiceServer;
use drover_proto::v1::control_service_server::ControlServiceServer;
use drover_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::{AgentApi, ControlApi};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::CoordError;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Opening the stores or loading state failed.
    #[error("cannot open the coordinator state: {0}")]
    Engine(#[from] CoordError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The transport failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A bound, not yet serving coordinator.
#[derive(Debug)]
pub struct Server {
    engine: Engine,
    listener: TcpListener,
    addr: SocketAddr,
}

impl Server {
    /// Open the data directory, load state and bind `config.listen` (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let listen = config.listen;
        let engine = Engine::open(config).await?;
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
        Ok(Server {
            engine,
            listener,
            addr,
        })
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
        let agent = AgentServiceServer::new(AgentApi::new(engine.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let control = ControlServiceServer::new(ControlApi::new(engine.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let closing = engine.clone();
        let result = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(1 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .add_service(health_service)
            .add_service(agent)
            .add_service(control)
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), async move {
                shutdown.await;
                // Long-lived streams (Attach, WatchRun, FollowLogs) end so the graceful shutdown can finish.
                closing.shutdown();
            })
            .await;
        engine.shutdown();
        leases.abort();
        result.map_err(ServerError::from)
    }

    /// Serve on a background task; for tests and embedding.
    pub fn spawn(self) -> RunningServer {
        let addr = self.addr;
        let engine = self.engine.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(self.serve(async move {
            let _ = stopped.await;
        }));
        RunningServer {
            addr,
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
    engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServerError>>,
}

impl RunningServer {
    /// Bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The domain core.
    pub fn engine(&self) -> &Engine {
        &self.engine
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
