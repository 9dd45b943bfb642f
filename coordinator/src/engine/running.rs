//! The attempts running now, with how many each agent holds kept beside them: the scheduler asks every
//! attached agent's count on each pass (it counted the whole map into a fresh hash map per pass, several
//! times per job under load), and the lease check asks it of every agent.

use std::collections::HashMap;

use super::model::AttemptRec;

/// Running attempts by id, and their number per agent.
#[derive(Debug, Default)]
pub(super) struct Running {
    by_id: HashMap<String, AttemptRec>,
    per_agent: HashMap<String, u32>,
}

impl Running {
    /// Add or replace attempt `a`.
    pub(super) fn insert(&mut self, a: AttemptRec) {
        let agent = a.agent_id.clone();
        if let Some(old) = self.by_id.insert(a.id.clone(), a) {
            self.release(&old.agent_id);
        }
        *self.per_agent.entry(agent).or_default() += 1;
    }

    /// Remove attempt `id`, if it runs.
    pub(super) fn remove(&mut self, id: &str) -> Option<AttemptRec> {
        let a = self.by_id.remove(id)?;
        self.release(&a.agent_id);
        Some(a)
    }

    fn release(&mut self, agent_id: &str) {
        if let Some(n) = self.per_agent.get_mut(agent_id) {
            *n -= 1;
            if *n == 0 {
                self.per_agent.remove(agent_id);
            }
        }
    }

    /// The running attempt `id`.
    pub(super) fn get(&self, id: &str) -> Option<&AttemptRec> {
        self.by_id.get(id)
    }

    /// Every running attempt, in no particular order.
    pub(super) fn values(&self) -> impl Iterator<Item = &AttemptRec> {
        self.by_id.values()
    }

    /// How many attempts agent `agent_id` runs.
    pub(super) fn on_agent(&self, agent_id: &str) -> u32 {
        self.per_agent.get(agent_id).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::Status;

    fn attempt(id: &str, agent: &str) -> AttemptRec {
        AttemptRec {
            id: id.into(),
            run_id: "r".into(),
            job: "j".into(),
            agent_id: agent.into(),
            epoch: 1,
            state: Status::Running,
            created_ms: 0,
            finished_ms: None,
        }
    }

    #[test]
    fn counts_follow_inserts_replacements_and_removals() {
        let mut r = Running::default();
        r.insert(attempt("a1", "x"));
        r.insert(attempt("a2", "x"));
        r.insert(attempt("a3", "y"));
        assert_eq!(
            (r.on_agent("x"), r.on_agent("y"), r.on_agent("z")),
            (2, 1, 0)
        );
        // Written again (a later change of the same attempt): still one.
        r.insert(attempt("a1", "x"));
        assert_eq!(r.on_agent("x"), 2);
        // Moved to another agent: counted there alone.
        r.insert(attempt("a2", "y"));
        assert_eq!((r.on_agent("x"), r.on_agent("y")), (1, 2));
        assert_eq!(r.remove("a1").map(|a| a.id), Some("a1".to_string()));
        assert!(r.remove("a1").is_none());
        assert_eq!((r.on_agent("x"), r.on_agent("y")), (0, 2));
        assert!(
            !r.per_agent.contains_key("x"),
            "an agent with none is forgotten"
        );
        r.remove("a2");
        r.remove("a3");
        assert_eq!(r.values().count(), 0);
        assert!(r.per_agent.is_empty());
    }
}
