//! Operating the fleet: ephemeral and idle-timeout agents (scale to zero), the agent's Prometheus
//! metrics. Agents here are started by the test itself because they take flags the harness's do not.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use drover_proto::v1::{JobState, RunState};
use drover_tests::{bin, job, job_state, Cluster, IMAGE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An agent process with extra flags; killed if the test ends before it exits.
struct FlaggedAgent {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    seen: Vec<String>,
    name: String,
}

impl FlaggedAgent {
    /// Enrolls and starts `drover-agent` with `labels` and `extra` flags; waits until it attached.
    async fn start(cluster: &Cluster, name: &str, labels: &str, extra: &[&str]) -> FlaggedAgent {
        let token = cluster.token("").await.expect("enrollment token");
        let state = cluster.scratch().join(format!("agent-{name}"));
        FlaggedAgent::spawn(&cluster.addr, &token, &state, name, labels, extra)
    }

    /// Starts an agent enrolling at `addr` with `token`; waits until it attached.
    fn spawn(
        addr: &str,
        token: &str,
        state: &Path,
        name: &str,
        labels: &str,
        extra: &[&str],
    ) -> FlaggedAgent {
        let mut cmd = Command::new(bin("drover-agent"));
        cmd.arg("--coordinator")
            .arg(addr)
            .arg("--token")
            .arg(token)
            .arg("--labels")
            .arg(labels)
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning drover-agent");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent {tag}] {line}");
                let _ = tx.send(line);
            }
        });
        let mut agent = FlaggedAgent {
            child,
            lines,
            seen: Vec::new(),
            name: name.to_string(),
        };
        agent.wait_line("attached to", Duration::from_secs(30));
        agent
    }

    /// The first stderr line (seen before or arriving within `timeout`) containing `needle`.
    fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "agent {}: no line containing {needle:?} within {timeout:?}",
                    self.name
                ),
            }
        }
    }

    /// Waits for the process to exit by itself; `None` if it still runs after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FlaggedAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Two independent jobs for agents labelled `pool=LABEL`; each step takes a moment.
fn two_jobs(label: &str) -> String {
    format!(
        r#"
jobs:
  first:
    agents: {{ pool: {label} }}
    steps:
      - image: {IMAGE}
        commands: [echo first]
  second:
    agents: {{ pool: {label} }}
    steps:
      - image: {IMAGE}
        commands: [echo second]
"#
    )
}

/// An ephemeral agent runs exactly one job and exits 0; a second ephemeral agent picks up the job
/// left in the queue (the scale-out pattern an autoscaler relies on).
#[tokio::test(flavor = "multi_thread")]
async fn ephemeral_agent_exits_after_one_job() {
    let cluster = Cluster::new().start().await.unwrap();
    let run_id = cluster.submit(&two_jobs("eph")).await.unwrap();
    let mut a = FlaggedAgent::start(&cluster, "eph-1", "pool=eph", &["--ephemeral"]).await;
    let status = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(60)))
        .expect("the ephemeral agent did not exit within 60 s of its job");
    assert!(status.success(), "ephemeral agent exited with {status}");

    let run = cluster.run(&run_id).await.unwrap();
    let done: Vec<&str> = run
        .jobs
        .iter()
        .filter(|j| j.state() == JobState::Succeeded)
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(done.len(), 1, "exactly one job ran: {run:#?}");
    let first_agent = job(&run, done[0]).agent_id.clone();
    let left = if done[0] == "first" {
        "second"
    } else {
        "first"
    };
    assert!(
        matches!(job_state(&run, left), JobState::Queued),
        "the other job waits for an agent: {run:#?}"
    );

    let mut b = FlaggedAgent::start(&cluster, "eph-2", "pool=eph", &["--ephemeral"]).await;
    let run = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    assert_ne!(
        job(&run, left).agent_id,
        first_agent,
        "the second job ran on the new agent"
    );
    let status = tokio::task::block_in_place(|| b.wait_exit(Duration::from_secs(30)))
        .expect("the second ephemeral agent did not exit");
    assert!(
        status.success(),
        "second ephemeral agent exited with {status}"
    );
}

/// `--idle-timeout` counts only time without a job: a job longer than the timeout keeps the agent,
/// and the agent exits 0 about one timeout after the job ends.
#[tokio::test(flavor = "multi_thread")]
async fn idle_timeout_exits_only_when_idle() {
    let cluster = Cluster::new().start().await.unwrap();
    let mut agent =
        FlaggedAgent::start(&cluster, "idle", "pool=idle", &["--idle-timeout", "2s"]).await;
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  slow:\n    agents: {{ pool: idle }}\n    steps:\n      - image: {IMAGE}\n        commands: [sleep 3, echo done]\n"
        ))
        .await
        .unwrap();
    let run = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        run.state(),
        RunState::Succeeded,
        "a 3 s job on an agent with a 2 s idle timeout must finish: {run:#?}"
    );
    let finished = Instant::now();
    let status = tokio::task::block_in_place(|| agent.wait_exit(Duration::from_secs(20)))
        .expect("the agent did not exit after being idle");
    let idle_for = finished.elapsed();
    assert!(status.success(), "idle agent exited with {status}");
    assert!(
        idle_for >= Duration::from_millis(1000),
        "exited {idle_for:?} after the job: sooner than its idle timeout"
    );
}

/// `GET /metrics` on an agent's `--metrics-listen` address, as text.
async fn scrape(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to the agent's metrics listener");
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the sample whose name-and-labels is exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The agent's metrics track a job while it runs and count its steps, logs and artifacts after.
#[tokio::test(flavor = "multi_thread")]
async fn agent_metrics_scrape() {
    let cluster = Cluster::new().start().await.unwrap();
    let mut agent = FlaggedAgent::start(
        &cluster,
        "metrics",
        "pool=metrics",
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    // Logged before "attached", so it is among the lines already seen.
    let line = agent.wait_line("serving Prometheus metrics", Duration::from_secs(5));
    let addr = line
        .split("bound=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no bound= in {line:?}"))
        .to_string();
    let before = scrape(&addr).await;
    assert_eq!(
        sample(&before, "drover_agent_jobs_running"),
        Some(0.0),
        "{before}"
    );

    let pipeline = format!(
        r#"
jobs:
  build:
    agents: {{ pool: metrics }}
    steps:
      - name: work
        image: {IMAGE}
        commands: [seq 1 1000, sleep 2, mkdir -p out, "head -c 5000 /dev/zero > out/blob"]
    artifacts: [out/blob]
  broken:
    needs: [build]
    agents: {{ pool: metrics }}
    steps:
      - name: fails
        image: {IMAGE}
        commands: [exit 3]
"#
    );
    let run_id = cluster.submit(&pipeline).await.unwrap();
    cluster
        .wait_until(&run_id, Duration::from_secs(60), |r| {
            job_state(r, "build") == JobState::Running
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&addr).await;
        if sample(&text, "drover_agent_jobs_running") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "jobs_running never 1:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let run = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(job_state(&run, "build"), JobState::Succeeded, "{run:#?}");
    assert_eq!(job_state(&run, "broken"), JobState::Failed, "{run:#?}");

    let after = scrape(&addr).await;
    let get = |series: &str| {
        sample(&after, series).unwrap_or_else(|| panic!("{series} missing:\n{after}"))
    };
    assert_eq!(get("drover_agent_jobs_running"), 0.0);
    assert_eq!(
        get("drover_agent_steps_finished_total{result=\"succeeded\"}"),
        1.0
    );
    assert_eq!(
        get("drover_agent_steps_finished_total{result=\"failed\"}"),
        1.0
    );
    assert_eq!(get("drover_agent_step_duration_seconds_count"), 2.0);
    assert!(
        get("drover_agent_step_duration_seconds_sum") >= 2.0,
        "the first step slept 2 s:\n{after}"
    );
    let log_len: usize = (1..=1000).map(|n: u32| n.to_string().len() + 1).sum();
    assert!(
        get("drover_agent_log_shipped_bytes_total") >= log_len as f64,
        "at least the {log_len} bytes of `seq 1 1000` were shipped:\n{after}"
    );
    assert_eq!(get("drover_agent_artifact_uploaded_bytes_total"), 5000.0);
    assert_eq!(get("drover_agent_reconnects_total"), 0.0);
    assert!(
        after.contains("# TYPE drover_agent_step_duration_seconds histogram"),
        "{after}"
    );
}

/// `drover why` explains a job no agent can take: verdict, the selector, and each agent's mismatch,
/// as text and as JSON.
#[tokio::test(flavor = "multi_thread")]
async fn why_explains_a_queued_job() {
    let cluster = Cluster::new()
        .agent("cpu", "queue=cpu")
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  train:\n    agents: {{ queue: gpu }}\n    steps:\n      - image: {IMAGE}\n        commands: ['true']\n"
        ))
        .await
        .unwrap();
    let agent = cluster.agent_id("cpu");
    let out = cluster.drover(&["why", &run_id, "train"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.starts_with(&format!("job train of run {run_id}: queued\n")),
        "{text}"
    );
    assert!(text.contains("verdict: "), "{text}");
    assert!(text.contains("selector: queue=gpu"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&agent))
        .unwrap_or_else(|| panic!("no row for {agent}:\n{text}"));
    assert!(row.contains("no: ") && row.contains("queue"), "{row}");

    let out = cluster.drover(&["why", &run_id, "train", "--output", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["state"], "queued");
    assert_eq!(v["selector"]["queue"], "gpu");
    assert_eq!(v["agents"][0]["agent_id"], agent.as_str());
    assert_eq!(v["agents"][0]["matches"], false);
    assert!(!v["verdict"].as_str().unwrap_or_default().is_empty());

    let out = cluster.drover(&["why", &run_id, "nosuchjob"]);
    assert!(!out.status.success(), "an unknown job is an error");
}

/// `drover completion SHELL` prints a script the shell understands.
#[test]
fn completion_scripts() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef drover"),
        ("fish", "complete -c drover"),
    ] {
        let out = Command::new(bin("drover"))
            .args(["completion", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("why"), "{shell} completes `why`");
    }
    if Command::new("bash").arg("--version").output().is_ok() {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source <({} completion bash) && complete -p drover",
                bin("drover").display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bash cannot source the script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A docker container and images removed when the test ends, however it ends.
struct DockerCleanup {
    container: String,
    images: Vec<String>,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `scripts/build-images` makes runnable images without a registry: the coordinator image serves a
/// job to an agent running on the host.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_image_serves_a_host_agent() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root");
    let tag = format!("e2e-{}", std::process::id());
    let cleanup = DockerCleanup {
        container: format!("drover-e2e-coordinator-{}", std::process::id()),
        images: vec![
            format!("drover-coordinator:{tag}"),
            format!("drover-agent:{tag}"),
        ],
    };
    let out = Command::new(repo.join("scripts/build-images"))
        .args(["--profile", "debug", "--tag", &tag])
        .current_dir(repo)
        .output()
        .expect("running scripts/build-images");
    assert!(
        out.status.success(),
        "scripts/build-images failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let data = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let out = Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &cleanup.container,
            "--network",
            "host",
            "-v",
        ])
        .arg(format!("{}:/var/lib/drover", data.path().display()))
        .arg(&cleanup.images[0])
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .output()
        .expect("docker run");
    assert!(
        out.status.success(),
        "docker run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let out = Command::new("docker")
            .args(["logs", &cleanup.container])
            .output()
            .unwrap();
        let logs = String::from_utf8_lossy(&out.stderr).into_owned();
        if logs.contains("listening on") {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator image did not start: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(logs.contains(&format!("127.0.0.1:{grpc}")), "{logs}");

    let addr = format!("http://127.0.0.1:{grpc}");
    let admin = std::fs::read_to_string(data.path().join("admin.token"))
        .expect("the container wrote its admin token into the mounted data directory");
    let mut control = drover_tests::connect_control(&addr, &admin).await.unwrap();
    let token = control
        .create_token(drover_proto::v1::CreateTokenRequest {
            uses: 1,
            ttl_secs: 600,
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let state = tempfile::tempdir().unwrap();
    let _agent = tokio::task::block_in_place(|| {
        FlaggedAgent::spawn(&addr, &token, state.path(), "host", "os=linux", &[])
    });
    let run_id = control
        .submit_run(drover_proto::v1::SubmitRunRequest {
            pipeline: format!(
                "jobs:\n  hello:\n    steps:\n      - image: {IMAGE}\n        commands: [echo from the image]\n"
            ),
            context_digest: String::new(),
            name: "image".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let deadline = Instant::now() + Duration::from_secs(60);
    let run = loop {
        let run = control
            .get_run(drover_proto::v1::GetRunRequest {
                run_id: run_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if run.state() != RunState::Running {
            break run;
        }
        assert!(Instant::now() < deadline, "run not finished: {run:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");

    // The image's HTTP side answers too.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", http))
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// A coordinator whose address is taken says which address and why, once: the chain of causes is
/// printed by `main`, so no error repeats its cause in its own message.
#[test]
fn a_taken_listen_address_is_named_with_its_cause_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (err, _dir) = drover_tests::coordinator_refused(&["--listen", &addr]);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("drover-coordinator: failed to start: cannot listen on ")
            && last.contains(&addr),
        "{err}"
    );
    assert_eq!(last.matches("in use").count(), 1, "{last}");
}
