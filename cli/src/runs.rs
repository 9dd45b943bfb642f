//! `drover run FILE`, `drover run show ID`, `drover runs`, `drover cancel RUN`.

use std::io::Read as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use drover_proto::v1::{
    CancelRunRequest, ContextChunk, GetRunRequest, ListRunsRequest, SubmitRunRequest,
};
use tonic::Code;

use crate::client::Coordinator;
use crate::context::{self, PackedContext};
use crate::output::{self, OutputFormat};
use crate::validate::{format_rejection, read_pipeline};
use crate::{follow, SubmitArgs};

/// Exit code when the coordinator rejects the pipeline itself.
const EXIT_INVALID_PIPELINE: u8 = 2;

/// Runs `drover run FILE [--context DIR] [--name NAME] [--follow]`.
pub(crate) async fn submit(url: &str, args: &SubmitArgs) -> anyhow::Result<ExitCode> {
    let Some(file) = args.file.as_deref() else {
        anyhow::bail!("run: a pipeline FILE is required");
    };
    let pipeline = read_pipeline(file).await?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string()),
    };
    let coordinator = Coordinator::connect(url).await?;

    let context_digest = match &args.context {
        Some(dir) => {
            let dir = dir.clone();
            // Walking and tarring is blocking file I/O.
            let packed = tokio::task::spawn_blocking(move || context::pack(&dir))
                .await
                .map_err(|e| anyhow::anyhow!("packing the context failed: {e}"))??;
            for path in &packed.skipped {
                eprintln!(
                    "drover: warning: {} skipped: not a file, directory or symlink",
                    path.display()
                );
            }
            eprintln!(
                "context: {} entries, {} (sha256 {})",
                packed.entries,
                output::format_bytes(packed.size),
                packed.digest
            );
            upload_context(&coordinator, packed).await?
        }
        None => String::new(),
    };

    let response = coordinator
        .client()
        .submit_run(SubmitRunRequest {
            pipeline,
            context_digest,
            name,
        })
        .await;
    let run_id = match response {
        Ok(r) => r.into_inner().run_id,
        Err(status) if status.code() == Code::InvalidArgument => {
            for line in format_rejection(file, status.message()) {
                eprintln!("{line}");
            }
            return Ok(ExitCode::from(EXIT_INVALID_PIPELINE));
        }
        Err(status) => return Err(coordinator.error(status, format!("submit {}", file.display()))),
    };
    println!("run {run_id} submitted");
    if args.follow {
        follow::follow_run(&coordinator, &run_id).await
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// Streams the packed tar through `UploadContext` and checks the coordinator got all of it.
async fn upload_context(
    coordinator: &Coordinator,
    packed: PackedContext,
) -> anyhow::Result<String> {
    let PackedContext {
        file, digest, size, ..
    } = packed;
    // A read error cannot travel inside the request stream; it is kept here, the stream ends
    // early, and the digest check below reports it.
    let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let (tx, rx) = tokio::sync::mpsc::channel::<ContextChunk>(4);
    let reader_error = Arc::clone(&read_error);
    let bar = crate::progress::transfer("context", size);
    let reader_bar = bar.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let mut file = file;
        loop {
            let mut buf = vec![0u8; drover_proto::CHUNK_BYTES];
            let mut filled = 0;
            // Fill whole chunks: short reads would otherwise make many small messages.
            while filled < buf.len() {
                match file.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Short section, never held across an await.
                        if let Ok(mut slot) = reader_error.lock() {
                            *slot = Some(e);
                        }
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            buf.truncate(filled);
            // Counted when handed to the stream: with a 4-chunk buffer that is within 512 KiB of the wire.
            reader_bar.inc(filled as u64);
            if tx.blocking_send(ContextChunk { data: buf }).is_err() {
                // The call ended (error or early reply); its result says why.
                return;
            }
        }
    });
    let result = coordinator
        .client()
        .upload_context(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let _ = reader.await;
    bar.finish_and_clear();
    if let Some(e) = read_error.lock().ok().and_then(|mut slot| slot.take()) {
        anyhow::bail!("cannot read the packed context: {e}");
    }
    let uploaded = result
        .map_err(|s| coordinator.error(s, "upload context"))?
        .into_inner();
    if uploaded.digest != digest || uploaded.size != size {
        anyhow::bail!(
            "context upload mismatch: sent {size} bytes with sha256 {digest}, coordinator stored {} bytes with sha256 {}",
            uploaded.size,
            uploaded.digest
        );
    }
    Ok(digest)
}

/// Runs `drover run show ID` / `drover show ID`.
pub(crate) async fn show(url: &str, out: OutputFormat, id: &str) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let run = coordinator
        .client()
        .get_run(GetRunRequest {
            run_id: id.to_string(),
        })
        .await
        .map_err(|s| coordinator.error(s, format!("run {id}")))?
        .into_inner();
    match out {
        OutputFormat::Text => print!("{}", output::run_details(&run)),
        OutputFormat::Json => print!("{}", output::to_json_text(&output::run_json(&run))),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `drover runs [--limit N]`.
pub(crate) async fn list(url: &str, out: OutputFormat, limit: u32) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let runs = coordinator
        .client()
        .list_runs(ListRunsRequest {
            limit,
            ..Default::default()
        })
        .await
        .map_err(|s| coordinator.error(s, "list runs"))?
        .into_inner()
        .runs;
    match out {
        OutputFormat::Text => print!("{}", output::runs_table(&runs)),
        OutputFormat::Json => {
            let list: Vec<_> = runs.iter().map(output::run_json).collect();
            print!("{}", output::to_json_text(&serde_json::Value::Array(list)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `drover cancel RUN`.
pub(crate) async fn cancel(url: &str, run: &str) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let response = coordinator
        .client()
        .cancel_run(CancelRunRequest {
            run_id: run.to_string(),
        })
        .await
        .map_err(|s| coordinator.error(s, format!("run {run}")))?
        .into_inner();
    let n = response.canceled_jobs;
    println!(
        "run {run}: canceled {n} job{}",
        if n == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}
