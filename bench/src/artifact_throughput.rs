//! `artifact_throughput`: a 1 GiB artifact goes up (a step writes it; the agent collects and uploads it;
//! timed from the step seen finished to the run seen succeeded) and comes back down (`drover artifacts
//! get`, which verifies the sha256; timed as a process), beside `sha256sum` of the downloaded file in the
//! same run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::{sibling_bin, Coordinator};
use crate::container_step::IMAGE;
use crate::jobs;
use crate::report::{Figure, Line};
use crate::Opts;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let bytes: u64 = if opts.quick { 128 << 20 } else { 1 << 30 };
    let repeats = if opts.quick { 1 } else { 3 };
    let cli = sibling_bin("drover")?;
    let coord = Coordinator::start(&[]).await?;
    let _agent = coord.spawn_agent("artifacts", "os=linux", 1).await?;
    let mut client = coord.control().await?;
    let out_dir = coord.scratch("downloads")?;
    let mib = bytes as f64 / (1 << 20) as f64;
    let (mut up, mut down, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..repeats {
        // Random content: every run a new blob, so nothing is deduplicated away.
        let pipeline = format!(
            "jobs:\n  big:\n    agents: {{ os: linux }}\n    steps:\n      - name: make\n        image: {IMAGE}\n        commands: [\"head -c {bytes} /dev/urandom > big.bin\"]\n    artifacts: [big.bin]\n"
        );
        let run_id = jobs::submit(&mut client, &pipeline).await?;
        let watched =
            jobs::watch_to_success(&mut client, &run_id, Duration::from_secs(900)).await?;
        let step_done = watched
            .step_done
            .context("WatchRun never showed the step finished")?;
        let up_took = watched.finished.saturating_duration_since(step_done);

        let file = out_dir.join(format!("big-{i}.bin"));
        let t0 = Instant::now();
        let out = tokio::process::Command::new(&cli)
            .args(["artifacts", "get", &run_id, "big", "big.bin", "-o"])
            .arg(&file)
            .env("DROVER_COORDINATOR", &coord.url)
            .env("DROVER_TOKEN", coord.admin_token())
            .output()
            .await
            .context("running `drover artifacts get`")?;
        let down_took = t0.elapsed();
        if !out.status.success() {
            bail!(
                "`drover artifacts get` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let size = std::fs::metadata(&file)
            .with_context(|| format!("stat {}", file.display()))?
            .len();
        if size != bytes {
            bail!("downloaded {size} bytes, expected {bytes}");
        }

        let t0 = Instant::now();
        let out = tokio::process::Command::new("sha256sum")
            .arg(&file)
            .output()
            .await
            .context("running sha256sum")?;
        let floor_took = t0.elapsed();
        if !out.status.success() {
            bail!("sha256sum failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::remove_file(&file).with_context(|| format!("removing {}", file.display()))?;
        eprintln!(
            "artifact_throughput: repetition {}: up {:.0} MiB/s ({up_took:?}), down {:.0} MiB/s \
             ({down_took:?}), sha256sum {:.0} MiB/s ({floor_took:?})",
            i + 1,
            mib / up_took.as_secs_f64(),
            mib / down_took.as_secs_f64(),
            mib / floor_took.as_secs_f64()
        );
        up.push(mib / up_took.as_secs_f64());
        down.push(mib / down_took.as_secs_f64());
        floor.push(mib / floor_took.as_secs_f64());
    }
    let (u, ulo, uhi) = jobs::spread(&up);
    let (d, dlo, dhi) = jobs::spread(&down);
    let (f, flo, fhi) = jobs::spread(&floor);
    eprintln!(
        "artifact_throughput: {} MiB; medians (ranges): up {u:.0} ({ulo:.0}-{uhi:.0}), down {d:.0} \
         ({dlo:.0}-{dhi:.0}), sha256sum {f:.0} ({flo:.0}-{fhi:.0}) MiB/s",
        bytes >> 20
    );
    Ok(vec![
        Line::new(
            Figure::new("artifact_throughput.up", u, "MiB/s"),
            Figure::new("sha256sum.rate", f, "MiB/s"),
            ">= 0.5x",
        ),
        Line::new(
            Figure::new("artifact_throughput.down", d, "MiB/s"),
            Figure::new("sha256sum.rate", f, "MiB/s"),
            ">= 0.5x",
        ),
    ])
}
