//! `dispatch`: job enqueued -> assignment received by an idle simulated agent, sequential jobs, beside a
//! raw tonic echo round trip. Measured two ways: from just before SubmitRun (so including the client's
//! unary call), and for a job the coordinator queues itself when the job it needs succeeds (from the
//! agent sending that result, so including the result's trip in).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use drover_proto::v1::{GetRunRequest, RunState};
use tokio::sync::mpsc;

use crate::cluster::Coordinator;
use crate::echo;
use crate::jobs;
use crate::report::{Figure, Line, Samples};
use crate::sim_agent::{SimAgent, SimReport};
use crate::Opts;

/// A one-job, one-step pipeline; simulated agents never run its command.
pub(crate) const NOOP_PIPELINE: &str = "jobs:\n  noop:\n    steps:\n      - image: drover-busybox:latest\n        commands: [\"true\"]\n";

/// Two one-step jobs, the second needing the first: the coordinator queues the second itself when the
/// first's result arrives, with no SubmitRun on the way.
const CHAINED_PIPELINE: &str = "jobs:\n  first:\n    steps:\n      - image: drover-busybox:latest\n        commands: [\"true\"]\n  second:\n    needs: [first]\n    steps:\n      - image: drover-busybox:latest\n        commands: [\"true\"]\n";

/// Jobs run before measuring (SQLite page cache, connection warm-up).
const WARMUP: usize = 50;

/// Longest a single job may take before the benchmark gives up.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// Latencies of sequential one-job runs on one idle simulated agent.
#[derive(Debug)]
pub(crate) struct Sequential {
    /// The SubmitRun round trip.
    pub(crate) submit: Samples,
    /// Just before SubmitRun -> the assignment at the agent.
    pub(crate) dispatch: Samples,
    /// Just before SubmitRun -> WatchRun shows the run succeeded.
    pub(crate) e2e: Samples,
    /// Assignment at the agent -> its JobResult sent (the agent's share: protocol messages, log ack).
    pub(crate) agent: Samples,
    /// JobResult sent -> WatchRun shows the run succeeded (the coordinator's share after the result).
    pub(crate) settle: Samples,
}

/// Attaches a new simulated agent to `coord`, then runs `n` jobs one after the other: each is submitted
/// only after the previous run was seen succeeded, so the agent is idle at every submit.
pub(crate) async fn sequential_jobs_on(coord: &Coordinator, n: usize) -> Result<Sequential> {
    let token = coord.token(1).await?;
    let (mut agent, mut events) = reporting_agent(coord, &token, "sim-0").await?;
    let mut client = coord.control().await?;
    let mut submit = Vec::with_capacity(n);
    let mut dispatch = Vec::with_capacity(n);
    let mut e2e = Vec::with_capacity(n);
    let mut agent_share = Vec::with_capacity(n);
    let mut settle = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let r = one_job(&mut client, &mut events).await;
        let t = r.with_context(|| {
            let alive = agent
                .check_alive()
                .err()
                .map(|e| format!("; {e}"))
                .unwrap_or_default();
            format!("job {i}{alive}; coordinator said:\n{}", coord.tail())
        })?;
        if i >= WARMUP {
            submit.push(t.submitted - t.submit);
            dispatch.push(t.assigned - t.submit);
            e2e.push(t.seen - t.submit);
            agent_share.push(t.result_sent.saturating_duration_since(t.assigned));
            settle.push(t.seen.saturating_duration_since(t.result_sent));
        }
    }
    Ok(Sequential {
        submit: Samples::new(submit),
        dispatch: Samples::new(dispatch),
        e2e: Samples::new(e2e),
        agent: Samples::new(agent_share),
        settle: Samples::new(settle),
    })
}

/// A simulated agent attached to `coord` that reports each assignment's arrival and each result sent.
async fn reporting_agent(
    coord: &Coordinator,
    token: &str,
    name: &str,
) -> Result<(SimAgent, AgentEvents)> {
    let (tx, assignments) = mpsc::channel(4);
    let (results_tx, results) = mpsc::channel(4);
    let agent = SimAgent::start(
        &coord.url,
        token,
        name,
        SimReport {
            assignments: Some(tx),
            results: Some(results_tx),
            ..Default::default()
        },
    )
    .await?;
    Ok((
        agent,
        AgentEvents {
            assignments,
            results,
        },
    ))
}

/// What the simulated agent reports, in order, for each job.
struct AgentEvents {
    assignments: mpsc::Receiver<Instant>,
    results: mpsc::Receiver<Instant>,
}

/// The instants of one job's life.
struct Timeline {
    submit: Instant,
    submitted: Instant,
    assigned: Instant,
    result_sent: Instant,
    seen: Instant,
}

async fn one_job(
    client: &mut crate::cluster::Control,
    events: &mut AgentEvents,
) -> Result<Timeline> {
    let t0 = Instant::now();
    let run_id = jobs::submit(client, NOOP_PIPELINE).await?;
    let submitted = Instant::now();
    let assigned = tokio::time::timeout(JOB_TIMEOUT, events.assignments.recv())
        .await
        .map_err(|_| anyhow!("run {run_id}: no assignment within {JOB_TIMEOUT:?}"))?
        .ok_or_else(|| anyhow!("the simulated agent's session ended"))?;
    let (state, seen) = tokio::time::timeout(JOB_TIMEOUT, watch_until_finished(client, &run_id))
        .await
        .map_err(|_| anyhow!("run {run_id} not finished within {JOB_TIMEOUT:?}"))??;
    if state != RunState::Succeeded {
        bail!("run {run_id} ended {state:?}, expected Succeeded");
    }
    // The agent sent its result before the run could succeed, so this is already queued.
    let result_sent = tokio::time::timeout(JOB_TIMEOUT, events.results.recv())
        .await
        .map_err(|_| anyhow!("run {run_id}: succeeded but the agent reported no result"))?
        .ok_or_else(|| anyhow!("the simulated agent's session ended"))?;
    Ok(Timeline {
        submit: t0,
        submitted,
        assigned: assigned.max(t0),
        result_sent,
        seen,
    })
}

/// Follows WatchRun until the run is no longer running; returns its final state and when it arrived.
pub(crate) async fn watch_until_finished(
    client: &mut crate::cluster::Control,
    run_id: &str,
) -> Result<(RunState, Instant)> {
    let mut stream = client
        .watch_run(GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .context("WatchRun")?
        .into_inner();
    while let Some(run) = stream.message().await.context("WatchRun stream failed")? {
        if run.state() != RunState::Running {
            let at = Instant::now();
            read_to_end(&mut stream).await?;
            return Ok((run.state(), at));
        }
    }
    bail!("WatchRun of {run_id} ended while the run was still running")
}

/// Reads a WatchRun stream to its end (the coordinator ends it right after the final state).
///
/// Dropping it at the final message instead races the stream's trailers: when they arrive after the
/// client reset the stream, the client's h2 counts a reset of its own, and after 1,024 of those on one
/// connection it closes the connection ("too_many_internal_resets", hyperium/h2#856), failing every
/// call in flight on it. A benchmark that watches thousands of runs over one connection hit that.
pub(crate) async fn read_to_end(
    stream: &mut tonic::Streaming<drover_proto::v1::Run>,
) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    })
    .await
    .context("WatchRun did not end after the run finished")?
    .context("WatchRun stream failed after the run finished")
}

/// Runs `n` two-job runs ([`CHAINED_PIPELINE`]) one after the other on one idle simulated agent and
/// returns, for each, the first job's JobResult sent -> the second job's assignment at the agent: the
/// dispatch of a job queued inside the coordinator (when the job it needs succeeds). Both instants are
/// taken in this process, so no clocks are compared. The span holds one agent -> coordinator message
/// and one coordinator -> agent message on the open Attach stream, like one echo round trip, plus the
/// coordinator's work: fence and apply the result, settle the run, queue the next job, place it, push.
async fn downstream_jobs(coord: &Coordinator, n: usize) -> Result<Samples> {
    let token = coord.token(1).await?;
    let (_agent, events) = reporting_agent(coord, &token, "sim-chain").await?;
    let AgentEvents {
        mut assignments,
        mut results,
    } = events;
    let mut client = coord.control().await?;
    let mut out = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let run_id = jobs::submit(&mut client, CHAINED_PIPELINE).await?;
        next_event(&mut assignments, &run_id, "first assignment").await?;
        let first_done = next_event(&mut results, &run_id, "first result").await?;
        let second = next_event(&mut assignments, &run_id, "second assignment").await?;
        next_event(&mut results, &run_id, "second result").await?;
        let (state, _) =
            tokio::time::timeout(JOB_TIMEOUT, watch_until_finished(&mut client, &run_id))
                .await
                .map_err(|_| anyhow!("run {run_id} not finished within {JOB_TIMEOUT:?}"))??;
        if state != RunState::Succeeded {
            bail!("run {run_id} ended {state:?}, expected Succeeded");
        }
        if i >= WARMUP {
            out.push(second.saturating_duration_since(first_done));
        }
    }
    Ok(Samples::new(out))
}

/// The next instant the simulated agent reports on `rx`.
async fn next_event(rx: &mut mpsc::Receiver<Instant>, run_id: &str, what: &str) -> Result<Instant> {
    tokio::time::timeout(JOB_TIMEOUT, rx.recv())
        .await
        .map_err(|_| anyhow!("run {run_id}: no {what} within {JOB_TIMEOUT:?}"))?
        .ok_or_else(|| anyhow!("the simulated agent's session ended"))
}

/// The benchmark: echo floor first, then the sequential jobs, then the chained ones.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let n = if opts.quick { 1_000 } else { 10_000 };
    let echo = echo::round_trips(n).await.context("echo floor")?;
    let coord = Coordinator::start(&[]).await?;
    let seq = sequential_jobs_on(&coord, n).await?;
    let downstream = downstream_jobs(&coord, n)
        .await
        .with_context(|| format!("chained runs; coordinator said:\n{}", coord.tail()))?;
    eprintln!(
        "dispatch: {} jobs, echo {} round trips; with the simulated agent, submit -> succeeded seen \
         p50 {:?} (assignment -> result sent {:?}, result sent -> WatchRun succeeded {:?})",
        seq.dispatch.len(),
        echo.len(),
        seq.e2e.p50(),
        seq.agent.p50(),
        seq.settle.p50()
    );
    Ok(vec![
        Line::new(
            Figure::us("dispatch.p50", seq.dispatch.p50()),
            Figure::us("echo.p50", echo.p50()),
            "<= 2.0x",
        ),
        Line::new(
            Figure::us("dispatch.p99", seq.dispatch.p99()),
            Figure::us("echo.p99", echo.p99()),
            "<= 500 us",
        ),
        Line::new(
            Figure::us("dispatch.downstream.p50", downstream.p50()),
            Figure::us("echo.p50", echo.p50()),
            "<= 2.0x",
        ),
        Line::new(
            Figure::us("dispatch.downstream.p99", downstream.p99()),
            Figure::us("echo.p99", echo.p99()),
            "<= 500 us",
        ),
    ])
}
