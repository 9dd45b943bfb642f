//! Privileged mode and host mounts: what a job's steps ask for against what an agent allows. One
//! check serves the coordinator's scheduler (and `drover why`) and the agent's own refusal.

use crate::v1::{HostPolicy, StepSpec};

/// What a job's steps ask of the host beyond a plain container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNeeds {
    /// Some step runs privileged.
    pub privileged: bool,
    /// Host paths the steps mount.
    pub host_paths: Vec<String>,
}

impl HostNeeds {
    /// The needs of `steps` as they travel in an assignment.
    pub fn of_steps(steps: &[StepSpec]) -> Self {
        HostNeeds {
            privileged: steps.iter().any(|s| s.privileged),
            host_paths: steps
                .iter()
                .flat_map(|s| s.host_mounts.iter().map(|m| m.host_path.clone()))
                .collect(),
        }
    }

    /// Nothing beyond a plain container.
    pub fn is_empty(&self) -> bool {
        !self.privileged && self.host_paths.is_empty()
    }
}

/// True when `path` is `prefix` or lies under it, component by component (`/data` covers `/data/x`
/// but not `/database`).
pub fn path_within(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return path.starts_with('/');
    }
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// What `policy` does not allow of `needs`, each with the agent flag that would allow it; empty when
/// the agent may run the job.
pub fn refusals(policy: &HostPolicy, needs: &HostNeeds) -> Vec<String> {
    let mut out = Vec::new();
    if needs.privileged && !policy.allow_privileged {
        out.push("privileged mode (agent flag --allow-privileged)".to_string());
    }
    for path in &needs.host_paths {
        if !policy.allow_host_mounts {
            out.push(format!(
                "host mount of {path} (agent flag --allow-host-mounts)"
            ));
        } else if !policy.host_mount_prefixes.is_empty()
            && !policy
                .host_mount_prefixes
                .iter()
                .any(|p| path_within(path, p))
        {
            out.push(format!(
                "host mount of {path} (outside the agent's --host-mount-prefixes {})",
                policy.host_mount_prefixes.join(",")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_allowed_by_default() {
        let needs = HostNeeds {
            privileged: true,
            host_paths: vec!["/srv/cache".into()],
        };
        let r = refusals(&HostPolicy::default(), &needs);
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].contains("--allow-privileged"));
        assert!(r[1].contains("/srv/cache") && r[1].contains("--allow-host-mounts"));
        assert!(refusals(&HostPolicy::default(), &HostNeeds::default()).is_empty());
    }

    #[test]
    fn prefixes_match_whole_components() {
        let policy = HostPolicy {
            allow_privileged: false,
            allow_host_mounts: true,
            host_mount_prefixes: vec!["/data/".into(), "/cache".into()],
        };
        let check = |p: &str| {
            refusals(
                &policy,
                &HostNeeds {
                    privileged: false,
                    host_paths: vec![p.into()],
                },
            )
        };
        assert!(check("/data").is_empty());
        assert!(check("/data/x/y").is_empty());
        assert!(check("/cache/a").is_empty());
        assert!(check("/database")[0].contains("outside"));
        assert!(check("/etc")[0].contains("/data/,/cache"));
        let any = HostPolicy {
            allow_host_mounts: true,
            ..HostPolicy::default()
        };
        assert!(refusals(
            &any,
            &HostNeeds {
                privileged: false,
                host_paths: vec!["/etc".into()]
            }
        )
        .is_empty());
        assert!(path_within("/x", "/"));
    }
}
