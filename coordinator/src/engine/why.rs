//! "Why is this job pending?": a pure function of a job and a snapshot of the fleet.
//!
//! The engine hands [`explain`] a [`FleetView`] (active runs and every agent, taken under its state lock)
//! and gets back the wire answer; nothing here does I/O or reads a clock, so every verdict is unit-tested
//! without sockets.

use std::collections::BTreeMap;

use drover_proto::v1 as pb;

use super::model::{RunRec, Status};
use crate::scheduler::matches;
use drover_proto::policy::refusals;

/// An attempt running on an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningView {
    /// Attempt id.
    pub attempt_id: String,
    /// Run id.
    pub run_id: String,
    /// Job name.
    pub job: String,
}

/// An agent as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentView {
    /// Agent id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Labels from its latest hello.
    pub labels: BTreeMap<String, String>,
    /// Concurrent jobs.
    pub capacity: u32,
    /// It has an open Attach stream.
    pub connected: bool,
    /// It is revoked.
    pub revoked: bool,
    /// Attempts running on it, by attempt id.
    pub running: Vec<RunningView>,
    /// Unix ms it was last heard from.
    pub last_seen_ms: i64,
    /// Privileged mode and host mounts it allows.
    pub policy: pb::HostPolicy,
}

impl AgentView {
    /// Free slots now.
    pub fn free(&self) -> u32 {
        self.capacity.saturating_sub(self.running.len() as u32)
    }

    /// "connected", "disconnected" or "revoked".
    pub fn state(&self) -> &'static str {
        if self.revoked {
            "revoked"
        } else if self.connected {
            "connected"
        } else {
            "disconnected"
        }
    }

    /// Gets new work: connected and not revoked.
    pub fn accepting(&self) -> bool {
        self.connected && !self.revoked
    }
}

/// A consistent snapshot of what the scheduler works from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetView {
    /// Unfinished runs in submission order (oldest first).
    pub runs: Vec<RunRec>,
    /// Every enrolled agent, by id.
    pub agents: Vec<AgentView>,
}

impl FleetView {
    /// Queued jobs in the order the scheduler considers them: (run id, job name, selector).
    pub fn queue(&self) -> Vec<(&str, &str, &BTreeMap<String, String>)> {
        self.runs
            .iter()
            .flat_map(|r| {
                r.jobs
                    .iter()
                    .filter(|j| j.state == Status::Queued)
                    .map(move |j| (r.id.as_str(), j.name.as_str(), &j.spec.agents))
            })
            .collect()
    }
}

/// A selector as `k=v,k2=v2` (sorted by key); empty for "any agent".
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// 1st, 2nd, 3rd, 4th, 11th, 21st...
pub fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Selector labels `labels` lacks or has with another value.
fn mismatches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Vec<String> {
    selector
        .iter()
        .filter_map(|(k, v)| match labels.get(k) {
            Some(have) if have == v => None,
            Some(have) => Some(format!("{k}={v} (agent has {k}={have})")),
            None => Some(format!("{k}={v} (agent has no {k})")),
        })
        .collect()
}

/// Explain job `job` of `run` against `fleet`. `None` when the run has no such job.
pub fn explain(run: &RunRec, job: &str, fleet: &FleetView) -> Option<pb::ExplainJobResponse> {
    let j = run.job(job)?;
    let mut out = pb::ExplainJobResponse {
        run_id: run.id.clone(),
        job: j.name.clone(),
        state: j.state.to_proto() as i32,
        selector: j.spec.agents.clone().into_iter().collect(),
        ..Default::default()
    };
    match j.state {
        Status::Waiting => {
            out.waiting_on_needs = true;
            out.unfinished_needs = j
                .spec
                .needs
                .iter()
                .filter_map(|n| run.job(n))
                .filter(|n| n.state != Status::Succeeded)
                .map(|n| format!("{} ({})", n.name, n.state.as_str()))
                .collect();
            out.verdict = format!(
                "waiting for the jobs it needs: {}",
                out.unfinished_needs.join(", ")
            );
            out.remedy = "nothing to do: it is queued as soon as they all succeed".into();
        }
        Status::Running => {
            out.verdict = format!(
                "running on agent {} (attempt {}, try {})",
                j.agent_id.as_deref().unwrap_or("?"),
                j.attempt_id.as_deref().unwrap_or("?"),
                j.attempts
            );
        }
        Status::Queued => explain_queued(run, j, fleet, &mut out),
        s => {
            let failure = pb::FailureClass::try_from(j.failure)
                .map(|f| failure_name(f).to_string())
                .unwrap_or_else(|_| "unknown".into());
            out.verdict = if s == Status::Succeeded {
                "finished: succeeded".into()
            } else if j.reason.is_empty() {
                format!("finished: {} ({failure})", s.as_str())
            } else {
                format!("finished: {} ({failure}): {}", s.as_str(), j.reason)
            };
            if s != Status::Succeeded {
                out.remedy = "it will not run again: submit the pipeline again to rerun it".into();
            }
        }
    }
    Some(out)
}

/// The failure class as a short lowercase word ("script", "agent_lost", ...).
pub fn failure_name(f: pb::FailureClass) -> &'static str {
    match f {
        pb::FailureClass::None => "none",
        pb::FailureClass::Script => "script",
        pb::FailureClass::AgentLost => "agent_lost",
        pb::FailureClass::ImagePull => "image_pull",
        pb::FailureClass::Docker => "docker",
        pb::FailureClass::Oom => "oom",
        pb::FailureClass::Timeout => "timeout",
        pb::FailureClass::Canceled => "canceled",
        pb::FailureClass::Infra => "infra",
        pb::FailureClass::Policy => "policy",
    }
}

fn explain_queued(
    run: &RunRec,
    j: &super::model::JobRec,
    fleet: &FleetView,
    out: &mut pb::ExplainJobResponse,
) {
    let selector = &j.spec.agents;
    let needs = j.spec.host_needs();
    let sel = selector_string(selector);
    let labels_flag = if sel.is_empty() {
        String::new()
    } else {
        format!(" --labels {sel}")
    };
    out.agents = fleet
        .agents
        .iter()
        .map(|a| pb::AgentFit {
            agent_id: a.id.clone(),
            hostname: a.hostname.clone(),
            matches: matches(selector, &a.labels) && refusals(&a.policy, &needs).is_empty(),
            mismatches: mismatches(selector, &a.labels)
                .into_iter()
                .chain(
                    refusals(&a.policy, &needs)
                        .into_iter()
                        .map(|r| format!("{r}: not allowed")),
                )
                .collect(),
            connected: a.connected,
            revoked: a.revoked,
            capacity: a.capacity,
            free: a.free(),
            busy_with: a
                .running
                .iter()
                .map(|r| format!("{}/{} (attempt {})", r.run_id, r.job, r.attempt_id))
                .collect(),
        })
        .collect();
    let usable: Vec<&AgentView> = fleet.agents.iter().filter(|a| !a.revoked).collect();
    let labelled: Vec<&AgentView> = usable
        .iter()
        .copied()
        .filter(|a| matches(selector, &a.labels))
        .collect();
    let matching: Vec<&AgentView> = labelled
        .iter()
        .copied()
        .filter(|a| refusals(&a.policy, &needs).is_empty())
        .collect();

    // Place in line: older queued jobs that compete for the same agents (any matching agent could take
    // them too); with no matching agent, older jobs with the very same selector.
    let queue = fleet.queue();
    out.queue_length = queue.len() as u32;
    let me = queue
        .iter()
        .position(|(r, n, _)| *r == run.id && *n == j.name)
        .unwrap_or(queue.len());
    let ahead = queue[..me]
        .iter()
        .filter(|(_, _, other)| {
            if matching.is_empty() {
                *other == selector
            } else {
                matching.iter().any(|a| matches(other, &a.labels))
            }
        })
        .count() as u32;
    let position = ahead + 1;
    out.queue_position = position;

    if usable.is_empty() {
        out.verdict = "no agent is enrolled".into();
        out.remedy = format!(
            "create a token with `drover tokens create` and start an agent with it{labels_flag}"
        );
        return;
    }
    if matching.is_empty() && !labelled.is_empty() {
        let mut refused: Vec<String> = labelled
            .iter()
            .flat_map(|a| refusals(&a.policy, &needs))
            .collect();
        refused.sort();
        refused.dedup();
        out.verdict = format!(
            "{} but none allows what its steps ask for: {}",
            plural(
                labelled.len(),
                "agent has its labels",
                "agents have its labels"
            ),
            refused.join("; ")
        );
        out.remedy = format!(
            "start an agent{} with the flags named (privileged mode and host mounts are off by default)",
            if sel.is_empty() { String::new() } else { format!(" with --labels {sel}") }
        );
        return;
    }
    if matching.is_empty() {
        let missing: Vec<String> = selector
            .iter()
            .filter(|(k, v)| !usable.iter().any(|a| a.labels.get(*k) == Some(*v)))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        out.verdict = if missing.is_empty() {
            format!("no single agent has all of {sel}")
        } else {
            format!("no agent has {}", missing.join(", "))
        };
        out.remedy = format!("start an agent with{labels_flag}");
        return;
    }
    let connected: Vec<&AgentView> = matching.iter().copied().filter(|a| a.connected).collect();
    if connected.is_empty() {
        let hosts: Vec<String> = matching
            .iter()
            .map(|a| format!("{} on {}", a.id, a.hostname))
            .collect();
        out.verdict = format!(
            "{} but none is connected",
            plural(matching.len(), "matching agent", "matching agents")
        );
        out.remedy = format!("start or reconnect drover-agent: {}", hosts.join(", "));
        return;
    }
    let free: u32 = connected.iter().map(|a| a.free()).sum();
    let line = if ahead == 0 {
        "it is first in line".to_string()
    } else {
        format!("it is {} in line", ordinal(position))
    };
    if free >= position {
        let best = connected
            .iter()
            .max_by(|a, b| a.free().cmp(&b.free()).then_with(|| b.id.cmp(&a.id)))
            .map(|a| a.id.as_str())
            .unwrap_or("?");
        out.verdict = format!(
            "about to run: {} free on matching agents (e.g. {best}); {line}",
            plural(free as usize, "slot", "slots")
        );
        return;
    }
    let all = if connected.len() == 1 { "is" } else { "are" };
    out.verdict = if free == 0 {
        format!(
            "{} {all} busy; {line}",
            plural(
                connected.len(),
                "matching agent",
                "matching connected agents"
            )
        )
    } else {
        format!(
            "{} free on matching agents but {} ahead of it; {line}",
            plural(free as usize, "slot", "slots"),
            plural(ahead as usize, "job is", "jobs are")
        )
    };
    out.remedy = format!(
        "wait for running jobs to finish, or add capacity: start another agent with{labels_flag} or raise --capacity"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::{JobRec, RunStatus, StepRec};
    use crate::pipeline::JobSpec;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn job(name: &str, state: Status, needs: &[&str], sel: &[(&str, &str)]) -> JobRec {
        let spec = JobSpec {
            name: name.into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            agents: labels(sel),
            env: BTreeMap::new(),
            steps: Vec::new(),
            artifacts: Vec::new(),
            timeout_secs: None,
            secrets: Vec::new(),
            cache: None,
        };
        JobRec {
            name: name.into(),
            idx: 0,
            spec: std::sync::Arc::new(spec),
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

    fn run(id: &str, seq: i64, jobs: Vec<JobRec>) -> RunRec {
        RunRec {
            seq,
            id: id.into(),
            name: "p".into(),
            state: RunStatus::Running,
            cancel_requested: false,
            created_ms: 0,
            finished_ms: None,
            context_digest: String::new(),
            pipeline: "".into(),
            jobs,
        }
    }

    fn agent(id: &str, l: &[(&str, &str)], capacity: u32, busy: usize) -> AgentView {
        AgentView {
            id: id.into(),
            hostname: format!("host-{id}"),
            labels: labels(l),
            capacity,
            connected: true,
            revoked: false,
            running: (0..busy)
                .map(|i| RunningView {
                    attempt_id: format!("att-{id}-{i}"),
                    run_id: "other".into(),
                    job: format!("j{i}"),
                })
                .collect(),
            last_seen_ms: 0,
            policy: pb::HostPolicy::default(),
        }
    }

    #[test]
    fn unmet_needs_are_named_with_their_state() {
        let r = run(
            "r1",
            1,
            vec![
                job("build", Status::Running, &[], &[]),
                job("lint", Status::Succeeded, &[], &[]),
                job("test", Status::Waiting, &["build", "lint"], &[]),
            ],
        );
        let fleet = FleetView {
            runs: vec![r.clone()],
            agents: vec![],
        };
        let e = explain(&r, "test", &fleet).unwrap();
        assert!(e.waiting_on_needs);
        assert_eq!(e.unfinished_needs, vec!["build (running)".to_string()]);
        assert_eq!(e.state, pb::JobState::Queued as i32);
        assert!(e.verdict.contains("build (running)"), "{}", e.verdict);
        assert!(explain(&r, "nope", &fleet).is_none());
    }

    #[test]
    fn no_matching_agent_names_the_missing_label_and_the_flag() {
        let r = run(
            "r1",
            1,
            vec![job("train", Status::Queued, &[], &[("queue", "gpu")])],
        );
        let fleet = FleetView {
            runs: vec![r.clone()],
            agents: vec![agent("a", &[("queue", "cpu")], 1, 0)],
        };
        let e = explain(&r, "train", &fleet).unwrap();
        assert_eq!(e.verdict, "no agent has queue=gpu");
        assert_eq!(e.remedy, "start an agent with --labels queue=gpu");
        assert_eq!(e.agents.len(), 1);
        assert!(!e.agents[0].matches);
        assert_eq!(
            e.agents[0].mismatches,
            vec!["queue=gpu (agent has queue=cpu)".to_string()]
        );
        assert_eq!(e.queue_position, 1);
    }

    #[test]
    fn labels_present_on_different_agents_are_not_enough() {
        let r = run(
            "r1",
            1,
            vec![job(
                "x",
                Status::Queued,
                &[],
                &[("os", "linux"), ("queue", "gpu")],
            )],
        );
        let fleet = FleetView {
            runs: vec![r.clone()],
            agents: vec![
                agent("a", &[("os", "linux")], 1, 0),
                agent("b", &[("queue", "gpu")], 1, 0),
            ],
        };
        let e = explain(&r, "x", &fleet).unwrap();
        assert_eq!(e.verdict, "no single agent has all of os=linux,queue=gpu");
    }

    #[test]
    fn no_agents_at_all() {
        let r = run("r1", 1, vec![job("x", Status::Queued, &[], &[])]);
        let fleet = FleetView {
            runs: vec![r.clone()],
            agents: vec![],
        };
        let e = explain(&r, "x", &fleet).unwrap();
        assert_eq!(e.verdict, "no agent is enrolled");
        assert!(e.remedy.contains("drover tokens create"), "{}", e.remedy);
    }

    #[test]
    fn matching_but_busy_gives_place_in_line() {
        let older = run(
            "r0",
            1,
            vec![
                job("a", Status::Queued, &[], &[("os", "linux")]),
                job("b", Status::Queued, &[], &[]),
                // Competes for nothing the job can use: not counted ahead of it.
                job("c", Status::Queued, &[], &[("queue", "gpu")]),
            ],
        );
        let r = run(
            "r1",
            2,
            vec![job("x", Status::Queued, &[], &[("os", "linux")])],
        );
        let fleet = FleetView {
            runs: vec![older, r.clone()],
            agents: vec![
                agent("l1", &[("os", "linux")], 1, 1),
                agent("l2", &[("os", "linux")], 2, 2),
            ],
        };
        let e = explain(&r, "x", &fleet).unwrap();
        assert_eq!(e.queue_position, 3);
        assert_eq!(e.queue_length, 4);
        assert_eq!(
            e.verdict,
            "2 matching connected agents are busy; it is 3rd in line"
        );
        assert!(e.remedy.contains("--labels os=linux"), "{}", e.remedy);
        assert_eq!(e.agents[0].busy_with.len(), 1);
        assert_eq!(e.agents[1].free, 0);
    }

    #[test]
    fn matching_and_free_is_about_to_run() {
        let r = run(
            "r1",
            1,
            vec![job("x", Status::Queued, &[], &[("os", "linux")])],
        );
        let fleet = FleetView {
            runs: vec![r.clone()],
            agents: vec![
                agent("l1", &[("os", "linux")], 2, 1),
                agent("m", &[("os", "mac")], 4, 0),
            ],
        };
        let e = explain(&r, "x", &fleet).unwrap();
        assert!(e.verdict.starts_with("about to run"), "{}", e.verdict);
        assert!(e.verdict.contains("l1"), "{}", e.verdict);
        assert!(e.remedy.is_empty());
    }

    #[test]
    fn a_privileged_job_names_the_flag_no_agent_has() {
        let mut j = job("x", Status::Queued, &[], &[("os", "linux")]);
        std::sync::Arc::make_mut(&mut j.spec).steps = vec![crate::pipeline::StepSpec {
            name: "s".into(),
            image: "i".into(),
            commands: vec!["true".into()],
            env: BTreeMap::new(),
            workdir: None,
            timeout_secs: None,
            pull: Default::default(),
            resources: Default::default(),
            host: crate::pipeline::HostAccess {
                privileged: true,
                volumes: Vec::new(),
            },
        }];
        let r = run("r1", 1, vec![j]);
        let mut fleet = FleetView {
            runs: vec![r.clone()],
            agents: vec![agent("l1", &[("os", "linux")], 1, 0)],
        };
        let e = explain(&r, "x", &fleet).unwrap();
        assert_eq!(
            e.verdict,
            "1 agent has its labels but none allows what its steps ask for: privileged mode (agent flag --allow-privileged)"
        );
        assert!(!e.agents[0].matches);
        assert!(e.agents[0].mismatches[0].contains("--allow-privileged"));
        fleet.agents[0].policy.allow_privileged = true;
        let e = explain(&r, "x", &fleet).unwrap();
        assert!(e.verdict.starts_with("about to run"), "{}", e.verdict);
    }

    #[test]
    fn matching_agents_disconnected_or_revoked() {
        let r = run(
            "r1",
            1,
            vec![job("x", Status::Queued, &[], &[("os", "linux")])],
        );
        let mut off = agent("l1", &[("os", "linux")], 1, 0);
        off.connected = false;
        let mut gone = agent("l2", &[("os", "linux")], 1, 0);
        gone.revoked = true;
        let fleet = FleetView {
            runs: vec![r.clone()],
            agents: vec![off, gone],
        };
        let e = explain(&r, "x", &fleet).unwrap();
        assert_eq!(e.verdict, "1 matching agent but none is connected");
        assert!(e.remedy.contains("l1 on host-l1"), "{}", e.remedy);
    }

    #[test]
    fn running_and_finished_jobs() {
        let mut running = job("x", Status::Running, &[], &[]);
        running.agent_id = Some("a1".into());
        running.attempt_id = Some("att".into());
        running.attempts = 1;
        let mut failed = job("y", Status::Failed, &[], &[]);
        failed.failure = pb::FailureClass::Script as i32;
        failed.reason = "step 1 exited 2".into();
        let r = run("r1", 1, vec![running, failed]);
        let fleet = FleetView::default();
        let e = explain(&r, "x", &fleet).unwrap();
        assert_eq!(e.verdict, "running on agent a1 (attempt att, try 1)");
        let e = explain(&r, "y", &fleet).unwrap();
        assert_eq!(e.verdict, "finished: failed (script): step 1 exited 2");
    }

    #[test]
    fn ordinals() {
        let got: Vec<String> = [1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111]
            .into_iter()
            .map(ordinal)
            .collect();
        assert_eq!(
            got,
            [
                "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st",
                "111th"
            ]
        );
    }
}
