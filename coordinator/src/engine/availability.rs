//! Operators' control over agents' new work (pause, resume, drain) and the cancel of one job.
//!
//! Pause and drain are persisted (a coordinator restart keeps them); an agent that drains itself
//! (SIGTERM, announced with `Draining`) is only remembered until its next hello.

use drover_proto::v1 as pb;
use drover_proto::v1::FailureClass;

use super::model::Status;
use super::{cancel_msg, Engine, State};
use crate::error::{CoordError, CoordResult};

/// Gets new jobs.
pub const ACTIVE: &str = "active";
/// Paused by an operator: keeps its running jobs and its session, gets no new jobs.
pub const PAUSED: &str = "paused";
/// Draining: finishes its running jobs, gets no new ones, exits.
pub const DRAINING: &str = "draining";

impl State {
    /// The agent's availability as shown to operators.
    pub(super) fn availability_of(&self, agent_id: &str) -> &'static str {
        match self.availability.get(agent_id).map(String::as_str) {
            Some(PAUSED) => PAUSED,
            Some(DRAINING) => DRAINING,
            _ if self.self_draining.contains(agent_id) => DRAINING,
            _ => ACTIVE,
        }
    }

    /// May the scheduler place new jobs on this agent (as far as operators and draining go)?
    pub(super) fn accepts_work(&self, agent_id: &str) -> bool {
        self.availability_of(agent_id) == ACTIVE
    }

    /// Was this job canceled on its own (not with its whole run)?
    pub(super) fn job_canceled(&self, run_id: &str, job: &str) -> bool {
        self.canceled_jobs
            .contains(&(run_id.to_string(), job.to_string()))
    }
}

impl Engine {
    async fn set_availability(&self, agent_id: &str, availability: &str) -> CoordResult<pb::Agent> {
        let _op = self.inner.op.lock().await;
        if !self.lock().agents.contains_key(agent_id) {
            return Err(CoordError::NotFound(format!(
                "no agent {agent_id}; `drover agents` lists them"
            )));
        }
        self.inner
            .store
            .set_availability(agent_id, availability)
            .await?;
        {
            let mut st = self.lock();
            if availability == ACTIVE {
                st.availability.remove(agent_id);
                st.self_draining.remove(agent_id);
                st.attempts.reopen(agent_id);
            } else {
                st.availability
                    .insert(agent_id.to_string(), availability.to_string());
            }
            if availability == DRAINING {
                // The agent finishes what it runs, then exits.
                if let Some(s) = st.agents.get(agent_id).and_then(|a| a.session.as_ref()) {
                    let drain = pb::CoordinatorMessage {
                        msg: Some(pb::coordinator_message::Msg::Drain(pb::Drain {
                            exit: true,
                        })),
                    };
                    if let Err(e) = s.tx.try_send(Ok(drain)) {
                        tracing::warn!(agent = %agent_id, "cannot push the drain ({e}); it gets no new jobs anyway");
                    }
                }
            }
        }
        tracing::info!(agent = %agent_id, availability, "agent availability changed");
        if availability == ACTIVE {
            self.dispatch().await;
        }
        self.list_agents()
            .into_iter()
            .find(|a| a.id == agent_id)
            .ok_or_else(|| CoordError::NotFound(format!("no agent {agent_id}")))
    }

    /// Pause an agent: no new jobs; running ones carry on.
    pub async fn pause_agent(&self, agent_id: &str) -> CoordResult<pb::Agent> {
        self.set_availability(agent_id, PAUSED).await
    }

    /// Resume a paused or drained agent.
    pub async fn resume_agent(&self, agent_id: &str) -> CoordResult<pb::Agent> {
        self.set_availability(agent_id, ACTIVE).await
    }

    /// Drain an agent: no new jobs; it is told to finish its running jobs and exit.
    pub async fn drain_agent(&self, agent_id: &str) -> CoordResult<pb::Agent> {
        self.set_availability(agent_id, DRAINING).await
    }

    /// The agent announced it drains (SIGTERM): no new jobs until its next hello.
    pub fn agent_draining(&self, agent_id: &str) {
        tracing::info!(agent = %agent_id, "agent is draining");
        self.lock().self_draining.insert(agent_id.to_string());
    }

    /// A new session of the agent: its own earlier drain is over (operators' decisions stay).
    pub(super) fn clear_self_draining(st: &mut State, agent_id: &str) {
        st.self_draining.remove(agent_id);
        st.attempts.reopen(agent_id);
    }

    /// Cancel one job: a waiting or queued job ends `canceled` at once (jobs needing it are
    /// skipped); a running one is stopped through its agent (SIGTERM, SIGKILL after the grace) and
    /// ends `canceled` when the agent reports. Returns false when the job had already finished.
    pub async fn cancel_job(&self, run_id: &str, job: &str) -> CoordResult<bool> {
        let active = self.lock().runs.contains_key(run_id);
        if !active {
            // A run that just finished may not be in the file yet.
            self.settled().await?;
            let run = self
                .inner
                .store
                .get_run(run_id)
                .await?
                .ok_or_else(|| CoordError::NotFound(format!("run {run_id} not found")))?;
            return match run.job(job) {
                Some(_) => Ok(false),
                None => Err(CoordError::NotFound(format!(
                    "run {run_id} has no job {job:?}"
                ))),
            };
        }
        let grace = self.inner.config.cancel_grace;
        let canceled = self
            .mutate(|st, tx, now| {
                let run = tx.run_mut(st, run_id)?;
                let idx = run.job_index(job).ok_or_else(|| {
                    CoordError::NotFound(format!("run {run_id} has no job {job:?}"))
                })?;
                let mut stop = None;
                let j = &mut run.jobs[idx];
                match j.state {
                    Status::Waiting | Status::Queued => {
                        j.state = Status::Canceled;
                        j.failure = FailureClass::Canceled as i32;
                        j.reason = "canceled by user".into();
                        j.finished_ms = Some(now);
                    }
                    Status::Running => {
                        if let (Some(att), Some(agent)) = (&j.attempt_id, &j.agent_id) {
                            stop = Some((
                                agent.clone(),
                                cancel_msg(att, grace, "job canceled by user"),
                            ));
                        }
                    }
                    _ => return Ok(false),
                }
                super::machine::settle(run, now);
                tx.messages.extend(stop);
                // Before anything else can see the job: its attempt's result must end it canceled.
                st.canceled_jobs
                    .insert((run_id.to_string(), job.to_string()));
                Ok(true)
            })
            .await?;
        if canceled {
            tracing::info!(run = %run_id, job, "job canceled");
        }
        Ok(canceled)
    }
}
