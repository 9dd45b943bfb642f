//! The scheduler: a pure function from queued jobs and agents to assignments.
//!
//! No I/O and no clock: the engine hands it a snapshot and applies what it returns, so every decision is a
//! function of its input and is tested without sockets.

use std::borrow::Cow;
use std::collections::BTreeMap;

use drover_proto::policy::{refusals, HostNeeds};
use drover_proto::v1::HostPolicy;

/// A job ready to run, in submission order (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedJob<K> {
    /// The caller's key for the job.
    pub key: K,
    /// Labels an agent must carry, each with this exact value.
    pub selector: BTreeMap<String, String>,
    /// Privileged mode and host paths its steps ask for: only agents allowing them qualify.
    pub needs: HostNeeds,
}

/// An agent as the scheduler sees it. The engine lends its own records (a scheduling pass runs on every
/// submit and result, over every agent with a free slot: copying their labels and policies each time was
/// most of the pass).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSlots<'a> {
    /// Agent id.
    pub id: Cow<'a, str>,
    /// The agent's labels.
    pub labels: Cow<'a, BTreeMap<String, String>>,
    /// How many more jobs it can take now.
    pub free: u32,
    /// False when the agent is draining, paused or not attached.
    pub accepting: bool,
    /// Privileged mode and host mounts it allows.
    pub policy: Cow<'a, HostPolicy>,
}

/// One decision: run `job` on `agent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement<K> {
    /// The job's key.
    pub job: K,
    /// The agent id.
    pub agent: String,
}

/// True when `labels` has every selector label with an equal value.
pub fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Place queued jobs onto agents, first come first served.
///
/// Jobs are taken oldest first; each goes to a matching accepting agent with a free slot (the one with the
/// most free slots, then the smallest id, which spreads load deterministically). A job that no agent can
/// take now is passed over, so it never blocks later jobs that other agents can run.
pub fn schedule<K: Clone>(jobs: &[QueuedJob<K>], agents: &[AgentSlots]) -> Vec<Placement<K>> {
    schedule_by(
        jobs.iter()
            .map(|j| (j.key.clone(), &j.selector, j.needs.clone())),
        agents,
    )
}

/// [`schedule`] over a lazy sequence of (key, selector, host needs), oldest first: it stops drawing jobs as soon as
/// every slot is taken, so a long queue costs nothing while the fleet is busy.
pub fn schedule_by<'s, K>(
    jobs: impl IntoIterator<Item = (K, &'s BTreeMap<String, String>, HostNeeds)>,
    agents: &[AgentSlots],
) -> Vec<Placement<K>> {
    let mut free: Vec<u32> = agents
        .iter()
        .map(|a| if a.accepting { a.free } else { 0 })
        .collect();
    let mut left: u64 = free.iter().map(|f| u64::from(*f)).sum();
    let mut out = Vec::new();
    for (key, selector, needs) in jobs {
        if left == 0 {
            break;
        }
        let best = agents
            .iter()
            .enumerate()
            .filter(|(i, a)| {
                free[*i] > 0
                    && matches(selector, &a.labels)
                    && refusals(&a.policy, &needs).is_empty()
            })
            .max_by(|(i, a), (j, b)| free[*i].cmp(&free[*j]).then_with(|| b.id.cmp(&a.id)));
        if let Some((i, a)) = best {
            free[i] -= 1;
            left -= 1;
            out.push(Placement {
                job: key,
                agent: a.id.to_string(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn job(key: u32, sel: &[(&str, &str)]) -> QueuedJob<u32> {
        QueuedJob {
            key,
            selector: labels(sel),
            needs: HostNeeds::default(),
        }
    }

    fn agent(id: &str, l: &[(&str, &str)], free: u32) -> AgentSlots<'static> {
        AgentSlots {
            id: Cow::Owned(id.into()),
            labels: Cow::Owned(labels(l)),
            free,
            accepting: true,
            policy: Cow::Owned(HostPolicy::default()),
        }
    }

    fn placed(p: &[Placement<u32>]) -> Vec<(u32, &str)> {
        p.iter().map(|p| (p.job, p.agent.as_str())).collect()
    }

    #[test]
    fn selector_needs_every_label_with_equal_value() {
        assert!(matches(&labels(&[]), &labels(&[("os", "linux")])));
        assert!(matches(
            &labels(&[("os", "linux")]),
            &labels(&[("os", "linux"), ("arch", "amd64")])
        ));
        assert!(!matches(
            &labels(&[("os", "linux")]),
            &labels(&[("os", "mac")])
        ));
        assert!(!matches(
            &labels(&[("os", "linux"), ("gpu", "1")]),
            &labels(&[("os", "linux")])
        ));
    }

    #[test]
    fn oldest_job_first_and_capacity_respected() {
        let jobs = [job(1, &[]), job(2, &[]), job(3, &[])];
        let agents = [agent("a", &[], 2)];
        assert_eq!(placed(&schedule(&jobs, &agents)), vec![(1, "a"), (2, "a")]);
    }

    #[test]
    fn unmatched_job_does_not_block_later_jobs() {
        let jobs = [job(1, &[("queue", "gpu")]), job(2, &[("os", "linux")])];
        let agents = [agent("a", &[("os", "linux")], 1)];
        assert_eq!(placed(&schedule(&jobs, &agents)), vec![(2, "a")]);
    }

    #[test]
    fn agents_not_accepting_or_full_get_nothing() {
        let jobs = [job(1, &[]), job(2, &[])];
        let mut paused = agent("a", &[], 3);
        paused.accepting = false;
        let agents = [paused, agent("b", &[], 0)];
        assert!(schedule(&jobs, &agents).is_empty());
    }

    #[test]
    fn spreads_over_agents_by_free_slots() {
        let jobs = [job(1, &[]), job(2, &[]), job(3, &[])];
        let agents = [agent("a", &[], 1), agent("b", &[], 2)];
        assert_eq!(
            placed(&schedule(&jobs, &agents)),
            vec![(1, "b"), (2, "a"), (3, "b")]
        );
    }

    #[test]
    fn each_agent_takes_oldest_job_it_matches() {
        let jobs = [
            job(1, &[("os", "mac")]),
            job(2, &[("os", "linux")]),
            job(3, &[("os", "mac")]),
        ];
        let agents = [
            agent("l", &[("os", "linux")], 5),
            agent("m", &[("os", "mac")], 1),
        ];
        assert_eq!(placed(&schedule(&jobs, &agents)), vec![(1, "m"), (2, "l")]);
    }

    #[test]
    fn privileged_and_host_mount_jobs_go_only_to_agents_allowing_them() {
        let mut privileged = job(1, &[]);
        privileged.needs.privileged = true;
        let mut mounts = job(2, &[]);
        mounts.needs.host_paths = vec!["/srv/cache".into()];
        let plain = agent("a-plain", &[], 2);
        assert!(schedule(
            &[privileged.clone(), mounts.clone()],
            std::slice::from_ref(&plain)
        )
        .is_empty());
        let mut root = agent("b-root", &[], 1);
        root.policy.to_mut().allow_privileged = true;
        let mut disks = agent("c-disks", &[], 1);
        disks.policy.to_mut().allow_host_mounts = true;
        disks.policy.to_mut().host_mount_prefixes = vec!["/srv".into()];
        let jobs = [privileged, mounts, job(3, &[])];
        assert_eq!(
            placed(&schedule(&jobs, &[plain, root, disks])),
            vec![(1, "b-root"), (2, "c-disks"), (3, "a-plain")]
        );
    }
}
