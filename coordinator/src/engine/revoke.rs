//! Revoking an agent: its credential is refused from now on, its Attach stream ends, and its running
//! attempts are lost (and retried elsewhere within their retry budget).

use drover_proto::v1 as pb;

use super::Engine;
use crate::error::{CoordError, CoordResult};
use crate::store::Store;

impl Engine {
    /// The durable store (API tokens and secrets live beside runs and agents).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Revoke `agent_id`. Idempotent; returns the agent as listed afterwards.
    pub async fn revoke_agent(&self, agent_id: &str) -> CoordResult<pb::Agent> {
        {
            self.mutate_and_dispatch(|st, tx, now| {
                let live = st.agents.get_mut(agent_id).ok_or_else(|| {
                    CoordError::NotFound(format!("no agent {agent_id}; `drover agents` lists them"))
                })?;
                // Dropping the engine's sender ends the agent's Attach response stream; its reconnect is
                // refused by `authenticate`.
                live.session = None;
                let mut rec = live.rec.clone();
                rec.revoked = true;
                tx.agents.insert(agent_id.to_string(), rec);
                let ids: Vec<String> = st
                    .attempts
                    .values()
                    .filter(|a| a.agent_id == agent_id)
                    .map(|a| a.id.clone())
                    .collect();
                for id in ids {
                    self.lose_attempt(st, tx, &id, &format!("agent {agent_id} was revoked"), now)?;
                }
                Ok(())
            })
            .await?;
            tracing::warn!(agent = %agent_id, "agent revoked");
        }
        self.list_agents()
            .into_iter()
            .find(|a| a.id == agent_id)
            .ok_or_else(|| CoordError::NotFound(format!("no agent {agent_id}")))
    }
}
