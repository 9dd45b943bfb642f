//! The floor of the latency benchmarks: a raw tonic bidirectional echo stream between two processes on
//! loopback (this binary's hidden `echo-server` subcommand is the other process).

use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::Stream;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::cluster::{connect, Proc};
use crate::report::Samples;

/// Generated from `proto/drover/bench/v1/echo.proto`.
#[allow(unreachable_pub, missing_debug_implementations, clippy::all)]
pub(crate) mod pb {
    tonic::include_proto!("drover.bench.v1");
}

use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::Ping;

/// Bytes of padding per ping: about a one-step assignment.
const PAYLOAD: usize = 256;

/// Round trips made before measuring (connection warm-up, allocator, branch caches).
const WARMUP: usize = 200;

#[derive(Debug, Default)]
struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    type BounceStream = Pin<Box<dyn Stream<Item = Result<Ping, Status>> + Send + 'static>>;

    async fn bounce(
        &self,
        req: Request<Streaming<Ping>>,
    ) -> Result<Response<Self::BounceStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(p)) = inbound.message().await {
                if tx.send(Ok(p)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The `echo-server` subcommand: serve on a free loopback port until stdin closes (the parent died or
/// dropped us).
pub(crate) async fn serve() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the echo server")?;
    let addr = listener.local_addr()?;
    eprintln!("drover-bench echo-server listening on {addr}");
    let incoming = TcpListenerStream::new(listener);
    let stdin_closed = async {
        let mut buf = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(incoming, stdin_closed)
        .await
        .context("echo server failed")
}

/// Spawns the echo server process and measures `n` sequential round trips on one stream.
pub(crate) async fn round_trips(n: usize) -> Result<Samples> {
    let exe = std::env::current_exe().context("locating the drover-bench executable")?;
    let mut cmd = tokio::process::Command::new(exe);
    // The server exits when this pipe closes, so it never outlives the benchmark.
    cmd.arg("echo-server").stdin(std::process::Stdio::piped());
    let (mut server, line) = Proc::spawn(cmd, "drover-bench echo-server", "listening on").await?;
    let addr = line
        .split("listening on ")
        .nth(1)
        .map(str::trim)
        .with_context(|| format!("no address in the echo server's line {line:?}"))?;
    let result = measure(&format!("http://{addr}"), n).await;
    server.kill().await;
    result
}

async fn measure(url: &str, n: usize) -> Result<Samples> {
    let mut client = EchoClient::new(connect(url).await?);
    let (tx, rx) = mpsc::channel(1);
    let mut inbound = client
        .bounce(ReceiverStream::new(rx))
        .await
        .context("opening the echo stream")?
        .into_inner();
    let mut samples = Vec::with_capacity(n);
    for seq in 0..(WARMUP + n) as u64 {
        let t0 = Instant::now();
        tx.send(Ping {
            seq,
            payload: vec![0u8; PAYLOAD],
        })
        .await
        .map_err(|_| anyhow!("the echo request stream closed"))?;
        let back = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| anyhow!("no echo within 10 s"))?
            .context("echo stream failed")?
            .context("the echo server ended the stream")?;
        let d = t0.elapsed();
        if back.seq != seq {
            bail!("echo out of order: sent {seq}, got {}", back.seq);
        }
        if seq >= WARMUP as u64 {
            samples.push(d);
        }
    }
    Ok(Samples::new(samples))
}
