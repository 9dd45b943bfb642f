//! In-process tests over real gRPC: a coordinator on 127.0.0.1:0 and fake agents speaking the protocol
//! with the generated tonic clients (no Docker: the agent side is scripted here).

use std::time::Duration;

use drover_coordinator::config::Config;
use drover_coordinator::{RunningServer, Server};
use drover_proto::v1 as pb;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use drover_proto::v1::coordinator_message::Msg as CMsg;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Streaming};

const T: Duration = Duration::from_secs(10);

async fn start(dir: &std::path::Path, lease_ttl: Duration) -> RunningServer {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval: Duration::from_millis(100),
        lease_ttl,
        ..Config::with_data_dir(dir)
    };
    Server::bind(config).await.unwrap().spawn()
}

async fn control(s: &RunningServer) -> drover_coordinator::access::ControlClient {
    s.control_client(drover_coordinator::access::Role::Admin)
        .await
        .unwrap()
}

fn authed<T>(cred: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {cred}").parse().unwrap());
    r
}

/// A scripted agent.
struct FakeAgent {
    id: String,
    cred: String,
    client: AgentServiceClient<Channel>,
    out: Option<mpsc::Sender<pb::AgentMessage>>,
    inbox: Option<Streaming<pb::CoordinatorMessage>>,
}

impl FakeAgent {
    async fn enroll(s: &RunningServer) -> FakeAgent {
        let token = control(s)
            .await
            .create_token(pb::CreateTokenRequest {
                uses: 1,
                ttl_secs: 60,
                labels: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .token;
        let mut client = AgentServiceClient::connect(s.url()).await.unwrap();
        let labels = [("os".to_string(), "linux".to_string())]
            .into_iter()
            .collect();
        let r = client
            .enroll(pb::EnrollRequest {
                token: token.clone(),
                labels,
                hostname: "test-host".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // A token is single-use by default.
        let again = client
            .enroll(pb::EnrollRequest {
                token,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(again.code(), Code::Unauthenticated);
        FakeAgent {
            id: r.agent_id,
            cred: r.credential,
            client,
            out: None,
            inbox: None,
        }
    }

    async fn attach(&mut self, running: Vec<pb::RunningAttempt>) -> pb::Welcome {
        let (tx, rx) = mpsc::channel(16);
        let labels = [("os".to_string(), "linux".to_string())]
            .into_iter()
            .collect();
        let hello = pb::Hello {
            agent_id: self.id.clone(),
            version: "test".into(),
            labels,
            capacity: 1,
            running,
            hostname: "test-host".into(),
            host_policy: None,
            follows_heartbeat_pacing: false,
        };
        tx.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(hello)),
        })
        .await
        .unwrap();
        let inbox = self
            .client
            .attach(authed(&self.cred, ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        self.out = Some(tx);
        self.inbox = Some(inbox);
        match self.recv().await {
            CMsg::Welcome(w) => w,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Close the Attach stream (the agent goes silent).
    fn detach(&mut self) {
        self.out = None;
        self.inbox = None;
    }

    async fn recv(&mut self) -> CMsg {
        let inbox = self.inbox.as_mut().expect("attached");
        loop {
            let m = tokio::time::timeout(T, inbox.message())
                .await
                .expect("message in time")
                .unwrap()
                .unwrap();
            // Heartbeat acknowledgements come whenever the test heartbeats; tests look past them.
            match m.msg.unwrap() {
                CMsg::HeartbeatAck(_) => continue,
                other => return other,
            }
        }
    }

    async fn assignment(&mut self) -> pb::Assignment {
        match self.recv().await {
            CMsg::Assign(a) => a,
            other => panic!("expected assignment, got {other:?}"),
        }
    }

    async fn send(&self, msg: pb::agent_message::Msg) {
        self.out
            .as_ref()
            .unwrap()
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .unwrap();
    }

    async fn heartbeat(&self) {
        self.send(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
            running: vec![],
        }))
        .await;
    }

    /// Ship `data` as the whole log of `step` in two chunks (plus a resend) and wait for the complete ack.
    async fn ship_log(&mut self, a: &pb::Assignment, step: u32, data: &[u8]) {
        let half = data.len() / 2;
        let chunk = |offset: usize, end: usize, eof: bool| pb::LogChunk {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            step_index: step,
            offset: offset as u64,
            data: data[offset..end].to_vec().into(),
            eof,
            ..Default::default()
        };
        let chunks = vec![
            chunk(0, half, false),
            chunk(0, half, false),
            chunk(half, data.len(), true),
        ];
        let mut acks = self
            .client
            .push_logs(authed(&self.cred, tokio_stream::iter(chunks)))
            .await
            .unwrap()
            .into_inner();
        let mut complete = false;
        while let Some(ack) = tokio::time::timeout(T, acks.message())
            .await
            .unwrap()
            .unwrap()
        {
            assert!(ack.durable_offset <= data.len() as u64);
            if ack.complete {
                assert_eq!(ack.durable_offset, data.len() as u64);
                complete = true;
            }
        }
        assert!(complete, "log of step {step} acknowledged complete");
    }

    async fn upload(
        &mut self,
        a: &pb::Assignment,
        path: &str,
        data: &[u8],
    ) -> Result<pb::ArtifactUploaded, tonic::Status> {
        let digest = hex::encode(Sha256::digest(data));
        let header = pb::ArtifactHeader {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            path: path.into(),
            mode: 0o644,
            size: data.len() as u64,
            digest,
            ..Default::default()
        };
        let msgs = vec![
            pb::ArtifactChunk {
                part: Some(pb::artifact_chunk::Part::Header(header)),
            },
            pb::ArtifactChunk {
                part: Some(pb::artifact_chunk::Part::Data(data.to_vec())),
            },
        ];
        self.client
            .upload_artifact(authed(&self.cred, tokio_stream::iter(msgs)))
            .await
            .map(|r| r.into_inner())
    }

    async fn step(&self, a: &pb::Assignment, i: u32, finished: bool) {
        self.send(pb::agent_message::Msg::Step(pb::StepUpdate {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            step_index: i,
            finished,
            exit_code: 0,
            failure: 0,
            reason: String::new(),
        }))
        .await;
    }

    async fn succeed(&self, a: &pb::Assignment) {
        self.send(pb::agent_message::Msg::Result(result(a, a.epoch)))
            .await;
    }

    /// Run a whole assignment successfully: every step logs `"<job> step <i>\n"`.
    async fn run_ok(&mut self, a: &pb::Assignment) {
        self.send(pb::agent_message::Msg::Accepted(pb::Accepted {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
        }))
        .await;
        for i in 0..a.steps.len() as u32 {
            self.step(a, i, false).await;
            self.ship_log(a, i, format!("{} step {i}\n", a.job).as_bytes())
                .await;
            self.step(a, i, true).await;
        }
        self.succeed(a).await;
    }
}

fn result(a: &pb::Assignment, epoch: u64) -> pb::JobResult {
    pb::JobResult {
        attempt_id: a.attempt_id.clone(),
        epoch,
        state: pb::JobState::Succeeded as i32,
        failure: 0,
        reason: String::new(),
        exit_code: 0,
    }
}

/// Submits `pipeline`; returns the run id.
async fn submit(c: &mut drover_coordinator::access::ControlClient, pipeline: &str) -> String {
    c.submit_run(pb::SubmitRunRequest {
        pipeline: pipeline.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .run_id
}

async fn wait_run(c: &mut drover_coordinator::access::ControlClient, run_id: &str) -> pb::Run {
    let mut s = c
        .watch_run(pb::GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(r) = tokio::time::timeout(T, s.message())
        .await
        .expect("run finishes in time")
        .unwrap()
    {
        last = Some(r);
    }
    let r = last.unwrap();
    assert_ne!(
        r.state,
        pb::RunState::Running as i32,
        "watch ends after the terminal snapshot"
    );
    r
}

async fn logs(
    c: &mut drover_coordinator::access::ControlClient,
    run: &str,
    job: &str,
    follow: bool,
) -> Vec<u8> {
    let req = pb::FollowLogsRequest {
        run_id: run.into(),
        job: job.into(),
        step: String::new(),
        offset: 0,
        follow,
        ..Default::default()
    };
    let mut s = c.follow_logs(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(ev) = tokio::time::timeout(T, s.message()).await.unwrap().unwrap() {
        out.extend_from_slice(&ev.data);
    }
    out
}

const TWO_JOBS: &str = r#"
jobs:
  build:
    agents: { os: linux }
    steps:
      - name: compile
        image: drover-busybox:latest
        commands: [echo hi > out.txt]
      - name: check
        image: drover-busybox:latest
        commands: [cat out.txt]
    artifacts: [out.txt]
  test:
    needs: [build]
    steps:
      - image: drover-busybox:latest
        commands: [cat out.txt]
"#;

#[tokio::test]
async fn run_succeeds_end_to_end_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Duration::from_secs(5)).await;
    let mut c = control(&server).await;

    // Bad input: INVALID_ARGUMENT naming line and column, nothing created.
    let bad = c
        .submit_run(pb::SubmitRunRequest {
            pipeline: "jobs:\n  a:\n    stepz: []\n".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("line 3"), "{}", bad.message());
    assert!(c
        .list_runs(pb::ListRunsRequest {
            limit: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs
        .is_empty());

    // A context blob the run refers to.
    let ctx = c
        .upload_context(tokio_stream::iter(vec![pb::ContextChunk {
            data: b"tar bytes".to_vec(),
        }]))
        .await
        .unwrap()
        .into_inner();

    let mut agent = FakeAgent::enroll(&server).await;
    let w = agent.attach(vec![]).await;
    assert_eq!(w.agent_id, agent.id);
    assert_eq!(w.lease_ttl_ms, 5000);

    let run_id = c
        .submit_run(pb::SubmitRunRequest {
            pipeline: TWO_JOBS.into(),
            context_digest: ctx.digest.clone(),
            name: "two".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;

    let build = agent.assignment().await;
    assert_eq!(build.job, "build");
    assert_eq!(build.epoch, 1);
    assert_eq!(build.context_digest, ctx.digest);
    assert_eq!(build.steps.len(), 2);
    assert_eq!(build.artifacts, vec!["out.txt".to_string()]);

    // The agent may download the context of its attempt, and nothing else.
    let mut blob = agent
        .client
        .download_blob(authed(
            &agent.cred,
            pb::BlobRequest {
                attempt_id: build.attempt_id.clone(),
                digest: ctx.digest.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(ch) = blob.message().await.unwrap() {
        got.extend(ch.data);
    }
    assert_eq!(got, b"tar bytes");
    let denied = agent
        .client
        .download_blob(authed(
            &agent.cred,
            pb::BlobRequest {
                attempt_id: build.attempt_id.clone(),
                digest: "0".repeat(64),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // No credential, no service.
    let anon = agent
        .client
        .download_blob(pb::BlobRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anon.code(), Code::Unauthenticated);

    // Success before the logs are complete is refused.
    agent.step(&build, 0, false).await;
    let early = server
        .engine()
        .job_result(&agent.id, result(&build, build.epoch))
        .await
        .unwrap_err();
    assert!(early.to_string().contains("not complete"), "{early}");

    // Step 0, then a live follower sees step 1 as it is written.
    agent.ship_log(&build, 0, b"compile output\n").await;
    agent.step(&build, 0, true).await;
    let follower = {
        let mut c2 = control(&server).await;
        let run_id = run_id.clone();
        tokio::spawn(async move { logs(&mut c2, &run_id, "build", true).await })
    };
    agent.step(&build, 1, false).await;
    agent.ship_log(&build, 1, b"hi\n").await;
    agent.step(&build, 1, true).await;
    let up = agent.upload(&build, "out.txt", b"hi\n").await.unwrap();
    assert_eq!(up.size, 3);
    // An upload for an attempt that is not current is refused.
    let mut bad = build.clone();
    bad.attempt_id = "nope".into();
    assert_eq!(
        agent.upload(&bad, "x", b"1").await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    agent.succeed(&build).await;

    let test = agent.assignment().await;
    assert_eq!(test.job, "test");
    assert_eq!(test.inputs.len(), 1);
    assert_eq!(test.inputs[0].path, "out.txt");
    assert_eq!(test.inputs[0].digest, up.digest);
    // The input artifact is downloadable by the attempt that needs it.
    assert!(agent
        .client
        .download_blob(authed(
            &agent.cred,
            pb::BlobRequest {
                attempt_id: test.attempt_id.clone(),
                digest: up.digest.clone(),
                ..Default::default()
            }
        ))
        .await
        .is_ok());
    agent.run_ok(&test).await;

    let run = wait_run(&mut c, &run_id).await;
    assert_eq!(run.state, pb::RunState::Succeeded as i32);
    assert!(run.finished_ms >= run.created_ms);
    assert!(run
        .jobs
        .iter()
        .all(|j| j.state == pb::JobState::Succeeded as i32));
    assert_eq!(run.jobs[0].steps[0].log_bytes, 15);
    assert_eq!(follower.await.unwrap(), b"compile output\nhi\n");

    // A stale result for a finished attempt changes nothing.
    let stale = server
        .engine()
        .job_result(&agent.id, result(&build, build.epoch))
        .await
        .unwrap_err();
    assert!(stale.to_string().contains("stale attempt"), "{stale}");

    let arts = c
        .list_artifacts(pb::ListArtifactsRequest {
            run_id: run_id.clone(),
            job: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts;
    assert_eq!(arts.len(), 1);
    assert_eq!(
        (arts[0].job.as_str(), arts[0].path.as_str(), arts[0].mode),
        ("build", "out.txt", 0o644)
    );

    let agents = c
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].state, "connected");

    // Restart: the run, its logs and artifacts are all still there.
    agent.detach();
    server.stop().await.unwrap();
    let server = start(dir.path(), Duration::from_secs(5)).await;
    let mut c = control(&server).await;
    let again = c
        .get_run(pb::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.state, pb::RunState::Succeeded as i32);
    assert_eq!(again.jobs[0].attempts, 1);
    assert_eq!(
        logs(&mut c, &run_id, "build", false).await,
        b"compile output\nhi\n"
    );
    assert_eq!(logs(&mut c, &run_id, "test", true).await, b"test step 0\n");
    let mut s = c
        .get_artifact(pb::GetArtifactRequest {
            run_id: run_id.clone(),
            job: "build".into(),
            path: "out.txt".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    while let Some(ch) = s.message().await.unwrap() {
        data.extend(ch.data);
    }
    assert_eq!(data, b"hi\n");
    let missing = c
        .get_run(pb::GetRunRequest {
            run_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.stop().await.unwrap();
}

const ONE_JOB: &str = "jobs:\n  only:\n    steps:\n      - image: drover-busybox:latest\n        commands: [echo one]\n";

#[tokio::test]
async fn lease_expiry_requeues_to_another_agent_and_fences_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Duration::from_millis(600)).await;
    let mut c = control(&server).await;
    let mut a = FakeAgent::enroll(&server).await;
    let mut b = FakeAgent::enroll(&server).await;
    a.attach(vec![]).await;
    let run_id = submit(&mut c, ONE_JOB).await;
    let first = a.assignment().await;
    assert_eq!(first.epoch, 1);
    a.step(&first, 0, false).await;

    // b attaches and keeps heartbeating; a goes silent.
    b.attach(vec![]).await;
    a.detach();
    let second = loop {
        tokio::select! {
            m = b.recv() => match m {
                CMsg::Assign(x) => break x,
                other => panic!("unexpected {other:?}"),
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => b.heartbeat().await,
        }
    };
    assert_eq!(second.job, "only");
    assert_eq!(second.epoch, 2);
    assert_ne!(second.attempt_id, first.attempt_id);

    // The lost attempt is fenced: its result and logs are refused.
    let e = server
        .engine()
        .job_result(&a.id, result(&first, 1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("stale attempt"), "{e}");
    let chunk = pb::LogChunk {
        attempt_id: first.attempt_id.clone(),
        epoch: 1,
        step_index: 0,
        offset: 0,
        data: b"x".to_vec().into(),
        eof: false,
        ..Default::default()
    };
    let mut acks = a
        .client
        .push_logs(authed(&a.cred, tokio_stream::iter(vec![chunk])))
        .await
        .unwrap()
        .into_inner();
    let err = acks.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // a comes back listing its old attempt: told it is stale.
    let w = a
        .attach(vec![pb::RunningAttempt {
            attempt_id: first.attempt_id.clone(),
            epoch: 1,
        }])
        .await;
    assert_eq!(w.stale_attempts, vec![first.attempt_id.clone()]);

    b.run_ok(&second).await;
    let run = wait_run(&mut c, &run_id).await;
    assert_eq!(run.state, pb::RunState::Succeeded as i32);
    assert_eq!(run.jobs[0].attempts, 2);
    assert_eq!(run.jobs[0].agent_id, b.id);
    // The lost attempt's log was closed with a marker; the current one is the one shown.
    assert_eq!(logs(&mut c, &run_id, "only", false).await, b"only step 0\n");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn retries_exhausted_end_lost_and_cancel_stops_running_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        heartbeat_interval: Duration::from_millis(50),
        lease_ttl: Duration::from_millis(300),
        max_retries: 0,
        ..Config::with_data_dir(dir.path())
    };
    let server = Server::bind(config).await.unwrap().spawn();
    let mut c = control(&server).await;
    let mut a = FakeAgent::enroll(&server).await;
    a.attach(vec![]).await;

    // No retry budget: a lost agent ends the job lost with AGENT_LOST, its dependents skipped.
    let p = "jobs:\n  a:\n    steps:\n      - image: i\n        commands: [x]\n  b:\n    needs: [a]\n    steps:\n      - image: i\n        commands: [x]\n";
    let run_id = submit(&mut c, p).await;
    let _ = a.assignment().await;
    a.detach();
    let run = wait_run(&mut c, &run_id).await;
    assert_eq!(run.state, pb::RunState::Failed as i32);
    assert_eq!(run.jobs[0].state, pb::JobState::Lost as i32);
    assert_eq!(run.jobs[0].failure, pb::FailureClass::AgentLost as i32);
    assert_eq!(run.jobs[1].state, pb::JobState::Skipped as i32);

    // Cancel: the running job gets a Cancel pushed, the queued one is canceled at once.
    a.attach(vec![]).await;
    let p = "jobs:\n  a:\n    steps:\n      - image: i\n        commands: [x]\n  c:\n    agents: { queue: none }\n    steps:\n      - image: i\n        commands: [x]\n";
    let run_id = submit(&mut c, p).await;
    let job = a.assignment().await;
    let n = c
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .canceled_jobs;
    assert_eq!(n, 2);
    match a.recv().await {
        CMsg::Cancel(x) => assert_eq!(x.attempt_id, job.attempt_id),
        other => panic!("expected cancel, got {other:?}"),
    }
    a.send(pb::agent_message::Msg::Result(pb::JobResult {
        attempt_id: job.attempt_id.clone(),
        epoch: job.epoch,
        state: pb::JobState::Canceled as i32,
        failure: pb::FailureClass::Canceled as i32,
        reason: "canceled".into(),
        exit_code: 137,
    }))
    .await;
    let run = wait_run(&mut c, &run_id).await;
    assert_eq!(run.state, pb::RunState::Canceled as i32);
    assert!(run
        .jobs
        .iter()
        .all(|j| j.state == pb::JobState::Canceled as i32));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn restart_keeps_running_attempts_for_a_reconnecting_agent() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Duration::from_secs(5)).await;
    let mut c = control(&server).await;
    let mut a = FakeAgent::enroll(&server).await;
    a.attach(vec![]).await;
    let p = "jobs:\n  one:\n    steps:\n      - image: i\n        commands: [x]\n  two:\n    steps:\n      - image: i\n        commands: [x]\n";
    let run_id = submit(&mut c, p).await;
    let one = a.assignment().await;
    assert_eq!(one.job, "one");
    a.step(&one, 0, false).await;
    a.ship_log(&one, 0, b"before restart\n").await;

    // Coordinator restart while the attempt runs; "two" is still queued (capacity 1).
    a.detach();
    server.stop().await.unwrap();
    let server = start(dir.path(), Duration::from_secs(5)).await;
    let mut c = control(&server).await;
    let run = c
        .get_run(pb::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.jobs[0].state, pb::JobState::Running as i32);
    assert_eq!(run.jobs[0].steps[0].log_bytes, 15);

    // The agent reconnects (to the new port) listing its attempt: re-adopted, not stale, same epoch.
    a.client = AgentServiceClient::connect(server.url()).await.unwrap();
    let w = a
        .attach(vec![pb::RunningAttempt {
            attempt_id: one.attempt_id.clone(),
            epoch: one.epoch,
        }])
        .await;
    assert!(w.stale_attempts.is_empty());
    a.step(&one, 0, true).await;
    a.succeed(&one).await;
    let two = a.assignment().await;
    assert_eq!(two.job, "two");
    a.run_ok(&two).await;
    let run = wait_run(&mut c, &run_id).await;
    assert_eq!(run.state, pb::RunState::Succeeded as i32);
    assert_eq!(run.jobs[0].attempts, 1);
    assert_eq!(
        logs(&mut c, &run_id, "one", false).await,
        b"before restart\n"
    );
    server.stop().await.unwrap();
}

/// A coordinator stopped after the commit that ended an attempt but before it completed the
/// attempt's logs leaves logs that nothing will ever complete. A follower that comes after the
/// restart completes them (the marker on the step that ran, an empty log for the one that never
/// started) and ends, instead of waiting for good.
#[tokio::test]
async fn logs_an_ended_attempt_left_incomplete_are_completed_for_their_follower() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), Duration::from_secs(5)).await;
    let mut c = control(&server).await;
    let mut a = FakeAgent::enroll(&server).await;
    a.attach(vec![]).await;
    let p = "jobs:\n  one:\n    steps:\n      - image: i\n        commands: [x]\n      - image: i\n        commands: [y]\n";
    let run_id = submit(&mut c, p).await;
    let one = a.assignment().await;
    a.step(&one, 0, false).await;
    a.send(pb::agent_message::Msg::Result(pb::JobResult {
        state: pb::JobState::Failed as i32,
        failure: pb::FailureClass::Script as i32,
        reason: "step exited 2".into(),
        exit_code: 2,
        ..result(&one, one.epoch)
    }))
    .await;
    assert_eq!(
        wait_run(&mut c, &run_id).await.state,
        pb::RunState::Failed as i32
    );
    // Followed now, the logs end (completed by the commit's aftermath).
    let marker = b"\n[drover] log incomplete: attempt ended failed before its log was complete\n";
    assert_eq!(logs(&mut c, &run_id, "one", true).await, marker);
    // The completed log is compressed in the background (a task that outlives `stop`): let it
    // finish, so it cannot undo the state built below.
    let attempt_dir = dir.path().join("logs").join(&one.attempt_id);
    tokio::time::timeout(T, async {
        while !attempt_dir.join("0.log.zst").exists() || attempt_dir.join("0.log").exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the finished log is compressed");
    a.detach();
    server.stop().await.unwrap();

    // Put the store in the state of a stop before the completion: the step that ran holds a
    // partial line, and neither log is recorded complete.
    for f in ["0.log", "0.log.zst", "1.log", "1.log.zst"] {
        let _ = std::fs::remove_file(attempt_dir.join(f));
    }
    std::fs::create_dir_all(&attempt_dir).unwrap();
    std::fs::write(attempt_dir.join("0.log"), b"half a li").unwrap();
    let index = rusqlite::Connection::open(dir.path().join("logs").join("complete.db")).unwrap();
    let removed = index
        .execute("DELETE FROM complete WHERE attempt = ?1", [&one.attempt_id])
        .unwrap();
    assert_eq!(removed, 2, "both steps' completions were recorded");
    drop(index);

    let server = start(dir.path(), Duration::from_secs(5)).await;
    let mut c = control(&server).await;
    let followed = logs(&mut c, &run_id, "one", true).await;
    assert_eq!(followed, [&b"half a li"[..], marker].concat());
    // Durably: a reader that does not follow gets the same, with the end of each log.
    assert_eq!(logs(&mut c, &run_id, "one", false).await, followed);
    server.stop().await.unwrap();
}
