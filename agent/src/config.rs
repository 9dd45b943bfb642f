//! Agent configuration: a TOML file, overridden by flags and `DROVER_*` environment variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Default state directory (relative to the working directory).
pub const DEFAULT_STATE_DIR: &str = "./drover-agent-state";
/// Default number of concurrent jobs.
pub const DEFAULT_CAPACITY: u32 = 1;

/// Command line of `drover-agent`; every flag can also come from the environment.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "drover-agent",
    version,
    about = "Drover build agent: runs job steps in Docker (or, with --executor shell, unisolated on the host)"
)]
pub struct Cli {
    /// TOML configuration file (flags and environment override it).
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Coordinator URL, e.g. http://127.0.0.1:7330.
    #[arg(long, env = "DROVER_COORDINATOR")]
    pub coordinator: Option<String>,
    /// One-time enrollment token (ignored once the agent has a credential).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Labels, `key=value` separated by commas, e.g. os=linux,queue=default.
    #[arg(long, env = "DROVER_LABELS")]
    pub labels: Option<String>,
    /// Jobs run at once.
    #[arg(long, env = "DROVER_CAPACITY")]
    pub capacity: Option<u32>,
    /// Directory for the credential, log spools and scratch files.
    #[arg(long, env = "DROVER_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Name shown to operators (defaults to the host name).
    #[arg(long, env = "DROVER_NAME")]
    pub name: Option<String>,
    /// Per-step log cap in bytes (default 100 MiB, 0 for none): output past it is dropped behind
    /// a `[drover] log truncated at N bytes` line while the step runs on.
    #[arg(long, env = "DROVER_MAX_LOG_BYTES")]
    pub max_log_bytes: Option<u64>,
    /// Run one job, then exit 0 (for autoscaled, throw-away build hosts).
    #[arg(long, env = "DROVER_EPHEMERAL")]
    pub ephemeral: bool,
    /// Exit 0 after this long without a job, e.g. 5m (default: never).
    #[arg(long, env = "DROVER_IDLE_TIMEOUT", value_name = "DURATION", value_parser = crate::ops::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Format of the agent's own log lines on stderr.
    #[arg(long, env = "DROVER_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::ops::LogFormat>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464 (default: off).
    #[arg(long, env = "DROVER_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export OpenTelemetry spans over OTLP/gRPC to this URL, e.g. http://127.0.0.1:4317 (default: off).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator, e.g. the coordinator's
    /// `<data>/tls/ca.pem`; kept in the state directory at enrollment and used from then on.
    #[arg(long, env = "DROVER_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Let pipeline steps ask for `privileged: true` (every capability and the host's devices: the
    /// step can take over the host). Off by default.
    #[arg(long, env = "DROVER_ALLOW_PRIVILEGED")]
    pub allow_privileged: bool,
    /// Let pipeline steps bind-mount host directories (`volumes:`). Off by default.
    #[arg(long, env = "DROVER_ALLOW_HOST_MOUNTS")]
    pub allow_host_mounts: bool,
    /// With --allow-host-mounts: host paths must lie under one of these absolute directories
    /// (comma-separated) [default: any].
    #[arg(long, env = "DROVER_HOST_MOUNT_PREFIXES", value_delimiter = ',')]
    pub host_mount_prefixes: Vec<PathBuf>,
    /// Where steps run: `docker` (default: one container per step) or `shell` (host processes,
    /// NOT isolated: for hosts without Docker; the agent warns at start).
    #[arg(long, env = "DROVER_EXECUTOR", value_enum)]
    pub executor: Option<ExecutorKind>,
}

/// Which executor runs the steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// One Docker container per step, isolated from the host.
    #[default]
    Docker,
    /// `sh -e` on the host in the workspace directory, as the agent's user: not isolated.
    Shell,
}

/// The TOML configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Coordinator URL.
    pub coordinator: Option<String>,
    /// Enrollment token.
    pub token: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Jobs run at once.
    pub capacity: Option<u32>,
    /// State directory.
    pub state_dir: Option<PathBuf>,
    /// Display name.
    pub name: Option<String>,
    /// Per-step log cap in bytes (0: none).
    pub max_log_bytes: Option<u64>,
    /// Run one job, then exit.
    pub ephemeral: Option<bool>,
    /// Exit after this long without a job (e.g. "5m").
    pub idle_timeout: Option<String>,
    /// "text" or "json".
    pub log_format: Option<crate::ops::LogFormat>,
    /// Address for the Prometheus `/metrics` listener.
    pub metrics_listen: Option<SocketAddr>,
    /// OTLP/gRPC endpoint for traces.
    pub otlp_endpoint: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator.
    pub ca_file: Option<PathBuf>,
    /// Let steps run privileged.
    pub allow_privileged: Option<bool>,
    /// Let steps mount host directories.
    pub allow_host_mounts: Option<bool>,
    /// Host directories steps may mount (empty: any).
    pub host_mount_prefixes: Option<Vec<PathBuf>>,
    /// "docker" or "shell" (unisolated).
    pub executor: Option<ExecutorKind>,
}

/// Invalid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
    /// A label is not `key=value`.
    #[error("invalid label {0:?}: expected key=value (labels are separated by commas)")]
    Label(String),
    /// Capacity is zero.
    #[error("capacity must be at least 1")]
    Capacity,
    /// Privileged mode or host mounts were allowed for the shell executor, which has neither.
    #[error(
        "--allow-privileged and --allow-host-mounts apply to the docker executor only: the shell \
         executor runs steps on the host already, without containers to grant them to"
    )]
    PolicyWithShell,
    /// `idle_timeout` in the file is not a duration.
    #[error("idle_timeout: {0}")]
    Duration(String),
    /// A host mount prefix is not an absolute path.
    #[error("host mount prefix {0:?}: expected an absolute path without \"..\"")]
    MountPrefix(PathBuf),
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Coordinator URL if configured (else the stored credential's, else the default).
    pub coordinator: Option<String>,
    /// Enrollment token, if given.
    pub token: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Jobs run at once.
    pub capacity: u32,
    /// State directory.
    pub state_dir: PathBuf,
    /// Display name (host name).
    pub name: String,
    /// Per-step log cap in bytes (0: none).
    pub max_log_bytes: u64,
    /// Run one job, then exit 0.
    pub ephemeral: bool,
    /// Exit 0 after this long without a job.
    pub idle_timeout: Option<Duration>,
    /// Format of the agent's own log lines.
    pub log_format: crate::ops::LogFormat,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to export spans (OTLP/gRPC), if anywhere.
    pub otlp_endpoint: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator, if given.
    pub ca_file: Option<PathBuf>,
    /// Privileged mode and host mounts steps may have (reported in the hello, enforced by the runner).
    pub host_policy: drover_proto::v1::HostPolicy,
    /// Where steps run.
    pub executor: ExecutorKind,
}

/// Parses `os=linux,queue=default`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut labels = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::Label(part.to_string()))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(ConfigError::Label(part.to_string()));
        }
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// Reads a TOML config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The machine's host name (best effort).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

impl AgentConfig {
    /// Merges flags/environment over the file over defaults.
    pub fn resolve(cli: Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let labels = match &cli.labels {
            Some(s) => parse_labels(s)?,
            None => file.labels,
        };
        let capacity = cli.capacity.or(file.capacity).unwrap_or(DEFAULT_CAPACITY);
        if capacity == 0 {
            return Err(ConfigError::Capacity);
        }
        let idle_timeout = match (cli.idle_timeout, &file.idle_timeout) {
            (Some(t), _) => Some(t),
            (None, Some(s)) => Some(crate::ops::parse_duration(s).map_err(ConfigError::Duration)?),
            (None, None) => None,
        };
        let prefixes = if cli.host_mount_prefixes.is_empty() {
            file.host_mount_prefixes.unwrap_or_default()
        } else {
            cli.host_mount_prefixes.clone()
        };
        let mut host_mount_prefixes = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            let ok = p.is_absolute()
                && !p
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir));
            match p.to_str() {
                Some(s) if ok => host_mount_prefixes.push(s.to_string()),
                _ => return Err(ConfigError::MountPrefix(p)),
            }
        }
        let host_policy = drover_proto::v1::HostPolicy {
            allow_privileged: cli.allow_privileged || file.allow_privileged.unwrap_or(false),
            allow_host_mounts: cli.allow_host_mounts || file.allow_host_mounts.unwrap_or(false),
            host_mount_prefixes,
        };
        let executor = cli.executor.or(file.executor).unwrap_or_default();
        if executor == ExecutorKind::Shell
            && (host_policy.allow_privileged || host_policy.allow_host_mounts)
        {
            return Err(ConfigError::PolicyWithShell);
        }
        Ok(Self {
            host_policy,
            coordinator: cli.coordinator.or(file.coordinator),
            token: cli.token.or(file.token).filter(|t| !t.is_empty()),
            labels,
            capacity,
            state_dir: cli
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            name: cli.name.or(file.name).unwrap_or_else(hostname),
            max_log_bytes: cli
                .max_log_bytes
                .or(file.max_log_bytes)
                .unwrap_or(crate::logs::DEFAULT_MAX_LOG_BYTES),
            ephemeral: cli.ephemeral || file.ephemeral.unwrap_or(false),
            idle_timeout,
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
            metrics_listen: cli.metrics_listen.or(file.metrics_listen),
            otlp_endpoint: cli
                .otlp_endpoint
                .or(file.otlp_endpoint)
                .filter(|e| !e.is_empty()),
            ca_file: cli.ca_file.or(file.ca_file),
            executor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_reject_garbage() {
        let l = parse_labels("os=linux, queue=default,,").unwrap();
        assert_eq!(l.get("os").map(String::as_str), Some("linux"));
        assert_eq!(l.get("queue").map(String::as_str), Some("default"));
        assert!(matches!(parse_labels("os"), Err(ConfigError::Label(_))));
        assert!(matches!(parse_labels("=x"), Err(ConfigError::Label(_))));
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "coordinator = \"http://file:1\"\ncapacity = 3\n[labels]\nos = \"linux\"\n",
        )
        .unwrap();
        let cfg = AgentConfig::resolve(Cli {
            config: Some(path.clone()),
            capacity: Some(5),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.coordinator.as_deref(), Some("http://file:1"));
        assert_eq!(cfg.capacity, 5);
        assert_eq!(cfg.labels.get("os").map(String::as_str), Some("linux"));
        assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(cfg.executor, ExecutorKind::Docker, "Docker unless asked");

        std::fs::write(&path, "executor = \"shell\"\n").unwrap();
        let cfg = AgentConfig::resolve(Cli {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cfg.executor, ExecutorKind::Shell);
        let err = AgentConfig::resolve(Cli {
            config: Some(path.clone()),
            allow_privileged: true,
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::PolicyWithShell), "{err}");
        std::fs::write(&path, "executor = \"chroot\"\n").unwrap();
        let err = AgentConfig::resolve(Cli {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("executor"), "{err}");

        std::fs::write(&path, "capacty = 3\n").unwrap();
        let err = AgentConfig::resolve(Cli {
            config: Some(path),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("capacty"), "{err}");
        assert!(matches!(
            AgentConfig::resolve(Cli {
                capacity: Some(0),
                ..Default::default()
            }),
            Err(ConfigError::Capacity)
        ));
    }
}
