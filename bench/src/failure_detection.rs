//! `failure_detection`: `kill -9` of the real agent running a step -> the job runs on the other agent (new
//! attempt), beside the lease TTL that bounds it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_proto::v1::{CancelRunRequest, GetRunRequest, Job, JobState, SubmitRunRequest};

use crate::cluster::Coordinator;
use crate::container_step::IMAGE;
use crate::report::{Figure, Line};
use crate::Opts;

/// The coordinator's lease TTL for this benchmark.
const LEASE_TTL: Duration = Duration::from_secs(3);

/// Repetitions; the worst is reported.
const REPEATS: usize = 3;

/// GetRun polling period: the resolution of the measurement.
const POLL: Duration = Duration::from_millis(20);

/// The benchmark.
pub(crate) async fn run(_opts: &Opts) -> Result<Vec<Line>> {
    let mut worst = Duration::ZERO;
    for i in 0..REPEATS {
        let d = once()
            .await
            .with_context(|| format!("repetition {}", i + 1))?;
        eprintln!("failure_detection: repetition {}: {d:?}", i + 1);
        worst = worst.max(d);
    }
    Ok(vec![Line::new(
        Figure::secs("failure_detection.worst", worst),
        Figure::secs("lease_ttl", LEASE_TTL),
        "<= 1.3",
    )])
}

/// A fresh coordinator and two agents; returns kill -> job running on the survivor.
async fn once() -> Result<Duration> {
    let coord = Coordinator::start(&["--lease-ttl", "3s", "--heartbeat-interval", "500ms"]).await?;
    let mut a = coord.spawn_agent("a", "os=linux", 1).await?;
    let mut b = coord.spawn_agent("b", "os=linux", 1).await?;
    let mut client = coord.control().await?;
    let run_id = client
        .submit_run(SubmitRunRequest {
            pipeline: format!(
                "jobs:\n  slow:\n    agents: {{ os: linux }}\n    steps:\n      - name: work\n        image: {IMAGE}\n        commands: [\"sleep 30\"]\n"
            ),
            context_digest: String::new(),
            name: "bench".to_string(),
        })
        .await
        .context("SubmitRun")?
        .into_inner()
        .run_id;
    let first = wait_job(&mut client, &run_id, Duration::from_secs(60), |j| {
        j.state() == JobState::Running
            && j.steps
                .first()
                .is_some_and(|s| s.state() == JobState::Running)
    })
    .await
    .context("waiting for the step to run")?;
    let (victim, survivor) = if first.agent_id == a.id {
        (&mut a, b.id.clone())
    } else if first.agent_id == b.id {
        (&mut b, a.id.clone())
    } else {
        bail!("the job runs on unknown agent {:?}", first.agent_id);
    };
    let killed_at = Instant::now();
    victim.kill().await;
    let moved = wait_job(&mut client, &run_id, LEASE_TTL * 10, |j| {
        j.state() == JobState::Running && j.agent_id == survivor && j.attempt_id != first.attempt_id
    })
    .await
    .with_context(|| {
        format!(
            "waiting for the job to move; coordinator said:\n{}",
            coord.tail()
        )
    })?;
    let elapsed = killed_at.elapsed();
    if moved.attempt_id.is_empty() {
        bail!("the moved job has no attempt id");
    }
    // Stop the `sleep 30` on the survivor; dropping the agents removes what either left.
    let _ = client
        .cancel_run(CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await;
    Ok(elapsed)
}

/// Polls GetRun until the run's (only) job satisfies `pred`; returns that job.
async fn wait_job(
    client: &mut crate::cluster::Control,
    run_id: &str,
    timeout: Duration,
    pred: impl Fn(&Job) -> bool,
) -> Result<Job> {
    let deadline = Instant::now() + timeout;
    loop {
        let run = client
            .get_run(GetRunRequest {
                run_id: run_id.to_string(),
            })
            .await
            .context("GetRun")?
            .into_inner();
        let job = run
            .jobs
            .into_iter()
            .next()
            .with_context(|| format!("run {run_id} has no job"))?;
        if pred(&job) {
            return Ok(job);
        }
        if Instant::now() > deadline {
            bail!("condition not reached within {timeout:?}; job now: {job:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}
