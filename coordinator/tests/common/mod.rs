//! Helpers shared by the in-process coordinator tests: a coordinator on 127.0.0.1:0, a scripted fake agent
//! speaking the real protocol (labels and capacity chosen by the test), and a minimal HTTP/1.1 client
//! that can read a streamed (chunked) response piece by piece.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use drover_coordinator::config::Config;
use drover_coordinator::{RunningServer, Server};
use drover_proto::v1 as pb;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use drover_proto::v1::coordinator_message::Msg as CMsg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Streaming};

/// Timeout for anything a test waits for.
pub const T: Duration = Duration::from_secs(10);

/// A coordinator with fast heartbeats on free loopback ports (gRPC and HTTP).
pub async fn start(dir: &std::path::Path) -> RunningServer {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval: Duration::from_millis(100),
        lease_ttl: Duration::from_secs(5),
        ..Config::with_data_dir(dir)
    };
    let s = Server::bind(config).await.unwrap().spawn();
    // The HTTP API needs a read token: `http_get` sends this server's.
    let token = s
        .access()
        .create(drover_coordinator::access::Role::Read, "http tests")
        .await
        .unwrap();
    HTTP_TOKENS.lock().unwrap().insert(s.http_addr(), token);
    s
}

/// A read API token per HTTP address of the servers `start` made.
static HTTP_TOKENS: std::sync::Mutex<std::collections::BTreeMap<SocketAddr, String>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// A ControlService client.
pub async fn control(s: &RunningServer) -> drover_coordinator::access::ControlClient {
    s.control_client(drover_coordinator::access::Role::Admin)
        .await
        .unwrap()
}

/// A request carrying an agent credential.
pub fn authed<T>(cred: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {cred}").parse().unwrap());
    r
}

/// `[("k","v")]` as a proto map.
pub fn label_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A scripted agent.
pub struct FakeAgent {
    pub id: String,
    pub cred: String,
    labels: HashMap<String, String>,
    capacity: u32,
    client: AgentServiceClient<Channel>,
    out: Option<mpsc::Sender<pb::AgentMessage>>,
    inbox: Option<Streaming<pb::CoordinatorMessage>>,
}

impl FakeAgent {
    /// Enroll with a fresh token.
    pub async fn enroll(s: &RunningServer, labels: &[(&str, &str)], capacity: u32) -> FakeAgent {
        let token = control(s)
            .await
            .create_token(pb::CreateTokenRequest {
                uses: 1,
                ttl_secs: 60,
                labels: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let mut client = AgentServiceClient::connect(s.url()).await.unwrap();
        let r = client
            .enroll(pb::EnrollRequest {
                token,
                labels: label_map(labels),
                hostname: "test-host".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        FakeAgent {
            id: r.agent_id,
            cred: r.credential,
            labels: label_map(labels),
            capacity,
            client,
            out: None,
            inbox: None,
        }
    }

    /// Open Attach with a hello; returns the Welcome.
    pub async fn attach(&mut self) -> pb::Welcome {
        let (tx, rx) = mpsc::channel(16);
        let hello = pb::Hello {
            agent_id: self.id.clone(),
            version: "test".into(),
            labels: self.labels.clone(),
            capacity: self.capacity,
            running: vec![],
            hostname: "test-host".into(),
            host_policy: None,
            follows_heartbeat_pacing: false,
        };
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        })
        .await
        .unwrap();
        let inbox = self
            .client
            .attach(authed(&self.cred, ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        self.out = Some(tx);
        self.inbox = Some(inbox);
        match self.recv().await {
            CMsg::Welcome(w) => w,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// The next message from the coordinator.
    pub async fn recv(&mut self) -> CMsg {
        let inbox = self.inbox.as_mut().expect("attached");
        let m = tokio::time::timeout(T, inbox.message())
            .await
            .expect("message in time")
            .unwrap()
            .unwrap();
        m.msg.unwrap()
    }

    /// The next message, which must be an assignment.
    pub async fn assignment(&mut self) -> pb::Assignment {
        match self.recv().await {
            CMsg::Assign(a) => a,
            other => panic!("expected assignment, got {other:?}"),
        }
    }

    /// Send one message on Attach.
    pub async fn send(&self, msg: pb::agent_message::Msg) {
        self.out
            .as_ref()
            .unwrap()
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    /// Report step `i` started (`finished == false`) or finished with exit 0.
    pub async fn step(&self, a: &pb::Assignment, i: u32, finished: bool) {
        self.send(pb::agent_message::Msg::Step(pb::StepUpdate {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            step_index: i,
            finished,
            exit_code: 0,
            failure: 0,
            reason: String::new(),
        }))
        .await;
    }

    /// Push one log chunk on its own PushLogs stream and wait for its durable ack.
    pub async fn push_log(
        &mut self,
        a: &pb::Assignment,
        step: u32,
        offset: u64,
        data: &[u8],
        eof: bool,
    ) {
        let chunk = pb::LogChunk {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            step_index: step,
            offset,
            data: data.to_vec().into(),
            eof,
            ..Default::default()
        };
        let mut acks = self
            .client
            .push_logs(authed(&self.cred, tokio_stream::iter(vec![chunk])))
            .await
            .unwrap()
            .into_inner();
        let want = offset + data.len() as u64;
        let mut durable = 0;
        while let Some(ack) = tokio::time::timeout(T, acks.message())
            .await
            .unwrap()
            .unwrap()
        {
            durable = durable.max(ack.durable_offset);
        }
        assert_eq!(durable, want, "chunk acknowledged durable");
    }

    /// Report the attempt with `state` and `failure`.
    pub async fn result(
        &self,
        a: &pb::Assignment,
        state: pb::JobState,
        failure: pb::FailureClass,
        exit_code: i32,
    ) {
        self.send(pb::agent_message::Msg::Result(pb::JobResult {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            state: state as i32,
            failure: failure as i32,
            reason: if exit_code == 0 {
                String::new()
            } else {
                format!("step exited {exit_code}")
            },
            exit_code,
        }))
        .await;
    }

    /// Run a whole assignment successfully: every step logs `"<job> step <i>\n"`.
    pub async fn run_ok(&mut self, a: &pb::Assignment) {
        self.send(pb::agent_message::Msg::Accepted(pb::Accepted {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
        }))
        .await;
        for i in 0..a.steps.len() as u32 {
            self.step(a, i, false).await;
            self.push_log(a, i, 0, format!("{} step {i}\n", a.job).as_bytes(), true)
                .await;
            self.step(a, i, true).await;
        }
        self.result(a, pb::JobState::Succeeded, pb::FailureClass::None, 0)
            .await;
    }
}

/// Wait until the run is no longer running; returns its last state.
pub async fn wait_run(c: &mut drover_coordinator::access::ControlClient, run_id: &str) -> pb::Run {
    let mut s = c
        .watch_run(pb::GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(r) = tokio::time::timeout(T, s.message())
        .await
        .expect("run finishes in time")
        .unwrap()
    {
        last = Some(r);
    }
    last.unwrap()
}

/// An HTTP response being read: status, lower-cased headers, and a body read on demand.
pub struct HttpResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    stream: TcpStream,
    buf: Vec<u8>,
    chunked: bool,
    /// Bytes left in the current chunk (chunked) or in the body (content-length).
    left: Option<usize>,
    done: bool,
}

/// `GET path` over a fresh connection; returns once the status line and headers are read.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    let mut stream = tokio::time::timeout(T, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let auth = HTTP_TOKENS
        .lock()
        .unwrap()
        .get(&addr)
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut tmp = [0u8; 4096];
        let n = tokio::time::timeout(T, stream.read(&mut tmp))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let left = if chunked {
        None
    } else {
        headers.get("content-length").and_then(|v| v.parse().ok())
    };
    HttpResponse {
        status,
        headers,
        stream,
        buf: rest,
        chunked,
        left,
        done: false,
    }
}

impl HttpResponse {
    async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 8192];
        let n = tokio::time::timeout(T, self.stream.read(&mut tmp))
            .await
            .expect("body bytes in time")
            .unwrap();
        self.buf.extend_from_slice(&tmp[..n]);
        n > 0
    }

    /// The next piece of the body; `None` at its end.
    pub async fn next_piece(&mut self) -> Option<Vec<u8>> {
        if self.done {
            return None;
        }
        if !self.chunked {
            if self.left == Some(0) {
                self.done = true;
                return None;
            }
            if self.buf.is_empty() && !self.fill().await {
                self.done = true;
                return None;
            }
            let take = self.left.map_or(self.buf.len(), |l| l.min(self.buf.len()));
            if let Some(l) = self.left.as_mut() {
                *l -= take;
            }
            return Some(self.buf.drain(..take).collect());
        }
        loop {
            match self.left {
                Some(0) => {
                    // End of a chunk's data: its CRLF.
                    while self.buf.len() < 2 {
                        assert!(self.fill().await, "connection closed inside a chunk");
                    }
                    self.buf.drain(..2);
                    self.left = None;
                }
                Some(n) => {
                    if self.buf.is_empty() {
                        assert!(self.fill().await, "connection closed inside a chunk");
                    }
                    let take = n.min(self.buf.len());
                    self.left = Some(n - take);
                    return Some(self.buf.drain(..take).collect());
                }
                None => {
                    let line_end = loop {
                        if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break i;
                        }
                        assert!(self.fill().await, "connection closed before a chunk size");
                    };
                    let line = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
                    self.buf.drain(..line_end + 2);
                    let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                        .expect("chunk size");
                    if size == 0 {
                        self.done = true;
                        return None;
                    }
                    self.left = Some(size);
                }
            }
        }
    }

    /// The rest of the body.
    pub async fn body(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(p) = self.next_piece().await {
            out.extend_from_slice(&p);
        }
        out
    }

    /// The rest of the body as text.
    pub async fn text(&mut self) -> String {
        String::from_utf8(self.body().await).expect("utf-8 body")
    }
}

/// `GET path` and the whole body as text, with the status.
pub async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut r = http_get(addr, path).await;
    let t = r.text().await;
    (r.status, t)
}
