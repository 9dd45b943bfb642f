//! Where steps run. The runner talks only to the [`Executor`] trait; [`docker`] implements it with
//! bollard, [`shell`] with host processes for hosts without Docker (unisolated, opt-in).

pub mod docker;
pub mod kmsg;
pub mod shell;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

pub use docker::DockerExecutor;
pub use shell::ShellExecutor;

/// Label carrying the id of the agent that made a container or volume.
pub const LABEL_AGENT: &str = "drover.agent";
/// Label carrying the attempt a container or volume belongs to.
pub const LABEL_ATTEMPT: &str = "drover.attempt";
/// Label carrying the step index of a step container.
pub const LABEL_STEP: &str = "drover.step";
/// Mount point of the shared workspace in every container of an attempt.
pub const WORKSPACE_DIR: &str = "/workspace";

/// Errors of an executor. The runner maps them to failure classes.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The step image is not available and could not be pulled.
    #[error("{0}")]
    Image(String),
    /// A path asked for does not exist in the workspace.
    #[error("path {0:?} does not exist in the workspace")]
    NotFound(String),
    /// A path asked for leaves the workspace (through `..` or a symlink).
    #[error("{0}")]
    Escape(String),
    /// The container engine returned an error.
    #[error("docker: {0}")]
    Docker(String),
    /// A local file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: io::Error,
    },
}

impl ExecError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// When to pull a step image (mirrors `drover.v1.PullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pull {
    /// Pull only if the image is not present locally.
    IfNotPresent,
    /// Always pull.
    Always,
    /// Never pull; a missing image is an error.
    Never,
}

/// The shared, labelled workspace of one attempt.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The agent that owns it.
    pub agent_id: String,
    /// The attempt it belongs to.
    pub attempt_id: String,
    /// Engine-side name of the workspace (the Docker volume).
    pub volume: String,
}

impl Workspace {
    /// Labels put on every resource of this attempt.
    pub fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_AGENT.to_string(), self.agent_id.clone()),
            (LABEL_ATTEMPT.to_string(), self.attempt_id.clone()),
        ])
    }
}

/// A created-but-never-started container mounting a workspace, used to move archives in and out.
#[derive(Debug)]
pub struct ArchiveHelper {
    /// Container id.
    pub container: String,
}

/// What an executor needs to run one step.
#[derive(Debug, Clone)]
pub struct StepRun {
    /// Index of the step in its job.
    pub index: u32,
    /// Image reference.
    pub image: String,
    /// Shell commands, run with `sh -e -c` joined by newlines.
    pub commands: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Working directory: empty = workspace root, relative = under the workspace, absolute = as is.
    pub workdir: String,
    /// CPU limit in billionths of a CPU; 0 = unlimited.
    pub nano_cpus: u64,
    /// Memory limit in bytes (no extra swap); 0 = unlimited.
    pub memory_bytes: u64,
    /// Run the container privileged (the runner has checked the agent allows it).
    pub privileged: bool,
    /// Host bind mounts `host:container:ro|rw` besides the workspace (checked likewise).
    pub binds: Vec<String>,
}

impl StepRun {
    /// The working directory inside the container.
    pub fn working_dir(&self) -> String {
        let w = self.workdir.trim();
        if w.is_empty() || w == "." {
            WORKSPACE_DIR.to_string()
        } else if w.starts_with('/') {
            w.to_string()
        } else {
            format!("{WORKSPACE_DIR}/{}", w.trim_start_matches("./"))
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    /// The command exited by itself.
    Exited {
        /// Exit code.
        code: i64,
        /// The kernel killed it for running out of memory.
        oom_killed: bool,
    },
    /// The deadline passed; the container was killed.
    TimedOut {
        /// Exit code after the kill.
        code: i64,
    },
    /// It was stopped on request (SIGTERM, SIGKILL after the grace period).
    Stopped {
        /// Exit code after the stop.
        code: i64,
    },
}

/// Metadata of a path inside the workspace, without following a final symlink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// Target of the symlink, when the path is one.
    pub link_target: Option<String>,
    /// True for a directory.
    pub is_dir: bool,
}

/// Receives a step's output bytes (stdout and stderr interleaved as produced).
pub trait OutputSink: Send {
    /// Called once the step's process has been started (before any output).
    fn started(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Called with the engine id of the step's container right after it started (before
    /// [`OutputSink::started`]), so the runner can journal it for re-adoption after a restart.
    fn container_started(&mut self, _container_id: &str) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Appends bytes; returns once they are readable by the log shipper. The buffer is taken
    /// whole, so the spool can hand it on to the shipper without a copy.
    fn write(&mut self, data: bytes::Bytes) -> impl Future<Output = io::Result<()>> + Send;
}

impl OutputSink for Vec<u8> {
    async fn write(&mut self, data: bytes::Bytes) -> io::Result<()> {
        self.extend_from_slice(&data);
        Ok(())
    }
}

/// A resource left behind by an agent (found by its labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// A container id and the attempt it belonged to.
    Container {
        /// Container id.
        id: String,
        /// Attempt label value.
        attempt: String,
    },
    /// A volume name and the attempt it belonged to.
    Volume {
        /// Volume name.
        name: String,
        /// Attempt label value.
        attempt: String,
    },
}

impl Leftover {
    /// The attempt the resource belonged to.
    pub fn attempt(&self) -> &str {
        match self {
            Leftover::Container { attempt, .. } | Leftover::Volume { attempt, .. } => attempt,
        }
    }
}

/// Runs the steps of attempts in isolated environments sharing one workspace per attempt.
pub trait Executor: Send + Sync + 'static {
    /// Creates the labelled workspace of an attempt.
    fn create_workspace(
        &self,
        agent_id: &str,
        attempt_id: &str,
    ) -> impl Future<Output = Result<Workspace, ExecError>> + Send;

    /// Makes `image` available locally according to `pull`.
    fn ensure_image(
        &self,
        image: &str,
        pull: Pull,
    ) -> impl Future<Output = Result<(), ExecError>> + Send;

    /// Creates an archive helper for `ws` from `image` (which must be available).
    fn archive_helper(
        &self,
        ws: &Workspace,
        image: &str,
    ) -> impl Future<Output = Result<ArchiveHelper, ExecError>> + Send;

    /// Extracts the tar archive at `tar_path` into `dest` (an absolute path in the container).
    fn put_archive(
        &self,
        helper: &ArchiveHelper,
        dest: &str,
        tar_path: &Path,
    ) -> impl Future<Output = Result<(), ExecError>> + Send;

    /// Metadata of `path` (absolute, in the container); `None` if it does not exist.
    fn stat_path(
        &self,
        helper: &ArchiveHelper,
        path: &str,
    ) -> impl Future<Output = Result<Option<PathInfo>, ExecError>> + Send;

    /// Writes a tar archive of `path` (absolute, in the container) to the local file `dest`.
    fn get_archive(
        &self,
        helper: &ArchiveHelper,
        path: &str,
        dest: &Path,
    ) -> impl Future<Output = Result<(), ExecError>> + Send;

    /// [`Executor::get_archive`], also sending every byte of the archive, in order, to `pieces` as
    /// it arrives, so it can be read from memory while the rest still comes (reading it back from
    /// `dest` would cost a copy out of the page cache per byte). The archive is written to `dest`
    /// in full even when the receiver stops listening; dropping `pieces` at the end says no more
    /// will come.
    fn get_archive_streamed(
        &self,
        helper: &ArchiveHelper,
        path: &str,
        dest: &Path,
        pieces: tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
    ) -> impl Future<Output = Result<(), ExecError>> + Send;

    /// Removes an archive helper.
    fn remove_helper(
        &self,
        helper: ArchiveHelper,
    ) -> impl Future<Output = Result<(), ExecError>> + Send;

    /// Runs one step to its end, copying every output byte into `sink`. Past `deadline` the step
    /// is killed; when `stop` resolves with a grace period it is stopped (SIGTERM, then SIGKILL).
    fn run_step<S, F>(
        &self,
        ws: &Workspace,
        step: &StepRun,
        sink: &mut S,
        deadline: Option<Instant>,
        stop: F,
    ) -> impl Future<Output = Result<StepEnd, ExecError>> + Send
    where
        S: OutputSink,
        F: Future<Output = Duration> + Send;

    /// Picks up a step container started by an earlier run of the agent (after a crash): attaches
    /// to it if it still runs, copies what it writes from now on into `sink`, waits for its end
    /// (same deadline and stop rules as [`Executor::run_step`]) and removes it. Output written
    /// while nobody was attached is gone (the log driver is `none`).
    fn resume_step<S, F>(
        &self,
        container_id: &str,
        sink: &mut S,
        deadline: Option<Instant>,
        stop: F,
    ) -> impl Future<Output = Result<StepEnd, ExecError>> + Send
    where
        S: OutputSink,
        F: Future<Output = Duration> + Send;

    /// Removes every container of the workspace's attempt, then the workspace itself.
    fn remove_workspace(
        &self,
        ws: &Workspace,
    ) -> impl Future<Output = Result<(), ExecError>> + Send;

    /// Resources labelled as made by `agent_id`.
    fn leftovers(
        &self,
        agent_id: &str,
    ) -> impl Future<Output = Result<Vec<Leftover>, ExecError>> + Send;

    /// Removes one leftover resource (forcefully: a container is killed first).
    fn remove_leftover(
        &self,
        leftover: &Leftover,
    ) -> impl Future<Output = Result<(), ExecError>> + Send;
}
