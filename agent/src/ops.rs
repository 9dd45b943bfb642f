//! Operator-facing options of the agent: log format and durations given on the command line.
//! (Logging itself is set up by `drover-telemetry`, shared with the coordinator.)

use serde::Deserialize;

/// How the agent writes its own log lines (on stderr).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

pub use drover_proto::duration::parse_duration;
