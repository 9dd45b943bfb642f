//! `first_byte`: a step's first output byte -> a FollowLogs follower sees it. Each step of one job
//! prints the wall-clock time (microseconds, busybox `adjtimex`) as its very first output; the follower,
//! started before the run and following every step in order, compares it with its own clock on arrival
//! (same host, same clock). Beside the raw tonic echo round trip.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use drover_proto::v1::FollowLogsRequest;

use crate::cluster::Coordinator;
use crate::container_step::IMAGE;
use crate::echo;
use crate::jobs;
use crate::report::{Figure, Line, Samples};
use crate::Opts;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let steps = if opts.quick { 10 } else { 50 };
    let echo = echo::round_trips(1_000).await.context("echo floor")?;
    let coord = Coordinator::start(&[]).await?;
    let _agent = coord.spawn_agent("first-byte", "os=linux", 1).await?;
    let samples = follow_steps(&coord, steps).await?;
    eprintln!(
        "first_byte: {} steps, p50 {:?}, p99 {:?}, max {:?}",
        samples.len(),
        samples.p50(),
        samples.p99(),
        samples.percentile(100.0)
    );
    Ok(vec![
        Line::new(
            Figure::ms("first_byte.p50", samples.p50()),
            Figure::ms("echo.p50", echo.p50()),
            "n/a (p99 <= 100 ms)",
        ),
        Line::new(
            Figure::ms("first_byte.p99", samples.p99()),
            Figure::ms("echo.p99", echo.p99()),
            "<= 100 ms",
        ),
    ])
}

/// Wall-clock microseconds since the epoch.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The time `adjtimex` printed (`time.tv_sec:` and `time.tv_usec:` lines), in microseconds.
fn stamp(out: &str) -> Option<i64> {
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    Some(field("time.tv_sec:")? * 1_000_000 + field("time.tv_usec:")?)
}

/// One job of `steps` steps, each printing the time first; returns each step's write -> seen latency.
async fn follow_steps(coord: &Coordinator, steps: usize) -> Result<Samples> {
    let mut pipeline = String::from("jobs:\n  stamps:\n    agents: { os: linux }\n    steps:\n");
    for i in 0..steps {
        pipeline.push_str(&format!(
            "      - name: s{i}\n        image: {IMAGE}\n        commands: [\"adjtimex\"]\n"
        ));
    }
    let mut client = coord.control().await?;
    let run_id = jobs::submit(&mut client, &pipeline).await?;
    let mut follower = coord.control().await?;
    let follow = {
        let run_id = run_id.clone();
        tokio::spawn(async move {
            let mut stream = follower
                .follow_logs(FollowLogsRequest {
                    run_id,
                    job: "stamps".to_string(),
                    step: String::new(),
                    offset: 0,
                    follow: true,
                    timestamps: false,
                })
                .await
                .context("FollowLogs")?
                .into_inner();
            let mut text: HashMap<u32, String> = HashMap::new();
            let mut latencies = Vec::new();
            while let Some(ev) = stream.message().await.context("FollowLogs stream")? {
                let seen = now_us();
                let t = text.entry(ev.step_index).or_default();
                let had = stamp(t).is_some();
                t.push_str(&String::from_utf8_lossy(&ev.data));
                if let (false, Some(written)) = (had, stamp(t)) {
                    let us = u64::try_from(seen - written).unwrap_or(0);
                    latencies.push(Duration::from_micros(us));
                }
            }
            Ok::<_, anyhow::Error>(latencies)
        })
    };
    let limit = Duration::from_secs(30 + 5 * steps as u64);
    jobs::watch_to_success(&mut client, &run_id, limit).await?;
    let latencies = tokio::time::timeout(Duration::from_secs(30), follow)
        .await
        .context("the follower did not end after the run")?
        .context("the follower task")??;
    if latencies.len() != steps {
        bail!(
            "the follower saw the time of {} steps out of {steps}",
            latencies.len()
        );
    }
    Ok(Samples::new(latencies))
}

#[cfg(test)]
mod tests {
    use super::stamp;

    #[test]
    fn reads_the_time_adjtimex_prints() {
        let out = "    mode:         0\n-p  timeconstant: 2\n    time.tv_sec:  1796296287\n    time.tv_usec: 2419\n";
        assert_eq!(stamp(out), Some(1_796_296_287_002_419));
        assert_eq!(stamp("    time.tv_sec:  1\n"), None);
    }
}
