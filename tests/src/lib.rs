//! Harness for Drover's end-to-end tests: real coordinator and agent processes on loopback, a real
//! Docker engine, the real `drover` CLI.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cluster = drover_tests::Cluster::new().agent("a", "os=linux").start().await?;
//! # Ok(()) }
//! ```

pub mod chromium;
pub mod moto;
pub mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use drover_proto::v1::control_service_client::ControlServiceClient;
use drover_proto::v1::{
    CreateTokenRequest, FailureClass, FollowLogsRequest, GetRunRequest, JobState, Run, RunState,
};
use futures::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;

/// Adds `authorization: Bearer TOKEN` (an API token) to every ControlService call.
#[derive(Debug, Clone)]
pub struct ApiToken(MetadataValue<Ascii>);

impl ApiToken {
    /// An interceptor sending `token`.
    pub fn new(token: &str) -> Result<Self> {
        Ok(ApiToken(
            format!("Bearer {}", token.trim())
                .parse()
                .context("token is not a valid header value")?,
        ))
    }
}

impl Interceptor for ApiToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A ControlService client carrying an API token.
pub type Control = ControlServiceClient<InterceptedService<Channel, ApiToken>>;

/// Connects a ControlService client to `addr` (`http://...`) sending `token`.
pub async fn connect_control(addr: &str, token: &str) -> Result<Control> {
    let channel = Channel::from_shared(addr.to_string())?
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(
        ControlServiceClient::with_interceptor(channel, ApiToken::new(token)?)
            .max_decoding_message_size(drover_proto::MAX_MESSAGE_BYTES),
    )
}

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

/// Runs `drover-coordinator` with `args`, an HTTP side on a free loopback port and the data directory
/// `d` inside a new temporary directory, and asserts that it refuses to start. Returns its stderr and the
/// temporary directory (to check what the refusal left behind).
pub fn coordinator_refused(args: &[&str]) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("drover-coordinator"))
        .args(args)
        .args(["--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the coordinator started: {err}");
    (err, dir)
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
    /// Names of the agents that reach the coordinator through a [`proxy::Proxy`].
    proxied: BTreeSet<String>,
    /// Extra flags of every agent.
    agent_args: Vec<String>,
    /// Extra environment of the coordinator.
    coordinator_env: Vec<(String, String)>,
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

    /// Adds an agent that reaches the coordinator through its own [`proxy::Proxy`] (see
    /// [`Cluster::proxy`]), so a test can cut or blackhole its network path.
    pub fn agent_via_proxy(mut self, name: &str, labels: &str, capacity: u32) -> Self {
        self.proxied.insert(name.to_string());
        self.agent_with_capacity(name, labels, capacity)
    }

    /// Extra flags for every agent (e.g. `--max-log-bytes 1000`).
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Extra coordinator flags (e.g. `--lease-ttl 3s`).
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_args
            .extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// An environment variable for the coordinator (e.g. `AWS_ACCESS_KEY_ID`), kept across restarts.
    pub fn coordinator_env(mut self, key: &str, value: &str) -> Self {
        self.coordinator_env
            .push((key.to_string(), value.to_string()));
        self
    }

    /// Starts the coordinator, enrolls and starts every agent, waits until all are attached.
    pub async fn start(self) -> Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("drover-e2e-").tempdir()?;
        let mut cluster = Cluster {
            dir,
            coordinator: None,
            addr: String::new(),
            admin_token: String::new(),
            http_addr: String::new(),
            agents: BTreeMap::new(),
            coordinator_args: self.coordinator_args,
            coordinator_env: self.coordinator_env,
            proxies: BTreeMap::new(),
            agent_args: self.agent_args,
        };
        cluster.start_coordinator(None)?;
        if !self.proxied.is_empty() {
            // The coordinator keeps its port across restarts, so a proxy's target stays valid.
            let target: std::net::SocketAddr =
                cluster
                    .addr
                    .trim_start_matches("http://")
                    .parse()
                    .with_context(|| format!("coordinator address {}", cluster.addr))?;
            for name in &self.proxied {
                let p = proxy::Proxy::start(target)
                    .await
                    .context("starting an agent's proxy")?;
                cluster.proxies.insert(name.clone(), p);
            }
        }
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
    /// Flags of this agent only, after the cluster's `agent_args` (kept across restarts).
    pub extra_args: Vec<String>,
}

/// A coordinator and agents running as real processes.
#[derive(Debug)]
pub struct Cluster {
    dir: tempfile::TempDir,
    coordinator: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    /// The coordinator's bootstrap admin API token (from `<data>/admin.token`).
    pub admin_token: String,
    /// The coordinator's HTTP side (dashboard, probes, metrics): `http://127.0.0.1:PORT`.
    pub http_addr: String,
    /// Agents by name.
    pub agents: BTreeMap<String, AgentProc>,
    coordinator_args: Vec<String>,
    coordinator_env: Vec<(String, String)>,
    /// Proxies of the agents attached through one, by agent name.
    proxies: BTreeMap<String, proxy::Proxy>,
    /// Extra flags of every agent.
    agent_args: Vec<String>,
}

impl Cluster {
    /// A builder with no agents.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> ClusterBuilder {
        ClusterBuilder {
            agents: Vec::new(),
            coordinator_args: Vec::new(),
            proxied: BTreeSet::new(),
            agent_args: Vec::new(),
            coordinator_env: Vec::new(),
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
            .arg("--http-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(&self.coordinator_args)
            .envs(self.coordinator_env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info");
        let (child, rx) = spawn_logged(cmd, "coordinator".into())?;
        self.coordinator = Some(child);
        // Printed while binding, before the "listening on" line.
        let http = wait_line(&rx, "http on ", Duration::from_secs(30))?;
        let http = http
            .split("http on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("address in the http line")?;
        self.http_addr = format!("http://{http}");
        let line = wait_line(&rx, "listening on", Duration::from_secs(30))?;
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("address in the listening line")?;
        self.addr = format!("http://{addr}");
        // Written by the first start (before it listens); kept across restarts.
        let token_file = self.data_dir().join("admin.token");
        self.admin_token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("reading {}", token_file.display()))?
            .trim()
            .to_string();
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
    pub async fn client(&self) -> Result<Control> {
        connect_control(&self.addr, &self.admin_token).await
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
        self.add_agent_with_args(spec, &[]).await
    }

    /// [`Cluster::add_agent`] with flags for this agent only (e.g. `--allow-privileged`).
    pub async fn add_agent_with_args(&mut self, spec: AgentSpec, args: &[&str]) -> Result<()> {
        let state_dir = self.dir.path().join(format!("agent-{}", spec.name));
        let token = self.token("").await?;
        let mut proc = AgentProc {
            spec: spec.clone(),
            child: None,
            id: String::new(),
            state_dir,
            extra_args: args.iter().map(|s| s.to_string()).collect(),
        };
        self.spawn_agent(&mut proc, Some(&token))?;
        self.agents.insert(spec.name.clone(), proc);
        Ok(())
    }

    fn spawn_agent(&self, proc: &mut AgentProc, token: Option<&str>) -> Result<()> {
        let url = self
            .proxies
            .get(&proc.spec.name)
            .map(proxy::Proxy::url)
            .unwrap_or_else(|| self.addr.clone());
        let mut cmd = Command::new(bin("drover-agent"));
        cmd.arg("--coordinator")
            .arg(&url)
            .arg("--labels")
            .arg(&proc.spec.labels)
            .arg("--capacity")
            .arg(proc.spec.capacity.to_string())
            .arg("--state-dir")
            .arg(&proc.state_dir)
            .args(&self.agent_args)
            .args(&proc.extra_args)
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

    /// The proxy an agent added with [`ClusterBuilder::agent_via_proxy`] goes through.
    pub fn proxy(&self, name: &str) -> Option<&proxy::Proxy> {
        self.proxies.get(name)
    }

    /// Sends `signal` (a `kill -SIG` name such as `STOP`) to a running agent; false when it is not running.
    fn signal_agent(&self, name: &str, signal: &str) -> Result<bool> {
        let Some(child) = self.agents.get(name).and_then(|a| a.child.as_ref()) else {
            return Ok(false);
        };
        // A pid of a child we hold and have not waited for: it cannot have been reused.
        let pid = child.id().to_string();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(&pid)
            .status()
            .with_context(|| format!("running kill -{signal} {pid}"))?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed: {status}");
        Ok(true)
    }

    /// SIGSTOP of an agent: it freezes (no heartbeats, no output) without its sockets closing, like a
    /// host stalled by swapping or a long GC pause. Returns false when the agent is not running.
    pub fn stop_agent(&self, name: &str) -> Result<bool> {
        self.signal_agent(name, "STOP")
    }

    /// SIGCONT of an agent stopped with [`Cluster::stop_agent`]. Returns false when it is not running.
    pub fn cont_agent(&self, name: &str) -> Result<bool> {
        self.signal_agent(name, "CONT")
    }

    /// Stops an agent cleanly: SIGTERM (it drains and exits), then waits up to `grace` for it to exit;
    /// past that it is killed and an error says so. Ok(None) when the agent was not running.
    pub fn terminate_agent(
        &mut self,
        name: &str,
        grace: Duration,
    ) -> Result<Option<std::process::ExitStatus>> {
        if !self.signal_agent(name, "TERM")? {
            return Ok(None);
        }
        let mut child = self
            .agents
            .get_mut(name)
            .and_then(|a| a.child.take())
            .context("agent vanished while terminating")?;
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent {name} did not exit within {grace:?} of SIGTERM; killed it");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
            .env("DROVER_TOKEN", &self.admin_token)
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
                ..Default::default()
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
                    let _ = Command::new("docker")
                        .args(["volume", "rm", "-f", id])
                        .output();
                }
            }
        }
    }
}

/// True for the states a job never leaves.
pub fn job_state_is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded
            | JobState::Failed
            | JobState::Skipped
            | JobState::Canceled
            | JobState::TimedOut
            | JobState::Lost
    )
}

/// Checks a finished run against DESIGN.md's invariants that the API can show; returns one line per
/// violation (empty when it holds). `max_attempts` is 1 + the coordinator's infrastructure retry budget.
///
/// Checked: the run and every job are terminal and carry their finish time; the run's state agrees
/// with its jobs'; no job made more than `max_attempts` attempts; a succeeded job has an attempt, an
/// agent, no failure class and every step succeeded with exit code 0; a failed or lost job names a
/// failure class; a job that ran had every job it needs succeeded before it started, and a skipped
/// job never ran and needs a job that did not succeed.
pub fn run_violations(run: &Run, max_attempts: u32) -> Vec<String> {
    let mut bad = Vec::new();
    let rid = &run.id;
    if matches!(run.state(), RunState::Running | RunState::Unspecified) {
        bad.push(format!("run {rid}: not terminal ({:?})", run.state()));
    } else if run.finished_ms <= 0 {
        bad.push(format!(
            "run {rid}: terminal ({:?}) without a finish time",
            run.state()
        ));
    }
    let all_succeeded = run.jobs.iter().all(|j| j.state() == JobState::Succeeded);
    match run.state() {
        RunState::Succeeded if !all_succeeded => {
            bad.push(format!("run {rid}: SUCCEEDED but not every job succeeded"))
        }
        RunState::Failed if all_succeeded => {
            bad.push(format!("run {rid}: FAILED but every job succeeded"))
        }
        _ => {}
    }
    let by_name: BTreeMap<&str, &drover_proto::v1::Job> =
        run.jobs.iter().map(|j| (j.name.as_str(), j)).collect();
    for j in &run.jobs {
        let at = format!("run {rid} job {}", j.name);
        let state = j.state();
        if !job_state_is_terminal(state) {
            bad.push(format!("{at}: not terminal ({state:?})"));
            continue;
        }
        if j.attempts > max_attempts {
            bad.push(format!(
                "{at}: {} attempts, more than 1 + retry budget = {max_attempts}",
                j.attempts
            ));
        }
        if state != JobState::Skipped && state != JobState::Canceled && j.finished_ms <= 0 {
            bad.push(format!("{at}: {state:?} without a finish time"));
        }
        match state {
            JobState::Succeeded => {
                if j.attempts == 0 || j.attempt_id.is_empty() || j.agent_id.is_empty() {
                    bad.push(format!(
                        "{at}: SUCCEEDED without a committed attempt (attempts {}, attempt {:?}, agent {:?})",
                        j.attempts, j.attempt_id, j.agent_id
                    ));
                }
                if j.failure() != FailureClass::None {
                    bad.push(format!(
                        "{at}: SUCCEEDED with failure class {:?}",
                        j.failure()
                    ));
                }
                for (i, s) in j.steps.iter().enumerate() {
                    if s.state() != JobState::Succeeded || s.exit_code != 0 {
                        bad.push(format!(
                            "{at}: SUCCEEDED but step {i} ({}) is {:?} with exit code {}",
                            s.name,
                            s.state(),
                            s.exit_code
                        ));
                    }
                }
                if j.started_ms <= 0 || j.finished_ms < j.started_ms {
                    bad.push(format!(
                        "{at}: times out of order: started {} finished {}",
                        j.started_ms, j.finished_ms
                    ));
                }
            }
            JobState::Failed | JobState::Lost if j.failure() == FailureClass::None => {
                bad.push(format!("{at}: {state:?} without a failure class"));
            }
            _ => {}
        }
        let needs: Vec<&drover_proto::v1::Job> = j
            .needs
            .iter()
            .filter_map(|n| {
                let found = by_name.get(n.as_str()).copied();
                if found.is_none() {
                    bad.push(format!("{at}: needs {n}, which is not a job of the run"));
                }
                found
            })
            .collect();
        if state == JobState::Skipped {
            if j.attempts != 0 {
                bad.push(format!("{at}: SKIPPED after {} attempts", j.attempts));
            }
            if needs.iter().all(|n| n.state() == JobState::Succeeded) {
                bad.push(format!(
                    "{at}: SKIPPED although every job it needs succeeded"
                ));
            }
        } else if j.attempts > 0 {
            for n in &needs {
                if n.state() != JobState::Succeeded {
                    bad.push(format!(
                        "{at}: ran although the job it needs {} is {:?}",
                        n.name,
                        n.state()
                    ));
                } else if j.started_ms > 0 && j.started_ms < n.finished_ms {
                    bad.push(format!(
                        "{at}: started at {} before the job it needs {} finished at {}",
                        j.started_ms, n.name, n.finished_ms
                    ));
                }
            }
        }
    }
    bad
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

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::v1::{Job, Step};

    fn done_job(name: &str, needs: &[&str], started: i64, finished: i64) -> Job {
        Job {
            name: name.into(),
            state: JobState::Succeeded as i32,
            needs: needs.iter().map(|s| s.to_string()).collect(),
            agent_id: "agent-1".into(),
            attempt_id: format!("{name}-attempt"),
            attempts: 1,
            steps: vec![Step {
                name: "s0".into(),
                state: JobState::Succeeded as i32,
                ..Default::default()
            }],
            started_ms: started,
            finished_ms: finished,
            ..Default::default()
        }
    }

    fn run_of(state: RunState, jobs: Vec<Job>) -> Run {
        Run {
            id: "r".into(),
            state: state as i32,
            finished_ms: 100,
            jobs,
            ..Default::default()
        }
    }

    #[test]
    fn a_clean_run_has_no_violations() {
        let run = run_of(
            RunState::Succeeded,
            vec![done_job("a", &[], 1, 10), done_job("b", &["a"], 11, 20)],
        );
        assert_eq!(run_violations(&run, 3), Vec::<String>::new());
    }

    #[test]
    fn each_broken_invariant_is_reported() {
        let mut too_many = done_job("a", &[], 1, 10);
        too_many.attempts = 4;
        let early = done_job("b", &["a"], 5, 20);
        let mut skipped_wrongly = done_job("c", &["a"], 0, 0);
        skipped_wrongly.state = JobState::Skipped as i32;
        let mut running = done_job("d", &[], 1, 0);
        running.state = JobState::Running as i32;
        let mut failed_classless = done_job("e", &[], 1, 2);
        failed_classless.state = JobState::Failed as i32;
        let mut bad_step = done_job("f", &[], 1, 2);
        bad_step.steps[0].state = JobState::Failed as i32;
        let run = run_of(
            RunState::Succeeded,
            vec![
                too_many,
                early,
                skipped_wrongly,
                running,
                failed_classless,
                bad_step,
            ],
        );
        let v = run_violations(&run, 3).join("\n");
        for needle in [
            "job a: 4 attempts",
            "job b: started at 5 before the job it needs a finished at 10",
            "job c: SKIPPED after 1 attempts",
            "job c: SKIPPED although every job it needs succeeded",
            "job d: not terminal",
            "job e: Failed without a failure class",
            "job f: SUCCEEDED but step 0",
            "run r: SUCCEEDED but not every job succeeded",
        ] {
            assert!(v.contains(needle), "missing {needle:?} in:\n{v}");
        }
        let unfinished = run_of(RunState::Running, vec![]);
        assert!(run_violations(&unfinished, 3)[0].contains("not terminal"));
    }
}
