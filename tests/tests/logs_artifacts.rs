//! Logs and artifacts end to end: per-line timestamps, the per-step log cap, compressed storage,
//! object storage, resumable transfers and caches — real coordinator, agents, containers and CLI.

use std::time::Duration;

use drover_proto::v1::{FollowLogsRequest, JobState, RunState};
use drover_tests::{job, Cluster, IMAGE};
use futures::StreamExt;

const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Parses the `2026-12-03T08:00:00.123Z ` prefix `drover logs --timestamps` puts before a line;
/// returns Unix milliseconds and the rest of the line.
fn split_stamp(line: &str) -> Option<(i64, &str)> {
    let (stamp, rest) = line.split_once(' ')?;
    let b = stamp.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[10] != b'T' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| stamp.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Days from civil (Howard Hinnant), to compare with the test's own clock.
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + h) * 60 + mi) * 60_000 + s * 1000 + ms, rest))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `drover logs --timestamps` prefixes every line with the time it was written (in order, within
/// the run's lifetime, showing the pause between lines), while the stored log and the printed
/// lines keep ANSI colour bytes untouched.
#[tokio::test(flavor = "multi_thread")]
async fn timestamps_prefix_every_line_and_ansi_passes_untouched() {
    let cluster = Cluster::new().agent("a", "os=linux").start().await.unwrap();
    let before = now_ms();
    let pipeline = format!(
        r#"
jobs:
  colours:
    steps:
      - name: paint
        image: {IMAGE}
        commands:
          - printf '\033[31mred\033[0m\n'
          - echo plain
          - sleep 0.5
          - printf 'late\npartial'
          - sleep 0.3
          - printf ' line\n'
"#
    );
    let run_id = cluster.submit(&pipeline).await.unwrap();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state, RunState::Succeeded as i32, "{run:#?}");
    let after = now_ms();

    let raw = cluster.log(&run_id, "colours", "paint").await.unwrap();
    assert_eq!(
        raw,
        b"\x1b[31mred\x1b[0m\nplain\nlate\npartial line\n".to_vec(),
        "the stored log is what the step wrote, byte for byte"
    );

    let out = cluster.drover(&["logs", &run_id, "colours", "paint", "--timestamps"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<(i64, &str)> = text
        .lines()
        .map(|l| split_stamp(l).unwrap_or_else(|| panic!("line without a timestamp: {l:?}")))
        .collect();
    let bodies: Vec<&str> = lines.iter().map(|(_, b)| *b).collect();
    assert_eq!(
        bodies,
        vec!["\x1b[31mred\x1b[0m", "plain", "late", "partial line"],
        "the colour escape bytes pass through and a line split across writes is one line"
    );
    let times: Vec<i64> = lines.iter().map(|(t, _)| *t).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(
        times[0] >= before - 1000 && times[3] <= after + 1000,
        "{times:?} within {before}..{after}"
    );
    assert!(
        times[2] - times[1] >= 400,
        "the half-second pause shows between `plain` and `late`: {times:?}"
    );
    // `partial` started before the 0.3 s pause: its line keeps the time of its first byte.
    assert!(times[3] - times[2] < 250, "{times:?}");

    // Without the flag the CLI prints the bytes exactly as stored.
    let plain = cluster.drover(&["logs", &run_id, "colours", "paint"]);
    assert_eq!(plain.stdout, raw);

    // The finished log is stored compressed, and still reads the same from any offset.
    let attempt = job(&run, "colours").attempt_id.clone();
    let stored = cluster.data_dir().join("logs").join(&attempt);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !stored.join("0.log.zst").exists() || stored.join("0.log").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no compressed log in {}",
            stored.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cluster.log(&run_id, "colours", "paint").await.unwrap(), raw);
    let tail = cluster.drover(&["logs", &run_id, "colours", "paint", "--offset", "5"]);
    assert_eq!(tail.stdout, raw[5..]);

    // Over the API, the times come only when asked for.
    let mut client = cluster.client().await.unwrap();
    for (timestamps, want_times) in [(false, false), (true, true)] {
        let mut s = client
            .follow_logs(FollowLogsRequest {
                run_id: run_id.clone(),
                job: "colours".into(),
                step: "paint".into(),
                timestamps,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = false;
        while let Some(ev) = s.next().await {
            got |= !ev.unwrap().times.is_empty();
        }
        assert_eq!(got, want_times);
    }
}

/// An agent with a small log cap keeps the first N bytes of a step's output, then one marker line;
/// the step and the job run on (the next command and the next step still run), the run says the
/// step's log was truncated, and the next step has its own, untruncated log.
#[tokio::test(flavor = "multi_thread")]
async fn log_cap_truncates_with_a_marker_and_the_job_runs_on() {
    let cluster = Cluster::new()
        .agent("a", "os=linux")
        .agent_args(&["--max-log-bytes", "1000"])
        .start()
        .await
        .unwrap();
    let pipeline = format!(
        r#"
jobs:
  noisy:
    steps:
      - name: flood
        image: {IMAGE}
        commands:
          - seq 1 5000
          - echo after-the-cap
          - echo still-running > marker.txt
      - name: next
        image: {IMAGE}
        commands:
          - cat marker.txt
"#
    );
    let run_id = cluster.submit(&pipeline).await.unwrap();
    let run = cluster.wait_run(&run_id, RUN_TIMEOUT).await.unwrap();
    assert_eq!(run.state, RunState::Succeeded as i32, "{run:#?}");
    let j = job(&run, "noisy");
    assert_eq!(j.state, JobState::Succeeded as i32);

    let flood = cluster.log(&run_id, "noisy", "flood").await.unwrap();
    let full: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    let marker = b"[drover] log truncated at 1000 bytes\n";
    assert!(
        flood.ends_with(marker),
        "{}",
        String::from_utf8_lossy(&flood)
    );
    let kept = &flood[..flood.len() - marker.len()];
    // The kept part is exactly the first 1000 bytes (plus a newline if the cut fell mid-line).
    let kept = kept
        .strip_suffix(b"\n")
        .filter(|k| k.len() == 1000)
        .unwrap_or(kept);
    assert_eq!(kept, &full.as_bytes()[..1000]);
    assert!(!String::from_utf8_lossy(&flood).contains("after-the-cap"));

    assert!(j.steps[0].truncated, "{:#?}", j.steps[0]);
    assert!(!j.steps[1].truncated, "{:#?}", j.steps[1]);
    assert_eq!(
        cluster.log(&run_id, "noisy", "next").await.unwrap(),
        b"still-running\n".to_vec()
    );

    let show = cluster.drover(&["run", "show", &run_id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success(), "{text}");
    let flood_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("flood"))
        .unwrap_or_else(|| panic!("no flood step line in\n{text}"));
    assert!(flood_line.contains("(truncated)"), "{text}");
    let next_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("next"))
        .unwrap();
    assert!(!next_line.contains("truncated"), "{text}");
}
