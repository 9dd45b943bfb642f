//! `drover artifacts list RUN [JOB]` and `drover artifacts get RUN JOB PATH -o FILE`.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use drover_proto::v1::{Artifact, GetArtifactRequest, ListArtifactsRequest};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt as _;

use crate::client::Coordinator;
use crate::output::{self, OutputFormat};

/// `drover artifacts` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ArtifactsCommand {
    /// List the artifacts of a run, or of one of its jobs.
    List {
        /// Run id.
        run: String,
        /// Job name; every job when omitted.
        job: Option<String>,
    },
    /// Download one artifact, verifying its sha256.
    Get {
        /// Run id.
        run: String,
        /// Job name.
        job: String,
        /// Artifact path, relative to the job's workspace.
        path: String,
        /// Where to write it; `-` for stdout.
        #[arg(
            short = 'o',
            long = "output-file",
            value_name = "FILE",
            required = true
        )]
        output_file: PathBuf,
    },
}

/// Runs an `artifacts` subcommand.
pub(crate) async fn artifacts(
    url: &str,
    out: OutputFormat,
    command: ArtifactsCommand,
) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    match command {
        ArtifactsCommand::List { run, job } => {
            let artifacts = list_artifacts(&coordinator, &run, job.as_deref()).await?;
            match out {
                OutputFormat::Text => print!("{}", output::artifacts_table(&artifacts)),
                OutputFormat::Json => {
                    let list: Vec<_> = artifacts.iter().map(output::artifact_json).collect();
                    print!("{}", output::to_json_text(&serde_json::Value::Array(list)));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ArtifactsCommand::Get {
            run,
            job,
            path,
            output_file,
        } => {
            get_artifact(&coordinator, &run, &job, &path, &output_file).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn list_artifacts(
    coordinator: &Coordinator,
    run: &str,
    job: Option<&str>,
) -> anyhow::Result<Vec<Artifact>> {
    let what = match job {
        Some(job) => format!("artifacts of job {job} in run {run}"),
        None => format!("artifacts of run {run}"),
    };
    Ok(coordinator
        .client()
        .list_artifacts(ListArtifactsRequest {
            run_id: run.to_string(),
            job: job.unwrap_or_default().to_string(),
        })
        .await
        .map_err(|s| coordinator.error(s, what))?
        .into_inner()
        .artifacts)
}

/// Where downloaded bytes go: a temp file next to the target (renamed into place only once
/// verified, so a failed download never leaves a plausible-looking file), or stdout.
enum Sink {
    File(tempfile::NamedTempFile),
    Stdout(tokio::io::Stdout),
}

async fn get_artifact(
    coordinator: &Coordinator,
    run: &str,
    job: &str,
    path: &str,
    output: &Path,
) -> anyhow::Result<()> {
    let listing = list_artifacts(coordinator, run, Some(job)).await?;
    let Some(artifact) = listing.into_iter().find(|a| a.path == path && a.job == job) else {
        anyhow::bail!("artifact {path} not found in job {job} of run {run}");
    };
    let to_stdout = output.as_os_str() == "-";
    let mut sink = if to_stdout {
        Sink::Stdout(tokio::io::stdout())
    } else {
        let dir = match output.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let temp = tempfile::Builder::new()
            .prefix(".drover-download-")
            .tempfile_in(&dir)
            .map_err(|e| anyhow::anyhow!("cannot write in {}: {e}", dir.display()))?;
        Sink::File(temp)
    };

    let what = format!("artifact {path} of job {job} in run {run}");
    let mut stream = coordinator
        .client()
        .get_artifact(GetArtifactRequest {
            run_id: run.to_string(),
            job: job.to_string(),
            path: path.to_string(),
        })
        .await
        .map_err(|s| coordinator.error(s, &what))?
        .into_inner();
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let bar = crate::progress::transfer(path, artifact.size);
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| coordinator.error(s, &what))?
    {
        hasher.update(&chunk.data);
        received += chunk.data.len() as u64;
        bar.set_position(received);
        match &mut sink {
            // Local-disk writes of 128 KiB chunks; blocking briefly is cheaper than a thread hop.
            Sink::File(f) => f
                .as_file_mut()
                .write_all(&chunk.data)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", output.display()))?,
            Sink::Stdout(s) => s
                .write_all(&chunk.data)
                .await
                .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))?,
        }
    }
    bar.finish_and_clear();
    let digest = hex::encode(hasher.finalize());
    if received != artifact.size || digest != artifact.digest {
        anyhow::bail!(
            "{what} is corrupt: received {received} bytes with sha256 {digest}, expected {} bytes with sha256 {}",
            artifact.size,
            artifact.digest
        );
    }
    match sink {
        Sink::Stdout(mut s) => {
            s.flush()
                .await
                .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))?;
        }
        Sink::File(mut temp) => {
            let write_err =
                |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", output.display());
            temp.as_file_mut().flush().map_err(write_err)?;
            temp.as_file().sync_all().map_err(write_err)?;
            let mode = artifact.mode & 0o7777;
            let mode = if mode == 0 { 0o644 } else { mode };
            std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(mode))
                .map_err(write_err)?;
            temp.persist(output)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {}", output.display(), e.error))?;
            eprintln!(
                "{} ({}, sha256 {digest} verified)",
                output.display(),
                output::format_bytes(received)
            );
        }
    }
    Ok(())
}
