//! `e2e_noop`: SubmitRun -> the client sees the run succeeded (WatchRun), one simulated agent, so only the
//! coordinator's path is measured; beside a raw tonic echo round trip.

use anyhow::{Context, Result};

use crate::dispatch::sequential_jobs;
use crate::echo;
use crate::report::{Figure, Line};
use crate::Opts;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let n = if opts.quick { 300 } else { 2_000 };
    let echo = echo::round_trips(n).await.context("echo floor")?;
    let seq = sequential_jobs(n).await?;
    eprintln!(
        "e2e_noop: {} runs; p50 shares: submit->assignment {:?}, assignment->result sent {:?}, \
         result sent->WatchRun succeeded {:?}",
        seq.e2e.len(),
        seq.dispatch.p50(),
        seq.agent.p50(),
        seq.settle.p50()
    );
    Ok(vec![Line::new(
        Figure::ms("e2e_noop.p50", seq.e2e.p50()),
        Figure::ms("echo.p50", echo.p50()),
        "<= 5 ms",
    )])
}
