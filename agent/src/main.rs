//! `drover-agent`: enrolls once, attaches to the coordinator and runs job steps in Docker (or, opted
//! into with `--executor shell`, as unisolated host processes).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use drover_agent::backoff::Backoff;
use drover_agent::client::{self, ClientError};
use drover_agent::config::{AgentConfig, Cli, ExecutorKind};
use drover_agent::credential::{self, Credential};
use drover_agent::executor::{DockerExecutor, Executor, ShellExecutor};
use drover_agent::identity::{self, Identity};
use drover_agent::reaper;
use drover_agent::runner::RunnerContext;
use drover_agent::session::{Session, SessionConfig};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// How long enrollment keeps retrying an unreachable coordinator.
const ENROLL_PATIENCE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> ExitCode {
    // One TLS crypto provider for the whole process, chosen here rather than by feature unification.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The configuration decides the log format, so it is read before logging starts.
    let cfg = match AgentConfig::resolve(Cli::parse()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("drover-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match drover_telemetry::init(drover_telemetry::TelemetryConfig {
        service: "drover-agent",
        json_logs: cfg.log_format == drover_agent::ops::LogFormat::Json,
        otlp_endpoint: cfg.otlp_endpoint.clone(),
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("drover-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-agent: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Flush buffered spans; the batch exporter blocks, so off the async workers.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
    let drain = CancellationToken::new();
    tokio::spawn(watch_signals(drain.clone()));
    // Stopped when `run` returns (success or error), so the process can exit.
    let metrics_stop = CancellationToken::new();
    let _metrics_stop_guard = metrics_stop.clone().drop_guard();
    if let Some(addr) = cfg.metrics_listen {
        let (bound, _handle) = drover_agent::metrics::serve(addr, metrics_stop.clone()).await?;
        tracing::info!(%bound, "serving Prometheus metrics at /metrics");
    }

    let labels: HashMap<String, String> = cfg.labels.clone().into_iter().collect();
    let (cred, url) = match credential::load(&cfg.state_dir)? {
        Some(cred) => {
            if cfg.token.is_some() {
                tracing::info!(agent = %cred.agent_id, "already enrolled; ignoring the enrollment token");
            }
            let url = cfg
                .coordinator
                .clone()
                .unwrap_or_else(|| cred.coordinator.clone());
            (cred, url)
        }
        None => {
            let Some(token) = cfg.token.clone() else {
                bail!(
                    "this agent is not enrolled yet: give an enrollment token with --token or DROVER_TOKEN (state dir {})",
                    cfg.state_dir.display()
                );
            };
            let url = cfg
                .coordinator
                .clone()
                .unwrap_or_else(|| drover_proto::DEFAULT_COORDINATOR.to_string());
            let ca = credential::load_ca(&cfg.state_dir, cfg.ca_file.as_deref())?;
            let (cred, identity) = enroll(
                &url,
                &token,
                ca.as_deref(),
                labels.clone(),
                &cfg.name,
                &drain,
            )
            .await?;
            // The certificate first: a credential without it would be refused under mutual TLS.
            if let Some(id) = &identity {
                identity::store(&cfg.state_dir, id)?;
            }
            credential::store(&cfg.state_dir, &cred)?;
            if let Some(ca) = &ca {
                // Kept beside the credential: later starts trust the CA this agent enrolled with.
                credential::store_ca(&cfg.state_dir, ca)?;
            }
            tracing::info!(agent = %cred.agent_id, "enrolled");
            (cred, url)
        }
    };

    match cfg.executor {
        ExecutorKind::Docker => {
            let executor = DockerExecutor::connect().await?;
            serve(&cfg, executor, cred, url, labels, drain).await
        }
        ExecutorKind::Shell => {
            let root = cfg.state_dir.join("shell");
            tracing::warn!(
                workspaces = %root.display(),
                "the shell executor runs every step directly on this host as this agent's user, \
                 NOT isolated: a step can read and change anything that user can; use it only on \
                 hosts dedicated to trusted pipelines"
            );
            let executor = ShellExecutor::new(root)?;
            serve(&cfg, executor, cred, url, labels, drain).await
        }
    }
}

/// Recovers what an earlier run left, then serves the coordinator with `executor` until drained.
async fn serve<E: Executor>(
    cfg: &AgentConfig,
    executor: E,
    cred: Credential,
    url: String,
    labels: HashMap<String, String>,
    drain: CancellationToken,
) -> anyhow::Result<()> {
    // Attempts whose step container survived an earlier run are re-adopted; the rest is reaped.
    let adopted = reaper::recover(&executor, &cred.agent_id, &cfg.state_dir)
        .await
        .context("clearing spools of an earlier run")?;

    let ca = credential::load_ca(&cfg.state_dir, cfg.ca_file.as_deref())?;
    let identity = match identity::load(&cfg.state_dir)? {
        Some(id) if url.starts_with("https://") => {
            if id.expired()? {
                bail!(
                    "the client certificate {} has expired (the agent was not running to renew it): \
                     delete credential.json, client.pem and client.key in {} and enroll again",
                    identity::cert_path(&cfg.state_dir).display(),
                    cfg.state_dir.display()
                );
            }
            Some(identity::SharedIdentity::new(id)?)
        }
        _ => None,
    };
    let channel = client::channel_with_tls(&url, ca.as_deref(), identity.as_ref())?;
    let agent_client = client::agent_client(channel, &cred.credential)?;
    let renewals = CancellationToken::new();
    let _renewals_guard = renewals.clone().drop_guard();
    if let Some(id) = &identity {
        tokio::spawn(identity::keep_renewed(
            agent_client.clone(),
            id.clone(),
            cfg.state_dir.clone(),
            renewals,
        ));
    }
    let ctx = Arc::new(RunnerContext {
        executor: Arc::new(executor),
        client: agent_client.clone(),
        agent_id: cred.agent_id.clone(),
        state_dir: cfg.state_dir.clone(),
        max_log_bytes: cfg.max_log_bytes,
        host_policy: cfg.host_policy.clone(),
    });
    let session = Session::new(
        SessionConfig {
            agent_id: cred.agent_id.clone(),
            labels,
            // An ephemeral agent takes exactly one job, so it offers one slot.
            capacity: if cfg.ephemeral { 1 } else { cfg.capacity },
            hostname: cfg.name.clone(),
            coordinator_url: url,
        },
        agent_client,
        ctx,
    )
    .with_lifecycle(cfg.ephemeral, cfg.idle_timeout)
    .adopting(adopted);
    session.run(drain).await?;
    tracing::info!("drained; exiting");
    Ok(())
}

/// Enrolls, retrying while the coordinator is unreachable (it may still be starting).
async fn enroll(
    url: &str,
    token: &str,
    ca: Option<&[u8]>,
    labels: HashMap<String, String>,
    hostname: &str,
    drain: &CancellationToken,
) -> anyhow::Result<(Credential, Option<Identity>)> {
    let channel = client::channel_with_ca(url, ca)?;
    // The key stays on this host; a coordinator running mutual TLS signs a certificate for it.
    let (key_pem, csr) = identity::new_request()?;
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match client::enroll(channel.clone(), token, labels.clone(), hostname, &csr).await {
            Ok(r) => {
                let identity = (!r.client_cert_pem.is_empty()).then(|| Identity {
                    cert_pem: r.client_cert_pem,
                    key_pem: key_pem.clone(),
                });
                let cred = Credential {
                    agent_id: r.agent_id,
                    credential: r.credential,
                    coordinator: url.to_string(),
                };
                return Ok((cred, identity));
            }
            Err(ClientError::Rpc { status, .. })
                if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
                    && started.elapsed() < ENROLL_PATIENCE =>
            {
                tracing::warn!(%status, "coordinator unreachable; retrying enrollment");
            }
            Err(e) => return Err(e).with_context(|| format!("enrolling with {url}")),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff.next_delay()) => {}
            () = drain.cancelled() => bail!("interrupted before enrollment finished"),
        }
    }
}

/// SIGTERM or SIGINT: drain (finish running jobs, take no new ones, then exit).
async fn watch_signals(drain: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("signal received: draining");
    drain.cancel();
}
