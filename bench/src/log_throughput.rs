//! `log_throughput`: a step writes 256 MiB of text lines through a real agent and coordinator, beside
//! the same command run by the Docker engine alone, in the same run. Two comparisons:
//!
//! - the issue's own: `docker run --rm --log-driver none IMAGE sh -c ...` with its output attached to
//!   `/dev/null`, timed as a user sees it (the CLI started -> it exited), against a Drover run timed
//!   the same way (just before SubmitRun -> WatchRun shows the run succeeded: dispatch, the container's
//!   creation and removal and the durable result included on Drover's side, as they are on the CLI's);
//! - a stricter one: the step's output alone (WatchRun shows the step running -> the log is complete
//!   at the coordinator) against a bare container (log driver `none`) whose attach stream this
//!   process reads into a sink (its start -> the end of the stream), which leaves out every fixed
//!   cost of a run on both sides.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig};
use bollard::query_parameters::{AttachContainerOptionsBuilder, RemoveContainerOptionsBuilder};
use bollard::Docker;
use drover_proto::v1::FollowLogsRequest;
use futures::StreamExt;

use crate::cluster::{remove_labelled, run_ok, Control, Coordinator};
use crate::container_step::IMAGE;
use crate::fleet::{clock_ticks_per_second, cpu_ticks};
use crate::jobs;
use crate::report::{Figure, Line};
use crate::Opts;

/// Label on the floor's containers, so an interrupted run's leftovers can be found.
const LABEL: &str = "drover.bench.logs";

/// Repetitions of each side; the median is printed, the spread goes to stderr.
const REPEATS: usize = 5;

/// The step's command: text lines (82 bytes each), exactly `bytes` of them. One MiB of lines is made
/// first and then written again and again with `cat`, so the writer is not the limit (busybox `yes`
/// manages only about 50 MiB/s here).
fn command(bytes: u64) -> String {
    let mib = 1u64 << 20;
    format!(
        "yes 'drover log throughput: the quick brown fox jumps over the lazy dog 0123456789' | head -c {mib} > /tmp/lines; \
         i=0; while [ $i -lt {whole} ]; do cat /tmp/lines; i=$((i+1)); done; head -c {rest} /tmp/lines",
        whole = bytes / mib,
        rest = bytes % mib
    )
}

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let bytes: u64 = if opts.quick { 32 << 20 } else { 256 << 20 };
    let repeats = if opts.quick { 1 } else { REPEATS };
    let docker = Docker::connect_with_local_defaults()
        .context("connecting to the Docker engine")?
        .negotiate_version()
        .await
        .context("negotiating the Docker API version")?;
    let coord = Coordinator::start(&[]).await?;
    // No log cap: the whole output is the point.
    let agent = coord
        .spawn_agent_with("logs", "os=linux", 1, &["--max-log-bytes", "0"])
        .await?;
    let pids = (
        agent.pid().context("the agent process is gone")?,
        coord.pid()?,
    );
    let clk_tck = clock_ticks_per_second().await;
    let mut cpu = Vec::new();
    // The floor's reader (this process) per MiB: what reading the attach stream alone costs.
    let mut floor_cpu = Vec::new();
    let mut client = coord.control().await?;
    let mut floor = Vec::new();
    let mut drover = Vec::new();
    let mut cli_floor = Vec::new();
    let mut drover_run = Vec::new();
    let mib = bytes as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    // Alternate the sides so a burst of load from elsewhere on the machine hits all of them alike.
    for i in 0..repeats {
        let reader0 = cpu_ticks(std::process::id())?;
        let f = attach_floor(&docker, bytes).await.context("floor")?;
        let reader1 = cpu_ticks(std::process::id())?;
        let cli = docker_run_floor(bytes)
            .await
            .context("the `docker run` floor")?;
        let ticks0 = (cpu_ticks(pids.0)?, cpu_ticks(pids.1)?);
        let d = through_drover(&coord, &mut client, bytes)
            .await
            .with_context(|| format!("drover run {}", i + 1))?;
        let ticks1 = (cpu_ticks(pids.0)?, cpu_ticks(pids.1)?);
        // CPU per MiB shipped, in ms: what the agent and the coordinator take from the build host.
        let per_mib = |t0: u64, t1: u64| 1e3 * t1.saturating_sub(t0) as f64 / clk_tck / mib;
        cpu.push((per_mib(ticks0.0, ticks1.0), per_mib(ticks0.1, ticks1.1)));
        floor_cpu.push(per_mib(reader0, reader1));
        eprintln!(
            "log_throughput: repetition {}: `docker run` {:.0} MiB/s ({cli:?}), drover run {:.0} MiB/s \
             ({:?}); attach floor {:.0} MiB/s ({f:?}), drover step output {:.0} MiB/s ({:?})",
            i + 1,
            rate(cli),
            rate(d.run),
            d.run,
            rate(f),
            rate(d.output),
            d.output
        );
        floor.push(rate(f));
        drover.push(rate(d.output));
        cli_floor.push(rate(cli));
        drover_run.push(rate(d.run));
    }
    remove_labelled(&format!("{LABEL}=1"));
    let agent_cpu: Vec<f64> = cpu.iter().map(|c| c.0).collect();
    let coord_cpu: Vec<f64> = cpu.iter().map(|c| c.1).collect();
    let (a, alo, ahi) = jobs::spread(&agent_cpu);
    let (c, clo, chi) = jobs::spread(&coord_cpu);
    let (r, rlo, rhi) = jobs::spread(&floor_cpu);
    eprintln!(
        "log_throughput: CPU per MiB, submit -> log complete: agent {a:.2} ms (range {alo:.2}-{ahi:.2}), \
         coordinator {c:.2} ms (range {clo:.2}-{chi:.2}); the floor's attach reader {r:.2} ms (range {rlo:.2}-{rhi:.2})"
    );
    let (d, dlo, dhi) = jobs::spread(&drover);
    let (f, flo, fhi) = jobs::spread(&floor);
    let (dr, drlo, drhi) = jobs::spread(&drover_run);
    let (cf, cflo, cfhi) = jobs::spread(&cli_floor);
    eprintln!(
        "log_throughput: {} MiB per run; medians (ranges): drover run {dr:.0} ({drlo:.0}-{drhi:.0}) \
         against `docker run` {cf:.0} ({cflo:.0}-{cfhi:.0}) MiB/s; drover step output {d:.0} \
         ({dlo:.0}-{dhi:.0}) against the attach floor {f:.0} ({flo:.0}-{fhi:.0}) MiB/s",
        bytes >> 20
    );
    Ok(vec![
        Line::new(
            Figure::new("log_throughput.rate", dr, "MiB/s"),
            Figure::new("docker_run.rate", cf, "MiB/s"),
            ">= 0.8x",
        ),
        Line::new(
            Figure::new("log_throughput.step_output_rate", d, "MiB/s"),
            Figure::new("docker_attach.rate", f, "MiB/s"),
            "n/a (the stricter floor: no fixed costs on either side)",
        ),
    ])
}

/// The floor: `docker run --rm --log-driver none` of the same command with its output attached
/// to `/dev/null`, as a user would type it; timed from the CLI's start to its exit.
async fn docker_run_floor(bytes: u64) -> Result<Duration> {
    let t0 = Instant::now();
    run_ok(
        tokio::process::Command::new("docker")
            .args(["run", "--rm", "--log-driver", "none", "--label"])
            .arg(format!("{LABEL}=1"))
            .args([IMAGE, "sh", "-e", "-c"])
            .arg(command(bytes))
            .stdout(std::process::Stdio::null()),
        &format!("`docker run --rm --log-driver none {IMAGE} ...`"),
    )
    .await?;
    Ok(t0.elapsed())
}

/// The two spans of one run through Drover.
struct Spans {
    /// Just before SubmitRun -> WatchRun shows the run succeeded.
    run: Duration,
    /// WatchRun shows the step running -> a follower sees the log complete.
    output: Duration,
}

/// The bare container: created with the log driver `none`, attached, started; timed from the start to the
/// end of its attach stream, every byte counted.
async fn attach_floor(docker: &Docker, bytes: u64) -> Result<Duration> {
    let body = ContainerCreateBody {
        image: Some(IMAGE.to_string()),
        cmd: Some(vec!["sh".into(), "-e".into(), "-c".into(), command(bytes)]),
        labels: Some(HashMap::from([(LABEL.to_string(), "1".to_string())])),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
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
    let timed = async {
        let options = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .logs(false)
            .build();
        let mut output = docker
            .attach_container(&id, Some(options))
            .await
            .context("attaching")?
            .output;
        docker
            .start_container(&id, None)
            .await
            .context("starting the container")?;
        let t0 = Instant::now();
        let mut got = 0u64;
        while let Some(chunk) = output.next().await {
            got += chunk.context("reading the attach stream")?.as_ref().len() as u64;
        }
        let took = t0.elapsed();
        if got != bytes {
            bail!("the container wrote {got} bytes, expected {bytes}");
        }
        Ok(took)
    }
    .await;
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    let removed = docker
        .remove_container(&id, Some(options))
        .await
        .context("removing the container");
    let took = timed?;
    removed?;
    Ok(took)
}

/// One run through the real agent and coordinator, timed twice: just before SubmitRun -> WatchRun shows
/// the run succeeded, and WatchRun shows the step running -> a follower (FollowLogs from the final
/// offset, so it reads nothing) sees the log complete. Checks the run succeeded with every byte stored.
async fn through_drover(coord: &Coordinator, client: &mut Control, bytes: u64) -> Result<Spans> {
    let pipeline = format!(
        "jobs:\n  logs:\n    agents: {{ os: linux }}\n    steps:\n      - name: write\n        image: {IMAGE}\n        commands: [\"{}\"]\n",
        command(bytes)
    );
    let submitted = Instant::now();
    let run_id = jobs::submit(client, &pipeline).await?;
    let mut follower = coord.control().await?;
    let follow = {
        let run_id = run_id.clone();
        tokio::spawn(async move {
            let mut stream = follower
                .follow_logs(FollowLogsRequest {
                    run_id,
                    job: "logs".to_string(),
                    step: "write".to_string(),
                    offset: bytes,
                    follow: true,
                    timestamps: false,
                })
                .await
                .context("FollowLogs")?
                .into_inner();
            while let Some(ev) = stream.message().await.context("FollowLogs stream")? {
                if !ev.data.is_empty() {
                    bail!("FollowLogs from offset {bytes} returned data: the log is too long");
                }
                if ev.eof {
                    return Ok(Instant::now());
                }
            }
            bail!("FollowLogs ended without the log's end")
        })
    };
    let watched = jobs::watch_to_success(client, &run_id, Duration::from_secs(600)).await?;
    let complete = follow.await.context("the follower task")??;
    let started = watched
        .step_running
        .context("WatchRun never showed the step running")?;
    let stored = watched
        .run
        .jobs
        .first()
        .and_then(|j| j.steps.first())
        .map_or(0, |s| s.log_bytes);
    if stored != bytes {
        bail!("the coordinator stored {stored} bytes of log, expected {bytes}");
    }
    let step_done = watched.step_done.unwrap_or(watched.finished);
    eprintln!(
        "log_throughput: step running -> step finished {:?}, -> log complete {:?}, -> run succeeded {:?}",
        step_done.saturating_duration_since(started),
        complete.saturating_duration_since(started),
        watched.finished.saturating_duration_since(started)
    );
    Ok(Spans {
        run: watched.finished.saturating_duration_since(submitted),
        output: complete.saturating_duration_since(started),
    })
}
