//! A TCP proxy the tests control, to put a network fault between an agent and the coordinator.
//!
//! The proxy listens on `127.0.0.1:0` and forwards every accepted connection to one target address. The
//! test can [`Proxy::cut`] the link (every open connection is closed at once and new ones are closed as
//! soon as they are accepted, until [`Proxy::restore`]), or [`Proxy::blackhole`] it: connections stay
//! open but no byte moves in either direction, like a silent partition on the path; TCP's own buffering
//! means the bytes held back flow again after [`Proxy::restore`], as they would once a real partition
//! heals before the peers give up.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! let proxy = drover_tests::proxy::Proxy::start("127.0.0.1:7330".parse().unwrap()).await?;
//! proxy.cut();
//! proxy.restore();
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Size of one read; a gRPC frame of logs fits in a few of them.
const BUF_BYTES: usize = 64 * 1024;

/// What the proxy does with traffic right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes both ways.
    Forward,
    /// Close every connection; close new ones on accept.
    Cut,
    /// Keep connections open, move no bytes.
    Blackhole,
}

/// The state every connection task watches: the mode and how many cuts happened, so a connection knows
/// that a cut (even one already followed by a restore) ended it.
#[derive(Debug, Clone, Copy)]
struct State {
    mode: Mode,
    cuts: u64,
}

/// Counters of what the proxy saw, as a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted and forwarded to the target.
    pub accepted: u64,
    /// Connections closed on accept because the link was cut, or because the target refused them.
    pub refused: u64,
    /// Open connections closed by a cut.
    pub cut_connections: u64,
    /// Number of `cut()` calls.
    pub cuts: u64,
    /// Number of `blackhole()` calls.
    pub blackholes: u64,
    /// Connections open right now.
    pub active: u64,
    /// Bytes forwarded from clients to the target.
    pub bytes_to_target: u64,
    /// Bytes forwarded from the target to clients.
    pub bytes_from_target: u64,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    cut_connections: AtomicU64,
    blackholes: AtomicU64,
    active: AtomicU64,
    bytes_to_target: AtomicU64,
    bytes_from_target: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    state: watch::Sender<State>,
    counters: Counters,
}

/// A running proxy; dropping it closes the listener and every connection.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl Proxy {
    /// Binds `127.0.0.1:0` and forwards every connection to `target`. Must be called inside a tokio
    /// runtime, which then runs the proxy's tasks.
    pub async fn start(target: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(State {
            mode: Mode::Forward,
            cuts: 0,
        });
        let shared = Arc::new(Shared {
            target,
            state,
            counters: Counters::default(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            shared,
            accept_task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the URL a gRPC client uses to go through the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Closes every open connection now and closes new ones on accept until [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.state.send_modify(|s| {
            s.mode = Mode::Cut;
            s.cuts += 1;
        });
    }

    /// Keeps connections (open and new) but forwards nothing until [`Proxy::restore`] or [`Proxy::cut`].
    pub fn blackhole(&self) {
        self.shared
            .counters
            .blackholes
            .fetch_add(1, Ordering::Relaxed);
        self.shared.state.send_modify(|s| s.mode = Mode::Blackhole);
    }

    /// Forwards again: new connections are accepted, blackholed ones carry on where they stopped.
    pub fn restore(&self) {
        self.shared.state.send_modify(|s| s.mode = Mode::Forward);
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.shared.state.borrow().mode
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            cut_connections: c.cut_connections.load(Ordering::Relaxed),
            cuts: self.shared.state.borrow().cuts,
            blackholes: c.blackholes.load(Ordering::Relaxed),
            active: c.active.load(Ordering::Relaxed),
            bytes_to_target: c.bytes_to_target.load(Ordering::Relaxed),
            bytes_from_target: c.bytes_from_target.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        // A cut ends every connection task, so nothing outlives the proxy.
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            // Out of file descriptors and the like: a pause, not the end of the proxy.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let state = *shared.state.borrow();
        if state.mode == Mode::Cut {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
            continue;
        }
        // One task per connection; it ends when either side closes or a cut comes, so no handle is kept.
        tokio::spawn(serve(client, shared.clone(), state.cuts));
    }
}

/// Forwards one connection until both directions are done or a cut comes.
async fn serve(client: TcpStream, shared: Arc<Shared>, cuts_at_accept: u64) {
    let upstream = match TcpStream::connect(shared.target).await {
        Ok(s) => s,
        Err(_) => {
            // The target is down (e.g. a coordinator being restarted): the client sees a closed socket,
            // as it would connecting to the target directly.
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.counters.accepted.fetch_add(1, Ordering::Relaxed);
    shared.counters.active.fetch_add(1, Ordering::Relaxed);
    let (client_read, client_write) = client.into_split();
    let (up_read, up_write) = upstream.into_split();
    let c = &shared.counters;
    let forward = async {
        tokio::join!(
            pump(
                client_read,
                up_write,
                shared.state.subscribe(),
                &c.bytes_to_target
            ),
            pump(
                up_read,
                client_write,
                shared.state.subscribe(),
                &c.bytes_from_target
            ),
        )
    };
    let mut cut_rx = shared.state.subscribe();
    // The pumps end on a cut too, so both branches can be ready at once: whichever `select!` takes,
    // the connection counts as cut if a cut came while it was open (counting only in the cut branch
    // lost one now and then, and a test asserting two cut connections failed with two cuts made).
    let cut = tokio::select! {
        _ = forward => shared.state.borrow().cuts != cuts_at_accept,
        _ = cut_rx.wait_for(|s| s.cuts != cuts_at_accept) => true,
    };
    if cut {
        c.cut_connections.fetch_add(1, Ordering::Relaxed);
    }
    c.active.fetch_sub(1, Ordering::Relaxed);
    // Both sockets are dropped here: the peers see the connection closed.
}

/// Copies one direction, holding bytes back while blackholed; half-closes `to` at end of stream.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    counter: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_BYTES];
    loop {
        wait_forwarding(&mut state).await?;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        // The mode may have changed while the read was pending: a blackhole holds these bytes too.
        wait_forwarding(&mut state).await?;
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Returns once the proxy forwards; an error once it is cut (the connection task is ending anyway).
async fn wait_forwarding(state: &mut watch::Receiver<State>) -> io::Result<()> {
    let s = state
        .wait_for(|s| s.mode != Mode::Blackhole)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "proxy dropped"))?;
    if s.mode == Mode::Cut {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "proxy cut",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::timeout;

    /// An echo server on loopback; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await?;
        Ok(got)
    }

    /// True when the peer closed the connection (EOF or reset) within a second.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            timeout(Duration::from_secs(1), s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts_bytes() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(roundtrip(&mut s, &big).await.unwrap(), big);
        let st = proxy.stats();
        assert_eq!(st.accepted, 1);
        assert_eq!(st.active, 1);
        assert_eq!(st.bytes_to_target, big.len() as u64);
        assert_eq!(st.bytes_from_target, big.len() as u64);
        assert_eq!(proxy.target(), proxy.shared.target);
    }

    #[tokio::test]
    async fn cut_closes_open_connections_and_refuses_new_until_restore() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"before").await.unwrap(), b"before");

        proxy.cut();
        assert_eq!(proxy.mode(), Mode::Cut);
        assert!(
            closed(&mut s).await,
            "an open connection must be closed by a cut"
        );
        // New connections are accepted by the kernel but closed at once by the proxy.
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(
            closed(&mut refused).await,
            "a new connection must be closed while cut"
        );

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut again, b"after").await.unwrap(), b"after");
        let st = proxy.stats();
        assert_eq!(st.cuts, 1);
        assert_eq!(st.cut_connections, 1);
        assert_eq!(st.refused, 1);
        assert_eq!(st.accepted, 2);
        assert_eq!(st.active, 1);
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_and_restore_delivers_them() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"one").await.unwrap(), b"one");

        proxy.blackhole();
        // A connection made during the blackhole is kept open, silently.
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(b"held").await.unwrap();
        fresh.write_all(b"held too").await.unwrap();
        let mut b = [0u8; 8];
        assert!(
            timeout(Duration::from_millis(500), s.read(&mut b))
                .await
                .is_err(),
            "nothing may come back through a blackhole"
        );
        assert!(timeout(Duration::from_millis(200), fresh.read(&mut b))
            .await
            .is_err());

        proxy.restore();
        let mut got = [0u8; 4];
        timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .expect("held bytes arrive after restore")
            .unwrap();
        assert_eq!(&got, b"held");
        let mut got = [0u8; 8];
        timeout(Duration::from_secs(2), fresh.read_exact(&mut got))
            .await
            .expect("held bytes of the new connection arrive after restore")
            .unwrap();
        assert_eq!(&got, b"held too");
        assert_eq!(proxy.stats().blackholes, 1);
    }

    #[tokio::test]
    async fn cut_during_blackhole_closes_connections() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"x").await.unwrap(), b"x");
        proxy.blackhole();
        proxy.cut();
        assert!(closed(&mut s).await);
        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut again, b"y").await.unwrap(), b"y");
    }

    #[tokio::test]
    async fn target_down_closes_the_client_and_counts_it() {
        // Bind then drop to get a port nobody listens on.
        let dead = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let proxy = Proxy::start(dead).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(closed(&mut s).await);
        assert_eq!(proxy.stats().refused, 1);
        assert_eq!(proxy.stats().accepted, 0);
    }

    #[tokio::test]
    async fn drop_closes_connections() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"z").await.unwrap(), b"z");
        drop(proxy);
        assert!(closed(&mut s).await);
    }
}
