//! The agent's session with the coordinator: one `Attach` stream carrying hello, heartbeats,
//! acceptances, step updates and results; assignments, cancels and drains come back on it.
//!
//! On any stream error the session reconnects with exponential backoff and jitter, says hello
//! again with the attempts it still runs, and resends what may not have arrived (the coordinator
//! fences duplicates by epoch). When the coordinator has been unreachable for longer than the
//! lease TTL it has declared this agent's attempts lost: they are stopped and their results
//! dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::{
    agent_message, coordinator_message, Accepted, AgentMessage, Assignment, CoordinatorMessage,
    Draining, FailureClass, Heartbeat, Hello, JobResult, JobState, RunningAttempt,
};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status, Streaming};

use crate::backoff::Backoff;
use crate::client::AgentClient;
use crate::executor::Executor;
use crate::journal::JournalEntry;
use crate::runner::{resume_attempt, run_attempt, RunnerContext, StopRequest};

/// Heartbeat interval until the coordinator says otherwise.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Lease TTL until the coordinator says otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
/// How long the coordinator may take to answer a hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A send that cannot be queued for this long means the stream is stuck.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last message of a drained agent, how long to wait for the coordinator to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages queued towards one Attach stream.
const OUTBOUND_BUFFER: usize = 64;
/// Step updates and results queued from runners to the session.
const EVENTS_BUFFER: usize = 256;
/// Most sent messages kept for resending after a reconnect.
const REPLAY_LIMIT: usize = 4096;

/// Who this agent is, as told in its hello.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Agent id.
    pub agent_id: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Jobs run at once.
    pub capacity: u32,
    /// Host name shown to operators.
    pub hostname: String,
    /// Coordinator URL (for the "attached" line).
    pub coordinator_url: String,
}

/// The session ended for a reason the agent cannot fix by retrying.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The coordinator refused the credential.
    #[error("the coordinator refused this agent's credential ({0}); if the agent was revoked, delete credential.json and enroll again")]
    Refused(Status),
}

struct AttemptHandle {
    epoch: u64,
    stop: watch::Sender<Option<StopRequest>>,
}

struct Connection {
    tx: mpsc::Sender<AgentMessage>,
    inbound: Streaming<CoordinatorMessage>,
}

enum Ended {
    /// Drained: exit.
    Exit,
    /// The stream broke: reconnect.
    Broken(String),
}

/// The session and the attempts it runs.
pub struct Session<E: Executor> {
    cfg: SessionConfig,
    client: AgentClient,
    ctx: Arc<RunnerContext<E>>,
    attempts: HashMap<String, AttemptHandle>,
    abandoned: HashSet<String>,
    runners: JoinSet<String>,
    events_tx: mpsc::Sender<agent_message::Msg>,
    events_rx: mpsc::Receiver<agent_message::Msg>,
    /// Produced, not yet written to any stream.
    pending: VecDeque<AgentMessage>,
    /// Written to a stream that may have broken before delivering them.
    replay: VecDeque<(Instant, AgentMessage)>,
    slots: Arc<Semaphore>,
    /// Take no new work, exit once idle.
    exiting: bool,
    /// Take no new work (coordinator drain without exit); reset on reconnect.
    paused: bool,
    heartbeat: Duration,
    lease_ttl: Duration,
    last_contact: Instant,
    /// The coordinator of this session acknowledges heartbeats: silence from it then means the
    /// lease is running out (a silent partition), not just a quiet coordinator.
    acks_heartbeats: bool,
    announced: bool,
    /// `--ephemeral`: take one job, then exit once it is done.
    ephemeral: bool,
    /// `--idle-timeout`: exit after this long without running any job.
    idle_timeout: Option<Duration>,
    /// Since when no attempt runs (reset by each assignment).
    idle_since: Instant,
}

impl<E: Executor> std::fmt::Debug for Session<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("agent_id", &self.cfg.agent_id)
            .field("attempts", &self.attempts.len())
            .field("exiting", &self.exiting)
            .finish()
    }
}

fn attempt_of(msg: &AgentMessage) -> Option<&str> {
    match msg.msg.as_ref()? {
        agent_message::Msg::Accepted(a) => Some(&a.attempt_id),
        agent_message::Msg::Step(s) => Some(&s.attempt_id),
        agent_message::Msg::Result(r) => Some(&r.attempt_id),
        agent_message::Msg::Hello(_)
        | agent_message::Msg::Heartbeat(_)
        | agent_message::Msg::Draining(_) => None,
    }
}

fn is_refusal(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied
    )
}

impl<E: Executor> Session<E> {
    /// A session for `cfg`, running attempts with `ctx`.
    pub fn new(cfg: SessionConfig, client: AgentClient, ctx: Arc<RunnerContext<E>>) -> Self {
        let (events_tx, events_rx) = mpsc::channel(EVENTS_BUFFER);
        let slots = Arc::new(Semaphore::new(cfg.capacity.max(1) as usize));
        Self {
            cfg,
            client,
            ctx,
            attempts: HashMap::new(),
            abandoned: HashSet::new(),
            runners: JoinSet::new(),
            events_tx,
            events_rx,
            pending: VecDeque::new(),
            replay: VecDeque::new(),
            slots,
            exiting: false,
            paused: false,
            heartbeat: DEFAULT_HEARTBEAT,
            lease_ttl: DEFAULT_LEASE_TTL,
            last_contact: Instant::now(),
            acks_heartbeats: false,
            announced: false,
            ephemeral: false,
            idle_timeout: None,
            idle_since: Instant::now(),
        }
    }

    /// Scale-to-zero behaviour: with `ephemeral` the session takes one job and ends once it is
    /// finished and reported; with `idle_timeout` it ends after that long without any job. Either
    /// way `run` returns `Ok` (the agent exits 0), as an autoscaler expects of a worker it may retire.
    pub fn with_lifecycle(mut self, ephemeral: bool, idle_timeout: Option<Duration>) -> Self {
        self.ephemeral = ephemeral;
        self.idle_timeout = idle_timeout.filter(|t| !t.is_zero());
        self
    }

    /// When the idle timeout fires, if it is armed (no attempt running, not already exiting).
    fn idle_deadline(&self) -> Option<Instant> {
        let timeout = self.idle_timeout?;
        (!self.exiting && self.attempts.is_empty() && self.runners.is_empty())
            .then(|| self.idle_since + timeout)
    }

    fn on_idle_timeout(&mut self) {
        if let Some(t) = self.idle_timeout {
            tracing::info!(
                idle_secs = t.as_secs_f64(),
                "no job for the idle timeout: exiting"
            );
        }
        self.exiting = true;
        // So the coordinator stops dispatching here before the session closes.
        self.pending.push_back(draining_msg());
    }

    /// Attempts an earlier run of this agent left running (found by [`crate::reaper::recover`]):
    /// they are resumed at once and listed in every hello, so the coordinator re-adopts those whose
    /// lease is still valid; the others come back in `Welcome.stale_attempts` and are stopped.
    pub fn adopting(mut self, entries: Vec<JournalEntry>) -> Self {
        for entry in entries {
            tracing::info!(attempt = %entry.attempt_id, step = entry.step_index, "resuming an attempt of an earlier run");
            let (stop_tx, stop_rx) = watch::channel(None);
            self.attempts.insert(
                entry.attempt_id.clone(),
                AttemptHandle {
                    epoch: entry.epoch,
                    stop: stop_tx,
                },
            );
            let ctx = self.ctx.clone();
            let events = self.events_tx.clone();
            let slots = self.slots.clone();
            let span = tracing::info_span!("attempt", id = %entry.attempt_id);
            let id = entry.attempt_id.clone();
            self.runners.spawn(tracing::Instrument::instrument(
                async move {
                    // Its container already runs: take a slot if there is one, never wait for it.
                    let _slot = slots.try_acquire_owned().ok();
                    let result = resume_attempt(ctx, entry, events.clone(), stop_rx).await;
                    if let Some(result) = result {
                        tracing::info!(state = ?JobState::try_from(result.state).ok(), reason = %result.reason, "resumed attempt finished");
                        let _ = events.send(agent_message::Msg::Result(result)).await;
                    }
                    id
                },
                span,
            ));
        }
        self
    }

    /// Runs until drained: `drain` (a signal) or a coordinator `Drain{exit}` stops new work; the
    /// session returns once running attempts finished and their results were sent.
    pub async fn run(mut self, drain: CancellationToken) -> Result<(), SessionError> {
        let mut backoff = Backoff::default();
        loop {
            if self.should_exit() {
                return Ok(());
            }
            match self.connect().await {
                Ok(conn) => {
                    backoff.reset();
                    match self.serve(conn, &drain).await {
                        Ok(Ended::Exit) => return Ok(()),
                        Ok(Ended::Broken(why)) => {
                            tracing::warn!(reason = %why, "session lost; reconnecting");
                        }
                        Err(e) => return Err(self.give_up(e).await),
                    }
                }
                Err(status) if is_refusal(&status) => {
                    return Err(self.give_up(SessionError::Refused(status)).await);
                }
                Err(status) => {
                    tracing::warn!(%status, "cannot attach to the coordinator");
                }
            }
            if self.wait_disconnected(backoff.next_delay(), &drain).await {
                return Ok(());
            }
        }
    }

    /// Stops everything before a fatal error is returned.
    async fn give_up(&mut self, e: SessionError) -> SessionError {
        self.abandon_all("the agent is shutting down after a fatal session error");
        while self.runners.join_next().await.is_some() {}
        e
    }

    fn should_exit(&self) -> bool {
        self.exiting
            && self.attempts.is_empty()
            && self.runners.is_empty()
            && self.events_rx.is_empty()
            && self.pending.is_empty()
    }

    fn running(&self) -> Vec<RunningAttempt> {
        self.attempts
            .iter()
            .filter(|(id, _)| !self.abandoned.contains(*id))
            .map(|(id, h)| RunningAttempt {
                attempt_id: id.clone(),
                epoch: h.epoch,
            })
            .collect()
    }

    async fn connect(&mut self) -> Result<Connection, Status> {
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let hello = Hello {
            agent_id: self.cfg.agent_id.clone(),
            version: drover_proto::VERSION.to_string(),
            labels: self.cfg.labels.clone(),
            capacity: self.cfg.capacity,
            running: self.running(),
            hostname: self.cfg.hostname.clone(),
            host_policy: Some(self.ctx.host_policy.clone()),
            follows_heartbeat_pacing: true,
        };
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(hello)),
        })
        .await
        .map_err(|_| Status::internal("session channel closed"))?;
        let mut client = self.client.clone();
        let response =
            tokio::time::timeout(WELCOME_TIMEOUT, client.attach(ReceiverStream::new(rx)))
                .await
                .map_err(|_| Status::deadline_exceeded("no answer to the hello"))??;
        let mut inbound = response.into_inner();
        let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no welcome after the hello"))??;
        let welcome = match first.and_then(|m| m.msg) {
            Some(coordinator_message::Msg::Welcome(w)) => w,
            other => {
                return Err(Status::internal(format!(
                    "expected a welcome, got {other:?}"
                )))
            }
        };
        self.last_contact = Instant::now();
        self.acks_heartbeats = false;
        self.paused = false;
        self.adopt_pace(welcome.heartbeat_interval_ms, welcome.lease_ttl_ms);
        if !welcome.agent_id.is_empty() && welcome.agent_id != self.cfg.agent_id {
            tracing::warn!(ours = %self.cfg.agent_id, theirs = %welcome.agent_id, "the coordinator knows this agent by another id");
        }
        for stale in &welcome.stale_attempts {
            self.abandon(stale, "the coordinator did not re-adopt this attempt");
        }
        if self.announced {
            crate::metrics::metrics().reconnected();
            tracing::info!(agent = %self.cfg.agent_id, url = %self.cfg.coordinator_url, "re-attached");
        } else {
            self.announced = true;
            eprintln!(
                "drover-agent {} attached to {}",
                self.cfg.agent_id, self.cfg.coordinator_url
            );
        }
        // What the previous stream may have lost goes first, then what never left.
        let lease = self.lease_ttl;
        let mut resend: VecDeque<AgentMessage> = self
            .replay
            .drain(..)
            .filter(|(at, _)| at.elapsed() <= lease)
            .map(|(_, m)| m)
            .collect();
        resend.append(&mut self.pending);
        self.pending = resend;
        if self.exiting {
            // Still draining after a reconnect: the coordinator must not dispatch here meanwhile.
            self.pending.push_front(draining_msg());
        }
        Ok(Connection { tx, inbound })
    }

    async fn serve(
        &mut self,
        mut conn: Connection,
        drain: &CancellationToken,
    ) -> Result<Ended, SessionError> {
        if let Err(why) = self.flush(&conn).await {
            return Ok(Ended::Broken(why));
        }
        let mut heartbeat = tokio::time::interval(self.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        loop {
            if self.should_exit() {
                self.close(conn).await;
                return Ok(Ended::Exit);
            }
            let idle = self.idle_deadline();
            tokio::select! {
                msg = conn.inbound.message() => match msg {
                    Ok(Some(m)) => {
                        self.last_contact = Instant::now();
                        let every = self.heartbeat;
                        self.on_message(m);
                        if self.heartbeat != every {
                            // The coordinator paced the fleet anew: the next heartbeat is due one
                            // new interval from now (it counts on that to hold us to the new TTL).
                            heartbeat = tokio::time::interval_at(Instant::now() + self.heartbeat, self.heartbeat);
                            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                    }
                    Ok(None) => return Ok(Ended::Broken("the coordinator closed the session".into())),
                    Err(status) if is_refusal(&status) => return Err(SessionError::Refused(status)),
                    Err(status) => return Ok(Ended::Broken(status.to_string())),
                },
                _ = heartbeat.tick() => {
                    if self.acks_heartbeats && self.last_contact.elapsed() > self.lease_ttl {
                        // Our heartbeats have gone unanswered for the whole lease: the coordinator
                        // has declared our attempts lost and may run them elsewhere.
                        self.check_lease();
                        return Ok(Ended::Broken("no answer from the coordinator for longer than the lease TTL".into()));
                    }
                    let beat = AgentMessage {
                        msg: Some(agent_message::Msg::Heartbeat(Heartbeat { running: self.running() })),
                    };
                    self.pending.push_front(beat);
                    let lease = self.lease_ttl;
                    while self.replay.front().is_some_and(|(at, _)| at.elapsed() > lease) {
                        self.replay.pop_front();
                    }
                }
                Some(event) = self.events_rx.recv() => self.enqueue(event),
                Some(joined) = self.runners.join_next(), if !self.runners.is_empty() => self.on_joined(joined),
                () = drain.cancelled(), if !self.exiting => {
                    tracing::info!("draining: finishing running jobs, taking no new ones");
                    self.exiting = true;
                    self.pending.push_front(draining_msg());
                }
                () = sleep_until_some(idle), if idle.is_some() => self.on_idle_timeout(),
            }
            if let Err(why) = self.flush(&conn).await {
                return Ok(Ended::Broken(why));
            }
        }
    }

    /// Writes every pending message to the stream.
    async fn flush(&mut self, conn: &Connection) -> Result<(), String> {
        while let Some(msg) = self.pending.pop_front() {
            let is_beat = matches!(msg.msg, Some(agent_message::Msg::Heartbeat(_)));
            match tokio::time::timeout(SEND_TIMEOUT, conn.tx.send(msg.clone())).await {
                Ok(Ok(())) => {
                    if !is_beat {
                        if self.replay.len() >= REPLAY_LIMIT {
                            self.replay.pop_front();
                        }
                        self.replay.push_back((Instant::now(), msg));
                    }
                }
                Ok(Err(_)) => {
                    if !is_beat {
                        self.pending.push_front(msg);
                    }
                    return Err("the session stream closed".into());
                }
                Err(_) => {
                    if !is_beat {
                        self.pending.push_front(msg);
                    }
                    return Err("the session stream is stuck".into());
                }
            }
        }
        Ok(())
    }

    /// Ends the request stream and gives the coordinator a moment to take the last messages.
    async fn close(&mut self, conn: Connection) {
        let Connection { tx, mut inbound } = conn;
        drop(tx);
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
    }

    /// Between connections: keep collecting results, watch the lease, then retry.
    async fn wait_disconnected(&mut self, delay: Duration, drain: &CancellationToken) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            self.check_lease();
            if self.should_exit() {
                return true;
            }
            let idle = self.idle_deadline();
            tokio::select! {
                () = &mut sleep => return false,
                Some(event) = self.events_rx.recv() => self.enqueue(event),
                Some(joined) = self.runners.join_next(), if !self.runners.is_empty() => self.on_joined(joined),
                () = drain.cancelled(), if !self.exiting => self.exiting = true,
                () = sleep_until_some(idle), if idle.is_some() => self.on_idle_timeout(),
            }
        }
    }

    /// The heartbeat interval and lease TTL the coordinator told (a Welcome, or a HeartbeatAck as the
    /// fleet grows or shrinks); 0 leaves one unchanged.
    fn adopt_pace(&mut self, heartbeat_interval_ms: u64, lease_ttl_ms: u64) {
        if heartbeat_interval_ms > 0 {
            let every = Duration::from_millis(heartbeat_interval_ms.max(50));
            if every != self.heartbeat {
                tracing::debug!(
                    interval_ms = every.as_millis() as u64,
                    lease_ttl_ms,
                    "heartbeat interval set by the coordinator"
                );
            }
            self.heartbeat = every;
        }
        if lease_ttl_ms > 0 {
            self.lease_ttl = Duration::from_millis(lease_ttl_ms);
        }
    }

    fn check_lease(&mut self) {
        if self.last_contact.elapsed() > self.lease_ttl && !self.running().is_empty() {
            tracing::warn!(
                ttl_ms = self.lease_ttl.as_millis() as u64,
                "coordinator unreachable for longer than the lease: stopping all attempts"
            );
            self.abandon_all("the coordinator was unreachable for longer than the lease TTL");
        }
    }

    fn enqueue(&mut self, event: agent_message::Msg) {
        let msg = AgentMessage { msg: Some(event) };
        if attempt_of(&msg).is_some_and(|a| self.abandoned.contains(a)) {
            return;
        }
        self.pending.push_back(msg);
    }

    fn on_joined(&mut self, joined: Result<String, tokio::task::JoinError>) {
        self.idle_since = Instant::now();
        match joined {
            Ok(attempt) => {
                self.attempts.remove(&attempt);
            }
            Err(e) => {
                // A panicking runner is a bug; its attempt is reported lost by the coordinator.
                tracing::error!(error = %e, "an attempt runner failed");
                let finished: Vec<String> = self
                    .attempts
                    .iter()
                    .filter(|(_, h)| h.stop.is_closed())
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in finished {
                    self.attempts.remove(&id);
                }
            }
        }
    }

    fn abandon(&mut self, attempt: &str, reason: &str) {
        if let Some(h) = self.attempts.get(attempt) {
            h.stop.send_replace(Some(StopRequest::Abandon {
                reason: reason.to_string(),
            }));
        }
        self.abandoned.insert(attempt.to_string());
        self.pending
            .retain(|m| attempt_of(m).is_none_or(|a| a != attempt));
        self.replay
            .retain(|(_, m)| attempt_of(m).is_none_or(|a| a != attempt));
    }

    fn abandon_all(&mut self, reason: &str) {
        let ids: Vec<String> = self.attempts.keys().cloned().collect();
        for id in ids {
            self.abandon(&id, reason);
        }
    }

    fn on_message(&mut self, m: CoordinatorMessage) {
        match m.msg {
            Some(coordinator_message::Msg::Assign(a)) => self.on_assign(a),
            Some(coordinator_message::Msg::Cancel(c)) => match self.attempts.get(&c.attempt_id) {
                Some(h) => {
                    tracing::info!(attempt = %c.attempt_id, reason = %c.reason, "canceling");
                    h.stop.send_replace(Some(StopRequest::Cancel {
                        grace: Duration::from_millis(c.grace_ms),
                        reason: if c.reason.is_empty() {
                            "canceled".to_string()
                        } else {
                            c.reason
                        },
                    }));
                }
                None => {
                    tracing::debug!(attempt = %c.attempt_id, "cancel for an attempt not running here")
                }
            },
            Some(coordinator_message::Msg::Drain(d)) => {
                tracing::info!(exit = d.exit, "the coordinator asked to drain");
                self.paused = true;
                self.exiting |= d.exit;
            }
            Some(coordinator_message::Msg::HeartbeatAck(ack)) => {
                self.acks_heartbeats = true;
                self.adopt_pace(ack.heartbeat_interval_ms, ack.lease_ttl_ms);
            }
            Some(coordinator_message::Msg::Welcome(_)) => {
                tracing::debug!("ignoring a second welcome");
            }
            None => {}
        }
    }

    fn on_assign(&mut self, a: Assignment) {
        let accepted = |a: &Assignment| AgentMessage {
            msg: Some(agent_message::Msg::Accepted(Accepted {
                attempt_id: a.attempt_id.clone(),
                epoch: a.epoch,
            })),
        };
        if let Some(h) = self.attempts.get(&a.attempt_id) {
            // Sent again after a reconnect: we already run it.
            if h.epoch == a.epoch {
                self.pending.push_back(accepted(&a));
            }
            return;
        }
        if self.exiting || self.paused {
            tracing::info!(attempt = %a.attempt_id, "refusing an assignment while draining");
            self.pending.push_back(AgentMessage {
                msg: Some(agent_message::Msg::Result(JobResult {
                    attempt_id: a.attempt_id.clone(),
                    epoch: a.epoch,
                    state: JobState::Failed as i32,
                    failure: FailureClass::Infra as i32,
                    reason: format!(
                        "agent {} is draining and takes no new jobs",
                        self.cfg.agent_id
                    ),
                    exit_code: 0,
                })),
            });
            return;
        }
        tracing::info!(attempt = %a.attempt_id, run = %a.run_id, job = %a.job, "assigned");
        self.abandoned.remove(&a.attempt_id);
        self.pending.push_back(accepted(&a));
        let (stop_tx, stop_rx) = watch::channel(None);
        self.attempts.insert(
            a.attempt_id.clone(),
            AttemptHandle {
                epoch: a.epoch,
                stop: stop_tx,
            },
        );
        let ctx = self.ctx.clone();
        let events = self.events_tx.clone();
        let slots = self.slots.clone();
        // A root here, joined to the coordinator's span for this attempt (and so to the run's trace).
        let span = tracing::info_span!(parent: None, "attempt", id = %a.attempt_id, job = %a.job, run = %a.run_id);
        drover_telemetry::set_parent(&span, &a.traceparent);
        let id = a.attempt_id.clone();
        if self.ephemeral {
            // One job per ephemeral agent: later assignments are refused (the coordinator retries
            // them elsewhere) and the session ends once this one is reported.
            tracing::info!(attempt = %a.attempt_id, "ephemeral agent: this is its only job");
            self.exiting = true;
            // After the acceptance (already queued): the coordinator keeps this attempt here but
            // dispatches nothing more, so no second job is pushed and refused.
            self.pending.push_back(draining_msg());
        }
        self.runners.spawn(tracing::Instrument::instrument(
            async move {
                // Held for the whole attempt: at most `capacity` run at once.
                let _slot = slots.acquire_owned().await;
                let _running = crate::metrics::metrics().job_started();
                let result = run_attempt(ctx, a, events.clone(), stop_rx).await;
                if let Some(result) = result {
                    tracing::info!(state = ?JobState::try_from(result.state).ok(), reason = %result.reason, "attempt finished");
                    let _ = events.send(agent_message::Msg::Result(result)).await;
                }
                id
            },
            span,
        ));
    }
}

/// Tells the coordinator this agent drains and exits: no more assignments.
fn draining_msg() -> AgentMessage {
    AgentMessage {
        msg: Some(agent_message::Msg::Draining(Draining { exit: true })),
    }
}

/// Sleeps until `deadline`; never resolves for `None` (the select branch is disabled then anyway).
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
