//! The dashboard: one page with its stylesheet and script embedded in the binary (no external assets, works
//! offline), and the JSON views it polls under `/api/`.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use drover_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use super::HttpError;
use crate::engine::why::{failure_name, selector_string};
use crate::engine::{now_ms, Engine};
use crate::scheduler::matches;

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");

/// `GET /`: the dashboard page.
pub async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        INDEX_HTML,
    )
}

/// `GET /assets/dashboard.css`.
pub async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        DASHBOARD_CSS,
    )
}

/// `GET /assets/dashboard.js`.
pub async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        DASHBOARD_JS,
    )
}

/// A step in the JSON views.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepJson {
    /// Step name.
    pub name: String,
    /// Image.
    pub image: String,
    /// queued (not started), running, succeeded, failed, ...
    pub state: String,
    /// Exit code when finished.
    pub exit_code: i32,
    /// Bytes of log stored.
    pub log_bytes: u64,
}

/// A job in the JSON views.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobJson {
    /// Job name.
    pub name: String,
    /// waiting (needs unmet), queued, running, succeeded, failed, skipped, canceled, timed_out, lost.
    pub state: String,
    /// Names of the jobs it needs.
    pub needs: Vec<String>,
    /// Layer in the DAG: 0 without needs, else one more than its deepest need.
    pub depth: u32,
    /// Label selector as `k=v,...` (empty: any agent).
    pub selector: String,
    /// Agent of the current attempt.
    pub agent_id: String,
    /// Current attempt.
    pub attempt_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// Failure class ("none" when not failed).
    pub failure: String,
    /// Reason for a failure or skip.
    pub reason: String,
    /// Exit code of the failing step.
    pub exit_code: i32,
    /// Unix ms it started (0 if not).
    pub started_ms: i64,
    /// Unix ms it finished (0 if not).
    pub finished_ms: i64,
    /// Steps.
    pub steps: Vec<StepJson>,
}

/// A run in the JSON views.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunJson {
    /// Run id.
    pub id: String,
    /// Name given at submit.
    pub name: String,
    /// running, succeeded, failed, canceled.
    pub state: String,
    /// Unix ms at submit.
    pub created_ms: i64,
    /// Unix ms finished (0 if not).
    pub finished_ms: i64,
    /// Jobs per state.
    pub counts: BTreeMap<String, u32>,
    /// Jobs in pipeline order.
    pub jobs: Vec<JobJson>,
}

fn job_state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn run_state_name(state: i32) -> String {
    pb::RunState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("RUN_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

/// Depth of every job in the DAG (0 for jobs without needs). Needs that are unknown or form a cycle
/// (impossible for a validated pipeline) count as depth 0 rather than looping.
pub fn depths(jobs: &[(String, Vec<String>)]) -> HashMap<String, u32> {
    let needs: HashMap<&str, &Vec<String>> = jobs.iter().map(|(n, d)| (n.as_str(), d)).collect();
    let mut depth: HashMap<String, u32> = HashMap::new();
    // Relax at most `jobs.len()` times: each pass fixes at least one more layer of an acyclic graph.
    for _ in 0..=jobs.len() {
        let mut changed = false;
        for (name, _) in jobs {
            let d = needs[name.as_str()]
                .iter()
                .filter(|n| needs.contains_key(n.as_str()))
                .map(|n| depth.get(n).copied().unwrap_or(0) + 1)
                .max()
                .unwrap_or(0)
                .min(jobs.len() as u32);
            if depth.get(name) != Some(&d) {
                depth.insert(name.clone(), d);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

/// The JSON view of a run.
pub fn run_json(r: &pb::Run) -> RunJson {
    let d = depths(
        &r.jobs
            .iter()
            .map(|j| (j.name.clone(), j.needs.clone()))
            .collect::<Vec<_>>(),
    );
    let states: HashMap<&str, i32> = r.jobs.iter().map(|j| (j.name.as_str(), j.state)).collect();
    let mut counts = BTreeMap::new();
    let jobs: Vec<JobJson> = r
        .jobs
        .iter()
        .map(|j| {
            let mut state = job_state_name(j.state);
            // QUEUED on the wire covers both; operators want to see which.
            if j.state == pb::JobState::Queued as i32
                && j.needs.iter().any(|n| {
                    states.get(n.as_str()).copied() != Some(pb::JobState::Succeeded as i32)
                })
            {
                state = "waiting".into();
            }
            *counts.entry(state.clone()).or_insert(0) += 1;
            let selector: BTreeMap<String, String> = j.agents.clone().into_iter().collect();
            JobJson {
                name: j.name.clone(),
                state,
                needs: j.needs.clone(),
                depth: d.get(&j.name).copied().unwrap_or(0),
                selector: selector_string(&selector),
                agent_id: j.agent_id.clone(),
                attempt_id: j.attempt_id.clone(),
                attempts: j.attempts,
                failure: pb::FailureClass::try_from(j.failure)
                    .map(failure_name)
                    .unwrap_or("unknown")
                    .to_string(),
                reason: j.reason.clone(),
                exit_code: j.exit_code,
                started_ms: j.started_ms,
                finished_ms: j.finished_ms,
                steps: j
                    .steps
                    .iter()
                    .map(|s| StepJson {
                        name: s.name.clone(),
                        image: s.image.clone(),
                        state: job_state_name(s.state),
                        exit_code: s.exit_code,
                        log_bytes: s.log_bytes,
                    })
                    .collect(),
            }
        })
        .collect();
    RunJson {
        id: r.id.clone(),
        name: r.name.clone(),
        state: run_state_name(r.state),
        created_ms: r.created_ms,
        finished_ms: r.finished_ms,
        counts,
        jobs,
    }
}

/// Query of `/api/runs`.
#[derive(Debug, Deserialize)]
pub struct RunsQuery {
    /// At most this many (default 50).
    #[serde(default)]
    pub limit: u32,
    /// Only runs older than this run id (the last id of the previous page).
    #[serde(default)]
    pub after: String,
}

/// `GET /api/runs?limit=N&after=RUN_ID`: recent runs, newest first, one page at a time.
pub async fn runs(
    State(engine): State<Engine>,
    Query(q): Query<RunsQuery>,
) -> Result<Json<Vec<RunJson>>, HttpError> {
    let (runs, _) = engine.list_runs_page(q.limit, &q.after).await?;
    Ok(Json(runs.iter().map(run_json).collect()))
}

/// `GET /api/run/{id}`: one run with its jobs and steps.
pub async fn run(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Json<RunJson>, HttpError> {
    Ok(Json(run_json(&engine.get_run(&id).await?)))
}

/// An attempt running on an agent.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunningJson {
    /// Run id.
    pub run_id: String,
    /// Job name.
    pub job: String,
    /// Attempt id.
    pub attempt_id: String,
}

/// An agent in the JSON views.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentJson {
    /// Agent id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// connected, disconnected, revoked.
    pub state: String,
    /// Concurrent jobs.
    pub capacity: u32,
    /// Free slots.
    pub free: u32,
    /// What it runs now.
    pub running: Vec<RunningJson>,
    /// Unix ms last heard from.
    pub last_seen_ms: i64,
}

/// `GET /api/agents`: every enrolled agent.
pub async fn agents(State(engine): State<Engine>) -> Json<Vec<AgentJson>> {
    let fleet = engine.fleet_view();
    // Shown only once durable (a failed store shows up on /readyz; the view is still worth showing).
    let _ = engine.settled().await;
    Json(
        fleet
            .agents
            .iter()
            .map(|a| AgentJson {
                id: a.id.clone(),
                hostname: a.hostname.clone(),
                labels: a.labels.clone(),
                state: a.state().into(),
                capacity: a.capacity,
                free: a.free(),
                running: a
                    .running
                    .iter()
                    .map(|r| RunningJson {
                        run_id: r.run_id.clone(),
                        job: r.job.clone(),
                        attempt_id: r.attempt_id.clone(),
                    })
                    .collect(),
                last_seen_ms: a.last_seen_ms,
            })
            .collect(),
    )
}

/// A queued job in the queue view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueuedJson {
    /// Run id.
    pub run_id: String,
    /// Job name.
    pub job: String,
}

/// The queue of one label selector.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct QueueJson {
    /// Selector `k=v,...`; empty means any agent.
    pub selector: String,
    /// Jobs waiting.
    pub depth: usize,
    /// Age of the oldest, seconds.
    pub oldest_age_seconds: f64,
    /// Connected agents that match it.
    pub matching_agents: usize,
    /// Free slots on those agents.
    pub free_slots: u32,
    /// The jobs, oldest first.
    pub jobs: Vec<QueuedJson>,
}

/// `GET /api/queue`: jobs waiting for an agent, per label selector.
pub async fn queue(State(engine): State<Engine>) -> Json<Vec<QueueJson>> {
    let fleet = engine.fleet_view();
    // Shown only once durable (a failed store shows up on /readyz; the view is still worth showing).
    let _ = engine.settled().await;
    let queues = engine.metrics().queues(&fleet, now_ms());
    Json(
        queues
            .into_iter()
            .map(|q| {
                let selector = parse_selector(&q.selector);
                let matching: Vec<_> = fleet
                    .agents
                    .iter()
                    .filter(|a| a.accepting() && matches(&selector, &a.labels))
                    .collect();
                QueueJson {
                    depth: q.jobs.len(),
                    oldest_age_seconds: q.oldest_age_seconds,
                    matching_agents: matching.len(),
                    free_slots: matching.iter().map(|a| a.free()).sum(),
                    jobs: q
                        .jobs
                        .into_iter()
                        .map(|(run_id, job)| QueuedJson { run_id, job })
                        .collect(),
                    selector: q.selector,
                }
            })
            .collect(),
    )
}

/// Inverse of [`selector_string`].
fn parse_selector(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// How one agent fits a job, in the explain view.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgentFitJson {
    /// Agent id.
    pub agent_id: String,
    /// Host name.
    pub hostname: String,
    /// Carries every selector label.
    pub matches: bool,
    /// Labels missing or different.
    pub mismatches: Vec<String>,
    /// Connected.
    pub connected: bool,
    /// Revoked.
    pub revoked: bool,
    /// Capacity.
    pub capacity: u32,
    /// Free slots.
    pub free: u32,
    /// Running attempts.
    pub busy_with: Vec<String>,
}

/// The explain view of a job (same content as the ExplainJob rpc).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ExplainJson {
    /// Run id.
    pub run_id: String,
    /// Job name.
    pub job: String,
    /// Job state.
    pub state: String,
    /// Unfinished needs as "name (state)".
    pub unfinished_needs: Vec<String>,
    /// Selector.
    pub selector: BTreeMap<String, String>,
    /// Place in line (0 when not queued).
    pub queue_position: u32,
    /// Queued jobs in total.
    pub queue_length: u32,
    /// Every agent and its fit.
    pub agents: Vec<AgentFitJson>,
    /// Why.
    pub verdict: String,
    /// What would let it run.
    pub remedy: String,
}

/// `GET /api/explain/{run}/{job}`: why the job is pending.
pub async fn explain(
    State(engine): State<Engine>,
    Path((run, job)): Path<(String, String)>,
) -> Result<Json<ExplainJson>, HttpError> {
    let e = engine.explain_job(&run, &job).await?;
    let state = if e.waiting_on_needs {
        "waiting".to_string()
    } else {
        job_state_name(e.state)
    };
    Ok(Json(ExplainJson {
        run_id: e.run_id,
        job: e.job,
        state,
        unfinished_needs: e.unfinished_needs,
        selector: e.selector.into_iter().collect(),
        queue_position: e.queue_position,
        queue_length: e.queue_length,
        agents: e
            .agents
            .into_iter()
            .map(|a| AgentFitJson {
                agent_id: a.agent_id,
                hostname: a.hostname,
                matches: a.matches,
                mismatches: a.mismatches,
                connected: a.connected,
                revoked: a.revoked,
                capacity: a.capacity,
                free: a.free,
                busy_with: a.busy_with,
            })
            .collect(),
        verdict: e.verdict,
        remedy: e.remedy,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dag_depths_follow_needs() {
        let jobs = vec![
            ("build".to_string(), vec![]),
            ("lint".to_string(), vec![]),
            ("test".to_string(), vec!["build".to_string()]),
            (
                "deploy".to_string(),
                vec!["test".to_string(), "lint".to_string()],
            ),
        ];
        let d = depths(&jobs);
        assert_eq!(d["build"], 0);
        assert_eq!(d["lint"], 0);
        assert_eq!(d["test"], 1);
        assert_eq!(d["deploy"], 2);
        // A cycle (never valid) terminates.
        let cyc = vec![
            ("a".to_string(), vec!["b".to_string()]),
            ("b".to_string(), vec!["a".to_string()]),
        ];
        assert!(depths(&cyc)["a"] <= 2);
    }

    #[test]
    fn embedded_page_has_no_external_urls() {
        for text in [INDEX_HTML, DASHBOARD_CSS, DASHBOARD_JS] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
    }

    #[test]
    fn selector_round_trip() {
        let s = parse_selector("os=linux,queue=gpu");
        assert_eq!(selector_string(&s), "os=linux,queue=gpu");
        assert!(parse_selector("").is_empty());
    }
}
