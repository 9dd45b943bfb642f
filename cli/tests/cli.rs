//! Runs the real `drover` binary against an in-process `ControlService` that serves scripted
//! answers over a real socket, so the CLI's wire behaviour (streams, exit codes, output) is
//! checked without needing the coordinator crate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_proto::v1::control_service_server::{ControlService, ControlServiceServer};
use drover_proto::v1::*;
use futures::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The stream type the generated service trait uses for server streams.
type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const GOOD_ARTIFACT: &[u8] = b"#!/bin/sh\necho built\n";

/// What the scripted coordinator saw.
#[derive(Debug, Default)]
struct Seen {
    /// Entry names of the uploaded context tar, and its digest.
    context: Option<(Vec<String>, String)>,
    /// Submitted (name, context digest).
    submitted: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default)]
struct Scripted {
    seen: Arc<Mutex<Seen>>,
}

fn step(name: &str, state: JobState, exit: i32) -> Step {
    Step {
        name: name.into(),
        image: "drover-busybox:latest".into(),
        state: state as i32,
        exit_code: exit,
        log_bytes: 0,
        ..Default::default()
    }
}

/// The run at each point of its scripted life.
fn snapshots() -> Vec<Run> {
    let build = |state: JobState| Job {
        name: "build".into(),
        state: state as i32,
        agent_id: if state == JobState::Queued {
            String::new()
        } else {
            "a1".into()
        },
        attempts: u32::from(state != JobState::Queued),
        started_ms: 1_000,
        finished_ms: if state == JobState::Succeeded {
            3_000
        } else {
            0
        },
        steps: vec![step("compile", state, 0), step("test", state, 0)],
        ..Default::default()
    };
    let test = |state: JobState| Job {
        name: "test".into(),
        state: state as i32,
        needs: vec!["build".into()],
        agent_id: if state == JobState::Queued {
            String::new()
        } else {
            "a2".into()
        },
        attempts: u32::from(state != JobState::Queued),
        failure: if state == JobState::Failed {
            FailureClass::Script as i32
        } else {
            0
        },
        exit_code: if state == JobState::Failed { 2 } else { 0 },
        reason: if state == JobState::Failed {
            "step unit exited 2".into()
        } else {
            String::new()
        },
        steps: vec![step(
            "unit",
            state,
            if state == JobState::Failed { 2 } else { 0 },
        )],
        ..Default::default()
    };
    let run = |state: RunState, jobs: Vec<Job>| Run {
        id: "r-1".into(),
        name: "pipeline.yaml".into(),
        state: state as i32,
        created_ms: 1_000,
        finished_ms: if state == RunState::Running { 0 } else { 9_000 },
        jobs,
    };
    vec![
        run(
            RunState::Running,
            vec![build(JobState::Queued), test(JobState::Queued)],
        ),
        run(
            RunState::Running,
            vec![build(JobState::Running), test(JobState::Queued)],
        ),
        run(
            RunState::Running,
            vec![build(JobState::Succeeded), test(JobState::Running)],
        ),
        run(
            RunState::Failed,
            vec![build(JobState::Succeeded), test(JobState::Failed)],
        ),
    ]
}

fn log_event(job: &str, step: &str, index: u32, offset: u64, data: &[u8], eof: bool) -> LogEvent {
    LogEvent {
        job: job.into(),
        step: step.into(),
        step_index: index,
        offset,
        data: data.to_vec(),
        eof,
        ..Default::default()
    }
}

fn stream_of<T: Send + 'static>(items: Vec<Result<T, Status>>, pause: Duration) -> Boxed<T> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        for item in items {
            if tx.send(item).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

fn artifacts_of(job: &str) -> Vec<Artifact> {
    vec![
        Artifact {
            job: job.into(),
            path: "out/app".into(),
            digest: hex::encode(Sha256::digest(GOOD_ARTIFACT)),
            size: GOOD_ARTIFACT.len() as u64,
            mode: 0o755,
        },
        Artifact {
            job: job.into(),
            path: "out/corrupt".into(),
            digest: hex::encode(Sha256::digest(b"what it should be")),
            size: 17,
            mode: 0o644,
        },
    ]
}

#[tonic::async_trait]
impl ControlService for Scripted {
    async fn validate_pipeline(
        &self,
        request: Request<ValidatePipelineRequest>,
    ) -> Result<Response<ValidatePipelineResponse>, Status> {
        let errors = if request.into_inner().pipeline.contains("imag:") {
            vec![PipelineError {
                line: 3,
                column: 5,
                message: "unknown field `imag`, expected `image`".into(),
            }]
        } else {
            Vec::new()
        };
        Ok(Response::new(ValidatePipelineResponse { errors }))
    }

    async fn upload_context(
        &self,
        request: Request<Streaming<ContextChunk>>,
    ) -> Result<Response<ContextUploaded>, Status> {
        let mut stream = request.into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.message().await? {
            assert!(chunk.data.len() <= drover_proto::CHUNK_BYTES);
            bytes.extend_from_slice(&chunk.data);
        }
        let digest = hex::encode(Sha256::digest(&bytes));
        let mut names = Vec::new();
        let mut archive = tar::Archive::new(&bytes[..]);
        for entry in archive
            .entries()
            .map_err(|e| Status::invalid_argument(e.to_string()))?
        {
            let entry = entry.map_err(|e| Status::invalid_argument(e.to_string()))?;
            let path = entry
                .path()
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            names.push(path.to_string_lossy().trim_end_matches('/').to_string());
        }
        self.seen.lock().unwrap().context = Some((names, digest.clone()));
        Ok(Response::new(ContextUploaded {
            digest,
            size: bytes.len() as u64,
        }))
    }

    async fn submit_run(
        &self,
        request: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        let request = request.into_inner();
        if request.pipeline.contains("imag:") {
            return Err(Status::invalid_argument(
                "pipeline is invalid:\nline 3, column 5: unknown field `imag`, expected `image`\nline 7, column 1: job `deploy` needs unknown job `buld`",
            ));
        }
        self.seen
            .lock()
            .unwrap()
            .submitted
            .push((request.name, request.context_digest));
        Ok(Response::new(SubmitRunResponse {
            run_id: "r-1".into(),
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        if request.into_inner().run_id != "r-1" {
            return Err(Status::not_found(""));
        }
        Ok(Response::new(snapshots().pop().unwrap()))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        assert_eq!(request.into_inner().limit, 5);
        Ok(Response::new(ListRunsResponse {
            runs: vec![snapshots().pop().unwrap()],
            next_page_token: String::new(),
        }))
    }

    async fn watch_run(
        &self,
        request: Request<GetRunRequest>,
    ) -> Result<Response<Boxed<Run>>, Status> {
        if request.into_inner().run_id != "r-1" {
            return Err(Status::not_found("run nope not found"));
        }
        let items = snapshots().into_iter().map(Ok).collect();
        Ok(Response::new(stream_of(items, Duration::from_millis(150))))
    }

    async fn follow_logs(
        &self,
        request: Request<FollowLogsRequest>,
    ) -> Result<Response<Boxed<LogEvent>>, Status> {
        let r = request.into_inner();
        let events = match (r.job.as_str(), r.step.as_str()) {
            ("build", "") => vec![
                log_event("build", "compile", 0, 0, b"hel", false),
                log_event("build", "compile", 0, 3, b"lo\nwor", false),
                // A resent chunk must not print twice.
                log_event("build", "compile", 0, 3, b"lo\nwor", false),
                log_event("build", "compile", 0, 9, b"ld", true),
                log_event("build", "test", 1, 0, b"ok\n", true),
            ],
            ("build", "compile") => {
                let all = b"hello\nworld";
                let from = (r.offset as usize).min(all.len());
                vec![log_event(
                    "build",
                    "compile",
                    0,
                    r.offset,
                    &all[from..],
                    true,
                )]
            }
            ("test", "") => vec![log_event("test", "unit", 0, 0, b"FAIL\n", true)],
            _ => {
                return Err(Status::not_found(format!(
                    "job {} not found in run r-1",
                    r.job
                )))
            }
        };
        Ok(Response::new(stream_of(
            events.into_iter().map(Ok).collect(),
            Duration::from_millis(20),
        )))
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<CancelRunResponse>, Status> {
        if request.into_inner().run_id != "r-1" {
            return Err(Status::not_found(""));
        }
        Ok(Response::new(CancelRunResponse { canceled_jobs: 2 }))
    }

    async fn list_artifacts(
        &self,
        request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        let job = request.into_inner().job;
        let artifacts = if job.is_empty() {
            artifacts_of("build")
        } else {
            artifacts_of(&job)
        };
        Ok(Response::new(ListArtifactsResponse { artifacts }))
    }

    async fn get_artifact(
        &self,
        request: Request<GetArtifactRequest>,
    ) -> Result<Response<Boxed<BlobChunk>>, Status> {
        let data: &[u8] = match request.into_inner().path.as_str() {
            "out/app" => GOOD_ARTIFACT,
            _ => b"what it is instead",
        };
        let chunks = data
            .chunks(5)
            .map(|c| Ok(BlobChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(stream_of(chunks, Duration::ZERO)))
    }

    async fn list_agents(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(ListAgentsResponse {
            agents: vec![Agent {
                id: "a1".into(),
                hostname: "builder-1".into(),
                labels: HashMap::from([("os".into(), "linux".into())]),
                capacity: 2,
                state: "connected".into(),
                running: vec!["att-1".into()],
                last_seen_ms: 1_700_000_000_000,
                availability: "active".into(),
            }],
        }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let r = request.into_inner();
        assert_eq!((r.uses, r.ttl_secs), (2, 1800));
        assert_eq!(r.labels.get("os").map(String::as_str), Some("linux"));
        Ok(Response::new(CreateTokenResponse {
            token: "tok-secret".into(),
            expires_ms: 1_700_000_000_000,
        }))
    }
}

/// Serves the scripted coordinator on 127.0.0.1:0.
async fn serve() -> (SocketAddr, Scripted) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = Scripted::default();
    let server = tonic::transport::Server::builder()
        .add_service(ControlServiceServer::new(service.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    (addr, service)
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn drover(addr: SocketAddr, args: &[&str], cwd: &std::path::Path) -> Outcome {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(args)
        .current_dir(cwd)
        .env("DROVER_COORDINATOR", format!("http://{addr}"))
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

const GOOD: &str = "jobs:\n  build:\n    steps:\n      - image: busybox\n";
const BAD: &str = "jobs:\n  build:\n    imag: busybox\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_prints_ok_or_positions() {
    let (addr, _) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.yaml"), GOOD).unwrap();
    std::fs::write(dir.path().join("bad.yaml"), BAD).unwrap();

    let ok = drover(addr, &["validate", "good.yaml"], dir.path()).await;
    assert_eq!((ok.code, ok.stdout.as_str()), (0, "good.yaml: ok\n"));

    let bad = drover(addr, &["validate", "bad.yaml"], dir.path()).await;
    assert_eq!(bad.code, 1);
    assert_eq!(
        bad.stdout,
        "bad.yaml:3:5: unknown field `imag`, expected `image`\n"
    );

    let missing = drover(addr, &["validate", "nope.yaml"], dir.path()).await;
    assert_eq!(missing.code, 1);
    assert!(
        missing
            .stderr
            .starts_with("drover: cannot read pipeline nope.yaml"),
        "{}",
        missing.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pipeline_exits_2_with_positions() {
    let (addr, seen) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), BAD).unwrap();
    let out = drover(addr, &["run", "bad.yaml"], dir.path()).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert_eq!(
        out.stderr,
        "bad.yaml: pipeline is invalid:\nbad.yaml:3:5: unknown field `imag`, expected `image`\nbad.yaml:7:1: job `deploy` needs unknown job `buld`\n"
    );
    assert!(seen.seen.lock().unwrap().submitted.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_uploads_context_and_follows_to_a_summary() {
    let (addr, seen) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("src");
    std::fs::create_dir_all(ctx.join("target/debug")).unwrap();
    std::fs::write(ctx.join(".droverignore"), "target/\n").unwrap();
    std::fs::write(ctx.join("main.rs"), "fn main() {}\n").unwrap();
    std::fs::write(ctx.join("target/debug/big"), vec![0u8; 300_000]).unwrap();
    // Big enough to need several chunks.
    std::fs::write(
        ctx.join("data.bin"),
        vec![7u8; 3 * drover_proto::CHUNK_BYTES + 11],
    )
    .unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), GOOD).unwrap();

    let out = drover(
        addr,
        &["run", "pipeline.yaml", "--context", "src", "--follow"],
        dir.path(),
    )
    .await;
    assert_eq!(
        out.code, 1,
        "the run failed, so exit 1\n{}\n{}",
        out.stdout, out.stderr
    );

    let seen = seen.seen.lock().unwrap();
    let (names, digest) = seen.context.clone().expect("context uploaded");
    assert_eq!(names, vec![".droverignore", "data.bin", "main.rs"]);
    assert_eq!(seen.submitted, vec![("pipeline.yaml".to_string(), digest)]);

    let lines: Vec<&str> = out.stdout.lines().collect();
    let at = |needle: &str| {
        let hits: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| **l == needle)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(hits.len(), 1, "{needle:?} once in:\n{}", out.stdout);
        hits[0]
    };
    assert_eq!(lines[0], "run r-1 submitted");
    let started = at("==> job build: running on agent a1");
    let hello = at("build/compile | hello");
    let world = at("build/compile | world");
    let ok = at("build/test | ok");
    let done = at("==> job build: succeeded");
    assert!(
        started < hello && hello < world && world < ok && ok < done,
        "{}",
        out.stdout
    );
    let fail_log = at("test/unit | FAIL");
    let failed = at("==> job test: failed (script, exit 2: step unit exited 2)");
    assert!(at("==> job test: running on agent a2") < fail_log && fail_log < failed);
    let summary = at("run r-1: failed");
    assert!(summary > failed && summary > done);
    assert!(
        out.stdout.contains("test   failed     a2"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains('\x1b'), "no colour when piped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_list_logs_cancel_agents_tokens() {
    let (addr, _) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let show = drover(addr, &["run", "show", "r-1"], d).await;
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(show.stdout.contains("state     failed"), "{}", show.stdout);
    assert!(
        show.stdout.contains("script, exit 2: step unit exited 2"),
        "{}",
        show.stdout
    );
    assert!(show.stdout.contains("  unit  failed  2"), "{}", show.stdout);

    let json = drover(addr, &["show", "r-1", "--output", "json"], d).await;
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v["jobs"][1]["failure"], "script");

    let missing = drover(addr, &["run", "show", "nope"], d).await;
    assert_eq!(
        (missing.code, missing.stderr.as_str()),
        (1, "drover: run nope not found\n")
    );

    let runs = drover(addr, &["runs", "--limit", "5"], d).await;
    assert!(runs.stdout.starts_with("ID "), "{}", runs.stdout);
    assert!(
        runs.stdout.contains("r-1  pipeline.yaml  failed  1/2"),
        "{}",
        runs.stdout
    );

    let logs = drover(
        addr,
        &["logs", "r-1", "build", "compile", "--offset", "6"],
        d,
    )
    .await;
    assert_eq!((logs.code, logs.stdout.as_str()), (0, "world"));
    let logs = drover(addr, &["logs", "r-1", "nojob"], d).await;
    assert_eq!(logs.code, 1);
    assert_eq!(logs.stderr, "drover: job nojob not found in run r-1\n");

    let cancel = drover(addr, &["cancel", "r-1"], d).await;
    assert_eq!(cancel.stdout, "run r-1: canceled 2 jobs\n");

    let agents = drover(addr, &["agents"], d).await;
    assert!(
        agents
            .stdout
            .contains("a1  builder-1  os=linux  2         connected  1"),
        "{}",
        agents.stdout
    );

    let token = drover(
        addr,
        &[
            "tokens", "create", "--uses", "2", "--ttl", "30m", "--labels", "os=linux",
        ],
        d,
    )
    .await;
    assert_eq!(
        (token.code, token.stdout.as_str()),
        (0, "tok-secret\n"),
        "{}",
        token.stderr
    );
    assert!(token.stderr.contains("expires"), "{}", token.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_verified_and_keep_their_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (addr, _) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    let list = drover(addr, &["artifacts", "list", "r-1"], d).await;
    assert!(list.stdout.contains("build  out/app"), "{}", list.stdout);

    let get = drover(
        addr,
        &["artifacts", "get", "r-1", "build", "out/app", "-o", "app"],
        d,
    )
    .await;
    assert_eq!(get.code, 0, "{}", get.stderr);
    assert_eq!(std::fs::read(d.join("app")).unwrap(), GOOD_ARTIFACT);
    let mode = std::fs::metadata(d.join("app"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    let stdout = drover(
        addr,
        &["artifacts", "get", "r-1", "build", "out/app", "-o", "-"],
        d,
    )
    .await;
    assert_eq!(stdout.stdout.as_bytes(), GOOD_ARTIFACT);

    let bad = drover(
        addr,
        &["artifacts", "get", "r-1", "build", "out/corrupt", "-o", "c"],
        d,
    )
    .await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("is corrupt"), "{}", bad.stderr);
    assert!(!d.join("c").exists(), "a corrupt download leaves no file");
    let leftovers = std::fs::read_dir(d).unwrap().count();
    assert_eq!(leftovers, 1, "only `app`: no temp files left behind");

    let absent = drover(
        addr,
        &["artifacts", "get", "r-1", "build", "nope", "-o", "x"],
        d,
    )
    .await;
    assert_eq!(
        absent.stderr,
        "drover: artifact nope not found in job build of run r-1\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_coordinator_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let out = drover(addr, &["runs"], dir.path()).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .starts_with("drover: cannot reach coordinator at http://127.0.0.1:1: "),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}
