//! Security end to end: TLS 1.3 between agents, the CLI and the coordinator; plaintext refused beyond
//! loopback. Real processes, real sockets, real containers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use drover_tests::{bin, IMAGE};

/// A child process killed when the test ends, whatever the outcome.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with its stderr forwarded to ours and sent, line by line, on the returned channel.
fn spawn(mut cmd: Command, tag: &'static str) -> (Proc, mpsc::Receiver<String>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info");
    let mut child = cmd.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            let _ = tx.send(line);
        }
    });
    (Proc(child), rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(_) => panic!("no line containing {needle:?}"),
        }
    }
}

/// Runs the CLI against `url` with API token `token` (none when empty), trusting `ca` when given.
fn drover(url: &str, ca: Option<&Path>, token: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("drover"));
    cmd.args(args)
        .env("DROVER_COORDINATOR", url)
        .env_remove("DROVER_CA_FILE")
        .env("NO_COLOR", "1")
        // Keep a developer's ~/.config/drover/config.toml out of the test.
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .stdin(Stdio::null());
    if let Some(ca) = ca {
        cmd.env("DROVER_CA_FILE", ca);
    }
    if token.is_empty() {
        cmd.env_remove("DROVER_TOKEN");
    } else {
        cmd.env("DROVER_TOKEN", token);
    }
    cmd.output().expect("running drover")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The bootstrap admin token the coordinator wrote on its first start.
fn admin_token(data: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    let p = data.join("admin.token");
    let mode = std::fs::metadata(&p)
        .expect("admin.token")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin.token is private");
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

/// Starts a coordinator with `args` on a free loopback port; returns it and its address.
fn coordinator(data: &Path, args: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin("drover-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data)
        .args(args);
    let (p, rx) = spawn(cmd, "coordinator");
    let line = wait_line(&rx, "listening on");
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("address")
        .to_string();
    // Keep draining stderr so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    (p, addr)
}

/// With `--tls on` the coordinator makes its own CA; the agent enrolls and works over https with
/// `--ca-file`, keeps the CA beside its credential, and the CLI submits and follows a run over https.
/// A plaintext client and a client that does not trust the CA both fail.
#[tokio::test(flavor = "multi_thread")]
async fn agent_and_cli_run_a_job_over_tls_13() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let (_coord, addr) = coordinator(&data, &["--tls", "on"]);
    let ca: PathBuf = data.join("tls/ca.pem");
    assert!(
        ca.exists(),
        "the coordinator wrote its CA to {}",
        ca.display()
    );
    let url = format!("https://{addr}");
    let admin = admin_token(&data);

    // A plaintext client cannot talk to a TLS listener.
    let o = drover(&format!("http://{addr}"), None, &admin, &["runs"]);
    assert!(
        !o.status.success(),
        "plaintext client must fail: {}",
        text(&o)
    );
    // Nor can a TLS client that does not trust the coordinator's CA.
    let o = drover(&url, None, &admin, &["runs"]);
    assert!(!o.status.success(), "untrusted CA must fail: {}", text(&o));

    let o = drover(&url, Some(&ca), &admin, &["tokens", "create"]);
    assert!(o.status.success(), "{}", text(&o));
    let token = String::from_utf8_lossy(&o.stdout).trim().to_string();

    let state = dir.path().join("agent");
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.arg("--coordinator")
        .arg(&url)
        .arg("--ca-file")
        .arg(&ca)
        .arg("--token")
        .arg(&token)
        .arg("--state-dir")
        .arg(&state)
        .args(["--labels", "os=linux", "--capacity", "1"])
        .env_remove("DROVER_CA_FILE");
    let (agent, rx) = spawn(cmd, "agent");
    wait_line(&rx, "attached to");
    std::thread::spawn(move || while rx.recv().is_ok() {});
    assert!(
        state.join("ca.pem").exists(),
        "the agent keeps the CA it enrolled with"
    );

    let pipeline = dir.path().join("p.yml");
    std::fs::write(
        &pipeline,
        format!(
            "jobs:\n  hello:\n    steps:\n      - image: {IMAGE}\n        commands: [echo over-tls]\n"
        ),
    )
    .unwrap();
    let o = drover(
        &url,
        Some(&ca),
        &admin,
        &["run", pipeline.to_str().unwrap(), "--follow"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("over-tls"),
        "{}",
        text(&o)
    );

    // Restarted without --ca-file, the agent trusts the CA kept in its state directory.
    drop(agent);
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.arg("--coordinator")
        .arg(&url)
        .arg("--state-dir")
        .arg(&state)
        .args(["--labels", "os=linux", "--capacity", "1"])
        .env_remove("DROVER_CA_FILE");
    let (_agent, rx) = spawn(cmd, "agent2");
    wait_line(&rx, "attached to");
    std::thread::spawn(move || while rx.recv().is_ok() {});
}

/// Beyond loopback the coordinator never serves plaintext unless told `--insecure`.
#[test]
fn plaintext_beyond_loopback_is_refused() {
    let (err, dir) = drover_tests::coordinator_refused(&["--listen", "0.0.0.0:0", "--tls", "off"]);
    assert!(
        err.contains("refusing to serve plaintext gRPC on 0.0.0.0:0") && err.contains("--insecure"),
        "{err}"
    );
    // Nothing was created: the refusal comes before the data directory is opened.
    assert!(!dir.path().join("d/drover.sqlite").exists());
}

/// Beyond loopback without flags, TLS is on by default with the coordinator's own CA; `--insecure`
/// serves plaintext (with a warning).
#[test]
fn tls_is_the_default_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut cmd = Command::new(bin("drover-coordinator"));
    cmd.args(["--listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data);
    let (_c, rx) = spawn(cmd, "coordinator");
    let line = wait_line(&rx, "TLS 1.3");
    assert!(line.contains("ca.pem"), "{line}");
    assert!(data.join("tls/ca.pem").exists());

    let mut cmd = Command::new(bin("drover-coordinator"));
    cmd.args(["--listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0"])
        .arg("--insecure")
        .arg("--data-dir")
        .arg(dir.path().join("e"));
    let (_c, rx) = spawn(cmd, "coordinator-insecure");
    wait_line(&rx, "plaintext gRPC beyond loopback");
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Each ControlService call needs an API token with its role: read < submit < admin. Refusals name
/// the role needed.
#[test]
fn every_call_needs_a_token_with_the_right_role() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let (_coord, addr) = coordinator(&data, &[]);
    let url = format!("http://{addr}");
    let admin = admin_token(&data);
    let pipeline = dir.path().join("p.yml");
    std::fs::write(
        &pipeline,
        format!("jobs:\n  j:\n    steps:\n      - image: {IMAGE}\n        commands: [true]\n"),
    )
    .unwrap();
    let p = pipeline.to_str().unwrap();
    let api_token = |role: &str| {
        let o = drover(
            &url,
            None,
            &admin,
            &["tokens", "create", "--kind", "api", "--role", role],
        );
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let read = api_token("read");
    let submit = api_token("submit");

    // No token, or an unknown one: unauthenticated.
    let o = drover(&url, None, "", &["runs"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs an API token with role read"),
        "{}",
        text(&o)
    );
    let o = drover(&url, None, "drv_not-a-token", &["runs"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown API token"), "{}", text(&o));

    // read: reads, but neither submits nor administers.
    assert!(drover(&url, None, &read, &["runs"]).status.success());
    assert!(drover(&url, None, &read, &["agents"]).status.success());
    let o = drover(&url, None, &read, &["run", p]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs role submit but this token has role read"),
        "{}",
        text(&o)
    );

    // submit: submits, but creates no tokens.
    let o = drover(&url, None, &submit, &["run", p]);
    assert!(o.status.success(), "{}", text(&o));
    let o = drover(&url, None, &submit, &["tokens", "create"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs role admin but this token has role submit"),
        "{}",
        text(&o)
    );
    let o = drover(
        &url,
        None,
        &submit,
        &["tokens", "create", "--kind", "api", "--role", "admin"],
    );
    assert!(
        !o.status.success(),
        "a submit token cannot mint an admin token"
    );

    // admin: everything.
    assert!(drover(&url, None, &admin, &["tokens", "create"])
        .status
        .success());
    assert!(drover(&url, None, &admin, &["run", p]).status.success());
}

/// `drover agents revoke ID`: the coordinator ends the agent's session within seconds, refuses it
/// from then on (the agent gives up), and its running job is lost and retried on another agent.
#[tokio::test(flavor = "multi_thread")]
async fn revoked_agent_is_refused_and_its_job_moves() {
    use drover_proto::v1::{JobState, ListAgentsRequest};
    use drover_tests::{job, Cluster};
    let mut cluster = Cluster::new()
        .agent_with_capacity("victim", "os=linux", 1)
        .start()
        .await
        .unwrap();
    let victim = cluster.agent_id("victim");
    let run = cluster
        .submit(&format!(
            "jobs:\n  slow:\n    steps:\n      - image: {IMAGE}\n        commands: [sleep 4]\n"
        ))
        .await
        .unwrap();
    cluster
        .wait_until(&run, Duration::from_secs(60), |r| {
            job(r, "slow").state() == JobState::Running
        })
        .await
        .unwrap();
    let revoked_at = Instant::now();
    let o = cluster.drover(&["agents", "revoke", &victim]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("revoked"),
        "{}",
        text(&o)
    );

    // The agent learns within seconds: its session ends and its reconnect is refused, so it exits.
    let child = cluster
        .agents
        .get_mut("victim")
        .and_then(|a| a.child.as_mut())
        .unwrap();
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(15),
            "the revoked agent still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!exited.success());

    let agents = cluster
        .client()
        .await
        .unwrap()
        .list_agents(ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    let a = agents.iter().find(|a| a.id == victim).unwrap();
    assert_eq!(a.state, "revoked");
    assert!(a.running.is_empty(), "{a:?}");

    // Its job was lost and is retried by another agent.
    cluster
        .add_agent(drover_tests::AgentSpec {
            name: "rescuer".into(),
            labels: "os=linux".into(),
            capacity: 1,
        })
        .await
        .unwrap();
    let done = cluster
        .wait_run(&run, Duration::from_secs(60))
        .await
        .unwrap();
    let j = job(&done, "slow");
    assert_eq!(j.state(), JobState::Succeeded, "{j:?}");
    assert_eq!(j.attempts, 2, "{j:?}");
    assert_eq!(j.agent_id, cluster.agent_id("rescuer"));
}

/// Starts an agent enrolling (or re-attaching) with `state`, trusting `ca`; returns once attached.
fn tls_agent(url: &str, ca: &Path, token: Option<&str>, state: &Path, tag: &'static str) -> Proc {
    let mut cmd = Command::new(bin("drover-agent"));
    cmd.arg("--coordinator")
        .arg(url)
        .arg("--ca-file")
        .arg(ca)
        .arg("--state-dir")
        .arg(state)
        .args(["--labels", "os=linux", "--capacity", "1"])
        .env_remove("DROVER_CA_FILE")
        .env_remove("DROVER_TOKEN");
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    let (agent, rx) = spawn(cmd, tag);
    wait_line(&rx, "attached to");
    std::thread::spawn(move || while rx.recv().is_ok() {});
    agent
}

/// An enrollment token from the CLI.
fn enrollment_token(url: &str, ca: &Path, admin: &str) -> String {
    let o = drover(url, Some(ca), admin, &["tokens", "create"]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The agent id and credential an agent keeps in its state directory.
fn credential_of(state: &Path) -> (String, String) {
    let c = drover_agent::credential::load(state)
        .unwrap()
        .expect("enrolled");
    (c.agent_id, c.credential)
}

/// A DownloadBlob call (the cheapest AgentService call) with `credential`, presenting `identity`.
async fn agent_call(
    url: &str,
    ca: &Path,
    identity: Option<drover_agent::identity::Identity>,
    credential: &str,
) -> Result<(), tonic::Status> {
    use drover_agent::client;
    let ca = std::fs::read(ca).unwrap();
    let shared = identity.map(|i| drover_agent::identity::SharedIdentity::new(i).unwrap());
    let channel = client::channel_with_tls(url, Some(&ca), shared.as_ref()).unwrap();
    let mut c = client::agent_client(channel, credential).unwrap();
    let r = c
        .download_blob(drover_proto::v1::BlobRequest {
            attempt_id: "no-such-attempt".into(),
            digest: "0".repeat(64),
            ..Default::default()
        })
        .await?;
    let mut s = r.into_inner();
    while let Some(m) = futures::StreamExt::next(&mut s).await {
        m?;
    }
    Ok(())
}

/// Mutual TLS: an agent enrolled over TLS holds a client certificate from the coordinator's CA (key
/// and certificate 0600 in its state directory) and runs a job with it. AgentService calls are refused
/// without a certificate, with a certificate from another CA, with agent A's certificate and agent B's
/// credential, and with a revoked agent's own certificate and credential.
#[tokio::test(flavor = "multi_thread")]
async fn agents_use_mutual_tls_and_mismatched_certificates_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let (_coord, addr) = coordinator(&data, &["--tls", "on"]);
    let ca = data.join("tls/ca.pem");
    let url = format!("https://{addr}");
    let admin = admin_token(&data);

    let state_a = dir.path().join("agent-a");
    let token = enrollment_token(&url, &ca, &admin);
    let _agent_a = tls_agent(&url, &ca, Some(&token), &state_a, "agent-a");
    for f in ["client.pem", "client.key"] {
        let mode = std::fs::metadata(state_a.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f} is private");
    }
    let id_a = drover_agent::identity::load(&state_a).unwrap().unwrap();
    let (from, until) = id_a.validity().unwrap();
    let days = (until - from) / 86_400;
    assert!((29..=31).contains(&days), "bounded validity: {days} days");

    // A job runs over the mutually authenticated connection.
    let pipeline = dir.path().join("p.yml");
    std::fs::write(
        &pipeline,
        format!("jobs:\n  hello:\n    steps:\n      - image: {IMAGE}\n        commands: [echo over-mtls]\n"),
    )
    .unwrap();
    let o = drover(
        &url,
        Some(&ca),
        &admin,
        &["run", pipeline.to_str().unwrap(), "--follow"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("over-mtls"),
        "{}",
        text(&o)
    );

    let state_b = dir.path().join("agent-b");
    let token = enrollment_token(&url, &ca, &admin);
    let _agent_b = tls_agent(&url, &ca, Some(&token), &state_b, "agent-b");
    let (a, cred_a) = credential_of(&state_a);
    let (b, cred_b) = credential_of(&state_b);

    // With its own certificate and credential, agent A gets past authentication (the attempt is unknown).
    let e = agent_call(&url, &ca, Some(id_a.clone()), &cred_a)
        .await
        .unwrap_err();
    assert!(
        !matches!(e.code(), tonic::Code::Unauthenticated) && !e.message().contains("certificate"),
        "{e:?}"
    );
    // No certificate: refused, saying why.
    let e = agent_call(&url, &ca, None, &cred_a).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("presented no client certificate"),
        "{e:?}"
    );
    // Agent A's certificate with agent B's credential.
    let e = agent_call(&url, &ca, Some(id_a.clone()), &cred_b)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains(&format!("agent {a}'s but the credential is agent {b}'s")),
        "{e:?}"
    );
    // A certificate naming agent A from another CA: the coordinator fails the handshake
    // ("invalid peer certificate: UnknownIssuer" in its log); under TLS 1.3 the client learns it as
    // the connection closing on its first request.
    let foreign = {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::Issuer::new(p.clone(), ca_key);
        let (key_pem, _) = drover_agent::identity::new_request().unwrap();
        let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        let mut leaf = rcgen::CertificateParams::default();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, a.as_str());
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            format!("urn:drover:agent:{a}").try_into().unwrap(),
        )];
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        drover_agent::identity::Identity {
            cert_pem: cert.pem(),
            key_pem,
        }
    };
    let e = agent_call(&url, &ca, Some(foreign), &cred_a)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{e:?}"
    );

    // Revoked: agent A's own certificate and credential are refused.
    let o = drover(&url, Some(&ca), &admin, &["agents", "revoke", &a]);
    assert!(o.status.success(), "{}", text(&o));
    let e = agent_call(&url, &ca, Some(id_a), &cred_a)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
}

/// Client certificates are renewed at two thirds of their validity over the current one, and a
/// restarted agent connects with the renewed certificate after the first one has expired.
#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_are_renewed_before_they_expire() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let (_coord, addr) = coordinator(&data, &["--tls", "on", "--agent-cert-ttl", "12s"]);
    let ca = data.join("tls/ca.pem");
    let url = format!("https://{addr}");
    let admin = admin_token(&data);
    let state = dir.path().join("agent");
    let token = enrollment_token(&url, &ca, &admin);
    let agent = tls_agent(&url, &ca, Some(&token), &state, "agent");
    let first = drover_agent::identity::load(&state).unwrap().unwrap();
    let (_, first_until) = first.validity().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let renewed = loop {
        let now = drover_agent::identity::load(&state).unwrap().unwrap();
        if now != first {
            break now;
        }
        assert!(Instant::now() < deadline, "the certificate was not renewed");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(renewed.validity().unwrap().1 > first_until);
    assert_ne!(renewed.key_pem, first.key_pem, "a renewal uses a new key");
    // Past the first certificate's end, a restarted agent attaches with the renewed one.
    drop(agent);
    while first.validity().unwrap().1 >= unix_now() {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(first.expired().unwrap());
    let current = drover_agent::identity::load(&state).unwrap().unwrap();
    assert!(!current.expired().unwrap());
    let _agent = tls_agent(&url, &ca, None, &state, "agent-restarted");
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `drover tokens list` shows API and enrollment tokens by id (never the tokens) to admins only;
/// `drover tokens revoke ID` makes the coordinator refuse the token on its next use.
#[test]
fn tokens_are_listed_without_secrets_and_revoked_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let (_coord, addr) = coordinator(&data, &[]);
    let url = format!("http://{addr}");
    let admin = admin_token(&data);
    let create = |args: &[&str]| {
        let o = drover(&url, None, &admin, args);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let read = create(&[
        "tokens",
        "create",
        "--kind",
        "api",
        "--role",
        "read",
        "--name",
        "dashboard",
    ]);
    let enroll = create(&["tokens", "create", "--uses", "3", "--labels", "os=linux"]);

    let o = drover(&url, None, &read, &["tokens", "list"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("ListTokens needs role admin"),
        "{}",
        text(&o)
    );

    let o = drover(&url, None, &admin, &["tokens", "list", "--output", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    for secret in [&admin, &read, &enroll] {
        assert!(!out.contains(secret.as_str()), "a token leaked: {out}");
    }
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{out}");
    let reader = list.iter().find(|t| t["name"] == "dashboard").unwrap();
    assert_eq!(
        (reader["kind"].as_str(), reader["role"].as_str()),
        (Some("api"), Some("read"))
    );
    let enrollment = list.iter().find(|t| t["kind"] == "enrollment").unwrap();
    assert_eq!(enrollment["uses_left"], 3);
    assert_eq!(enrollment["labels"]["os"], "linux");
    let o = drover(&url, None, &admin, &["tokens", "list"]);
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        table.starts_with("ID") && table.contains("os=linux"),
        "{table}"
    );

    // Revoked: refused on the next call.
    assert!(drover(&url, None, &read, &["runs"]).status.success());
    let id = reader["id"].as_str().unwrap();
    let o = drover(&url, None, &admin, &["tokens", "revoke", id]);
    assert!(o.status.success(), "{}", text(&o));
    let o = drover(&url, None, &read, &["runs"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown API token"), "{}", text(&o));

    let id = enrollment["id"].as_str().unwrap();
    assert!(drover(&url, None, &admin, &["tokens", "revoke", id])
        .status
        .success());
    let state = dir.path().join("agent");
    let o = Command::new(bin("drover-agent"))
        .args([
            "--coordinator",
            &url,
            "--token",
            &enroll,
            "--labels",
            "os=linux",
        ])
        .arg("--state-dir")
        .arg(&state)
        .env_remove("DROVER_CA_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("enrollment token is not valid"),
        "{}",
        text(&o)
    );

    // Unknown ids and the last admin token are refused with the reason.
    let o = drover(&url, None, &admin, &["tokens", "revoke", "0123456789ab"]);
    assert!(stderr(&o).contains("no token with id"), "{}", text(&o));
    let admin_id = list.iter().find(|t| t["role"] == "admin").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let o = drover(&url, None, &admin, &["tokens", "revoke", &admin_id]);
    assert!(stderr(&o).contains("last admin token"), "{}", text(&o));
}
