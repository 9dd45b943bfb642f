//! Real processes for the benchmarks: the release `drover-coordinator` and `drover-agent` binaries (and
//! this binary's own echo server), their announcement lines parsed from stderr, killed on drop.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use drover_proto::v1::control_service_client::ControlServiceClient;
use drover_proto::v1::CreateTokenRequest;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

/// How long a process may take to print its announcement line.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of a child's stderr kept for error messages.
const TAIL_LINES: usize = 30;

/// Path of a sibling binary of this executable (`target/release/NAME` when run from there).
pub(crate) fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the drover-bench executable")?;
    let dir = exe
        .parent()
        .context("the drover-bench executable has no parent directory")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p drover-coordinator -p drover-agent \
             -p drover-cli -p drover-bench` (scripts/bench does)",
            p.display()
        );
    }
    Ok(p)
}

/// A child process whose stderr is drained in the background (last lines kept); killed on drop.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    what: String,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Proc {
    /// Spawns `cmd` and waits for a stderr line containing `needle`; returns the process and that line.
    /// The caller chooses stdin (a pipe held open by the child handle lets the child notice our death).
    pub(crate) async fn spawn(
        mut cmd: Command,
        what: impl Into<String>,
        needle: &'static str,
    ) -> Result<(Proc, String)> {
        let what = what.into();
        cmd.stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
        let stderr = child
            .stderr
            .take()
            .with_context(|| format!("{what} has no stderr pipe"))?;
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
        let (found_tx, found_rx) = oneshot::channel();
        // The pipe must be drained for the whole life of the child, or it blocks on a full pipe.
        tokio::spawn(drain(stderr, needle, found_tx, tail.clone()));
        let proc = Proc { child, what, tail };
        match tokio::time::timeout(ANNOUNCE_TIMEOUT, found_rx).await {
            Ok(Ok(line)) => Ok((proc, line)),
            Ok(Err(_)) => Err(anyhow!(
                "{} exited before printing {needle:?}; its last output:\n{}",
                proc.what,
                proc.tail()
            )),
            Err(_) => Err(anyhow!(
                "{} did not print {needle:?} within {ANNOUNCE_TIMEOUT:?}; its last output:\n{}",
                proc.what,
                proc.tail()
            )),
        }
    }

    /// The process id (none once it was reaped).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, then reap.
    pub(crate) async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// The last lines the process wrote on stderr.
    pub(crate) fn tail(&self) -> String {
        // Short critical section, never held across an await.
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

async fn drain(
    stderr: tokio::process::ChildStderr,
    needle: &'static str,
    found: oneshot::Sender<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut found = Some(found);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains(needle) {
            if let Some(tx) = found.take() {
                let _ = tx.send(line.clone());
            }
        }
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

/// A running `drover-coordinator` with its own data directory.
#[derive(Debug)]
pub(crate) struct Coordinator {
    proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub(crate) url: String,
    /// The admin API token the coordinator wrote at first start.
    admin_token: String,
    dir: tempfile::TempDir,
}

/// A new scratch directory for a coordinator's data (see [`Coordinator::start_in`]).
pub(crate) fn scratch_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("drover-bench-")
        .tempdir()
        .context("creating a scratch directory")
}

/// A ControlService client sending the coordinator's admin token.
pub(crate) type Control = ControlServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer TOKEN` to every call.
#[derive(Debug, Clone)]
pub(crate) struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

impl Coordinator {
    /// Starts the coordinator on a free loopback port with these extra flags.
    pub(crate) async fn start(args: &[&str]) -> Result<Coordinator> {
        Self::start_in(scratch_dir()?, args).await
    }

    /// Starts the coordinator with its data in `dir/coordinator` (which may hold a store already).
    pub(crate) async fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Result<Coordinator> {
        let data = dir.path().join("coordinator");
        let mut cmd = Command::new(sibling_bin("drover-coordinator")?);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--http-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .stdin(Stdio::null())
            // Per-job info logging would be part of what is measured; warnings still show in errors.
            .env("RUST_LOG", "warn");
        let (proc, line) = Proc::spawn(cmd, "drover-coordinator", "listening on").await?;
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .with_context(|| format!("no address in the coordinator's line {line:?}"))?;
        // Written by the coordinator's first start, before it listens.
        let token_file = data.join("admin.token");
        let admin_token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_string();
        Ok(Coordinator {
            proc,
            url: format!("http://{addr}"),
            admin_token,
            dir,
        })
    }

    /// The admin API token (for the `drover` CLI's `--token`).
    pub(crate) fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The coordinator's process id.
    pub(crate) fn pid(&self) -> Result<u32> {
        self.proc.pid().context("the coordinator process is gone")
    }

    /// A scratch directory next to the coordinator's data (same disk).
    pub(crate) fn scratch(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }

    /// A new connection for a ControlService client.
    pub(crate) async fn control(&self) -> Result<Control> {
        let ch = connect(&self.url).await?;
        let token = format!("Bearer {}", self.admin_token)
            .parse()
            .context("admin token is not a valid header value")?;
        Ok(
            ControlServiceClient::with_interceptor(ch, BearerToken(token))
                .max_decoding_message_size(drover_proto::MAX_MESSAGE_BYTES),
        )
    }

    /// An enrollment token good for `uses` enrollments.
    pub(crate) async fn token(&self, uses: u32) -> Result<String> {
        let resp = self
            .control()
            .await?
            .create_token(CreateTokenRequest {
                uses,
                ttl_secs: 3600,
                labels: HashMap::new(),
            })
            .await
            .context("CreateToken")?;
        Ok(resp.into_inner().token)
    }

    /// Enrolls and starts a real `drover-agent`; returns once it is attached.
    pub(crate) async fn spawn_agent(
        &self,
        name: &str,
        labels: &str,
        capacity: u32,
    ) -> Result<Agent> {
        self.spawn_agent_with(name, labels, capacity, &[]).await
    }

    /// [`Coordinator::spawn_agent`] with extra agent flags (`--max-log-bytes 0`, `--executor shell`).
    pub(crate) async fn spawn_agent_with(
        &self,
        name: &str,
        labels: &str,
        capacity: u32,
        args: &[&str],
    ) -> Result<Agent> {
        let token = self.token(1).await?;
        let state_dir = self.dir.path().join(format!("agent-{name}"));
        let mut cmd = Command::new(sibling_bin("drover-agent")?);
        cmd.arg("--coordinator")
            .arg(&self.url)
            .arg("--token")
            .arg(&token)
            .arg("--labels")
            .arg(labels)
            .arg("--capacity")
            .arg(capacity.to_string())
            .arg("--state-dir")
            .arg(&state_dir)
            .args(args)
            .stdin(Stdio::null())
            .env("RUST_LOG", "warn");
        let (proc, line) = Proc::spawn(cmd, format!("drover-agent {name}"), "attached to").await?;
        let id = line
            .split("drover-agent ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .with_context(|| format!("no agent id in the agent's line {line:?}"))?
            .to_string();
        Ok(Agent { proc, id })
    }

    /// The coordinator's last stderr lines.
    pub(crate) fn tail(&self) -> String {
        self.proc.tail()
    }

    /// SIGKILL the coordinator and hand back its directory (for a restart over the same data).
    pub(crate) async fn kill(mut self) -> tempfile::TempDir {
        self.proc.kill().await;
        self.dir
    }
}

/// A running `drover-agent`. Dropping it kills it and removes the containers and volumes it left.
#[derive(Debug)]
pub(crate) struct Agent {
    proc: Proc,
    /// The agent id from its "attached" line.
    pub(crate) id: String,
}

impl Agent {
    /// The agent's process id (none once it was reaped).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `kill -9`: its containers keep running until [`Agent`] is dropped.
    pub(crate) async fn kill(&mut self) {
        self.proc.kill().await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Kill and reap first, so the agent cannot start anything new while its leftovers are removed.
        let _ = self.proc.child.start_kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while matches!(self.proc.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let label = format!("drover.agent={}", self.id);
        // A create request the agent sent just before dying can still land; sweep again after it.
        remove_labelled(&label);
        std::thread::sleep(Duration::from_millis(300));
        remove_labelled(&label);
    }
}

/// Runs `cmd` (described as `what` in errors) to its end with no input and returns its standard output
/// (empty when the caller sent it elsewhere); fails with its standard error unless it exited 0. The
/// floors that run the Docker CLI as a user would, and the benchmarks' `docker` queries.
pub(crate) async fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes every container and volume carrying `label` (`k=v`), by the docker CLI: this runs in `Drop`.
pub(crate) fn remove_labelled(label: &str) {
    let filter = format!("label={label}");
    let list = |args: &[&str]| -> Vec<String> {
        std::process::Command::new("docker")
            .args(args)
            .arg("--filter")
            .arg(&filter)
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let containers = list(&["ps", "-aq"]);
    if !containers.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f"])
            .args(&containers)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let volumes = list(&["volume", "ls", "-q"]);
    if !volumes.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm", "-f"])
            .args(&volumes)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One new HTTP/2 connection to `url` (no sharing: each caller gets its own socket).
pub(crate) async fn connect(url: &str) -> Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad URL {url}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}
