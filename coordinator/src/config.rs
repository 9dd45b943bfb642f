//! Typed configuration: an optional TOML file, overridden by flags and `DROVER_*` environment variables.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this struct.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said.
        message: String,
    },
    /// A field had a bad value.
    #[error("invalid {field}: {message}")]
    Value {
        /// Which setting.
        field: &'static str,
        /// What was wrong and what was expected.
        message: String,
    },
}

/// Heartbeats per second a fleet may send by default. A heartbeat (with its share of
/// acknowledgements) costs the coordinator about 20 us of CPU on a 2-core machine, so this keeps an
/// idle fleet of any size under 5 % of one core: 10,000 agents heartbeat every 7 s.
pub const DEFAULT_MAX_HEARTBEAT_RATE: u32 = 1500;

/// Log output format of the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Command line of `drover-coordinator`; every flag also reads a `DROVER_*` variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-coordinator",
    version,
    about = "Drover coordinator: schedules pipeline jobs onto agents"
)]
pub struct Cli {
    /// TOML file with any of the settings below (flags and env win).
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7330].
    #[arg(long, env = "DROVER_LISTEN")]
    pub listen: Option<String>,
    /// HTTP listen address for the dashboard, /metrics and the probes [default: 127.0.0.1:7331].
    #[arg(long, env = "DROVER_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Directory for the database, logs and blobs [default: ./drover-data].
    #[arg(long, env = "DROVER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// How often agents send heartbeats, e.g. "2s", while the fleet is small enough for
    /// --max-heartbeat-rate; a larger fleet is told a longer interval [default: 2s].
    #[arg(long, env = "DROVER_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// How long an agent may be silent before its attempts are lost, at --heartbeat-interval; it
    /// stretches with the interval [default: 10s].
    #[arg(long, env = "DROVER_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// Heartbeats per second the whole fleet may send: past it, agents are told a longer interval
    /// (and lease TTL); 0 never stretches them [default: 1500].
    #[arg(long, env = "DROVER_MAX_HEARTBEAT_RATE")]
    pub max_heartbeat_rate: Option<u32>,
    /// Infrastructure retries per job [default: 2].
    #[arg(long, env = "DROVER_MAX_RETRIES")]
    pub max_retries: Option<u32>,
    /// Grace between SIGTERM and SIGKILL when canceling [default: 10s].
    #[arg(long, env = "DROVER_CANCEL_GRACE")]
    pub cancel_grace: Option<String>,
    /// Log format.
    #[arg(long, env = "DROVER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// TLS on the gRPC listener: auto (TLS beyond loopback), on, off [default: auto].
    #[arg(long, env = "DROVER_TLS", value_enum)]
    pub tls: Option<crate::tls::TlsMode>,
    /// Allow plaintext gRPC beyond loopback (logged as a warning).
    #[arg(long, env = "DROVER_INSECURE")]
    pub insecure: bool,
    /// Server certificate chain (PEM) to use instead of the coordinator's own CA.
    #[arg(long, env = "DROVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "DROVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names or IP addresses for the generated server certificate (repeatable, or comma-separated).
    #[arg(long, env = "DROVER_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// CA certificate (PEM) that signs agents' client certificates (mutual TLS); default: the
    /// coordinator's own CA. Needed for mutual TLS with --tls-cert.
    #[arg(long, env = "DROVER_AGENT_CA_CERT")]
    pub agent_ca_cert: Option<PathBuf>,
    /// Private key (PEM) of --agent-ca-cert.
    #[arg(long, env = "DROVER_AGENT_CA_KEY")]
    pub agent_ca_key: Option<PathBuf>,
    /// Validity of agents' client certificates, e.g. "720h"; agents renew at two thirds [default: 720h].
    #[arg(long, env = "DROVER_AGENT_CERT_TTL")]
    pub agent_cert_ttl: Option<String>,
    /// Export OpenTelemetry spans over OTLP/gRPC to this URL, e.g. http://127.0.0.1:4317 [default: off].
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Keep blobs (artifacts, contexts) in this S3 bucket instead of the data directory. Credentials
    /// come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY [default: local disk].
    #[arg(long, env = "DROVER_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Endpoint URL of an S3-compatible server (MinIO, Ceph, ...), addressed path-style [default: AWS].
    #[arg(long, env = "DROVER_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Region of the bucket [default: $AWS_REGION, else us-east-1].
    #[arg(long, env = "DROVER_S3_REGION")]
    pub s3_region: Option<String>,
    /// Key prefix of the store inside the bucket, e.g. "drover/" [default: the bucket's root].
    #[arg(long, env = "DROVER_S3_PREFIX")]
    pub s3_prefix: Option<String>,
    /// Allow a plain http:// S3 endpoint (a server on loopback).
    #[arg(long, env = "DROVER_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

/// The TOML file: the same settings as the flags, all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// Listen address.
    pub listen: Option<String>,
    /// HTTP listen address (dashboard, metrics, probes).
    pub http_listen: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Heartbeat interval ("2s").
    pub heartbeat_interval: Option<String>,
    /// Lease TTL ("10s").
    pub lease_ttl: Option<String>,
    /// Heartbeats per second the fleet may send before the interval stretches (0: never).
    pub max_heartbeat_rate: Option<u32>,
    /// Infrastructure retries per job.
    pub max_retries: Option<u32>,
    /// Cancel grace ("10s").
    pub cancel_grace: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
    /// TLS mode: "auto", "on" or "off".
    pub tls: Option<crate::tls::TlsMode>,
    /// Allow plaintext beyond loopback.
    pub insecure: Option<bool>,
    /// Server certificate chain (PEM).
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls-cert`.
    pub tls_key: Option<PathBuf>,
    /// Extra names/addresses for the generated server certificate.
    pub tls_san: Option<Vec<String>>,
    /// CA certificate (PEM) for agents' client certificates.
    pub agent_ca_cert: Option<PathBuf>,
    /// Private key (PEM) of `agent-ca-cert`.
    pub agent_ca_key: Option<PathBuf>,
    /// Validity of agents' client certificates ("720h").
    pub agent_cert_ttl: Option<String>,
    /// OTLP/gRPC endpoint for traces.
    pub otlp_endpoint: Option<String>,
    /// S3 bucket for blobs.
    pub s3_bucket: Option<String>,
    /// S3-compatible endpoint URL.
    pub s3_endpoint: Option<String>,
    /// S3 region.
    pub s3_region: Option<String>,
    /// Key prefix inside the bucket.
    pub s3_prefix: Option<String>,
    /// Allow a plain http:// endpoint.
    pub s3_allow_http: Option<bool>,
}

/// The resolved settings the coordinator runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// HTTP listen address: dashboard, `/metrics`, `/healthz`, `/readyz`.
    pub http_listen: SocketAddr,
    /// Data directory (database, logs, blobs).
    pub data_dir: PathBuf,
    /// Heartbeat interval told to agents while the fleet sends at most `max_heartbeat_rate`.
    pub heartbeat_interval: Duration,
    /// Silence after which an agent's attempts are lost, at `heartbeat_interval` (it stretches with it).
    pub lease_ttl: Duration,
    /// Heartbeats per second the fleet may send before agents are told a longer interval; 0: never.
    pub max_heartbeat_rate: u32,
    /// Infrastructure retries per job.
    pub max_retries: u32,
    /// Grace between SIGTERM and SIGKILL on cancel.
    pub cancel_grace: Duration,
    /// Log format of the binary.
    pub log_format: LogFormat,
    /// TLS on the gRPC listener (see [`crate::tls::resolve`]).
    pub tls: crate::tls::TlsSettings,
    /// Where spans are exported (OTLP/gRPC); `None`: tracing off.
    pub otlp_endpoint: Option<String>,
    /// Where blobs live: `None` for `<data_dir>/blobs`, else this S3 bucket.
    pub s3: Option<crate::artifacts::S3Settings>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7330)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7331)),
            data_dir: PathBuf::from("./drover-data"),
            heartbeat_interval: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(10),
            max_heartbeat_rate: DEFAULT_MAX_HEARTBEAT_RATE,
            max_retries: 2,
            cancel_grace: Duration::from_secs(10),
            log_format: LogFormat::Text,
            tls: crate::tls::TlsSettings::default(),
            otlp_endpoint: None,
            s3: None,
        }
    }
}

impl Config {
    /// Defaults with the given data directory: handy for tests. The HTTP side binds a free loopback port
    /// (`127.0.0.1:0`) so that several coordinators in one test process do not collide.
    pub fn with_data_dir(dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: dir.into(),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Config::default()
        }
    }

    /// Build the configuration from parsed flags, reading `--config` if given. Flags/env win over the file.
    pub fn from_cli(cli: &Cli) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let listen = match cli.listen.as_ref().or(file.listen.as_ref()) {
            Some(s) => s.parse().map_err(|e| ConfigError::Value {
                field: "listen",
                message: format!("{s:?}: {e}; expected HOST:PORT like 127.0.0.1:7330"),
            })?,
            None => d.listen,
        };
        let http_listen = match cli.http_listen.as_ref().or(file.http_listen.as_ref()) {
            Some(s) => s.parse().map_err(|e| ConfigError::Value {
                field: "http-listen",
                message: format!("{s:?}: {e}; expected HOST:PORT like 127.0.0.1:7331"),
            })?,
            None => d.http_listen,
        };
        let dur = |field: &'static str,
                   flag: &Option<String>,
                   file: &Option<String>,
                   default: Duration| {
            match flag.as_ref().or(file.as_ref()) {
                Some(s) => {
                    parse_duration(s).map_err(|message| ConfigError::Value { field, message })
                }
                None => Ok(default),
            }
        };
        let s3 = s3_settings(cli, &file)?;
        let config = Config {
            listen,
            http_listen,
            data_dir: cli.data_dir.clone().or(file.data_dir).unwrap_or(d.data_dir),
            heartbeat_interval: dur(
                "heartbeat-interval",
                &cli.heartbeat_interval,
                &file.heartbeat_interval,
                d.heartbeat_interval,
            )?,
            lease_ttl: dur("lease-ttl", &cli.lease_ttl, &file.lease_ttl, d.lease_ttl)?,
            max_heartbeat_rate: cli
                .max_heartbeat_rate
                .or(file.max_heartbeat_rate)
                .unwrap_or(d.max_heartbeat_rate),
            max_retries: cli
                .max_retries
                .or(file.max_retries)
                .unwrap_or(d.max_retries),
            cancel_grace: dur(
                "cancel-grace",
                &cli.cancel_grace,
                &file.cancel_grace,
                d.cancel_grace,
            )?,
            log_format: cli.log_format.or(file.log_format).unwrap_or_default(),
            tls: crate::tls::TlsSettings {
                mode: cli.tls.or(file.tls).unwrap_or_default(),
                insecure: cli.insecure || file.insecure.unwrap_or(false),
                cert: cli.tls_cert.clone().or(file.tls_cert),
                key: cli.tls_key.clone().or(file.tls_key),
                sans: if cli.tls_san.is_empty() {
                    file.tls_san.unwrap_or_default()
                } else {
                    cli.tls_san.clone()
                },
                agent_ca_cert: cli.agent_ca_cert.clone().or(file.agent_ca_cert),
                agent_ca_key: cli.agent_ca_key.clone().or(file.agent_ca_key),
                agent_cert_ttl: Some(dur(
                    "agent-cert-ttl",
                    &cli.agent_cert_ttl,
                    &file.agent_cert_ttl,
                    crate::mtls::DEFAULT_AGENT_CERT_TTL,
                )?),
            },
            otlp_endpoint: cli
                .otlp_endpoint
                .clone()
                .or(file.otlp_endpoint)
                .filter(|e| !e.is_empty()),
            s3,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self
            .tls
            .agent_cert_ttl
            .is_some_and(|t| t < Duration::from_secs(10))
        {
            return Err(ConfigError::Value {
                field: "agent-cert-ttl",
                message: "must be at least 10s (agents renew at two thirds of it)".into(),
            });
        }
        if self.heartbeat_interval.is_zero() {
            return Err(ConfigError::Value {
                field: "heartbeat-interval",
                message: "must be > 0".into(),
            });
        }
        if self.lease_ttl <= self.heartbeat_interval {
            return Err(ConfigError::Value {
                field: "lease-ttl",
                message: format!(
                    "{:?} must be longer than the heartbeat interval {:?}",
                    self.lease_ttl, self.heartbeat_interval
                ),
            });
        }
        Ok(())
    }
}

/// The S3 settings, when a bucket is given (flag, env or file); the other S3 settings need one.
fn s3_settings(
    cli: &Cli,
    file: &FileConfig,
) -> Result<Option<crate::artifacts::S3Settings>, ConfigError> {
    let pick = |flag: &Option<String>, file: &Option<String>| {
        flag.clone()
            .or_else(|| file.clone())
            .filter(|v| !v.is_empty())
    };
    let endpoint = pick(&cli.s3_endpoint, &file.s3_endpoint);
    let region = pick(&cli.s3_region, &file.s3_region);
    let prefix = pick(&cli.s3_prefix, &file.s3_prefix);
    let allow_http = cli.s3_allow_http || file.s3_allow_http.unwrap_or(false);
    let Some(bucket) = pick(&cli.s3_bucket, &file.s3_bucket) else {
        if endpoint.is_some() || region.is_some() || prefix.is_some() || allow_http {
            return Err(ConfigError::Value {
                field: "s3-bucket",
                message: "the S3 settings need a bucket (--s3-bucket / DROVER_S3_BUCKET)".into(),
            });
        }
        return Ok(None);
    };
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(ConfigError::Value {
                field: "s3-endpoint",
                message: format!("{e:?}: expected an http:// or https:// URL"),
            });
        }
    }
    let region = region
        .or_else(|| std::env::var("AWS_REGION").ok().filter(|r| !r.is_empty()))
        .unwrap_or_else(|| crate::artifacts::DEFAULT_S3_REGION.to_string());
    Ok(Some(crate::artifacts::S3Settings {
        bucket,
        endpoint,
        region,
        prefix: prefix.unwrap_or_default(),
        allow_http,
    }))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub use drover_proto::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nlease-ttl = \"30s\"\nmax-retries = 5\n",
        )
        .unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap(), "--lease-ttl", "3s"]);
        let c = Config::from_cli(&cli).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        assert_eq!(c.max_retries, 5);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(c.max_heartbeat_rate, DEFAULT_MAX_HEARTBEAT_RATE);
        assert_eq!(c.http_listen.port(), 7331);
        std::fs::write(&path, "max-heartbeat-rate = 500\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        assert_eq!(Config::from_cli(&cli).unwrap().max_heartbeat_rate, 500);
        let cli = Cli::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--max-heartbeat-rate",
            "0",
        ]);
        assert_eq!(Config::from_cli(&cli).unwrap().max_heartbeat_rate, 0);
    }

    #[test]
    fn http_listen_from_file_flag_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "http-listen = \"127.0.0.1:9100\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        assert_eq!(Config::from_cli(&cli).unwrap().http_listen.port(), 9100);
        let cli = Cli::parse_from(["x", "--http-listen", "127.0.0.1:0"]);
        assert_eq!(Config::from_cli(&cli).unwrap().http_listen.port(), 0);
        let cli = Cli::parse_from(["x", "--http-listen", "localhost"]);
        let e = Config::from_cli(&cli).unwrap_err().to_string();
        assert!(e.contains("http-listen"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let cli = Cli::parse_from(["x", "--lease-ttl", "soon"]);
        let e = Config::from_cli(&cli).unwrap_err().to_string();
        assert!(e.contains("lease-ttl"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap()]);
        assert!(Config::from_cli(&cli)
            .unwrap_err()
            .to_string()
            .contains("lisen"));
    }

    #[test]
    fn s3_settings_from_file_and_flags() {
        let cli = Cli::parse_from(["x"]);
        assert_eq!(
            Config::from_cli(&cli).unwrap().s3,
            None,
            "local disk by default"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "s3-bucket = \"from-file\"\ns3-region = \"eu-west-1\"\ns3-prefix = \"drover/\"\n",
        )
        .unwrap();
        let cli = Cli::parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--s3-bucket",
            "from-flag",
            "--s3-endpoint",
            "http://127.0.0.1:9000",
            "--s3-allow-http",
        ]);
        let s3 = Config::from_cli(&cli).unwrap().s3.unwrap();
        assert_eq!(
            s3,
            crate::artifacts::S3Settings {
                bucket: "from-flag".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: "eu-west-1".into(),
                prefix: "drover/".into(),
                allow_http: true,
            }
        );
        let cli = Cli::parse_from(["x", "--s3-endpoint", "http://127.0.0.1:9000"]);
        let e = Config::from_cli(&cli).unwrap_err().to_string();
        assert!(e.contains("s3-bucket"), "{e}");
        let cli = Cli::parse_from(["x", "--s3-bucket", "b", "--s3-endpoint", "minio:9000"]);
        let e = Config::from_cli(&cli).unwrap_err().to_string();
        assert!(e.contains("s3-endpoint") && e.contains("minio:9000"), "{e}");
    }
}
