//! `drover-agent`: enrolls once, attaches to the coordinator and runs job steps in Docker.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use drover_agent::backoff::Backoff;
use drover_agent::client::{self, ClientError};
use drover_agent::config::{AgentConfig, Cli};
use drover_agent::credential::{self, Credential};
use drover_agent::executor::DockerExecutor;
use drover_agent::reaper;
use drover_agent::runner::RunnerContext;
use drover_agent::session::{Session, SessionConfig};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// How long enrollment keeps retrying an unreachable coordinator.
const ENROLL_PATIENCE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cfg = AgentConfig::resolve(Cli::parse())?;
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state directory {}", cfg.state_dir.display()))?;
    let drain = CancellationToken::new();
    tokio::spawn(watch_signals(drain.clone()));

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
            let cred = enroll(&url, &token, labels.clone(), &cfg.name, &drain).await?;
            credential::store(&cfg.state_dir, &cred)?;
            tracing::info!(agent = %cred.agent_id, "enrolled");
            (cred, url)
        }
    };

    let executor = DockerExecutor::connect().await?;
    reaper::clear_state_dirs(&cfg.state_dir)
        .await
        .context("clearing spools of an earlier run")?;
    match reaper::reap(&executor, &cred.agent_id, &HashSet::new()).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed leftovers of an earlier run"),
        Err(e) => tracing::warn!(error = %e, "could not remove every leftover of an earlier run"),
    }

    let channel = client::channel(&url)?;
    let agent_client = client::agent_client(channel, &cred.credential)?;
    let ctx = Arc::new(RunnerContext {
        executor: Arc::new(executor),
        client: agent_client.clone(),
        agent_id: cred.agent_id.clone(),
        state_dir: cfg.state_dir.clone(),
    });
    let session = Session::new(
        SessionConfig {
            agent_id: cred.agent_id.clone(),
            labels,
            capacity: cfg.capacity,
            hostname: cfg.name.clone(),
            coordinator_url: url,
        },
        agent_client,
        ctx,
    );
    session.run(drain).await?;
    tracing::info!("drained; exiting");
    Ok(())
}

/// Enrolls, retrying while the coordinator is unreachable (it may still be starting).
async fn enroll(
    url: &str,
    token: &str,
    labels: HashMap<String, String>,
    hostname: &str,
    drain: &CancellationToken,
) -> anyhow::Result<Credential> {
    let channel = client::channel(url)?;
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match client::enroll(channel.clone(), token, labels.clone(), hostname).await {
            Ok(r) => {
                return Ok(Credential {
                    agent_id: r.agent_id,
                    credential: r.credential,
                    coordinator: url.to_string(),
                })
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
