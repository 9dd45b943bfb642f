//! Prometheus metrics of the coordinator.
//!
//! Two kinds: counters and histograms updated on the hot path (atomics inside `prometheus-client`, plus
//! one short std-mutex section per committed change to remember when jobs were queued and steps started),
//! and gauges computed at scrape time from a [`FleetView`] of the engine's state (queue depth and age per
//! label set, jobs and agents by state), so they can never drift from the truth.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use drover_proto::v1 as pb;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::engine::model::{RunRec, Status};
use crate::engine::pacing::Pace;
use crate::engine::why::{failure_name, selector_string, FleetView};

/// Label set of a family: `(name, value)` pairs.
type Labels = Vec<(String, String)>;

/// Distinct selectors remembered so that their queue gauges report 0 once drained; bounded because
/// selectors come from user pipelines.
const MAX_REMEMBERED_SELECTORS: usize = 1024;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The coordinator's metrics registry and its hot-path handles. Shared by the engine and the HTTP side.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    dispatch_latency: Histogram,
    jobs_finished: Family<Labels, Counter>,
    step_duration: Histogram,
    log_bytes: Counter,
    artifact_bytes: Counter,
    store_commit: Histogram,
    queue_depth: Family<Labels, Gauge>,
    queue_oldest: Family<Labels, Gauge<f64, AtomicU64>>,
    jobs: Family<Labels, Gauge>,
    agents: Family<Labels, Gauge>,
    heartbeat_interval: Gauge<f64, AtomicU64>,
    lease_ttl: Gauge<f64, AtomicU64>,
    tracking: Mutex<Tracking>,
    /// Serialises scrapes: each one clears and refills the scrape-time gauges.
    scrape: Mutex<()>,
}

#[derive(Debug, Default)]
struct Tracking {
    /// (run id, job) -> unix ms it entered the queue (this coordinator process saw it).
    queued_since: HashMap<(String, String), i64>,
    /// (attempt id, step index) -> when the step started.
    step_started: HashMap<(String, u32), Instant>,
    /// Selectors that have had queued jobs.
    selectors: BTreeSet<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Sections under these locks only touch maps and do not panic; recover rather than wedge metrics.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every `drover_*` family registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        // 1 ms .. ~65 s.
        let dispatch_latency = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        // 0.1 s .. ~3.6 h.
        let step_duration = Histogram::new(exponential_buckets(0.1, 2.0, 18));
        // 0.1 ms .. ~3.3 s.
        let store_commit = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let m = Metrics {
            dispatch_latency,
            jobs_finished: Family::default(),
            step_duration,
            log_bytes: Counter::default(),
            artifact_bytes: Counter::default(),
            store_commit,
            queue_depth: Family::default(),
            queue_oldest: Family::default(),
            jobs: Family::default(),
            agents: Family::default(),
            heartbeat_interval: Gauge::default(),
            lease_ttl: Gauge::default(),
            tracking: Mutex::new(Tracking::default()),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "drover_queue_depth",
            "Jobs ready to run and waiting for an agent, per agent label selector (the autoscaling signal)",
            m.queue_depth.clone(),
        );
        registry.register(
            "drover_queue_oldest_age_seconds",
            "Age of the oldest job waiting for an agent, per agent label selector (0 when none)",
            m.queue_oldest.clone(),
        );
        registry.register(
            "drover_dispatch_latency_seconds",
            "Time from a job entering the queue to its assignment being pushed to an agent",
            m.dispatch_latency.clone(),
        );
        registry.register(
            "drover_jobs_finished",
            "Jobs that reached a terminal state, by state and failure class",
            m.jobs_finished.clone(),
        );
        registry.register(
            "drover_jobs",
            "Jobs of unfinished runs by state (waiting = needs unmet, queued = waiting for an agent, running)",
            m.jobs.clone(),
        );
        registry.register(
            "drover_agents",
            "Enrolled agents by state (connected, disconnected, revoked)",
            m.agents.clone(),
        );
        registry.register(
            "drover_heartbeat_interval_seconds",
            "Heartbeat interval the coordinator tells its agents now (stretched as the fleet grows)",
            m.heartbeat_interval.clone(),
        );
        registry.register(
            "drover_lease_ttl_seconds",
            "Silence after which an agent is declared lost and its jobs placed again, at that interval",
            m.lease_ttl.clone(),
        );
        registry.register(
            "drover_step_duration_seconds",
            "Wall time of steps from their start to their end, as reported by agents",
            m.step_duration.clone(),
        );
        registry.register(
            "drover_log_bytes",
            "Step log bytes received from agents (resent bytes included)",
            m.log_bytes.clone(),
        );
        registry.register(
            "drover_artifact_bytes",
            "Artifact bytes received from agents",
            m.artifact_bytes.clone(),
        );
        registry.register(
            "drover_store_commit_seconds",
            "Latency of one store transaction (a batch of state changes)",
            m.store_commit.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count log bytes received from an agent.
    pub fn log_bytes(&self, n: u64) {
        self.log_bytes.inc_by(n);
    }

    /// Count artifact bytes received from an agent.
    pub fn artifact_bytes(&self, n: u64) {
        self.artifact_bytes.inc_by(n);
    }

    /// Record the latency of one store transaction.
    pub fn store_commit(&self, took: Duration) {
        self.store_commit.observe(took.as_secs_f64());
    }

    /// A committed change of a run, with its previous version (`None` for a new run or one loaded from the
    /// store). Updates the dispatch latency, finished jobs and step durations. Cheap: called under the
    /// engine's state lock.
    pub fn run_changed(&self, prev: Option<&RunRec>, next: &RunRec, now_ms: i64) {
        let mut t = lock(&self.tracking);
        for j in &next.jobs {
            let p = prev
                .and_then(|r| r.jobs.get(j.idx as usize))
                .filter(|p| p.name == j.name);
            let before = p.map(|p| p.state);
            // Only a job that just became queued is new to these maps (a run changes many times while
            // its jobs wait, and each change of the run passes here).
            if j.state == Status::Queued && before != Some(Status::Queued) {
                t.queued_since
                    .insert((next.id.clone(), j.name.clone()), now_ms);
                if t.selectors.len() < MAX_REMEMBERED_SELECTORS {
                    let sel = selector_string(&j.spec.agents);
                    if !t.selectors.contains(&sel) {
                        t.selectors.insert(sel);
                    }
                }
            } else if j.state != Status::Queued && before == Some(Status::Queued) {
                let since = t.queued_since.remove(&(next.id.clone(), j.name.clone()));
                if let (Status::Running, Some(since)) = (j.state, since) {
                    let ms = now_ms.saturating_sub(since).max(0);
                    self.dispatch_latency.observe(ms as f64 / 1000.0);
                }
            }
            if j.state.is_terminal() && !before.is_some_and(|b| b.is_terminal()) {
                let failure = pb::FailureClass::try_from(j.failure)
                    .map(failure_name)
                    .unwrap_or("unknown");
                self.jobs_finished
                    .get_or_create(&labels(&[
                        ("state", j.state.as_str()),
                        ("failure", failure),
                    ]))
                    .inc();
            }
            if let Some(att) = &j.attempt_id {
                let same_attempt = p.filter(|p| p.attempt_id == j.attempt_id);
                for (i, s) in j.steps.iter().enumerate() {
                    let was = same_attempt.and_then(|p| p.steps.get(i)).map(|s| s.state);
                    if s.state == Status::Running && was != Some(Status::Running) {
                        t.step_started
                            .insert((att.clone(), i as u32), Instant::now());
                    } else if s.state.is_terminal() && !was.is_some_and(|w| w.is_terminal()) {
                        if let Some(start) = t.step_started.remove(&(att.clone(), i as u32)) {
                            self.step_duration.observe(start.elapsed().as_secs_f64());
                        }
                    }
                }
            }
            // An attempt that ended (lost, canceled...) forgets its steps that never reported an end.
            // By key, not by a scan of every tracked step: that scan made each ended attempt cost as
            // much as the whole fleet's running steps.
            if before == Some(Status::Running) && j.state != Status::Running {
                if let Some((old, old_steps)) =
                    p.and_then(|p| Some((p.attempt_id.as_ref()?, p.steps.len())))
                {
                    let mut key = (old.clone(), 0);
                    for i in 0..j.spec.steps.len().max(old_steps) {
                        key.1 = i as u32;
                        t.step_started.remove(&key);
                    }
                }
            }
        }
        // A finished run forgets whatever of its jobs still waited, by key: a scan of the whole map
        // here made every run's end cost as much as the queue was long, so a backlog of submitted
        // runs slowed down the very completions that drain it.
        if next.state != crate::engine::model::RunStatus::Running {
            let mut key = (next.id.clone(), String::new());
            for j in &next.jobs {
                key.1.clone_from(&j.name);
                t.queued_since.remove(&key);
            }
        }
    }

    /// The queue per label selector, oldest job first in each, including selectors that had queued jobs
    /// earlier and are empty now (depth 0).
    pub fn queues(&self, fleet: &FleetView, now_ms: i64) -> Vec<QueueSummary> {
        let (since, selectors) = {
            let t = lock(&self.tracking);
            let since: HashMap<(String, String), i64> = fleet
                .queue()
                .into_iter()
                .filter_map(|(r, j, _)| {
                    let k = (r.to_string(), j.to_string());
                    t.queued_since.get(&k).map(|at| (k, *at))
                })
                .collect();
            (since, t.selectors.clone())
        };
        let mut queues: BTreeMap<String, QueueSummary> = selectors
            .into_iter()
            .map(|s| {
                (
                    s.clone(),
                    QueueSummary {
                        selector: s,
                        ..QueueSummary::default()
                    },
                )
            })
            .collect();
        for r in &fleet.runs {
            for j in r.jobs.iter().filter(|j| j.state == Status::Queued) {
                let at = since
                    .get(&(r.id.clone(), j.name.clone()))
                    .copied()
                    .unwrap_or_else(|| estimated_enqueue_ms(r, j));
                let sel = selector_string(&j.spec.agents);
                let q = queues.entry(sel.clone()).or_insert_with(|| QueueSummary {
                    selector: sel,
                    ..QueueSummary::default()
                });
                q.jobs.push((r.id.clone(), j.name.clone()));
                let age = now_ms.saturating_sub(at).max(0) as f64 / 1000.0;
                q.oldest_age_seconds = q.oldest_age_seconds.max(age);
            }
        }
        queues.into_values().collect()
    }

    /// Fill the scrape-time gauges from `fleet` and the heartbeat `pace` in force, and encode every
    /// family in the OpenMetrics text format.
    pub fn render(&self, fleet: &FleetView, pace: Pace, now_ms: i64) -> String {
        let _one_scrape = lock(&self.scrape);
        self.heartbeat_interval.set(pace.interval.as_secs_f64());
        self.lease_ttl.set(pace.lease_ttl.as_secs_f64());
        let queues = self.queues(fleet, now_ms);
        let (mut waiting, mut queued, mut running) = (0i64, 0i64, 0i64);
        for j in fleet.runs.iter().flat_map(|r| &r.jobs) {
            match j.state {
                Status::Waiting => waiting += 1,
                Status::Queued => queued += 1,
                Status::Running => running += 1,
                _ => {}
            }
        }
        self.queue_depth.clear();
        self.queue_oldest.clear();
        for q in queues {
            let l = labels(&[("selector", &q.selector)]);
            self.queue_depth.get_or_create(&l).set(q.jobs.len() as i64);
            self.queue_oldest
                .get_or_create(&l)
                .set(q.oldest_age_seconds);
        }
        for (state, n) in [
            ("waiting", waiting),
            ("queued", queued),
            ("running", running),
        ] {
            self.jobs.get_or_create(&labels(&[("state", state)])).set(n);
        }
        for state in ["connected", "disconnected", "revoked"] {
            let n = fleet.agents.iter().filter(|a| a.state() == state).count() as i64;
            self.agents
                .get_or_create(&labels(&[("state", state)]))
                .set(n);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The jobs waiting for an agent with one label selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueSummary {
    /// The selector as `k=v,k2=v2`; empty means any agent.
    pub selector: String,
    /// Seconds the oldest of them has waited (0 when none).
    pub oldest_age_seconds: f64,
    /// (run id, job), in the order the scheduler considers them.
    pub jobs: Vec<(String, String)>,
}

/// When a job queued before this process started most likely entered the queue: when its run was created
/// or when the last job it needs finished.
fn estimated_enqueue_ms(run: &RunRec, job: &crate::engine::model::JobRec) -> i64 {
    job.spec
        .needs
        .iter()
        .filter_map(|n| run.job(n).and_then(|n| n.finished_ms))
        .fold(run.created_ms, i64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{JobRec, RunStatus, StepRec};
    use crate::engine::why::AgentView;
    use crate::pipeline::JobSpec;

    fn job(name: &str, state: Status, sel: &[(&str, &str)]) -> JobRec {
        JobRec {
            name: name.into(),
            idx: 0,
            spec: std::sync::Arc::new(JobSpec {
                name: name.into(),
                needs: Vec::new(),
                agents: sel
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                env: BTreeMap::new(),
                steps: Vec::new(),
                artifacts: Vec::new(),
                timeout_secs: None,
                secrets: Vec::new(),
                cache: None,
            }),
            state,
            failure: 0,
            reason: String::new(),
            exit_code: 0,
            attempts: 0,
            attempt_id: None,
            epoch: 0,
            agent_id: None,
            started_ms: None,
            finished_ms: None,
            steps: vec![StepRec {
                state: Status::Queued,
                exit_code: 0,
            }],
            artifacts: Vec::new(),
        }
    }

    /// The pace most tests render with.
    const PACE: Pace = Pace {
        interval: Duration::from_secs(2),
        lease_ttl: Duration::from_secs(10),
    };

    #[test]
    fn the_heartbeat_pace_in_force_is_shown() {
        let m = Metrics::new();
        let text = m.render(&FleetView::default(), PACE, 0);
        assert!(
            text.contains("drover_heartbeat_interval_seconds 2.0"),
            "{text}"
        );
        assert!(text.contains("drover_lease_ttl_seconds 10.0"), "{text}");
        // A stretched pace (a grown fleet) replaces it at the next scrape.
        let stretched = Pace {
            interval: Duration::from_millis(7_500),
            lease_ttl: Duration::from_millis(37_500),
        };
        let text = m.render(&FleetView::default(), stretched, 0);
        assert!(
            text.contains("drover_heartbeat_interval_seconds 7.5"),
            "{text}"
        );
        assert!(text.contains("drover_lease_ttl_seconds 37.5"), "{text}");
    }

    fn run(jobs: Vec<JobRec>) -> RunRec {
        RunRec {
            seq: 1,
            id: "r1".into(),
            name: "p".into(),
            state: RunStatus::Running,
            cancel_requested: false,
            created_ms: 1_000,
            finished_ms: None,
            context_digest: String::new(),
            pipeline: "".into(),
            jobs,
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{text}"))
    }

    #[test]
    fn queue_gauges_dispatch_latency_and_finished_counters() {
        let m = Metrics::new();
        let queued = run(vec![job("gpu", Status::Queued, &[("queue", "gpu")])]);
        m.run_changed(None, &queued, 10_000);
        let fleet = FleetView {
            runs: vec![queued.clone()],
            agents: vec![AgentView {
                id: "a".into(),
                hostname: "h".into(),
                labels: BTreeMap::new(),
                capacity: 1,
                connected: true,
                revoked: false,
                running: vec![],
                last_seen_ms: 0,
                policy: Default::default(),
            }],
        };
        let text = m.render(&fleet, PACE, 12_500);
        assert_eq!(
            line(&text, "drover_queue_depth{"),
            "drover_queue_depth{selector=\"queue=gpu\"} 1"
        );
        assert_eq!(
            line(&text, "drover_queue_oldest_age_seconds{"),
            "drover_queue_oldest_age_seconds{selector=\"queue=gpu\"} 2.5"
        );
        assert!(
            text.contains("drover_agents{state=\"connected\"} 1"),
            "{text}"
        );
        assert!(text.contains("drover_jobs{state=\"queued\"} 1"), "{text}");

        // The run changes while its job stays queued (another job of it moves, say): the job's wait
        // goes on from its first queueing.
        m.run_changed(Some(&queued), &queued, 10_100);
        let mut started = queued.clone();
        started.jobs[0].state = Status::Running;
        started.jobs[0].attempt_id = Some("att".into());
        m.run_changed(Some(&queued), &started, 10_300);
        let mut done = started.clone();
        done.jobs[0].state = Status::Failed;
        done.jobs[0].failure = pb::FailureClass::Script as i32;
        done.state = RunStatus::Failed;
        m.run_changed(Some(&started), &done, 11_000);
        // A repeated publication of the same terminal state is not counted twice.
        m.run_changed(Some(&done), &done, 11_001);
        let text = m.render(&FleetView::default(), PACE, 12_500);
        assert_eq!(
            line(&text, "drover_queue_depth{"),
            "drover_queue_depth{selector=\"queue=gpu\"} 0"
        );
        assert!(
            text.contains("drover_jobs_finished_total{state=\"failed\",failure=\"script\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("drover_dispatch_latency_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("drover_dispatch_latency_seconds_sum 0.3"),
            "{text}"
        );
    }

    #[test]
    fn step_durations_are_observed_from_start_to_end() {
        let m = Metrics::new();
        let mut a = run(vec![job("j", Status::Running, &[])]);
        a.jobs[0].attempt_id = Some("att".into());
        let mut b = a.clone();
        b.jobs[0].steps[0].state = Status::Running;
        m.run_changed(Some(&a), &b, 0);
        let mut c = b.clone();
        c.jobs[0].steps[0].state = Status::Succeeded;
        m.run_changed(Some(&b), &c, 0);
        let text = m.render(&FleetView::default(), PACE, 0);
        assert!(
            text.contains("drover_step_duration_seconds_count 1"),
            "{text}"
        );
        m.log_bytes(10);
        m.artifact_bytes(7);
        m.store_commit(Duration::from_millis(2));
        let text = m.render(&FleetView::default(), PACE, 0);
        assert!(text.contains("drover_log_bytes_total 10"), "{text}");
        assert!(text.contains("drover_artifact_bytes_total 7"), "{text}");
        assert!(
            text.contains("drover_store_commit_seconds_count 1"),
            "{text}"
        );
    }

    /// A run's end forgets its own waiting jobs and an attempt's end its own unfinished steps, by key;
    /// what other runs and attempts left is kept.
    #[test]
    fn what_ends_is_forgotten_and_nothing_else() {
        let m = Metrics::new();
        let with_id = |id: &str, j: JobRec| RunRec {
            id: id.into(),
            ..run(vec![j])
        };
        let (a, b) = (
            with_id("a", job("j", Status::Queued, &[])),
            with_id("b", job("j", Status::Queued, &[])),
        );
        m.run_changed(None, &a, 0);
        m.run_changed(None, &b, 0);
        let mut a_ended = a.clone();
        a_ended.state = RunStatus::Canceled;
        m.run_changed(Some(&a), &a_ended, 0);
        let queued: Vec<_> = lock(&m.tracking).queued_since.keys().cloned().collect();
        assert_eq!(queued, vec![("b".to_string(), "j".to_string())]);

        let running = |id: &str, att: &str| {
            let mut r = with_id(id, job("j", Status::Running, &[]));
            r.jobs[0].attempt_id = Some(att.into());
            r.jobs[0].steps.push(StepRec {
                state: Status::Queued,
                exit_code: 0,
            });
            r
        };
        let (c, d) = (running("c", "att-c"), running("d", "att-d"));
        for r in [&c, &d] {
            let mut started = r.clone();
            for s in &mut started.jobs[0].steps {
                s.state = Status::Running;
            }
            m.run_changed(Some(r), &started, 0);
        }
        assert_eq!(lock(&m.tracking).step_started.len(), 4);
        // c's attempt is lost with both its steps still running.
        let mut c_started = c.clone();
        for s in &mut c_started.jobs[0].steps {
            s.state = Status::Running;
        }
        let mut c_lost = c_started.clone();
        c_lost.jobs[0].state = Status::Queued;
        m.run_changed(Some(&c_started), &c_lost, 0);
        let mut left: Vec<_> = lock(&m.tracking).step_started.keys().cloned().collect();
        left.sort();
        assert_eq!(
            left,
            vec![("att-d".to_string(), 0), ("att-d".to_string(), 1)]
        );
    }
}
