//! One attempt from assignment to result: workspace, seeding, steps, artifacts, logs, cleanup.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_proto::v1::{
    agent_message, ArtifactHeader, Assignment, FailureClass, JobResult, JobState, PullPolicy,
    StepSpec, StepUpdate,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::artifacts::{self, ArtifactError};
use crate::client::{self, AgentClient};
use crate::executor::{ExecError, Executor, OutputSink, Pull, StepEnd, StepRun, Workspace};
use crate::logs::{safe_file_name, AttemptSpool, Shipper, StepSpool};
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
}

impl OutputSink for StepSink {
    async fn started(&mut self) {
        if let Some((events, update)) = self.started.take() {
            let _ = events.send(agent_message::Msg::Step(update)).await;
        }
    }

    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
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
    async fn run_step(
        &self,
        ws: &Workspace,
        spool: &AttemptSpool,
        index: u32,
        step: &StepSpec,
    ) -> Result<(), Outcome> {
        let a = self.a;
        let name = &step.name;
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
        let mut sink = StepSink {
            spool: step_spool,
            started: Some((self.events.clone(), update.clone())),
        };
        let run = StepRun {
            index,
            image: step.image.clone(),
            commands: step.commands.clone(),
            env: step
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            workdir: step.workdir.clone(),
        };
        let grace = {
            let stop = self.stop.clone();
            async move { stop_requested(stop).await.grace() }
        };
        let end = self
            .ctx
            .executor
            .run_step(ws, &run, &mut sink, deadline, grace)
            .await;
        let was_started = sink.started.is_none();
        drop(sink);
        let (outcome, exit_code) = match end {
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
                let reason = if step_deadline == deadline && step_deadline.is_some() {
                    format!(
                        "step {name:?} exceeded its timeout of {}s",
                        step.timeout_secs
                    )
                } else {
                    format!(
                        "job {:?} exceeded its timeout of {}s",
                        a.job, a.timeout_secs
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
        };
        let exit_code = i32::try_from(exit_code).unwrap_or(-1);
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

    /// Collects and uploads the declared artifacts.
    async fn artifacts(&self, ws: &Workspace, image: &str) -> Result<(), Outcome> {
        let a = self.a;
        if a.artifacts.is_empty() {
            return Ok(());
        }
        let exec = self.ctx.executor.as_ref();
        let helper = exec.archive_helper(ws, image).await.map_err(exec_failure)?;
        let collected = artifacts::collect(exec, &helper, &a.artifacts, &self.scratch).await;
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
        for f in files {
            let header = ArtifactHeader {
                attempt_id: a.attempt_id.clone(),
                epoch: a.epoch,
                path: f.path.clone(),
                mode: f.mode,
                size: f.size,
                digest: f.digest.clone(),
            };
            client::upload_artifact(&self.ctx.client, header, &f.local)
                .await
                .map_err(|e| Outcome::failed(FailureClass::Infra, e.to_string()))?;
            let _ = tokio::fs::remove_file(&f.local).await;
        }
        Ok(())
    }

    /// Everything up to the result; `ws` receives the workspace so the caller can remove it.
    async fn body(&self, spool: &AttemptSpool, ws_out: &mut Option<Workspace>) -> Outcome {
        let a = self.a;
        let Some(first) = a.steps.first() else {
            return Outcome::succeeded();
        };
        let exec = self.ctx.executor.as_ref();
        let prepared = interruptible(
            async {
                exec.ensure_image(&first.image, pull_policy(first.pull))
                    .await
                    .map_err(exec_failure)?;
                let ws = exec
                    .create_workspace(&self.ctx.agent_id, &a.attempt_id)
                    .await
                    .map_err(exec_failure)?;
                Ok::<Workspace, Outcome>(ws)
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
        *ws_out = Some(ws.clone());
        match interruptible(self.seed(&ws, &first.image), &self.stop, self.job_deadline).await {
            Ok(Ok(())) => {}
            Ok(Err(o)) => return o,
            Err(i) => return self.interrupted(i),
        }
        for (i, step) in a.steps.iter().enumerate() {
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
        match interruptible(
            self.artifacts(&ws, last_image),
            &self.stop,
            self.job_deadline,
        )
        .await
        {
            Ok(Ok(())) => Outcome::succeeded(),
            Ok(Err(o)) => o,
            Err(i) => self.interrupted(i),
        }
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
    let a = &assignment;
    let started = Instant::now();
    let job_deadline = (a.timeout_secs > 0).then(|| started + Duration::from_secs(a.timeout_secs));
    let scratch = ctx.work_root().join(safe_file_name(&a.attempt_id));
    let attempt = Attempt {
        ctx: &ctx,
        a,
        events,
        stop: stop.clone(),
        scratch: scratch.clone(),
        job_deadline,
    };
    let mut ws = None;
    let mut spool_opt = None;
    let outcome = match prepare_dirs(&ctx.spool_root(), &scratch, &a.attempt_id).await {
        Err(e) => Outcome::failed(FailureClass::Infra, e),
        Ok(spool) => {
            let spool = spool_opt.insert(spool);
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
    cleanup(&ctx, ws.as_ref(), spool_opt.as_ref(), &scratch).await;
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
    tokio::fs::create_dir_all(scratch)
        .await
        .map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    tokio::fs::create_dir_all(spool_root)
        .await
        .map_err(|e| format!("creating {}: {e}", spool_root.display()))?;
    AttemptSpool::create(spool_root, attempt_id)
        .await
        .map_err(|e| format!("creating the log spool: {e}"))
}

async fn cleanup<E: Executor>(
    ctx: &RunnerContext<E>,
    ws: Option<&Workspace>,
    spool: Option<&AttemptSpool>,
    scratch: &Path,
) {
    if let Some(ws) = ws {
        if let Err(e) = ctx.executor.remove_workspace(ws).await {
            tracing::warn!(attempt = %ws.attempt_id, error = %e, "removing the workspace");
        }
    }
    if let Some(spool) = spool {
        if let Err(e) = spool.remove().await {
            tracing::warn!(error = %e, "removing the log spool");
        }
    }
    if let Err(e) = tokio::fs::remove_dir_all(scratch).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(error = %e, "removing the scratch directory");
        }
    }
}
