//! Secrets end to end: set from stdin, delivered as environment variables only to the agent running the
//! job, masked in the live and the stored log (also when a value is split across writes), never in an API
//! answer, never in plaintext in the coordinator's database; admin only; unknown names refused at submit.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use drover_proto::v1::{
    CreateApiTokenRequest, DeleteSecretRequest, ExplainJobRequest, GetRunRequest, JobState,
    ListRunsRequest, ListSecretsRequest, RunState, SubmitRunRequest,
};
use drover_tests::{connect_control, job, job_state, Cluster, IMAGE};

const SECRET: &str = "s3cr3t-V4lue-91";

/// `drover ARGS` against `cluster` with `stdin` as standard input.
fn drover_stdin(cluster: &Cluster, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(drover_tests::bin("drover"))
        .args(args)
        .env("DROVER_COORDINATOR", &cluster.addr)
        .env("DROVER_TOKEN", &cluster.admin_token)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running drover");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("writing stdin");
    child.wait_with_output().expect("drover output")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The pipeline never holds the value in one piece (pipelines are stored as submitted).
fn pipeline(secret_name: &str) -> String {
    format!(
        r#"
jobs:
  deploy:
    secrets: [{secret_name}]
    steps:
      - name: use
        image: {IMAGE}
        commands:
          - sleep 1
          - echo "key=$DEPLOY_KEY"
          - printf 's3cr3t-'; sleep 0.3; printf 'V4lue-91\n'
          - test "$DEPLOY_KEY" = 's3cr3t-''V4lue-91' && echo env-ok
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_reach_the_step_masked_and_never_leak() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();

    let set = drover_stdin(
        &cluster,
        &["secrets", "set", "DEPLOY_KEY"],
        format!("{SECRET}\n").as_bytes(),
    );
    assert!(set.status.success(), "{}", text(&set));
    let list = cluster.drover(&["secrets", "list"]);
    assert!(list.status.success(), "{}", text(&list));
    let listed = text(&list);
    assert!(listed.contains("DEPLOY_KEY"), "{listed}");
    assert!(!listed.contains(SECRET), "{listed}");

    // An unknown secret is refused at submit, at its line and column, and nothing is created.
    let mut client = cluster.client().await.unwrap();
    let before = client
        .list_runs(ListRunsRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs
        .len();
    let err = client
        .submit_run(SubmitRunRequest {
            pipeline: pipeline("NOPE"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("line 4, column 15")
            && err.message().contains("unknown secret \"NOPE\""),
        "{err:?}"
    );
    let after = client
        .list_runs(ListRunsRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .runs
        .len();
    assert_eq!(before, after);

    // The job gets the value as an environment variable; its log only shows the mask.
    let run_id = cluster.submit(&pipeline("DEPLOY_KEY")).await.unwrap();
    cluster
        .wait_until(&run_id, Duration::from_secs(60), |r| {
            job_state(r, "deploy") == JobState::Running
        })
        .await
        .unwrap();
    // Deleting a secret an unfinished run uses is refused.
    let busy = client
        .delete_secret(DeleteSecretRequest {
            name: "DEPLOY_KEY".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), tonic::Code::FailedPrecondition, "{busy:?}");
    // Followed live, while the step runs.
    let live = cluster.log(&run_id, "deploy", "use").await.unwrap();
    let run = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    let stored = cluster.log(&run_id, "deploy", "use").await.unwrap();
    for (what, log) in [("live", &live), ("stored", &stored)] {
        let log = String::from_utf8_lossy(log);
        assert!(!log.contains(SECRET), "{what} log leaks the secret:\n{log}");
        assert!(
            !log.contains("V4lue"),
            "{what} log leaks part of it:\n{log}"
        );
        assert!(log.contains("key=***\n"), "{what} log:\n{log}");
        // Split across two writes 0.3 s apart, still masked whole.
        assert!(log.contains("\n***\n"), "{what} log:\n{log}");
        assert!(log.contains("env-ok"), "{what} log:\n{log}");
    }

    // No API answer carries the value.
    let answers = [
        format!(
            "{:?}",
            client
                .get_run(GetRunRequest {
                    run_id: run_id.clone()
                })
                .await
                .unwrap()
                .into_inner()
        ),
        format!(
            "{:?}",
            client
                .list_runs(ListRunsRequest {
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        ),
        format!(
            "{:?}",
            client
                .list_secrets(ListSecretsRequest {})
                .await
                .unwrap()
                .into_inner()
        ),
        format!(
            "{:?}",
            client
                .explain_job(ExplainJobRequest {
                    run_id: run_id.clone(),
                    job: "deploy".into(),
                })
                .await
                .unwrap()
                .into_inner()
        ),
        text(&cluster.drover(&["run", "show", &run_id])),
        text(&cluster.drover(&["--output", "json", "secrets", "list"])),
    ];
    for a in &answers {
        assert!(!a.contains(SECRET), "an API answer leaks the secret: {a}");
    }
    assert!(format!("{:?}", job(&run, "deploy")).contains("deploy"));

    // Not in plaintext anywhere in the coordinator's data directory (database, WAL, logs, blobs).
    let mut files = vec![cluster.data_dir()];
    let mut seen = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                files.push(e.unwrap().path());
            }
        } else if let Ok(bytes) = std::fs::read(&p) {
            seen += 1;
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "{} holds the secret in plaintext",
                p.display()
            );
        }
    }
    assert!(seen > 3, "only {seen} files looked at");
    assert!(cluster.data_dir().join("drover.sqlite").exists());

    // Secrets are admin-only: a submit token may neither list nor set them.
    let submit_token = client
        .create_api_token(CreateApiTokenRequest {
            role: "submit".into(),
            name: "t".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut submitter = connect_control(&cluster.addr, &submit_token).await.unwrap();
    let denied = submitter
        .list_secrets(ListSecretsRequest {})
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("admin"), "{denied:?}");

    // Once the run is over the secret can go; a second delete says it is gone.
    let del = cluster.drover(&["secrets", "delete", "DEPLOY_KEY"]);
    assert!(del.status.success(), "{}", text(&del));
    let again = cluster.drover(&["secrets", "delete", "DEPLOY_KEY"]);
    assert!(!again.status.success(), "{}", text(&again));
    let empty = client
        .list_secrets(ListSecretsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(empty.secrets.is_empty(), "{empty:?}");
}

/// `drover-coordinator rotate-secrets-key` re-encrypts the secrets under a new key file; the restarted
/// coordinator still delivers them.
#[tokio::test(flavor = "multi_thread")]
async fn rotated_key_still_delivers_secrets() {
    let mut cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let set = drover_stdin(
        &cluster,
        &["secrets", "set", "DEPLOY_KEY"],
        SECRET.as_bytes(),
    );
    assert!(set.status.success(), "{}", text(&set));
    let key_file = cluster.data_dir().join("secrets.key");
    let old_key = std::fs::read_to_string(&key_file).unwrap();
    cluster.kill_coordinator();
    let out = Command::new(drover_tests::bin("drover-coordinator"))
        .arg("rotate-secrets-key")
        .arg("--data-dir")
        .arg(cluster.data_dir())
        .env_remove("DROVER_SECRETS_KEY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("re-encrypted 1 secret"),
        "{}",
        text(&out)
    );
    let new_key = std::fs::read_to_string(&key_file).unwrap();
    assert_ne!(old_key, new_key);
    cluster.restart_coordinator().unwrap();
    let id = cluster.submit(&pipeline("DEPLOY_KEY")).await.unwrap();
    let run = cluster
        .wait_run(&id, Duration::from_secs(60))
        .await
        .unwrap();
    let log =
        String::from_utf8_lossy(&cluster.log(&id, "deploy", "use").await.unwrap()).to_string();
    assert_eq!(run.state(), RunState::Succeeded, "{log}");
    assert!(log.contains("env-ok") && log.contains("key=***"), "{log}");
}
