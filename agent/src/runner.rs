//! One attempt from assignment to result: workspace, seeding, steps, artifacts, logs, cleanup.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::{
    agent_message, ArtifactHeader, ArtifactUploaded, Assignment, FailureClass, JobResult, JobState,
    PullPolicy, StepSpec, StepUpdate,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::artifacts::{self, ArtifactError};
use crate::cache;
use crate::client::{self, AgentClient};
use crate::executor::{ExecError, Executor, OutputSink, Pull, StepEnd, StepRun, Workspace};
use crate::journal::{Journal, JournalEntry};
use crate::logs::{safe_file_name, AttemptSpool, Shipper, StepSpool};
use crate::mask::{Masker, MaskingSink};
use crate::workspace::{self, LocalInput, SeedError};

/// Why the session wants an attempt to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopRequest {
    /// Canceled by the coordinator: SIGTERM, SIGKILL after `grace`; the result is still reported.
    Cancel {
        /// Time between SIGTERM and SIGKILL.
        grace: Duration,
        /// Why.
        reason: String,
    },
    /// The coordinator no longer owns this attempt (lease lost, stale): stop at once and report
    /// nothing.
    Abandon {
        /// Why.
        reason: String,
    },
}

impl StopRequest {
    fn grace(&self) -> Duration {
        match self {
            StopRequest::Cancel { grace, .. } => *grace,
            StopRequest::Abandon { .. } => Duration::ZERO,
        }
    }
}

/// What every runner of this agent shares.
#[derive(Debug)]
pub struct RunnerContext<E> {
    /// Where steps run.
    pub executor: Arc<E>,
    /// The authenticated coordinator client.
    pub client: AgentClient,
    /// This agent's id (labels every resource).
    pub agent_id: String,
    /// The agent's state directory (spools and scratch files live under it).
    pub state_dir: PathBuf,
    /// Per-step log cap in bytes (0: none).
    pub max_log_bytes: u64,
    /// Privileged mode and host mounts steps may have; anything more is refused.
    pub host_policy: drover_proto::v1::HostPolicy,
}

impl<E> RunnerContext<E> {
    /// `<state>/spool`: step logs until the coordinator has them.
    pub fn spool_root(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    /// `<state>/work`: downloaded blobs and fetched archives, per attempt.
    pub fn work_root(&self) -> PathBuf {
        self.state_dir.join("work")
    }
}

/// How the attempt ended, before it becomes a `JobResult`.
#[derive(Debug, Clone)]
struct Outcome {
    state: JobState,
    failure: FailureClass,
    reason: String,
    exit_code: i32,
}

impl Outcome {
    fn succeeded() -> Self {
        Self {
            state: JobState::Succeeded,
            failure: FailureClass::None,
            reason: String::new(),
            exit_code: 0,
        }
    }

    fn failed(failure: FailureClass, reason: impl Into<String>) -> Self {
        Self {
            state: JobState::Failed,
            failure,
            reason: reason.into(),
            exit_code: 0,
        }
    }

    fn timed_out(reason: impl Into<String>) -> Self {
        Self {
            state: JobState::TimedOut,
            failure: FailureClass::Timeout,
            reason: reason.into(),
            exit_code: 0,
        }
    }

    fn canceled(reason: impl Into<String>) -> Self {
        Self {
            state: JobState::Canceled,
            failure: FailureClass::Canceled,
            reason: reason.into(),
            exit_code: 0,
        }
    }
}

fn pull_policy(p: i32) -> Pull {
    match PullPolicy::try_from(p) {
        Ok(PullPolicy::Always) => Pull::Always,
        Ok(PullPolicy::Never) => Pull::Never,
        _ => Pull::IfNotPresent,
    }
}

/// Pieces of artifact content (up to 256 KiB each) queued between the archive scan and the
/// upload that streams them.
const LIVE_QUEUE: usize = 8;

fn exec_failure(e: ExecError) -> Outcome {
    match e {
        ExecError::Image(reason) => Outcome::failed(FailureClass::ImagePull, reason),
        ExecError::Docker(_) => Outcome::failed(FailureClass::Docker, e.to_string()),
        other => Outcome::failed(FailureClass::Infra, other.to_string()),
    }
}

/// Resolves with the stop request once there is one (never if the sender is gone).
async fn stop_requested(mut stop: watch::Receiver<Option<StopRequest>>) -> StopRequest {
    loop {
        if let Some(r) = stop.borrow_and_update().clone() {
            return r;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves once the attempt is abandoned (never if the sender is gone).
async fn abandoned(mut stop: watch::Receiver<Option<StopRequest>>) {
    loop {
        if matches!(
            &*stop.borrow_and_update(),
            Some(StopRequest::Abandon { .. })
        ) {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Why a phase was interrupted.
enum Interrupted {
    Stop(StopRequest),
    Deadline,
}

/// Runs `fut` unless a stop request or the job deadline comes first.
async fn interruptible<T>(
    fut: impl Future<Output = T>,
    stop: &watch::Receiver<Option<StopRequest>>,
    deadline: Option<Instant>,
) -> Result<T, Interrupted> {
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    tokio::select! {
        v = fut => Ok(v),
        r = stop_requested(stop.clone()) => Err(Interrupted::Stop(r)),
        () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => Err(Interrupted::Deadline),
    }
}

/// The step's spool plus the "started" notification to the coordinator.
struct StepSink {
    spool: StepSpool,
    started: Option<(mpsc::Sender<agent_message::Msg>, StepUpdate)>,
    /// Written with the container id once the container runs, so a restarted agent can re-adopt it.
    journal: Option<(Journal, JournalEntry)>,
}

impl OutputSink for StepSink {
    async fn container_started(&mut self, container_id: &str) {
        if let Some((journal, mut entry)) = self.journal.take() {
            entry.container_id = container_id.to_string();
            if let Err(e) = journal.write(&entry).await {
                // Not fatal: the attempt runs on, it just cannot be re-adopted after a crash.
                tracing::warn!(attempt = %entry.attempt_id, error = %e, "journaling the step");
            }
        }
    }

    async fn started(&mut self) {
        if let Some((events, update)) = self.started.take() {
            let _ = events.send(agent_message::Msg::Step(update)).await;
        }
    }

    async fn write(&mut self, data: bytes::Bytes) -> std::io::Result<()> {
        self.spool.write(data).await
    }
}

/// One attempt being run.
struct Attempt<'a, E> {
    ctx: &'a RunnerContext<E>,
    a: &'a Assignment,
    events: mpsc::Sender<agent_message::Msg>,
    stop: watch::Receiver<Option<StopRequest>>,
    scratch: PathBuf,
    job_deadline: Option<Instant>,
    /// Unix milliseconds when the attempt started (journaled for a restarted agent).
    started_ms: i64,
    /// Set when this run of the agent picks up an attempt an earlier run started.
    resume: Option<Resume>,
    // std Mutex: short sections, never held across an await.
    cache: std::sync::Mutex<CacheRun>,
}

/// The job's cache during the attempt (see [`crate::cache`]).
#[derive(Default)]
struct CacheRun {
    /// The rendered keys, once restored: saved after success.
    job: Option<cache::JobCache>,
    /// Cache lines for the top of the first step's log.
    preamble: String,
    /// The last step's log, kept open after it succeeded so the save can be logged in it.
    last_log: Option<MaskingSink<StepSink>>,
}

/// An attempt picked up after an agent restart: its journal entry and the reopened spool of the
/// step whose container still runs.
struct Resume {
    entry: JournalEntry,
    // std Mutex: taken once, never held across an await.
    step: std::sync::Mutex<Option<StepSpool>>,
}

/// Unix milliseconds now.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The instant `ms` (unix milliseconds, in the past) corresponds to, on the monotonic clock.
fn instant_of(ms: i64) -> Instant {
    let ago = Duration::from_millis(u64::try_from(now_ms().saturating_sub(ms)).unwrap_or(0));
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

impl<E: Executor> Attempt<'_, E> {
    fn interrupted(&self, i: Interrupted) -> Outcome {
        match i {
            Interrupted::Stop(StopRequest::Cancel { reason, .. })
            | Interrupted::Stop(StopRequest::Abandon { reason }) => Outcome::canceled(reason),
            Interrupted::Deadline => Outcome::timed_out(format!(
                "job {:?} exceeded its timeout of {}s",
                self.a.job, self.a.timeout_secs
            )),
        }
    }

    async fn step_update(&self, update: StepUpdate) {
        let _ = self.events.send(agent_message::Msg::Step(update)).await;
    }

    /// Downloads the context and inputs, then puts them into the workspace.
    async fn seed(&self, ws: &Workspace, image: &str) -> Result<(), Outcome> {
        let a = self.a;
        let infra = |e: &dyn std::fmt::Display| Outcome::failed(FailureClass::Infra, e.to_string());
        let context = if a.context_digest.is_empty() {
            None
        } else {
            let path = self.scratch.join("context.tar");
            client::download_blob(
                &self.ctx.client,
                &a.attempt_id,
                &a.context_digest,
                None,
                &path,
            )
            .await
            .map_err(|e| infra(&format!("fetching the source context: {e}")))?;
            Some(path)
        };
        let inputs = if a.inputs.is_empty() {
            None
        } else {
            let mut local = Vec::with_capacity(a.inputs.len());
            for (i, input) in a.inputs.iter().enumerate() {
                workspace::check_relative(&input.path).map_err(|e| infra(&e))?;
                let path = self.scratch.join(format!("input-{i}"));
                client::download_blob(
                    &self.ctx.client,
                    &a.attempt_id,
                    &input.digest,
                    Some(input.size),
                    &path,
                )
                .await
                .map_err(|e| infra(&format!("fetching input file {:?}: {e}", input.path)))?;
                local.push(LocalInput {
                    path: input.path.clone(),
                    mode: input.mode,
                    local: path,
                });
            }
            let tar = self.scratch.join("inputs.tar");
            let dest = tar.clone();
            tokio::task::spawn_blocking(move || workspace::pack_inputs(&local, &dest))
                .await
                .map_err(|e| infra(&e))?
                .map_err(|e| infra(&e))?;
            Some(tar)
        };
        workspace::seed(
            self.ctx.executor.as_ref(),
            ws,
            image,
            context.as_deref(),
            inputs.as_deref(),
        )
        .await
        .map_err(|e| match e {
            SeedError::Exec(e) => exec_failure(e),
            other => infra(&other),
        })
    }

    /// Runs step `index`; `Err` carries the outcome that ends the attempt.
    /// What a step's end means for the job: `None` when it succeeded, else the outcome, with the
    /// container's exit code. Shared by a step run from the start and one resumed after a restart.
    fn step_outcome(
        &self,
        step: &StepSpec,
        end: Result<StepEnd, ExecError>,
        step_timeout_first: bool,
    ) -> (Option<Outcome>, i64) {
        let name = &step.name;
        match end {
            Ok(StepEnd::Exited {
                code: 0,
                oom_killed: false,
            }) => (None, 0),
            Ok(StepEnd::Exited {
                code,
                oom_killed: true,
            }) => (
                Some(Outcome::failed(
                    FailureClass::Oom,
                    format!("step {name:?} was killed: out of memory"),
                )),
                code,
            ),
            Ok(StepEnd::Exited { code, .. }) => (
                Some(Outcome::failed(
                    FailureClass::Script,
                    format!("step {name:?} exited with code {code}"),
                )),
                code,
            ),
            Ok(StepEnd::TimedOut { code }) => {
                let reason = if step_timeout_first {
                    format!(
                        "step {name:?} exceeded its timeout of {}s",
                        step.timeout_secs
                    )
                } else {
                    format!(
                        "job {:?} exceeded its timeout of {}s",
                        self.a.job, self.a.timeout_secs
                    )
                };
                (Some(Outcome::timed_out(reason)), code)
            }
            Ok(StepEnd::Stopped { code }) => {
                let reason = match self.stop.borrow().clone() {
                    Some(StopRequest::Cancel { reason, .. } | StopRequest::Abandon { reason }) => {
                        reason
                    }
                    None => "stopped".to_string(),
                };
                (Some(Outcome::canceled(reason)), code)
            }
            Err(e) => (Some(exec_failure(e)), -1),
        }
    }

    async fn run_step(
        &self,
        ws: &Workspace,
        spool: &AttemptSpool,
        index: u32,
        step: &StepSpec,
    ) -> Result<(), Outcome> {
        let a = self.a;
        let step_deadline = (step.timeout_secs > 0)
            .then(|| Instant::now() + Duration::from_secs(step.timeout_secs));
        let deadline = match (step_deadline, self.job_deadline) {
            (Some(s), Some(j)) => Some(s.min(j)),
            (s, j) => s.or(j),
        };
        let step_spool = spool.open_step(index).await.map_err(|e| {
            Outcome::failed(FailureClass::Infra, format!("creating the log spool: {e}"))
        })?;
        let update = StepUpdate {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            step_index: index,
            finished: false,
            ..Default::default()
        };
        let mut entry = JournalEntry::new(a, self.started_ms, &ws.volume);
        entry.step_index = index;
        entry.step_started_ms = now_ms();
        entry.spool_offsets = spool
            .subscribe()
            .borrow()
            .steps
            .iter()
            .map(|(k, v)| (*k, v.len))
            .collect();
        let mut sink = MaskingSink::new(
            StepSink {
                spool: step_spool,
                started: Some((self.events.clone(), update.clone())),
                journal: Some((Journal::new(&self.ctx.state_dir), entry)),
            },
            self.masker(),
        );
        let preamble = std::mem::take(&mut self.cache_run().preamble);
        sink.write(preamble.into()).await.map_err(|e| {
            Outcome::failed(FailureClass::Infra, format!("writing the log spool: {e}"))
        })?;
        // Child of the attempt's span (current here); its context is handed to the step's processes.
        let step_span = tracing::info_span!(
            "step",
            index,
            name = %step.name,
            image = %step.image,
            result = tracing::field::Empty,
        );
        let mut run = StepRun {
            index,
            image: step.image.clone(),
            commands: step.commands.clone(),
            env: step
                .env
                .iter()
                // A secret of the same name wins over a plain variable.
                .filter(|(k, _)| !a.secrets.contains_key(*k))
                .chain(a.secrets.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workdir: step.workdir.clone(),
            nano_cpus: step.nano_cpus,
            memory_bytes: step.memory_bytes,
            privileged: step.privileged,
            binds: step
                .host_mounts
                .iter()
                .map(|m| {
                    let mode = if m.read_only { "ro" } else { "rw" };
                    format!("{}:{}:{mode}", m.host_path, m.container_path)
                })
                .collect(),
        };
        let grace = {
            let stop = self.stop.clone();
            async move { stop_requested(stop).await.grace() }
        };
        if let Some(tp) = drover_telemetry::traceparent(&step_span) {
            // W3C's environment-variable carrier: tools in the step can continue the trace.
            run.env.push(("TRACEPARENT".to_string(), tp));
        }
        let step_began = std::time::Instant::now();
        let end = tracing::Instrument::instrument(
            self.ctx
                .executor
                .run_step(ws, &run, &mut sink, deadline, grace),
            step_span.clone(),
        )
        .await;
        let step_elapsed = step_began.elapsed();
        // The output has ended: write what the masker held back (a possible start of a secret).
        let flushed = sink.finish().await;
        let was_started = sink.inner.started.is_none();
        if let Err(e) = flushed {
            return Err(Outcome::failed(
                FailureClass::Infra,
                format!("writing the log spool: {e}"),
            ));
        }
        let (outcome, exit_code) = self.step_outcome(
            step,
            end,
            step_deadline.is_some() && step_deadline == deadline,
        );
        {
            let mut cache = self.cache_run();
            let last = index as usize + 1 == a.steps.len();
            if last && outcome.is_none() && cache.job.is_some() {
                cache.last_log = Some(sink);
            } else {
                drop(sink);
            }
        }
        let exit_code = i32::try_from(exit_code).unwrap_or(-1);
        let step_result = match outcome.as_ref().map(|o| o.state) {
            None | Some(JobState::Succeeded) => "succeeded",
            Some(JobState::TimedOut) => "timed_out",
            Some(JobState::Canceled) => "canceled",
            Some(_) => "failed",
        };
        crate::metrics::metrics().step_finished(step_result, step_elapsed);
        step_span.record("result", step_result);
        drop(step_span);
        if !was_started {
            // The container never ran: still tell the coordinator the step started so its
            // finished update is not an orphan.
            self.step_update(update.clone()).await;
        }
        let (failure, reason) = outcome
            .as_ref()
            .map(|o| (o.failure, o.reason.clone()))
            .unwrap_or((FailureClass::None, String::new()));
        self.step_update(StepUpdate {
            finished: true,
            exit_code,
            failure: failure as i32,
            reason,
            ..update
        })
        .await;
        match outcome {
            None => Ok(()),
            Some(mut o) => {
                o.exit_code = exit_code;
                Err(o)
            }
        }
    }

    fn cache_run(&self) -> std::sync::MutexGuard<'_, CacheRun> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Restores the job's cache into the freshly seeded workspace (never fails the job).
    async fn restore_cache(&self, ws: &Workspace, image: &str) {
        let seeded: Vec<PathBuf> = ["context.tar", "inputs.tar"]
            .iter()
            .map(|n| self.scratch.join(n))
            .filter(|p| p.exists())
            .collect();
        let (job, lines) = cache::restore(
            self.ctx.executor.as_ref(),
            &self.ctx.client,
            self.a,
            ws,
            image,
            &self.scratch,
            &seeded,
        )
        .await;
        let mut run = self.cache_run();
        run.job = job;
        run.preamble = lines;
    }

    /// Saves the job's cache after success and logs it at the end of the last step's log.
    async fn save_cache(&self, ws: &Workspace, image: &str) -> Result<(), Outcome> {
        let (job, log) = {
            let mut run = self.cache_run();
            (run.job.take(), run.last_log.take())
        };
        let (Some(job), Some(mut log)) = (job, log) else {
            return Ok(());
        };
        let saved = interruptible(
            cache::save(
                self.ctx.executor.as_ref(),
                &self.ctx.client,
                self.a,
                ws,
                image,
                &self.scratch,
                &job,
            ),
            &self.stop,
            self.job_deadline,
        )
        .await;
        let lines = match saved {
            Ok(lines) => lines,
            Err(Interrupted::Deadline) => {
                "[drover] cache: not saved: the job's timeout came first\n".to_string()
            }
            Err(i) => return Err(self.interrupted(i)),
        };
        if let Err(e) = log.write(lines.into()).await {
            tracing::warn!(attempt = %self.a.attempt_id, error = %e, "logging the cache save");
        }
        if let Err(e) = log.finish().await {
            tracing::warn!(attempt = %self.a.attempt_id, error = %e, "logging the cache save");
        }
        Ok(())
    }

    /// A masker for this attempt's secret values.
    fn masker(&self) -> Masker {
        Masker::new(self.a.secrets.values().map(String::as_str))
    }

    /// Finishes the step whose container an earlier run of the agent started: re-sends the step
    /// updates that may have been lost with that run, marks the gap in the log, re-attaches.
    async fn resume_current(&self, resume: &Resume) -> Result<(), Outcome> {
        let a = self.a;
        let entry = &resume.entry;
        let index = entry.step_index;
        let step = a.steps.get(index as usize).ok_or_else(|| {
            Outcome::failed(
                FailureClass::Infra,
                format!("journal names step {index}, the job has {}", a.steps.len()),
            )
        })?;
        let taken = resume.step.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut step_spool = taken.ok_or_else(|| {
            Outcome::failed(FailureClass::Infra, "the resumed step's spool is gone")
        })?;
        let update = StepUpdate {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            step_index: index,
            finished: false,
            ..Default::default()
        };
        // Earlier steps all exited 0 (the attempt went on); updates are idempotent.
        for i in 0..index {
            self.step_update(StepUpdate {
                step_index: i,
                finished: true,
                ..update.clone()
            })
            .await;
        }
        self.step_update(update.clone()).await;
        // Never silently: the reader of the log learns that bytes may be missing here.
        let marker = format!(
            "\n[drover] agent restarted: output the step wrote after byte {} while no agent was attached may be missing\n",
            step_spool.len()
        );
        step_spool.write(marker.into()).await.map_err(|e| {
            Outcome::failed(FailureClass::Infra, format!("writing the log spool: {e}"))
        })?;
        let step_deadline = (step.timeout_secs > 0)
            .then(|| instant_of(entry.step_started_ms) + Duration::from_secs(step.timeout_secs));
        let deadline = match (step_deadline, self.job_deadline) {
            (Some(s), Some(j)) => Some(s.min(j)),
            (s, j) => s.or(j),
        };
        let grace = {
            let stop = self.stop.clone();
            async move { stop_requested(stop).await.grace() }
        };
        let mut step_spool = MaskingSink::new(step_spool, self.masker());
        let end = self
            .ctx
            .executor
            .resume_step(&entry.container_id, &mut step_spool, deadline, grace)
            .await;
        if let Err(e) = step_spool.finish().await {
            tracing::warn!(error = %e, "writing the end of the resumed step's log");
        }
        drop(step_spool);
        let (outcome, exit_code) = self.step_outcome(
            step,
            end,
            step_deadline.is_some() && step_deadline == deadline,
        );
        let exit_code = i32::try_from(exit_code).unwrap_or(-1);
        let (failure, reason) = outcome
            .as_ref()
            .map(|o| (o.failure, o.reason.clone()))
            .unwrap_or((FailureClass::None, String::new()));
        self.step_update(StepUpdate {
            finished: true,
            exit_code,
            failure: failure as i32,
            reason,
            ..update
        })
        .await;
        match outcome {
            None => Ok(()),
            Some(mut o) => {
                o.exit_code = exit_code;
                Err(o)
            }
        }
    }

    /// Collects and uploads the declared artifacts.
    async fn artifacts(&self, ws: &Workspace, image: &str) -> Result<(), Outcome> {
        let a = self.a;
        if a.artifacts.is_empty() {
            return Ok(());
        }
        let exec = self.ctx.executor.as_ref();
        let helper = exec.archive_helper(ws, image).await.map_err(exec_failure)?;
        // Each file is uploaded while the scan reads it from the arriving archive, so the upload
        // overlaps the fetch; whatever that leaves undone is uploaded from the archive after.
        let (live, files) = mpsc::channel(LIVE_QUEUE);
        let (collected, streamed) = tokio::join!(
            artifacts::collect(
                exec,
                &helper,
                &a.artifacts,
                &self.scratch,
                Some(artifacts::LiveSender::new(live)),
            ),
            client::stream_artifacts(&self.ctx.client, &a.attempt_id, a.epoch, files),
        );
        if let Err(e) = exec.remove_helper(helper).await {
            tracing::warn!(attempt = %a.attempt_id, error = %e, "removing the archive helper");
        }
        let files = collected.map_err(|e| match e {
            ArtifactError::NoMatch(_)
            | ArtifactError::Invalid { .. }
            | ArtifactError::Escape { .. } => Outcome::failed(FailureClass::Script, e.to_string()),
            ArtifactError::Exec { ref source, .. } if matches!(source, ExecError::Docker(_)) => {
                Outcome::failed(FailureClass::Docker, e.to_string())
            }
            other => Outcome::failed(FailureClass::Infra, other.to_string()),
        })?;
        let uploaded = self.upload_artifacts(&files, &streamed).await;
        artifacts::remove_sources(&files).await;
        uploaded
    }

    /// Uploads collected artifacts that were not `streamed` already, one after the other.
    async fn upload_artifacts(
        &self,
        files: &[artifacts::CollectedFile],
        streamed: &HashMap<String, ArtifactUploaded>,
    ) -> Result<(), Outcome> {
        let a = self.a;
        let infra = |e: client::ClientError| Outcome::failed(FailureClass::Infra, e.to_string());
        for f in files {
            let mut header = ArtifactHeader {
                attempt_id: a.attempt_id.clone(),
                epoch: a.epoch,
                path: f.path.clone(),
                mode: f.mode,
                size: f.size,
                digest: f.digest.clone(),
                // upload_artifact names the upload itself and resumes it after a broken connection.
                ..ArtifactHeader::default()
            };
            if let Some(upload_id) = &f.streamed_as {
                if streamed.contains_key(upload_id) {
                    continue;
                }
                // The upload that streamed the file while it was scanned did not complete: it goes
                // on from what the coordinator holds, read from the fetched archive, and like its
                // first try sends no digest (the check below is then the only one).
                header.digest = String::new();
                header.offset = client::query_upload(&self.ctx.client, upload_id)
                    .await
                    .map_err(infra)?;
                header.upload_id = upload_id.clone();
            }
            let uploaded = client::upload_artifact(&self.ctx.client, header, &f.source, f.offset)
                .await
                .map_err(infra)?;
            if uploaded.digest != f.digest {
                return Err(Outcome::failed(
                    FailureClass::Infra,
                    format!(
                        "artifact {:?}: the coordinator stored content with sha256 {}, the agent read {}",
                        f.path, uploaded.digest, f.digest
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Everything up to the result; `ws` receives the workspace so the caller can remove it.
    async fn body(&self, spool: &AttemptSpool, ws_out: &mut Option<Workspace>) -> Outcome {
        let a = self.a;
        // Defence in depth: the scheduler places such jobs only on agents allowing them.
        let refused = drover_proto::policy::refusals(
            &self.ctx.host_policy,
            &drover_proto::policy::HostNeeds::of_steps(&a.steps),
        );
        if !refused.is_empty() {
            return Outcome::failed(
                FailureClass::Policy,
                format!(
                    "this agent does not allow what the job's steps ask for: {}",
                    refused.join("; ")
                ),
            );
        }
        let Some(first) = a.steps.first() else {
            return Outcome::succeeded();
        };
        let exec = self.ctx.executor.as_ref();
        let mut first_step = 0;
        if let Some(resume) = &self.resume {
            let ws = Workspace {
                agent_id: self.ctx.agent_id.clone(),
                attempt_id: a.attempt_id.clone(),
                volume: resume.entry.volume.clone(),
            };
            *ws_out = Some(ws.clone());
            if let Err(o) = self.resume_current(resume).await {
                return o;
            }
            first_step = resume.entry.step_index as usize + 1;
            return self
                .steps_and_artifacts(&ws, spool, first, first_step)
                .await;
        }
        // The image check (or pull) and the workspace's creation are independent engine calls: side
        // by side. A workspace created beside a failed pull is still handed to the caller to remove.
        let prepared = interruptible(
            async {
                let (image, ws) = tokio::join!(
                    exec.ensure_image(&first.image, pull_policy(first.pull)),
                    exec.create_workspace(&self.ctx.agent_id, &a.attempt_id),
                );
                let ws = ws.map_err(exec_failure);
                if let Ok(ws) = &ws {
                    *ws_out = Some(ws.clone());
                }
                image.map_err(exec_failure)?;
                ws
            },
            &self.stop,
            self.job_deadline,
        )
        .await;
        let ws = match prepared {
            Ok(Ok(ws)) => ws,
            Ok(Err(o)) => return o,
            Err(i) => return self.interrupted(i),
        };
        match interruptible(self.seed(&ws, &first.image), &self.stop, self.job_deadline).await {
            Ok(Ok(())) => {}
            Ok(Err(o)) => return o,
            Err(i) => return self.interrupted(i),
        }
        if let Err(i) = interruptible(
            self.restore_cache(&ws, &first.image),
            &self.stop,
            self.job_deadline,
        )
        .await
        {
            return self.interrupted(i);
        }
        self.steps_and_artifacts(&ws, spool, first, first_step)
            .await
    }

    /// Runs the steps from `first_step` on, then collects the artifacts.
    async fn steps_and_artifacts(
        &self,
        ws: &Workspace,
        spool: &AttemptSpool,
        first: &StepSpec,
        first_step: usize,
    ) -> Outcome {
        let a = self.a;
        let exec = self.ctx.executor.as_ref();
        let ws = ws.clone();
        for (i, step) in a.steps.iter().enumerate().skip(first_step) {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            if i > 0 {
                let ensured = interruptible(
                    exec.ensure_image(&step.image, pull_policy(step.pull)),
                    &self.stop,
                    self.job_deadline,
                )
                .await;
                match ensured {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return exec_failure(e),
                    Err(i) => return self.interrupted(i),
                }
            }
            if let Some(r) = self.stop.borrow().clone() {
                return self.interrupted(Interrupted::Stop(r));
            }
            if self.job_deadline.is_some_and(|d| Instant::now() >= d) {
                return self.interrupted(Interrupted::Deadline);
            }
            if let Err(o) = self.run_step(&ws, spool, index, step).await {
                return o;
            }
        }
        let last_image = a.steps.last().map_or(&first.image, |s| &s.image);
        let collected = interruptible(
            self.artifacts(&ws, last_image),
            &self.stop,
            self.job_deadline,
        )
        .await;
        let outcome = match collected {
            Ok(Ok(())) => match self.save_cache(&ws, last_image).await {
                Ok(()) => Outcome::succeeded(),
                Err(o) => o,
            },
            Ok(Err(o)) => o,
            Err(i) => self.interrupted(i),
        };
        // The last step's log was kept open for the cache save: it ends here whatever happened.
        drop(self.cache_run().last_log.take());
        outcome
    }
}

/// Runs one attempt to its end and returns its result, or `None` when it was abandoned (the
/// coordinator declared it lost or stale: nothing may be reported). Step updates go to `events`;
/// logs are shipped on their own stream and fully acknowledged before the result is returned.
/// Every container and the workspace are removed in all cases.
pub async fn run_attempt<E: Executor>(
    ctx: Arc<RunnerContext<E>>,
    assignment: Assignment,
    events: mpsc::Sender<agent_message::Msg>,
    stop: watch::Receiver<Option<StopRequest>>,
) -> Option<JobResult> {
    run_or_resume(ctx, assignment, None, events, stop).await
}

/// Picks up an attempt an earlier run of this agent started (after a crash or `kill -9`), from its
/// journal entry: the step whose container still runs is re-attached and finished, the remaining
/// steps run, then artifacts and the result as in [`run_attempt`]. An entry whose assignment cannot
/// be decoded ends the attempt with an infrastructure failure.
pub async fn resume_attempt<E: Executor>(
    ctx: Arc<RunnerContext<E>>,
    entry: JournalEntry,
    events: mpsc::Sender<agent_message::Msg>,
    stop: watch::Receiver<Option<StopRequest>>,
) -> Option<JobResult> {
    match entry.assignment() {
        Ok(a) => run_or_resume(ctx, a, Some(entry), events, stop).await,
        Err(e) => {
            // Cannot run it: stop what is left of it and let the coordinator retry the job.
            let ws = Workspace {
                agent_id: ctx.agent_id.clone(),
                attempt_id: entry.attempt_id.clone(),
                volume: entry.volume.clone(),
            };
            let spool = AttemptSpool::reopen(&ctx.spool_root(), &entry.attempt_id, 0)
                .await
                .ok()
                .map(|(s, _)| s);
            let scratch = ctx.work_root().join(safe_file_name(&entry.attempt_id));
            cleanup(&ctx, Some(&ws), spool.as_ref(), &scratch, &entry.attempt_id).await;
            if matches!(&*stop.borrow(), Some(StopRequest::Abandon { .. })) {
                return None;
            }
            Some(JobResult {
                attempt_id: entry.attempt_id.clone(),
                epoch: entry.epoch,
                state: JobState::Failed as i32,
                failure: FailureClass::Infra as i32,
                reason: format!("the agent restarted and could not resume the attempt: {e}"),
                exit_code: 0,
            })
        }
    }
}

async fn run_or_resume<E: Executor>(
    ctx: Arc<RunnerContext<E>>,
    assignment: Assignment,
    resume: Option<JournalEntry>,
    events: mpsc::Sender<agent_message::Msg>,
    stop: watch::Receiver<Option<StopRequest>>,
) -> Option<JobResult> {
    let a = &assignment;
    let started_ms = resume.as_ref().map_or_else(now_ms, |e| e.started_ms);
    let started = instant_of(started_ms);
    let job_deadline = (a.timeout_secs > 0).then(|| started + Duration::from_secs(a.timeout_secs));
    let scratch = ctx.work_root().join(safe_file_name(&a.attempt_id));
    let mut ws = None;
    let mut spool_opt = None;
    let opened = match &resume {
        None => prepare_dirs(&ctx.spool_root(), &scratch, &a.attempt_id)
            .await
            .map(|s| (s, None)),
        Some(entry) => reopen_dirs(&ctx.spool_root(), &scratch, entry)
            .await
            .map(|(s, step)| (s, Some(step))),
    };
    let outcome = match opened {
        Err(e) => Outcome::failed(FailureClass::Infra, e),
        Ok((spool, resumed_step)) => {
            let attempt = Attempt {
                ctx: &ctx,
                a,
                events,
                stop: stop.clone(),
                scratch: scratch.clone(),
                job_deadline,
                started_ms,
                resume: resume.map(|entry| Resume {
                    entry,
                    step: std::sync::Mutex::new(resumed_step),
                }),
                cache: Default::default(),
            };
            let spool = spool_opt.insert(spool.with_max_log_bytes(ctx.max_log_bytes));
            let shipper =
                tokio::spawn(Shipper::new(ctx.client.clone(), &a.attempt_id, a.epoch, spool).run());
            let outcome = attempt.body(spool, &mut ws).await;
            spool.close();
            let was_abandoned = matches!(&*stop.borrow(), Some(StopRequest::Abandon { .. }));
            if was_abandoned {
                shipper.abort();
            } else {
                // The result goes out only once the coordinator has every log byte.
                let mut shipper = shipper;
                tokio::select! {
                    r = &mut shipper => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(attempt = %a.attempt_id, error = %e, "shipping logs");
                        }
                        Err(e) => {
                            tracing::warn!(attempt = %a.attempt_id, error = %e, "log shipper failed");
                        }
                    },
                    () = abandoned(stop.clone()) => shipper.abort(),
                }
            }
            outcome
        }
    };
    cleanup(
        &ctx,
        ws.as_ref(),
        spool_opt.as_ref(),
        &scratch,
        &a.attempt_id,
    )
    .await;
    if matches!(&*stop.borrow(), Some(StopRequest::Abandon { .. })) {
        tracing::info!(attempt = %a.attempt_id, "attempt abandoned; its result is dropped");
        return None;
    }
    Some(JobResult {
        attempt_id: a.attempt_id.clone(),
        epoch: a.epoch,
        state: outcome.state as i32,
        failure: outcome.failure as i32,
        reason: outcome.reason,
        exit_code: outcome.exit_code,
    })
}

async fn prepare_dirs(
    spool_root: &Path,
    scratch: &Path,
    attempt_id: &str,
) -> Result<AttemptSpool, String> {
    // Two mkdirs (the spool root exists after the first job) on this task: every job waits for them,
    // and a blocking-pool trip each costs more than the syscalls.
    std::fs::create_dir_all(scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    std::fs::create_dir_all(spool_root)
        .map_err(|e| format!("creating {}: {e}", spool_root.display()))?;
    AttemptSpool::create(spool_root, attempt_id)
        .await
        .map_err(|e| format!("creating the log spool: {e}"))
}

async fn reopen_dirs(
    spool_root: &Path,
    scratch: &Path,
    entry: &JournalEntry,
) -> Result<(AttemptSpool, StepSpool), String> {
    tokio::fs::create_dir_all(scratch)
        .await
        .map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    AttemptSpool::reopen(spool_root, &entry.attempt_id, entry.step_index)
        .await
        .map_err(|e| format!("reopening the log spool: {e}"))
}

async fn cleanup<E: Executor>(
    ctx: &RunnerContext<E>,
    ws: Option<&Workspace>,
    spool: Option<&AttemptSpool>,
    scratch: &Path,
    attempt_id: &str,
) {
    // The journal entry goes first: once the workspace is being removed the attempt cannot be
    // resumed, and a crash from here on must lead to reaping, not re-adoption.
    if let Err(e) = Journal::new(&ctx.state_dir).remove(attempt_id).await {
        tracing::warn!(attempt = %attempt_id, error = %e, "removing the attempt journal entry");
    }
    // The rest is independent (the workspace, the spool and the scratch directory are apart): removed
    // side by side, since the job's result waits for all of it.
    let workspace = async {
        if let Some(ws) = ws {
            if let Err(e) = ctx.executor.remove_workspace(ws).await {
                tracing::warn!(attempt = %ws.attempt_id, error = %e, "removing the workspace");
            }
        }
    };
    let spool = async {
        if let Some(spool) = spool {
            if let Err(e) = spool.remove().await {
                tracing::warn!(error = %e, "removing the log spool");
            }
        }
    };
    let scratch = async {
        if let Err(e) = tokio::fs::remove_dir_all(scratch).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "removing the scratch directory");
            }
        }
    };
    tokio::join!(workspace, spool, scratch);
}
