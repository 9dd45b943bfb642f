//! `parallelism`: container steps per second at parallelism 1, 2, 4 and 8. Drover: one-step `true` jobs,
//! all submitted at once to one real agent of capacity N, timed from the first submit to the last run
//! seen succeeded. Floor: `xargs -P N docker run --rm drover-busybox:latest true` over the same count, in
//! the same run. Each level alternates the two sides [`REPS`] times and reports the medians. After each
//! side, no container or volume may be left behind (checked, not assumed).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{run_ok, Coordinator};
use crate::container_step::IMAGE;
use crate::fleet::{clock_ticks_per_second, machine_ticks};
use crate::jobs;
use crate::report::{Figure, Line};
use crate::Opts;

/// Label on the floor's containers.
const LABEL: &str = "drover.bench.parallelism";

/// The parallelism levels measured.
const LEVELS: [usize; 4] = [1, 2, 4, 8];

/// Repetitions of each side per level, alternating (floor, Drover, floor, ...): the medians are
/// printed, the ranges go to stderr. One repetition of each was as noisy as the margin (0.90-1.21x
/// across runs of the same build).
const REPS: usize = 3;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let coord = Coordinator::start(&[]).await?;
    let reps = if opts.quick { 1 } else { REPS };
    let clk_tck = clock_ticks_per_second().await;
    let mut lines = Vec::new();
    for n in LEVELS {
        // Enough steps that each level runs several waves; fewer for a quick look.
        let steps = if opts.quick {
            2 * n.max(2)
        } else {
            6 * n.max(4)
        };
        let agent = DroverSide::start(&coord, n).await?;
        let (mut floor, mut drover) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
        // The whole machine's CPU per step on each side, and how idle it stayed (stderr).
        let (mut floor_cpu, mut drover_cpu) = (Cpu::default(), Cpu::default());
        for i in 0..reps {
            let m0 = machine_ticks()?;
            let f = xargs_floor(n, steps).await.context("xargs floor")?;
            floor_cpu.add(m0, machine_ticks()?);
            let left = leftovers(&format!("label={LABEL}=1")).await?;
            if !left.is_empty() {
                bail!("docker run --rm left {} containers: {left:?}", left.len());
            }
            let m0 = machine_ticks()?;
            let d = agent
                .run(steps)
                .await
                .with_context(|| format!("parallelism {n}"))?;
            drover_cpu.add(m0, machine_ticks()?);
            eprintln!(
                "parallelism: {n}: repetition {}: {steps} steps; drover {d:.2} steps/s, xargs docker \
                 run {f:.2} steps/s",
                i + 1
            );
            floor.push(f);
            drover.push(d);
        }
        let (d, dlo, dhi) = jobs::spread(&drover);
        let (f, flo, fhi) = jobs::spread(&floor);
        eprintln!(
            "parallelism: {n}: medians (ranges) of {reps}: drover {d:.2} ({dlo:.2}-{dhi:.2}), xargs \
             docker run {f:.2} ({flo:.2}-{fhi:.2}) steps/s; the machine's CPU per step: drover {}, \
             xargs docker run {}",
            drover_cpu.show(clk_tck, reps * steps),
            floor_cpu.show(clk_tck, reps * steps)
        );
        lines.push(Line::new(
            Figure::new(format!("parallelism.{n}"), d, "steps/s"),
            Figure::new(format!("xargs_docker_run.{n}"), f, "steps/s"),
            ">= 1.0x",
        ));
    }
    Ok(lines)
}

/// Busy and idle clock ticks of the whole machine, summed over one side's repetitions.
#[derive(Debug, Default)]
struct Cpu {
    busy: u64,
    idle: u64,
}

impl Cpu {
    fn add(&mut self, before: (u64, u64), after: (u64, u64)) {
        self.busy += after.0.saturating_sub(before.0);
        self.idle += after.1.saturating_sub(before.1);
    }

    /// "X ms (Y % idle)" for `steps` steps.
    fn show(&self, clk_tck: f64, steps: usize) -> String {
        let total = (self.busy + self.idle).max(1) as f64;
        format!(
            "{:.0} ms ({:.0} % idle)",
            1e3 * self.busy as f64 / clk_tck / steps.max(1) as f64,
            100.0 * self.idle as f64 / total
        )
    }
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

/// A fresh real agent of capacity N (labelled so only this level's jobs go to it), warmed up with one
/// unmeasured job, and the pipeline that targets it.
struct DroverSide<'a> {
    coord: &'a Coordinator,
    agent: crate::cluster::Agent,
    pipeline: String,
}

impl<'a> DroverSide<'a> {
    async fn start(coord: &'a Coordinator, n: usize) -> Result<DroverSide<'a>> {
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
        Ok(DroverSide {
            coord,
            agent,
            pipeline,
        })
    }

    /// `steps` one-step jobs submitted at once: steps per second from the first submit to the last
    /// success. Then checks the agent left no container or volume.
    async fn run(&self, steps: usize) -> Result<f64> {
        let client = self.coord.control().await?;
        let t0 = Instant::now();
        let mut runs = Vec::with_capacity(steps);
        for _ in 0..steps {
            let mut client = client.clone();
            let pipeline = self.pipeline.clone();
            runs.push(tokio::spawn(async move {
                let run_id = jobs::submit(&mut client, &pipeline).await?;
                jobs::watch_to_success(&mut client, &run_id, Duration::from_secs(300)).await
            }));
        }
        for r in runs {
            r.await.context("a watcher task")??;
        }
        let took = t0.elapsed();
        let filter = format!("label=drover.agent={}", self.agent.id);
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
}

/// Containers (running or not) matching a `docker ps` filter.
async fn leftovers(filter: &str) -> Result<Vec<String>> {
    docker_lines(&["ps", "-aq", "--filter", filter]).await
}

async fn docker_lines(args: &[&str]) -> Result<Vec<String>> {
    let out = run_ok(
        tokio::process::Command::new("docker").args(args),
        &format!("docker {}", args.join(" ")),
    )
    .await?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}
