//! `store_size`: the coordinator over a store holding 100,000 finished runs, beside the same over an empty
//! store: SubmitRun and dispatch latency (sequential one-job runs, one idle simulated agent) and restart to
//! serving (process start -> the first successful gRPC call).
//!
//! The runs are written straight through the coordinator's own store API (`Store::commit` of whole runs,
//! 2,000 per transaction) before the coordinator first starts; the timed restart follows a SIGKILL of that
//! first start, like a crash.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_coordinator::engine::model::{AttemptRec, JobRec, RunRec, RunStatus, Status, StepRec};
use drover_coordinator::store::{Store, Write};
use drover_proto::v1::ListRunsRequest;

use crate::cluster::{scratch_dir, Coordinator};
use crate::dispatch::{sequential_jobs_on, Sequential, NOOP_PIPELINE};
use crate::report::{Figure, Line};
use crate::Opts;

/// Runs per fill transaction.
const FILL_BATCH: usize = 2_000;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let (runs, jobs) = if opts.quick {
        (10_000, 300)
    } else {
        (100_000, 2_000)
    };
    let empty = measure(0, jobs).await.context("empty store")?;
    let full = measure(runs, jobs)
        .await
        .with_context(|| format!("store with {runs} finished runs"))?;
    let k = runs / 1000;
    Ok(vec![
        Line::new(
            Figure::us(
                format!("store_size.{k}k_runs.submit.p50"),
                full.seq.submit.p50(),
            ),
            Figure::us("store_size.empty.submit.p50", empty.seq.submit.p50()),
            "<= 1.2x",
        ),
        Line::new(
            Figure::us(
                format!("store_size.{k}k_runs.dispatch.p50"),
                full.seq.dispatch.p50(),
            ),
            Figure::us("store_size.empty.dispatch.p50", empty.seq.dispatch.p50()),
            "<= 1.2x",
        ),
        Line::new(
            Figure::us(
                format!("store_size.{k}k_runs.dispatch.p99"),
                full.seq.dispatch.p99(),
            ),
            Figure::us("store_size.empty.dispatch.p99", empty.seq.dispatch.p99()),
            "<= 1.2x",
        ),
        Line::new(
            Figure::ms(format!("store_size.{k}k_runs.restart"), full.restart),
            Figure::ms("store_size.empty.restart", empty.restart),
            "<= 1000 ms",
        ),
    ])
}

/// What one store size gave.
struct Measured {
    /// Process start -> first successful ListRuns.
    restart: Duration,
    seq: Sequential,
}

/// Fill a new data directory with `runs` finished runs, start the coordinator over it once, kill it, time
/// the restart to serving, then run `jobs` sequential one-job runs.
async fn measure(runs: usize, jobs: usize) -> Result<Measured> {
    let dir = scratch_dir()?;
    let data = dir.path().join("coordinator");
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    if runs > 0 {
        let t0 = Instant::now();
        fill(&data.join("drover.sqlite"), runs).await?;
        eprintln!(
            "store_size: {runs} finished runs written in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    // The first start creates the admin token; the timed one is a restart after a crash.
    let first = Coordinator::start_in(dir, &[]).await?;
    let dir = first.kill().await;
    let t0 = Instant::now();
    let coord = Coordinator::start_in(dir, &[]).await?;
    let mut client = coord.control().await?;
    let newest = client
        .list_runs(ListRunsRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .context("ListRuns after the restart")?
        .into_inner();
    let restart = t0.elapsed();
    if runs > 0 && newest.runs.is_empty() {
        bail!("the restarted coordinator lists no runs: the filled store was not used");
    }
    eprintln!(
        "store_size: {runs} runs: restart to serving {:.0} ms",
        restart.as_secs_f64() * 1e3
    );
    let seq = sequential_jobs_on(&coord, jobs)
        .await
        .with_context(|| format!("coordinator said:\n{}", coord.tail()))?;
    Ok(Measured { restart, seq })
}

/// Write `runs` finished one-job runs (and their attempts) into the store at `path`.
async fn fill(path: &Path, runs: usize) -> Result<()> {
    let store = Store::open(path).with_context(|| format!("opening {}", path.display()))?;
    let pipeline = drover_coordinator::pipeline::parse(NOOP_PIPELINE)
        .map_err(|e| anyhow::anyhow!("the no-op pipeline does not parse: {e:?}"))?;
    let spec = pipeline
        .jobs
        .into_iter()
        .next()
        .context("the no-op pipeline has no job")?;
    let now = drover_coordinator::engine::now_ms();
    let mut seq = 0i64;
    while (seq as usize) < runs {
        let mut writes = Vec::with_capacity(2 * FILL_BATCH);
        for _ in 0..FILL_BATCH.min(runs - seq as usize) {
            seq += 1;
            let (run_id, attempt_id) = (format!("filled-{seq}"), format!("filled-{seq}-1"));
            let at = now - (runs as i64 - seq) * 10;
            writes.push(Write::Run(RunRec {
                seq,
                id: run_id.clone(),
                name: "filled".into(),
                state: RunStatus::Succeeded,
                cancel_requested: false,
                created_ms: at,
                finished_ms: Some(at + 5),
                context_digest: String::new(),
                pipeline: NOOP_PIPELINE.into(),
                jobs: vec![JobRec {
                    name: spec.name.clone(),
                    idx: 0,
                    spec: std::sync::Arc::new(spec.clone()),
                    state: Status::Succeeded,
                    failure: 0,
                    reason: String::new(),
                    exit_code: 0,
                    attempts: 1,
                    attempt_id: Some(attempt_id.clone()),
                    epoch: 1,
                    agent_id: Some("agent-filled".into()),
                    started_ms: Some(at + 1),
                    finished_ms: Some(at + 5),
                    steps: vec![StepRec {
                        state: Status::Succeeded,
                        exit_code: 0,
                    }],
                    artifacts: Vec::new(),
                }],
            }));
            writes.push(Write::Attempt(AttemptRec {
                id: attempt_id,
                run_id,
                job: spec.name.clone(),
                agent_id: "agent-filled".into(),
                epoch: 1,
                state: Status::Succeeded,
                created_ms: at,
                finished_ms: Some(at + 5),
            }));
        }
        store
            .commit(writes)
            .await
            .context("writing finished runs")?;
    }
    Ok(())
}
