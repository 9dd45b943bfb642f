//! The dashboard as a browser shows it: a real headless Chromium (Debian's package) loads the page the
//! coordinator serves, and the tests read the DOM through the DevTools protocol. Nothing is skipped: if
//! Chromium cannot start, the test fails with its output.

use std::time::Duration;

use drover_proto::v1::{JobState, RunState};
use drover_tests::chromium::Chromium;
use drover_tests::{job_state, Cluster, IMAGE};

const UI_TIMEOUT: Duration = Duration::from_secs(30);

/// `document.querySelector(css)` as a JS expression, with the selector quoted safely.
fn query(css: &str) -> String {
    format!("document.querySelector({})", serde_json::json!(css))
}

/// A submitted run appears in the runs list, and its step's log grows in the page while the step runs
/// (a line every 300 ms), then is marked complete with every line.
#[tokio::test(flavor = "multi_thread")]
async fn run_appears_and_its_live_log_grows() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let mut browser = Chromium::launch().await.expect("headless chromium");
    browser
        .navigate(&format!(
            "{}/?token={}#/runs",
            cluster.http_addr, cluster.admin_token
        ))
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            r#"
jobs:
  live:
    steps:
      - name: tick
        image: {IMAGE}
        commands:
          - 'for i in $(seq 1 25); do echo "line $i"; sleep 0.3; done'
"#
        ))
        .await
        .unwrap();

    // The runs table polls: the new run shows up without a reload.
    let row = query(&format!("tr[data-run=\"{run_id}\"]"));
    browser
        .wait_for(&format!("{row} !== null"), UI_TIMEOUT)
        .await
        .unwrap();

    browser
        .navigate(&format!("{}/#/run/{run_id}/live/tick", cluster.http_addr))
        .await
        .unwrap();
    let log_text = format!("({0} ? {0}.textContent : '')", query("#log"));
    let first = browser
        .wait_for(
            &format!("{log_text}.includes('line 2\\n') ? {log_text}.length : 0"),
            UI_TIMEOUT,
        )
        .await
        .unwrap()
        .as_u64()
        .unwrap();
    // Later, still while the step runs, the same element holds more.
    let grown = browser
        .wait_for(
            &format!("{log_text}.length > {first} + 20 ? {log_text} : ''"),
            UI_TIMEOUT,
        )
        .await
        .unwrap();
    let grown = grown.as_str().unwrap().to_string();
    let complete = browser
        .eval(&format!("{}.dataset.complete", query("#log")))
        .await
        .unwrap();
    assert_eq!(
        complete, "false",
        "the log grew while streaming, not in one piece at the end"
    );
    let run = cluster.run(&run_id).await.unwrap();
    assert_eq!(
        job_state(&run, "live"),
        JobState::Running,
        "the page showed {} bytes of log while the step was still running",
        grown.len()
    );
    assert!(grown.starts_with("line 1\nline 2\n"), "{grown:?}");

    // At the end: complete, every line, in order.
    browser
        .wait_for(
            &format!("{}.dataset.complete === 'true'", query("#log")),
            UI_TIMEOUT,
        )
        .await
        .unwrap();
    let all = browser.eval(&log_text).await.unwrap();
    let expected: String = (1..=25).map(|i| format!("line {i}\n")).collect();
    assert_eq!(all.as_str().unwrap(), expected);
    let run = cluster.wait_run(&run_id, UI_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Succeeded);
}

/// A failed job shows its failure class and reason, in the DAG and in the job's detail.
#[tokio::test(flavor = "multi_thread")]
async fn failed_job_shows_its_reason_and_class() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let mut browser = Chromium::launch().await.expect("headless chromium");
    let run_id = cluster
        .submit(&format!(
            r#"
jobs:
  bad:
    steps:
      - name: breaks
        image: {IMAGE}
        commands: [echo about to fail, exit 3]
  after:
    needs: [bad]
    steps:
      - image: {IMAGE}
        commands: [echo never]
"#
        ))
        .await
        .unwrap();
    let run = cluster.wait_run(&run_id, UI_TIMEOUT).await.unwrap();
    assert_eq!(run.state(), RunState::Failed);

    browser
        .navigate(&format!(
            "{}/?token={}#/run/{run_id}/bad",
            cluster.http_addr, cluster.admin_token
        ))
        .await
        .unwrap();
    let node = query(".job[data-job=\"bad\"]");
    let failure = browser
        .wait_for(
            &format!("{node} && {node}.dataset.state === 'failed' ? {node}.dataset.failure : ''"),
            UI_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(failure, "script");
    let skipped = query(".job[data-job=\"after\"]");
    assert_eq!(
        browser
            .eval(&format!("{skipped} && {skipped}.dataset.state"))
            .await
            .unwrap(),
        "skipped"
    );

    let detail = query("#job-failure");
    let text = browser
        .wait_for(
            &format!("{detail} && !{detail}.hidden ? {detail}.textContent : ''"),
            UI_TIMEOUT,
        )
        .await
        .unwrap();
    let text = text.as_str().unwrap();
    assert!(text.starts_with("script: "), "class first: {text:?}");
    assert!(text.contains("exited with code 3"), "reason: {text:?}");
    assert_eq!(
        browser
            .eval(&format!("{detail}.dataset.failure"))
            .await
            .unwrap(),
        "script"
    );
}

/// `GET path` on the coordinator's HTTP side with an optional bearer token: (status, body).
async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hostport = addr.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(hostport).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, reply)
}

/// The JSON API needs an API token (role read or higher): without one, or with an unknown one, it is
/// 401 with the reason; probes, the page and (from loopback) /metrics stay open. In the browser, the
/// page without a token shows the login form, and a token typed there loads the runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_needs_a_token_and_the_page_asks_for_one() {
    let cluster = Cluster::new().start().await.unwrap();
    let addr = cluster.http_addr.clone();
    for path in [
        "/api/runs",
        "/api/agents",
        "/api/queue",
        "/api/run/x",
        "/api/logs/r/j/s",
    ] {
        let (status, reply) = http_get(&addr, path, None).await;
        assert_eq!(status, 401, "{path}: {reply}");
        assert!(
            reply.contains("needs an API token with role read"),
            "{reply}"
        );
        assert!(
            reply.contains("WWW-Authenticate") || reply.contains("www-authenticate"),
            "{reply}"
        );
        let (status, _) = http_get(&addr, path, Some("drv_wrong")).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, reply) = http_get(&addr, "/api/runs", Some(&cluster.admin_token)).await;
    assert_eq!(status, 200, "{reply}");
    for path in [
        "/healthz",
        "/readyz",
        "/",
        "/assets/dashboard.js",
        "/metrics",
    ] {
        let (status, reply) = http_get(&addr, path, None).await;
        assert_eq!(status, 200, "{path}: {reply}");
    }

    let mut browser = Chromium::launch().await.expect("headless chromium");
    browser.navigate(&format!("{addr}/#/runs")).await.unwrap();
    let form_shown = format!("{0} !== null && !{0}.hidden", query("#login"));
    browser.wait_for(&form_shown, UI_TIMEOUT).await.unwrap();
    let token = serde_json::json!(cluster.admin_token);
    browser
        .eval(&format!(
            "{}.value = {token}; {}.requestSubmit(); true",
            query("#login-token"),
            query("#login")
        ))
        .await
        .unwrap();
    browser
        .wait_for(
            &format!(
                "{}.hidden && document.querySelector('#status').dataset.state === 'ok'",
                query("#login")
            ),
            UI_TIMEOUT,
        )
        .await
        .unwrap();
}
