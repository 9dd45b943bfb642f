//! `drover logs RUN JOB [STEP] [--follow] [--offset N]`: raw log bytes to stdout, unchanged.

use std::process::ExitCode;

use clap::Args;
use drover_proto::v1::FollowLogsRequest;
use tokio::io::AsyncWriteExt as _;

use crate::client::Coordinator;

/// Arguments of `drover logs`.
#[derive(Debug, Args)]
pub(crate) struct LogsArgs {
    /// Run id.
    pub(crate) run: String,
    /// Job name.
    pub(crate) job: String,
    /// Step name; every step of the job in order when omitted.
    pub(crate) step: Option<String>,
    /// Keep streaming until the log is complete.
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
    /// Start at this byte offset of the (first) step's log.
    #[arg(long, default_value_t = 0)]
    pub(crate) offset: u64,
    /// Prefix each line with the time it started, e.g. `2026-12-03T08:00:00.123Z` (UTC).
    #[arg(long, short = 't')]
    pub(crate) timestamps: bool,
}

/// Runs `drover logs`.
pub(crate) async fn logs(url: &str, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let what = match &args.step {
        Some(step) => format!("log of {}/{step} in run {}", args.job, args.run),
        None => format!("logs of job {} in run {}", args.job, args.run),
    };
    let mut stream = coordinator
        .client()
        .follow_logs(FollowLogsRequest {
            run_id: args.run.clone(),
            job: args.job.clone(),
            step: args.step.clone().unwrap_or_default(),
            offset: args.offset,
            follow: args.follow,
            timestamps: args.timestamps,
        })
        .await
        .map_err(|s| coordinator.error(s, &what))?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    let mut stamper = crate::timestamps::Stamper::default();
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| coordinator.error(s, &what))?
    {
        if event.data.is_empty() {
            continue;
        }
        let stamped;
        let bytes = if args.timestamps {
            stamped = stamper.stamp(&event);
            &stamped
        } else {
            &event.data
        };
        if let Err(e) = stdout.write_all(bytes).await {
            // A closed pipe (`drover logs ... | head`) is the reader being done, not an error.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(ExitCode::SUCCESS);
            }
            anyhow::bail!("cannot write to stdout: {e}");
        }
        // Followed logs should appear as they arrive, not when a buffer fills.
        if args.follow {
            let _ = stdout.flush().await;
        }
    }
    match stdout.flush().await {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            anyhow::bail!("cannot write to stdout: {e}")
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}
