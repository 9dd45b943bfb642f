//! The run/job state machine as pure functions over records: time comes in as `now_ms`, nothing here does
//! I/O, so every transition is unit-tested directly.

use drover_proto::v1::{FailureClass, JobState};

use super::model::{JobRec, RunRec, RunStatus, Status, StepRec};

/// What the engine does with a job after an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Queue the job again for a new attempt (infrastructure failure within the budget).
    Retry {
        /// Why the previous attempt failed.
        reason: String,
    },
    /// The job ends in this state.
    End {
        /// Terminal state.
        state: Status,
        /// Failure class (`FailureClass` as i32).
        failure: i32,
        /// Reason shown to users.
        reason: String,
        /// Exit code of the failing step.
        exit_code: i32,
    },
}

/// Is this failure class an infrastructure fault that earns another attempt?
pub fn is_infra(failure: FailureClass) -> bool {
    matches!(
        failure,
        FailureClass::ImagePull
            | FailureClass::Docker
            | FailureClass::Infra
            | FailureClass::Oom
            | FailureClass::AgentLost
    )
}

/// Decide the fate of a job whose attempt reported `state`/`failure`. `attempts` is the number of attempts
/// made so far (including this one); `max_retries` the infrastructure retry budget.
pub fn decide(
    state: JobState,
    failure: FailureClass,
    reason: &str,
    exit_code: i32,
    cancel_requested: bool,
    attempts: u32,
    max_retries: u32,
) -> Result<Outcome, String> {
    let end = |state: Status, failure: FailureClass, reason: &str| Outcome::End {
        state,
        failure: failure as i32,
        reason: reason.to_string(),
        exit_code,
    };
    Ok(match state {
        JobState::Succeeded => end(Status::Succeeded, FailureClass::None, ""),
        _ if cancel_requested => end(Status::Canceled, FailureClass::Canceled, "canceled by user"),
        JobState::Failed if is_infra(failure) && attempts <= max_retries => Outcome::Retry {
            reason: format!("{}: {reason}", failure.as_str_name()),
        },
        JobState::Failed if failure == FailureClass::AgentLost => {
            end(Status::Lost, failure, reason)
        }
        JobState::Failed => {
            let class = if failure == FailureClass::None {
                FailureClass::Script
            } else {
                failure
            };
            end(Status::Failed, class, reason)
        }
        JobState::TimedOut => end(Status::TimedOut, FailureClass::Timeout, reason),
        JobState::Canceled => end(Status::Canceled, FailureClass::Canceled, reason),
        other => {
            return Err(format!(
                "{} is not a terminal job state",
                other.as_str_name()
            ))
        }
    })
}

/// Put a job on a new attempt.
pub fn start_attempt(job: &mut JobRec, attempt_id: &str, agent_id: &str) {
    job.state = Status::Running;
    job.attempts += 1;
    job.epoch += 1;
    job.attempt_id = Some(attempt_id.to_string());
    job.agent_id = Some(agent_id.to_string());
    job.failure = FailureClass::None as i32;
    job.reason.clear();
    job.exit_code = 0;
    job.started_ms = None;
    job.finished_ms = None;
    job.artifacts.clear();
    job.steps = vec![
        StepRec {
            state: Status::Queued,
            exit_code: 0
        };
        job.spec.steps.len()
    ];
}

/// Apply an outcome to a job.
pub fn apply_outcome(job: &mut JobRec, outcome: Outcome, now_ms: i64) {
    match outcome {
        Outcome::Retry { reason } => {
            job.state = Status::Queued;
            job.reason = format!("retrying after: {reason}");
        }
        Outcome::End {
            state,
            failure,
            reason,
            exit_code,
        } => {
            job.state = state;
            job.failure = failure;
            job.reason = reason;
            job.exit_code = exit_code;
            job.finished_ms = Some(now_ms);
            if state != Status::Succeeded {
                job.artifacts.clear();
            }
            for s in &mut job.steps {
                if s.state == Status::Running {
                    s.state = state;
                }
            }
        }
    }
}

/// Bring a run to a fixpoint after any change: waiting jobs whose needs all succeeded become queued, jobs
/// needing a job that ended otherwise are skipped (transitively), a cancel request cancels everything not
/// yet running, and a run whose jobs are all finished gets its final state. Returns true if anything changed.
pub fn settle(run: &mut RunRec, now_ms: i64) -> bool {
    let before = run.clone();
    loop {
        let mut changed = false;
        for i in 0..run.jobs.len() {
            let state = run.jobs[i].state;
            if !matches!(state, Status::Waiting | Status::Queued) {
                continue;
            }
            if run.cancel_requested {
                let j = &mut run.jobs[i];
                j.state = Status::Canceled;
                j.failure = FailureClass::Canceled as i32;
                j.reason = "canceled by user".into();
                j.finished_ms = Some(now_ms);
                changed = true;
                continue;
            }
            let mut blocked_by = None;
            let mut all_ok = true;
            for need in &run.jobs[i].spec.needs {
                match run.job(need).map(|n| n.state) {
                    Some(Status::Succeeded) => {}
                    Some(s) if s.is_terminal() => {
                        blocked_by = Some((need.clone(), s));
                        break;
                    }
                    _ => all_ok = false,
                }
            }
            let j = &mut run.jobs[i];
            if let Some((need, s)) = blocked_by {
                j.state = Status::Skipped;
                j.reason = format!("needed job {need:?} ended {}", s.as_str());
                j.finished_ms = Some(now_ms);
                changed = true;
            } else if all_ok && state == Status::Waiting {
                j.state = Status::Queued;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    if run.state == RunStatus::Running && run.jobs.iter().all(|j| j.state.is_terminal()) {
        run.state = if run.jobs.iter().all(|j| j.state == Status::Succeeded) {
            RunStatus::Succeeded
        } else if run.cancel_requested {
            RunStatus::Canceled
        } else {
            RunStatus::Failed
        };
        run.finished_ms = Some(now_ms);
    }
    *run != before
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::pipeline::{JobSpec, PullPolicy, StepSpec};

    fn job(name: &str, needs: &[&str]) -> JobRec {
        JobRec {
            name: name.into(),
            idx: 0,
            spec: std::sync::Arc::new(JobSpec {
                name: name.into(),
                needs: needs.iter().map(|s| s.to_string()).collect(),
                agents: BTreeMap::new(),
                env: BTreeMap::new(),
                steps: vec![StepSpec {
                    name: "s".into(),
                    image: "i".into(),
                    commands: vec!["true".into()],
                    env: BTreeMap::new(),
                    workdir: None,
                    timeout_secs: None,
                    pull: PullPolicy::IfNotPresent,
                    resources: Default::default(),
                    host: Default::default(),
                }],
                artifacts: vec![],
                timeout_secs: None,
                secrets: Vec::new(),
                cache: None,
            }),
            state: if needs.is_empty() {
                Status::Queued
            } else {
                Status::Waiting
            },
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
            artifacts: vec![],
        }
    }

    fn run(jobs: Vec<JobRec>) -> RunRec {
        RunRec {
            seq: 1,
            id: "r".into(),
            name: "r".into(),
            state: RunStatus::Running,
            cancel_requested: false,
            created_ms: 0,
            finished_ms: None,
            context_digest: String::new(),
            pipeline: "".into(),
            jobs,
        }
    }

    fn end(job: &mut JobRec, state: JobState, failure: FailureClass) {
        let o = decide(state, failure, "x", 1, false, job.attempts, 2).unwrap();
        apply_outcome(job, o, 7);
    }

    #[test]
    fn needs_queue_after_success_and_run_succeeds() {
        let mut r = run(vec![job("a", &[]), job("b", &["a"]), job("c", &["b"])]);
        assert!(!settle(&mut r, 1));
        start_attempt(&mut r.jobs[0], "at1", "ag");
        assert_eq!(r.jobs[0].epoch, 1);
        end(&mut r.jobs[0], JobState::Succeeded, FailureClass::None);
        assert!(settle(&mut r, 2));
        assert_eq!(r.jobs[1].state, Status::Queued);
        assert_eq!(r.jobs[2].state, Status::Waiting);
        start_attempt(&mut r.jobs[1], "at2", "ag");
        end(&mut r.jobs[1], JobState::Succeeded, FailureClass::None);
        settle(&mut r, 3);
        start_attempt(&mut r.jobs[2], "at3", "ag");
        end(&mut r.jobs[2], JobState::Succeeded, FailureClass::None);
        settle(&mut r, 4);
        assert_eq!(r.state, RunStatus::Succeeded);
        assert_eq!(r.finished_ms, Some(4));
    }

    #[test]
    fn failure_skips_dependents_transitively() {
        let mut r = run(vec![
            job("a", &[]),
            job("b", &["a"]),
            job("c", &["b"]),
            job("d", &[]),
        ]);
        start_attempt(&mut r.jobs[0], "at1", "ag");
        end(&mut r.jobs[0], JobState::Failed, FailureClass::Script);
        assert_eq!(r.jobs[0].state, Status::Failed);
        settle(&mut r, 5);
        assert_eq!(r.jobs[1].state, Status::Skipped);
        assert_eq!(r.jobs[2].state, Status::Skipped);
        assert!(r.jobs[2].reason.contains("\"b\""), "{}", r.jobs[2].reason);
        assert_eq!(r.state, RunStatus::Running, "d still queued");
        start_attempt(&mut r.jobs[3], "at2", "ag");
        end(&mut r.jobs[3], JobState::Succeeded, FailureClass::None);
        settle(&mut r, 6);
        assert_eq!(r.state, RunStatus::Failed);
    }

    #[test]
    fn infra_failures_retry_within_budget_then_end() {
        let mut j = job("a", &[]);
        for n in 1..=2 {
            start_attempt(&mut j, &format!("at{n}"), "ag");
            end(&mut j, JobState::Failed, FailureClass::Docker);
            assert_eq!(j.state, Status::Queued, "retry {n}");
        }
        start_attempt(&mut j, "at3", "ag");
        assert_eq!(j.epoch, 3);
        end(&mut j, JobState::Failed, FailureClass::Docker);
        assert_eq!(j.state, Status::Failed);
        assert_eq!(j.failure, FailureClass::Docker as i32);

        let mut j = job("a", &[]);
        for n in 1..=3 {
            start_attempt(&mut j, &format!("at{n}"), "ag");
            end(&mut j, JobState::Failed, FailureClass::AgentLost);
        }
        assert_eq!(j.state, Status::Lost);
        assert_eq!(j.failure, FailureClass::AgentLost as i32);
    }

    #[test]
    fn script_failure_timeout_and_cancel_are_final() {
        let o = decide(
            JobState::Failed,
            FailureClass::Script,
            "exit 3",
            3,
            false,
            1,
            2,
        )
        .unwrap();
        assert!(matches!(
            o,
            Outcome::End {
                state: Status::Failed,
                exit_code: 3,
                ..
            }
        ));
        let o = decide(
            JobState::TimedOut,
            FailureClass::Timeout,
            "t",
            0,
            false,
            1,
            2,
        )
        .unwrap();
        assert!(matches!(
            o,
            Outcome::End {
                state: Status::TimedOut,
                ..
            }
        ));
        let o = decide(JobState::Failed, FailureClass::Docker, "d", 0, true, 1, 2).unwrap();
        assert!(matches!(
            o,
            Outcome::End {
                state: Status::Canceled,
                ..
            }
        ));
        assert!(decide(JobState::Running, FailureClass::None, "", 0, false, 1, 2).is_err());
    }

    #[test]
    fn cancel_cancels_pending_and_run_ends_canceled() {
        let mut r = run(vec![job("a", &[]), job("b", &["a"])]);
        start_attempt(&mut r.jobs[0], "at1", "ag");
        r.cancel_requested = true;
        settle(&mut r, 1);
        assert_eq!(r.jobs[1].state, Status::Canceled);
        assert_eq!(
            r.state,
            RunStatus::Running,
            "a still running until its agent reports"
        );
        let o = decide(
            JobState::Canceled,
            FailureClass::Canceled,
            "c",
            0,
            true,
            1,
            2,
        )
        .unwrap();
        apply_outcome(&mut r.jobs[0], o, 2);
        assert_eq!(r.jobs[0].steps[0].state, Status::Queued);
        settle(&mut r, 2);
        assert_eq!(r.state, RunStatus::Canceled);
    }
}
