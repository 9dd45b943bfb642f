//! The engine's records: what is kept in memory for active runs and written to the store.

use std::collections::BTreeMap;

use drover_proto::v1 as pb;

use crate::pipeline::JobSpec;

/// State of a job, a step or an attempt. `Waiting` (needs unmet) and `Queued` both show as QUEUED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Waiting for the jobs it needs.
    Waiting,
    /// Ready for an agent (for a step: not started).
    Queued,
    /// Running on an agent.
    Running,
    /// Finished successfully.
    Succeeded,
    /// A step failed, or infrastructure failed beyond the retry budget.
    Failed,
    /// Not run because a needed job did not succeed.
    Skipped,
    /// Canceled by a user.
    Canceled,
    /// A timeout expired.
    TimedOut,
    /// Lost with its agent.
    Lost,
}

impl Status {
    /// Stable name used in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Waiting => "waiting",
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Canceled => "canceled",
            Status::TimedOut => "timed_out",
            Status::Lost => "lost",
        }
    }

    /// Inverse of [`Status::as_str`].
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "waiting" => Status::Waiting,
            "queued" => Status::Queued,
            "running" => Status::Running,
            "succeeded" => Status::Succeeded,
            "failed" => Status::Failed,
            "skipped" => Status::Skipped,
            "canceled" => Status::Canceled,
            "timed_out" => Status::TimedOut,
            "lost" => Status::Lost,
            _ => return None,
        })
    }

    /// True for the end states.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Waiting | Status::Queued | Status::Running)
    }

    /// The wire state.
    pub fn to_proto(self) -> pb::JobState {
        match self {
            Status::Waiting | Status::Queued => pb::JobState::Queued,
            Status::Running => pb::JobState::Running,
            Status::Succeeded => pb::JobState::Succeeded,
            Status::Failed => pb::JobState::Failed,
            Status::Skipped => pb::JobState::Skipped,
            Status::Canceled => pb::JobState::Canceled,
            Status::TimedOut => pb::JobState::TimedOut,
            Status::Lost => pb::JobState::Lost,
        }
    }
}

/// State of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Jobs are waiting, queued or running.
    Running,
    /// Every job succeeded.
    Succeeded,
    /// Some job did not succeed.
    Failed,
    /// Canceled by a user.
    Canceled,
}

impl RunStatus {
    /// Stable name used in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Canceled => "canceled",
        }
    }

    /// Inverse of [`RunStatus::as_str`].
    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "canceled" => RunStatus::Canceled,
            _ => return None,
        })
    }

    /// The wire state.
    pub fn to_proto(self) -> pb::RunState {
        match self {
            RunStatus::Running => pb::RunState::Running,
            RunStatus::Succeeded => pb::RunState::Succeeded,
            RunStatus::Failed => pb::RunState::Failed,
            RunStatus::Canceled => pb::RunState::Canceled,
        }
    }
}

/// A run with its jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRec {
    /// Submission order.
    pub seq: i64,
    /// Run id.
    pub id: String,
    /// Name given at submit.
    pub name: String,
    /// State.
    pub state: RunStatus,
    /// A user asked to cancel it.
    pub cancel_requested: bool,
    /// Unix ms at submit.
    pub created_ms: i64,
    /// Unix ms when finished.
    pub finished_ms: Option<i64>,
    /// Source context blob, empty when none.
    pub context_digest: String,
    /// The pipeline text as submitted.
    pub pipeline: std::sync::Arc<str>,
    /// Jobs in pipeline order.
    pub jobs: Vec<JobRec>,
}

impl RunRec {
    /// The job named `name`.
    pub fn job(&self, name: &str) -> Option<&JobRec> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// Index of the job named `name`.
    pub fn job_index(&self, name: &str) -> Option<usize> {
        self.jobs.iter().position(|j| j.name == name)
    }
}

/// A job of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRec {
    /// Job name.
    pub name: String,
    /// Position in the pipeline.
    pub idx: u32,
    /// The validated spec.
    pub spec: std::sync::Arc<JobSpec>,
    /// State.
    pub state: Status,
    /// Failure class (`pb::FailureClass` as i32).
    pub failure: i32,
    /// Reason for a failure or skip.
    pub reason: String,
    /// Exit code of the failing step.
    pub exit_code: i32,
    /// Attempts made.
    pub attempts: u32,
    /// Current attempt.
    pub attempt_id: Option<String>,
    /// Epoch of the current attempt (0 before the first).
    pub epoch: u64,
    /// Agent of the current attempt.
    pub agent_id: Option<String>,
    /// Unix ms when the current attempt started its first step.
    pub started_ms: Option<i64>,
    /// Unix ms when it ended.
    pub finished_ms: Option<i64>,
    /// Steps of the current attempt.
    pub steps: Vec<StepRec>,
    /// Artifact files of the committed attempt.
    pub artifacts: Vec<ArtifactRec>,
}

impl JobRec {
    /// For each step, whether `attempt` started it, as far as this record knows: the step states
    /// are those of the current attempt, so for any other attempt every step reads not started.
    pub fn steps_started(&self, attempt: &str) -> Vec<bool> {
        let current = self.attempt_id.as_deref() == Some(attempt);
        (0..self.spec.steps.len())
            .map(|i| current && self.steps.get(i).is_some_and(|s| s.state != Status::Queued))
            .collect()
    }
}

/// A step of the current attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRec {
    /// State (`Queued` = not started).
    pub state: Status,
    /// Exit code when finished.
    pub exit_code: i32,
}

/// One stored artifact file of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRec {
    /// Path relative to the workspace.
    pub path: String,
    /// sha256 hex.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Unix mode bits.
    pub mode: u32,
    /// Attempt that uploaded it.
    pub attempt_id: String,
}

/// One execution of a job on one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRec {
    /// Attempt id.
    pub id: String,
    /// Run id.
    pub run_id: String,
    /// Job name.
    pub job: String,
    /// Agent it was assigned to.
    pub agent_id: String,
    /// Fencing epoch.
    pub epoch: u64,
    /// State.
    pub state: Status,
    /// Unix ms at dispatch.
    pub created_ms: i64,
    /// Unix ms when it ended.
    pub finished_ms: Option<i64>,
}

/// An enrolled agent, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRec {
    /// Agent id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Labels (from its latest hello).
    pub labels: BTreeMap<String, String>,
    /// Labels bound by its enrollment token: it must keep carrying them.
    pub required_labels: BTreeMap<String, String>,
    /// Concurrent jobs.
    pub capacity: u32,
    /// sha256 hex of the credential's secret part.
    pub credential_hash: String,
    /// Revoked agents may not attach.
    pub revoked: bool,
    /// Unix ms at enrollment.
    pub created_ms: i64,
    /// Unix ms it was last heard from (persisted at hello).
    pub last_seen_ms: i64,
}

/// An enrollment token, as stored (hashed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRec {
    /// sha256 hex of the token.
    pub hash: String,
    /// Enrollments left.
    pub uses_left: u32,
    /// Unix ms after which it is void.
    pub expires_ms: i64,
    /// Labels an enrolling agent must have.
    pub labels: BTreeMap<String, String>,
}
