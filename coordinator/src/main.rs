//! `drover-coordinator`: accepts pipelines and pushes their jobs to agents.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use drover_coordinator::config::{Cli, Config, LogFormat};
use drover_coordinator::Server;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-coordinator: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drover-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::from_cli(&cli)?;
    init_tracing(config.log_format);
    let data_dir = config.data_dir.clone();
    let server = Server::bind(config)
        .await
        .context("drover-coordinator failed to start")?;
    // Tests and scripts wait for this exact line.
    eprintln!(
        "drover-coordinator listening on {} (data {})",
        server.local_addr(),
        data_dir.display()
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut serving = tokio::spawn(server.serve(async move {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        r = &mut serving => return r.context("server task failed")?.context("server failed"),
        s = shutdown_signal() => s?,
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(10), &mut serving).await {
        Ok(r) => r.context("server task failed")?.context("server failed")?,
        Err(_) => {
            tracing::warn!("streams still open after 10 s; exiting anyway");
            serving.abort();
        }
    }
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
