//! `parallelism`: container steps per second at parallelism 1, 2, 4 and 8. Drover: one-step `true` jobs,
//! all submitted at once to one real agent of capacity N, timed from the first submit to the last run
//! seen succeeded. Floor: `xargs -P N docker run --rm drover-busybox:latest true` over the same count, in
//! the same run. After each side, no container or volume may be left behind (checked, not assumed).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{run_ok, Coordinator};
use crate::container_step::IMAGE;
use crate::jobs;
use crate::report::{Figure, Line};
use crate::Opts;

/// Label on the floor's containers.
const LABEL: &str = "drover.bench.parallelism";

/// The parallelism levels measured.
const LEVELS: [usize; 4] = [1, 2, 4, 8];

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let coord = Coordinator::start(&[]).await?;
    let mut lines = Vec::new();
    for n in LEVELS {
        // Enough steps that each level runs several waves; fewer for a quick look.
        let steps = if opts.quick {
            2 * n.max(2)
        } else {
            6 * n.max(4)
        };
        let floor = xargs_floor(n, steps).await.context("xargs floor")?;
        let left = leftovers(&format!("label={LABEL}=1")).await?;
        if !left.is_empty() {
            bail!("docker run --rm left {} containers: {left:?}", left.len());
        }
        let drover = drover_jobs(&coord, n, steps)
            .await
            .with_context(|| format!("parallelism {n}"))?;
        eprintln!(
            "parallelism: {n}: {steps} steps; drover {:.2} steps/s, xargs docker run {:.2} steps/s",
            drover, floor
        );
        lines.push(Line::new(
            Figure::new(format!("parallelism.{n}"), drover, "steps/s"),
            Figure::new(format!("xargs_docker_run.{n}"), floor, "steps/s"),
            ">= 1.0x",
        ));
    }
    Ok(lines)
}

/// `seq STEPS | xargs -P N -n 1 docker run --rm ... true`: steps per second.
async fn xargs_floor(n: usize, steps: usize) -> Result<f64> {
    let script =
        format!("seq {steps} | xargs -P {n} -I{{}} docker run --rm --label {LABEL}=1 {IMAGE} true");
    let t0 = Instant::now();
    run_ok(
        tokio::process::Command::new("sh").arg("-c").arg(&script),
        &format!("`{script}`"),
    )
    .await?;
    Ok(steps as f64 / t0.elapsed().as_secs_f64())
}

/// `steps` one-step jobs submitted at once to a fresh agent of capacity `n`: steps per second from the
/// first submit to the last success. Then checks the agent left no container or volume.
async fn drover_jobs(coord: &Coordinator, n: usize, steps: usize) -> Result<f64> {
    let label = format!("par{n}");
    let agent = coord
        .spawn_agent(&label, &format!("bench={label}"), n as u32)
        .await?;
    let pipeline = format!(
        "jobs:\n  step:\n    agents: {{ bench: {label} }}\n    steps:\n      - image: {IMAGE}\n        commands: [\"true\"]\n"
    );
    // Warm-up: one job, unmeasured (image into the page cache, connections, the agent's first job).
    let mut client = coord.control().await?;
    let run_id = jobs::submit(&mut client, &pipeline).await?;
    jobs::watch_to_success(&mut client, &run_id, Duration::from_secs(120)).await?;

    let t0 = Instant::now();
    let mut runs = Vec::with_capacity(steps);
    for _ in 0..steps {
        let mut client = client.clone();
        let pipeline = pipeline.clone();
        runs.push(tokio::spawn(async move {
            let run_id = jobs::submit(&mut client, &pipeline).await?;
            jobs::watch_to_success(&mut client, &run_id, Duration::from_secs(300)).await
        }));
    }
    for r in runs {
        r.await.context("a watcher task")??;
    }
    let took = t0.elapsed();
    let filter = format!("label=drover.agent={}", agent.id);
    let left = leftovers(&filter).await?;
    let volumes = docker_lines(&["volume", "ls", "-q", "--filter", &filter]).await?;
    if !left.is_empty() || !volumes.is_empty() {
        bail!(
            "the agent left {} containers and {} volumes behind after its jobs succeeded: {left:?} {volumes:?}",
            left.len(),
            volumes.len()
        );
    }
    Ok(steps as f64 / took.as_secs_f64())
}

/// Containers (running or not) matching a `docker ps` filter.
async fn leftovers(filter: &str) -> Result<Vec<String>> {
    docker_lines(&["ps", "-aq", "--filter", filter]).await
}

async fn docker_lines(args: &[&str]) -> Result<Vec<String>> {
    let out = tokio::process::Command::new("docker")
        .args(args)
        .output()
        .await
        .with_context(|| format!("running docker {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect())
}
