//! `cache:` end to end: a real coordinator, agent, Docker containers and the CLI. The first run
//! misses and saves, the next restores (content, modes and symlinks), a changed lock file misses the
//! exact key and restores through a restore key, a failed job saves nothing, and another pipeline
//! does not see the keys; operators list and delete entries with `drover caches`.

use std::time::Duration;

use drover_proto::v1::RunState;
use drover_tests::{Cluster, IMAGE};
use sha2::{Digest, Sha256};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn pipeline() -> String {
    format!(
        r#"
jobs:
  build:
    cache:
      key: deps-{{{{ hashFiles "Cargo.lock" }}}}
      restore-keys: [deps-]
      paths: [target, .deps/store]
    steps:
      - name: check
        image: {IMAGE}
        commands:
          - if [ -f target/out.txt ]; then echo "restored from $(cat target/out.txt)"; else echo cold; fi
          - if [ -x target/run.sh ]; then target/run.sh; fi
          - if [ -L target/link ]; then echo "link reads $(cat target/link)"; fi
          - if [ -f .deps/store/pkg ]; then echo "store has $(cat .deps/store/pkg)"; fi
      - name: build
        image: {IMAGE}
        commands:
          - mkdir -p target .deps/store
          - cat Cargo.lock > target/out.txt
          - printf '#!/bin/sh\necho tool ran\n' > target/run.sh
          - chmod 755 target/run.sh
          - ln -sf out.txt target/link
          - echo pkg-1 > .deps/store/pkg
          - test ! -f fail
"#
    )
}

/// The key `deps-{{ hashFiles "Cargo.lock" }}` stands for when Cargo.lock holds `lock`, by the
/// documented rule: sha256 over "path NUL sha256(content) newline" of each matched file.
fn key_for(lock: &str) -> String {
    let content = hex::encode(Sha256::digest(lock.as_bytes()));
    let mut h = Sha256::new();
    h.update(b"Cargo.lock\0");
    h.update(content.as_bytes());
    h.update(b"\n");
    format!("deps-{}", hex::encode(h.finalize()))
}

/// Runs the pipeline (saved as `name`, which is the run's name and so the cache scope) with a
/// source tree holding `lock` as Cargo.lock (and a `fail` file when `fail`); returns the run id.
async fn run(cluster: &Cluster, name: &str, lock: &str, fail: bool) -> (String, RunState) {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("Cargo.lock"), lock).unwrap();
    if fail {
        std::fs::write(src.path().join("fail"), "").unwrap();
    }
    let file = cluster.scratch().join(name);
    std::fs::write(&file, pipeline()).unwrap();
    let out = cluster.drover(&[
        "run",
        file.to_str().unwrap(),
        "--context",
        src.path().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run_id = stdout
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no run id in {stdout:?}"))
        .to_string();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    (run_id, run.state())
}

async fn log(cluster: &Cluster, run_id: &str, step: &str) -> String {
    String::from_utf8(cluster.log(run_id, "build", step).await.unwrap()).unwrap()
}

fn assert_contains(log: &str, needle: &str) {
    assert!(log.contains(needle), "expected {needle:?} in:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn caches_restore_save_and_fall_back() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let (k1, k2, k3) = (key_for("v1\n"), key_for("v2\n"), key_for("v3\n"));

    // 1: nothing stored: a miss, a cold build, a save.
    let (r1, state) = run(&cluster, "ci.yml", "v1\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r1, "check").await;
    assert!(
        check.starts_with(&format!("[drover] cache: miss for key {k1:?}\n")),
        "{check}"
    );
    assert_contains(&check, "cold\n");
    assert_contains(
        &log(&cluster, &r1, "build").await,
        &format!("[drover] cache: saved key {k1:?}"),
    );

    // 2: the same lock file: an exact hit with contents, modes and symlinks; no second save.
    let (r2, state) = run(&cluster, "ci.yml", "v1\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r2, "check").await;
    assert_contains(&check, &format!("[drover] cache: restored key {k1:?}:"));
    assert_contains(&check, "restored from v1\n");
    assert_contains(&check, "tool ran\n");
    assert_contains(&check, "link reads v1\n");
    assert_contains(&check, "store has pkg-1\n");
    assert_contains(
        &log(&cluster, &r2, "build").await,
        &format!("[drover] cache: key {k1:?} was restored exactly; not saved again"),
    );

    // 3: a changed lock file misses its exact key and restores the newest `deps-` entry instead,
    // then saves under its own key.
    let (r3, state) = run(&cluster, "ci.yml", "v2\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r3, "check").await;
    assert_contains(
        &check,
        &format!("[drover] cache: restored key {k1:?} (restore key match for {k2:?})"),
    );
    assert_contains(&check, "restored from v1\n");
    assert_contains(
        &log(&cluster, &r3, "build").await,
        &format!("[drover] cache: saved key {k2:?}"),
    );

    // 4: a failed job saves nothing...
    let (r4, state) = run(&cluster, "ci.yml", "v3\n", true).await;
    assert_eq!(state, RunState::Failed);
    assert!(!log(&cluster, &r4, "build").await.contains("cache: saved"));
    // ...so the same key is still a miss next time, restored from the newest entry (run 3's).
    let (r5, state) = run(&cluster, "ci.yml", "v3\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r5, "check").await;
    assert_contains(
        &check,
        &format!("[drover] cache: restored key {k2:?} (restore key match for {k3:?})"),
    );
    assert_contains(&check, "restored from v2\n");

    // Another pipeline (another run name) has its own keys.
    let (r6, state) = run(&cluster, "other.yml", "v1\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r6, "check").await;
    assert!(check.starts_with("[drover] cache: miss for key"), "{check}");
    assert_contains(&check, "cold\n");

    // The operator's view: every entry by scope, newest first; a key in two scopes needs --scope.
    let out = cluster.drover(&["caches", "list"]);
    assert!(out.status.success(), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<(&str, &str)> = listed
        .lines()
        .map(|l| {
            let mut f = l.split('\t');
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("ci.yml", k3.as_str()),
            ("ci.yml", k2.as_str()),
            ("ci.yml", k1.as_str()),
            ("other.yml", k1.as_str()),
        ],
        "{listed}"
    );
    let out = cluster.drover(&["caches", "delete", &k1]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("several scopes"),
        "{out:?}"
    );
    let out = cluster.drover(&["caches", "delete", &k1, "--scope", "ci.yml"]);
    assert!(out.status.success(), "{out:?}");
    // Deleted: the next run with that key misses it and falls back to the newest entry.
    let (r7, state) = run(&cluster, "ci.yml", "v1\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r7, "check").await;
    assert_contains(
        &check,
        &format!("[drover] cache: restored key {k3:?} (restore key match for {k1:?})"),
    );
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}

/// The shell executor (steps as host processes in a workspace directory) restores and saves the same
/// way: contents, modes and symlinks come back.
#[tokio::test(flavor = "multi_thread")]
async fn shell_executor_restores_and_saves() {
    let cluster = Cluster::new()
        .agent("host", "os=linux")
        .agent_args(&["--executor", "shell"])
        .start()
        .await
        .unwrap();
    let k1 = key_for("v1\n");
    let (r1, state) = run(&cluster, "shell.yml", "v1\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r1, "check").await;
    assert!(
        check.starts_with(&format!("[drover] cache: miss for key {k1:?}\n")),
        "{check}"
    );
    assert_contains(
        &log(&cluster, &r1, "build").await,
        &format!("[drover] cache: saved key {k1:?}"),
    );
    let (r2, state) = run(&cluster, "shell.yml", "v1\n", false).await;
    assert_eq!(state, RunState::Succeeded);
    let check = log(&cluster, &r2, "check").await;
    assert_contains(&check, &format!("[drover] cache: restored key {k1:?}:"));
    assert_contains(&check, "restored from v1\n");
    assert_contains(&check, "tool ran\n");
    assert_contains(&check, "link reads v1\n");
    assert_contains(&check, "store has pkg-1\n");
}
