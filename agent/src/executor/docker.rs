//! The Docker executor: one container per step, all mounting the attempt's workspace volume.
//!
//! Containers run with the log driver `none` and are read through attach (the json-file driver is
//! much slower); attach happens before start so no byte is missed.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, ContainerArchiveInfoOptionsBuilder,
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, DownloadFromContainerOptionsBuilder,
    InspectContainerOptions, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    ListVolumesOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder,
    StopContainerOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::{body_try_stream, Docker};
use drover_proto::direct::{BatchPipe, DirectFile};
use futures::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::io::ReaderStream;

use super::{
    kmsg, ArchiveHelper, ExecError, Executor, Leftover, OutputSink, PathInfo, Pull, StepEnd,
    StepRun, Workspace, LABEL_AGENT, LABEL_ATTEMPT, LABEL_STEP, WORKSPACE_DIR,
};

/// How many more times a SIGKILLed container's state is inspected for the engine's OOM flag.
const OOM_FLAG_RECHECKS: u32 = 40;
/// Pause between those inspections (the whole wait is at most two seconds, paid only by a step that
/// died of a SIGKILL the agent did not send, and only where the kernel's log cannot be read).
const OOM_FLAG_RECHECK_PAUSE: Duration = Duration::from_millis(50);
/// After a re-attached container exited, how long its last output may take to arrive before the
/// attach stream is abandoned (the engine may not end it).
const RESUME_LINGER: Duration = Duration::from_secs(1);
/// Go's `os.ModeDir`, as reported in Docker's path stat.
const GO_MODE_DIR: u32 = 1 << 31;
/// Go's `os.ModeSymlink`.
const GO_MODE_SYMLINK: u32 = 1 << 27;

/// Executes steps in Docker containers through the engine API.
#[derive(Debug, Clone)]
pub struct DockerExecutor {
    docker: Docker,
}

impl DockerExecutor {
    /// Connects to the local engine (`DOCKER_HOST` or the default socket) and negotiates the API
    /// version, so older engines work too.
    pub async fn connect() -> Result<Self, ExecError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| ExecError::Docker(format!("cannot connect to the Docker engine: {e}")))?
            .negotiate_version()
            .await
            .map_err(|e| ExecError::Docker(format!("cannot reach the Docker engine: {e}")))?;
        Ok(Self { docker })
    }

    /// Wraps an existing client.
    pub fn with_client(docker: Docker) -> Self {
        Self { docker }
    }

    /// The underlying client.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    async fn image_present(&self, image: &str) -> Result<bool, ExecError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(ExecError::Docker(format!(
                "inspecting image {image:?}: {e}"
            ))),
        }
    }

    async fn pull(&self, image: &str) -> Result<(), String> {
        let (repo, tag) = split_reference(image);
        let mut builder = CreateImageOptionsBuilder::default().from_image(repo);
        if let Some(tag) = tag {
            builder = builder.tag(tag);
        }
        let mut stream = self.docker.create_image(Some(builder.build()), None, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| e.to_string())?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Writes a tar archive of `path` in the helper to `dest`, sending its pieces to `pieces`
    /// (see [`Executor::get_archive_streamed`]).
    async fn fetch_archive(
        &self,
        helper: &ArchiveHelper,
        path: &str,
        dest: &Path,
        pieces: Option<tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>>,
    ) -> Result<(), ExecError> {
        let options = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut stream = self
            .docker
            .download_from_container(&helper.container, Some(options));
        // Written past the page cache (see `drover_proto::direct`): copying the archive into fresh
        // page-cache pages was most of the agent's CPU while it fetched a large artifact. The
        // engine sends the archive in pieces of a few KiB; they are gathered into batches of a
        // MiB, each written on a blocking thread while the next arrives. The pieces themselves
        // (shared, not copied) go to `pieces` a MiB at a time.
        let file = DirectFile::create_off_thread(dest, false)
            .await
            .map_err(|e| ExecError::io(format!("creating {}", dest.display()), e))?;
        let write_err = |e| ExecError::io(format!("writing {}", dest.display()), e);
        let mut pipe = BatchPipe::new(file, ARCHIVE_BUFFER);
        let mut gathered: Vec<bytes::Bytes> = Vec::new();
        let mut gathered_len = 0;
        let mut pieces = pieces;
        loop {
            let chunk = match stream.next().await {
                Some(Ok(c)) => c,
                Some(Err(e)) if is_not_found(&e) => {
                    return Err(ExecError::NotFound(path.to_string()))
                }
                Some(Err(e)) => return Err(ExecError::Docker(format!("getting {path}: {e}"))),
                None => break,
            };
            pipe.push(&chunk).await.map_err(write_err)?;
            if pieces.is_some() {
                gathered_len += chunk.len();
                gathered.push(chunk);
                if gathered_len >= ARCHIVE_BUFFER {
                    gathered_len = 0;
                    send_pieces(&mut pieces, std::mem::take(&mut gathered)).await;
                }
            }
        }
        send_pieces(&mut pieces, gathered).await;
        pipe.finish().await.map_err(write_err)?;
        Ok(())
    }

    fn container_body(
        ws: &Workspace,
        image: &str,
        cmd: Vec<String>,
        extra_labels: &[(&str, String)],
    ) -> ContainerCreateBody {
        let mut labels = ws.labels();
        for (k, v) in extra_labels {
            labels.insert((*k).to_string(), v.clone());
        }
        ContainerCreateBody {
            image: Some(image.to_string()),
            // Reset any image entrypoint: the step's commands run under `sh` whatever the image.
            entrypoint: Some(vec![String::new()]),
            cmd: Some(cmd),
            labels: Some(labels),
            tty: Some(false),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(false),
            open_stdin: Some(false),
            working_dir: Some(WORKSPACE_DIR.to_string()),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{}:{WORKSPACE_DIR}", ws.volume)]),
                // A tiny init as PID 1 forwards SIGTERM to the step's shell: as PID 1 itself, `sh`
                // would ignore it and every cancel would wait out the grace period for SIGKILL.
                init: Some(true),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("none".to_string()),
                    config: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String, ExecError> {
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| ExecError::Docker(format!("creating container {name}: {e}")))?;
        Ok(created.id)
    }

    async fn remove_container(&self, id: &str) -> Result<(), ExecError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(ExecError::Docker(format!("removing container {id}: {e}"))),
        }
    }

    /// One removal of a volume; one that is gone already counts as removed. The engine refuses
    /// (409) while a container still refers to it.
    async fn try_remove_volume(&self, name: &str) -> Result<(), BollardError> {
        let options = RemoveVolumeOptionsBuilder::default().force(true).build();
        match self.docker.remove_volume(name, Some(options)).await {
            Err(e) if is_not_found(&e) => Ok(()),
            r => r,
        }
    }

    async fn remove_volume(&self, name: &str) -> Result<(), ExecError> {
        // A container being removed concurrently can hold the volume a moment longer.
        let mut last = None;
        for delay_ms in [0u64, 50, 200, 500, 1000] {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            match self.try_remove_volume(name).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(ExecError::Docker(format!(
            "removing volume {name}: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// The exit code of a container that stopped and whether the engine says it was OOM-killed. With
    /// `ask_about_oom` false (the agent itself stopped or killed it) a SIGKILL is not asked about again.
    async fn exit_state(&self, id: &str, ask_about_oom: bool) -> Result<(i64, bool), ExecError> {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut wait = self.docker.wait_container(id, Some(options));
        let mut code = None;
        while let Some(item) = wait.next().await {
            match item {
                Ok(r) => code = Some(r.status_code),
                // bollard reports non-zero exits as errors.
                Err(BollardError::DockerContainerWaitError { code: c, .. }) => code = Some(c),
                Err(e) => return Err(ExecError::Docker(format!("waiting for container: {e}"))),
            }
        }
        // An OOM kill is a SIGKILL (exit code 137): only then (or without a code) is the
        // container's state worth another round trip to the engine.
        if let Some(code) = code.filter(|&c| c != 137) {
            return Ok((code, false));
        }
        // The engine learns of an OOM kill from a separate event that can land after the exit it
        // caused, or never (see `kmsg`), so a SIGKILL without the flag is settled by the kernel's
        // log, which records the kill before the signal is sent. Only where that log cannot be read
        // is the engine asked again for a moment before the exit counts as a plain exit code 137
        // (seen on Docker 20.10: the first inspect says not OOM-killed, one a few ms later says it
        // was; with the machine loaded by a parallel test suite, a quarter second was not always
        // enough).
        let (code, oom_killed) = self.engine_exit(id, code).await?;
        if oom_killed || code != 137 || !ask_about_oom {
            return Ok((code, oom_killed));
        }
        let owned = id.to_string();
        let logged = tokio::task::spawn_blocking(move || kmsg::oom_kill_logged(&owned))
            .await
            .ok()
            .flatten();
        if let Some(oom_killed) = logged {
            if oom_killed {
                tracing::info!(container = %id, "the kernel logged an OOM kill the engine did not flag");
            }
            return Ok((code, oom_killed));
        }
        for _ in 0..OOM_FLAG_RECHECKS {
            tokio::time::sleep(OOM_FLAG_RECHECK_PAUSE).await;
            let (code, oom_killed) = self.engine_exit(id, Some(code)).await?;
            if oom_killed || code != 137 {
                return Ok((code, oom_killed));
            }
        }
        Ok((code, false))
    }

    /// The exit code (`code` if known, else the engine's) and the engine's OOM flag of a stopped
    /// container.
    async fn engine_exit(&self, id: &str, code: Option<i64>) -> Result<(i64, bool), ExecError> {
        let inspect = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| ExecError::Docker(format!("inspecting container: {e}")))?;
        let state = inspect.state.unwrap_or_default();
        Ok((
            code.or(state.exit_code).unwrap_or(-1),
            state.oom_killed.unwrap_or(false),
        ))
    }

    /// Resolves `linger` after the container stopped running (at once plus `linger` if it is not
    /// running or gone, or if the engine cannot say).
    async fn exited_then(&self, id: &str, linger: Duration) {
        let options = WaitContainerOptionsBuilder::default()
            .condition("not-running")
            .build();
        let mut wait = self.docker.wait_container(id, Some(options));
        while wait.next().await.is_some() {}
        tokio::time::sleep(linger).await;
    }

    /// True while the container runs (false when it exited or is gone).
    async fn is_running(&self, id: &str) -> Result<bool, ExecError> {
        match self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => Ok(c.state.and_then(|s| s.running).unwrap_or(false)),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(ExecError::Docker(format!("inspecting container {id}: {e}"))),
        }
    }

    async fn list_containers(
        &self,
        filters: &HashMap<String, Vec<String>>,
    ) -> Result<Vec<(String, HashMap<String, String>)>, ExecError> {
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| ExecError::Docker(format!("listing containers: {e}")))?;
        Ok(list
            .into_iter()
            .filter_map(|c| Some((c.id?, c.labels.unwrap_or_default())))
            .collect())
    }

    async fn run_started<S, F>(
        &self,
        id: &str,
        output: &mut (impl futures::Stream<Item = Result<bollard::container::LogOutput, BollardError>>
                  + Unpin),
        sink: &mut S,
        deadline: Option<Instant>,
        stop: F,
    ) -> Result<StepEnd, ExecError>
    where
        S: OutputSink,
        F: Future<Output = Duration> + Send,
    {
        tokio::pin!(stop);
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let deadline_sleep = tokio::time::sleep_until(deadline.unwrap_or(far));
        tokio::pin!(deadline_sleep);
        let mut timed_out = false;
        let mut stopped = false;
        // Reading the attach stream and writing the spool overlap: while one batch goes to disk the
        // next is read, so a fast writer in the container is never held up by the spool's latency.
        let (batches, mut to_write) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITE_AHEAD);
        let reader = async move {
            while let Some(item) = output.next().await {
                let frame =
                    item.map_err(|e| ExecError::Docker(format!("reading step output: {e}")))?;
                let (data, next) = gather(frame.into_bytes(), output);
                if batches.send(data).await.is_err() {
                    break;
                }
                match next {
                    Gathered::More => {}
                    Gathered::End => break,
                    Gathered::Failed(e) => {
                        return Err(ExecError::Docker(format!("reading step output: {e}")));
                    }
                }
            }
            Ok::<(), ExecError>(())
        };
        let writer = async {
            // Each batch is written as it was gathered (up to GATHER_BYTES), not joined with those
            // that piled up meanwhile: the spool hands the very buffer on to the log shipper, and
            // a copy per byte costs more than a write call per batch.
            while let Some(data) = to_write.recv().await {
                sink.write(data)
                    .await
                    .map_err(|e| ExecError::io("writing step output to the spool", e))?;
            }
            Ok::<(), ExecError>(())
        };
        tokio::pin!(reader, writer);
        let mut reading = true;
        // The stop/kill calls block until the container is gone; they run beside the output copy
        // so the last bytes are still captured.
        let mut control: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                read = &mut reader, if reading => {
                    reading = false;
                    read?;
                }
                // Ends once the reader is done and every batch is written.
                written = &mut writer => {
                    written?;
                    break;
                }
                () = &mut deadline_sleep, if !timed_out && !stopped && deadline.is_some() => {
                    timed_out = true;
                    let docker = self.docker.clone();
                    let id = id.to_string();
                    control = Some(tokio::spawn(async move {
                        let options = KillContainerOptionsBuilder::default().signal("SIGKILL").build();
                        if let Err(e) = docker.kill_container(&id, Some(options)).await {
                            tracing::warn!(container = %id, error = %e, "killing timed-out step");
                        }
                    }));
                }
                grace = &mut stop, if !timed_out && !stopped => {
                    stopped = true;
                    let docker = self.docker.clone();
                    let id = id.to_string();
                    let secs = i32::try_from(grace.as_millis().div_ceil(1000)).unwrap_or(i32::MAX);
                    control = Some(tokio::spawn(async move {
                        let options = StopContainerOptionsBuilder::default().t(secs).build();
                        if let Err(e) = docker.stop_container(&id, Some(options)).await {
                            tracing::warn!(container = %id, error = %e, "stopping step");
                        }
                    }));
                }
            }
        }
        if let Some(handle) = control {
            let _ = handle.await;
        }
        let (code, oom_killed) = self.exit_state(id, !timed_out && !stopped).await?;
        Ok(if timed_out {
            StepEnd::TimedOut { code }
        } else if stopped {
            StepEnd::Stopped { code }
        } else {
            StepEnd::Exited { code, oom_killed }
        })
    }
}

impl Executor for DockerExecutor {
    async fn create_workspace(
        &self,
        agent_id: &str,
        attempt_id: &str,
    ) -> Result<Workspace, ExecError> {
        let mut ws = Workspace {
            agent_id: agent_id.to_string(),
            attempt_id: attempt_id.to_string(),
            volume: format!("drover-{}-{}", sanitize(attempt_id), short_random()),
        };
        let created = self
            .docker
            .create_volume(VolumeCreateRequest {
                name: Some(ws.volume.clone()),
                labels: Some(ws.labels()),
                ..Default::default()
            })
            .await
            .map_err(|e| ExecError::Docker(format!("creating workspace volume: {e}")))?;
        ws.volume = created.name;
        Ok(ws)
    }

    async fn ensure_image(&self, image: &str, pull: Pull) -> Result<(), ExecError> {
        match pull {
            Pull::Never => {
                if self.image_present(image).await? {
                    Ok(())
                } else {
                    Err(ExecError::Image(format!(
                        "image {image:?} not found locally and the pull policy is never"
                    )))
                }
            }
            Pull::IfNotPresent => {
                if self.image_present(image).await? {
                    return Ok(());
                }
                self.pull(image).await.map_err(|e| {
                    ExecError::Image(format!(
                        "image {image:?} not found locally and could not be pulled: {e}"
                    ))
                })
            }
            Pull::Always => self.pull(image).await.map_err(|e| {
                ExecError::Image(format!(
                    "image {image:?} could not be pulled (pull policy always): {e}"
                ))
            }),
        }
    }

    async fn archive_helper(
        &self,
        ws: &Workspace,
        image: &str,
    ) -> Result<ArchiveHelper, ExecError> {
        let name = format!(
            "drover-{}-files-{}",
            sanitize(&ws.attempt_id),
            short_random()
        );
        let body = Self::container_body(
            ws,
            image,
            vec!["sh".to_string()],
            &[("drover.role", "archive".to_string())],
        );
        let container = self.create(&name, body).await?;
        Ok(ArchiveHelper { container })
    }

    async fn put_archive(
        &self,
        helper: &ArchiveHelper,
        dest: &str,
        tar_path: &Path,
    ) -> Result<(), ExecError> {
        let file = tokio::fs::File::open(tar_path)
            .await
            .map_err(|e| ExecError::io(format!("opening {}", tar_path.display()), e))?;
        let body = body_try_stream(ReaderStream::with_capacity(file, 128 * 1024));
        let options = UploadToContainerOptionsBuilder::default()
            .path(dest)
            .build();
        self.docker
            .upload_to_container(&helper.container, Some(options), body)
            .await
            .map_err(|e| ExecError::Docker(format!("putting files into {dest}: {e}")))
    }

    async fn stat_path(
        &self,
        helper: &ArchiveHelper,
        path: &str,
    ) -> Result<Option<PathInfo>, ExecError> {
        let options = ContainerArchiveInfoOptionsBuilder::default()
            .path(path)
            .build();
        match self
            .docker
            .get_container_archive_info(&helper.container, Some(options))
            .await
        {
            Ok(stat) => Ok(Some(PathInfo {
                link_target: (stat.file_mode & GO_MODE_SYMLINK != 0
                    || !stat.link_target.is_empty())
                .then_some(stat.link_target),
                is_dir: stat.file_mode & GO_MODE_DIR != 0,
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(ExecError::Docker(format!("stat {path}: {e}"))),
        }
    }

    async fn get_archive(
        &self,
        helper: &ArchiveHelper,
        path: &str,
        dest: &Path,
    ) -> Result<(), ExecError> {
        self.fetch_archive(helper, path, dest, None).await
    }

    async fn get_archive_streamed(
        &self,
        helper: &ArchiveHelper,
        path: &str,
        dest: &Path,
        pieces: tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
    ) -> Result<(), ExecError> {
        self.fetch_archive(helper, path, dest, Some(pieces)).await
    }

    async fn remove_helper(&self, helper: ArchiveHelper) -> Result<(), ExecError> {
        self.remove_container(&helper.container).await
    }

    async fn run_step<S, F>(
        &self,
        ws: &Workspace,
        step: &StepRun,
        sink: &mut S,
        deadline: Option<Instant>,
        stop: F,
    ) -> Result<StepEnd, ExecError>
    where
        S: OutputSink,
        F: Future<Output = Duration> + Send,
    {
        let name = format!(
            "drover-{}-step{}-{}",
            sanitize(&ws.attempt_id),
            step.index,
            short_random()
        );
        let script = step.commands.join("\n");
        let mut body = Self::container_body(
            ws,
            &step.image,
            vec!["sh".into(), "-e".into(), "-c".into(), script],
            &[(LABEL_STEP, step.index.to_string())],
        );
        body.working_dir = Some(step.working_dir());
        body.env = Some(step.env.iter().map(|(k, v)| format!("{k}={v}")).collect());
        if let Some(hc) = body.host_config.as_mut() {
            if step.privileged {
                hc.privileged = Some(true);
            }
            if !step.binds.is_empty() {
                hc.binds
                    .get_or_insert_with(Vec::new)
                    .extend(step.binds.iter().cloned());
            }
            if step.nano_cpus > 0 {
                hc.nano_cpus = i64::try_from(step.nano_cpus).ok();
            }
            if step.memory_bytes > 0 {
                let bytes = i64::try_from(step.memory_bytes).unwrap_or(i64::MAX);
                hc.memory = Some(bytes);
                // Swap equal to memory means no swap on top: the limit is a real limit, and exceeding
                // it is an OOM kill rather than a slow swap storm.
                hc.memory_swap = Some(bytes);
            }
        }
        let id = self.create(&name, body).await?;

        let result = async {
            let options = AttachContainerOptionsBuilder::default()
                .stream(true)
                .stdout(true)
                .stderr(true)
                .logs(false)
                .build();
            let attached = self
                .docker
                .attach_container(&id, Some(options))
                .await
                .map_err(|e| ExecError::Docker(format!("attaching to the step container: {e}")))?;
            let mut output = attached.output;
            self.docker
                .start_container(&id, None)
                .await
                .map_err(|e| ExecError::Docker(format!("starting the step container: {e}")))?;
            sink.container_started(&id).await;
            sink.started().await;
            self.run_started(&id, &mut output, sink, deadline, stop)
                .await
        }
        .await;
        let removed = self.remove_container(&id).await;
        let end = result?;
        removed?;
        Ok(end)
    }

    async fn resume_step<S, F>(
        &self,
        container_id: &str,
        sink: &mut S,
        deadline: Option<Instant>,
        stop: F,
    ) -> Result<StepEnd, ExecError>
    where
        S: OutputSink,
        F: Future<Output = Duration> + Send,
    {
        let id = container_id;
        let result = async {
            // The engine never ends an attach to a container that is not running: it would hang
            // forever. So attach only to a running one, and stop reading a little after it exits
            // (it may exit between the check and the attach).
            if !self.is_running(id).await? {
                let (code, oom_killed) = self.exit_state(id, true).await?;
                return Ok(StepEnd::Exited { code, oom_killed });
            }
            let options = AttachContainerOptionsBuilder::default()
                .stream(true)
                .stdout(true)
                .stderr(true)
                .logs(false)
                .build();
            let attached = tokio::select! {
                r = self.docker.attach_container(id, Some(options)) => Some(r),
                () = self.exited_then(id, RESUME_LINGER) => None,
            };
            match attached {
                Some(Ok(attached)) => {
                    let mut output = attached
                        .output
                        .take_until(Box::pin(self.exited_then(id, RESUME_LINGER)));
                    self.run_started(id, &mut output, sink, deadline, stop)
                        .await
                }
                // It ended before we could attach: only its exit state is left.
                None => {
                    let (code, oom_killed) = self.exit_state(id, true).await?;
                    Ok(StepEnd::Exited { code, oom_killed })
                }
                Some(Err(e)) if !self.is_running(id).await? => {
                    tracing::debug!(container = %id, error = %e, "step ended before re-attach");
                    let (code, oom_killed) = self.exit_state(id, true).await?;
                    Ok(StepEnd::Exited { code, oom_killed })
                }
                Some(Err(e)) => Err(ExecError::Docker(format!(
                    "re-attaching to the step container: {e}"
                ))),
            }
        }
        .await;
        let removed = self.remove_container(id).await;
        let end = result?;
        removed?;
        Ok(end)
    }

    async fn remove_workspace(&self, ws: &Workspace) -> Result<(), ExecError> {
        // Every container of the attempt mounts its workspace, and the engine refuses to remove a
        // volume a container still refers to: when the volume goes at once, nothing of the attempt
        // is left, and the listing below (a round trip to the engine per job) is not needed.
        match self.try_remove_volume(&ws.volume).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::debug!(volume = %ws.volume, error = %e,
                "workspace still in use; removing the attempt's containers first"),
        }
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_AGENT}={}", ws.agent_id),
                format!("{LABEL_ATTEMPT}={}", ws.attempt_id),
            ],
        )]);
        let mut first_error = None;
        for (id, _) in self.list_containers(&filters).await? {
            if let Err(e) = self.remove_container(&id).await {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = self.remove_volume(&ws.volume).await {
            first_error.get_or_insert(e);
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn leftovers(&self, agent_id: &str) -> Result<Vec<Leftover>, ExecError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_AGENT}={agent_id}")],
        )]);
        let mut found: Vec<Leftover> = self
            .list_containers(&filters)
            .await?
            .into_iter()
            .map(|(id, labels)| Leftover::Container {
                id,
                attempt: labels.get(LABEL_ATTEMPT).cloned().unwrap_or_default(),
            })
            .collect();
        let options = ListVolumesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let volumes = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(|e| ExecError::Docker(format!("listing volumes: {e}")))?;
        found.extend(
            volumes
                .volumes
                .unwrap_or_default()
                .into_iter()
                .map(|v| Leftover::Volume {
                    attempt: v.labels.get(LABEL_ATTEMPT).cloned().unwrap_or_default(),
                    name: v.name,
                }),
        );
        Ok(found)
    }

    async fn remove_leftover(&self, leftover: &Leftover) -> Result<(), ExecError> {
        match leftover {
            Leftover::Container { id, .. } => self.remove_container(id).await,
            Leftover::Volume { name, .. } => self.remove_volume(name).await,
        }
    }
}

/// Bytes of an archive fetched from the engine gathered per write to the local disk (a multiple
/// of [`drover_proto::direct::DIRECT_ALIGN`], so every batch but the last is written directly).
const ARCHIVE_BUFFER: usize = 1 << 20;

/// Batches of step output read ahead of the spool writes (at most [`GATHER_BYTES`] each).
const WRITE_AHEAD: usize = 32;

/// Most step output gathered from frames already delivered before it goes to the spool writer
/// (the engine delivers a fast writer's output in frames of a few KiB).
const GATHER_BYTES: usize = 4 * drover_proto::CHUNK_BYTES;

/// What followed the frames [`gather`] took.
enum Gathered {
    /// The stream goes on.
    More,
    /// The stream ended.
    End,
    /// The stream failed (after the bytes gathered).
    Failed(BollardError),
}

/// `first` plus the attach frames the engine has already delivered (never waiting for more), up to
/// [`GATHER_BYTES`]. A fast writer's output arrives in frames of a few KiB; one spool write, one
/// shipper wake-up and one log chunk per frame would cost more than the bytes. A lone frame goes
/// out at once, so the first byte is not delayed.
fn gather(
    first: bytes::Bytes,
    output: &mut (impl futures::Stream<Item = Result<bollard::container::LogOutput, BollardError>>
              + Unpin),
) -> (bytes::Bytes, Gathered) {
    let mut buf: Option<Vec<u8>> = None;
    let mut next = Gathered::More;
    while buf.as_ref().map_or(first.len(), Vec::len) < GATHER_BYTES {
        match output.next().now_or_never() {
            Some(Some(Ok(frame))) => buf
                .get_or_insert_with(|| {
                    let mut v = Vec::with_capacity(drover_proto::CHUNK_BYTES.max(2 * first.len()));
                    v.extend_from_slice(&first);
                    v
                })
                .extend_from_slice(frame.as_ref()),
            Some(Some(Err(e))) => {
                next = Gathered::Failed(e);
                break;
            }
            Some(None) => {
                next = Gathered::End;
                break;
            }
            None => break,
        }
    }
    (buf.map_or(first, bytes::Bytes::from), next)
}

/// Sends `gathered` to the archive's reader, if it still listens.
async fn send_pieces(
    pieces: &mut Option<tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>>,
    gathered: Vec<bytes::Bytes>,
) {
    if gathered.is_empty() {
        return;
    }
    if let Some(tx) = pieces {
        if tx.send(gathered).await.is_err() {
            // The reader stopped (its scan is done or failed): the archive is still written whole.
            *pieces = None;
        }
    }
}

fn is_not_found(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Splits `repo[:tag][@digest]` so a pull never fetches every tag of a repository.
fn split_reference(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], Some(&image[last_slash + i + 1..])),
        None => (image, Some("latest")),
    }
}

/// Container and volume names allow `[a-zA-Z0-9][a-zA-Z0-9_.-]`.
fn sanitize(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "x".to_string()
    } else {
        cleaned
    }
}

fn short_random() -> String {
    let n: u32 = rand::random();
    format!("{n:08x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_get_a_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", Some("latest")));
        assert_eq!(split_reference("busybox:1.36"), ("busybox", Some("1.36")));
        assert_eq!(
            split_reference("localhost:5000/x/y"),
            ("localhost:5000/x/y", Some("latest"))
        );
        assert_eq!(
            split_reference("localhost:5000/x/y:v1"),
            ("localhost:5000/x/y", Some("v1"))
        );
        assert_eq!(split_reference("a@sha256:00"), ("a@sha256:00", None));
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize("ab/c:d"), "ab_c_d");
        assert_eq!(sanitize(""), "x");
    }
}
