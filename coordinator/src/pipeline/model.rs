//! The validated pipeline model: what `parse` returns and the engine stores.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A validated pipeline: jobs in file order, `needs` forming a DAG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Jobs in the order the file lists them.
    pub jobs: Vec<JobSpec>,
}

/// One job of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job name (the key in `jobs:`), unique.
    pub name: String,
    /// Jobs that must succeed first.
    pub needs: Vec<String>,
    /// Label selector: an agent runs the job only if it has every label with this value.
    pub agents: BTreeMap<String, String>,
    /// Environment for every step (a step's own `env` wins).
    pub env: BTreeMap<String, String>,
    /// Steps, run in order in one workspace.
    pub steps: Vec<StepSpec>,
    /// Workspace-relative paths or globs kept as artifacts after success.
    pub artifacts: Vec<String>,
    /// Job timeout in seconds, if any.
    pub timeout_secs: Option<u64>,
    /// Names of coordinator secrets given to every step as environment variables (and masked in logs).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// `cache:`: restored into the workspace before the first step, saved after success.
    #[serde(default)]
    pub cache: Option<CacheSpec>,
}

/// A job's `cache:` (see `docs/caches.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheSpec {
    /// Template of the exact key (`drover_proto::cache_key` syntax).
    pub key: String,
    /// Templates of fallback key prefixes, in order.
    pub restore_keys: Vec<String>,
    /// Workspace-relative files and directories to cache.
    pub paths: Vec<String>,
    /// Who shares the keys: `None` means the run's name (the pipeline file name by default).
    pub scope: Option<String>,
}

impl JobSpec {
    /// What the job's steps ask of an agent's host (privileged mode, host paths).
    pub fn host_needs(&self) -> drover_proto::policy::HostNeeds {
        drover_proto::policy::HostNeeds {
            privileged: self.steps.iter().any(|s| s.host.privileged),
            host_paths: self
                .steps
                .iter()
                .flat_map(|s| s.host.volumes.iter().map(|v| v.host.clone()))
                .collect(),
        }
    }
}

/// One step: a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Step name (given, or `step-N` counting from 1).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Commands, run with `sh -e`.
    pub commands: Vec<String>,
    /// Step environment.
    pub env: BTreeMap<String, String>,
    /// Working directory (relative paths are under the workspace).
    pub workdir: Option<String>,
    /// Step timeout in seconds, if any.
    pub timeout_secs: Option<u64>,
    /// Pull policy.
    pub pull: PullPolicy,
    /// CPU and memory limits of the step's container.
    #[serde(default)]
    pub resources: Resources,
    /// Privileged mode and host mounts: run only on agents that allow them.
    #[serde(default)]
    pub host: HostAccess,
}

/// What a step asks of the host beyond a plain container (`privileged:`, `volumes:`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAccess {
    /// Run the container privileged.
    #[serde(default)]
    pub privileged: bool,
    /// Host directories bind-mounted into the container.
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

/// One `volumes:` entry: `/host/path:/container/path[:ro|:rw]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Absolute path on the agent's host.
    pub host: String,
    /// Absolute path in the container.
    pub container: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Limits of a step's container (`resources: {cpus: 0.5, memory: 256Mi}`); none means the engine's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU quota in billionths of a CPU (Docker's NanoCpus), if limited.
    #[serde(default)]
    pub nano_cpus: Option<u64>,
    /// Memory limit in bytes, if limited.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// When to pull a step image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only if the image is missing.
    #[default]
    IfNotPresent,
    /// Pull every time.
    Always,
    /// Never pull.
    Never,
}
