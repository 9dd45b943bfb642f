//! The Docker executor against the real engine, with the local image `drover-busybox:latest`.

use std::future::pending;
use std::path::Path;
use std::time::Duration;

use drover_agent::artifacts::{self, ArtifactError};
use drover_agent::executor::kmsg::oom_kill_logged;
use drover_agent::executor::{
    DockerExecutor, ExecError, Executor, Pull, StepEnd, StepRun, Workspace,
};
use drover_agent::reaper;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

const IMAGE: &str = "drover-busybox:latest";

/// Builds the test image from Debian's static busybox when it is missing.
fn ensure_test_image() {
    let present = std::process::Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        return;
    }
    let script = r#"set -e; d=$(mktemp -d); mkdir -p $d/bin $d/tmp; cp /bin/busybox $d/bin/busybox; for a in sh echo cat ls true false sleep mkdir printf head seq sha256sum env test chmod wc tr yes dd ln; do ln -sf busybox $d/bin/$a; done; tar -C $d -c . | docker import - drover-busybox:latest"#;
    let status = std::process::Command::new("sh")
        .args(["-c", script])
        .status()
        .expect("running docker import");
    assert!(status.success(), "building {IMAGE}");
}

struct Fixture {
    exec: DockerExecutor,
    ws: Workspace,
    agent_id: String,
}

async fn fixture() -> Fixture {
    ensure_test_image();
    let exec = DockerExecutor::connect().await.expect("docker engine");
    let agent_id = format!("test-agent-{}", uuid::Uuid::new_v4());
    let ws = exec
        .create_workspace(&agent_id, &format!("att-{}", uuid::Uuid::new_v4()))
        .await
        .expect("workspace");
    Fixture { exec, ws, agent_id }
}

impl Fixture {
    fn step(&self, index: u32, script: &str) -> StepRun {
        StepRun {
            index,
            image: IMAGE.to_string(),
            commands: vec![script.to_string()],
            env: vec![("GREETING".to_string(), "hello there".to_string())],
            workdir: String::new(),
            nano_cpus: 0,
            memory_bytes: 0,
            privileged: false,
            binds: Vec::new(),
        }
    }

    async fn run(&self, script: &str) -> (StepEnd, Vec<u8>) {
        let mut out = Vec::new();
        let end = self
            .exec
            .run_step(&self.ws, &self.step(0, script), &mut out, None, pending())
            .await
            .expect("step ran");
        (end, out)
    }

    /// Removes the workspace and proves nothing labelled for this agent remains.
    async fn finish(self) {
        self.exec.remove_workspace(&self.ws).await.expect("removed");
        let left = self.exec.leftovers(&self.agent_id).await.unwrap();
        assert!(left.is_empty(), "leftovers: {left:?}");
    }
}

fn exited(code: i64) -> StepEnd {
    StepEnd::Exited {
        code,
        oom_killed: false,
    }
}

#[tokio::test]
async fn captures_output_byte_identically() {
    let f = fixture().await;
    let (end, out) = f
        .run("printf 'line one\\n'\nprintf '\\033[31mred\\033[0m\\n'\necho \"$GREETING\"\nprintf 'no newline'")
        .await;
    assert_eq!(end, exited(0));
    assert_eq!(
        out,
        b"line one\n\x1b[31mred\x1b[0m\nhello there\nno newline".to_vec()
    );

    let (end, out) = f.run("echo to-stdout; echo to-stderr >&2; exit 3").await;
    assert_eq!(end, exited(3));
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("to-stdout\n") && text.contains("to-stderr\n"),
        "{text:?}"
    );
    assert_eq!(text.len(), "to-stdout\nto-stderr\n".len());

    // `sh -e`: the first failing command ends the script.
    let (end, out) = f.run("false\necho unreachable").await;
    assert_eq!(end, exited(1));
    assert!(out.is_empty());
    f.finish().await;
}

#[tokio::test]
async fn captures_five_mebibytes() {
    let f = fixture().await;
    let size = 5 * 1024 * 1024;
    let (end, out) = f.run(&format!("yes abcdefghij | head -c {size}")).await;
    assert_eq!(end, exited(0));
    let expected: Vec<u8> = b"abcdefghij\n".iter().copied().cycle().take(size).collect();
    assert_eq!(out.len(), expected.len());
    assert!(out == expected, "5 MiB output differs");
    f.finish().await;
}

#[tokio::test]
async fn missing_images_fail_with_the_image_reason() {
    let f = fixture().await;
    let missing = "drover-test-no-such-image:never";
    let err = f.exec.ensure_image(missing, Pull::Never).await.unwrap_err();
    assert!(matches!(err, ExecError::Image(_)), "{err}");
    assert!(err.to_string().contains(missing), "{err}");
    let err = f
        .exec
        .ensure_image(missing, Pull::IfNotPresent)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not found locally and could not be pulled"),
        "{err}"
    );
    f.exec.ensure_image(IMAGE, Pull::Never).await.unwrap();
    f.exec
        .ensure_image(IMAGE, Pull::IfNotPresent)
        .await
        .unwrap();
    f.finish().await;
}

fn write_tar(path: &Path, files: &[(&str, u32, &[u8])]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, mode, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.finish().unwrap();
}

#[tokio::test]
async fn seeded_workspace_is_visible_to_steps() {
    let f = fixture().await;
    let dir = tempfile::tempdir().unwrap();
    let context = dir.path().join("ctx.tar");
    write_tar(&context, &[("src/hello.txt", 0o640, b"from the context\n")]);
    let inputs = dir.path().join("inputs.tar");
    drover_agent::workspace::pack_inputs(
        &[drover_agent::workspace::LocalInput {
            path: "bin/tool.sh".into(),
            mode: 0o755,
            local: {
                let p = dir.path().join("tool");
                std::fs::write(&p, b"echo tool ran\n").unwrap();
                p
            },
        }],
        &inputs,
    )
    .unwrap();
    drover_agent::workspace::seed(&f.exec, &f.ws, IMAGE, Some(&context), Some(&inputs))
        .await
        .unwrap();
    let mut step = f.step(0, "cat hello.txt\n../bin/tool.sh\npwd");
    step.workdir = "src".into();
    let mut out = Vec::new();
    let end = f
        .exec
        .run_step(&f.ws, &step, &mut out, None, pending())
        .await
        .unwrap();
    assert_eq!(end, exited(0), "{}", String::from_utf8_lossy(&out));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "from the context\ntool ran\n/workspace/src\n"
    );
    f.finish().await;
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[tokio::test]
async fn collects_artifacts_from_dirs_and_globs_with_modes() {
    let f = fixture().await;
    let (end, out) = f
        .run(concat!(
            "mkdir -p out/sub logs\n",
            "printf 'binary' > out/a.bin\nchmod 755 out/a.bin\n",
            "printf 'nested' > out/sub/b.txt\nchmod 600 out/sub/b.txt\n",
            "printf 'log x' > logs/x.log\nprintf 'text y' > logs/y.txt\n",
            "busybox ln -s ../out/a.bin logs/link.log\n",
        ))
        .await;
    assert_eq!(end, exited(0), "{}", String::from_utf8_lossy(&out));
    let scratch = tempfile::tempdir().unwrap();
    let helper = f.exec.archive_helper(&f.ws, IMAGE).await.unwrap();
    // Every file is also streamed while it is scanned: its bytes, then the digest of exactly those.
    let (live, mut events) = tokio::sync::mpsc::channel(2);
    let streamed = tokio::spawn(async move {
        let mut got: Vec<(String, String, u64, Vec<u8>, String)> = Vec::new();
        while let Some(e) = events.recv().await {
            match e {
                artifacts::Live::Start {
                    path,
                    upload_id,
                    size,
                    ..
                } => got.push((path, upload_id, size, Vec::new(), String::new())),
                artifacts::Live::Data(d) => got.last_mut().unwrap().3.extend_from_slice(&d),
                artifacts::Live::End { digest } => got.last_mut().unwrap().4 = digest,
            }
        }
        got
    });
    let files = artifacts::collect(
        &f.exec,
        &helper,
        // `out/a.bin` is collected by two patterns and streamed once.
        &[
            "out/".to_string(),
            "logs/*.log".to_string(),
            "out/a.bin".to_string(),
        ],
        scratch.path(),
        Some(artifacts::LiveSender::new(live)),
    )
    .await
    .unwrap();
    let streamed = streamed.await.unwrap();
    assert_eq!(streamed.len(), files.len(), "{streamed:?}");
    for (path, upload_id, size, data, digest) in &streamed {
        let file = files.iter().find(|c| &c.path == path).unwrap();
        assert_eq!(file.streamed_as.as_deref(), Some(upload_id.as_str()));
        assert_eq!((data.len() as u64, *size), (file.size, file.size));
        assert_eq!((digest, &sha256(data)), (&file.digest, &file.digest));
    }
    let summary: Vec<(String, u32, u64, String)> = files
        .iter()
        .map(|c| (c.path.clone(), c.mode, c.size, c.digest.clone()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("logs/x.log".into(), 0o644, 5, sha256(b"log x")),
            ("out/a.bin".into(), 0o755, 6, sha256(b"binary")),
            ("out/sub/b.txt".into(), 0o600, 6, sha256(b"nested")),
        ]
    );
    // Each file's bytes are where it says in the fetched archive.
    for c in &files {
        use std::os::unix::fs::FileExt;
        let mut data = vec![0u8; c.size as usize];
        std::fs::File::open(&c.source)
            .unwrap()
            .read_exact_at(&mut data, c.offset)
            .unwrap();
        assert_eq!(sha256(&data), c.digest);
    }
    // A single file, by its exact path.
    let one = artifacts::collect(
        &f.exec,
        &helper,
        &["out/sub/b.txt".into()],
        scratch.path(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].path, "out/sub/b.txt");

    let err = artifacts::collect(&f.exec, &helper, &["missing/".into()], scratch.path(), None)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "artifact \"missing/\" matched no file");
    // Files are uploaded as they are scanned, so an entry that names nothing fails the collection
    // before anything is streamed, even after an entry that matches.
    let (live, mut events) = tokio::sync::mpsc::channel(64);
    let err = artifacts::collect(
        &f.exec,
        &helper,
        &["out/".into(), "missing/".into()],
        scratch.path(),
        Some(artifacts::LiveSender::new(live)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ArtifactError::NoMatch(_)), "{err}");
    assert!(
        events.try_recv().is_err(),
        "nothing may be streamed before every entry is checked"
    );
    let err = artifacts::collect(
        &f.exec,
        &helper,
        &["logs/*.zip".into()],
        scratch.path(),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ArtifactError::NoMatch(_)), "{err}");
    f.exec.remove_helper(helper).await.unwrap();
    f.finish().await;
}

#[tokio::test]
async fn artifact_paths_escaping_the_workspace_are_rejected() {
    let f = fixture().await;
    let (end, _) = f
        .run("busybox ln -s /etc etc-link\nmkdir real\nprintf ok > real/f\nbusybox ln -s real inside-link")
        .await;
    assert_eq!(end, exited(0));
    let scratch = tempfile::tempdir().unwrap();
    let helper = f.exec.archive_helper(&f.ws, IMAGE).await.unwrap();
    for bad in ["../etc/passwd", "/etc/passwd", "real/../../etc"] {
        let err = artifacts::collect(&f.exec, &helper, &[bad.to_string()], scratch.path(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactError::Invalid { .. }), "{bad}: {err}");
    }
    let err = artifacts::collect(
        &f.exec,
        &helper,
        &["etc-link/passwd".into()],
        scratch.path(),
        None,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ArtifactError::Escape { .. }), "{err}");
    assert!(err.to_string().contains("outside the workspace"), "{err}");
    // A symlink that stays inside the workspace is followed.
    let ok = artifacts::collect(
        &f.exec,
        &helper,
        &["inside-link/f".into()],
        scratch.path(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].path, "inside-link/f");
    assert_eq!(ok[0].digest, sha256(b"ok"));
    f.exec.remove_helper(helper).await.unwrap();
    f.finish().await;
}

#[tokio::test]
async fn step_timeout_kills_the_container() {
    let f = fixture().await;
    let started = Instant::now();
    let mut out = Vec::new();
    let end = f
        .exec
        .run_step(
            &f.ws,
            &f.step(0, "echo started\nsleep 60"),
            &mut out,
            Some(Instant::now() + Duration::from_secs(1)),
            pending(),
        )
        .await
        .unwrap();
    assert!(matches!(end, StepEnd::TimedOut { .. }), "{end:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out, b"started\n");
    f.finish().await;
}

#[tokio::test]
async fn stop_requests_end_the_step() {
    let f = fixture().await;
    let mut out = Vec::new();
    let stop = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Duration::from_secs(1)
    };
    let started = Instant::now();
    let end = f
        .exec
        .run_step(&f.ws, &f.step(0, "echo up\nsleep 60"), &mut out, None, stop)
        .await
        .unwrap();
    assert!(matches!(end, StepEnd::Stopped { .. }), "{end:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(out, b"up\n");
    f.finish().await;
}

#[tokio::test]
async fn reaper_removes_every_leftover_of_the_agent() {
    let f = fixture().await;
    let other = f
        .exec
        .create_workspace(&f.agent_id, "kept-attempt")
        .await
        .unwrap();
    let _helper = f.exec.archive_helper(&f.ws, IMAGE).await.unwrap(); // Left behind on purpose, like after a crash.
    let keep = std::collections::HashSet::from(["kept-attempt".to_string()]);
    let removed = reaper::reap(&f.exec, &f.agent_id, &keep).await.unwrap();
    assert_eq!(removed, 2, "the helper container and the volume");
    let left = f.exec.leftovers(&f.agent_id).await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].attempt(), "kept-attempt");
    f.exec.remove_workspace(&other).await.unwrap();
    assert!(f.exec.leftovers(&f.agent_id).await.unwrap().is_empty());
}

#[tokio::test]
async fn removing_a_workspace_also_removes_containers_still_holding_it() {
    let f = fixture().await;
    // A container of the attempt that mounts the workspace and was never removed (as after a
    // failed removal): the engine refuses to remove the volume until it is gone.
    let _helper = f.exec.archive_helper(&f.ws, IMAGE).await.unwrap();
    let left = f.exec.leftovers(&f.agent_id).await.unwrap();
    assert_eq!(left.len(), 2, "the helper and the volume: {left:?}");
    f.finish().await;
}

/// Runs `docker` with `args` and returns its trimmed standard output.
fn docker_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("running docker");
    assert!(out.status.success(), "docker {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn a_memory_limit_kill_is_oom_and_a_plain_137_exit_is_not() {
    let f = fixture().await;
    let mut step = f.step(0, "echo start; dd if=/dev/zero of=/dev/null bs=64M count=1");
    step.memory_bytes = 16 << 20;
    let mut out = Vec::new();
    let end = f
        .exec
        .run_step(&f.ws, &step, &mut out, None, pending())
        .await
        .expect("step ran");
    assert_eq!(
        end,
        StepEnd::Exited {
            code: 137,
            oom_killed: true
        }
    );
    let (end, _) = f.run("exit 137").await;
    assert_eq!(end, exited(137));
    f.finish().await;
}

/// The kernel's log is what settles a SIGKILL the engine did not flag as an OOM kill (the engine can
/// lose the event under load). Reading it needs root, as the agent on a build host and CI run.
#[test]
fn the_kernel_log_tells_an_oom_kill_from_a_plain_sigkill() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: reading /dev/kmsg needs root");
        return;
    }
    ensure_test_image();
    let oom = docker_cli(&[
        "run",
        "-d",
        "-m",
        "16m",
        "--memory-swap",
        "16m",
        IMAGE,
        "sh",
        "-ec",
        "dd if=/dev/zero of=/dev/null bs=64M count=1",
    ]);
    let plain = docker_cli(&["run", "-d", IMAGE, "sleep", "100"]);
    docker_cli(&["kill", &plain]);
    assert_eq!(docker_cli(&["wait", &oom]), "137");
    assert_eq!(docker_cli(&["wait", &plain]), "137");
    let oom_logged = oom_kill_logged(&oom);
    let plain_logged = oom_kill_logged(&plain);
    docker_cli(&["rm", "-f", &oom, &plain]);
    assert_eq!(oom_logged, Some(true));
    assert_eq!(plain_logged, Some(false));
}
