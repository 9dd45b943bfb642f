//! The shell executor end to end: a real coordinator, a real agent started with `--executor shell`, the
//! real CLI; steps run as host processes in the job's workspace directory.

use std::time::Duration;

use drover_proto::v1::{FailureClass, JobState, RunState};
use drover_tests::{job, Cluster};

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn shell_cluster() -> drover_tests::ClusterBuilder {
    Cluster::new()
        .agent("host", "os=linux")
        .agent_args(&["--executor", "shell"])
}

/// Source seeded into the workspace, env, working directory, logs, artifacts kept with their modes,
/// and a workspace directory that is gone once the job is.
#[tokio::test(flavor = "multi_thread")]
async fn steps_run_on_the_host_in_the_workspace_with_logs_and_artifacts() {
    let cluster = shell_cluster().start().await.unwrap();
    let src = cluster.scratch().join("src");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    std::fs::write(src.join("lib/input.txt"), "from the context\n").unwrap();
    let pipeline = r#"
jobs:
  build:
    agents: { os: linux }
    steps:
      - name: make
        image: ignored-by-the-shell-executor
        env: { MODE: release }
        commands:
          - echo "mode=$MODE"
          - test "$(pwd)" = "$DROVER_WORKSPACE"
          - mkdir -p out
          - cat lib/input.txt > out/result.txt
          - printf '#!/bin/sh\necho tool\n' > out/tool.sh
          - chmod 750 out/tool.sh
      - name: inside
        image: ignored
        workdir: out
        commands:
          - echo "in $(basename "$(pwd)")"
          - echo to-stderr >&2
    artifacts: [out/]
"#;
    let file = cluster.scratch().join("shell.yml");
    std::fs::write(&file, pipeline).unwrap();
    let out = cluster.drover(&[
        "run",
        file.to_str().unwrap(),
        "--context",
        src.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "drover run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "run ID submitted"
    let stdout = String::from_utf8_lossy(&out.stdout);
    let run_id = stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no run id in {stdout:?}"))
        .to_string();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    let make = cluster.log(&run_id, "build", "make").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&make), "mode=release\n");
    let inside = cluster.log(&run_id, "build", "inside").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&inside), "in out\nto-stderr\n");

    let got = cluster.scratch().join("result.txt");
    let out = cluster.drover(&[
        "artifacts",
        "get",
        &run_id,
        "build",
        "out/result.txt",
        "-o",
        got.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&got).unwrap(), "from the context\n");
    let tool = cluster.scratch().join("tool.sh");
    let out = cluster.drover(&[
        "artifacts",
        "get",
        &run_id,
        "build",
        "out/tool.sh",
        "-o",
        tool.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&tool).unwrap().permissions().mode() & 0o777,
        0o750
    );
    // The workspace directory goes with the job.
    let root = cluster.agents["host"].state_dir.join("shell");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<_> = std::fs::read_dir(&root)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left in {}: {left:?}",
            root.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A failing command fails the job with its exit code; a step timeout kills the step's whole process
/// group (a background child included) and the job ends timed out.
#[tokio::test(flavor = "multi_thread")]
async fn failures_and_timeouts_end_the_job_and_kill_the_process_group() {
    let cluster = shell_cluster().start().await.unwrap();
    let marker = cluster.scratch().join("bg-still-running");
    let pipeline = format!(
        r#"
jobs:
  fails:
    agents: {{ os: linux }}
    steps:
      - image: ignored
        commands: ["echo before", "exit 4", "echo after"]
  hangs:
    agents: {{ os: linux }}
    steps:
      - image: ignored
        timeout: 1s
        commands:
          - (sleep 3; touch {marker}) &
          - sleep 30
"#,
        marker = marker.display()
    );
    let run_id = cluster.submit(&pipeline).await.unwrap();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    let fails = job(&run, "fails");
    assert_eq!(fails.state(), JobState::Failed, "{run:#?}");
    assert_eq!(fails.failure(), FailureClass::Script);
    assert_eq!(fails.exit_code, 4);
    let log = cluster.log(&run_id, "fails", "").await.unwrap();
    assert_eq!(String::from_utf8_lossy(&log), "before\n");
    let hangs = job(&run, "hangs");
    assert_eq!(hangs.state(), JobState::TimedOut, "{run:#?}");
    // The background child would touch the marker 3 s after the start had it survived the kill.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !marker.exists(),
        "a process of the timed-out step survived it"
    );
}
