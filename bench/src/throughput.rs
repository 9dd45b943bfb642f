//! `throughput`: completed jobs per second with 1, 8 and 64 simulated agents (capacity 1, one connection
//! each), runs submitted by [`SUBMITTERS`] concurrent clients; beside bare SQLite group commits on the
//! same disk.

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_proto::v1::{GetRunRequest, RunState, SubmitRunRequest};
use futures::StreamExt;

use crate::cluster::Coordinator;
use crate::dispatch::NOOP_PIPELINE;
use crate::fleet::{clock_ticks_per_second, cpu_ticks};
use crate::report::{Figure, Line};
use crate::sim_agent::{start_many, SimReport};
use crate::Opts;

/// Connections of the open-loop load's submits (and of the final check of every run).
const CLIENTS: usize = 16;

/// Submitting clients of a closed load, each on its own connection, each sending its next run once the
/// last one was accepted. Enough that a backlog forms and the agents never wait for work: with 16, each
/// waiting out its SubmitRun's durable commit, the submits were the bottleneck (6,800 jobs/s with 64
/// agents and a fifth of the machine idle) and the figure measured the submit round trip, not the
/// scheduler; 32-128 all gave 8,400-9,500. A backlog is also what exposed a queue-length cost in every
/// run's end (`Metrics::run_changed`), invisible with 16.
const SUBMITTERS: usize = 64;

/// Jobs per transaction of the SQLite floor.
const SQLITE_BATCH: usize = 64;

/// Longest the whole load may take to finish.
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// The open-loop load: runs submitted per second, whatever the coordinator answers.
const OFFERED_RATE: f64 = 5_000.0;

/// Agents serving the open-loop load.
const OFFERED_AGENTS: usize = 64;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let jobs = opts.jobs.unwrap_or(if opts.quick { 2_000 } else { 20_000 });
    let fleets = match opts.agents {
        Some(n) => vec![n.max(1)],
        None => vec![1, 8, 64],
    };
    let mut lines = Vec::new();
    let clk_tck = clock_ticks_per_second().await;
    for agents in fleets {
        let coord = Coordinator::start(&[]).await?;
        let floor_dir = coord.scratch("sqlite-floor")?;
        let floor_jobs = jobs.max(10_000);
        let floor = tokio::task::spawn_blocking(move || sqlite_floor(&floor_dir, floor_jobs))
            .await
            .context("the SQLite floor panicked")??;
        let Load {
            rate,
            coordinator_ticks,
            generator_ticks,
        } = on_one_thread(|| load(&coord, agents, jobs))
            .with_context(|| format!("{agents} agents; coordinator said:\n{}", coord.tail()))?;
        // Where the machine's CPU went: the coordinator's and this process's (the simulated agents and
        // the submitting clients) per job, and the rate both together would allow with every core busy.
        let per_job = |ticks: u64| 1e6 * ticks as f64 / clk_tck / jobs as f64;
        let (coord_us, gen_us) = (per_job(coordinator_ticks), per_job(generator_ticks));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        eprintln!(
            "throughput: {agents} agents, {jobs} jobs: {rate:.0} jobs/s; CPU per job: coordinator \
             {coord_us:.0} us, load generator {gen_us:.0} us; {cores} cores busy allow {:.0} jobs/s",
            cores * 1e6 / (coord_us + gen_us)
        );
        let target = if agents == 64 {
            ">= 10000 jobs/s"
        } else {
            "n/a (64 agents: >= 10000 jobs/s)"
        };
        lines.push(Line::new(
            Figure::new(format!("throughput.{agents}_agents"), rate, "jobs/s"),
            Figure::new("sqlite.group_commit", floor, "jobs/s"),
            target,
        ));
    }
    let offered_secs = if opts.quick { 1.0 } else { 3.0 };
    let echo = crate::echo::round_trips(if opts.quick { 1_000 } else { 5_000 })
        .await
        .context("echo floor")?;
    let coord = Coordinator::start(&[]).await?;
    let at_rate = offered(&coord, OFFERED_RATE, Duration::from_secs_f64(offered_secs))
        .await
        .with_context(|| format!("offered load; coordinator said:\n{}", coord.tail()))?;
    eprintln!(
        "throughput: {OFFERED_RATE} jobs/s offered for {offered_secs} s to {OFFERED_AGENTS} agents: \
         dispatch p50 {:?}, p99 {:?}, {:.0} jobs/s completed",
        at_rate.dispatch.p50(),
        at_rate.dispatch.p99(),
        at_rate.completed_rate
    );
    lines.push(Line::new(
        Figure::us(
            "throughput.dispatch_p99_at_5000_offered",
            at_rate.dispatch.p99(),
        ),
        Figure::us("echo.p99", echo.p99()),
        "<= 1000 us",
    ));
    Ok(lines)
}

/// Runs a closed load's generator (the simulated agents and the submitting clients) on one thread of its
/// own, a current-thread runtime: on two cores shared with the coordinator, the bench's two runtime
/// workers handing tasks to each other cost the generator 70 us of CPU per job against 60 here, and
/// that CPU is the coordinator's loss (measured: docs in BENCHMARKS.md). The open-loop load keeps the
/// multi-thread runtime: its submits must leave on schedule while the agents' tasks run, and one thread
/// doubled the generator's own lateness (p50 100 -> 220 us).
fn on_one_thread<'a, T: Send, F: std::future::Future<Output = Result<T>> + 'a>(
    f: impl FnOnce() -> F + Send + 'a,
) -> Result<T> {
    tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the load generator's runtime")?;
                rt.block_on(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the load generator's thread panicked"))?
        })
    })
}

/// What the open-loop load gave.
struct Offered {
    /// Scheduled submit time -> assignment at an agent, every run.
    dispatch: crate::report::Samples,
    /// Completed jobs per second over the whole load (first submit -> last result).
    completed_rate: f64,
}

/// Open loop: submits one-job runs at `rate` per second for `duration` (each on its schedule, whether or
/// not earlier ones were answered, from [`CLIENTS`] connections) to [`OFFERED_AGENTS`] agents; measures
/// each run's dispatch latency from its scheduled submit time, so a stall counts for every run behind it.
async fn offered(coord: &Coordinator, rate: f64, duration: Duration) -> Result<Offered> {
    let jobs = (rate * duration.as_secs_f64()) as usize;
    let token = coord.token(OFFERED_AGENTS as u32).await?;
    let completed = Arc::new(AtomicU64::new(0));
    let (assigned_tx, mut assigned_rx) = tokio::sync::mpsc::channel(jobs.max(1));
    let report = SimReport {
        completed: completed.clone(),
        assigned_runs: Some(assigned_tx),
        ..Default::default()
    };
    let mut fleet = start_many(&coord.url, &token, OFFERED_AGENTS, 16, report).await?;
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(coord.control().await?);
    }
    let collector = tokio::spawn(async move {
        let mut arrivals = std::collections::HashMap::with_capacity(jobs);
        while let Some((run_id, at)) = assigned_rx.recv().await {
            arrivals.insert(run_id, at);
            if arrivals.len() == jobs {
                break;
            }
        }
        arrivals
    });
    let t0 = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    // A thread of its own keeps the schedule: tokio's timer fires on whole milliseconds, so
    // `sleep_until` sent the runs in bursts of five per millisecond, each up to 1 ms late, and that
    // lateness counted as dispatch latency.
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel();
    let pacer = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || {
            for i in 0..jobs {
                let due = t0 + interval.mul_f64(i as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if due_tx.send((i, due)).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the pacing thread")?;
    let mut submits = Vec::with_capacity(jobs);
    let mut late = Vec::with_capacity(jobs);
    while let Some((i, due)) = due_rx.recv().await {
        late.push(due.elapsed());
        let mut client = clients[i % CLIENTS].clone();
        submits.push(tokio::spawn(async move {
            let id = client
                .submit_run(SubmitRunRequest {
                    pipeline: NOOP_PIPELINE.to_string(),
                    context_digest: String::new(),
                    name: "bench".to_string(),
                })
                .await
                .context("SubmitRun")?
                .into_inner()
                .run_id;
            Ok::<_, anyhow::Error>((id, due))
        }));
    }
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    let late = crate::report::Samples::new(late);
    eprintln!(
        "throughput: open loop: SubmitRun called after its scheduled time by p50 {:?}, p99 {:?} (the \
         load generator's own lateness, part of the dispatch figures)",
        late.p50(),
        late.p99()
    );
    let mut due_of = Vec::with_capacity(jobs);
    for s in submits {
        due_of.push(s.await.context("a submit task panicked")??);
    }
    let deadline = t0 + LOAD_TIMEOUT;
    while completed.load(Ordering::Relaxed) < jobs as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {jobs} offered jobs completed within {LOAD_TIMEOUT:?}",
                completed.load(Ordering::Relaxed)
            );
        }
        for a in &mut fleet {
            a.check_alive()?;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let completed_rate = jobs as f64 / t0.elapsed().as_secs_f64();
    let arrivals = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .context("not every assignment was reported")?
        .context("the assignment collector panicked")?;
    let mut latencies = Vec::with_capacity(jobs);
    for (id, due) in due_of {
        let at = arrivals
            .get(&id)
            .with_context(|| format!("run {id} was never assigned"))?;
        latencies.push(at.saturating_duration_since(due));
    }
    Ok(Offered {
        dispatch: crate::report::Samples::new(latencies),
        completed_rate,
    })
}

/// Attaches `agents` simulated agents, submits `jobs` one-job runs from [`SUBMITTERS`] clients at once and
/// returns completed jobs per second (first submit -> last JobResult sent), after checking every run
/// succeeded.
async fn load(coord: &Coordinator, agents: usize, jobs: usize) -> Result<Load> {
    let token = coord.token(agents as u32).await?;
    let completed = Arc::new(AtomicU64::new(0));
    let report = SimReport {
        completed: completed.clone(),
        ..Default::default()
    };
    let mut fleet = start_many(&coord.url, &token, agents, 16, report).await?;

    let next = Arc::new(AtomicUsize::new(0));
    let pid = coord.pid()?;
    let cpu0 = (cpu_ticks(pid)?, cpu_ticks(std::process::id())?);
    let t0 = Instant::now();
    let mut submitters = Vec::new();
    for _ in 0..SUBMITTERS {
        let mut client = coord.control().await?;
        let next = next.clone();
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let id = client
                    .submit_run(SubmitRunRequest {
                        pipeline: NOOP_PIPELINE.to_string(),
                        context_digest: String::new(),
                        name: "bench".to_string(),
                    })
                    .await
                    .context("SubmitRun")?
                    .into_inner()
                    .run_id;
                ids.push(id);
            }
            Ok::<_, anyhow::Error>(ids)
        }));
    }
    let mut run_ids = Vec::with_capacity(jobs);
    for s in submitters {
        run_ids.extend(s.await.context("a submitting client panicked")??);
    }
    let deadline = t0 + LOAD_TIMEOUT;
    // The agents count results as they send them; a short sleep keeps this loop off the CPU they need.
    while completed.load(Ordering::Relaxed) < jobs as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {jobs} jobs completed within {LOAD_TIMEOUT:?}",
                completed.load(Ordering::Relaxed)
            );
        }
        for a in &mut fleet {
            a.check_alive()?;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = t0.elapsed();
    let cpu1 = (cpu_ticks(pid)?, cpu_ticks(std::process::id())?);
    verify_succeeded(coord, &run_ids).await?;
    Ok(Load {
        rate: jobs as f64 / elapsed.as_secs_f64(),
        coordinator_ticks: cpu1.0.saturating_sub(cpu0.0),
        generator_ticks: cpu1.1.saturating_sub(cpu0.1),
    })
}

/// A closed-loop load's rate, and the CPU (clock ticks) spent on it by each side.
struct Load {
    rate: f64,
    coordinator_ticks: u64,
    generator_ticks: u64,
}

/// Every run must end succeeded (the last results may still be in flight when the clock stops).
async fn verify_succeeded(coord: &Coordinator, run_ids: &[String]) -> Result<()> {
    let client = coord.control().await?;
    let results: Vec<Result<()>> = futures::stream::iter(run_ids.iter().cloned())
        .map(|id| {
            let mut client = client.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let run = client
                        .get_run(GetRunRequest { run_id: id.clone() })
                        .await
                        .context("GetRun")?
                        .into_inner();
                    match run.state() {
                        RunState::Succeeded => return Ok(()),
                        RunState::Running if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        s => bail!("run {id} is {s:?}, expected Succeeded"),
                    }
                }
            }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The floor: per job one insert and one update, committed in transactions of [`SQLITE_BATCH`] jobs
/// (WAL, `synchronous=FULL`, as the coordinator's store), on the coordinator's disk. Returns jobs/s.
fn sqlite_floor(dir: &Path, jobs: usize) -> Result<f64> {
    let mut conn =
        rusqlite::Connection::open(dir.join("floor.db")).context("opening the floor DB")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, name TEXT NOT NULL, \
         state INTEGER NOT NULL, updated_ms INTEGER NOT NULL)",
    )?;
    let t0 = Instant::now();
    let mut id = 0i64;
    while (id as usize) < jobs {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO jobs (id, run_id, name, state, updated_ms) VALUES (?1, ?2, 'noop', 1, ?3)",
            )?;
            let mut update =
                tx.prepare_cached("UPDATE jobs SET state = 3, updated_ms = ?2 WHERE id = ?1")?;
            for _ in 0..SQLITE_BATCH.min(jobs - id as usize) {
                insert.execute(rusqlite::params![id, format!("run-{id}"), id])?;
                update.execute(rusqlite::params![id, id + 1])?;
                id += 1;
            }
        }
        tx.commit()?;
    }
    Ok(jobs as f64 / t0.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::sqlite_floor;

    #[test]
    fn sqlite_floor_commits_every_job() {
        let dir = tempfile::tempdir().unwrap();
        let rate = sqlite_floor(dir.path(), 200).unwrap();
        assert!(rate > 0.0);
        let conn = rusqlite::Connection::open(dir.path().join("floor.db")).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM jobs WHERE state = 3", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 200);
    }
}
