//! The seeded fault suite: about a hundred jobs in runs submitted over a minute, while a schedule drawn
//! from one seed kills, freezes and partitions agents and kills the coordinator once; then every
//! DESIGN.md invariant the API and Docker can show is checked.
//!
//! The seed is printed first; `DROVER_FAULT_SEED=N` replays the same pipelines and the same fault
//! schedule (the timing of the real processes around them still varies).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_proto::v1::{FailureClass, GetRunRequest, Job, JobState, Run, RunState};
use drover_tests::{job_state_is_terminal, run_violations, Cluster, IMAGE};

/// 1 + the coordinator's default infrastructure retry budget (2).
const MAX_ATTEMPTS: u32 = 3;
/// The agent attached directly, then the two attached through proxies.
const DIRECT: &str = "direct";
const PROXIED: [&str; 2] = ["via-a", "via-b"];
const AGENTS: [&str; 3] = [DIRECT, PROXIED[0], PROXIED[1]];
const TOTAL_JOBS: usize = 100;
/// Runs are submitted over this window, from t = 0.
const SUBMIT_WINDOW_MS: u64 = 55_000;
/// Agent faults start in this window.
const FAULT_START_MS: u64 = 4_000;
const FAULT_END_MS: u64 = 70_000;
/// The coordinator is killed once, somewhere in here.
const COORDINATOR_KILL_MS: (u64, u64) = (20_000, 50_000);
/// How long after the schedule every run must have finished.
const FINISH_TIMEOUT: Duration = Duration::from_secs(150);
/// How long one stored log may take to read.
const LOG_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an agent has to drain and exit on SIGTERM once every run is over.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// SplitMix64: tiny, and the same sequence for a seed on every platform and toolchain, which is what
/// a replayable schedule needs (a library RNG may change its algorithm between versions).
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next_u64() % items.len() as u64) as usize]
    }
}

fn seed() -> u64 {
    match std::env::var("DROVER_FAULT_SEED") {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            panic!("DROVER_FAULT_SEED={s:?} is not an unsigned 64-bit integer")
        }),
        Err(_) => {
            // RandomState is seeded from the OS; the clock and pid only add to it.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            h.write_u32(std::process::id());
            h.finish()
        }
    }
}

/// One step as planned: prints a start line, `seq 1 N`, sleeps, then prints a done line or fails.
#[derive(Debug, Clone)]
struct StepModel {
    name: String,
    tag: String,
    seq_n: u64,
    sleep_s: u64,
    fails: bool,
}

impl StepModel {
    fn commands(&self) -> Vec<String> {
        let mut c = vec![format!("echo {} start", self.tag)];
        if self.seq_n > 0 {
            c.push(format!("seq 1 {}", self.seq_n));
        }
        if self.sleep_s > 0 {
            c.push(format!("sleep {}", self.sleep_s));
        }
        if self.fails {
            c.push(format!("echo {} failing", self.tag));
            c.push("exit 1".into());
        } else {
            c.push(format!("echo {} done", self.tag));
        }
        c
    }

    /// Exactly what the step writes.
    fn expected_log(&self) -> Vec<u8> {
        let mut out = format!("{} start\n", self.tag).into_bytes();
        for i in 1..=self.seq_n {
            out.extend_from_slice(format!("{i}\n").as_bytes());
        }
        let last = if self.fails { "failing" } else { "done" };
        out.extend_from_slice(format!("{} {last}\n", self.tag).as_bytes());
        out
    }
}

/// One job as planned; `fails` means its last step exits 1.
#[derive(Debug, Clone)]
struct JobModel {
    name: String,
    needs: Vec<String>,
    steps: Vec<StepModel>,
    fails: bool,
}

#[derive(Debug, Clone)]
struct RunModel {
    index: usize,
    submit_at_ms: u64,
    jobs: Vec<JobModel>,
}

impl RunModel {
    fn pipeline(&self) -> String {
        let mut y = String::from("jobs:\n");
        for j in &self.jobs {
            y.push_str(&format!("  {}:\n", j.name));
            if !j.needs.is_empty() {
                y.push_str(&format!("    needs: [{}]\n", j.needs.join(", ")));
            }
            y.push_str("    steps:\n");
            for s in &j.steps {
                y.push_str(&format!(
                    "      - name: {}\n        image: {IMAGE}\n        commands:\n",
                    s.name
                ));
                for c in s.commands() {
                    y.push_str(&format!("          - \"{c}\"\n"));
                }
            }
        }
        y
    }
}

/// Log sizes from nothing to ~700 KB, weighted towards small.
fn seq_size(rng: &mut Rng) -> u64 {
    match rng.range(0, 99) {
        0..=19 => 0,
        20..=54 => rng.range(1, 20),
        55..=79 => rng.range(200, 2_000),
        80..=94 => rng.range(5_000, 30_000),
        _ => rng.range(60_000, 120_000),
    }
}

fn plan_runs(rng: &mut Rng) -> Vec<RunModel> {
    let mut runs = Vec::new();
    let mut total = 0;
    while total < TOTAL_JOBS {
        let index = runs.len();
        let n = (rng.range(3, 7) as usize).min(TOTAL_JOBS - total);
        let mut jobs: Vec<JobModel> = Vec::new();
        for ji in 0..n {
            let name = format!("j{ji}");
            let mut needs = Vec::new();
            if ji > 0 && rng.chance(45) {
                for _ in 0..rng.range(1, 2) {
                    let need = format!("j{}", rng.range(0, ji as u64 - 1));
                    if !needs.contains(&need) {
                        needs.push(need);
                    }
                }
            }
            let fails = rng.chance(10);
            let step_count = if rng.chance(15) { 3 } else { rng.range(1, 2) };
            let steps = (0..step_count)
                .map(|si| StepModel {
                    name: format!("s{si}"),
                    tag: format!("r{index}/{name}/s{si}"),
                    seq_n: seq_size(rng),
                    sleep_s: rng.range(0, 2),
                    fails: fails && si == step_count - 1,
                })
                .collect();
            jobs.push(JobModel {
                name,
                needs,
                steps,
                fails,
            });
        }
        total += n;
        runs.push(RunModel {
            index,
            submit_at_ms: 0,
            jobs,
        });
    }
    let mut times: Vec<u64> = (0..runs.len())
        .map(|i| {
            if i == 0 {
                0
            } else {
                rng.range(0, SUBMIT_WINDOW_MS)
            }
        })
        .collect();
    times.sort_unstable();
    for (r, t) in runs.iter_mut().zip(times) {
        r.submit_at_ms = t;
    }
    runs
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum FaultKind {
    Kill,
    Stop,
    Cut,
    Blackhole,
    CoordinatorKill,
}

#[derive(Debug, Clone)]
enum Action {
    Submit(usize),
    KillAgent(&'static str),
    RestartAgent(&'static str),
    StopAgent(&'static str),
    ContAgent(&'static str),
    Cut(&'static str),
    Blackhole(&'static str),
    Restore(&'static str),
    /// Kill -9, stay down this long, restart on the same port and data.
    KillCoordinator(Duration),
}

#[derive(Debug, Clone)]
struct Event {
    at_ms: u64,
    action: Action,
}

/// The fault schedule: faults on one agent never overlap, so a restart never waits on a cut proxy;
/// the first four faults are one of each agent fault kind so every seed exercises all of them.
fn plan_faults(rng: &mut Rng) -> Vec<Event> {
    let mut events = vec![Event {
        at_ms: rng.range(COORDINATOR_KILL_MS.0, COORDINATOR_KILL_MS.1),
        action: Action::KillCoordinator(Duration::from_millis(rng.range(300, 1_500))),
    }];
    let mut free_at: HashMap<&'static str, u64> = AGENTS.iter().map(|a| (*a, 0)).collect();
    let order = [
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::Cut,
        FaultKind::Blackhole,
    ];
    let mut planned = 0usize;
    let mut t = FAULT_START_MS;
    loop {
        t += rng.range(1_500, 5_000);
        if t > FAULT_END_MS {
            break;
        }
        let kind = if planned < order.len() {
            order[planned]
        } else {
            *rng.pick(&order)
        };
        let eligible: Vec<&'static str> = match kind {
            FaultKind::Cut | FaultKind::Blackhole => PROXIED.to_vec(),
            _ => AGENTS.to_vec(),
        }
        .into_iter()
        .filter(|a| free_at[a] <= t)
        .collect();
        if eligible.is_empty() {
            continue;
        }
        let agent = *rng.pick(&eligible);
        let dur = rng.range(1_000, 5_000);
        let (busy_until, pair) = match kind {
            FaultKind::Kill => {
                let back = t + rng.range(500, 3_000);
                (
                    back + 3_000,
                    [
                        (t, Action::KillAgent(agent)),
                        (back, Action::RestartAgent(agent)),
                    ],
                )
            }
            FaultKind::Stop => (
                t + dur + 1_000,
                [
                    (t, Action::StopAgent(agent)),
                    (t + dur, Action::ContAgent(agent)),
                ],
            ),
            FaultKind::Cut => (
                t + dur + 1_000,
                [(t, Action::Cut(agent)), (t + dur, Action::Restore(agent))],
            ),
            FaultKind::Blackhole => (
                t + dur + 1_000,
                [
                    (t, Action::Blackhole(agent)),
                    (t + dur, Action::Restore(agent)),
                ],
            ),
            FaultKind::CoordinatorKill => unreachable!("planned above, once"),
        };
        free_at.insert(agent, busy_until);
        events.extend(
            pair.into_iter()
                .map(|(at_ms, action)| Event { at_ms, action }),
        );
        planned += 1;
    }
    events
}

/// What the monitor remembers of a job once it is terminal; none of it may change afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settled {
    state: JobState,
    failure: FailureClass,
    exit_code: i32,
    attempt_id: String,
    attempts: u32,
    agent_id: String,
    finished_ms: i64,
}

impl Settled {
    fn of(j: &Job) -> Settled {
        Settled {
            state: j.state(),
            failure: j.failure(),
            exit_code: j.exit_code,
            attempt_id: j.attempt_id.clone(),
            attempts: j.attempts,
            agent_id: j.agent_id.clone(),
            finished_ms: j.finished_ms,
        }
    }
}

/// Watches every submitted run while the faults go on and reports any job that changes after reaching
/// a terminal state (a second commitment: invariants 1 and 3).
#[derive(Debug, Clone, Default)]
struct Monitor {
    run_ids: Arc<Mutex<Vec<String>>>,
    settled: Arc<Mutex<HashMap<(String, String), Settled>>>,
    violations: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Monitor {
    /// Records a run's jobs; called by the poller and by the final checks.
    fn observe(&self, run: &Run) {
        // Short critical sections on std mutexes, never across an await.
        let mut settled = self.settled.lock().expect("monitor lock");
        for j in &run.jobs {
            if !job_state_is_terminal(j.state()) {
                if let Some(before) = settled.get(&(run.id.clone(), j.name.clone())) {
                    self.violations.lock().expect("monitor lock").push(format!(
                        "run {} job {}: left its terminal state {:?} for {:?} (attempt {} -> {})",
                        run.id,
                        j.name,
                        before.state,
                        j.state(),
                        before.attempt_id,
                        j.attempt_id
                    ));
                }
                continue;
            }
            let now = Settled::of(j);
            match settled.get(&(run.id.clone(), j.name.clone())) {
                Some(before) if *before != now => {
                    self.violations.lock().expect("monitor lock").push(format!(
                        "run {} job {}: changed after ending: {before:?} -> {now:?}",
                        run.id, j.name
                    ));
                }
                Some(_) => {}
                None => {
                    settled.insert((run.id.clone(), j.name.clone()), now);
                }
            }
        }
    }

    async fn poll(self, addr: String, token: String) {
        let mut client: Option<drover_tests::Control> = None;
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let c = match &mut client {
                Some(c) => c,
                None => match drover_tests::connect_control(&addr, &token).await {
                    Ok(c) => client.insert(c),
                    // The coordinator is being restarted.
                    Err(_) => continue,
                },
            };
            let ids = self.run_ids.lock().expect("monitor lock").clone();
            for id in ids {
                match c.get_run(GetRunRequest { run_id: id }).await {
                    Ok(r) => self.observe(&r.into_inner()),
                    Err(_) => {
                        client = None;
                        break;
                    }
                }
            }
        }
    }
}

/// Counts for the summary line.
#[derive(Debug, Default)]
struct Outcomes {
    succeeded: usize,
    failed_script: usize,
    skipped: usize,
    lost: usize,
    retried: usize,
    max_attempts: u32,
    logs_checked: usize,
    /// Logs identical but for explicit restart markers where an agent was down.
    logs_gap_marked: usize,
    log_bytes: usize,
}

/// Runs a blocking harness call (process spawn and wait, stderr line wait) without stalling the
/// runtime worker, whose queued tasks include the proxies' forwarding.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_faults_keep_every_invariant() {
    let seed = seed();
    eprintln!(
        "fault suite seed = {seed} (replay: DROVER_FAULT_SEED={seed} cargo nextest run -p drover-tests --test fault_suite)"
    );
    let image = std::process::Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .expect("running docker");
    assert!(
        image.status.success(),
        "the test image {IMAGE} is missing: run scripts/build-image"
    );

    let mut rng = Rng(seed);
    let runs = plan_runs(&mut rng);
    let mut events: Vec<Event> = runs
        .iter()
        .map(|r| Event {
            at_ms: r.submit_at_ms,
            action: Action::Submit(r.index),
        })
        .collect();
    events.extend(plan_faults(&mut rng));
    // Stable: at equal times a submit (listed first) goes before a fault.
    events.sort_by_key(|e| e.at_ms);
    eprintln!(
        "fault suite plan: {} runs, {} jobs, {} events",
        runs.len(),
        runs.iter().map(|r| r.jobs.len()).sum::<usize>(),
        events.len()
    );

    let mut cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "3s", "--heartbeat-interval", "500ms"])
        .agent_with_capacity(DIRECT, "os=linux", 2)
        .agent_via_proxy(PROXIED[0], "os=linux", 2)
        .agent_via_proxy(PROXIED[1], "os=linux", 2)
        .start()
        .await
        .expect("starting the cluster");

    let monitor = Monitor::default();
    let poller = tokio::spawn(
        monitor
            .clone()
            .poll(cluster.addr.clone(), cluster.admin_token.clone()),
    );
    let mut violations: Vec<String> = Vec::new();
    let mut injected: BTreeMap<FaultKind, usize> = BTreeMap::new();
    let mut run_ids: Vec<Option<String>> = vec![None; runs.len()];

    // The schedule, in order; one event at a time so a restart never races a submit or another fault.
    let t0 = Instant::now();
    for ev in &events {
        tokio::time::sleep_until((t0 + Duration::from_millis(ev.at_ms)).into()).await;
        let at = t0.elapsed().as_secs_f64();
        match &ev.action {
            Action::Submit(i) => {
                let yaml = runs[*i].pipeline();
                let id = match cluster.submit(&yaml).await {
                    Ok(id) => id,
                    Err(first) => {
                        // The coordinator is up (its restart is one event), so a retry is safe.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        cluster.submit(&yaml).await.unwrap_or_else(|e| {
                            panic!("seed {seed}: submitting run #{i} failed twice: {first:#} / {e:#}\n{yaml}")
                        })
                    }
                };
                eprintln!("[fault suite {at:6.2}s] submitted run #{i} as {id}");
                monitor
                    .run_ids
                    .lock()
                    .expect("monitor lock")
                    .push(id.clone());
                run_ids[*i] = Some(id);
            }
            Action::KillAgent(a) => {
                eprintln!("[fault suite {at:6.2}s] kill -9 agent {a}");
                blocking(|| cluster.kill_agent(a));
                *injected.entry(FaultKind::Kill).or_default() += 1;
            }
            Action::RestartAgent(a) => {
                eprintln!("[fault suite {at:6.2}s] restart agent {a}");
                if let Err(e) = blocking(|| cluster.restart_agent(a)) {
                    violations.push(format!(
                        "agent {a} did not attach again after a restart: {e:#}"
                    ));
                }
            }
            Action::StopAgent(a) => {
                eprintln!("[fault suite {at:6.2}s] SIGSTOP agent {a}");
                if blocking(|| cluster.stop_agent(a)).expect("kill -STOP") {
                    *injected.entry(FaultKind::Stop).or_default() += 1;
                }
            }
            Action::ContAgent(a) => {
                eprintln!("[fault suite {at:6.2}s] SIGCONT agent {a}");
                blocking(|| cluster.cont_agent(a)).expect("kill -CONT");
            }
            Action::Cut(a) => {
                eprintln!("[fault suite {at:6.2}s] cut the network of agent {a}");
                cluster.proxy(a).expect("proxied agent").cut();
                *injected.entry(FaultKind::Cut).or_default() += 1;
            }
            Action::Blackhole(a) => {
                eprintln!("[fault suite {at:6.2}s] blackhole the network of agent {a}");
                cluster.proxy(a).expect("proxied agent").blackhole();
                *injected.entry(FaultKind::Blackhole).or_default() += 1;
            }
            Action::Restore(a) => {
                eprintln!("[fault suite {at:6.2}s] restore the network of agent {a}");
                cluster.proxy(a).expect("proxied agent").restore();
            }
            Action::KillCoordinator(down) => {
                eprintln!("[fault suite {at:6.2}s] kill -9 the coordinator for {down:?}");
                blocking(|| cluster.kill_coordinator());
                tokio::time::sleep(*down).await;
                blocking(|| cluster.restart_coordinator()).unwrap_or_else(|e| {
                    panic!("seed {seed}: the coordinator did not come back after kill -9: {e:#}")
                });
                *injected.entry(FaultKind::CoordinatorKill).or_default() += 1;
            }
        }
    }
    eprintln!(
        "[fault suite {:6.2}s] schedule done; waiting for every run to finish",
        t0.elapsed().as_secs_f64()
    );

    // Every run must finish; the coordinator answers again by now, but tolerate a hiccup.
    let deadline = Instant::now() + FINISH_TIMEOUT;
    let mut finals: Vec<Option<Run>> = vec![None; runs.len()];
    loop {
        for (i, id) in run_ids.iter().enumerate() {
            let Some(id) = id else { continue };
            if finals[i]
                .as_ref()
                .is_some_and(|r| r.state() != RunState::Running)
            {
                continue;
            }
            if let Ok(r) = cluster.run(id).await {
                finals[i] = Some(r);
            }
        }
        let unfinished: Vec<String> = finals
            .iter()
            .zip(&run_ids)
            .filter(|(r, _)| r.as_ref().is_none_or(|r| r.state() == RunState::Running))
            .map(|(r, id)| {
                let jobs = r
                    .as_ref()
                    .map(|r| {
                        r.jobs
                            .iter()
                            .filter(|j| !job_state_is_terminal(j.state()))
                            .map(|j| {
                                format!(
                                    "{}={:?} agent {} attempt {} ({} attempts) reason {:?}",
                                    j.name,
                                    j.state(),
                                    j.agent_id,
                                    j.attempt_id,
                                    j.attempts,
                                    j.reason
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_else(|| "never read".into());
                format!("{}: {jobs}", id.as_deref().unwrap_or("not submitted"))
            })
            .collect();
        if unfinished.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for u in unfinished {
                violations.push(format!(
                    "run not finished {FINISH_TIMEOUT:?} after the schedule: {u}"
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    eprintln!(
        "[fault suite {:6.2}s] runs finished; checking",
        t0.elapsed().as_secs_f64()
    );

    // Per run: the API-visible invariants, then each job against what the plan says it must be.
    let mut out = Outcomes::default();
    for (model, run) in runs.iter().zip(&finals) {
        let Some(run) = run else { continue };
        monitor.observe(run);
        violations.extend(run_violations(run, MAX_ATTEMPTS));
        for jm in &model.jobs {
            let Some(j) = run.jobs.iter().find(|j| j.name == jm.name) else {
                violations.push(format!("run {} lacks job {}", run.id, jm.name));
                continue;
            };
            let at = format!("run {} (#{}) job {}", run.id, model.index, j.name);
            out.max_attempts = out.max_attempts.max(j.attempts);
            if j.attempts > 1 {
                out.retried += 1;
            }
            let needs_ok = jm.needs.iter().all(|n| {
                run.jobs
                    .iter()
                    .any(|o| &o.name == n && o.state() == JobState::Succeeded)
            });
            let lost = matches!(
                (j.state(), j.failure()),
                (JobState::Lost | JobState::Failed, FailureClass::AgentLost)
            );
            if !needs_ok {
                if j.state() == JobState::Skipped {
                    out.skipped += 1;
                } else {
                    violations.push(format!(
                        "{at}: a job it needs did not succeed, expected SKIPPED, saw {:?}",
                        j.state()
                    ));
                }
                continue;
            }
            if lost {
                // Allowed when its agent died more often than the retry budget covers; counted.
                out.lost += 1;
                eprintln!(
                    "fault suite: {at} ended {:?}/{:?} after {} attempts: {}",
                    j.state(),
                    j.failure(),
                    j.attempts,
                    j.reason
                );
                continue;
            }
            let expect_state = if jm.fails {
                JobState::Failed
            } else {
                JobState::Succeeded
            };
            if j.state() != expect_state {
                violations.push(format!(
                    "{at}: expected {expect_state:?}, saw {:?} failure {:?} exit code {} reason {:?} (attempts {}, agent {})",
                    j.state(),
                    j.failure(),
                    j.exit_code,
                    j.reason,
                    j.attempts,
                    j.agent_id
                ));
                continue;
            }
            if jm.fails {
                if j.failure() != FailureClass::Script || j.exit_code != 1 {
                    violations.push(format!(
                        "{at}: expected failure SCRIPT with exit code 1, saw {:?} with {} ({:?})",
                        j.failure(),
                        j.exit_code,
                        j.reason
                    ));
                }
                out.failed_script += 1;
            } else {
                out.succeeded += 1;
            }
            // Every step ran (the failing one is the last): each stored log must be exactly its output.
            for (si, sm) in jm.steps.iter().enumerate() {
                if let Some(st) = j.steps.get(si) {
                    let want = if sm.fails {
                        (JobState::Failed, 1)
                    } else {
                        (JobState::Succeeded, 0)
                    };
                    if (st.state(), st.exit_code) != want {
                        violations.push(format!(
                            "{at} step {}: expected {want:?}, saw ({:?}, {})",
                            sm.name,
                            st.state(),
                            st.exit_code
                        ));
                    }
                }
                let expected = sm.expected_log();
                match tokio::time::timeout(LOG_TIMEOUT, cluster.log(&run.id, &j.name, &sm.name))
                    .await
                {
                    Err(_) => violations.push(format!(
                        "{at} step {}: stored log not complete within {LOG_TIMEOUT:?}",
                        sm.name
                    )),
                    Ok(Err(e)) => violations.push(format!(
                        "{at} step {}: reading the stored log failed: {e:#}",
                        sm.name
                    )),
                    Ok(Ok(got)) if got != expected && !gap_marked_match(&expected, &got) => {
                        violations.push(format!(
                            "{at} step {}: stored log differs from the output ({})",
                            sm.name,
                            describe_diff(&expected, &got)
                        ))
                    }
                    Ok(Ok(got)) if got != expected => {
                        // Output written while no agent was attached is gone; the log says so.
                        out.logs_gap_marked += 1;
                        out.log_bytes += got.len();
                    }
                    Ok(Ok(got)) => {
                        out.logs_checked += 1;
                        out.log_bytes += got.len();
                    }
                }
            }
        }
    }

    // Nothing leaks: stop every agent cleanly, start each again so its reaper runs, then look.
    monitor.stop.store(true, Ordering::Relaxed);
    let _ = poller.await;
    for a in AGENTS {
        match blocking(|| cluster.terminate_agent(a, DRAIN_GRACE)) {
            Ok(Some(status)) if !status.success() => {
                violations.push(format!("agent {a} exited with {status} on SIGTERM"))
            }
            Ok(_) => {}
            Err(e) => violations.push(format!("agent {a} did not stop cleanly: {e:#}")),
        }
    }
    for a in AGENTS {
        if let Err(e) = blocking(|| cluster.restart_agent(a)) {
            violations.push(format!(
                "agent {a} did not attach again for the final reap: {e:#}"
            ));
        }
    }
    let leak_deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = blocking(|| cluster.leftovers());
        if left.is_empty() {
            break;
        }
        if Instant::now() > leak_deadline {
            violations.push(format!(
                "leaked after a clean stop and a reaper restart: {left:?}"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Nothing changed after the end: no late result of a stale attempt got committed.
    for id in run_ids.iter().flatten() {
        match cluster.run(id).await {
            Ok(r) => monitor.observe(&r),
            Err(e) => violations.push(format!("run {id} unreadable at the end: {e:#}")),
        }
    }
    violations.extend(monitor.violations.lock().expect("monitor lock").drain(..));

    let proxies: Vec<String> = PROXIED
        .iter()
        .map(|p| {
            let s = cluster.proxy(p).expect("proxied agent").stats();
            format!(
                "{p}: {} conns, {} cut, {} refused, {} B up, {} B down",
                s.accepted, s.cut_connections, s.refused, s.bytes_to_target, s.bytes_from_target
            )
        })
        .collect();
    eprintln!(
        "fault suite summary: seed {seed}; {:.1} s; faults: {} agent kills, {} SIGSTOPs, {} network cuts, {} blackholes, {} coordinator kills; jobs: {} succeeded, {} failed (script, as planned), {} skipped, {} lost (allowed), {} retried, max {} attempts; {} logs byte-identical, {} identical but for an explicit agent-restart gap marker ({} bytes in all); proxies: {}; {} violations",
        t0.elapsed().as_secs_f64(),
        injected.get(&FaultKind::Kill).unwrap_or(&0),
        injected.get(&FaultKind::Stop).unwrap_or(&0),
        injected.get(&FaultKind::Cut).unwrap_or(&0),
        injected.get(&FaultKind::Blackhole).unwrap_or(&0),
        injected.get(&FaultKind::CoordinatorKill).unwrap_or(&0),
        out.succeeded,
        out.failed_script,
        out.skipped,
        out.lost,
        out.retried,
        out.max_attempts,
        out.logs_checked,
        out.logs_gap_marked,
        out.log_bytes,
        proxies.join("; "),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "seed {seed}: {} invariant violations (replay: DROVER_FAULT_SEED={seed}):\n  {}",
        violations.len(),
        violations.join("\n  ")
    );
}

/// Where two logs first differ, with a little context, for the failure message.
/// The marker an agent writes into a step's log when it re-adopts a container after a restart.
const RESTART_MARKER: &[u8] = b"\n[drover] agent restarted: ";

/// True when `got` is `expected` with explicit restart markers standing in for bytes the step wrote
/// while no agent was attached: the pieces between markers appear in `expected` in order, the first at
/// its start and the last at its end, and nothing else differs.
fn gap_marked_match(expected: &[u8], got: &[u8]) -> bool {
    let mut pieces = Vec::new();
    let mut rest = got;
    while let Some(i) = find(rest, RESTART_MARKER) {
        pieces.push(&rest[..i]);
        let after = &rest[i + RESTART_MARKER.len()..];
        match after.iter().position(|&b| b == b'\n') {
            Some(end) => rest = &after[end + 1..],
            None => return false,
        }
    }
    if pieces.is_empty() {
        return false;
    }
    pieces.push(rest);
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !expected.starts_with(first) || !expected.ends_with(last) {
        return false;
    }
    let mut pos = first.len();
    for piece in &pieces[1..pieces.len() - 1] {
        match find(&expected[pos..], piece) {
            Some(i) => pos += i + piece.len(),
            None => return false,
        }
    }
    pos + last.len() <= expected.len()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn describe_diff(expected: &[u8], got: &[u8]) -> String {
    let at = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    let around = |b: &[u8]| {
        let lo = at.saturating_sub(20);
        let hi = (at + 20).min(b.len());
        String::from_utf8_lossy(&b[lo.min(hi)..hi]).into_owned()
    };
    format!(
        "expected {} bytes, got {}; first difference at byte {at}: expected {:?}, got {:?}",
        expected.len(),
        got.len(),
        around(expected),
        around(got)
    )
}

#[test]
fn the_plan_is_a_function_of_the_seed() {
    let a = plan_runs(&mut Rng(42));
    let b = plan_runs(&mut Rng(42));
    assert_eq!(
        a.iter().map(RunModel::pipeline).collect::<Vec<_>>(),
        b.iter().map(RunModel::pipeline).collect::<Vec<_>>()
    );
    assert_eq!(a.iter().map(|r| r.jobs.len()).sum::<usize>(), TOTAL_JOBS);
    let faults = plan_faults(&mut Rng(42));
    let kinds = |f: &[Event]| {
        f.iter()
            .map(|e| format!("{}:{:?}", e.at_ms, e.action))
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&faults), kinds(&plan_faults(&mut Rng(42))));
    for k in [
        "KillAgent",
        "StopAgent",
        "Cut",
        "Blackhole",
        "KillCoordinator",
    ] {
        assert!(
            faults
                .iter()
                .any(|e| format!("{:?}", e.action).starts_with(k)),
            "no {k} in {faults:?}"
        );
    }
}

#[test]
fn expected_logs_match_what_the_commands_print() {
    let s = StepModel {
        name: "s0".into(),
        tag: "r1/j2/s0".into(),
        seq_n: 3,
        sleep_s: 1,
        fails: true,
    };
    assert_eq!(
        s.commands(),
        [
            "echo r1/j2/s0 start",
            "seq 1 3",
            "sleep 1",
            "echo r1/j2/s0 failing",
            "exit 1"
        ]
    );
    assert_eq!(
        s.expected_log(),
        b"r1/j2/s0 start\n1\n2\n3\nr1/j2/s0 failing\n"
    );
}

/// The gap-marker comparison accepts only the expected bytes with markers standing in for missing
/// pieces: a marker hiding a changed or duplicated byte is still a violation.
#[test]
fn gap_marked_logs_must_otherwise_match() {
    let expected = b"a start\n1\n2\n3\n4\na done\n";
    let marker = "\n[drover] agent restarted: output the step wrote after byte 10 while no agent was attached may be missing\n";
    let ok = format!("a start\n1\n{marker}3\n4\na done\n");
    assert!(gap_marked_match(expected, ok.as_bytes()));
    let twice = format!("a start\n{marker}2\n{marker}a done\n");
    assert!(gap_marked_match(expected, twice.as_bytes()));
    let changed = format!("a start\n1\n{marker}3\n5\na done\n");
    assert!(!gap_marked_match(expected, changed.as_bytes()));
    let duplicated = format!("a start\n1\n2\n{marker}2\n3\n4\na done\n");
    assert!(!gap_marked_match(expected, duplicated.as_bytes()));
    assert!(
        !gap_marked_match(expected, b"a start\n1\n2\n3\n4\na done\n"),
        "no marker: must be equal"
    );
}
