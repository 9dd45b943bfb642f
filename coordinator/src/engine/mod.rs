//! The domain core: runs, jobs, attempts, agents and their leases, on top of the store, logs and blobs.
//!
//! Concurrency: a state change runs under the state lock (a std mutex, held only for short sections and
//! never across an `.await`): it stages copies of the records it changes in a [`Tx`], applies them to the
//! in-memory state at once (so the next change builds on it), and queues the rows that changed for the
//! store's group committer, still under the lock, so the commit order is the order of the changes. Changes
//! made while a transaction is being written share the next one (one fsync). Nothing is acknowledged before
//! it is durable: watchers' notifications are published by the committer after the commit, in order;
//! callers answer after awaiting their batch; reads from memory wait until everything queued when they
//! read is durable ([`Engine::settled`]).
//!
//! Messages to agents (assignments, welcomes, cancels) are the exception: they are pushed at once, in
//! apply order, before their batch is durable, so dispatch does not wait for an fsync. That acknowledges
//! nothing to anyone: an agent may start an attempt whose row is not durable yet (execution is
//! at-least-once), but everything it sends back is fenced against the in-memory attempt and queued behind
//! the assignment's batch, so no result can become durable before its assignment. If the coordinator dies
//! first, the attempt never existed: the agent's next hello lists it, the coordinator names it stale and
//! the agent stops it, and the job (if its run was durable) is placed again with a new attempt and epoch.
//! A failed commit stops all further commits (see
//! [`crate::store::commit`]); a restart reloads the last durable state. `op` (a tokio mutex) now only
//! serializes the few operator changes that await the store directly (availability, secrets).

pub mod availability;
pub mod caches;
pub mod machine;
pub mod model;
pub mod pacing;
pub mod revoke;
mod running;
pub mod secrets;
pub mod traces;
pub mod why;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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
use crate::recent::Recent;
use crate::scheduler::{self, AgentSlots};
pub use crate::store::commit::Commit;
use crate::store::commit::HeldWake;
use crate::store::{EnrollRefusal, Store, Write};
use model::{
    AgentRec, ArtifactRec, AttemptRec, JobRec, RunRec, RunStatus, Status, StepRec, TokenRec,
};

/// The sending half of an agent's Attach response stream.
pub type AgentTx = mpsc::Sender<Result<pb::CoordinatorMessage, GrpcStatus>>;

/// Capacity of an agent's outgoing message channel; a full channel means the agent is not reading and its
/// session is dropped (it reconnects and reconciles through its hello).
pub const AGENT_CHANNEL: usize = 64;

/// Finished runs kept in memory after they end, newest last: a client watching or reading a run that just
/// finished (the common case: WatchRun until the end, then GetRun) is answered without a read of the file,
/// which would queue on a blocking thread behind the group committer's transaction and fsync.
const RECENTLY_FINISHED: usize = 256;

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A new id for a run or an attempt: a UUIDv7, whose text sorts by creation time (milliseconds, then a
/// counter within this process). Rows keyed by it (runs, jobs, steps, attempts, the log index) are then
/// inserted at the right edge of their B-trees, so a group commit dirties a few pages however many jobs
/// it carries, where random (v4) ids scattered every insert and update over the whole file.
pub fn new_record_id() -> String {
    uuid::Uuid::now_v7().to_string()
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
    /// The heartbeat interval and lease TTL told to agents, stretched with the fleet.
    pacing: pacing::Pacing,
    metrics: Arc<Metrics>,
    /// Secrets, open in memory for assignments (sealed in the store).
    secrets: crate::secrets::Secrets,
    /// Models of recently submitted pipeline texts.
    parsed: crate::pipeline::ParseMemo,
}

/// [`State::finished`]: the runs that finished last, the oldest forgotten first.
#[derive(Debug)]
struct Finished(Recent<String, RunRec>);

impl Default for Finished {
    fn default() -> Self {
        Finished(Recent::new(RECENTLY_FINISHED))
    }
}

#[derive(Debug, Default)]
struct State {
    /// Runs not finished yet (finished ones are read from the store).
    runs: HashMap<String, RunRec>,
    /// The last [`RECENTLY_FINISHED`] runs that finished. A finished run never changes again, so once its
    /// batch is durable this copy is the file's.
    finished: Finished,
    /// Every queued job of `runs`, oldest first: (run seq, job index) -> run id. The scheduler reads this
    /// rather than scanning every run.
    queued: BTreeMap<(i64, u32), String>,
    /// Attempts running now.
    attempts: running::Running,
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

impl State {
    /// Add the queued jobs of `r` to the queue index.
    fn index_queued(&mut self, r: &RunRec) {
        if r.state != RunStatus::Running {
            return;
        }
        for (i, j) in r.jobs.iter().enumerate() {
            if j.state == Status::Queued {
                self.queued.insert((r.seq, i as u32), r.id.clone());
            }
        }
    }
}

#[derive(Debug)]
struct AgentLive {
    rec: AgentRec,
    /// Last time anything arrived from it: the lease clock.
    seen: Arc<LastSeen>,
    session: Option<Session>,
    /// Privileged mode and host mounts it allows, from its latest hello (nothing until one arrives).
    host_policy: pb::HostPolicy,
}

impl AgentLive {
    fn new(rec: AgentRec) -> AgentLive {
        AgentLive {
            rec,
            seen: Arc::new(LastSeen::now()),
            session: None,
            host_policy: pb::HostPolicy::default(),
        }
    }
}

/// Milliseconds on the monotonic clock since the first call in this process: the lease clock of every
/// agent counts from the same origin, so the lease timer reads the clock once per scan, not once per agent.
fn mono_now_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// When anything last arrived from an agent. Its session renews it on every message without taking the
/// engine's lock (a heartbeat costs two atomic stores), and the lease timer reads it.
#[derive(Debug)]
pub struct LastSeen {
    /// [`mono_now_ms`] at the last message (the lease clock).
    mono_ms: AtomicU64,
    /// Unix milliseconds, for operators.
    unix_ms: AtomicI64,
    /// The longest lease TTL, in milliseconds, the agent may still hold from what it was told (its
    /// Welcome, or a HeartbeatAck it follows): it is never declared lost sooner, whatever the pace now.
    told_ttl_ms: AtomicU64,
}

impl LastSeen {
    fn now() -> LastSeen {
        LastSeen {
            mono_ms: AtomicU64::new(mono_now_ms()),
            unix_ms: AtomicI64::new(now_ms()),
            told_ttl_ms: AtomicU64::new(0),
        }
    }

    /// The agent was told (and follows) the lease TTL `ttl`.
    pub fn told_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.told_ttl_ms.store(ms, Ordering::Relaxed);
    }

    /// The lease TTL the agent is held to: `ttl` (the one in force), or longer if it was told longer.
    fn ttl_held(&self, ttl: Duration) -> Duration {
        ttl.max(Duration::from_millis(
            self.told_ttl_ms.load(Ordering::Relaxed),
        ))
    }

    /// Something arrived from the agent now.
    pub fn touch(&self) {
        self.mono_ms.store(mono_now_ms(), Ordering::Relaxed);
        self.unix_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// How long the agent has been silent at `now` (a [`mono_now_ms`] reading).
    fn silent_at(&self, now: u64) -> Duration {
        Duration::from_millis(now.saturating_sub(self.mono_ms.load(Ordering::Relaxed)))
    }

    /// Unix ms of the last message.
    fn unix_ms(&self) -> i64 {
        self.unix_ms.load(Ordering::Relaxed)
    }
}

/// An attached session: its id (for [`Engine::detach`]) and the agent's lease clock to renew.
#[derive(Debug)]
pub struct Attached {
    /// Session id.
    pub session: u64,
    /// Renew on every message from the agent.
    pub seen: Arc<LastSeen>,
    /// The heartbeat interval and lease TTL its Welcome told it.
    pub told: pacing::Pace,
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
    abandon: Vec<Abandoned>,
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

/// The reason written into the logs of an attempt that ended (in `state`) before they were complete.
fn ended_before_log_complete(state: Status) -> String {
    format!(
        "attempt ended {} before its log was complete",
        state.as_str()
    )
}

/// An attempt that ended before its logs were complete: which of its steps had started, and why.
#[derive(Debug)]
struct Abandoned {
    attempt: String,
    started: Vec<bool>,
    reason: String,
}

/// A change's rows in the committer's queue (none if it changed nothing), with the committer's
/// wake-up when it was held back ([`crate::store::Store::enqueue_held`]).
type Queued = Option<(Commit, Option<HeldWake>)>;

/// What applied changes publish once durable: their rows, logs to mark abandoned, and the runs whose
/// watchers to wake. (Messages to agents go out at apply time: see the module comment.)
#[derive(Debug, Default)]
struct Effects {
    writes: Vec<Write>,
    abandon: Vec<Abandoned>,
    changed: Vec<String>,
    /// Messages were pushed to agents (before the rows are durable, see docs/dispatch.md).
    pushed: bool,
}

impl Effects {
    /// Nothing to commit or publish (pushed messages are already gone).
    fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.abandon.is_empty() && self.changed.is_empty()
    }
}

fn lock_state(inner: &Inner) -> MutexGuard<'_, State> {
    // Sections under this lock do not panic on bad input; recover from a bug rather than wedge.
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Push `msg` to the agent's current session now, under the state lock (so messages leave in apply order).
/// A full channel drops that session: the agent reconnects and reconciles through its hello, as if the
/// message had been lost with the old stream.
fn push_to_agent(st: &mut State, agent: &str, msg: pb::CoordinatorMessage) {
    let Some(live) = st.agents.get_mut(agent) else {
        return;
    };
    if let Some(s) = &live.session {
        if let Err(e) = s.tx.try_send(Ok(msg)) {
            tracing::warn!(agent = %agent, "cannot push to agent ({e}); dropping its session");
            live.session = None;
        }
    }
}

/// Runs on the committer thread once a batch is durable, in commit order: wake watchers, and mark the
/// logs of ended attempts abandoned (then wake watchers again, so log followers see it).
fn publish(
    inner: &Arc<Inner>,
    rt: &tokio::runtime::Handle,
    abandon: Vec<Abandoned>,
    changed: Vec<String>,
) {
    for id in &changed {
        let _ = inner.changes.send(id.clone());
    }
    if !abandon.is_empty() {
        let inner = inner.clone();
        rt.spawn(async move {
            for Abandoned {
                attempt,
                started,
                reason,
            } in abandon
            {
                if let Err(e) = inner.logs.abandon(&attempt, &started, &reason).await {
                    tracing::warn!(attempt = %attempt, "cannot mark logs incomplete: {e}");
                }
            }
            for id in changed {
                let _ = inner.changes.send(id);
            }
        });
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
        let blobs = BlobStore::open_with(dir.join("blobs"), config.s3.as_ref()).await?;
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
        let mut state = State {
            next_seq: loaded.max_seq,
            availability: store.availabilities().await?,
            ..State::default()
        };
        for a in loaded.agents {
            let live = AgentLive::new(a);
            live.seen
                .unix_ms
                .store(live.rec.last_seen_ms, Ordering::Relaxed);
            state.agents.insert(live.rec.id.clone(), live);
        }
        for r in loaded.runs {
            state.index_queued(&r);
            state.runs.insert(r.id.clone(), r);
        }
        state.run_traces = store
            .run_traces(state.runs.keys().cloned().collect())
            .await?;
        for a in loaded.attempts {
            state.attempts.insert(a);
        }
        let (changes, _) = broadcast::channel(1024);
        let (closing, _) = watch::channel(false);
        let secrets = crate::secrets::Secrets::open(store.clone(), &config.data_dir).await?;
        let metrics = Arc::new(Metrics::new());
        let observed = metrics.clone();
        store.observe_commits(Arc::new(move |took| observed.store_commit(took)));
        let pacing = pacing::Pacing::new(
            config.heartbeat_interval,
            config.lease_ttl,
            config.max_heartbeat_rate,
        );
        Ok(Engine {
            inner: Arc::new(Inner {
                pacing,
                config,
                store,
                logs,
                blobs,
                op: tokio::sync::Mutex::new(()),
                state: Mutex::new(state),
                changes,
                closing,
                next_session: AtomicU64::new(1),
                metrics,
                secrets,
                parsed: Default::default(),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The heartbeat interval and lease TTL told to agents now.
    pub fn pace(&self) -> pacing::Pace {
        self.inner.pacing.current()
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
        if let Some(why) = self.inner.store.poisoned() {
            return Err(CoordError::Unavailable(format!(
                "the store stopped committing: {why}; restart the coordinator"
            )));
        }
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
                    last_seen_ms: a.seen.unix_ms(),
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
        self.settled().await?;
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
        lock_state(&self.inner)
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

    /// Run `f` against the state and apply what it staged at once (so the next change builds on it), queue
    /// the changed rows for the group committer, and return once they are durable. Messages to agents and
    /// change notifications go out from the committer, in order, only after that.
    async fn mutate<R>(
        &self,
        f: impl FnOnce(&mut State, &mut Tx, i64) -> CoordResult<R>,
    ) -> CoordResult<R> {
        self.change(false, f).await
    }

    /// [`Engine::mutate`], then place queued jobs on free agents in the same batch.
    async fn mutate_and_dispatch<R>(
        &self,
        f: impl FnOnce(&mut State, &mut Tx, i64) -> CoordResult<R>,
    ) -> CoordResult<R> {
        self.change(true, f).await
    }

    /// Place queued jobs on free agents and push their assignments (once durable).
    async fn dispatch(&self) {
        if let Err(e) = self.change(true, |_, _, _| Ok(())).await {
            tracing::error!("dispatch failed: {e}");
        }
    }

    async fn change<R>(
        &self,
        dispatch: bool,
        f: impl FnOnce(&mut State, &mut Tx, i64) -> CoordResult<R>,
    ) -> CoordResult<R> {
        let (r, queued) = self.apply_change(dispatch, f, true)?;
        if let Some((commit, held)) = queued {
            if let Some(held) = held {
                // This change pushed messages to agents (an assignment, usually): their stream tasks
                // were woken on this worker and run as soon as this task yields. Waking the idle
                // committer first (a futex wake of a thread on the other CPU) would only delay them,
                // and the commit waits for a disk sync anyway; `held` wakes it when dropped.
                tokio::task::yield_now().await;
                drop(held);
            }
            commit.durable().await?;
        }
        Ok(r)
    }

    /// Apply a change and queue its rows without waiting for them: for changes nobody is answered about,
    /// whose effects the committer publishes once durable anyway. The caller awaits the commit when it
    /// needs to (and to bound how many it has in flight).
    fn change_queued<R>(
        &self,
        dispatch: bool,
        f: impl FnOnce(&mut State, &mut Tx, i64) -> CoordResult<R>,
    ) -> CoordResult<(R, Option<Commit>)> {
        let (r, queued) = self.apply_change(dispatch, f, false)?;
        Ok((r, queued.map(|(commit, _)| commit)))
    }

    /// Apply a change under the state lock and queue its rows. With `hold_wake`, when the change pushed
    /// messages to agents and the committer is quiet, its wake-up is handed back instead of done here.
    fn apply_change<R>(
        &self,
        dispatch: bool,
        f: impl FnOnce(&mut State, &mut Tx, i64) -> CoordResult<R>,
        hold_wake: bool,
    ) -> CoordResult<(R, Queued)> {
        let mut st = self.lock();
        let now = now_ms();
        let mut tx = Tx::default();
        let r = f(&mut st, &mut tx, now)?;
        let mut fx = Effects::default();
        self.apply(&mut st, tx, now, &mut fx);
        if dispatch {
            let mut tx = Tx::default();
            match self.schedule(&mut st, &mut tx, now) {
                Ok(()) => self.apply(&mut st, tx, now, &mut fx),
                Err(e) => tracing::error!("dispatch failed: {e}"),
            }
        }
        // Queued under the state lock: the commit order is the order changes were applied.
        Ok((r, self.enqueue(fx, hold_wake)))
    }

    /// Move what `tx` staged into the state; collect the rows that changed and what to publish.
    fn apply(&self, st: &mut State, tx: Tx, now: i64, fx: &mut Effects) {
        for (id, a) in tx.agents {
            fx.writes.push(Write::Agent(a.clone()));
            // Attached, enrolled or its capacity changed: it may have room.
            st.attempts.reopen(&id);
            match st.agents.get_mut(&id) {
                Some(live) => live.rec = a,
                None => {
                    st.agents.insert(id, AgentLive::new(a));
                }
            }
        }
        for (id, r) in tx.runs {
            match st.runs.get(&id) {
                Some(old) => crate::store::run_changes(old, &r, &mut fx.writes),
                None => fx.writes.push(Write::Run(r.clone())),
            }
            self.inner.metrics.run_changed(st.runs.get(&id), &r, now);
            if !fx.changed.contains(&id) {
                fx.changed.push(id.clone());
            }
            if let Some(old) = st.runs.get(&id) {
                for (i, j) in old.jobs.iter().enumerate() {
                    if j.state == Status::Queued {
                        st.queued.remove(&(old.seq, i as u32));
                    }
                }
            }
            st.index_queued(&r);
            if r.state == RunStatus::Running {
                st.runs.insert(id, r);
            } else {
                st.run_traces.remove(&id);
                st.runs.remove(&id);
                st.finished.0.insert(id, r);
            }
        }
        for (id, a) in tx.attempts {
            fx.writes.push(Write::Attempt(a.clone()));
            if a.state == Status::Running {
                st.attempts.insert(a);
            } else {
                // Ends the attempt's span (it is exported when the last handle drops).
                if let Some(span) = st.attempt_spans.remove(&id) {
                    span.record("state", a.state.as_str());
                }
                st.attempts.remove(&id);
                self.inner.logs.attempt_ended(&id);
            }
        }
        for (agent, msg) in tx.messages {
            push_to_agent(st, &agent, msg);
            fx.pushed = true;
        }
        fx.abandon.extend(tx.abandon);
    }

    /// Queue the effects' rows; the rest is published by the committer once they are durable. With
    /// `hold_wake`, an idle committer's wake-up is returned if the effects pushed messages to agents.
    fn enqueue(&self, fx: Effects, hold_wake: bool) -> Queued {
        if fx.is_empty() {
            return None;
        }
        let Effects {
            writes,
            abandon,
            changed,
            pushed,
        } = fx;
        let inner = self.inner.clone();
        let rt = tokio::runtime::Handle::current();
        let after: crate::store::commit::After =
            Box::new(move || publish(&inner, &rt, abandon, changed));
        if hold_wake && pushed {
            Some(self.inner.store.enqueue_held(writes, Some(after)))
        } else {
            Some((self.inner.store.enqueue(writes, Some(after)), None))
        }
    }

    /// Wait until every change applied so far is durable (before answering from memory).
    pub async fn settled(&self) -> CoordResult<()> {
        let seq = self.inner.store.enqueued();
        self.inner.store.wait_durable(seq).await?;
        Ok(())
    }

    /// Place queued jobs on free agents: start their attempts and stage their assignments.
    fn schedule(&self, st: &mut State, tx: &mut Tx, now: i64) -> CoordResult<()> {
        // Nothing queued (the common case of a hello or result in an idle fleet): no agent scan either.
        if st.queued.is_empty() {
            return Ok(());
        }
        // Only agents that can take a job now: with none, there is nothing to do (and no queue to scan).
        // Only those that may have room are looked at (`Running::open`, by id): under load that is the
        // one agent that just freed a slot, not the whole fleet. Those found without room leave the set.
        let mut closed = Vec::new();
        let mut agents: Vec<AgentSlots> = Vec::new();
        for id in st.attempts.open() {
            let slots = st.agents.get(id).and_then(|a| {
                let usable = a.session.is_some() && !a.rec.revoked && st.accepts_work(&a.rec.id);
                let free = a
                    .rec
                    .capacity
                    .saturating_sub(st.attempts.on_agent(&a.rec.id));
                (usable && free > 0).then(|| AgentSlots {
                    id: Cow::Borrowed(&a.rec.id),
                    labels: Cow::Borrowed(&a.rec.labels),
                    free,
                    accepting: true,
                    policy: Cow::Borrowed(&a.host_policy),
                })
            });
            match slots {
                Some(s) => agents.push(s),
                None => closed.push(id.clone()),
            }
        }
        if agents.is_empty() {
            st.attempts.close(&closed);
            return Ok(());
        }
        let runs = &st.runs;
        let queued = st.queued.iter().filter_map(|((_, idx), run_id)| {
            let job = runs.get(run_id)?.jobs.get(*idx as usize)?;
            Some((
                (run_id.clone(), *idx as usize),
                &job.spec.agents,
                job.spec.host_needs(),
            ))
        });
        let placements = scheduler::schedule_by(queued, &agents);
        st.attempts.close(&closed);
        for p in placements {
            let (run_id, idx) = p.job;
            let attempt_id = new_record_id();
            let run = tx.run_mut(st, &run_id)?;
            machine::start_attempt(&mut run.jobs[idx], &attempt_id, &p.agent);
            self.inner
                .logs
                .attempt_started(&attempt_id, run.jobs[idx].steps.len() as u32);
            let (job_name, epoch) = (run.jobs[idx].name.clone(), run.jobs[idx].epoch);
            // Debug, like the result below: at thousands of jobs a second, info lines per job cost more than
            // the scheduling (the run's submit and end stay at info; the API and traces show each job).
            tracing::debug!(run = %run_id, job = %job_name, agent = %p.agent, attempt = %attempt_id,
                epoch, "dispatch");
            let mut assign = assignment(run, idx);
            // Only this message carries the values: never the store, the logs or any API.
            assign.secrets = self
                .inner
                .secrets
                .values(&run.jobs[idx].spec.secrets)
                .into_iter()
                .collect();
            let run_trace = st.run_traces.get(&run_id).map(String::as_str);
            traces::schedule_span(run_trace, &run_id, &assign.job, &p.agent).in_scope(|| {
                tracing::debug!(attempt = %assign.attempt_id, "placed");
            });
            let span = traces::attempt_span(
                run_trace,
                &run_id,
                &assign.job,
                &assign.attempt_id,
                &p.agent,
                epoch,
            );
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
                pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::Assign(assign)),
                },
            ));
        }
        Ok(())
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
        let mut started = Vec::new();
        if let Some(idx) = run.job_index(&a.job) {
            let job = &mut run.jobs[idx];
            started = job.steps_started(attempt_id);
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
        tx.abandon.push(Abandoned {
            attempt: attempt_id.to_string(),
            started,
            reason: reason.to_string(),
        });
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
        self.lock()
            .agents
            .insert(agent_id.clone(), AgentLive::new(rec));
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
    pub async fn hello(
        &self,
        agent_id: &str,
        hello: pb::Hello,
        out: AgentTx,
    ) -> CoordResult<Attached> {
        let session_id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let cfg = self.inner.config.clone();
        let pace = self.inner.pacing.current();
        let seen = self
            .mutate_and_dispatch(|st, tx, now| {
                if !hello.agent_id.is_empty() && hello.agent_id != agent_id {
                    return Err(CoordError::PermissionDenied(format!(
                        "hello names agent {} but the credential is agent {agent_id}",
                        hello.agent_id
                    )));
                }
                let labels: BTreeMap<String, String> = hello.labels.clone().into_iter().collect();
                Self::clear_self_draining(st, agent_id);
                let live = st.agents.get_mut(agent_id).ok_or_else(|| {
                    CoordError::Unauthenticated(format!("unknown agent {agent_id}"))
                })?;
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
                live.seen.touch();
                live.seen.told_ttl(pace.lease_ttl);
                live.host_policy = hello.host_policy.clone().unwrap_or_default();
                let seen = live.seen.clone();
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
                        a.agent_id == agent_id
                            && !hello.running.iter().any(|r| r.attempt_id == a.id)
                    })
                    .map(|a| a.id.clone())
                    .collect();
                tx.messages.push((
                    agent_id.to_string(),
                    pb::CoordinatorMessage {
                        msg: Some(pb::coordinator_message::Msg::Welcome(pb::Welcome {
                            agent_id: agent_id.to_string(),
                            heartbeat_interval_ms: pace.interval.as_millis() as u64,
                            lease_ttl_ms: pace.lease_ttl.as_millis() as u64,
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
                Ok(seen)
            })
            .await?;
        tracing::info!(agent = %agent_id, session = session_id, "agent attached");
        Ok(Attached {
            session: session_id,
            seen,
            told: pace,
        })
    }

    /// Note that something arrived from the agent: renews its lease.
    pub fn touch(&self, agent_id: &str) {
        if let Some(a) = self.lock().agents.get(agent_id) {
            a.seen.touch();
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

    /// Lose the attempts of agents silent for longer than their lease TTL; drop their sessions. The same
    /// scan counts the attached agents and paces the heartbeats to the fleet's size.
    pub async fn check_leases(&self) -> CoordResult<()> {
        // Called a few times a second over every agent (ten thousand in a big fleet): one clock reading
        // per scan, and nothing allocated unless an agent is silent (the common case: none is).
        let scan = |st: &State, ttl: Duration| -> (Vec<(String, Duration)>, usize) {
            let now = mono_now_ms();
            let mut out = Vec::new();
            let mut attached = 0;
            for a in st.agents.values() {
                attached += usize::from(a.session.is_some());
                let held = a.seen.ttl_held(ttl);
                if a.seen.silent_at(now) > held
                    && (a.session.is_some() || st.attempts.on_agent(&a.rec.id) > 0)
                {
                    out.push((a.rec.id.clone(), held));
                }
            }
            (out, attached)
        };
        let ttl = self.inner.pacing.current().lease_ttl;
        let (expired, attached) = scan(&self.lock(), ttl);
        self.inner.pacing.update(attached);
        if expired.is_empty() {
            return Ok(());
        }
        self.mutate_and_dispatch(|st, tx, now| {
            for (agent, ttl) in scan(st, ttl).0 {
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
        Ok(())
    }

    /// Run [`Engine::check_leases`] on a timer until shutdown: every 40th of the lease TTL in force
    /// (250 ms at the default 10 s), between 20 ms and 1 s. A lease thus ends at most 2.5 % late,
    /// and a big fleet, whose TTL the pacing stretches, is scanned less often.
    pub fn spawn_lease_timer(&self) -> tokio::task::JoinHandle<()> {
        let engine = self.clone();
        let mut closing = self.closing();
        tokio::spawn(async move {
            loop {
                let period = (engine.pace().lease_ttl / 40)
                    .clamp(Duration::from_millis(20), Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
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
        if let Some(c) = self.step_update_queued(agent_id, u)? {
            c.durable().await?;
        }
        Ok(())
    }

    /// [`Engine::step_update`] without waiting for durability (nothing answers a step update).
    pub fn step_update_queued(
        &self,
        agent_id: &str,
        u: pb::StepUpdate,
    ) -> CoordResult<Option<Commit>> {
        let (_, commit) = self.change_queued(false, |st, tx, now| {
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
        })?;
        Ok(commit)
    }

    /// The attempt is over. A success is accepted only once every step log of the attempt is complete.
    pub async fn job_result(&self, agent_id: &str, r: pb::JobResult) -> CoordResult<()> {
        if let Some(c) = self.job_result_queued(agent_id, r).await? {
            c.durable().await?;
        }
        Ok(())
    }

    /// [`Engine::job_result`] without waiting for durability (nothing answers a result; the next jobs'
    /// assignments go out once it is durable).
    pub async fn job_result_queued(
        &self,
        agent_id: &str,
        r: pb::JobResult,
    ) -> CoordResult<Option<Commit>> {
        let state = JobState::try_from(r.state).map_err(|_| {
            CoordError::InvalidArgument(format!("job result: unknown state {}", r.state))
        })?;
        let failure = FailureClass::try_from(r.failure).map_err(|_| {
            CoordError::InvalidArgument(format!("job result: unknown failure class {}", r.failure))
        })?;
        let (_, _, steps) = Self::fence(&self.lock(), agent_id, &r.attempt_id, r.epoch)?;
        if state == JobState::Succeeded {
            for i in 0..steps {
                // Usually just made durable: answered from memory, without reopening the log.
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
        let (_, commit) = self.change_queued(true, |st, tx, now| {
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
            tracing::debug!(run = %run_id, job = %job.name, attempt = %r.attempt_id, ?outcome, "job result");
            let started = job.steps_started(&r.attempt_id);
            machine::apply_outcome(job, outcome, now);
            machine::settle(run, now);
            if attempt_state != Status::Succeeded {
                // Followers of a log the agent never finished must end too.
                let reason = ended_before_log_complete(attempt_state);
                tx.abandon.push(Abandoned {
                    attempt: r.attempt_id.clone(),
                    started,
                    reason,
                });
            }
            let mut a = tx.attempt(st, &r.attempt_id).ok_or_else(|| CoordError::Internal("attempt vanished".into()))?;
            a.state = attempt_state;
            a.finished_ms = Some(now);
            tx.attempts.insert(a.id.clone(), a);
            Ok(())
        })?;
        Ok(commit)
    }

    /// Record an uploaded artifact file for the attempt (replacing one at the same path).
    pub async fn record_artifact(
        &self,
        agent_id: &str,
        epoch: u64,
        art: ArtifactRec,
    ) -> CoordResult<()> {
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

    /// A running attempt of `agent_id` and its run, or None (another agent's, finished, unknown).
    fn running_attempt_of<'s>(
        st: &'s State,
        agent_id: &str,
        attempt_id: &str,
    ) -> Option<(&'s AttemptRec, &'s RunRec)> {
        let a = st
            .attempts
            .get(attempt_id)
            .filter(|a| a.agent_id == agent_id)?;
        Some((a, st.runs.get(&a.run_id)?))
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
        let (a, run) = Self::running_attempt_of(&st, agent_id, attempt_id).ok_or_else(denied)?;
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
        let pipeline = self
            .inner
            .parsed
            .parse_with_secrets(yaml, &|n| secrets.contains(n))
            .map_err(|errs| {
                let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                CoordError::InvalidArgument(format!("invalid pipeline:\n{}", lines.join("\n")))
            })?;
        if !context_digest.is_empty() && !self.inner.blobs.exists(context_digest).await? {
            return Err(CoordError::InvalidArgument(format!(
                "context_digest {context_digest} was not uploaded; upload it with UploadContext first"
            )));
        }
        let id = new_record_id();
        let name = if name.is_empty() {
            "pipeline".to_string()
        } else {
            name.to_string()
        };
        let root = traces::run_span(&id, &name, pipeline.jobs.len());
        let trace = drover_telemetry::traceparent(&root);
        // The run and the assignments of its first jobs share one batch: one commit before the push.
        self.mutate_and_dispatch(|st, tx, now| {
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
                    spec: Arc::new(spec),
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
                pipeline: yaml.into(),
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
        Ok(id)
    }

    /// Cancel a run's unfinished jobs: pending ones at once, running ones through their agents.
    /// Returns how many jobs were canceled or asked to stop.
    pub async fn cancel_run(&self, run_id: &str) -> CoordResult<u32> {
        if !self.lock().runs.contains_key(run_id) {
            // A run that just finished may not be in the file yet.
            self.settled().await?;
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
        // Memory may be ahead of the file by the batches being committed: answer only once what was read
        // is durable (and read the file only after that).
        let (mem, seq) = {
            let st = self.lock();
            let mem = st.runs.get(run_id).or_else(|| st.finished.0.get(run_id));
            (mem.cloned(), self.inner.store.enqueued())
        };
        self.inner.store.wait_durable(seq).await?;
        if let Some(r) = mem {
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
        Ok(self.list_runs_page(limit, "").await?.0)
    }

    /// One page of runs, newest first, after the run `page_token` (empty: the newest); with the token of
    /// the next page (empty when this page is the last).
    pub async fn list_runs_page(
        &self,
        limit: u32,
        page_token: &str,
    ) -> CoordResult<(Vec<pb::Run>, String)> {
        let limit = if limit == 0 { 50 } else { limit.min(1000) };
        self.settled().await?;
        let after = (!page_token.is_empty()).then(|| page_token.to_string());
        let runs = self
            .inner
            .store
            .list_runs_page(limit, after)
            .await?
            .ok_or_else(|| {
                CoordError::InvalidArgument(format!(
                    "page_token {page_token:?} is not a run id; pass the next_page_token of the previous page"
                ))
            })?;
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
        self.settled().await?;
        let next = match runs.last() {
            Some(last) if runs.len() == limit as usize => last.id.clone(),
            _ => String::new(),
        };
        Ok((out, next))
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

    /// Completes the logs of `attempt` of a job that has ended, if any is still incomplete. The
    /// commit that ends an attempt is followed by the completion of its logs (`publish`); a
    /// coordinator stopped between the two leaves logs that nothing would ever complete, and a
    /// follower of one would wait for good. Called by followers that find such a log; a no-op for
    /// an attempt still running, and idempotent.
    pub async fn complete_ended_attempt_logs(
        &self,
        run_id: &str,
        job: &str,
        attempt: &str,
    ) -> CoordResult<()> {
        let r = self.run_rec(run_id).await?;
        let j = r
            .job(job)
            .ok_or_else(|| CoordError::NotFound(format!("run {run_id} has no job {job:?}")))?;
        if j.attempt_id.as_deref() == Some(attempt) && !j.state.is_terminal() {
            return Ok(());
        }
        let reason = ended_before_log_complete(j.state);
        self.inner
            .logs
            .abandon(attempt, &j.steps_started(attempt), &reason)
            .await?;
        Ok(())
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
                    last_seen_ms: a.seen.unix_ms(),
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
        cache: job.spec.cache.as_ref().map(|c| pb::CacheSpec {
            key: c.key.clone(),
            restore_keys: c.restore_keys.clone(),
            paths: c.paths.clone(),
        }),
    }
}
