//! Faults with real processes: an agent killed mid-step, a canceled run.

use std::time::{Duration, Instant};

use drover_proto::v1::{CancelRunRequest, FailureClass, JobState, RunState};
use drover_tests::{job, AgentSpec, Cluster, IMAGE};

const TTL_SECS: u64 = 3;

/// `kill -9` of the agent running a step: its lease lapses, the attempt is lost and the job runs again
/// on another agent no later than TTL + 3 s after the kill, then succeeds with a higher epoch.
#[tokio::test(flavor = "multi_thread")]
async fn killed_agent_job_moves_to_another_agent_within_ttl() {
    let mut cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "3s", "--heartbeat-interval", "500ms"])
        .agent("first", "os=linux")
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  slow:\n    steps:\n      - name: work\n        image: {IMAGE}\n        commands: [\"echo started\", \"sleep 4\", \"echo done\"]\n"
        ))
        .await
        .unwrap();
    let first = cluster
        .wait_until(&run_id, Duration::from_secs(60), |r| {
            job(r, "slow").state() == JobState::Running
                && !job(r, "slow").steps.is_empty()
                && job(r, "slow").steps[0].state() == JobState::Running
        })
        .await
        .unwrap();
    let first_attempt = job(&first, "slow").attempt_id.clone();
    assert_eq!(job(&first, "slow").agent_id, cluster.agent_id("first"));

    cluster
        .add_agent(AgentSpec {
            name: "second".into(),
            labels: "os=linux".into(),
            capacity: 1,
        })
        .await
        .unwrap();
    let killed_at = Instant::now();
    cluster.kill_agent("first");

    let second_id = cluster.agent_id("second");
    let moved = cluster
        .wait_until(&run_id, Duration::from_secs(TTL_SECS + 10), |r| {
            let j = job(r, "slow");
            j.agent_id == second_id && j.attempt_id != first_attempt
        })
        .await
        .unwrap();
    let elapsed = killed_at.elapsed();
    eprintln!(
        "failure detection: job reassigned {:.2} s after kill (lease TTL {TTL_SECS} s, ratio {:.2})",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / TTL_SECS as f64
    );
    assert!(
        elapsed <= Duration::from_secs(TTL_SECS + 3),
        "reassigned after {elapsed:?}: {moved:#?}"
    );

    let done = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    let slow = job(&done, "slow");
    assert_eq!(slow.attempts, 2);
    assert_eq!(slow.agent_id, second_id);
    let log = cluster.log(&run_id, "slow", "work").await.unwrap();
    assert_eq!(
        log, b"started\ndone\n",
        "the committed log is the second attempt's, whole"
    );
}

/// Canceling a run stops its running container (SIGTERM, then SIGKILL after the grace period), ends
/// the running job `canceled`, cancels the jobs still waiting, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_running_containers() {
    let cluster = Cluster::new()
        .coordinator_args(&["--cancel-grace", "1s"])
        .agent("a", "os=linux")
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  long:\n    steps:\n      - image: {IMAGE}\n        commands: [\"echo running\", \"sleep 600\"]\n  later:\n    needs: [long]\n    steps:\n      - image: {IMAGE}\n        commands: [true]\n"
        ))
        .await
        .unwrap();
    cluster
        .wait_until(&run_id, Duration::from_secs(60), |r| {
            let j = job(r, "long");
            !j.steps.is_empty() && j.steps[0].state() == JobState::Running
        })
        .await
        .unwrap();
    let asked = Instant::now();
    let out = cluster.drover(&["cancel", &run_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = cluster
        .wait_run(&run_id, Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("canceled in {:?}", asked.elapsed());
    assert_eq!(run.state(), RunState::Canceled, "{run:#?}");
    assert_eq!(job(&run, "long").state(), JobState::Canceled);
    assert_eq!(job(&run, "long").failure(), FailureClass::Canceled);
    assert_eq!(job(&run, "later").state(), JobState::Canceled);
    cluster.assert_no_leftovers(Duration::from_secs(15)).await;

    // Canceling a finished run changes nothing.
    let again = cluster
        .client()
        .await
        .unwrap()
        .cancel_run(CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.canceled_jobs, 0);
}

/// `kill -9` of the coordinator with a running and a queued job: on restart the state comes back
/// from the store, the agent reconnects, the running attempt carries on (same attempt, no rerun), the
/// queued job dispatches, and every job ends exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_kill_keeps_running_and_queued_jobs() {
    let mut cluster = Cluster::new()
        .coordinator_args(&["--lease-ttl", "5s", "--heartbeat-interval", "500ms"])
        .agent_with_capacity("a", "os=linux", 1)
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            "jobs:\n  running:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo before\", \"sleep 3\", \"echo after\"]\n  queued:\n    steps:\n      - name: s\n        image: {IMAGE}\n        commands: [\"echo queued ran\"]\n"
        ))
        .await
        .unwrap();
    let before = cluster
        .wait_until(&run_id, Duration::from_secs(60), |r| {
            let j = job(r, "running");
            !j.steps.is_empty() && j.steps[0].state() == JobState::Running
        })
        .await
        .unwrap();
    assert_eq!(
        job(&before, "queued").state(),
        JobState::Queued,
        "capacity 1: the second job must wait"
    );
    let attempt = job(&before, "running").attempt_id.clone();

    cluster.kill_coordinator();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart_coordinator().unwrap();

    let done = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), RunState::Succeeded, "{done:#?}");
    let running = job(&done, "running");
    assert_eq!(
        running.attempt_id, attempt,
        "the running attempt carried on"
    );
    assert_eq!(running.attempts, 1);
    assert_eq!(job(&done, "queued").attempts, 1);
    assert_eq!(
        cluster.log(&run_id, "running", "s").await.unwrap(),
        b"before\nafter\n"
    );
    assert_eq!(
        cluster.log(&run_id, "queued", "s").await.unwrap(),
        b"queued ran\n"
    );
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}
