//! The engine over a real store on disk: what an agent sees before a batch is durable, and what a restart
//! keeps.

use std::collections::BTreeMap;
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_proto::v1::coordinator_message::Msg;
use tokio::sync::mpsc;

use super::{Engine, AGENT_CHANNEL};
use crate::artifacts::BlobStore;
use crate::config::Config;
use crate::logs::LogStore;
use crate::store::Store;

const PIPELINE: &str =
    "jobs:\n  one:\n    steps:\n      - image: img\n        commands: [\"true\"]\n";

async fn engine(dir: &std::path::Path) -> (Engine, Store) {
    let store = Store::open(&dir.join("drover.sqlite")).unwrap();
    let logs = LogStore::open(dir.join("logs")).unwrap();
    let blobs = BlobStore::open(dir.join("blobs")).unwrap();
    let engine = Engine::with_stores(Config::with_data_dir(dir), store.clone(), logs, blobs)
        .await
        .unwrap();
    (engine, store)
}

async fn next(rx: &mut mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>) -> Msg {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("no message within 10 s")
        .expect("session closed")
        .expect("error on the session")
        .msg
        .expect("empty message")
}

/// The assignment reaches the agent before its batch is durable (dispatch does not wait for the fsync),
/// but nothing is acknowledged before it is: not the submit, not a read of the run, not the agent's
/// result, which commits only with or after the assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_goes_out_before_the_fsync_but_nothing_is_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = engine(dir.path()).await;
    let (agent, _session, _welcome, mut rx) = attach(&engine).await;

    let (release, released) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let store = store.clone();
        std::thread::spawn(move || {
            store.with_commits_stalled(|| {
                held_tx.send(()).unwrap();
                released.recv().unwrap();
            })
        })
    };
    held_rx.recv().unwrap();

    let submit = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.submit(PIPELINE, "", "n").await })
    };
    let Msg::Assign(a) = next(&mut rx).await else {
        panic!("expected an assignment");
    };
    let read = {
        let (engine, run_id) = (engine.clone(), a.run_id.clone());
        tokio::spawn(async move { engine.get_run(&run_id).await })
    };
    let result = engine
        .job_result_queued(
            &agent,
            pb::JobResult {
                attempt_id: a.attempt_id.clone(),
                epoch: a.epoch,
                state: pb::JobState::Failed as i32,
                failure: pb::FailureClass::Script as i32,
                exit_code: 3,
                reason: "exit 3".into(),
            },
        )
        .await
        .unwrap()
        .expect("the result changes the run");
    let mut result = Box::pin(result.durable());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !submit.is_finished(),
        "submit answered before its run was durable"
    );
    assert!(
        !read.is_finished(),
        "a read answered from memory ahead of the file"
    );
    assert!(
        futures::FutureExt::now_or_never(result.as_mut()).is_none(),
        "the result was durable before its assignment"
    );

    release.send(()).unwrap();
    holder.join().unwrap();
    let run_id = submit.await.unwrap().unwrap();
    assert_eq!(run_id, a.run_id);
    read.await.unwrap().unwrap();
    result.await.unwrap();
    let run = engine.get_run(&run_id).await.unwrap();
    assert_eq!(run.state(), pb::RunState::Failed);
    assert_eq!(run.jobs[0].exit_code, 3);

    // What was acknowledged is in the file.
    drop(engine);
    let reopened = Store::open(&dir.path().join("drover.sqlite")).unwrap();
    let stored = reopened.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(
        stored.jobs[0].attempt_id.as_deref(),
        Some(a.attempt_id.as_str())
    );
    assert_eq!(stored.jobs[0].exit_code, 3);
}

/// A run that just finished is answered from memory (no read of the file behind the committer), but only
/// once its last batch is durable, and what it answers is what the file holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_just_finished_run_is_answered_from_memory_only_once_durable_and_as_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = engine(dir.path()).await;
    let (agent, _session, _welcome, mut rx) = attach(&engine).await;
    let run_id = engine.submit(PIPELINE, "", "n").await.unwrap();
    let Msg::Assign(a) = next(&mut rx).await else {
        panic!("expected an assignment");
    };

    let (release, released) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let store = store.clone();
        std::thread::spawn(move || {
            store.with_commits_stalled(|| {
                held_tx.send(()).unwrap();
                released.recv().unwrap();
            })
        })
    };
    held_rx.recv().unwrap();
    let result = engine
        .job_result_queued(
            &agent,
            pb::JobResult {
                attempt_id: a.attempt_id.clone(),
                epoch: a.epoch,
                state: pb::JobState::Failed as i32,
                failure: pb::FailureClass::Script as i32,
                exit_code: 4,
                reason: "exit 4".into(),
            },
        )
        .await
        .unwrap()
        .expect("the result changes the run");
    let read = {
        let (engine, run_id) = (engine.clone(), run_id.clone());
        tokio::spawn(async move { engine.run_rec(&run_id).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !read.is_finished(),
        "a finished run was answered from memory ahead of the file"
    );
    release.send(()).unwrap();
    holder.join().unwrap();
    result.durable().await.unwrap();
    let answered = read.await.unwrap().unwrap();
    assert_eq!(answered.state, super::RunStatus::Failed);
    assert_eq!(answered.jobs[0].exit_code, 4);
    let stored = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(
        answered, stored,
        "memory and file disagree on a finished run"
    );
}

/// Enrolls an agent and says hello for it; returns its id, session, the Welcome and its session's outbox.
async fn attach(
    engine: &Engine,
) -> (
    String,
    super::Attached,
    pb::Welcome,
    mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>,
) {
    let (token, _) = engine
        .create_token(1, Duration::from_secs(60), BTreeMap::new())
        .await
        .unwrap();
    let (agent, _) = engine
        .enroll(&token, BTreeMap::new(), "host")
        .await
        .unwrap();
    let (tx, mut rx) = mpsc::channel(AGENT_CHANNEL);
    let hello = pb::Hello {
        agent_id: agent.clone(),
        capacity: 1,
        ..Default::default()
    };
    let attached = engine.hello(&agent, hello, tx).await.unwrap();
    let Msg::Welcome(w) = next(&mut rx).await else {
        panic!("no welcome");
    };
    (agent, attached, w, rx)
}

/// Past the heartbeat rate, the coordinator tells new agents a longer interval and a lease TTL
/// stretched alike; when the fleet shrinks again it comes back down, but an agent is never declared
/// lost before the TTL it was told has run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_told_interval_grows_with_the_fleet_and_the_lease_follows_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("drover.sqlite")).unwrap();
    let logs = LogStore::open(dir.path().join("logs")).unwrap();
    let blobs = BlobStore::open(dir.path().join("blobs")).unwrap();
    // Two agents at 200 ms are 10 heartbeats a second: the most this coordinator takes.
    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_secs(1),
        max_heartbeat_rate: 10,
        ..Config::with_data_dir(dir.path())
    };
    let engine = Engine::with_stores(config, store, logs, blobs)
        .await
        .unwrap();
    let ms = Duration::from_millis;

    let (_, a, wa, mut rxa) = attach(&engine).await;
    let (b, sb, wb, _rxb) = attach(&engine).await;
    engine.check_leases().await.unwrap();
    for w in [&wa, &wb] {
        assert_eq!((w.heartbeat_interval_ms, w.lease_ttl_ms), (200, 1000));
    }
    // A third agent is one too many for 200 ms: the next scan stretches the pace by a step.
    let (c, sc, wc, _rxc) = attach(&engine).await;
    assert_eq!((wc.heartbeat_interval_ms, wc.lease_ttl_ms), (200, 1000));
    engine.check_leases().await.unwrap();
    assert_eq!(engine.pace().interval, ms(300));
    assert_eq!(engine.pace().lease_ttl, ms(1500));
    let (_, d, wd, mut rxd) = attach(&engine).await;
    let d_hello = std::time::Instant::now();
    assert_eq!((wd.heartbeat_interval_ms, wd.lease_ttl_ms), (300, 1500));
    engine.check_leases().await.unwrap();
    assert_eq!(engine.pace().interval, ms(400));
    assert_eq!(engine.pace().lease_ttl, ms(2000));

    // The fleet shrinks back to two: the pace comes down to the base...
    engine.detach(&b, sb.session);
    engine.detach(&c, sc.session);
    engine.check_leases().await.unwrap();
    assert_eq!(engine.pace().interval, ms(200));
    assert_eq!(engine.pace().lease_ttl, ms(1000));
    // ...but `d` was told 1.5 s: silent for longer than the 1 s in force, it keeps its session.
    tokio::time::sleep_until((d_hello + ms(1200)).into()).await;
    a.seen.touch();
    engine.check_leases().await.unwrap();
    let checked = d_hello.elapsed();
    assert!(
        checked >= ms(1500) || matches!(rxd.try_recv(), Err(mpsc::error::TryRecvError::Empty)),
        "agent d dropped after {checked:?}, before the 1.5 s it was told"
    );
    // Silent past its 1.5 s, it is dropped (its outbox closes); `a`, renewed, is not.
    tokio::time::sleep_until((d_hello + ms(1800)).into()).await;
    a.seen.touch();
    engine.check_leases().await.unwrap();
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), rxd.recv()).await,
        Ok(None)
    ));
    assert!(matches!(
        rxa.try_recv(),
        Err(mpsc::error::TryRecvError::Empty)
    ));
    drop(d);
}

/// Run and attempt ids sort by creation, also within one millisecond: the store's B-trees keyed by them
/// take inserts at their right edge (random ids made every group commit write pages all over the file).
#[test]
fn record_ids_sort_in_creation_order() {
    let ids: Vec<String> = (0..10_000).map(|_| super::new_record_id()).collect();
    for pair in ids.windows(2) {
        assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
    }
}
