//! The domain core: runs, jobs, attempts, agents and their leases, on top of the store, logs and blobs.
//!
//! Concurrency: every state change runs under `op` (a tokio mutex, so changes are applied one at a time and
//! may await the store); it stages copies of the records it changes in a [`Tx`], commits them in one store
//! transaction, and only then publishes them to the in-memory `state` (a std mutex, held only for short
//! sections and never across an `.await`), sends messages to agents and notifies watchers. So nothing is
//! visible to anyone before it is durable.

pub mod availability;
pub mod machine;
pub mod model;
pub mod revoke;
pub mod secrets;
pub mod traces;
pub mod why;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use drover_proto::v1 as pb;
use drover_proto::v1::{FailureClass, JobState};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tonic::Status as GrpcStatus;

use crate::artifacts::BlobStore;
use crate::config::Config;
use crate::error::{CoordError, CoordResult};
use crate::http::metrics::Metrics;
use crate::logs::LogStore;
use crate::scheduler::{self, AgentSlots, QueuedJob};
use crate::store::{EnrollRefusal, Store, Write};
use model::{
    AgentRec, ArtifactRec, AttemptRec, JobRec, RunRec, RunStatus, Status, StepRec, TokenRec,
};

/// The sending half of an agent's Attach response stream.
pub type AgentTx = mpsc::Sender<Result<pb::CoordinatorMessage, GrpcStatus>>;

/// Capacity of an agent's outgoing message channel; a full channel means the agent is not reading and its
/// session is dropped (it reconnects and reconciles through its hello).
pub const AGENT_CHANNEL: usize = 64;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// sha256 of a string, lowercase hex.
pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The coordinator's domain core. Clone is cheap.
#[derive(Debug, Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    store: Store,
    logs: LogStore,
    blobs: BlobStore,
    op: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    changes: broadcast::Sender<String>,
    closing: watch::Sender<bool>,
    next_session: AtomicU64,
    metrics: Arc<Metrics>,
    /// Secrets, open in memory for assignments (sealed in the store).
    secrets: crate::secrets::Secrets,
}

#[derive(Debug, Default)]
struct State {
    /// Runs not finished yet (finished ones are read from the store).
    runs: HashMap<String, RunRec>,
    /// Attempts running now.
    attempts: HashMap<String, AttemptRec>,
    /// Every enrolled agent.
    agents: HashMap<String, AgentLive>,
    next_seq: i64,
    /// Operators' pause/drain by agent id (absent: active); persisted.
    availability: HashMap<String, String>,
    /// Agents that announced they drain (SIGTERM), until their next hello.
    self_draining: HashSet<String>,
    /// Jobs canceled on their own (run id, job name): their attempts end canceled, never retried.
    canceled_jobs: HashSet<(String, String)>,
    /// W3C trace context of each active run's root span (tracing on only); persisted.
    run_traces: HashMap<String, String>,
    /// The open `job_attempt` span of each running attempt; dropping it ends the span.
    attempt_spans: HashMap<String, tracing::Span>,
}

#[derive(Debug)]
struct AgentLive {
    rec: AgentRec,
    /// Last time anything arrived from it: the lease clock.
    last_seen: Instant,
    last_seen_ms: i64,
    session: Option<Session>,
    /// Privileged mode and host mounts it allows, from its latest hello (nothing until one arrives).
    host_policy: pb::HostPolicy,
}

#[derive(Debug)]
struct Session {
    id: u64,
    tx: AgentTx,
}

/// Staged changes of one operation: copies of the records it changes, and what to do after the commit.
#[derive(Debug, Default)]
struct Tx {
    runs: BTreeMap<String, RunRec>,
    attempts: BTreeMap<String, AttemptRec>,
    agents: BTreeMap<String, AgentRec>,
    messages: Vec<(String, pb::CoordinatorMessage)>,
    abandon: Vec<(String, u32, String)>,
}

impl Tx {
    fn run_mut(&mut self, st: &State, id: &str) -> CoordResult<&mut RunRec> {
        if !self.runs.contains_key(id) {
            let r = st
                .runs
                .get(id)
                .ok_or_else(|| CoordError::NotFound(format!("run {id} is not active")))?;
            self.runs.insert(id.to_string(), r.clone());
        }
        self.runs
            .get_mut(id)
            .ok_or_else(|| CoordError::Internal("staged run vanished".into()))
    }

    fn attempt(&self, st: &State, id: &str) -> Option<AttemptRec> {
        self.attempts
            .get(id)
            .or_else(|| st.attempts.get(id))
            .cloned()
    }
}

/// A submitted or loaded run's job, as FollowLogs needs it.
#[derive(Debug, Clone)]
pub struct JobView {
    /// Current attempt.
    pub attempt_id: Option<String>,
    /// Job state.
    pub state: Status,
    /// Step names and states of the current attempt.
    pub steps: Vec<(String, Status)>,
}

impl Engine {
    /// Open the stores under `config.data_dir` and load every unfinished run.
    pub async fn open(config: Config) -> CoordResult<Engine> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| {
            CoordError::Internal(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let store = Store::open(&dir.join("drover.sqlite"))?;
        let logs = LogStore::open(dir.join("logs"))?;
        let blobs = BlobStore::open(dir.join("blobs"))?;
        Self::with_stores(config, store, logs, blobs).await
    }

    /// Build an engine over already opened stores and load their state.
    pub async fn with_stores(
        config: Config,
        store: Store,
        logs: LogStore,
        blobs: BlobStore,
    ) -> CoordResult<Engine> {
        let loaded = store.load().await?;
        // A running attempt's lease starts counting now: its agent gets a full TTL to reconnect.
        let now = Instant::now();
        let mut state = State {
            next_seq: loaded.max_seq,
            availability: store.availabilities().await?,
            ..State::default()
        };
        for a in loaded.agents {
            let last_seen_ms = a.last_seen_ms;
            state.agents.insert(
                a.id.clone(),
                AgentLive {
                    rec: a,
                    last_seen: now,
                    last_seen_ms,
                    session: None,
                    host_policy: pb::HostPolicy::default(),
                },
            );
        }
        for r in loaded.runs {
            state.runs.insert(r.id.clone(), r);
        }
        state.run_traces = store
            .run_traces(state.runs.keys().cloned().collect())
            .await?;
        for a in loaded.attempts {
            state.attempts.insert(a.id.clone(), a);
        }
        let (changes, _) = broadcast::channel(1024);
        let (closing, _) = watch::channel(false);
        let secrets = crate::secrets::Secrets::open(store.clone(), &config.data_dir).await?;
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                store,
                logs,
                blobs,
                op: tokio::sync::Mutex::new(()),
                state: Mutex::new(state),
                changes,
                closing,
                next_session: AtomicU64::new(1),
                metrics: Arc::new(Metrics::new()),
                secrets,
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The step log store.
    pub fn logs(&self) -> &LogStore {
        &self.inner.logs
    }

    /// The blob store.
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// The Prometheus metrics, updated by every committed change.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Readiness: the store is open and answers a query.
    pub async fn ready(&self) -> CoordResult<()> {
        self.inner.store.list_runs(1).await?;
        Ok(())
    }

    /// A consistent snapshot of unfinished runs (oldest first) and every agent, for the scheduler's
    /// explanations, metrics and the dashboard.
    pub fn fleet_view(&self) -> why::FleetView {
        let st = self.lock();
        let mut runs: Vec<RunRec> = st.runs.values().cloned().collect();
        runs.sort_by_key(|r| r.seq);
        let mut agents: Vec<why::AgentView> = st
            .agents
            .values()
            .map(|a| {
                let mut running: Vec<why::RunningView> = st
                    .attempts
                    .values()
                    .filter(|at| at.agent_id == a.rec.id)
                    .map(|at| why::RunningView {
                        attempt_id: at.id.clone(),
                        run_id: at.run_id.clone(),
                        job: at.job.clone(),
                    })
                    .collect();
                running.sort_by(|x, y| x.attempt_id.cmp(&y.attempt_id));
                why::AgentView {
                    id: a.rec.id.clone(),
                    hostname: a.rec.hostname.clone(),
                    labels: a.rec.labels.clone(),
                    capacity: a.rec.capacity,
                    connected: a.session.is_some(),
                    revoked: a.rec.revoked,
                    running,
                    last_seen_ms: a.last_seen_ms,
                    policy: a.host_policy.clone(),
                }
            })
            .collect();
        agents.sort_by(|x, y| x.id.cmp(&y.id));
        why::FleetView { runs, agents }
    }

    /// Why job `job` of `run_id` is in its state, and what would let it run.
    pub async fn explain_job(
        &self,
        run_id: &str,
        job: &str,
    ) -> CoordResult<pb::ExplainJobResponse> {
        let run = self.run_rec(run_id).await?;
        let fleet = self.fleet_view();
        // An active run is re-read from the same snapshot so the job and the queue agree.
        let run = fleet
            .runs
            .iter()
            .find(|r| r.id == run_id)
            .cloned()
            .unwrap_or(run);
        why::explain(&run, job, &fleet)
            .ok_or_else(|| CoordError::NotFound(format!("run {run_id} has no job {job:?}")))
    }

    /// Notifications carrying the id of every run that changed (after the change is durable).
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.inner.changes.subscribe()
    }

    /// Becomes true when the coordinator shuts down; long-lived streams end then.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Sections under this lock do not panic on bad input; recover from a bug rather than wedge.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop: close every agent session and tell streams to end.
    pub fn shutdown(&self) {
        let _ = self.inner.closing.send(true);
        let mut st = self.lock();
        for a in st.agents.values_mut() {
            a.session = None;
        }
    }

    // ---------------------------------------------------------------- change machinery

    /// Run `f` against the state, commit what it staged, then publish. Caller holds `op`.
    async fn mutate<R>(
        &self,
        f: impl FnOnce(&mut State, &mut Tx, i64) -> CoordResult<R>,
    ) -> CoordResult<R> {
        let mut tx = Tx::default();
        let r = {
            let mut st = self.lock();
            f(&mut st, &mut tx, now_ms())?
        };
        self.commit(tx).await?;
        Ok(r)
    }

    async fn commit(&self, tx: Tx) -> CoordResult<()> {
        let mut writes = Vec::new();
        writes.extend(tx.agents.values().cloned().map(Write::Agent));
        writes.extend(tx.runs.values().cloned().map(Write::Run));
        writes.extend(tx.attempts.values().cloned().map(Write::Attempt));
        let began = std::time::Instant::now();
        self.inner.store.commit(writes).await?;
        self.inner.metrics.store_commit(began.elapsed());
        let changed: Vec<String> = tx.runs.keys().cloned().collect();
        {
            let mut st = self.lock();
            let now = now_ms();
            for (id, r) in tx.runs {
                self.inner.metrics.run_changed(st.runs.get(&id), &r, now);
                if r.state == RunStatus::Running {
                    st.runs.insert(id, r);
                } else {
                    st.run_traces.remove(&id);
                    st.runs.remove(&id);
                }
            }
            for (id, a) in tx.attempts {
                if a.state == Status::Running {
                    st.attempts.insert(id, a);
                } else {
                    // Ends the attempt's span (it is exported when the last handle drops).
                    if let Some(span) = st.attempt_spans.remove(&id) {
                        span.record("state", a.state.as_str());
                    }
                    st.attempts.remove(&id);
                }
            }
            for (id, a) in tx.agents {
                match st.agents.get_mut(&id) {
                    Some(live) => live.rec = a,
                    None => {
                        let last_seen_ms = a.last_seen_ms;
                        st.agents.insert(
                            id,
                            AgentLive {
                                rec: a,
                                last_seen: Instant::now(),
                                last_seen_ms,
                                session: None,
                                host_policy: pb::HostPolicy::default(),
                            },
                        );
                    }
                }
            }
            let mut dead = Vec::new();
            for (agent, msg) in tx.messages {
                if let Some(s) = st.agents.get(&agent).and_then(|a| a.session.as_ref()) {
                    if let Err(e) = s.tx.try_send(Ok(msg)) {
                        tracing::warn!(agent = %agent, "cannot push to agent ({e}); dropping its session");
                        dead.push(agent);
                    }
                }
            }
            for agent in dead {
                if let Some(a) = st.agents.get_mut(&agent) {
                    a.session = None;
                }
            }
        }
        for (attempt, steps, reason) in tx.abandon {
            if let Err(e) = self.inner.logs.abandon(&attempt, steps, &reason).await {
                tracing::warn!(attempt = %attempt, "cannot mark logs incomplete: {e}");
            }
        }
        for id in changed {
            let _ = self.inner.changes.send(id);
        }
        Ok(())
    }

    /// Place queued jobs on free agents and push their assignments. Caller holds `op`.
    async fn dispatch_locked(&self) {
        let r = self
            .mutate(|st, tx, now| {
                let mut runs: Vec<&RunRec> = st.runs.values().collect();
                runs.sort_by_key(|r| r.seq);
                let mut queued = Vec::new();
                for r in runs {
                    for (i, j) in r.jobs.iter().enumerate() {
                        if j.state == Status::Queued {
                            queued.push(QueuedJob { key: (r.id.clone(), i), selector: j.spec.agents.clone(), needs: j.spec.host_needs() });
                        }
                    }
                }
                if queued.is_empty() {
                    return Ok(());
                }
                let mut running: HashMap<&str, u32> = HashMap::new();
                for a in st.attempts.values() {
                    *running.entry(a.agent_id.as_str()).or_default() += 1;
                }
                let mut agents: Vec<AgentSlots> = st
                    .agents
                    .values()
                    .map(|a| AgentSlots {
                        id: a.rec.id.clone(),
                        labels: a.rec.labels.clone(),
                        free: a.rec.capacity.saturating_sub(running.get(a.rec.id.as_str()).copied().unwrap_or(0)),
                        accepting: a.session.is_some() && !a.rec.revoked && st.accepts_work(&a.rec.id),
                        policy: a.host_policy.clone(),
                    })
                    .collect();
                agents.sort_by(|a, b| a.id.cmp(&b.id));
                for p in scheduler::schedule(&queued, &agents) {
                    let (run_id, idx) = p.job;
                    let attempt_id = uuid::Uuid::new_v4().to_string();
                    let run = tx.run_mut(st, &run_id)?;
                    machine::start_attempt(&mut run.jobs[idx], &attempt_id, &p.agent);
                    let (job_name, epoch) = (run.jobs[idx].name.clone(), run.jobs[idx].epoch);
                    tracing::info!(run = %run_id, job = %job_name, agent = %p.agent, attempt = %attempt_id,
                        epoch, "dispatch");
                    let mut assign = assignment(run, idx);
                    // Only this message carries the values: never the store, the logs or any API.
                    assign.secrets = self.inner.secrets.values(&run.jobs[idx].spec.secrets).into_iter().collect();
                    let run_trace = st.run_traces.get(&run_id).map(String::as_str);
                    traces::schedule_span(run_trace, &run_id, &assign.job, &p.agent).in_scope(|| {
                        tracing::debug!(attempt = %assign.attempt_id, "placed");
                    });
                    let span = traces::attempt_span(run_trace, &run_id, &assign.job, &assign.attempt_id, &p.agent, epoch);
                    assign.traceparent = drover_telemetry::traceparent(&span).unwrap_or_default();
                    st.attempt_spans.insert(assign.attempt_id.clone(), span);
                    tx.attempts.insert(
                        attempt_id.clone(),
                        AttemptRec {
                            id: attempt_id,
                            run_id: run_id.clone(),
                            job: job_name,
                            agent_id: p.agent.clone(),
                            epoch,
                            state: Status::Running,
                            created_ms: now,
                            finished_ms: None,
                        },
                    );
                    tx.messages.push((
                        p.agent,
                        pb::CoordinatorMessage { msg: Some(pb::coordinator_message::Msg::Assign(assign)) },
                    ));
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!("dispatch failed: {e}");
        }
    }

    /// Mark a running attempt lost and requeue or end its job. Stages into `tx`.
    fn lose_attempt(
        &self,
        st: &State,
        tx: &mut Tx,
        attempt_id: &str,
        reason: &str,
        now: i64,
    ) -> CoordResult<()> {
        let Some(mut a) = tx.attempt(st, attempt_id) else {
            return Ok(());
        };
        if a.state != Status::Running {
            return Ok(());
        }
        tracing::warn!(attempt = %attempt_id, agent = %a.agent_id, "attempt lost: {reason}");
        a.state = Status::Lost;
        a.finished_ms = Some(now);
        let max_retries = self.inner.config.max_retries;
        let job_cancel = st.job_canceled(&a.run_id, &a.job);
        let run = tx.run_mut(st, &a.run_id)?;
        let cancel = run.cancel_requested || job_cancel;
        let mut steps = 0;
        if let Some(idx) = run.job_index(&a.job) {
            let job = &mut run.jobs[idx];
            steps = job.spec.steps.len() as u32;
            if job.attempt_id.as_deref() == Some(attempt_id) && job.state == Status::Running {
                let o = machine::decide(
                    JobState::Failed,
                    FailureClass::AgentLost,
                    reason,
                    0,
                    cancel,
                    job.attempts,
                    max_retries,
                )
                .map_err(CoordError::Internal)?;
                machine::apply_outcome(job, o, now);
            }
            machine::settle(run, now);
        }
        tx.abandon
            .push((attempt_id.to_string(), steps, reason.to_string()));
        tx.attempts.insert(a.id.clone(), a);
        Ok(())
    }

    // ---------------------------------------------------------------- agents

    /// Create an enrollment token; returns the token (shown once) and its expiry.
    pub async fn create_token(
        &self,
        uses: u32,
        ttl: Duration,
        labels: BTreeMap<String, String>,
    ) -> CoordResult<(String, i64)> {
        let token = format!("drt_{}", random_hex(24));
        let expires_ms = now_ms().saturating_add(ttl.as_millis() as i64);
        let uses_left = if uses == 0 { 1 } else { uses };
        self.inner
            .store
            .create_token(TokenRec {
                hash: sha256_hex(&token),
                uses_left,
                expires_ms,
                labels,
            })
            .await?;
        Ok((token, expires_ms))
    }

    /// Exchange a token for an agent id and credential `<agent_id>.<secret>`.
    pub async fn enroll(
        &self,
        token: &str,
        labels: BTreeMap<String, String>,
        hostname: &str,
    ) -> CoordResult<(String, String)> {
        if token.is_empty() {
            return Err(CoordError::InvalidArgument(
                "token: empty; expected the token from `drover tokens create`".into(),
            ));
        }
        let agent_id = format!("agent-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let secret = random_hex(32);
        let now = now_ms();
        let rec = AgentRec {
            id: agent_id.clone(),
            hostname: hostname.to_string(),
            labels,
            required_labels: BTreeMap::new(),
            capacity: 1,
            credential_hash: sha256_hex(&secret),
            revoked: false,
            created_ms: now,
            last_seen_ms: now,
        };
        let _op = self.inner.op.lock().await;
        let rec = match self.inner.store.enroll(sha256_hex(token), now, rec).await? {
            Ok(rec) => rec,
            Err(EnrollRefusal::Unknown) => {
                return Err(CoordError::Unauthenticated(
                    "enrollment token is not valid".into(),
                ))
            }
            Err(EnrollRefusal::Expired) => {
                return Err(CoordError::Unauthenticated(
                    "enrollment token has expired".into(),
                ))
            }
            Err(EnrollRefusal::UsedUp) => {
                return Err(CoordError::Unauthenticated(
                    "enrollment token has no uses left".into(),
                ))
            }
            Err(EnrollRefusal::MissingLabels(l)) => {
                return Err(CoordError::PermissionDenied(format!(
                    "the enrollment token requires labels the agent does not have: {}",
                    l.join(", ")
                )))
            }
        };
        tracing::info!(agent = %agent_id, hostname, "agent enrolled");
        self.lock().agents.insert(
            agent_id.clone(),
            AgentLive {
                rec,
                last_seen: Instant::now(),
                last_seen_ms: now,
                session: None,
                host_policy: pb::HostPolicy::default(),
            },
        );
        Ok((agent_id.clone(), format!("{agent_id}.{secret}")))
    }

    /// Check an `authorization` metadata value (`Bearer <agent_id>.<secret>`); returns the agent id.
    pub fn authenticate(&self, authorization: Option<&str>) -> CoordResult<String> {
        let v = authorization
            .ok_or_else(|| CoordError::Unauthenticated("missing authorization metadata".into()))?;
        let cred = v.strip_prefix("Bearer ").ok_or_else(|| {
            CoordError::Unauthenticated("authorization must be `Bearer <credential>`".into())
        })?;
        let (id, secret) = cred
            .trim()
            .split_once('.')
            .ok_or_else(|| CoordError::Unauthenticated("malformed agent credential".into()))?;
        let st = self.lock();
        let a = st
            .agents
            .get(id)
            .ok_or_else(|| CoordError::Unauthenticated(format!("unknown agent {id}")))?;
        if !constant_time_eq(
            sha256_hex(secret).as_bytes(),
            a.rec.credential_hash.as_bytes(),
        ) {
            return Err(CoordError::Unauthenticated(format!(
                "wrong credential for agent {id}"
            )));
        }
        if a.rec.revoked {
            return Err(CoordError::PermissionDenied(format!(
                "agent {id} is revoked"
            )));
        }
        Ok(id.to_string())
    }

    /// Handle a hello: register the session, reconcile the attempts it lists, send Welcome, dispatch.
    /// Returns the session id to pass to [`Engine::detach`].
    pub async fn hello(&self, agent_id: &str, hello: pb::Hello, out: AgentTx) -> CoordResult<u64> {
        let _op = self.inner.op.lock().await;
        let session_id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let cfg = self.inner.config.clone();
        self.mutate(|st, tx, now| {
            if !hello.agent_id.is_empty() && hello.agent_id != agent_id {
                return Err(CoordError::PermissionDenied(format!(
                    "hello names agent {} but the credential is agent {agent_id}",
                    hello.agent_id
                )));
            }
            let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
            Self::clear_self_draining(st, agent_id);
            let live = st
                .agents
                .get_mut(agent_id)
                .ok_or_else(|| CoordError::Unauthenticated(format!("unknown agent {agent_id}")))?;
            let missing: Vec<String> = live
                .rec
                .required_labels
                .iter()
                .filter(|(k, v)| labels.get(*k) != Some(*v))
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            if !missing.is_empty() {
                return Err(CoordError::PermissionDenied(format!(
                    "agent {agent_id} must keep the labels of its enrollment token: missing {}",
                    missing.join(", ")
                )));
            }
            live.session = Some(Session {
                id: session_id,
                tx: out,
            });
            live.last_seen = Instant::now();
            live.last_seen_ms = now;
            live.host_policy = hello.host_policy.clone().unwrap_or_default();
            let mut rec = live.rec.clone();
            rec.labels = labels;
            rec.capacity = hello.capacity.max(1);
            if !hello.hostname.is_empty() {
                rec.hostname = hello.hostname.clone();
            }
            rec.last_seen_ms = now;
            tx.agents.insert(agent_id.to_string(), rec);

            let mut stale = Vec::new();
            let mut kept = Vec::new();
            for ra in &hello.running {
                match st.attempts.get(&ra.attempt_id) {
                    Some(a) if a.agent_id == agent_id && a.epoch == ra.epoch => {
                        kept.push(a.clone())
                    }
                    _ => stale.push(ra.attempt_id.clone()),
                }
            }
            let forgotten: Vec<String> = st
                .attempts
                .values()
                .filter(|a| {
                    a.agent_id == agent_id && !hello.running.iter().any(|r| r.attempt_id == a.id)
                })
                .map(|a| a.id.clone())
                .collect();
            tx.messages.push((
                agent_id.to_string(),
                pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::Welcome(pb::Welcome {
                        agent_id: agent_id.to_string(),
                        heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
                        lease_ttl_ms: cfg.lease_ttl.as_millis() as u64,
                        stale_attempts: stale,
                    })),
                },
            ));
            for id in forgotten {
                self.lose_attempt(
                    st,
                    tx,
                    &id,
                    &format!("agent {agent_id} reconnected without attempt {id}"),
                    now,
                )?;
            }
            for a in kept {
                tracing::info!(agent = %agent_id, attempt = %a.id, "attempt re-adopted");
                if st.runs.get(&a.run_id).is_some_and(|r| r.cancel_requested) {
                    tx.messages.push((
                        agent_id.to_string(),
                        cancel_msg(&a.id, cfg.cancel_grace, "run canceled"),
                    ));
                }
            }
            Ok(())
        })
        .await?;
        tracing::info!(agent = %agent_id, session = session_id, "agent attached");
        self.dispatch_locked().await;
        Ok(session_id)
    }

    /// Note that something arrived from the agent: renews its lease.
    pub fn touch(&self, agent_id: &str) {
        let mut st = self.lock();
        if let Some(a) = st.agents.get_mut(agent_id) {
            a.last_seen = Instant::now();
            a.last_seen_ms = now_ms();
        }
    }

    /// The agent's Attach stream `session` ended. Its lease keeps running: its attempts are lost only when
    /// it stays silent for the lease TTL.
    pub fn detach(&self, agent_id: &str, session: u64) {
        let mut st = self.lock();
        if let Some(a) = st.agents.get_mut(agent_id) {
            if a.session.as_ref().is_some_and(|s| s.id == session) {
                a.session = None;
                tracing::info!(agent = %agent_id, "agent detached");
            }
        }
    }

    /// Lose the attempts of agents silent for longer than the lease TTL; drop their sessions.
    pub async fn check_leases(&self) -> CoordResult<()> {
        let ttl = self.inner.config.lease_ttl;
        let expired = |st: &State| -> Vec<String> {
            let now = Instant::now();
            st.agents
                .values()
                .filter(|a| now.duration_since(a.last_seen) > ttl)
                .filter(|a| {
                    a.session.is_some() || st.attempts.values().any(|at| at.agent_id == a.rec.id)
                })
                .map(|a| a.rec.id.clone())
                .collect()
        };
        if expired(&self.lock()).is_empty() {
            return Ok(());
        }
        let _op = self.inner.op.lock().await;
        self.mutate(|st, tx, now| {
            for agent in expired(st) {
                if let Some(a) = st.agents.get_mut(&agent) {
                    if a.session.take().is_some() {
                        tracing::warn!(agent = %agent, "agent silent past its lease; session dropped");
                    }
                }
                let ids: Vec<String> =
                    st.attempts.values().filter(|a| a.agent_id == agent).map(|a| a.id.clone()).collect();
                for id in ids {
                    let reason = format!("agent {agent} lost: nothing heard for more than {ttl:?}");
                    self.lose_attempt(st, tx, &id, &reason, now)?;
                }
            }
            Ok(())
        })
        .await?;
        self.dispatch_locked().await;
        Ok(())
    }

    /// Run [`Engine::check_leases`] on a timer until shutdown.
    pub fn spawn_lease_timer(&self) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        let period = (self.inner.config.lease_ttl / 4)
            .clamp(Duration::from_millis(20), Duration::from_millis(250));
        let mut closing = self.closing();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = closing.changed() => break,
                }
                if let Err(e) = engine.check_leases().await {
                    tracing::error!("lease check failed: {e}");
                }
            }
        })
    }

    /// Fencing: the attempt must be running, assigned to `agent_id`, at `epoch`, and its job's current one.
    /// Returns its run id, job index and step count.
    fn fence(
        st: &State,
        agent_id: &str,
        attempt_id: &str,
        epoch: u64,
    ) -> CoordResult<(String, usize, u32)> {
        let stale = |why: String| {
            CoordError::FailedPrecondition(format!(
                "stale attempt {attempt_id} (epoch {epoch}): {why}"
            ))
        };
        let a = st
            .attempts
            .get(attempt_id)
            .ok_or_else(|| stale("not a running attempt".into()))?;
        if a.agent_id != agent_id {
            // Attempt ids are never reused, so this is never a late write of a former holder: it is one
            // agent reaching for another's attempt.
            return Err(CoordError::PermissionDenied(format!(
                "attempt {attempt_id} is not assigned to agent {agent_id}"
            )));
        }
        if a.epoch != epoch {
            return Err(stale(format!("the current epoch is {}", a.epoch)));
        }
        let run = st
            .runs
            .get(&a.run_id)
            .ok_or_else(|| stale("its run is finished".into()))?;
        let idx = run
            .job_index(&a.job)
            .ok_or_else(|| stale("unknown job".into()))?;
        let job = &run.jobs[idx];
        if job.attempt_id.as_deref() != Some(attempt_id)
            || job.epoch != epoch
            || job.state != Status::Running
        {
            return Err(stale("not the job's current attempt".into()));
        }
        Ok((run.id.clone(), idx, job.spec.steps.len() as u32))
    }

    /// Check that `agent_id` may write for (attempt, epoch); returns the attempt's step count.
    pub fn check_attempt(&self, agent_id: &str, attempt_id: &str, epoch: u64) -> CoordResult<u32> {
        Self::fence(&self.lock(), agent_id, attempt_id, epoch).map(|(_, _, n)| n)
    }

    /// The agent accepted an assignment.
    pub fn accepted(&self, agent_id: &str, a: &pb::Accepted) -> CoordResult<()> {
        self.check_attempt(agent_id, &a.attempt_id, a.epoch)
            .map(|_| ())
    }

    /// A step started or finished.
    pub async fn step_update(&self, agent_id: &str, u: pb::StepUpdate) -> CoordResult<()> {
        let _op = self.inner.op.lock().await;
        self.mutate(|st, tx, now| {
            let (run_id, idx, steps) = Self::fence(st, agent_id, &u.attempt_id, u.epoch)?;
            if u.step_index >= steps {
                return Err(CoordError::InvalidArgument(format!(
                    "step_index {} out of range: the job has {steps} steps",
                    u.step_index
                )));
            }
            let run = tx.run_mut(st, &run_id)?;
            let job = &mut run.jobs[idx];
            let step = &mut job.steps[u.step_index as usize];
            if !u.finished {
                if step.state == Status::Queued {
                    step.state = Status::Running;
                }
                job.started_ms.get_or_insert(now);
            } else {
                let failure = FailureClass::try_from(u.failure).unwrap_or(FailureClass::Infra);
                step.exit_code = u.exit_code;
                step.state = match failure {
                    FailureClass::None if u.exit_code == 0 => Status::Succeeded,
                    FailureClass::Timeout => Status::TimedOut,
                    FailureClass::Canceled => Status::Canceled,
                    _ => Status::Failed,
                };
                job.started_ms.get_or_insert(now);
            }
            Ok(())
        })
        .await
    }

    /// The attempt is over. A success is accepted only once every step log of the attempt is complete.
    pub async fn job_result(&self, agent_id: &str, r: pb::JobResult) -> CoordResult<()> {
        let state = JobState::try_from(r.state).map_err(|_| {
            CoordError::InvalidArgument(format!("job result: unknown state {}", r.state))
        })?;
        let failure = FailureClass::try_from(r.failure).map_err(|_| {
            CoordError::InvalidArgument(format!("job result: unknown failure class {}", r.failure))
        })?;
        let _op = self.inner.op.lock().await;
        let (_, _, steps) = Self::fence(&self.lock(), agent_id, &r.attempt_id, r.epoch)?;
        if state == JobState::Succeeded {
            for i in 0..steps {
                let s = self.inner.logs.status(&r.attempt_id, i).await?;
                if !s.complete {
                    return Err(CoordError::FailedPrecondition(format!(
                        "attempt {} reported success but the log of step {i} is not complete ({} bytes so far)",
                        r.attempt_id, s.len
                    )));
                }
            }
        }
        let max_retries = self.inner.config.max_retries;
        self.mutate(|st, tx, now| {
            let (run_id, idx, _) = Self::fence(st, agent_id, &r.attempt_id, r.epoch)?;
            let run = tx.run_mut(st, &run_id)?;
            let cancel = run.cancel_requested || st.job_canceled(&run_id, &run.jobs[idx].name);
            let job = &mut run.jobs[idx];
            let outcome =
                machine::decide(state, failure, &r.reason, r.exit_code, cancel, job.attempts, max_retries)
                    .map_err(CoordError::InvalidArgument)?;
            let attempt_state = match &outcome {
                machine::Outcome::End { state, .. } => *state,
                machine::Outcome::Retry { .. } => Status::Failed,
            };
            tracing::info!(run = %run_id, job = %job.name, attempt = %r.attempt_id, ?outcome, "job result");
            let steps = job.spec.steps.len() as u32;
            machine::apply_outcome(job, outcome, now);
            machine::settle(run, now);
            if attempt_state != Status::Succeeded {
                // Followers of a log the agent never finished must end too.
                let reason = format!("attempt ended {} before its log was complete", attempt_state.as_str());
                tx.abandon.push((r.attempt_id.clone(), steps, reason));
            }
            let mut a = tx.attempt(st, &r.attempt_id).ok_or_else(|| CoordError::Internal("attempt vanished".into()))?;
            a.state = attempt_state;
            a.finished_ms = Some(now);
            tx.attempts.insert(a.id.clone(), a);
            Ok(())
        })
        .await?;
        self.dispatch_locked().await;
        Ok(())
    }

    /// Record an uploaded artifact file for the attempt (replacing one at the same path).
    pub async fn record_artifact(
        &self,
        agent_id: &str,
        epoch: u64,
        art: ArtifactRec,
    ) -> CoordResult<()> {
        let _op = self.inner.op.lock().await;
        self.mutate(|st, tx, _now| {
            let (run_id, idx, _) = Self::fence(st, agent_id, &art.attempt_id, epoch)?;
            let run = tx.run_mut(st, &run_id)?;
            let job = &mut run.jobs[idx];
            job.artifacts.retain(|a| a.path != art.path);
            job.artifacts.push(art);
            job.artifacts.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(())
        })
        .await
    }

    /// May `agent_id` download blob `digest` for `attempt_id`? Only the run's context or an input of the job.
    pub fn check_blob_access(
        &self,
        agent_id: &str,
        attempt_id: &str,
        digest: &str,
    ) -> CoordResult<()> {
        let st = self.lock();
        let denied = || {
            CoordError::PermissionDenied(format!(
                "blob {digest} is not an input of attempt {attempt_id} of this agent"
            ))
        };
        let a = st
            .attempts
            .get(attempt_id)
            .filter(|a| a.agent_id == agent_id)
            .ok_or_else(denied)?;
        let run = st.runs.get(&a.run_id).ok_or_else(denied)?;
        if !digest.is_empty() && run.context_digest == digest {
            return Ok(());
        }
        let job = run.job(&a.job).ok_or_else(denied)?;
        let is_input = job
            .spec
            .needs
            .iter()
            .filter_map(|n| run.job(n))
            .any(|n| n.artifacts.iter().any(|f| f.digest == digest));
        if is_input {
            Ok(())
        } else {
            Err(denied())
        }
    }

    // ---------------------------------------------------------------- runs

    /// Validate a pipeline; returns its errors (empty when valid).
    pub fn validate(&self, yaml: &str) -> Vec<crate::pipeline::PipelineError> {
        let secrets = &self.inner.secrets;
        match crate::pipeline::parse_with_secrets(yaml, &|n| secrets.contains(n)) {
            Ok(_) => Vec::new(),
            Err(errs) => errs,
        }
    }

    /// Create a run with all its jobs in one transaction, then dispatch. Returns the run id.
    pub async fn submit(
        &self,
        yaml: &str,
        context_digest: &str,
        name: &str,
    ) -> CoordResult<String> {
        let secrets = &self.inner.secrets;
        let pipeline = crate::pipeline::parse_with_secrets(yaml, &|n| secrets.contains(n))
            .map_err(|errs| {
                let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                CoordError::InvalidArgument(format!("invalid pipeline:\n{}", lines.join("\n")))
            })?;
        if !context_digest.is_empty() && !self.inner.blobs.exists(context_digest).await? {
            return Err(CoordError::InvalidArgument(format!(
                "context_digest {context_digest} was not uploaded; upload it with UploadContext first"
            )));
        }
        let id = uuid::Uuid::new_v4().to_string();
        let name = if name.is_empty() {
            "pipeline".to_string()
        } else {
            name.to_string()
        };
        let root = traces::run_span(&id, &name, pipeline.jobs.len());
        let trace = drover_telemetry::traceparent(&root);
        let _op = self.inner.op.lock().await;
        self.mutate(|st, tx, now| {
            st.next_seq += 1;
            if let Some(tp) = &trace {
                st.run_traces.insert(id.clone(), tp.clone());
            }
            let jobs = pipeline
                .jobs
                .into_iter()
                .enumerate()
                .map(|(i, spec)| JobRec {
                    name: spec.name.clone(),
                    idx: i as u32,
                    state: if spec.needs.is_empty() {
                        Status::Queued
                    } else {
                        Status::Waiting
                    },
                    failure: FailureClass::None as i32,
                    reason: String::new(),
                    exit_code: 0,
                    attempts: 0,
                    attempt_id: None,
                    epoch: 0,
                    agent_id: None,
                    started_ms: None,
                    finished_ms: None,
                    steps: vec![
                        StepRec {
                            state: Status::Queued,
                            exit_code: 0
                        };
                        spec.steps.len()
                    ],
                    artifacts: Vec::new(),
                    spec,
                })
                .collect();
            let mut run = RunRec {
                seq: st.next_seq,
                id: id.clone(),
                name,
                state: RunStatus::Running,
                cancel_requested: false,
                created_ms: now,
                finished_ms: None,
                context_digest: context_digest.to_string(),
                pipeline: yaml.to_string(),
                jobs,
            };
            machine::settle(&mut run, now);
            tx.runs.insert(id.clone(), run);
            Ok(())
        })
        .await?;
        if let Some(tp) = &trace {
            // Best effort: without it, spans after a restart start a new trace; the run is unaffected.
            if let Err(e) = self.inner.store.put_run_trace(&id, tp).await {
                tracing::warn!(run = %id, error = %e, "cannot store the run's trace context");
            }
        }
        root.in_scope(|| tracing::info!(run = %id, "run submitted"));
        drop(root);
        self.dispatch_locked().await;
        Ok(id)
    }

    /// Cancel a run's unfinished jobs: pending ones at once, running ones through their agents.
    /// Returns how many jobs were canceled or asked to stop.
    pub async fn cancel_run(&self, run_id: &str) -> CoordResult<u32> {
        let _op = self.inner.op.lock().await;
        if !self.lock().runs.contains_key(run_id) {
            return match self.inner.store.get_run(run_id).await? {
                Some(_) => Ok(0),
                None => Err(CoordError::NotFound(format!("run {run_id} not found"))),
            };
        }
        let grace = self.inner.config.cancel_grace;
        self.mutate(|st, tx, now| {
            let run = tx.run_mut(st, run_id)?;
            run.cancel_requested = true;
            let mut count = 0;
            let mut stops = Vec::new();
            for j in &run.jobs {
                match j.state {
                    Status::Waiting | Status::Queued => count += 1,
                    Status::Running => {
                        count += 1;
                        if let (Some(att), Some(agent)) = (&j.attempt_id, &j.agent_id) {
                            stops.push((
                                agent.clone(),
                                cancel_msg(att, grace, "run canceled by user"),
                            ));
                        }
                    }
                    _ => {}
                }
            }
            machine::settle(run, now);
            tx.messages.extend(stops);
            Ok(count)
        })
        .await
    }

    /// A run, active or finished.
    pub async fn run_rec(&self, run_id: &str) -> CoordResult<RunRec> {
        if let Some(r) = self.lock().runs.get(run_id).cloned() {
            return Ok(r);
        }
        self.inner
            .store
            .get_run(run_id)
            .await?
            .ok_or_else(|| CoordError::NotFound(format!("run {run_id} not found")))
    }

    /// A run as the API shows it (with log sizes).
    pub async fn get_run(&self, run_id: &str) -> CoordResult<pb::Run> {
        let r = self.run_rec(run_id).await?;
        Ok(self.run_to_proto(&r).await)
    }

    /// The newest runs, newest first.
    pub async fn list_runs(&self, limit: u32) -> CoordResult<Vec<pb::Run>> {
        let limit = if limit == 0 { 50 } else { limit.min(1000) };
        let runs = self.inner.store.list_runs(limit).await?;
        let mut out = Vec::with_capacity(runs.len());
        for r in &runs {
            // The store is authoritative (memory equals what was committed); prefer memory for consistency.
            let r = self
                .lock()
                .runs
                .get(&r.id)
                .cloned()
                .unwrap_or_else(|| r.clone());
            out.push(self.run_to_proto(&r).await);
        }
        Ok(out)
    }

    /// Convert a run to its wire form, reading each started step's log length.
    pub async fn run_to_proto(&self, r: &RunRec) -> pb::Run {
        let mut jobs = Vec::with_capacity(r.jobs.len());
        for j in &r.jobs {
            let mut steps = Vec::with_capacity(j.steps.len());
            for (i, (s, spec)) in j.steps.iter().zip(&j.spec.steps).enumerate() {
                let log_bytes = match (&j.attempt_id, s.state) {
                    (Some(att), st) if st != Status::Queued => self
                        .inner
                        .logs
                        .status(att, i as u32)
                        .await
                        .map(|s| s.len)
                        .unwrap_or(0),
                    _ => 0,
                };
                // Only a step that wrote something can have passed the log cap.
                let truncated = match &j.attempt_id {
                    Some(att) if log_bytes > 0 => self
                        .inner
                        .logs
                        .is_truncated(att, i as u32)
                        .await
                        .unwrap_or(false),
                    _ => false,
                };
                steps.push(pb::Step {
                    name: spec.name.clone(),
                    image: spec.image.clone(),
                    state: s.state.to_proto() as i32,
                    exit_code: s.exit_code,
                    log_bytes,
                    truncated,
                });
            }
            jobs.push(pb::Job {
                name: j.name.clone(),
                state: j.state.to_proto() as i32,
                needs: j.spec.needs.clone(),
                agents: j.spec.agents.clone().into_iter().collect(),
                agent_id: j.agent_id.clone().unwrap_or_default(),
                attempt_id: j.attempt_id.clone().unwrap_or_default(),
                attempts: j.attempts,
                failure: j.failure,
                reason: j.reason.clone(),
                exit_code: j.exit_code,
                steps,
                started_ms: j.started_ms.unwrap_or(0),
                finished_ms: j.finished_ms.unwrap_or(0),
            });
        }
        pb::Run {
            id: r.id.clone(),
            name: r.name.clone(),
            state: r.state.to_proto() as i32,
            created_ms: r.created_ms,
            finished_ms: r.finished_ms.unwrap_or(0),
            jobs,
        }
    }

    /// The job's current attempt and steps, for log following.
    pub async fn job_view(&self, run_id: &str, job: &str) -> CoordResult<JobView> {
        let r = self.run_rec(run_id).await?;
        let j = r
            .job(job)
            .ok_or_else(|| CoordError::NotFound(format!("run {run_id} has no job {job:?}")))?;
        Ok(JobView {
            attempt_id: j.attempt_id.clone(),
            state: j.state,
            steps: j
                .spec
                .steps
                .iter()
                .zip(&j.steps)
                .map(|(s, r)| (s.name.clone(), r.state))
                .collect(),
        })
    }

    /// Artifacts of a run (one job, or all when `job` is empty), as (job, file).
    pub async fn list_artifacts(
        &self,
        run_id: &str,
        job: &str,
    ) -> CoordResult<Vec<(String, ArtifactRec)>> {
        let r = self.run_rec(run_id).await?;
        if !job.is_empty() && r.job(job).is_none() {
            return Err(CoordError::NotFound(format!(
                "run {run_id} has no job {job:?}"
            )));
        }
        Ok(r.jobs
            .iter()
            .filter(|j| job.is_empty() || j.name == job)
            .flat_map(|j| j.artifacts.iter().map(move |a| (j.name.clone(), a.clone())))
            .collect())
    }

    /// One artifact file.
    pub async fn artifact(&self, run_id: &str, job: &str, path: &str) -> CoordResult<ArtifactRec> {
        self.list_artifacts(run_id, job)
            .await?
            .into_iter()
            .map(|(_, a)| a)
            .find(|a| a.path == path)
            .ok_or_else(|| {
                CoordError::NotFound(format!("run {run_id} job {job:?} has no artifact {path:?}"))
            })
    }

    /// Every enrolled agent.
    pub fn list_agents(&self) -> Vec<pb::Agent> {
        let st = self.lock();
        let mut out: Vec<pb::Agent> = st
            .agents
            .values()
            .map(|a| {
                let mut running: Vec<String> = st
                    .attempts
                    .values()
                    .filter(|at| at.agent_id == a.rec.id)
                    .map(|at| at.id.clone())
                    .collect();
                running.sort();
                let state = if a.rec.revoked {
                    "revoked"
                } else if a.session.is_some() {
                    "connected"
                } else {
                    "disconnected"
                };
                pb::Agent {
                    id: a.rec.id.clone(),
                    hostname: a.rec.hostname.clone(),
                    labels: a.rec.labels.clone().into_iter().collect(),
                    capacity: a.rec.capacity,
                    state: state.into(),
                    running,
                    last_seen_ms: a.last_seen_ms,
                    availability: st.availability_of(&a.rec.id).to_string(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

fn cancel_msg(attempt_id: &str, grace: Duration, reason: &str) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage {
        msg: Some(pb::coordinator_message::Msg::Cancel(pb::Cancel {
            attempt_id: attempt_id.to_string(),
            grace_ms: grace.as_millis() as u64,
            reason: reason.to_string(),
        })),
    }
}

/// The Assignment for job `idx` of `run` (its current attempt): steps with merged env, the context, and
/// every artifact of the jobs it needs as inputs.
fn assignment(run: &RunRec, idx: usize) -> pb::Assignment {
    let job = &run.jobs[idx];
    let steps = job
        .spec
        .steps
        .iter()
        .map(|s| {
            let mut env = job.spec.env.clone();
            env.extend(s.env.clone());
            pb::StepSpec {
                name: s.name.clone(),
                image: s.image.clone(),
                commands: s.commands.clone(),
                env: env.into_iter().collect(),
                workdir: s.workdir.clone().unwrap_or_default(),
                timeout_secs: s.timeout_secs.unwrap_or(0),
                pull: match s.pull {
                    crate::pipeline::PullPolicy::IfNotPresent => pb::PullPolicy::IfNotPresent,
                    crate::pipeline::PullPolicy::Always => pb::PullPolicy::Always,
                    crate::pipeline::PullPolicy::Never => pb::PullPolicy::Never,
                } as i32,
                nano_cpus: s.resources.nano_cpus.unwrap_or(0),
                memory_bytes: s.resources.memory_bytes.unwrap_or(0),
                privileged: s.host.privileged,
                host_mounts: s
                    .host
                    .volumes
                    .iter()
                    .map(|v| pb::HostMount {
                        host_path: v.host.clone(),
                        container_path: v.container.clone(),
                        read_only: v.read_only,
                    })
                    .collect(),
            }
        })
        .collect();
    let inputs = job
        .spec
        .needs
        .iter()
        .filter_map(|n| run.job(n))
        .flat_map(|n| n.artifacts.iter())
        .map(|a| pb::InputFile {
            path: a.path.clone(),
            digest: a.digest.clone(),
            size: a.size,
            mode: a.mode,
        })
        .collect();
    pb::Assignment {
        attempt_id: job.attempt_id.clone().unwrap_or_default(),
        epoch: job.epoch,
        run_id: run.id.clone(),
        job: job.name.clone(),
        steps,
        context_digest: run.context_digest.clone(),
        inputs,
        artifacts: job.spec.artifacts.clone(),
        timeout_secs: job.spec.timeout_secs.unwrap_or(0),
        // Filled by dispatch when tracing is on (the attempt's span exists only there).
        traceparent: String::new(),
        // Filled by dispatch from the open secrets.
        secrets: Default::default(),
    }
}
