//! Isolation end to end: per-step `resources:` reach Docker (a step over its memory limit is OOM-killed
//! and the job fails with class OOM; its CPU quota is set), while a step without limits is unaffected.

use std::time::Duration;

use drover_proto::v1::{FailureClass, JobState, RunState};
use drover_tests::{job, Cluster, IMAGE};

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_kills_with_class_oom_and_cpu_quota_applies() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    // dd's 64 MiB buffer cannot fit in 16 MiB; the same dd without a limit succeeds. The quota job
    // reads its own cgroup: 0.5 CPU is a quota of half the period.
    let pipeline = format!(
        r#"
jobs:
  hog:
    steps:
      - name: big
        image: {IMAGE}
        resources: {{ memory: 16Mi, cpus: 1 }}
        commands:
          - echo start
          - dd if=/dev/zero of=/dev/null bs=64M count=1
          - echo unreachable
  free:
    steps:
      - name: big
        image: {IMAGE}
        commands:
          - dd if=/dev/zero of=/dev/null bs=64M count=1
  quota:
    steps:
      - name: read
        image: {IMAGE}
        resources: {{ cpus: 0.5 }}
        commands:
          - q=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/cpu.max)
          - p=$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null || echo 100000)
          - echo "quota=$q period=$p"
          - test "$q" = "$((p / 2))" || test "$q" = "$((p / 2)) $p"
"#
    );
    let id = cluster.submit(&pipeline).await.unwrap();
    let run = cluster
        .wait_run(&id, Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(run.state(), RunState::Failed, "{run:#?}");
    let hog = job(&run, "hog");
    assert_eq!(hog.state(), JobState::Failed, "{run:#?}");
    assert_eq!(hog.failure(), FailureClass::Oom, "{run:#?}");
    assert!(hog.reason.contains("out of memory"), "{}", hog.reason);
    let log = String::from_utf8_lossy(&cluster.log(&id, "hog", "big").await.unwrap()).to_string();
    assert!(
        log.contains("start") && !log.contains("unreachable"),
        "{log}"
    );
    assert_eq!(job(&run, "free").state(), JobState::Succeeded, "{run:#?}");
    let quota = cluster.log(&id, "quota", "read").await.unwrap();
    assert_eq!(
        job(&run, "quota").state(),
        JobState::Succeeded,
        "{}",
        String::from_utf8_lossy(&quota)
    );
}

/// Resource limits are checked at submit with their place.
#[tokio::test(flavor = "multi_thread")]
async fn bad_resources_are_refused_at_submit() {
    let cluster = Cluster::new().start().await.unwrap();
    let err = cluster
        .submit(&format!(
            "jobs:\n  j:\n    steps:\n      - image: {IMAGE}\n        commands: [true]\n        resources: {{ memory: 1Mi }}\n"
        ))
        .await
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("line 6") && text.contains("at least 6Mi"),
        "{text}"
    );
}
