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

/// `drover why RUN JOB`'s output.
fn why(cluster: &Cluster, run: &str, job: &str) -> String {
    let o = cluster.drover(&["why", run, job]);
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// True when this Docker engine can start privileged containers at all (a nested or rootless engine
/// may not: "unable to apply caps").
fn engine_runs_privileged() -> bool {
    std::process::Command::new("docker")
        .args(["run", "--rm", "--privileged", IMAGE, "true"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Privileged mode and host mounts are off on every agent unless its flags allow them: such jobs stay
/// queued (and `drover why` names the flag) while a plain job runs unprivileged; an agent allowing
/// mounts only under another prefix does not get the mount job; an agent allowing both runs them, the
/// host directory read-only as asked.
#[tokio::test(flavor = "multi_thread")]
async fn privileged_steps_and_host_mounts_run_only_on_agents_that_allow_them() {
    let mut cluster = Cluster::new()
        .agent("plain", "os=linux")
        .start()
        .await
        .unwrap();
    let shared = cluster.scratch().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), "from-the-host\n").unwrap();
    let pipeline = format!(
        r#"
jobs:
  root:
    steps:
      - image: {IMAGE}
        privileged: true
        commands:
          - grep CapEff /proc/self/status
          - mkdir -p /mnt/t && mount -t tmpfs none /mnt/t && echo mounted-tmpfs
  disk:
    steps:
      - image: {IMAGE}
        volumes: ["{dir}:/data:ro"]
        commands:
          - cat /data/hello.txt
          - if touch /data/new 2>/dev/null; then echo writable; else echo read-only; fi
  plain:
    steps:
      - image: {IMAGE}
        commands:
          - grep CapEff /proc/self/status
          - if mount -t tmpfs none /mnt 2>/dev/null; then echo mounted; else echo no-mount; fi
          - if [ -e /data ]; then echo has-data; else echo no-data; fi
"#,
        dir = shared.display()
    );
    let run = cluster.submit(&pipeline).await.unwrap();
    cluster
        .wait_until(&run, Duration::from_secs(60), |r| {
            job(r, "plain").state() == JobState::Succeeded
        })
        .await
        .unwrap();
    let log = String::from_utf8(cluster.log(&run, "plain", "step-1").await.unwrap()).unwrap();
    assert!(log.contains("no-mount") && log.contains("no-data"), "{log}");
    let plain_caps = log
        .lines()
        .find(|l| l.contains("CapEff"))
        .unwrap()
        .to_string();

    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = cluster.run(&run).await.unwrap();
    assert_eq!(job(&r, "root").state(), JobState::Queued);
    assert_eq!(job(&r, "disk").state(), JobState::Queued);
    let w = why(&cluster, &run, "root");
    assert!(
        w.contains("none allows what its steps ask for") && w.contains("--allow-privileged"),
        "{w}"
    );
    assert!(
        why(&cluster, &run, "disk").contains("--allow-host-mounts"),
        "{}",
        why(&cluster, &run, "disk")
    );

    // Host mounts allowed, but only under another directory: still not this agent.
    cluster
        .add_agent_with_args(
            drover_tests::AgentSpec {
                name: "elsewhere".into(),
                labels: "os=linux".into(),
                capacity: 1,
            },
            &[
                "--allow-host-mounts",
                "--host-mount-prefixes",
                "/srv/not-here",
            ],
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = cluster.run(&run).await.unwrap();
    assert_eq!(job(&r, "disk").state(), JobState::Queued);
    assert!(why(&cluster, &run, "disk")
        .contains("outside the agent's --host-mount-prefixes /srv/not-here"));

    let scratch = cluster.scratch();
    cluster
        .add_agent_with_args(
            drover_tests::AgentSpec {
                name: "trusted".into(),
                labels: "os=linux".into(),
                capacity: 2,
            },
            &[
                "--allow-privileged",
                "--allow-host-mounts",
                "--host-mount-prefixes",
                scratch.to_str().unwrap(),
            ],
        )
        .await
        .unwrap();
    let trusted = cluster.agent_id("trusted");
    let done = cluster
        .wait_run(&run, Duration::from_secs(120))
        .await
        .unwrap();
    let disk = job(&done, "disk");
    assert_eq!(disk.state(), JobState::Succeeded, "{disk:?}");
    assert_eq!(disk.agent_id, trusted);
    let log = String::from_utf8(cluster.log(&run, "disk", "step-1").await.unwrap()).unwrap();
    assert!(
        log.contains("from-the-host") && log.contains("read-only"),
        "{log}"
    );
    assert!(!shared.join("new").exists());

    let root = job(&done, "root");
    assert_eq!(root.agent_id, trusted, "{root:?}");
    if engine_runs_privileged() {
        assert_eq!(root.state(), JobState::Succeeded, "{root:?}");
        let log = String::from_utf8(cluster.log(&run, "root", "step-1").await.unwrap()).unwrap();
        assert!(log.contains("mounted-tmpfs"), "{log}");
        let caps = log.lines().find(|l| l.contains("CapEff")).unwrap();
        assert_ne!(caps, plain_caps, "privileged has more capabilities");
    } else {
        // This engine cannot start privileged containers: the agent did ask Docker for one.
        eprintln!(
            "this Docker engine cannot run privileged containers; checking the request reached it"
        );
        assert_eq!(root.failure(), FailureClass::Docker, "{root:?}");
        assert!(root.reason.contains("caps"), "{root:?}");
    }
}
