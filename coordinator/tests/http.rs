//! The operators' side of the coordinator, in process over real sockets: probes, Prometheus metrics, gRPC
//! reflection, ExplainJob, the dashboard and its log stream.

mod common;

use common::{control, get_text, http_get, start, wait_run, FakeAgent, T};
use drover_proto::v1 as pb;
use tonic::Code;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

async fn metrics(s: &drover_coordinator::RunningServer) -> String {
    let (status, text) = get_text(s.http_addr(), "/metrics").await;
    assert_eq!(status, 200);
    text
}

async fn submit(s: &drover_coordinator::RunningServer, yaml: &str) -> String {
    control(s)
        .await
        .submit_run(pb::SubmitRunRequest {
            pipeline: yaml.into(),
            context_digest: String::new(),
            name: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id
}

async fn explain(
    s: &drover_coordinator::RunningServer,
    run: &str,
    job: &str,
) -> pb::ExplainJobResponse {
    control(s)
        .await
        .explain_job(pb::ExplainJobRequest {
            run_id: run.into(),
            job: job.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn one_job(name: &str, selector: &str) -> String {
    format!(
        "jobs:\n  {name}:\n    agents: {{ {selector} }}\n    steps:\n      - name: compile\n        image: drover-busybox:latest\n        commands: [echo hi]\n"
    )
}

#[tokio::test]
async fn probes_dashboard_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let addr = s.http_addr();

    assert_eq!(get_text(addr, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(
        get_text(addr, "/readyz").await,
        (200, "ready\n".to_string())
    );

    let mut page = http_get(addr, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].starts_with("text/html"));
    let html = page.text().await;
    assert!(html.contains("id=\"log\""), "{html}");
    for asset in ["/assets/dashboard.js", "/assets/dashboard.css"] {
        assert!(html.contains(asset));
        let (status, text) = get_text(addr, asset).await;
        assert_eq!(status, 200);
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{asset} refers to an external URL"
        );
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert_eq!(get_text(addr, "/nope").await.0, 404);
    assert_eq!(get_text(addr, "/api/run/no-such-run").await.0, 404);

    // Built without tonic-reflection's transport feature: connect the channel here.
    let channel = tonic::transport::Endpoint::from_shared(s.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let answer = tokio::time::timeout(T, answers.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "drover.v1.ControlService",
        "drover.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    s.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_follow_the_queue_dispatch_and_results() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let gpu = "drover_queue_depth{selector=\"queue=gpu\"}";

    let run = submit(&s, &one_job("train", "queue: gpu")).await;
    let m = metrics(&s).await;
    assert_eq!(sample(&m, gpu), Some(1.0), "{m}");
    assert!(
        sample(
            &m,
            "drover_queue_oldest_age_seconds{selector=\"queue=gpu\"}"
        )
        .unwrap()
            >= 0.0
    );
    assert_eq!(sample(&m, "drover_jobs{state=\"queued\"}"), Some(1.0));
    assert_eq!(sample(&m, "drover_agents{state=\"connected\"}"), Some(0.0));
    // The pace agents are told: `start` configures 100 ms and 5 s, which a small fleet keeps.
    assert_eq!(sample(&m, "drover_heartbeat_interval_seconds"), Some(0.1));
    assert_eq!(sample(&m, "drover_lease_ttl_seconds"), Some(5.0));
    assert_eq!(
        sample(&m, "drover_dispatch_latency_seconds_count"),
        Some(0.0)
    );

    // A matching agent arrives: the job is dispatched and the queue falls to 0 (the series stays).
    let mut agent = FakeAgent::enroll(&s, &[("queue", "gpu")], 1).await;
    agent.attach().await;
    let a = agent.assignment().await;
    let m = metrics(&s).await;
    assert_eq!(sample(&m, gpu), Some(0.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "drover_queue_oldest_age_seconds{selector=\"queue=gpu\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&m, "drover_dispatch_latency_seconds_count"),
        Some(1.0)
    );
    assert_eq!(sample(&m, "drover_jobs{state=\"running\"}"), Some(1.0));
    assert_eq!(sample(&m, "drover_agents{state=\"connected\"}"), Some(1.0));

    agent.run_ok(&a).await;
    assert_eq!(
        wait_run(&mut control(&s).await, &run).await.state,
        pb::RunState::Succeeded as i32
    );
    let m = metrics(&s).await;
    assert_eq!(
        sample(
            &m,
            "drover_jobs_finished_total{state=\"succeeded\",failure=\"none\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "drover_log_bytes_total"),
        Some("train step 0\n".len() as f64)
    );
    assert_eq!(sample(&m, "drover_step_duration_seconds_count"), Some(1.0));
    assert!(sample(&m, "drover_store_commit_seconds_count").unwrap() >= 3.0);
    assert_eq!(sample(&m, "drover_jobs{state=\"running\"}"), Some(0.0));

    // A script failure is counted under its class.
    let run = submit(&s, &one_job("flaky", "queue: gpu")).await;
    let a = agent.assignment().await;
    agent.step(&a, 0, false).await;
    agent.push_log(&a, 0, 0, b"boom\n", true).await;
    agent
        .result(&a, pb::JobState::Failed, pb::FailureClass::Script, 3)
        .await;
    assert_eq!(
        wait_run(&mut control(&s).await, &run).await.state,
        pb::RunState::Failed as i32
    );
    let m = metrics(&s).await;
    assert_eq!(
        sample(
            &m,
            "drover_jobs_finished_total{state=\"failed\",failure=\"script\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "drover_dispatch_latency_seconds_count"),
        Some(2.0)
    );
    s.stop().await.unwrap();
}

#[tokio::test]
async fn explain_job_says_why_a_job_waits() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let mut linux = FakeAgent::enroll(&s, &[("os", "linux")], 1).await;
    linux.attach().await;

    let dag = "jobs:\n  train:\n    agents: { queue: gpu }\n    steps:\n      - image: drover-busybox:latest\n        commands: [echo hi]\n  report:\n    needs: [train]\n    steps:\n      - image: drover-busybox:latest\n        commands: [echo hi]\n";
    let run = submit(&s, dag).await;

    // Unmet needs.
    let e = explain(&s, &run, "report").await;
    assert!(e.waiting_on_needs);
    assert_eq!(e.unfinished_needs, vec!["train (queued)".to_string()]);
    assert!(e.verdict.contains("train (queued)"), "{}", e.verdict);

    // No matching agent: names the missing label and the flag that fixes it.
    let e = explain(&s, &run, "train").await;
    assert_eq!(e.state, pb::JobState::Queued as i32);
    assert_eq!(e.verdict, "no agent has queue=gpu");
    assert_eq!(e.remedy, "start an agent with --labels queue=gpu");
    assert_eq!(e.agents.len(), 1);
    assert!(!e.agents[0].matches);
    assert!(e.agents[0].connected);
    assert_eq!(
        e.agents[0].mismatches,
        vec!["queue=gpu (agent has no queue)".to_string()]
    );

    // Matching but busy: the only linux agent runs `first`, so `second` waits in line.
    let first = submit(&s, &one_job("first", "os: linux")).await;
    let a = linux.assignment().await;
    assert_eq!(a.run_id, first);
    let second = submit(&s, &one_job("second", "os: linux")).await;
    let e = explain(&s, &second, "second").await;
    assert_eq!(e.verdict, "1 matching agent is busy; it is first in line");
    assert_eq!(e.queue_position, 1);
    assert_eq!(e.queue_length, 2, "train and second are queued");
    assert!(e.remedy.contains("--labels os=linux"), "{}", e.remedy);
    let fit = &e.agents[0];
    assert!(fit.matches && fit.connected);
    assert_eq!(fit.free, 0);
    assert_eq!(fit.busy_with.len(), 1);
    assert!(
        fit.busy_with[0].starts_with(&format!("{first}/first")),
        "{:?}",
        fit.busy_with
    );

    // The dashboard shows the same explanation.
    let (status, json) = get_text(s.http_addr(), &format!("/api/explain/{second}/second")).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["verdict"],
        "1 matching agent is busy; it is first in line"
    );

    // Running, and then about to be assigned as soon as the agent frees up.
    let e = explain(&s, &first, "first").await;
    assert!(e.verdict.starts_with("running on agent"), "{}", e.verdict);
    linux.run_ok(&a).await;
    let b = linux.assignment().await;
    assert_eq!(b.run_id, second);

    // Unknown job.
    let err = control(&s)
        .await
        .explain_job(pb::ExplainJobRequest {
            run_id: run.clone(),
            job: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    s.stop().await.unwrap();
}

#[tokio::test]
async fn log_endpoint_streams_bytes_appended_after_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let addr = s.http_addr();
    let mut agent = FakeAgent::enroll(&s, &[("os", "linux")], 1).await;
    agent.attach().await;
    let run = submit(&s, &one_job("build", "os: linux")).await;
    let a = agent.assignment().await;
    agent.step(&a, 0, false).await;
    agent
        .push_log(&a, 0, 0, b"first \x1b[31mred\x1b[0m\n", false)
        .await;
    let first_len = "first \x1b[31mred\x1b[0m\n".len() as u64;

    let path = format!("/api/logs/{run}/build/compile?offset=0&follow=1");
    let mut log = http_get(addr, &path).await;
    assert_eq!(log.status, 200);
    assert!(log.headers["content-type"].starts_with("text/plain"));
    let mut got = Vec::new();
    while got.len() < first_len as usize {
        got.extend(log.next_piece().await.expect("first bytes"));
    }
    assert_eq!(got, b"first \x1b[31mred\x1b[0m\n");

    // Appended after the stream started: it arrives on the same response.
    agent.push_log(&a, 0, first_len, b"second\n", false).await;
    while got.len() < first_len as usize + 7 {
        got.extend(log.next_piece().await.expect("appended bytes"));
    }
    assert!(got.ends_with(b"second\n"));
    agent.push_log(&a, 0, first_len + 7, b"", true).await;
    let rest = tokio::time::timeout(T, log.body()).await.unwrap();
    assert!(rest.is_empty(), "nothing after the end: {rest:?}");

    // From an offset, without follow.
    let (status, text) = get_text(
        addr,
        &format!("/api/logs/{run}/build/compile?offset={first_len}"),
    )
    .await;
    assert_eq!((status, text.as_str()), (200, "second\n"));
    assert_eq!(
        get_text(addr, &format!("/api/logs/{run}/build/nope"))
            .await
            .0,
        404
    );
    assert_eq!(
        get_text(addr, &format!("/api/logs/{run}/build/compile?follow=maybe"))
            .await
            .0,
        400
    );

    // The JSON views the dashboard polls.
    agent.step(&a, 0, true).await;
    agent
        .result(&a, pb::JobState::Succeeded, pb::FailureClass::None, 0)
        .await;
    wait_run(&mut control(&s).await, &run).await;
    let (status, json) = get_text(addr, "/api/runs").await;
    assert_eq!(status, 200);
    let runs: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(runs[0]["id"], run.as_str());
    assert_eq!(runs[0]["state"], "succeeded");
    let (_, json) = get_text(addr, &format!("/api/run/{run}")).await;
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(r["jobs"][0]["name"], "build");
    assert_eq!(r["jobs"][0]["depth"], 0);
    assert_eq!(r["jobs"][0]["steps"][0]["log_bytes"], first_len + 7);
    let (_, json) = get_text(addr, "/api/agents").await;
    let agents: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(agents[0]["id"], agent.id.as_str());
    assert_eq!(agents[0]["state"], "connected");
    assert_eq!(agents[0]["labels"]["os"], "linux");
    let (_, json) = get_text(addr, "/api/queue").await;
    let queue: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(queue[0]["selector"], "os=linux");
    assert_eq!(queue[0]["depth"], 0);
    s.stop().await.unwrap();
}
