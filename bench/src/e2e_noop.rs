//! `e2e_noop`: SubmitRun -> the client sees the run succeeded (WatchRun), one job with one `true` step on a
//! real `drover-agent` with the shell executor (so no container engine is in the path); beside a raw tonic
//! echo round trip.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cluster::Coordinator;
use crate::echo;
use crate::jobs;
use crate::report::{Figure, Line, Samples};
use crate::Opts;

/// Runs before measuring (SQLite page cache, connections, the agent's first job).
const WARMUP: usize = 20;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let n = if opts.quick { 200 } else { 2_000 };
    let echo = echo::round_trips(n).await.context("echo floor")?;
    let coord = Coordinator::start(&[]).await?;
    let _agent = coord
        .spawn_agent_with("shell", "os=linux", 1, &["--executor", "shell"])
        .await?;
    let mut client = coord.control().await?;
    let pipeline = "jobs:\n  noop:\n    agents: { os: linux }\n    steps:\n      - image: drover-busybox:latest\n        commands: [\"true\"]\n";
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t0 = Instant::now();
        let run_id = jobs::submit(&mut client, pipeline).await?;
        jobs::watch_to_success(&mut client, &run_id, Duration::from_secs(30))
            .await
            .with_context(|| format!("run {i}; coordinator said:\n{}", coord.tail()))?;
        if i >= WARMUP {
            samples.push(t0.elapsed());
        }
    }
    let samples = Samples::new(samples);
    eprintln!(
        "e2e_noop: {} runs on a shell-executor agent; p50 {:?}, p99 {:?}",
        samples.len(),
        samples.p50(),
        samples.p99()
    );
    Ok(vec![Line::new(
        Figure::ms("e2e_noop.p50", samples.p50()),
        Figure::ms("echo.p50", echo.p50()),
        "<= 5 ms",
    )])
}
