//! A simulated agent: speaks the real agent protocol (Enroll, Attach with a hello, heartbeats, Accepted,
//! StepUpdates, an empty eof log per step acknowledged on PushLogs, JobResult) but runs no container, so
//! the benchmarks measure the coordinator's path alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use drover_proto::v1 as pb;
use drover_proto::v1::agent_message::Msg;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use drover_proto::v1::coordinator_message::Msg as CoordMsg;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::cluster::connect;

/// How long the coordinator may take to welcome a hello or acknowledge a log.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Depth of the outbound Attach and PushLogs queues.
const OUTBOUND: usize = 32;

/// Adds the agent's credential to every call.
#[derive(Debug, Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = AgentServiceClient<InterceptedService<Channel, Bearer>>;

/// What a simulated agent reports to the benchmark.
#[derive(Debug, Clone, Default)]
pub(crate) struct SimReport {
    /// Receives the arrival time of every assignment, when set (bounded: the benchmark must keep up).
    pub(crate) assignments: Option<mpsc::Sender<Instant>>,
    /// Receives the run id and arrival time of every assignment, when set (bounded, like `assignments`).
    pub(crate) assigned_runs: Option<mpsc::Sender<(String, Instant)>>,
    /// Receives the time each JobResult was sent, when set (bounded, like `assignments`).
    pub(crate) results: Option<mpsc::Sender<Instant>>,
    /// Incremented after each JobResult is sent.
    pub(crate) completed: Arc<AtomicU64>,
    /// Heartbeats sent by all the agents sharing this report.
    pub(crate) heartbeats: Arc<AtomicU64>,
    /// The longest heartbeat interval (ms) any of them was told, by its Welcome or a HeartbeatAck.
    pub(crate) heartbeat_interval_ms: Arc<AtomicU64>,
}

/// A simulated agent attached to a coordinator; its session stops when dropped.
#[derive(Debug)]
pub(crate) struct SimAgent {
    /// The agent id from enrollment.
    pub(crate) id: String,
    session: JoinHandle<Result<()>>,
}

impl SimAgent {
    /// Enrolls with `token` on its own connection to `url`, attaches (capacity 1) and waits for the welcome.
    pub(crate) async fn start(
        url: &str,
        token: &str,
        name: &str,
        report: SimReport,
    ) -> Result<SimAgent> {
        let channel = connect(url).await?;
        let enrolled = AgentServiceClient::new(channel.clone())
            .enroll(pb::EnrollRequest {
                token: token.to_string(),
                labels: labels(),
                hostname: name.to_string(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("Enroll of simulated agent {name}"))?
            .into_inner();
        let bearer: MetadataValue<_> = format!("Bearer {}", enrolled.credential)
            .parse()
            .context("the credential is not valid metadata")?;
        let mut client = AgentServiceClient::with_interceptor(channel, Bearer(bearer));

        let (tx, rx) = mpsc::channel(OUTBOUND);
        tx.send(message(Msg::Hello(pb::Hello {
            agent_id: enrolled.agent_id.clone(),
            version: drover_proto::VERSION.to_string(),
            labels: labels(),
            capacity: 1,
            running: Vec::new(),
            hostname: name.to_string(),
            host_policy: None,
            follows_heartbeat_pacing: true,
        })))
        .await
        .map_err(|_| anyhow!("the Attach request stream closed before the hello"))?;
        let mut inbound = client
            .attach(ReceiverStream::new(rx))
            .await
            .with_context(|| format!("Attach of simulated agent {name}"))?
            .into_inner();
        let welcome = match tokio::time::timeout(REPLY_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::CoordinatorMessage {
                msg: Some(CoordMsg::Welcome(w)),
            }))) => w,
            Ok(Ok(other)) => bail!("simulated agent {name}: expected a welcome, got {other:?}"),
            Ok(Err(e)) => bail!("simulated agent {name}: Attach failed: {e}"),
            Err(_) => bail!("simulated agent {name}: no welcome within {REPLY_TIMEOUT:?}"),
        };
        let heartbeat = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
        report
            .heartbeat_interval_ms
            .fetch_max(millis(heartbeat), Ordering::Relaxed);
        let session = Session {
            client,
            tx,
            logs: None,
            report,
        };
        let session = tokio::spawn(session.run(inbound, heartbeat));
        Ok(SimAgent {
            id: enrolled.agent_id,
            session,
        })
    }

    /// Fails when the session has ended (it only ends on an error), saying why.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if !self.session.is_finished() {
            return Ok(());
        }
        let why = match futures::FutureExt::now_or_never(&mut self.session) {
            Some(Ok(Err(e))) => format!("{e:#}"),
            Some(Ok(Ok(()))) => "it ended".to_string(),
            Some(Err(e)) => format!("its task failed: {e}"),
            None => "it ended".to_string(),
        };
        bail!("simulated agent {} lost its session: {why}", self.id)
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.session.abort();
    }
}

/// Labels every simulated agent has (the benchmarks' pipelines select on them or on nothing).
fn labels() -> HashMap<String, String> {
    HashMap::from([("os".to_string(), "linux".to_string())])
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn message(m: Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(m) }
}

/// The PushLogs stream, opened at the first assignment (idle fleets never open it).
struct LogStream {
    tx: mpsc::Sender<pb::LogChunk>,
    acks: Streaming<pb::LogAck>,
}

struct Session {
    client: Client,
    tx: mpsc::Sender<pb::AgentMessage>,
    logs: Option<LogStream>,
    report: SimReport,
}

impl Session {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::CoordinatorMessage>,
        every: Duration,
    ) -> Result<()> {
        let arm = |every: Duration| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut every = every;
        let mut heartbeat = arm(every);
        loop {
            tokio::select! {
                m = inbound.message() => {
                    let m = m.context("Attach stream failed")?.context("the coordinator ended the Attach stream")?;
                    let at = Instant::now();
                    match m.msg {
                        Some(CoordMsg::Assign(a)) => self.run_assignment(a, at).await?,
                        // Like a real agent: the interval the coordinator paces the fleet to, from
                        // one interval after the acknowledgement that says so.
                        Some(CoordMsg::HeartbeatAck(ack)) if ack.heartbeat_interval_ms > 0
                            && Duration::from_millis(ack.heartbeat_interval_ms) != every =>
                        {
                            every = Duration::from_millis(ack.heartbeat_interval_ms.max(100));
                            heartbeat = arm(every);
                            self.report
                                .heartbeat_interval_ms
                                .fetch_max(millis(every), Ordering::Relaxed);
                        }
                        _ => {}
                    }
                }
                _ = heartbeat.tick() => {
                    // Assignments run to completion inside the select arm, so nothing runs at a heartbeat.
                    self.send(Msg::Heartbeat(pb::Heartbeat { running: Vec::new() })).await?;
                    self.report.heartbeats.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn send(&self, m: Msg) -> Result<()> {
        self.tx
            .send(message(m))
            .await
            .map_err(|_| anyhow!("the Attach request stream closed"))
    }

    async fn run_assignment(&mut self, a: pb::Assignment, arrived: Instant) -> Result<()> {
        if let Some(tx) = &self.report.assignments {
            tx.send(arrived)
                .await
                .map_err(|_| anyhow!("the benchmark stopped listening for assignments"))?;
        }
        if let Some(tx) = &self.report.assigned_runs {
            tx.send((a.run_id.clone(), arrived))
                .await
                .map_err(|_| anyhow!("the benchmark stopped listening for assignments"))?;
        }
        let (attempt_id, epoch) = (a.attempt_id.clone(), a.epoch);
        self.send(Msg::Accepted(pb::Accepted {
            attempt_id: attempt_id.clone(),
            epoch,
        }))
        .await?;
        for step_index in 0..a.steps.len() as u32 {
            self.send(Msg::Step(pb::StepUpdate {
                attempt_id: attempt_id.clone(),
                epoch,
                step_index,
                finished: false,
                ..Default::default()
            }))
            .await?;
            self.empty_log(&attempt_id, epoch, step_index).await?;
            self.send(Msg::Step(pb::StepUpdate {
                attempt_id: attempt_id.clone(),
                epoch,
                step_index,
                finished: true,
                exit_code: 0,
                ..Default::default()
            }))
            .await?;
        }
        self.send(Msg::Result(pb::JobResult {
            attempt_id,
            epoch,
            state: pb::JobState::Succeeded as i32,
            ..Default::default()
        }))
        .await?;
        self.report.completed.fetch_add(1, Ordering::Relaxed);
        if let Some(tx) = &self.report.results {
            tx.send(Instant::now())
                .await
                .map_err(|_| anyhow!("the benchmark stopped listening for results"))?;
        }
        Ok(())
    }

    /// Pushes the eof chunk of an empty step log and waits until the coordinator says it is complete.
    async fn empty_log(&mut self, attempt_id: &str, epoch: u64, step_index: u32) -> Result<()> {
        if self.logs.is_none() {
            let (tx, rx) = mpsc::channel(OUTBOUND);
            let acks = self
                .client
                .push_logs(ReceiverStream::new(rx))
                .await
                .context("PushLogs")?
                .into_inner();
            self.logs = Some(LogStream { tx, acks });
        }
        let logs = self.logs.as_mut().context("log stream")?;
        logs.tx
            .send(pb::LogChunk {
                attempt_id: attempt_id.to_string(),
                epoch,
                step_index,
                offset: 0,
                data: Default::default(),
                eof: true,
                ..Default::default()
            })
            .await
            .map_err(|_| anyhow!("the PushLogs request stream closed"))?;
        let wait = async {
            loop {
                let ack = logs
                    .acks
                    .message()
                    .await
                    .context("PushLogs failed")?
                    .context("the coordinator ended the PushLogs stream")?;
                if ack.attempt_id == attempt_id && ack.step_index == step_index && ack.complete {
                    return Ok::<(), anyhow::Error>(());
                }
            }
        };
        tokio::time::timeout(REPLY_TIMEOUT, wait)
            .await
            .map_err(|_| anyhow!("no complete LogAck within {REPLY_TIMEOUT:?}"))?
    }
}

/// Starts `n` simulated agents, `parallel` enrollments at a time, all sharing `report`.
pub(crate) async fn start_many(
    url: &str,
    token: &str,
    n: usize,
    parallel: usize,
    report: SimReport,
) -> Result<Vec<SimAgent>> {
    use futures::StreamExt;
    let agents: Vec<Result<SimAgent>> = futures::stream::iter(0..n)
        .map(|i| {
            let report = report.clone();
            async move { SimAgent::start(url, token, &format!("sim-{i}"), report).await }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    agents.into_iter().collect()
}
