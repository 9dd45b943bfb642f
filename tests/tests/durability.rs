//! Group commit keeps DESIGN's promise: nothing acknowledged is lost. Many clients submit and cancel at
//! once, the coordinator is killed with SIGKILL in the middle of it, and after a restart every run whose
//! SubmitRun was answered exists, and every run whose CancelRun was answered is canceled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_proto::v1::{CancelRunRequest, GetRunRequest, RunState, SubmitRunRequest};
use drover_tests::{Cluster, IMAGE};

/// Concurrent clients, each on its own connection.
const CLIENTS: usize = 32;

#[derive(Debug, Default)]
struct Acked {
    submitted: Vec<String>,
    canceled: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_concurrent_submits_loses_nothing_acknowledged() {
    // No agent: every run stays queued, so its state after the restart is exactly what was acknowledged.
    let mut cluster = Cluster::new().start().await.unwrap();
    let pipeline = format!(
        "jobs:\n  build:\n    steps:\n      - image: {IMAGE}\n        commands: [\"true\"]\n  test:\n    needs: [build]\n    steps:\n      - image: {IMAGE}\n        commands: [\"true\"]\n"
    );
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = cluster.client().await.unwrap();
        let acked = acked.clone();
        let pipeline = pipeline.clone();
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                let Ok(r) = client
                    .submit_run(SubmitRunRequest {
                        pipeline: pipeline.clone(),
                        context_digest: String::new(),
                        name: format!("c{i}"),
                    })
                    .await
                else {
                    return; // the coordinator is gone
                };
                let id = r.into_inner().run_id;
                acked.lock().unwrap().submitted.push(id.clone());
                n += 1;
                // Every third run is canceled right away: a transition of an existing run.
                if n.is_multiple_of(3) {
                    if client
                        .cancel_run(CancelRunRequest { run_id: id.clone() })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    acked.lock().unwrap().canceled.push(id);
                }
            }
        }));
    }
    // Let the load build up, then kill while requests are in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().submitted.len() < 300 {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} submits acknowledged in 30 s",
            acked.lock().unwrap().submitted.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill_coordinator();
    for c in clients {
        c.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    eprintln!(
        "acknowledged before the kill: {} submits, {} cancels",
        acked.submitted.len(),
        acked.canceled.len()
    );

    cluster.restart_coordinator().unwrap();
    let mut client = cluster.client().await.unwrap();
    let mut lost = Vec::new();
    let mut not_canceled = Vec::new();
    for id in &acked.submitted {
        match client.get_run(GetRunRequest { run_id: id.clone() }).await {
            Ok(r) => {
                let run = r.into_inner();
                let canceled = acked.canceled.contains(id);
                match run.state() {
                    RunState::Canceled if canceled => {}
                    RunState::Running if !canceled => {
                        assert_eq!(run.jobs.len(), 2, "run {id} lost jobs: {run:?}");
                    }
                    // A cancel that was in flight at the kill may or may not have landed.
                    RunState::Canceled => {}
                    _ => not_canceled.push(format!("{id}: {:?}", run.state())),
                }
            }
            Err(e) => lost.push(format!("{id}: {e}")),
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged runs lost: {lost:?}",
        lost.len()
    );
    assert!(
        not_canceled.is_empty(),
        "acknowledged cancels lost: {not_canceled:?}"
    );
}
