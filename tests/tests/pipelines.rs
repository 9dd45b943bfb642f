//! Pipelines end to end: a real coordinator, real agents, real containers, the real CLI.

use std::time::Duration;

use drover_proto::v1::{
    FailureClass, GetArtifactRequest, JobState, ListArtifactsRequest, ListRunsRequest, RunState,
};
use drover_tests::{job, job_state, Cluster, IMAGE};
use futures::StreamExt;
use sha2::{Digest, Sha256};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn write(dir: &std::path::Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// A three-job DAG over two agents with different labels: each job lands on the agent its selector
/// names, builds from the uploaded source tree (without the ignored files), and passes its artifact on.
#[tokio::test(flavor = "multi_thread")]
async fn dag_runs_on_matching_agents_from_uploaded_source() {
    let cluster = Cluster::new()
        .agent("linux", "os=linux,queue=default")
        .agent("gpu", "os=linux,queue=gpu")
        .start()
        .await
        .unwrap();
    let src = cluster.scratch().join("src");
    write(&src, "hello.txt", "hello from the source tree\n");
    write(&src, "lib/part.txt", "part two\n");
    write(&src, "secret.local", "must not be uploaded\n");
    write(&src, ".droverignore", "*.local\n");
    let pipeline = format!(
        r#"
jobs:
  build:
    agents: {{ queue: default }}
    steps:
      - name: compile
        image: {IMAGE}
        commands:
          - test -f hello.txt
          - test ! -e secret.local
          - mkdir -p out
          - cat hello.txt lib/part.txt > out/bundle.txt
    artifacts: [out/bundle.txt]
  train:
    agents: {{ queue: gpu }}
    needs: [build]
    steps:
      - image: {IMAGE}
        commands:
          - cat out/bundle.txt
          - wc -l < out/bundle.txt > model.txt
    artifacts: [model.txt]
  report:
    agents: {{ queue: default }}
    needs: [build, train]
    steps:
      - image: {IMAGE}
        commands:
          - test "$(cat model.txt)" = 2
          - echo report ok
"#
    );
    let file = cluster.scratch().join("dag.yml");
    std::fs::write(&file, pipeline).unwrap();
    let out = cluster.drover(&[
        "run",
        file.to_str().unwrap(),
        "--context",
        src.to_str().unwrap(),
        "--follow",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "drover run failed:\n{stdout}\n{stderr}"
    );
    // The live log reached the follower, prefixed with job/step.
    assert!(
        stdout.contains("train/step-1 | hello from the source tree"),
        "{stdout}"
    );
    assert!(stdout.contains("report/step-1 | report ok"), "{stdout}");

    let runs = cluster
        .client()
        .await
        .unwrap()
        .list_runs(ListRunsRequest {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(runs.len(), 1);
    let run = cluster.wait_run(&runs[0].id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    assert_eq!(job(&run, "build").agent_id, cluster.agent_id("linux"));
    assert_eq!(job(&run, "train").agent_id, cluster.agent_id("gpu"));
    assert_eq!(job(&run, "report").agent_id, cluster.agent_id("linux"));
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}

/// A failing step fails its job with the script's exit code and skips its dependants; the run fails
/// and `drover run --follow` exits non-zero.
#[tokio::test(flavor = "multi_thread")]
async fn failing_step_fails_job_and_skips_dependants() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let pipeline = format!(
        r#"
jobs:
  ok:
    steps:
      - image: {IMAGE}
        commands: [echo fine]
  broken:
    steps:
      - name: first
        image: {IMAGE}
        commands: ["echo about to fail", "exit 3", "echo never"]
      - name: second
        image: {IMAGE}
        commands: [echo not reached]
  after:
    needs: [broken]
    steps:
      - image: {IMAGE}
        commands: [echo should be skipped]
  after-after:
    needs: [after, ok]
    steps:
      - image: {IMAGE}
        commands: [echo also skipped]
"#
    );
    let file = cluster.scratch().join("fail.yml");
    std::fs::write(&file, pipeline).unwrap();
    let out = cluster.drover(&["run", file.to_str().unwrap(), "--follow"]);
    assert!(!out.status.success(), "a failed run must exit non-zero");

    let runs = cluster
        .client()
        .await
        .unwrap()
        .list_runs(ListRunsRequest {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    let run = cluster.wait_run(&runs[0].id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(job_state(&run, "ok"), JobState::Succeeded);
    let broken = job(&run, "broken");
    assert_eq!(broken.state(), JobState::Failed);
    assert_eq!(broken.failure(), FailureClass::Script);
    assert_eq!(broken.exit_code, 3);
    assert_eq!(broken.attempts, 1, "script failures are not retried");
    assert_eq!(job_state(&run, "after"), JobState::Skipped);
    assert_eq!(job_state(&run, "after-after"), JobState::Skipped);
    let log = cluster.log(&run.id, "broken", "first").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&log), "about to fail\n");
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}

/// Logs and artifacts arrive byte-identical: a step writes a large, binary, newline-less mix of
/// stdout and stderr and a random artifact; the stored log and the downloaded artifact match.
#[tokio::test(flavor = "multi_thread")]
async fn logs_and_artifacts_are_byte_identical() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let pipeline = format!(
        r#"
jobs:
  produce:
    steps:
      - name: out
        image: {IMAGE}
        commands:
          - seq 1 200000
          - printf '\033[31mred\033[0m and no newline'
      - name: blob
        image: {IMAGE}
        commands:
          - mkdir -p dist/sub
          - dd if=/dev/urandom of=dist/random.bin bs=1024 count=3000 2>/dev/null
          - echo tiny > dist/sub/tiny.txt
          - chmod 750 dist/sub/tiny.txt
          - sha256sum dist/random.bin
    artifacts: [dist/]
"#
    );
    let run_id = cluster.submit(&pipeline).await.unwrap();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");

    let mut expected = String::new();
    for i in 1..=200000 {
        expected.push_str(&format!("{i}\n"));
    }
    expected.push_str("\x1b[31mred\x1b[0m and no newline");
    let log = cluster.log(&run_id, "produce", "out").await.unwrap();
    assert_eq!(log.len(), expected.len());
    assert!(log == expected.as_bytes(), "stored log differs from output");

    let sum_line = cluster.log(&run_id, "produce", "blob").await.unwrap();
    let in_container = String::from_utf8_lossy(&sum_line)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let mut client = cluster.client().await.unwrap();
    let arts = client
        .list_artifacts(ListArtifactsRequest {
            run_id: run_id.clone(),
            job: "produce".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts;
    let mut paths: Vec<_> = arts.iter().map(|a| a.path.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["dist/random.bin", "dist/sub/tiny.txt"]);
    let tiny = arts.iter().find(|a| a.path == "dist/sub/tiny.txt").unwrap();
    assert_eq!(tiny.mode & 0o777, 0o750);

    let mut stream = client
        .get_artifact(GetArtifactRequest {
            run_id: run_id.clone(),
            job: "produce".into(),
            path: "dist/random.bin".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.unwrap().data);
    }
    assert_eq!(body.len(), 3000 * 1024);
    let digest = hex::encode(Sha256::digest(&body));
    assert_eq!(
        digest, in_container,
        "artifact differs from the file in the container"
    );

    // The CLI fetches the same bytes to a file.
    let dest = cluster.scratch().join("random.bin");
    let out = cluster.drover(&[
        "artifacts",
        "get",
        &run_id,
        "produce",
        "dist/random.bin",
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}

/// A coordinator restart (kill -9) keeps every run, job, step result, log and artifact.
#[tokio::test(flavor = "multi_thread")]
async fn coordinator_restart_keeps_runs() {
    let mut cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let pipeline = format!(
        r#"
jobs:
  one:
    steps:
      - name: say
        image: {IMAGE}
        commands: [echo kept across restarts, echo data > f.txt]
    artifacts: [f.txt]
"#
    );
    let run_id = cluster.submit(&pipeline).await.unwrap();
    let before = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(before.state(), RunState::Succeeded);

    cluster.kill_coordinator();
    cluster.restart_coordinator().unwrap();

    let after = cluster.run(&run_id).await.unwrap();
    assert_eq!(after, before, "the run must come back unchanged");
    let log = cluster.log(&run_id, "one", "say").await.unwrap();
    assert_eq!(log, b"kept across restarts\n");
    let out = cluster.drover(&["artifacts", "get", &run_id, "one", "f.txt", "-o", "-"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"data\n");
}

/// Bad pipelines are rejected at submit with line, column and reason, and nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn bad_pipelines_are_rejected_with_their_reason() {
    let cluster = Cluster::new().start().await.unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("syntax", "jobs:\n  a:\n    steps: [\n", "invalid YAML"),
        (
            "unknown key",
            "jobs:\n  a:\n    steps:\n      - image: x\n        comands: [true]\n",
            "comands",
        ),
        (
            "cycle",
            "jobs:\n  a:\n    needs: [b]\n    steps: [{image: x, commands: [true]}]\n  b:\n    needs: [a]\n    steps: [{image: x, commands: [true]}]\n",
            "cycle",
        ),
        (
            "unknown need",
            "jobs:\n  a:\n    needs: [nope]\n    steps: [{image: x, commands: [true]}]\n",
            "nope",
        ),
        ("no steps", "jobs:\n  a:\n    steps: []\n", "step"),
        (
            "no image",
            "jobs:\n  a:\n    steps:\n      - commands: [true]\n",
            "image",
        ),
    ];
    for (name, yaml, needle) in cases {
        let file = cluster
            .scratch()
            .join(format!("{}.yml", name.replace(' ', "-")));
        std::fs::write(&file, yaml).unwrap();
        let out = cluster.drover(&["run", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: must be rejected");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        // Every problem is reported as FILE:LINE:COLUMN: reason.
        let prefix = format!("{}:", file.display());
        let positioned = stderr.lines().any(|l| {
            l.strip_prefix(&prefix)
                .and_then(|rest| rest.split(':').next())
                .is_some_and(|line| line.parse::<u32>().is_ok_and(|n| n > 0))
        });
        assert!(positioned, "{name}: no FILE:LINE:COLUMN in {stderr}");
    }
    // Positions are exact for a known case.
    let err = cluster
        .client()
        .await
        .unwrap()
        .submit_run(drover_proto::v1::SubmitRunRequest {
            pipeline: "jobs:\n  a:\n    steps:\n      - image: x\n        comands: [true]\n".into(),
            context_digest: String::new(),
            name: "bad".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("line 5, column 9"),
        "{}",
        err.message()
    );
    let runs = cluster
        .client()
        .await
        .unwrap()
        .list_runs(ListRunsRequest {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(runs.is_empty(), "nothing may be created: {runs:#?}");
}

/// An image that cannot be had fails the job with that reason, classed as an image-pull failure.
#[tokio::test(flavor = "multi_thread")]
async fn missing_image_fails_with_clear_reason() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let run_id = cluster
        .submit(
            "jobs:\n  a:\n    steps:\n      - image: drover-no-such-image:1\n        pull: never\n        commands: [true]\n",
        )
        .await
        .unwrap();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    let a = job(&run, "a");
    assert_eq!(run.state(), RunState::Failed);
    assert_eq!(a.failure(), FailureClass::ImagePull, "{a:#?}");
    assert!(a.reason.contains("drover-no-such-image:1"), "{}", a.reason);
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}
