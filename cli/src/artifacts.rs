//! `drover artifacts list RUN [JOB]` and `drover artifacts get RUN JOB PATH -o FILE`.
//!
//! A download goes to `FILE.drover-partial` and is renamed into place only once its sha256 is
//! verified. A broken connection is retried (`--retries`), each try asking for the bytes after those
//! already written; a `drover artifacts get` run again after a failure resumes from the partial file.

use drover_proto::errors::is_transient;
use std::io::{Read as _, Write as _};
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
        /// Retries after a broken connection; each one resumes where the download stopped.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_RETRIES)]
        retries: u32,
    },
}

/// Retries of a download after broken connections, unless `--retries` says otherwise.
const DEFAULT_RETRIES: u32 = 5;
/// First pause before a retry; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest pause between retries.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

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
            retries,
        } => {
            get_artifact(&coordinator, &run, &job, &path, &output_file, retries).await?;
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

/// Where downloaded bytes go: `<FILE>.drover-partial` next to the target (renamed into place only
/// once verified, so a failed download never leaves a plausible-looking file, and kept on failure so
/// the next run resumes), or stdout.
enum Sink {
    File {
        file: std::fs::File,
        partial: PathBuf,
    },
    Stdout(tokio::io::Stdout),
}

/// The partial file of a download to `output`.
fn partial_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".drover-partial");
    PathBuf::from(name)
}

/// Opens (or creates) the partial file of `output`, hashing what it already holds. A partial file
/// longer than the artifact cannot be a prefix of it and is started over.
fn open_partial(output: &Path, size: u64, hasher: &mut Sha256) -> anyhow::Result<(Sink, u64)> {
    let partial = partial_path(output);
    let write_err = |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", partial.display());
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(&partial)
        .map_err(write_err)?;
    let mut held = file.metadata().map_err(write_err)?.len();
    if held > size {
        file.set_len(0).map_err(write_err)?;
        held = 0;
    }
    if held > 0 {
        let mut buf = vec![0u8; 1 << 20];
        let mut read = 0u64;
        while read < held {
            let n = file.read(&mut buf).map_err(write_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            read += n as u64;
        }
        held = read;
    }
    Ok((Sink::File { file, partial }, held))
}

/// How one try of a download ended badly.
enum TryError {
    /// The call failed; maybe a retry helps.
    Rpc(tonic::Status),
    /// Anything else (local I/O): final.
    Other(anyhow::Error),
}

/// One try: asks for the artifact from `*received` on and appends to `sink`; `hasher` and `received`
/// always cover exactly the bytes written.
async fn fetch_from(
    coordinator: &Coordinator,
    request: GetArtifactRequest,
    sink: &mut Sink,
    hasher: &mut Sha256,
    received: &mut u64,
    bar: &indicatif::ProgressBar,
    output: &Path,
) -> Result<(), TryError> {
    let mut stream = coordinator
        .client()
        .get_artifact(request)
        .await
        .map_err(TryError::Rpc)?
        .into_inner();
    while let Some(chunk) = stream.message().await.map_err(TryError::Rpc)? {
        match sink {
            // Local-disk writes of 128 KiB chunks; blocking briefly is cheaper than a thread hop.
            Sink::File { file, .. } => file.write_all(&chunk.data).map_err(|e| {
                TryError::Other(anyhow::anyhow!("cannot write {}: {e}", output.display()))
            })?,
            Sink::Stdout(s) => s
                .write_all(&chunk.data)
                .await
                .map_err(|e| TryError::Other(anyhow::anyhow!("cannot write to stdout: {e}")))?,
        }
        hasher.update(&chunk.data);
        *received += chunk.data.len() as u64;
        bar.set_position(*received);
    }
    Ok(())
}

async fn get_artifact(
    coordinator: &Coordinator,
    run: &str,
    job: &str,
    path: &str,
    output: &Path,
    retries: u32,
) -> anyhow::Result<()> {
    let listing = list_artifacts(coordinator, run, Some(job)).await?;
    let Some(artifact) = listing.into_iter().find(|a| a.path == path && a.job == job) else {
        anyhow::bail!("artifact {path} not found in job {job} of run {run}");
    };
    let to_stdout = output.as_os_str() == "-";
    let mut hasher = Sha256::new();
    let (mut sink, mut received) = if to_stdout {
        (Sink::Stdout(tokio::io::stdout()), 0)
    } else {
        open_partial(output, artifact.size, &mut hasher)?
    };
    if received > 0 {
        eprintln!(
            "resuming {} at {} of {}",
            output.display(),
            output::format_bytes(received),
            output::format_bytes(artifact.size)
        );
    }

    let what = format!("artifact {path} of job {job} in run {run}");
    let bar = crate::progress::transfer(path, artifact.size);
    bar.set_position(received);
    let mut tries_left = retries;
    let mut pause = FIRST_BACKOFF;
    loop {
        let request = GetArtifactRequest {
            run_id: run.to_string(),
            job: job.to_string(),
            path: path.to_string(),
            offset: received,
        };
        match fetch_from(
            coordinator,
            request,
            &mut sink,
            &mut hasher,
            &mut received,
            &bar,
            output,
        )
        .await
        {
            Ok(()) => break,
            Err(TryError::Rpc(status)) if is_transient(&status) && tries_left > 0 => {
                tries_left -= 1;
                bar.suspend(|| {
                    eprintln!(
                        "{what}: transfer interrupted after {} ({}); resuming in {} ms",
                        output::format_bytes(received),
                        status.message(),
                        pause.as_millis()
                    )
                });
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_BACKOFF);
            }
            Err(TryError::Rpc(status)) => {
                bar.finish_and_clear();
                let mut err = coordinator.error(status, &what);
                if let Sink::File { partial, .. } = &sink {
                    if received > 0 {
                        err = err.context(format!(
                            "{} of {} kept in {}; run the command again to resume",
                            output::format_bytes(received),
                            output::format_bytes(artifact.size),
                            partial.display()
                        ));
                    }
                }
                return Err(err);
            }
            Err(TryError::Other(e)) => {
                bar.finish_and_clear();
                return Err(e);
            }
        }
    }
    bar.finish_and_clear();
    let digest = hex::encode(hasher.finalize());
    if received != artifact.size || digest != artifact.digest {
        if let Sink::File { partial, .. } = &sink {
            // Wrong content cannot be resumed: the next try starts over.
            let _ = std::fs::remove_file(partial);
        }
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
        Sink::File { mut file, partial } => {
            let write_err =
                |e: std::io::Error| anyhow::anyhow!("cannot write {}: {e}", output.display());
            file.flush().map_err(write_err)?;
            file.sync_all().map_err(write_err)?;
            drop(file);
            let mode = artifact.mode & 0o7777;
            let mode = if mode == 0 { 0o644 } else { mode };
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(mode))
                .map_err(write_err)?;
            std::fs::rename(&partial, output).map_err(write_err)?;
            eprintln!(
                "{} ({}, sha256 {digest} verified)",
                output.display(),
                output::format_bytes(received)
            );
        }
    }
    Ok(())
}
