//! Agent configuration: a TOML file, overridden by flags and `DROVER_*` environment variables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
    about = "Drover build agent: runs job steps in Docker"
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
        Ok(Self {
            coordinator: cli.coordinator.or(file.coordinator),
            token: cli.token.or(file.token).filter(|t| !t.is_empty()),
            labels,
            capacity,
            state_dir: cli
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            name: cli.name.or(file.name).unwrap_or_else(hostname),
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
