//! The shell executor, for hosts without Docker. **Unisolated**: a step's commands run as the agent's
//! own user, directly on the host, with `sh -e -c` in the attempt's workspace directory
//! (`<state>/shell/<attempt>`); the step's image is ignored. Nothing stops a step from reading or
//! changing anything else that user can. Opt in with `--executor shell`; the agent warns at start.
//!
//! Each step runs in its own process group, so a timeout or a cancel reaches everything it
//! started (SIGKILL on timeout; SIGTERM, then SIGKILL after the grace period, on cancel). stdout
//! and stderr share one pipe, so their bytes reach the spool in the order they were written, as
//! with a container's attach stream. While a step runs its process group id is kept in
//! `<state>/shell/<attempt>.pgid`, so the reaper of a restarted agent can kill what a crashed one
//! left running; such steps are not re-adopted (their output went nowhere while no agent read it).

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rustix::process::{kill_process_group, test_kill_process_group, Pid, Signal};
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::{
    ArchiveHelper, ExecError, Executor, Leftover, OutputSink, PathInfo, Pull, StepEnd, StepRun,
    Workspace, WORKSPACE_DIR,
};

/// Size of one read of a step's output.
const READ_BYTES: usize = 128 * 1024;

/// Environment variables of the agent that steps inherit; everything else (the agent's token
/// and credentials among it) stays out.
const PASSED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];

/// Name of the variable holding the workspace directory, for scripts that need its host path.
pub const WORKSPACE_ENV: &str = "DROVER_WORKSPACE";

/// Runs steps as host processes. See the module documentation: not isolated.
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    root: PathBuf,
    /// The `sh` steps run under, found once (see [`find_sh`]).
    sh: PathBuf,
}

/// The `sh` of the agent's PATH (which steps are given too), as an absolute path, or `/bin/sh`.
///
/// Starting a step by absolute path lets the standard library use `posix_spawn` (a vfork-like clone
/// that shares the agent's memory until the exec). By name, with a PATH set for the child, it must fork
/// instead, copying the page tables of the whole multi-threaded agent: measured with `strace`, 0.5-0.6 ms
/// per step for the `clone` alone. A step that sets its own PATH still gets it for its commands; its
/// shell is the agent's.
fn find_sh() -> PathBuf {
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .filter(|dir| dir.is_absolute())
                .map(|dir| dir.join("sh"))
                .find(|candidate| executable(candidate))
        })
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

impl ShellExecutor {
    /// Workspaces live under `root` (created if missing), normally `<state>/shell`.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ExecError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| ExecError::io(format!("creating {}", root.display()), e))?;
        Ok(Self {
            root,
            sh: find_sh(),
        })
    }

    /// The directory workspaces are made in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn pgid_path(&self, attempt_id: &str) -> PathBuf {
        self.root.join(format!("{attempt_id}.pgid"))
    }
}

/// Attempt ids come from the coordinator, which only hands out `[A-Za-z0-9_-]`; anything else is
/// refused rather than turned into a path.
fn check_attempt(attempt_id: &str) -> Result<(), ExecError> {
    let ok = !attempt_id.is_empty()
        && attempt_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ExecError::Escape(format!(
            "attempt id {attempt_id:?} cannot name a workspace directory"
        )))
    }
}

/// The host path of `path`, a path under [`WORKSPACE_DIR`] as the runner and the artifact code
/// spell it. Paths elsewhere, or climbing out with `..`, are refused.
fn host_path(ws_dir: &Path, path: &str) -> Result<PathBuf, ExecError> {
    let rest = if path == WORKSPACE_DIR {
        ""
    } else if let Some(rest) = path
        .strip_prefix(WORKSPACE_DIR)
        .and_then(|r| r.strip_prefix('/'))
    {
        rest
    } else {
        return Err(ExecError::Escape(format!(
            "path {path:?} is outside the workspace {WORKSPACE_DIR}"
        )));
    };
    let mut out = ws_dir.to_path_buf();
    for c in Path::new(rest).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => {
                return Err(ExecError::Escape(format!(
                    "path {path:?} leaves the workspace"
                )))
            }
        }
    }
    Ok(out)
}

/// A step's working directory on the host: under the workspace for `/workspace/...` (the default),
/// as given for any other absolute path.
fn host_workdir(ws_dir: &Path, step: &StepRun) -> Result<PathBuf, ExecError> {
    let dir = step.working_dir();
    if dir == WORKSPACE_DIR || dir.starts_with(&format!("{WORKSPACE_DIR}/")) {
        host_path(ws_dir, &dir)
    } else {
        Ok(PathBuf::from(dir))
    }
}

/// The exit code as Docker reports it: the code, or 128 + the signal that killed the shell.
fn exit_code(status: std::process::ExitStatus) -> i64 {
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(sig)) => 128 + i64::from(sig),
        (None, None) => -1,
    }
}

fn signal_group(pgid: Pid, signal: Signal) {
    if let Err(e) = kill_process_group(pgid, signal) {
        // ESRCH: everything in it has exited already.
        if e != rustix::io::Errno::SRCH {
            tracing::warn!(pgid = pgid.as_raw_nonzero().get(), error = %e, "signalling a shell step");
        }
    }
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, ExecError> + Send + 'static,
) -> Result<T, ExecError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ExecError::io(what, io::Error::other(e.to_string())))?
}

/// Writes a tar of `src` (named by its last component, as Docker's archive API does) to `dest`.
/// Symlinks are archived as symlinks, never followed.
fn write_archive(src: &Path, dest: &Path) -> io::Result<()> {
    let name = src
        .file_name()
        .map(Path::new)
        .unwrap_or(Path::new("workspace"));
    let mut builder = tar::Builder::new(io::BufWriter::new(std::fs::File::create(dest)?));
    builder.follow_symlinks(false);
    let meta = std::fs::symlink_metadata(src)?;
    if meta.is_dir() {
        builder.append_dir_all(name, src)?;
    } else {
        builder.append_path_with_name(src, name)?;
    }
    builder
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?;
    Ok(())
}

impl ShellExecutor {
    async fn run_process<S, F>(
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
        let ws_dir = PathBuf::from(&ws.volume);
        let workdir = host_workdir(&ws_dir, step)?;
        tokio::fs::create_dir_all(&workdir)
            .await
            .map_err(|e| ExecError::io(format!("creating {}", workdir.display()), e))?;
        let (reader, writer) =
            io::pipe().map_err(|e| ExecError::io("creating the output pipe", e))?;
        let writer_err = writer
            .try_clone()
            .map_err(|e| ExecError::io("creating the output pipe", e))?;
        let mut cmd = std::process::Command::new(&self.sh);
        cmd.arg("-e")
            .arg("-c")
            .arg(step.commands.join("\n"))
            .current_dir(&workdir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer_err)
            // Its own group: a kill reaches whatever the script started.
            .process_group(0);
        for k in PASSED_ENV {
            if let Some(v) = std::env::var_os(k) {
                cmd.env(k, v);
            }
        }
        cmd.env(WORKSPACE_ENV, &ws_dir);
        for (k, v) in &step.env {
            cmd.env(k, v);
        }
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| ExecError::io("starting `sh` for the step", e))?;
        // The command (and with it our copies of the pipe's write end) is gone once spawned, so
        // the read end sees EOF when the last process of the step closes it.
        drop(cmd);
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw)
            .ok_or_else(|| ExecError::io("starting the step", io::Error::other("no pid")))?;
        let pgid_file = self.pgid_path(&ws.attempt_id);
        // A few bytes into the page cache: written on this task, as a blocking-pool trip would cost
        // more than the write (and every step pays it between its spawn and its first output).
        if let Err(e) = std::fs::write(&pgid_file, pgid.as_raw_nonzero().to_string()) {
            tracing::warn!(error = %e, "recording the step's process group");
        }
        let mut output = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))
            .map_err(|e| ExecError::io("reading the step's output", e))?;
        sink.started().await;

        tokio::pin!(stop);
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let deadline_sleep = tokio::time::sleep_until(deadline.unwrap_or(far));
        tokio::pin!(deadline_sleep);
        let kill_after = tokio::time::sleep_until(far);
        tokio::pin!(kill_after);
        let mut timed_out = false;
        let mut stopped = false;
        // Read into a shared buffer and hand each read on whole (`split().freeze()`), so the spool
        // and the log shipper take it without a copy.
        let mut buf = bytes::BytesMut::with_capacity(READ_BYTES);
        let mut status = None;
        let mut eof = false;
        let copied = loop {
            if eof && status.is_some() {
                break Ok(());
            }
            tokio::select! {
                n = output.read_buf(&mut buf), if !eof => match n {
                    Ok(0) => eof = true,
                    Ok(_) => {
                        let data = buf.split().freeze();
                        if buf.capacity() < READ_BYTES / 4 {
                            buf.reserve(READ_BYTES);
                        }
                        if let Err(e) = sink.write(data).await {
                            break Err(ExecError::io("writing step output to the spool", e));
                        }
                    }
                    Err(e) => break Err(ExecError::io("reading the step's output", e)),
                },
                s = child.wait(), if status.is_none() => match s {
                    Ok(s) => {
                        status = Some(s);
                        // The shell is done; whatever it left behind in its group goes too, or a
                        // daemon holding the pipe would keep the step open for ever.
                        if !eof {
                            signal_group(pgid, Signal::KILL);
                        }
                    }
                    Err(e) => break Err(ExecError::io("waiting for the step", e)),
                },
                () = &mut deadline_sleep, if !timed_out && !stopped && deadline.is_some() => {
                    timed_out = true;
                    signal_group(pgid, Signal::KILL);
                }
                grace = &mut stop, if !timed_out && !stopped => {
                    stopped = true;
                    signal_group(pgid, Signal::TERM);
                    kill_after.as_mut().reset(Instant::now() + grace);
                }
                () = &mut kill_after, if stopped => {
                    signal_group(pgid, Signal::KILL);
                    kill_after.as_mut().reset(far);
                }
            }
        };
        if copied.is_err() {
            signal_group(pgid, Signal::KILL);
        }
        let _ = std::fs::remove_file(&pgid_file);
        copied?;
        let code = status.map_or(-1, exit_code);
        Ok(if timed_out {
            StepEnd::TimedOut { code }
        } else if stopped {
            StepEnd::Stopped { code }
        } else {
            StepEnd::Exited {
                code,
                oom_killed: false,
            }
        })
    }
}

impl Executor for ShellExecutor {
    async fn create_workspace(
        &self,
        agent_id: &str,
        attempt_id: &str,
    ) -> Result<Workspace, ExecError> {
        check_attempt(attempt_id)?;
        let dir = self.root.join(attempt_id);
        let d = dir.clone();
        blocking("creating the workspace", move || {
            match std::fs::remove_dir_all(&d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(ExecError::io(format!("clearing {}", d.display()), e))
                }
                _ => {}
            }
            std::fs::create_dir_all(&d)
                .and_then(|()| std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)))
                .map_err(|e| ExecError::io(format!("creating {}", d.display()), e))
        })
        .await?;
        Ok(Workspace {
            agent_id: agent_id.to_string(),
            attempt_id: attempt_id.to_string(),
            volume: dir.to_string_lossy().into_owned(),
        })
    }

    async fn ensure_image(&self, _image: &str, _pull: Pull) -> Result<(), ExecError> {
        // Steps run on the host: there is no image to fetch.
        Ok(())
    }

    async fn archive_helper(
        &self,
        ws: &Workspace,
        _image: &str,
    ) -> Result<ArchiveHelper, ExecError> {
        Ok(ArchiveHelper {
            container: ws.volume.clone(),
        })
    }

    async fn put_archive(
        &self,
        helper: &ArchiveHelper,
        dest: &str,
        tar_path: &Path,
    ) -> Result<(), ExecError> {
        let dest = host_path(Path::new(&helper.container), dest)?;
        let tar_path = tar_path.to_path_buf();
        blocking("extracting into the workspace", move || {
            let file = std::fs::File::open(&tar_path)
                .map_err(|e| ExecError::io(format!("opening {}", tar_path.display()), e))?;
            std::fs::create_dir_all(&dest)
                .map_err(|e| ExecError::io(format!("creating {}", dest.display()), e))?;
            let mut archive = tar::Archive::new(io::BufReader::new(file));
            archive.set_preserve_permissions(true);
            // `unpack` refuses entries that would land outside `dest` (`..`, absolute paths,
            // through symlinks).
            archive
                .unpack(&dest)
                .map_err(|e| ExecError::io(format!("extracting into {}", dest.display()), e))
        })
        .await
    }

    async fn stat_path(
        &self,
        helper: &ArchiveHelper,
        path: &str,
    ) -> Result<Option<PathInfo>, ExecError> {
        let p = host_path(Path::new(&helper.container), path)?;
        let meta = match tokio::fs::symlink_metadata(&p).await {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ExecError::io(format!("stat {path}"), e)),
        };
        let link_target = if meta.file_type().is_symlink() {
            let t = tokio::fs::read_link(&p)
                .await
                .map_err(|e| ExecError::io(format!("reading the link {path}"), e))?;
            Some(t.to_string_lossy().into_owned())
        } else {
            None
        };
        Ok(Some(PathInfo {
            link_target,
            is_dir: meta.is_dir(),
        }))
    }

    async fn get_archive(
        &self,
        helper: &ArchiveHelper,
        path: &str,
        dest: &Path,
    ) -> Result<(), ExecError> {
        let src = host_path(Path::new(&helper.container), path)?;
        match tokio::fs::symlink_metadata(&src).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ExecError::NotFound(path.to_string()))
            }
            Err(e) => return Err(ExecError::io(format!("stat {path}"), e)),
        }
        let dest = dest.to_path_buf();
        let what = format!("archiving {path}");
        blocking("archiving from the workspace", move || {
            write_archive(&src, &dest).map_err(|e| ExecError::io(what, e))
        })
        .await
    }

    async fn get_archive_streamed(
        &self,
        helper: &ArchiveHelper,
        path: &str,
        dest: &Path,
        pieces: tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
    ) -> Result<(), ExecError> {
        // Written in one piece on a blocking thread, then handed on a MiB at a time.
        self.get_archive(helper, path, dest).await?;
        let read_err = |e| ExecError::io(format!("reading {}", dest.display()), e);
        let mut file = tokio::fs::File::open(dest).await.map_err(read_err)?;
        loop {
            let mut buf = bytes::BytesMut::with_capacity(1 << 20);
            while buf.len() < buf.capacity() {
                if file.read_buf(&mut buf).await.map_err(read_err)? == 0 {
                    break;
                }
            }
            if buf.is_empty() || pieces.send(vec![buf.freeze()]).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn remove_helper(&self, _helper: ArchiveHelper) -> Result<(), ExecError> {
        Ok(())
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
        self.run_process(ws, step, sink, deadline, stop).await
    }

    async fn resume_step<S, F>(
        &self,
        container_id: &str,
        _sink: &mut S,
        _deadline: Option<Instant>,
        _stop: F,
    ) -> Result<StepEnd, ExecError>
    where
        S: OutputSink,
        F: Future<Output = Duration> + Send,
    {
        // Never journaled by this executor (it reports no container), so never asked for.
        Err(ExecError::io(
            format!("resuming {container_id}"),
            io::Error::other("the shell executor cannot re-attach to a step after a restart"),
        ))
    }

    async fn remove_workspace(&self, ws: &Workspace) -> Result<(), ExecError> {
        check_attempt(&ws.attempt_id)?;
        if let Some(pgid) = read_pgid(&self.pgid_path(&ws.attempt_id)) {
            signal_group(pgid, Signal::KILL);
            let _ = std::fs::remove_file(self.pgid_path(&ws.attempt_id));
        }
        let dir = self.root.join(&ws.attempt_id);
        blocking(
            "removing the workspace",
            move || match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    Err(ExecError::io(format!("removing {}", dir.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }

    async fn leftovers(&self, _agent_id: &str) -> Result<Vec<Leftover>, ExecError> {
        // The root belongs to this agent's state directory: everything in it is this agent's.
        let mut found = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.root)
            .await
            .map_err(|e| ExecError::io(format!("listing {}", self.root.display()), e))?;
        while let Some(entry) = dir
            .next_entry()
            .await
            .map_err(|e| ExecError::io(format!("listing {}", self.root.display()), e))?
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(attempt) = name.strip_suffix(".pgid") {
                found.push(Leftover::Container {
                    id: entry.path().to_string_lossy().into_owned(),
                    attempt: attempt.to_string(),
                });
            } else if check_attempt(&name).is_ok() {
                found.push(Leftover::Volume {
                    name: entry.path().to_string_lossy().into_owned(),
                    attempt: name,
                });
            }
        }
        Ok(found)
    }

    async fn remove_leftover(&self, leftover: &Leftover) -> Result<(), ExecError> {
        match leftover {
            Leftover::Container { id, .. } => {
                let path = PathBuf::from(id);
                if let Some(pgid) = read_pgid(&path) {
                    // Only a group that still exists; a recycled id is the rare risk of any pid file.
                    if test_kill_process_group(pgid).is_ok() {
                        signal_group(pgid, Signal::KILL);
                    }
                }
                match tokio::fs::remove_file(&path).await {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        Err(ExecError::io(format!("removing {}", path.display()), e))
                    }
                    _ => Ok(()),
                }
            }
            Leftover::Volume { attempt, .. } => {
                self.remove_workspace(&Workspace {
                    agent_id: String::new(),
                    attempt_id: attempt.clone(),
                    volume: String::new(),
                })
                .await
            }
        }
    }
}

/// Read on the calling task: a few bytes, and after a normal step the file is already gone.
fn read_pgid(path: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse::<i32>().ok().and_then(Pid::from_raw)
}

#[cfg(test)]
mod tests;
