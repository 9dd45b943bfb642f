//! Faults, second part: an agent restarted mid-step re-adopts its attempt; a partitioned agent
//! carries on (healed within the lease) or stops by itself (healed after it).

use std::process::Command;
use std::time::{Duration, Instant};

use drover_proto::v1::{JobState, RunState};
use drover_tests::{job, AgentSpec, Cluster, IMAGE};

/// Containers labelled with `attempt` (running or not).
fn containers_of_attempt(attempt: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=drover.attempt={attempt}"))
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until the log of step 0 of the job's running attempt holds `needle`.
async fn wait_log_contains(cluster: &Cluster, run: &str, job_name: &str, step: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = cluster.run(run).await.unwrap();
        let j = job(&r, job_name);
        if !j.steps.is_empty() && j.steps[0].log_bytes as usize >= needle.len() {
            let out = cluster.drover(&["logs", run, job_name, step]);
            if String::from_utf8_lossy(&out.stdout).contains(needle) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "log of {job_name}/{step} never showed {needle:?}: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `kill -9` of the agent while a step runs, restarted within the lease TTL: it finds its step
/// container through its journal, says so in its hello, the coordinator keeps the attempt, and the
/// agent re-attaches and finishes it. Same attempt, the log holds the output before and after the
/// restart with an explicit marker for the gap, and nothing leaks.
#[tokio::test(flavor = "multi_thread")]
async fn restarted_agent_readopts_its_running_attempt() {
    let mut cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "5s", "--heartbeat-interval", "500ms"])
        .agent_with_capacity("a", "os=linux", 1)
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo a\", \"sleep 3\", \"echo b\"]\n      - name: after\n        image: {IMAGE}\n        commands: [\"echo after\"]\n"
        ))
        .await
        .unwrap();
    wait_log_contains(&cluster, &run_id, "j", "s", "a\n").await;
    let before = cluster.run(&run_id).await.unwrap();
    let attempt = job(&before, "j").attempt_id.clone();

    cluster.kill_agent("a");
    assert!(
        !containers_of_attempt(&attempt).is_empty(),
        "the step container outlives the agent"
    );
    cluster.restart_agent("a").unwrap();

    let done = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    let j = job(&done, "j");
    assert_eq!(j.attempt_id, attempt, "the same attempt finished");
    assert_eq!(j.attempts, 1, "{done:#?}");
    let log = String::from_utf8(cluster.log(&run_id, "j", "s").await.unwrap()).unwrap();
    assert!(log.starts_with("a\n"), "{log:?}");
    assert!(log.ends_with("b\n"), "{log:?}");
    assert!(log.contains("[drover] agent restarted"), "{log:?}");
    assert_eq!(
        cluster.log(&run_id, "j", "after").await.unwrap(),
        b"after\n"
    );
    cluster.assert_no_leftovers(Duration::from_secs(15)).await;
    let state_dir = &cluster.agents["a"].state_dir;
    let journal: Vec<_> = std::fs::read_dir(state_dir.join("attempts"))
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(journal.is_empty(), "journal entries left: {journal:?}");
}

/// An agent restarted after the lease TTL finds its container, but the coordinator has given the
/// job to another agent: the old attempt is reported stale, its container is removed, its late
/// output is never committed.
#[tokio::test(flavor = "multi_thread")]
async fn agent_restarted_after_the_ttl_drops_its_attempt() {
    let mut cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "2s", "--heartbeat-interval", "500ms"])
        .agent_with_capacity("a", "os=linux", 1)
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo a\", \"sleep 6\", \"echo b\"]\n"
        ))
        .await
        .unwrap();
    wait_log_contains(&cluster, &run_id, "j", "s", "a\n").await;
    let first = job(&cluster.run(&run_id).await.unwrap(), "j")
        .attempt_id
        .clone();
    cluster.kill_agent("a");
    cluster
        .add_agent(AgentSpec {
            name: "b".into(),
            labels: "os=linux".into(),
            capacity: 1,
        })
        .await
        .unwrap();
    cluster
        .wait_until(&run_id, Duration::from_secs(20), |r| {
            job(r, "j").attempt_id != first
        })
        .await
        .unwrap();
    cluster.restart_agent("a").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !containers_of_attempt(&first).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the stale attempt's container was not removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    let j = job(&done, "j");
    assert_eq!(j.attempts, 2);
    assert_ne!(j.attempt_id, first);
    assert_eq!(j.state(), JobState::Succeeded);
    assert_eq!(cluster.log(&run_id, "j", "s").await.unwrap(), b"a\nb\n");
    cluster.assert_no_leftovers(Duration::from_secs(15)).await;
}

/// A step printing a numbered line every 300 ms, `n` lines, and the log it must leave.
fn ticker(n: u32) -> (String, Vec<u8>) {
    let script = format!("i=1; while [ $i -le {n} ]; do echo line $i; i=$((i+1)); sleep 0.3; done");
    let expected: String = (1..=n).map(|i| format!("line {i}\n")).collect();
    (script, expected.into_bytes())
}

/// An agent cut off (blackholed: connections stay open, no byte moves) for less than the lease TTL
/// keeps running its step and spooling; once the path heals it carries on: same attempt, one
/// attempt, the log byte-identical to what the step wrote.
#[tokio::test(flavor = "multi_thread")]
async fn partition_healed_within_the_ttl_changes_nothing() {
    let cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "4s", "--heartbeat-interval", "500ms"])
        .agent_via_proxy("p", "os=linux", 1)
        .start()
        .await
        .unwrap();
    let (script, expected) = ticker(12);
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [{script:?}]\n"
        ))
        .await
        .unwrap();
    wait_log_contains(&cluster, &run_id, "j", "s", "line 1\n").await;
    let attempt = job(&cluster.run(&run_id).await.unwrap(), "j")
        .attempt_id
        .clone();
    let proxy = cluster.proxy("p").unwrap();
    proxy.blackhole();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    proxy.restore();
    let done = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    let j = job(&done, "j");
    assert_eq!(j.attempt_id, attempt);
    assert_eq!(j.attempts, 1);
    assert_eq!(cluster.log(&run_id, "j", "s").await.unwrap(), expected);
    cluster.assert_no_leftovers(Duration::from_secs(15)).await;
}

/// An agent cut off for longer than the lease TTL stops its step container by itself (while still
/// cut off), the job runs again on another agent, and when the path heals nothing of the stale
/// attempt is committed: the job's log is the second attempt's, whole.
#[tokio::test(flavor = "multi_thread")]
async fn partition_past_the_ttl_stops_the_stale_attempt() {
    let mut cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "2s", "--heartbeat-interval", "300ms"])
        .agent_via_proxy("p", "os=linux", 1)
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo a\", \"sleep 5\", \"echo b\"]\n"
        ))
        .await
        .unwrap();
    wait_log_contains(&cluster, &run_id, "j", "s", "a\n").await;
    let first = job(&cluster.run(&run_id).await.unwrap(), "j")
        .attempt_id
        .clone();
    cluster
        .add_agent(AgentSpec {
            name: "other".into(),
            labels: "os=linux".into(),
            capacity: 1,
        })
        .await
        .unwrap();
    let cut_at = Instant::now();
    cluster.proxy("p").unwrap().blackhole();
    while !containers_of_attempt(&first).is_empty() {
        assert!(
            cut_at.elapsed() < Duration::from_secs(8),
            "the partitioned agent did not stop its stale container"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "partitioned agent stopped its container {:.2} s after the cut (lease TTL 2 s)",
        cut_at.elapsed().as_secs_f64()
    );
    cluster.proxy("p").unwrap().restore();
    let done = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    let j = job(&done, "j");
    assert_eq!(j.attempts, 2, "{done:#?}");
    assert_ne!(j.attempt_id, first);
    assert_eq!(j.agent_id, cluster.agent_id("other"));
    assert_eq!(cluster.log(&run_id, "j", "s").await.unwrap(), b"a\nb\n");
    cluster.assert_no_leftovers(Duration::from_secs(15)).await;
}

/// Waits up to `timeout` for agent `name` to exit; returns its status.
async fn wait_agent_exit(
    cluster: &mut Cluster,
    name: &str,
    timeout: Duration,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        let proc = cluster.agents.get_mut(name).unwrap();
        if let Some(status) = proc.child.as_mut().unwrap().try_wait().unwrap() {
            proc.child = None;
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "agent {name} did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM to an agent running a job: it tells the coordinator it drains, finishes the job (which
/// succeeds), takes no new job meanwhile, and exits 0; a job submitted during the drain stays queued.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_running_job_and_takes_no_new_one() {
    let mut cluster = Cluster::new()
        .agent_with_capacity("a", "os=linux", 2)
        .start()
        .await
        .unwrap();
    let first = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo x\", \"sleep 2\", \"echo y\"]\n"
        ))
        .await
        .unwrap();
    wait_log_contains(&cluster, &first, "j", "s", "x\n").await;
    let pid = cluster.agents["a"].child.as_ref().unwrap().id();
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
    // Let the Draining message arrive, then offer the draining agent (one slot free) more work.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = cluster
        .submit(&format!(
            "jobs:\n  k:\n    steps:\n      - image: {IMAGE}\n        commands: [true]\n"
        ))
        .await
        .unwrap();
    let status = wait_agent_exit(&mut cluster, "a", Duration::from_secs(30)).await;
    assert!(status.success(), "drained agent exit status {status:?}");
    let done = cluster.run(&first).await.unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    assert_eq!(job(&done, "j").attempts, 1);
    assert_eq!(cluster.log(&first, "j", "s").await.unwrap(), b"x\ny\n");
    let later = cluster.run(&second).await.unwrap();
    assert_eq!(job(&later, "k").state(), JobState::Queued, "{later:#?}");
    assert_eq!(
        job(&later, "k").attempts,
        0,
        "no job was sent to the draining agent"
    );
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}

/// `drover agents pause ID` keeps a queued job queued (also across a coordinator restart) while the
/// agent stays attached; `drover agents resume ID` lets it run; `drover agents drain ID` makes the
/// idle agent exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn pause_resume_and_drain_from_the_cli() {
    let mut cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let id = cluster.agent_id("a");
    let out = cluster.drover(&["agents", "pause", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("agent {id}: paused\n")
    );
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - image: {IMAGE}\n        commands: [\"echo ran\"]\n"
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = cluster.run(&run_id).await.unwrap();
    assert_eq!(job(&r, "j").state(), JobState::Queued, "{r:#?}");
    let listing = cluster.drover(&["agents"]);
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(text.contains("connected (paused)"), "{text}");

    // The pause is in the store: a restarted coordinator keeps it.
    cluster.kill_coordinator();
    cluster.restart_coordinator().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&cluster.drover(&["agents"]).stdout).to_string();
        if text.contains("connected (paused)") {
            break;
        }
        assert!(Instant::now() < deadline, "agent not back paused: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        job(&cluster.run(&run_id).await.unwrap(), "j").state(),
        JobState::Queued
    );

    let out = cluster.drover(&["agents", "resume", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = cluster
        .wait_run(&run_id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");

    let out = cluster.drover(&["agents", "drain", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = wait_agent_exit(&mut cluster, "a", Duration::from_secs(20)).await;
    assert!(status.success(), "drained agent exit status {status:?}");
    let bad = cluster.drover(&["agents", "pause", "agent-nope"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("agent-nope"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// `drover cancel RUN JOB` stops one running job (it ends canceled, the job needing it is skipped);
/// a step `timeout: 2s` running `sleep 30` ends timed_out with failure TIMEOUT, quickly.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_one_job_and_step_timeout() {
    let cluster = Cluster::new()
        .coordinator_args(&["--cancel-grace", "2s"])
        .agent("a", "os=linux")
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  long:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo started\", \"sleep 600\"]\n  after:\n    needs: [long]\n    steps:\n      - image: {IMAGE}\n        commands: [true]\n  slow:\n    steps:\n      - name: t\n        image: {IMAGE}\n        timeout: 2s\n        commands: [\"sleep 30\"]\n"
        ))
        .await
        .unwrap();
    let started = Instant::now();
    wait_log_contains(&cluster, &run_id, "long", "s", "started\n").await;
    let out = cluster.drover(&["cancel", &run_id, "long"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("run {run_id}: canceled job long\n")
    );
    let done = cluster
        .wait_run(&run_id, Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("run finished {:?} after submit", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20), "{done:#?}");
    let long = job(&done, "long");
    assert_eq!(long.state(), JobState::Canceled, "{done:#?}");
    assert_eq!(long.failure(), drover_proto::v1::FailureClass::Canceled);
    assert_eq!(long.attempts, 1);
    assert_eq!(job(&done, "after").state(), JobState::Skipped);
    let slow = job(&done, "slow");
    assert_eq!(slow.state(), JobState::TimedOut, "{done:#?}");
    assert_eq!(slow.failure(), drover_proto::v1::FailureClass::Timeout);
    assert!(slow.reason.contains("timeout"), "{}", slow.reason);
    // `drover run show` names the failure class and the reason.
    let show = cluster.drover(&["run", "show", &run_id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("timeout: step \"t\" exceeded its timeout of 2s"),
        "{text}"
    );
    assert!(text.contains("canceled: "), "{text}");
    let again = cluster.drover(&["cancel", &run_id, "long"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("already finished"));
    let missing = cluster.drover(&["cancel", &run_id, "nope"]);
    assert!(!missing.status.success());
    cluster.assert_no_leftovers(Duration::from_secs(15)).await;
}

/// The step container finishes while its agent is dead: the restarted agent does not hang on the
/// exited container (the engine never ends an attach to one); it takes the exit code, marks the
/// gap in the log, runs the next step and reports the same attempt.
#[tokio::test(flavor = "multi_thread")]
async fn step_that_ended_while_the_agent_was_dead_is_picked_up() {
    let mut cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "8s", "--heartbeat-interval", "500ms"])
        .agent_with_capacity("a", "os=linux", 1)
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo a\", \"sleep 1\", \"echo lost\"]\n      - name: next\n        image: {IMAGE}\n        commands: [\"echo next\"]\n"
        ))
        .await
        .unwrap();
    wait_log_contains(&cluster, &run_id, "j", "s", "a\n").await;
    let attempt = job(&cluster.run(&run_id).await.unwrap(), "j")
        .attempt_id
        .clone();
    cluster.kill_agent("a");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("docker")
            .args(["ps", "-q", "--filter"])
            .arg(format!("label=drover.attempt={attempt}"))
            .output()
            .unwrap();
        if out.stdout.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the step never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !containers_of_attempt(&attempt).is_empty(),
        "the exited container is still there for the restarted agent"
    );
    cluster.restart_agent("a").unwrap();
    let done = cluster
        .wait_run(&run_id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    let j = job(&done, "j");
    assert_eq!((j.attempt_id.as_str(), j.attempts), (attempt.as_str(), 1));
    let log = String::from_utf8(cluster.log(&run_id, "j", "s").await.unwrap()).unwrap();
    assert!(log.starts_with("a\n"), "{log:?}");
    assert!(log.contains("[drover] agent restarted"), "{log:?}");
    assert_eq!(cluster.log(&run_id, "j", "next").await.unwrap(), b"next\n");
    cluster.assert_no_leftovers(Duration::from_secs(15)).await;
}
