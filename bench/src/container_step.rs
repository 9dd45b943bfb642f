//! `container_step`: a `true` step in drover-busybox:latest three ways: the raw Docker Engine API sequence
//! through bollard, `docker run --rm`, and a one-step job through a real coordinator and a real agent.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder};
use bollard::Docker;
use drover_proto::v1::{RunState, SubmitRunRequest};
use futures::StreamExt;

use crate::cluster::{remove_labelled, run_ok, Coordinator};
use crate::dispatch::watch_until_finished;
use crate::report::{Figure, Line, Samples};
use crate::Opts;

/// The image scripts/build-image makes.
pub(crate) const IMAGE: &str = "drover-busybox:latest";

/// Label on the floor's containers, so an interrupted run's leftovers can be found.
const LABEL: &str = "drover.bench";

/// Unmeasured repetitions first (image layers into the page cache, connections).
const WARMUP: usize = 2;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let n = if opts.quick { 10 } else { 30 };
    let docker = Docker::connect_with_local_defaults()
        .context("connecting to the Docker engine")?
        .negotiate_version()
        .await
        .context("negotiating the Docker API version")?;
    let raw = repeat(n, || bollard_true(&docker))
        .await
        .context("bollard floor")?;
    remove_labelled(&format!("{LABEL}=1"));
    let cli = repeat(n, docker_run_true)
        .await
        .context("docker run floor")?;
    let job = drover_job(n).await?;
    eprintln!(
        "container_step: bollard p50 {:?}, docker run p50 {:?}, drover job p50 {:?}",
        raw.p50(),
        cli.p50(),
        job.p50()
    );
    Ok(vec![
        Line::new(
            Figure::ms("container_step.job.p50", job.p50()),
            Figure::ms("container_step.bollard.p50", raw.p50()),
            "<= 1.05x",
        ),
        Line::new(
            Figure::ms("container_step.job.p50", job.p50()),
            Figure::ms("container_step.docker_run.p50", cli.p50()),
            "<= 1.0x",
        ),
    ])
}

async fn repeat<F, Fut>(n: usize, mut f: F) -> Result<Samples>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t0 = Instant::now();
        f().await?;
        if i >= WARMUP {
            samples.push(t0.elapsed());
        }
    }
    Ok(Samples::new(samples))
}

/// create, start, wait, remove: the least any Docker-based step costs (log driver `none`, as the agent).
async fn bollard_true(docker: &Docker) -> Result<()> {
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_string()),
        cmd: Some(vec!["true".to_string()]),
        labels: Some(HashMap::from([(LABEL.to_string(), "1".to_string())])),
        host_config: Some(HostConfig {
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".to_string()),
                config: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .context("creating the container")?
        .id;
    let run = async {
        docker
            .start_container(&id, None)
            .await
            .context("starting the container")?;
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut wait = docker.wait_container(&id, Some(options));
        while let Some(r) = wait.next().await {
            match r {
                Ok(r) if r.status_code == 0 => {}
                Ok(r) => bail!("`true` exited {}", r.status_code),
                Err(BollardError::DockerContainerWaitError { code, .. }) => {
                    bail!("`true` exited {code}")
                }
                Err(e) => return Err(e).context("waiting for the container"),
            }
        }
        Ok(())
    }
    .await;
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    let removed = docker
        .remove_container(&id, Some(options))
        .await
        .context("removing the container");
    run?;
    removed
}

/// `docker run --rm IMAGE true`, as a user would type it.
async fn docker_run_true() -> Result<()> {
    run_ok(
        tokio::process::Command::new("docker").args([
            "run",
            "--rm",
            "--label",
            &format!("{LABEL}=1"),
            IMAGE,
            "true",
        ]),
        &format!("`docker run --rm {IMAGE} true`"),
    )
    .await
    .map(drop)
}

/// One-step `true` jobs through a real coordinator and agent: SubmitRun -> WatchRun shows succeeded.
async fn drover_job(n: usize) -> Result<Samples> {
    let coord = Coordinator::start(&[]).await?;
    let _agent = coord.spawn_agent("a", "os=linux", 1).await?;
    let mut client = coord.control().await?;
    let pipeline = format!(
        "jobs:\n  step:\n    agents: {{ os: linux }}\n    steps:\n      - image: {IMAGE}\n        commands: [\"true\"]\n"
    );
    let mut samples = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let t0 = Instant::now();
        let run_id = client
            .submit_run(SubmitRunRequest {
                pipeline: pipeline.clone(),
                context_digest: String::new(),
                name: "bench".to_string(),
            })
            .await
            .context("SubmitRun")?
            .into_inner()
            .run_id;
        let (state, _) = tokio::time::timeout(
            Duration::from_secs(60),
            watch_until_finished(&mut client, &run_id),
        )
        .await
        .with_context(|| format!("run {run_id} not finished within 60 s"))??;
        if state != RunState::Succeeded {
            bail!(
                "run {run_id} ended {state:?}, expected Succeeded; coordinator said:\n{}",
                coord.tail()
            );
        }
        if i >= WARMUP {
            samples.push(t0.elapsed());
        }
    }
    Ok(Samples::new(samples))
}
