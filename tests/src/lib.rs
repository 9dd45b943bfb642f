//! Harness for Drover's end-to-end tests: real coordinator and agent processes on loopback, a real
//! Docker engine, the real `drover` CLI.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cluster = drover_tests::Cluster::new().agent("a", "os=linux").start().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_proto::v1::control_service_client::ControlServiceClient;
use drover_proto::v1::{
    CreateTokenRequest, FollowLogsRequest, GetRunRequest, JobState, Run, RunState,
};
use futures::StreamExt;
use tonic::transport::Channel;

/// Image the tests' steps run in (built by `scripts/build-image`).
pub const IMAGE: &str = "drover-busybox:latest";

/// Directory holding the workspace's debug binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    // The test executable lives in target/debug/deps.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/debug")
        .to_path_buf()
}

/// Path of one of Drover's binaries; panics with the fix when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

/// Spawns `cmd`, forwards its stderr to ours (prefixed) and returns a channel of its stderr lines.
fn spawn_logged(mut cmd: Command, tag: String) -> Result<(Child, mpsc::Receiver<String>)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {tag}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            let _ = tx.send(line);
        }
    });
    Ok((child, rx))
}

/// Waits for a stderr line containing `needle`; returns it.
fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(line),
            Ok(_) => {}
            Err(_) => bail!("no line containing {needle:?} within {timeout:?}"),
        }
    }
}

/// Settings of one agent in a cluster.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Name used in logs and in the state directory.
    pub name: String,
    /// `k=v,k=v` labels.
    pub labels: String,
    /// Concurrent jobs.
    pub capacity: u32,
}

/// Builder of a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    agents: Vec<AgentSpec>,
    coordinator_args: Vec<String>,
}

impl ClusterBuilder {
    /// Adds an agent with these labels and capacity 2.
    pub fn agent(mut self, name: &str, labels: &str) -> Self {
        self.agents.push(AgentSpec {
            name: name.into(),
            labels: labels.into(),
            capacity: 2,
        });
        self
    }

    /// Adds an agent with an explicit capacity.
    pub fn agent_with_capacity(mut self, name: &str, labels: &str, capacity: u32) -> Self {
        self.agents.push(AgentSpec {
            name: name.into(),
            labels: labels.into(),
            capacity,
        });
        self
    }

    /// Extra coordinator flags (e.g. `--lease-ttl 3s`).
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args
            .extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Starts the coordinator, enrolls and starts every agent, waits until all are attached.
    pub async fn start(self) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("drover-e2e-").tempdir()?;
        let mut cluster = Cluster {
            dir,
            coordinator: None,
            addr: String::new(),
            agents: BTreeMap::new(),
            coordinator_args: self.coordinator_args,
        };
        cluster.start_coordinator(None)?;
        for spec in self.agents {
            cluster.add_agent(spec).await?;
        }
        Ok(cluster)
    }
}

/// A running agent process.
#[derive(Debug)]
pub struct AgentProc {
    /// Its settings.
    pub spec: AgentSpec,
    /// The process, while it runs.
    pub child: Option<Child>,
    /// Its id, from its "attached" line.
    pub id: String,
    /// Its state directory.
    pub state_dir: PathBuf,
}

/// A coordinator and agents running as real processes.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    coordinator: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// Agents by name.
    pub agents: BTreeMap<String, AgentProc>,
    coordinator_args: Vec<String>,
}

impl Cluster {
    /// A builder with no agents.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> ClusterBuilder {
        ClusterBuilder {
            agents: Vec::new(),
            coordinator_args: Vec::new(),
        }
    }

    /// The coordinator's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// A scratch directory for the test.
    pub fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).expect("scratch dir");
        p
    }

    /// Starts the coordinator on `listen` (default: a free loopback port, then the same port on restarts).
    fn start_coordinator(&mut self, listen: Option<String>) -> Result<()> {
        let listen = listen.unwrap_or_else(|| "127.0.0.1:0".into());
        let mut cmd = Command::new(bin("drover-coordinator"));
        cmd.arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.coordinator_args)
            .env("RUST_LOG", "info");
        let (child, rx) = spawn_logged(cmd, "coordinator".into())?;
        self.coordinator = Some(child);
        let line = wait_line(&rx, "listening on", Duration::from_secs(30))?;
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("address in the listening line")?;
        self.addr = format!("http://{addr}");
        Ok(())
    }

    /// `kill -9` of the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the coordinator again on the same address and data directory.
    pub fn restart_coordinator(&mut self) -> Result<()> {
        let listen = self.addr.trim_start_matches("http://").to_string();
        self.start_coordinator(Some(listen))
    }

    /// A ControlService client.
    pub async fn client(&self) -> Result<ControlServiceClient<Channel>> {
        let c = ControlServiceClient::connect(self.addr.clone())
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        Ok(c.max_decoding_message_size(drover_proto::MAX_MESSAGE_BYTES))
    }

    /// Creates an enrollment token.
    pub async fn token(&self, labels: &str) -> Result<String> {
        let resp = self
            .client()
            .await?
            .create_token(CreateTokenRequest {
                uses: 1,
                ttl_secs: 600,
                labels: parse_labels(labels),
            })
            .await?;
        Ok(resp.into_inner().token)
    }

    /// Enrolls and starts an agent; waits until it is attached.
    pub async fn add_agent(&mut self, spec: AgentSpec) -> Result<()> {
        let state_dir = self.dir.path().join(format!("agent-{}", spec.name));
        let token = self.token("").await?;
        let mut proc = AgentProc {
            spec: spec.clone(),
            child: None,
            id: String::new(),
            state_dir,
        };
        self.spawn_agent(&mut proc, Some(&token))?;
        self.agents.insert(spec.name.clone(), proc);
        Ok(())
    }

    fn spawn_agent(&self, proc: &mut AgentProc, token: Option<&str>) -> Result<()> {
        let mut cmd = Command::new(bin("drover-agent"));
        cmd.arg("--coordinator")
            .arg(&self.addr)
            .arg("--labels")
            .arg(&proc.spec.labels)
            .arg("--capacity")
            .arg(proc.spec.capacity.to_string())
            .arg("--state-dir")
            .arg(&proc.state_dir)
            .env("RUST_LOG", "info");
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        let (child, rx) = spawn_logged(cmd, format!("agent {}", proc.spec.name))?;
        proc.child = Some(child);
        let line = wait_line(&rx, "attached to", Duration::from_secs(30))?;
        proc.id = line
            .split("drover-agent ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("agent id in the attached line")?
            .to_string();
        Ok(())
    }

    /// `kill -9` of an agent (its containers keep running).
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(mut c) = self.agents.get_mut(name).and_then(|a| a.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed agent again from its state directory (no token).
    pub fn restart_agent(&mut self, name: &str) -> Result<()> {
        let mut proc = self.agents.remove(name).context("no such agent")?;
        let r = self.spawn_agent(&mut proc, None);
        self.agents.insert(name.to_string(), proc);
        r
    }

    /// Id of an agent.
    pub fn agent_id(&self, name: &str) -> String {
        self.agents[name].id.clone()
    }

    /// Runs the `drover` CLI against this cluster.
    pub fn drover(&self, args: &[&str]) -> Output {
        Command::new(bin("drover"))
            .args(args)
            .env("DROVER_COORDINATOR", &self.addr)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("running drover")
    }

    /// Submits a pipeline through the API (no context); returns the run id.
    pub async fn submit(&self, pipeline: &str) -> Result<String> {
        let resp = self
            .client()
            .await?
            .submit_run(drover_proto::v1::SubmitRunRequest {
                pipeline: pipeline.into(),
                context_digest: String::new(),
                name: "test".into(),
            })
            .await?;
        Ok(resp.into_inner().run_id)
    }

    /// The run now.
    pub async fn run(&self, id: &str) -> Result<Run> {
        Ok(self
            .client()
            .await?
            .get_run(GetRunRequest { run_id: id.into() })
            .await?
            .into_inner())
    }

    /// Waits until the run is finished; returns it.
    pub async fn wait_run(&self, id: &str, timeout: Duration) -> Result<Run> {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id).await?;
            if run.state() != RunState::Running {
                return Ok(run);
            }
            if Instant::now() > deadline {
                bail!("run {id} not finished within {timeout:?}: {run:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `pred` holds for the run.
    pub async fn wait_until(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Run) -> bool,
    ) -> Result<Run> {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id).await?;
            if pred(&run) {
                return Ok(run);
            }
            if Instant::now() > deadline {
                bail!("condition not reached within {timeout:?}: {run:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The complete stored log of one step (waits for it to be complete).
    pub async fn log(&self, run: &str, job: &str, step: &str) -> Result<Vec<u8>> {
        let mut stream = self
            .client()
            .await?
            .follow_logs(FollowLogsRequest {
                run_id: run.into(),
                job: job.into(),
                step: step.into(),
                offset: 0,
                follow: true,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            anyhow::ensure!(
                ev.offset as usize == out.len(),
                "log event at offset {} but {} bytes received",
                ev.offset,
                out.len()
            );
            out.extend_from_slice(&ev.data);
        }
        Ok(out)
    }

    /// Containers and volumes the cluster's agents left behind (by their labels).
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for a in self.agents.values() {
            for (what, args) in [
                ("container", vec!["ps", "-aq"]),
                ("volume", vec!["volume", "ls", "-q"]),
            ] {
                let out = Command::new("docker")
                    .args(&args)
                    .arg("--filter")
                    .arg(format!("label=drover.agent={}", a.id))
                    .output()
                    .expect("docker");
                for l in String::from_utf8_lossy(&out.stdout).lines() {
                    found.push(format!("{what} {l} of agent {}", a.spec.name));
                }
            }
        }
        found
    }

    /// Waits up to `timeout` for every container and volume of the agents to be gone.
    pub async fn assert_no_leftovers(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "leaked: {left:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in self.agents.values_mut() {
            if let Some(mut c) = a.child.take() {
                // SIGTERM would drain; the test is over, so stop at once.
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        self.kill_coordinator();
        // Remove what killed agents may have left, so one failed test does not disturb the next.
        for a in self.agents.values() {
            if a.id.is_empty() {
                continue;
            }
            let filter = format!("label=drover.agent={}", a.id);
            if let Ok(out) = Command::new("docker")
                .args(["ps", "-aq", "--filter", &filter])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["rm", "-f", id]).output();
                }
            }
            if let Ok(out) = Command::new("docker")
                .args(["volume", "ls", "-q", "--filter", &filter])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["volume", "rm", "-f", id]).output();
                }
            }
        }
    }
}

/// `k=v,k=v` -> map.
pub fn parse_labels(s: &str) -> std::collections::HashMap<String, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The job of a run by name.
pub fn job<'a>(run: &'a Run, name: &str) -> &'a drover_proto::v1::Job {
    run.jobs
        .iter()
        .find(|j| j.name == name)
        .unwrap_or_else(|| panic!("no job {name} in {run:#?}"))
}

/// State of a job of a run.
pub fn job_state(run: &Run, name: &str) -> JobState {
    job(run, name).state()
}
