//! The agent's session and runner against an in-test coordinator speaking the real gRPC
//! protocol, with steps in the real Docker engine (image `drover-busybox:latest`).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_agent::client;
use drover_agent::executor::{DockerExecutor, Executor};
use drover_agent::runner::RunnerContext;
use drover_agent::session::{Session, SessionConfig};
use drover_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use drover_proto::v1::{
    agent_message, artifact_chunk, coordinator_message, AgentMessage, ArtifactChunk,
    ArtifactUploaded, Assignment, BlobChunk, BlobRequest, Cancel, CoordinatorMessage, FailureClass,
    HeartbeatAck, InputFile, JobResult, JobState, LogAck, LogChunk, StepSpec, Welcome,
};
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

const IMAGE: &str = "drover-busybox:latest";
const CREDENTIAL: &str = "test-credential";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Default)]
struct State {
    hello: Option<AgentMessage>,
    hellos: Vec<AgentMessage>,
    messages: Vec<AgentMessage>,
    /// (attempt, step) -> (bytes, complete)
    logs: BTreeMap<(String, u32), (Vec<u8>, bool)>,
    artifacts: BTreeMap<(String, String), (u32, Vec<u8>)>,
    blobs: HashMap<String, Vec<u8>>,
    to_agent: Option<mpsc::Sender<Result<CoordinatorMessage, Status>>>,
    /// Logs complete at the moment each result arrived.
    logs_complete_at_result: HashMap<String, bool>,
}

#[derive(Clone, Default)]
struct FakeCoordinator {
    // std Mutex: short sections, never across an await.
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

fn check_auth<T>(r: &Request<T>) -> Result<(), Status> {
    let ok = r
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {CREDENTIAL}"));
    if ok {
        Ok(())
    } else {
        Err(Status::unauthenticated("bad credential"))
    }
}

#[tonic::async_trait]
impl AgentService for FakeCoordinator {
    async fn attach(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<BoxStream<CoordinatorMessage>>, Status> {
        check_auth(&request)?;
        let mut inbound = request.into_inner();
        let hello = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no hello"))?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(Ok(CoordinatorMessage {
            msg: Some(coordinator_message::Msg::Welcome(Welcome {
                agent_id: "agent-1".into(),
                heartbeat_interval_ms: 200,
                lease_ttl_ms: 10_000,
                stale_attempts: vec![],
            })),
        }))
        .await
        .unwrap();
        {
            let mut s = self.state.lock().unwrap();
            s.hellos.push(hello.clone());
            s.hello = Some(hello);
            s.to_agent = Some(tx);
        }
        self.changed.notify_waiters();
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                let mut s = me.state.lock().unwrap();
                if let Some(agent_message::Msg::Result(r)) = &m.msg {
                    let complete = s
                        .logs
                        .iter()
                        .filter(|((a, _), _)| a == &r.attempt_id)
                        .all(|(_, (_, c))| *c);
                    s.logs_complete_at_result
                        .insert(r.attempt_id.clone(), complete);
                }
                s.messages.push(m);
                drop(s);
                me.changed.notify_waiters();
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_logs(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<BoxStream<LogAck>>, Status> {
        check_auth(&request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(c)) = inbound.message().await {
                let ack = {
                    let mut s = me.state.lock().unwrap();
                    let (log, complete) = s
                        .logs
                        .entry((c.attempt_id.clone(), c.step_index))
                        .or_default();
                    let have = log.len() as u64;
                    if c.offset > have {
                        Err(Status::invalid_argument("gap"))
                    } else {
                        let skip = (have - c.offset) as usize;
                        if skip < c.data.len() {
                            log.extend_from_slice(&c.data[skip..]);
                        }
                        if c.eof && c.offset + c.data.len() as u64 == log.len() as u64 {
                            *complete = true;
                        }
                        Ok(LogAck {
                            attempt_id: c.attempt_id.clone(),
                            step_index: c.step_index,
                            durable_offset: log.len() as u64,
                            complete: *complete,
                        })
                    }
                };
                me.changed.notify_waiters();
                if tx.send(ack).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<ArtifactChunk>>,
    ) -> Result<Response<ArtifactUploaded>, Status> {
        check_auth(&request)?;
        let mut inbound = request.into_inner();
        let Some(ArtifactChunk {
            part: Some(artifact_chunk::Part::Header(header)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument("header first"));
        };
        let mut data = Vec::new();
        while let Some(chunk) = inbound.message().await? {
            if let Some(artifact_chunk::Part::Data(d)) = chunk.part {
                data.extend_from_slice(&d);
            }
        }
        let digest = hex::encode(Sha256::digest(&data));
        // An empty digest: the agent streamed the file and checks the digest returned.
        if (!header.digest.is_empty() && digest != header.digest)
            || data.len() as u64 != header.size
        {
            return Err(Status::invalid_argument("digest or size mismatch"));
        }
        self.state.lock().unwrap().artifacts.insert(
            (header.attempt_id, header.path),
            (header.mode, data.clone()),
        );
        Ok(Response::new(ArtifactUploaded {
            digest,
            size: data.len() as u64,
        }))
    }

    async fn download_blob(
        &self,
        request: Request<BlobRequest>,
    ) -> Result<Response<BoxStream<BlobChunk>>, Status> {
        check_auth(&request)?;
        let BlobRequest { digest, offset, .. } = request.into_inner();
        let data = self
            .state
            .lock()
            .unwrap()
            .blobs
            .get(&digest)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no blob {digest}")))?;
        let from = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let chunks: Vec<Result<BlobChunk, Status>> = data[from..]
            .chunks(7)
            .map(|c| Ok(BlobChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

impl FakeCoordinator {
    fn add_blob(&self, data: Vec<u8>) -> String {
        let digest = hex::encode(Sha256::digest(&data));
        self.state
            .lock()
            .unwrap()
            .blobs
            .insert(digest.clone(), data);
        digest
    }

    async fn push(&self, msg: coordinator_message::Msg) {
        let tx = self
            .state
            .lock()
            .unwrap()
            .to_agent
            .clone()
            .expect("attached");
        tx.send(Ok(CoordinatorMessage { msg: Some(msg) }))
            .await
            .unwrap();
    }

    async fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&State) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.changed.notified();
            if let Some(v) = f(&self.state.lock().unwrap()) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {what}");
            }
        }
    }

    async fn result(&self, attempt: &str) -> JobResult {
        self.wait_for(&format!("the result of {attempt}"), |s| {
            s.messages.iter().find_map(|m| match &m.msg {
                Some(agent_message::Msg::Result(r)) if r.attempt_id == attempt => Some(r.clone()),
                _ => None,
            })
        })
        .await
    }

    fn log(&self, attempt: &str, step: u32) -> (Vec<u8>, bool) {
        self.state
            .lock()
            .unwrap()
            .logs
            .get(&(attempt.to_string(), step))
            .cloned()
            .unwrap_or_default()
    }
}

fn step(name: &str, script: &str) -> StepSpec {
    StepSpec {
        name: name.into(),
        image: IMAGE.into(),
        commands: vec![script.into()],
        ..Default::default()
    }
}

fn context_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let data = b"from the context\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "in.txt", &data[..]).unwrap();
    b.into_inner().unwrap()
}

#[tokio::test]
async fn runs_jobs_ships_logs_and_artifacts_then_drains() {
    let coord = FakeCoordinator::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop_server = CancellationToken::new();
    let server = {
        let stop = stop_server.clone();
        let svc = AgentServiceServer::new(coord.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled())
                .await
        })
    };

    let state_dir = tempfile::tempdir().unwrap();
    let agent_id = format!("test-agent-{}", uuid::Uuid::new_v4());
    let exec = DockerExecutor::connect().await.unwrap();
    let channel = client::channel(&url).unwrap();
    let agent_client = client::agent_client(channel, CREDENTIAL).unwrap();
    let ctx = Arc::new(RunnerContext {
        executor: Arc::new(exec.clone()),
        client: agent_client.clone(),
        agent_id: agent_id.clone(),
        state_dir: state_dir.path().to_path_buf(),
        max_log_bytes: drover_agent::logs::DEFAULT_MAX_LOG_BYTES,
        host_policy: Default::default(),
    });
    let session = Session::new(
        SessionConfig {
            agent_id: agent_id.clone(),
            labels: HashMap::from([("os".into(), "linux".into())]),
            capacity: 2,
            hostname: "test-host".into(),
            coordinator_url: url.clone(),
        },
        agent_client,
        ctx,
    );
    let drain = CancellationToken::new();
    let agent = tokio::spawn(session.run(drain.clone()));

    coord
        .wait_for("the hello", |s| s.to_agent.as_ref().map(|_| ()))
        .await;
    let hello = coord.state.lock().unwrap().hello.clone().unwrap();
    match hello.msg {
        Some(agent_message::Msg::Hello(h)) => {
            assert_eq!(h.agent_id, agent_id);
            assert_eq!(h.capacity, 2);
            assert_eq!(h.labels.get("os").map(String::as_str), Some("linux"));
        }
        other => panic!("expected a hello, got {other:?}"),
    }

    // A job with a context, an input file, two steps and artifacts.
    let context_digest = coord.add_blob(context_tar());
    let lib = b"library\n".to_vec();
    let lib_digest = coord.add_blob(lib.clone());
    coord
        .push(coordinator_message::Msg::Assign(Assignment {
            attempt_id: "att-ok".into(),
            epoch: 7,
            run_id: "run-1".into(),
            job: "build".into(),
            steps: vec![
                step(
                    "compile",
                    "cat in.txt dep/lib.txt\nmkdir -p out\nprintf data > out/r.bin\nchmod 750 out/r.bin\nprintf partial",
                ),
                step("report", "echo second >&2"),
            ],
            context_digest,
            inputs: vec![InputFile {
                path: "dep/lib.txt".into(),
                digest: lib_digest,
                size: lib.len() as u64,
                mode: 0o644,
            }],
            artifacts: vec!["out/".into()],
            timeout_secs: 120,
            ..Default::default()
        }))
        .await;
    // A failing job, a job whose artifact is missing, and one that is canceled.
    coord
        .push(coordinator_message::Msg::Assign(Assignment {
            attempt_id: "att-fail".into(),
            epoch: 1,
            job: "test".into(),
            steps: vec![
                step("boom", "echo failing\nexit 4"),
                step("never", "echo never"),
            ],
            ..Default::default()
        }))
        .await;

    let ok = coord.result("att-ok").await;
    assert_eq!(ok.state, JobState::Succeeded as i32, "{ok:?}");
    assert_eq!(ok.epoch, 7);
    assert_eq!(
        coord.log("att-ok", 0),
        (b"from the context\nlibrary\npartial".to_vec(), true)
    );
    assert_eq!(coord.log("att-ok", 1), (b"second\n".to_vec(), true));
    {
        let s = coord.state.lock().unwrap();
        assert_eq!(s.logs_complete_at_result.get("att-ok"), Some(&true));
        assert_eq!(
            s.artifacts.get(&("att-ok".into(), "out/r.bin".into())),
            Some(&(0o750, b"data".to_vec()))
        );
    }

    let failed = coord.result("att-fail").await;
    assert_eq!(failed.state, JobState::Failed as i32);
    assert_eq!(failed.failure, FailureClass::Script as i32);
    assert_eq!(failed.exit_code, 4);
    assert_eq!(coord.log("att-fail", 0), (b"failing\n".to_vec(), true));
    assert_eq!(
        coord.log("att-fail", 1),
        (Vec::new(), false),
        "later steps do not run"
    );

    coord
        .push(coordinator_message::Msg::Assign(Assignment {
            attempt_id: "att-noart".into(),
            epoch: 1,
            job: "pkg".into(),
            steps: vec![step("s", "true")],
            artifacts: vec!["dist/*.tgz".into()],
            ..Default::default()
        }))
        .await;
    let noart = coord.result("att-noart").await;
    assert_eq!(noart.failure, FailureClass::Script as i32);
    assert_eq!(noart.reason, "artifact \"dist/*.tgz\" matched no file");

    coord
        .push(coordinator_message::Msg::Assign(Assignment {
            attempt_id: "att-cancel".into(),
            epoch: 2,
            job: "long".into(),
            steps: vec![step("sleep", "echo sleeping\nsleep 60")],
            ..Default::default()
        }))
        .await;
    coord
        .wait_for("the sleeping step's output", |s| {
            s.logs
                .get(&("att-cancel".to_string(), 0))
                .filter(|(l, _)| l == b"sleeping\n")
                .map(|_| ())
        })
        .await;
    coord
        .push(coordinator_message::Msg::Cancel(Cancel {
            attempt_id: "att-cancel".into(),
            grace_ms: 500,
            reason: "canceled by a user".into(),
        }))
        .await;
    let canceled = coord.result("att-cancel").await;
    assert_eq!(canceled.state, JobState::Canceled as i32, "{canceled:?}");
    assert_eq!(canceled.reason, "canceled by a user");

    // Step updates arrive in order: started then finished, per step.
    {
        let s = coord.state.lock().unwrap();
        let updates: Vec<(u32, bool)> = s
            .messages
            .iter()
            .filter_map(|m| match &m.msg {
                Some(agent_message::Msg::Step(u)) if u.attempt_id == "att-ok" => {
                    Some((u.step_index, u.finished))
                }
                _ => None,
            })
            .collect();
        assert_eq!(updates, vec![(0, false), (0, true), (1, false), (1, true)]);
        assert!(s.messages.iter().any(|m| matches!(
            &m.msg,
            Some(agent_message::Msg::Accepted(a)) if a.attempt_id == "att-ok" && a.epoch == 7
        )));
        assert!(s
            .messages
            .iter()
            .any(|m| matches!(&m.msg, Some(agent_message::Msg::Heartbeat(_)))));
    }

    drain.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
    assert!(exec.leftovers(&agent_id).await.unwrap().is_empty());
    let spool = state_dir.path().join("spool");
    let spooled: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(spooled.is_empty(), "spools removed: {spooled:?}");
    stop_server.cancel();
    let _ = server.await;
}

/// A TCP relay whose connections can be cut, to break the agent's streams mid-job.
struct Relay {
    url: String,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let list = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                list.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { url, conns }
    }

    fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

#[tokio::test]
async fn reconnects_and_resends_after_the_connection_drops() {
    let coord = FakeCoordinator::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    {
        let svc = AgentServiceServer::new(coord.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        });
    }
    let relay = Relay::start(server_addr).await;
    let state_dir = tempfile::tempdir().unwrap();
    let agent_id = format!("test-agent-{}", uuid::Uuid::new_v4());
    let exec = DockerExecutor::connect().await.unwrap();
    let agent_client =
        client::agent_client(client::channel(&relay.url).unwrap(), CREDENTIAL).unwrap();
    let ctx = Arc::new(RunnerContext {
        executor: Arc::new(exec.clone()),
        client: agent_client.clone(),
        agent_id: agent_id.clone(),
        state_dir: state_dir.path().to_path_buf(),
        max_log_bytes: drover_agent::logs::DEFAULT_MAX_LOG_BYTES,
        host_policy: Default::default(),
    });
    let session = Session::new(
        SessionConfig {
            agent_id: agent_id.clone(),
            labels: HashMap::new(),
            capacity: 1,
            hostname: "test-host".into(),
            coordinator_url: relay.url.clone(),
        },
        agent_client,
        ctx,
    );
    let drain = CancellationToken::new();
    let agent = tokio::spawn(session.run(drain.clone()));
    coord
        .wait_for("the hello", |s| s.to_agent.as_ref().map(|_| ()))
        .await;
    coord
        .push(coordinator_message::Msg::Assign(Assignment {
            attempt_id: "att-flaky".into(),
            epoch: 3,
            job: "flaky".into(),
            steps: vec![step(
                "s",
                "echo before\nsleep 2\nyes 0123456789 | head -c 300000\necho after",
            )],
            ..Default::default()
        }))
        .await;
    coord
        .wait_for("the first bytes", |s| {
            s.logs
                .get(&("att-flaky".to_string(), 0))
                .filter(|(l, _)| l.starts_with(b"before\n"))
                .map(|_| ())
        })
        .await;
    relay.cut();
    let result = coord.result("att-flaky").await;
    assert_eq!(result.state, JobState::Succeeded as i32, "{result:?}");
    let mut expected = b"before\n".to_vec();
    expected.extend(b"0123456789\n".iter().copied().cycle().take(300_000));
    expected.extend_from_slice(b"after\n");
    let (log, complete) = coord.log("att-flaky", 0);
    assert!(complete);
    assert_eq!(log.len(), expected.len());
    assert!(
        log == expected,
        "log is byte-identical across the reconnect"
    );
    {
        let s = coord.state.lock().unwrap();
        assert!(s.hellos.len() >= 2, "the agent said hello again");
        match &s.hellos[1].msg {
            Some(agent_message::Msg::Hello(h)) => {
                assert_eq!(h.running.len(), 1, "{h:?}");
                assert_eq!(h.running[0].attempt_id, "att-flaky");
                assert_eq!(h.running[0].epoch, 3);
            }
            other => panic!("expected a hello, got {other:?}"),
        }
    }
    drain.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
    assert!(exec.leftovers(&agent_id).await.unwrap().is_empty());
}

/// The agent heartbeats at the interval of its Welcome, says in its hello that it follows pacing,
/// and re-arms its heartbeat at the interval a HeartbeatAck tells it as the fleet grows.
#[tokio::test]
async fn follows_the_heartbeat_interval_the_coordinator_tells() {
    let coord = FakeCoordinator::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop_server = CancellationToken::new();
    let server = {
        let stop = stop_server.clone();
        let svc = AgentServiceServer::new(coord.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled())
                .await
        })
    };
    let state_dir = tempfile::tempdir().unwrap();
    let agent_id = format!("test-agent-{}", uuid::Uuid::new_v4());
    let exec = DockerExecutor::connect().await.unwrap();
    let agent_client = client::agent_client(client::channel(&url).unwrap(), CREDENTIAL).unwrap();
    let ctx = Arc::new(RunnerContext {
        executor: Arc::new(exec),
        client: agent_client.clone(),
        agent_id: agent_id.clone(),
        state_dir: state_dir.path().to_path_buf(),
        max_log_bytes: drover_agent::logs::DEFAULT_MAX_LOG_BYTES,
        host_policy: Default::default(),
    });
    let session = Session::new(
        SessionConfig {
            agent_id: agent_id.clone(),
            labels: HashMap::new(),
            capacity: 1,
            hostname: "test-host".into(),
            coordinator_url: url,
        },
        agent_client,
        ctx,
    );
    let drain = CancellationToken::new();
    let agent = tokio::spawn(session.run(drain.clone()));
    let beats = |s: &State| {
        s.messages
            .iter()
            .filter(|m| matches!(&m.msg, Some(agent_message::Msg::Heartbeat(_))))
            .count()
    };

    // The Welcome says 200 ms.
    coord
        .wait_for("three heartbeats", |s| (beats(s) >= 3).then_some(()))
        .await;
    match coord.state.lock().unwrap().hello.clone().unwrap().msg {
        Some(agent_message::Msg::Hello(h)) => assert!(h.follows_heartbeat_pacing),
        other => panic!("expected a hello, got {other:?}"),
    }
    // The fleet grew: from now on, every 1.5 s.
    coord
        .push(coordinator_message::Msg::HeartbeatAck(HeartbeatAck {
            unix_ms: 0,
            heartbeat_interval_ms: 1500,
            lease_ttl_ms: 7500,
        }))
        .await;
    // A heartbeat already on its way may still arrive; after that, none for about 1.5 s.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = beats(&coord.state.lock().unwrap());
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        beats(&coord.state.lock().unwrap()),
        before,
        "a heartbeat came sooner than the 1.5 s told"
    );
    coord
        .wait_for("a heartbeat at the new interval", |s| {
            (beats(s) > before).then_some(())
        })
        .await;

    drain.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent)
        .await
        .expect("drained")
        .unwrap()
        .unwrap();
    stop_server.cancel();
    let _ = server.await;
}
