//! The attempts running now, with how many each agent holds kept beside them: the scheduler asks every
//! attached agent's count on each pass (it counted the whole map into a fresh hash map per pass, several
//! times per job under load), and the lease check asks it of every agent.
//!
//! Beside them, the agents that may have room ([`Running::open`]): the scheduler looks only at those, not
//! at the whole fleet. With a backlog every agent is busy, and scanning a thousand agents for the one that
//! just freed a slot was a quarter of the coordinator's CPU at a thousand agents (it grows with the fleet).
//! An agent enters the set whenever it may have gained room (an attempt of it ended, it attached, its
//! record or availability changed: [`Running::reopen`]) and leaves it when the scheduler finds it without.

use std::collections::{BTreeSet, HashMap};

use super::model::AttemptRec;

/// Running attempts by id, and their number per agent.
#[derive(Debug, Default)]
pub(super) struct Running {
    by_id: HashMap<String, AttemptRec>,
    per_agent: HashMap<String, u32>,
    /// Agents that may have room, by id (the scheduler's order).
    open: BTreeSet<String>,
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
        self.reopen(agent_id);
    }

    /// Agent `agent_id` may have room now: the scheduler looks at it on its next pass.
    pub(super) fn reopen(&mut self, agent_id: &str) {
        if !self.open.contains(agent_id) {
            self.open.insert(agent_id.to_string());
        }
    }

    /// The agents that may have room, by id.
    pub(super) fn open(&self) -> impl Iterator<Item = &String> {
        self.open.iter()
    }

    /// The scheduler found these agents without room (or not taking work): they wait for a
    /// [`Running::reopen`].
    pub(super) fn close(&mut self, agents: &[String]) {
        for a in agents {
            self.open.remove(a);
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

    #[test]
    fn an_agent_closed_without_room_reopens_when_an_attempt_of_it_ends() {
        let mut r = Running::default();
        let open = |r: &Running| r.open().cloned().collect::<Vec<_>>();
        r.reopen("y");
        r.reopen("x");
        r.reopen("x");
        assert_eq!(open(&r), ["x", "y"], "by id, once each");
        r.insert(attempt("a1", "x"));
        r.insert(attempt("a2", "y"));
        r.close(&["x".to_string(), "y".to_string()]);
        assert!(open(&r).is_empty());
        // Starting an attempt gives no room; ending one does, for its agent only.
        r.insert(attempt("a3", "x"));
        assert!(open(&r).is_empty());
        r.remove("a1");
        assert_eq!(open(&r), ["x"]);
        // An attempt moved to another agent frees a slot on the first.
        r.close(&["x".to_string()]);
        r.insert(attempt("a2", "x"));
        assert_eq!(open(&r), ["y"]);
    }
}
