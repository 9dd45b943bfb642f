//! Which caches a running attempt may touch: those of its job's scope (`cache.scope`, else the run's
//! name). The cache logic itself is in [`crate::caches`].

use super::Engine;
use crate::error::{CoordError, CoordResult};

/// Where an attempt's cache entries live and who saves them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOwner {
    /// The scope its keys belong to.
    pub scope: String,
    /// The attempt's run.
    pub run_id: String,
    /// The attempt's job.
    pub job: String,
}

impl Engine {
    /// The cache scope of `attempt_id`, which must be a current attempt of `agent_id` (at `epoch`
    /// when given) whose job has a `cache:`.
    pub fn cache_owner(
        &self,
        agent_id: &str,
        attempt_id: &str,
        epoch: Option<u64>,
    ) -> CoordResult<CacheOwner> {
        let st = self.lock();
        if let Some(epoch) = epoch {
            Self::fence(&st, agent_id, attempt_id, epoch)?;
        }
        let denied = || {
            CoordError::PermissionDenied(format!(
                "attempt {attempt_id} is not a running attempt of this agent"
            ))
        };
        let (a, run) = Self::running_attempt_of(&st, agent_id, attempt_id).ok_or_else(denied)?;
        let job = run.job(&a.job).ok_or_else(denied)?;
        let cache = job.spec.cache.as_ref().ok_or_else(|| {
            CoordError::FailedPrecondition(format!(
                "job {:?} of run {} has no cache:",
                job.name, run.id
            ))
        })?;
        Ok(CacheOwner {
            scope: cache.scope.clone().unwrap_or_else(|| run.name.clone()),
            run_id: run.id.clone(),
            job: job.name.clone(),
        })
    }
}
