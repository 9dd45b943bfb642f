//! Submitting runs and watching them from a client, as the benchmarks that go through a real agent do.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_proto::v1::{GetRunRequest, JobState, Run, RunState, SubmitRunRequest};

use crate::cluster::Control;

/// SubmitRun of `pipeline`; returns the run id.
pub(crate) async fn submit(client: &mut Control, pipeline: &str) -> Result<String> {
    Ok(client
        .submit_run(SubmitRunRequest {
            pipeline: pipeline.to_string(),
            context_digest: String::new(),
            name: "bench".to_string(),
        })
        .await
        .context("SubmitRun")?
        .into_inner()
        .run_id)
}

/// What a WatchRun follower saw of a run.
#[derive(Debug)]
pub(crate) struct Watched {
    /// When the first step of the first job was first seen running (its container started).
    pub(crate) step_running: Option<Instant>,
    /// When the first step of the first job was first seen finished.
    pub(crate) step_done: Option<Instant>,
    /// When the run was seen finished.
    pub(crate) finished: Instant,
    /// The run as last seen.
    pub(crate) run: Run,
}

/// Follows WatchRun of `run_id` until the run finishes (or `limit` passes), noting when its first step
/// started; fails unless it succeeded.
pub(crate) async fn watch_to_success(
    client: &mut Control,
    run_id: &str,
    limit: Duration,
) -> Result<Watched> {
    let watched = tokio::time::timeout(limit, watch(client, run_id))
        .await
        .with_context(|| format!("run {run_id} not finished within {limit:?}"))??;
    if watched.run.state() != RunState::Succeeded {
        let why: Vec<String> = watched
            .run
            .jobs
            .iter()
            .map(|j| format!("{}: {:?} {}", j.name, j.state(), j.reason))
            .collect();
        bail!(
            "run {run_id} ended {:?}, expected Succeeded ({})",
            watched.run.state(),
            why.join("; ")
        );
    }
    Ok(watched)
}

async fn watch(client: &mut Control, run_id: &str) -> Result<Watched> {
    let mut stream = client
        .watch_run(GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .context("WatchRun")?
        .into_inner();
    let mut step_running = None;
    let mut step_done = None;
    while let Some(run) = stream.message().await.context("WatchRun stream failed")? {
        let now = Instant::now();
        let first_step = run.jobs.first().and_then(|j| j.steps.first());
        if step_running.is_none() && first_step.is_some_and(|s| s.state() != JobState::Queued) {
            step_running = Some(now);
        }
        let done =
            |s: &drover_proto::v1::Step| !matches!(s.state(), JobState::Queued | JobState::Running);
        if step_done.is_none() && first_step.is_some_and(done) {
            step_done = Some(now);
        }
        if run.state() != RunState::Running {
            crate::dispatch::read_to_end(&mut stream).await?;
            return Ok(Watched {
                step_running,
                step_done,
                finished: now,
                run,
            });
        }
    }
    bail!("WatchRun of {run_id} ended while the run was still running")
}

/// Median and spread of repeated figures, for stderr.
pub(crate) fn spread(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => (0.0, 0.0, 0.0),
        n => (v[(n - 1) / 2], v[0], v[n - 1]),
    }
}
