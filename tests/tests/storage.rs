//! Artifact storage end to end: blobs in an S3 bucket served by a real S3-compatible server (moto,
//! started by the test), the startup check on bad S3 settings, and transfers that resume after the
//! connection is cut in the middle of a multi-MiB artifact.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_proto::v1::{Artifact, ListArtifactsRequest, RunState};
use drover_tests::moto::Moto;
use drover_tests::proxy::Proxy;
use drover_tests::{bin, Cluster, IMAGE};
use sha2::{Digest, Sha256};

const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Fake credentials for moto (it does not check them unless told to).
const ACCESS_KEY: &str = "AKIADROVERTEST000001";
const SECRET_KEY: &str = "drover-test-secret-key-do-not-log";

async fn artifacts(cluster: &Cluster, run: &str, job: &str) -> Vec<Artifact> {
    cluster
        .client()
        .await
        .unwrap()
        .list_artifacts(ListArtifactsRequest {
            run_id: run.into(),
            job: job.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts
}

/// `drover artifacts get` into the scratch directory; returns the file's content.
fn get_with_cli(cluster: &Cluster, run: &str, job: &str, path: &str, name: &str) -> Vec<u8> {
    let dest = cluster.scratch().join(name);
    let out = cluster.drover(&[
        "artifacts",
        "get",
        run,
        job,
        path,
        "-o",
        dest.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "drover artifacts get: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&dest).unwrap()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Files under `dir` (recursively).
fn files_under(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                files_under(&p)
            } else {
                1
            }
        })
        .sum()
}

/// A pipeline whose artifacts go into the bucket and come back: a 12 MiB file (a multipart upload to
/// S3) and a small one (a single PUT), both the same in every run; a second job gets the big one
/// through `needs` (the agent downloads it from the bucket through the coordinator) and checks it.
#[tokio::test(flavor = "multi_thread")]
async fn s3_artifacts_go_up_and_come_back_and_are_stored_once() {
    let moto = Moto::start().unwrap();
    moto.create_bucket("drover-art").unwrap();
    let endpoint = moto.endpoint();
    let cluster = Cluster::new()
        .agent("a", "os=linux")
        .coordinator_args(&[
            "--s3-bucket",
            "drover-art",
            "--s3-endpoint",
            &endpoint,
            "--s3-prefix",
            "ci/blobs",
            "--s3-allow-http",
        ])
        .coordinator_env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .coordinator_env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .start()
        .await
        .unwrap();
    // 12 MiB of a repeating, non-constant pattern, identical in every run.
    let pipeline = format!(
        r#"
jobs:
  make:
    steps:
      - image: {IMAGE}
        commands:
          - mkdir -p out
          - seq 1 2000000 | head -c 12582912 > out/big.bin
          - echo small artifact > out/small.txt
          - sha256sum out/big.bin | cut -d' ' -f1 > big.sum
    artifacts: [out/big.bin, out/small.txt, big.sum]
  use:
    needs: [make]
    steps:
      - image: {IMAGE}
        commands:
          - test "$(sha256sum out/big.bin | cut -d' ' -f1)" = "$(cat big.sum)"
          - test "$(cat out/small.txt)" = "small artifact"
"#
    );
    let mut expected_big = Vec::new();
    for i in 1..=2_000_000u32 {
        expected_big.extend_from_slice(format!("{i}\n").as_bytes());
    }
    expected_big.truncate(12 * 1024 * 1024);

    let mut digests = Vec::new();
    let mut last_arts = Vec::new();
    for round in 0..2 {
        let run_id = cluster.submit(&pipeline).await.unwrap();
        let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
        assert_eq!(run.state(), RunState::Succeeded, "round {round}: {run:#?}");
        let arts = artifacts(&cluster, &run_id, "make").await;
        let big = arts.iter().find(|a| a.path == "out/big.bin").unwrap();
        assert_eq!(big.size, expected_big.len() as u64);
        assert_eq!(big.digest, sha(&expected_big));
        let got = get_with_cli(&cluster, &run_id, "make", "out/big.bin", "big.bin");
        assert!(
            got == expected_big,
            "round {round}: downloaded content differs"
        );
        let small = get_with_cli(&cluster, &run_id, "make", "out/small.txt", "small.txt");
        assert_eq!(small, b"small artifact\n");
        let mut round_digests: Vec<String> = arts.iter().map(|a| a.digest.clone()).collect();
        round_digests.sort();
        digests.push(round_digests);
        last_arts = arts;
    }
    assert_eq!(digests[0], digests[1], "both runs made the same content");

    // Every blob is in the bucket under its digest, exactly once across both runs, and nothing else
    // (no probe, no temporary object, no unfinished multipart upload) is left there.
    let objects = moto.list("drover-art", "").unwrap();
    let mut expected: Vec<(String, u64)> = last_arts
        .iter()
        .map(|a| {
            (
                format!("ci/blobs/sha256/{}/{}", &a.digest[..2], a.digest),
                a.size,
            )
        })
        .collect();
    expected.sort();
    expected.dedup();
    let mut found = objects.clone();
    found.sort();
    assert_eq!(found, expected, "bucket content");
    assert_eq!(moto.open_multipart_uploads("drover-art").unwrap(), 0);
    // The coordinator's data directory holds no blob: they live in the bucket.
    assert_eq!(
        files_under(&cluster.data_dir().join("blobs").join("sha256")),
        0
    );
    assert_eq!(
        files_under(&cluster.data_dir().join("blobs").join("tmp")),
        0
    );
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}

/// Runs `drover-coordinator` with these S3 flags and environment; it must exit with an error within
/// the time limit. Returns its stderr.
fn coordinator_must_refuse(args: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("drover-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(!status.success(), "the coordinator started: {text}");
            assert!(
                !text.contains(SECRET_KEY),
                "the secret key appears in the output: {text}"
            );
            return text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the coordinator neither started nor failed within 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_s3_settings_are_reported_clearly_at_startup() {
    let moto = Moto::start().unwrap();
    moto.create_bucket("present").unwrap();
    let endpoint = moto.endpoint();
    let creds = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
    ];

    // Nothing listens on the endpoint.
    let closed = format!(
        "http://127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let text = coordinator_must_refuse(
        &[
            "--s3-bucket",
            "present",
            "--s3-endpoint",
            &closed,
            "--s3-allow-http",
        ],
        &creds,
    );
    assert!(
        text.contains("blob storage s3://present/") && text.contains("is not usable"),
        "{text}"
    );
    assert!(
        text.contains(&closed) && text.contains("cannot be reached"),
        "the message names the endpoint: {text}"
    );

    // The bucket does not exist.
    let text = coordinator_must_refuse(
        &[
            "--s3-bucket",
            "absent",
            "--s3-endpoint",
            &endpoint,
            "--s3-allow-http",
        ],
        &creds,
    );
    assert!(
        text.contains("s3://absent/") && text.contains("the bucket does not exist"),
        "{text}"
    );

    // No credentials in the environment.
    let text = coordinator_must_refuse(
        &[
            "--s3-bucket",
            "present",
            "--s3-endpoint",
            &endpoint,
            "--s3-allow-http",
        ],
        &[],
    );
    assert!(
        text.contains("AWS_ACCESS_KEY_ID") && text.contains("AWS_SECRET_ACCESS_KEY"),
        "{text}"
    );

    // A plain-http endpoint without --s3-allow-http.
    let text = coordinator_must_refuse(
        &["--s3-bucket", "present", "--s3-endpoint", &endpoint],
        &creds,
    );
    assert!(text.contains("--s3-allow-http"), "{text}");

    // S3 settings without a bucket.
    let text = coordinator_must_refuse(&["--s3-endpoint", &endpoint], &creds);
    assert!(text.contains("s3-bucket"), "{text}");
}

/// Against a server that checks credentials: the right key starts the coordinator; a wrong secret
/// or an unknown key stops it with a message that says the credentials were refused (and never
/// prints the secret).
#[test]
fn refused_s3_credentials_are_reported_clearly_at_startup() {
    let (moto, access, secret) = Moto::start_enforcing_auth("locked").unwrap();
    let endpoint = moto.endpoint();
    let args = [
        "--s3-bucket",
        "locked",
        "--s3-endpoint",
        &endpoint,
        "--s3-allow-http",
    ];
    for (key, secret_key) in [
        (access.as_str(), SECRET_KEY),
        ("AKIANOSUCHKEY0000000", SECRET_KEY),
    ] {
        let text = coordinator_must_refuse(
            &args,
            &[
                ("AWS_ACCESS_KEY_ID", key),
                ("AWS_SECRET_ACCESS_KEY", secret_key),
            ],
        );
        assert!(
            text.contains("s3://locked/") && text.contains("the credentials were refused"),
            "{text}"
        );
    }

    // The right credentials pass the check: the coordinator gets to listening.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("drover-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", &access)
        .env("AWS_SECRET_ACCESS_KEY", &secret)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let listening = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("listening on") => break true,
            Ok(line) => seen.push(line),
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        listening,
        "the coordinator did not start: {}",
        seen.join("\n")
    );
}

/// Cuts `proxy` once, when the bytes it forwarded in one direction pass `at` (counted from the moment
/// this is called), then restores it right away. Returns once it has cut, or after `timeout`.
async fn cut_when(proxy: &Proxy, to_target: bool, at: u64, timeout: Duration) -> bool {
    let count = |p: &Proxy| {
        let s = p.stats();
        if to_target {
            s.bytes_to_target
        } else {
            s.bytes_from_target
        }
    };
    let base = count(proxy);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if count(proxy) - base >= at {
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(50)).await;
            proxy.restore();
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// The agent's upload of a 24 MiB artifact and its download (as the input of a `needs` job) are each
/// cut at three quarters by a proxy closing the connection; both resume and complete, and the bytes
/// that crossed the proxy show they resumed (a restart from byte 0 would send at least 1.75x).
/// Then `drover artifacts get` through a proxy cut the same way resumes too.
#[tokio::test(flavor = "multi_thread")]
async fn transfers_resume_after_the_connection_is_cut() {
    const SIZE: u64 = 24 * 1024 * 1024;
    let cluster = Cluster::new()
        .agent_via_proxy("a", "os=linux", 2)
        .start()
        .await
        .unwrap();
    let pipeline = format!(
        r#"
jobs:
  make:
    steps:
      - image: {IMAGE}
        commands:
          - dd if=/dev/urandom of=big.bin bs=1048576 count=24 2>/dev/null
          - sha256sum big.bin | cut -d' ' -f1 > big.sum
    artifacts: [big.bin, big.sum]
  use:
    needs: [make]
    steps:
      - image: {IMAGE}
        commands:
          - test "$(sha256sum big.bin | cut -d' ' -f1)" = "$(cat big.sum)"
"#
    );
    let proxy = cluster.proxy("a").unwrap();
    let before = proxy.stats();
    let run_id = cluster.submit(&pipeline).await.unwrap();
    // Upload (agent -> coordinator), then the `use` job's download (coordinator -> agent).
    let cut_up = cut_when(proxy, true, SIZE * 3 / 4, RUN_TIMEOUT).await;
    let after_upload = proxy.stats();
    let cut_down = cut_when(proxy, false, SIZE * 3 / 4, RUN_TIMEOUT).await;
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    assert!(
        cut_up && cut_down,
        "both transfers were cut (up {cut_up}, down {cut_down})"
    );
    let after = proxy.stats();
    assert!(after.cut_connections >= 2, "{after:?}");
    // Agent -> coordinator: the upload, whole run long (the rest of the traffic that way is a few KiB).
    let sent_up = after.bytes_to_target - before.bytes_to_target;
    // Coordinator -> agent after the upload: the download.
    let sent_down = after.bytes_from_target - after_upload.bytes_from_target;
    eprintln!("through the agent's proxy: up {sent_up} bytes, down {sent_down} bytes for {SIZE}");
    let limit = SIZE * 3 / 2;
    assert!(
        sent_up >= SIZE && sent_up < limit,
        "the upload sent {sent_up} bytes for a {SIZE}-byte artifact cut at 3/4: it did not resume"
    );
    assert!(
        sent_down >= SIZE && sent_down < limit,
        "the download moved {sent_down} bytes for a {SIZE}-byte artifact cut at 3/4: it did not resume"
    );
    // Nothing is left parked on the coordinator.
    assert_eq!(
        files_under(&cluster.data_dir().join("blobs").join("tmp")),
        0
    );

    // The CLI through its own proxy, cut at three quarters: it resumes from its .drover-partial.
    let target: std::net::SocketAddr = cluster.addr.trim_start_matches("http://").parse().unwrap();
    let cli_proxy = Proxy::start(target).await.unwrap();
    let dest = cluster.scratch().join("big.bin");
    let mut child = tokio::process::Command::new(bin("drover"))
        .args(["artifacts", "get", &run_id, "make", "big.bin", "-o"])
        .arg(&dest)
        .env("DROVER_COORDINATOR", cli_proxy.url())
        .env("DROVER_TOKEN", &cluster.admin_token)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cut_cli = cut_when(&cli_proxy, false, SIZE * 3 / 4, Duration::from_secs(60)).await;
    let out = tokio::time::timeout(Duration::from_secs(60), async {
        child.wait().await.unwrap();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        err
    })
    .await
    .expect("drover artifacts get finished");
    assert!(cut_cli, "the CLI download was cut");
    assert!(
        out.contains("transfer interrupted") && out.contains("verified"),
        "{out}"
    );
    let body = std::fs::read(&dest).unwrap();
    let arts = artifacts(&cluster, &run_id, "make").await;
    let big = arts.iter().find(|a| a.path == "big.bin").unwrap();
    assert_eq!(body.len() as u64, SIZE);
    assert_eq!(sha(&body), big.digest);
    assert!(!cluster.scratch().join("big.bin.drover-partial").exists());
    let moved = cli_proxy.stats().bytes_from_target;
    eprintln!("through the CLI's proxy: {moved} bytes for {SIZE}");
    assert!(
        moved < limit,
        "the CLI moved {moved} bytes for a {SIZE}-byte artifact: it did not resume"
    );
    cluster.assert_no_leftovers(Duration::from_secs(10)).await;
}

/// A download that fails for good keeps its partial file, and running the command again resumes
/// from it: the second run asks only for the missing bytes.
#[tokio::test(flavor = "multi_thread")]
async fn cli_resumes_from_a_partial_file_left_by_an_earlier_run() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let pipeline = format!(
        r#"
jobs:
  make:
    steps:
      - image: {IMAGE}
        commands:
          - dd if=/dev/urandom of=blob.bin bs=1048576 count=4 2>/dev/null
    artifacts: [blob.bin]
"#
    );
    let run_id = cluster.submit(&pipeline).await.unwrap();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    let full = get_with_cli(&cluster, &run_id, "make", "blob.bin", "full.bin");

    // An earlier run stopped after 1 MiB + 5 bytes; the rest comes through a proxy that counts.
    let dest = cluster.scratch().join("resumed.bin");
    let held = 1024 * 1024 + 5;
    std::fs::write(
        cluster.scratch().join("resumed.bin.drover-partial"),
        &full[..held],
    )
    .unwrap();
    let target: std::net::SocketAddr = cluster.addr.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(target).await.unwrap();
    let out = tokio::task::spawn_blocking({
        let url = proxy.url();
        let token = cluster.admin_token.clone();
        let dest = dest.clone();
        let run_id = run_id.clone();
        move || {
            Command::new(bin("drover"))
                .args(["artifacts", "get", &run_id, "make", "blob.bin", "-o"])
                .arg(&dest)
                .env("DROVER_COORDINATOR", url)
                .env("DROVER_TOKEN", token)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming"), "{err}");
    assert!(
        std::fs::read(&dest).unwrap() == full,
        "resumed file differs"
    );
    let moved = proxy.stats().bytes_from_target;
    let rest = (full.len() - held) as u64;
    assert!(
        moved >= rest && moved < rest + 256 * 1024,
        "moved {moved} bytes for the {rest} missing ones"
    );

    // A partial file that is not a prefix of the artifact fails the digest check and is removed, so
    // the next run starts over.
    let bad = cluster.scratch().join("bad.bin");
    std::fs::write(
        cluster.scratch().join("bad.bin.drover-partial"),
        b"not the artifact's first bytes",
    )
    .unwrap();
    let out = cluster.drover(&[
        "artifacts",
        "get",
        &run_id,
        "make",
        "blob.bin",
        "-o",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("corrupt"), "{err}");
    assert!(!bad.exists());
    assert!(!cluster.scratch().join("bad.bin.drover-partial").exists());
    let again = get_with_cli(&cluster, &run_id, "make", "blob.bin", "bad.bin");
    assert!(again == full);
}
