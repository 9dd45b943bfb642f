//! `fleet`: thousands of idle simulated agents attached to one coordinator in its default configuration
//! (base heartbeat 2 s, stretched by the coordinator as the fleet grows past its heartbeat rate); the
//! coordinator's resident memory and CPU, beside the same coordinator with no agent, and the heartbeat
//! interval and rate the fleet settled at.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cluster::Coordinator;
use crate::report::{Figure, Line};
use crate::sim_agent::{start_many, SimReport};
use crate::Opts;

/// Window over which idle CPU is measured.
const CPU_WINDOW: Duration = Duration::from_secs(10);

/// The coordinator's default heartbeat interval for a small fleet.
const BASE_HEARTBEAT: Duration = Duration::from_secs(2);

/// Enrollments and attaches in flight at once.
const PARALLEL_ATTACH: usize = 64;

/// File descriptors kept free for everything but the agents' sockets.
const FD_MARGIN: u64 = 512;

/// The benchmark.
pub(crate) async fn run(opts: &Opts) -> Result<Vec<Line>> {
    let wanted = if opts.quick { 500 } else { 10_000 };
    let fds = open_files_limit()?;
    let n = if (wanted as u64) + FD_MARGIN <= fds {
        wanted
    } else {
        let fallback = if opts.quick { 500 } else { 2_000 };
        eprintln!(
            "fleet: the open-files limit is {fds}; {wanted} agents need {} (raise it with `ulimit -n`); using {fallback}",
            wanted as u64 + FD_MARGIN
        );
        fallback
    };
    if (n as u64) + FD_MARGIN > fds {
        bail!("the open-files limit {fds} is too low for {n} agents: raise it with `ulimit -n`");
    }
    let clk_tck = clock_ticks_per_second().await;
    // The defaults: what a user gets without tuning anything.
    let coord = Coordinator::start(&[]).await?;
    let pid = coord.pid()?;

    // The floor: the same coordinator before any agent exists.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = rss_mib(pid)?;
    let (cpu0, _) = cpu_percent(pid, clk_tck).await?;

    let t0 = Instant::now();
    let token = coord.token(n as u32).await?;
    let report = SimReport::default();
    let mut fleet = start_many(&coord.url, &token, n, PARALLEL_ATTACH, report.clone())
        .await
        .with_context(|| format!("attaching {n} agents; coordinator said:\n{}", coord.tail()))?;
    eprintln!(
        "fleet: {n} agents attached in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // Let the attach burst settle into the steady heartbeat rhythm: every agent hears the interval the
    // coordinator paces the fleet to at its next heartbeat, and keeps it from then on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let told = || Duration::from_millis(report.heartbeat_interval_ms.load(Ordering::Relaxed));
    tokio::time::sleep(told() * 2).await;
    let interval = told();
    let beats0 = report.heartbeats.load(Ordering::Relaxed);
    let (cpu, window) = cpu_percent(pid, clk_tck).await?;
    let beats = report.heartbeats.load(Ordering::Relaxed) - beats0;
    let rate = beats as f64 / window.as_secs_f64();
    eprintln!(
        "fleet: heartbeat interval {:.2} s (base 2 s), {rate:.0} heartbeats/s over the CPU window",
        interval.as_secs_f64()
    );
    if told() != interval {
        bail!(
            "the heartbeat interval changed during the measurement ({interval:?} -> {:?})",
            told()
        );
    }
    let rss = rss_mib(pid)?;
    for a in &mut fleet {
        a.check_alive()?;
    }
    Ok(vec![
        Line::new(
            Figure::new(format!("fleet.{n}_agents.rss"), rss, "MiB"),
            Figure::new("fleet.0_agents.rss", rss0, "MiB"),
            "<= 500 MiB",
        ),
        Line::new(
            Figure::new(format!("fleet.{n}_agents.cpu"), cpu, "%"),
            Figure::new("fleet.0_agents.cpu", cpu0, "%"),
            "<= 5 %",
        ),
        Line::new(
            Figure::secs(format!("fleet.{n}_agents.heartbeat_interval"), interval),
            Figure::secs("fleet.base_heartbeat_interval", BASE_HEARTBEAT),
            "n/a (the coordinator's default pacing)",
        ),
        Line::new(
            Figure::new(format!("fleet.{n}_agents.heartbeat_rate"), rate, "/s"),
            Figure::new(
                "fleet.base_heartbeat_rate",
                n as f64 / BASE_HEARTBEAT.as_secs_f64(),
                "/s",
            ),
            "n/a",
        ),
    ])
}

/// This process's soft RLIMIT_NOFILE (inherited by the coordinator it spawns).
fn open_files_limit() -> Result<u64> {
    let limits =
        std::fs::read_to_string("/proc/self/limits").context("reading /proc/self/limits")?;
    parse_open_files(&limits).context("no `Max open files` in /proc/self/limits")
}

fn parse_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Resident memory of `pid` in MiB (VmRSS of /proc/PID/status).
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = parse_vmrss_kib(&status).context("no VmRSS in the coordinator's status")?;
    Ok(kib as f64 / 1024.0)
}

fn parse_vmrss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/PID/stat).
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_cpu_ticks(&stat).context("malformed /proc/PID/stat")
}

/// The whole machine's CPU time so far, in clock ticks: (busy, idle), from the first line of
/// `/proc/stat` (busy: user, nice, system, irq, softirq, steal; idle: idle, iowait).
pub(crate) fn machine_ticks() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_ticks(&stat).context("malformed /proc/stat")
}

fn parse_machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied();
    let busy = at(0)? + at(1)? + at(2)? + at(5)? + at(6)? + at(7).unwrap_or(0);
    Some((busy, at(3)? + at(4)?))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU used by `pid` over [`CPU_WINDOW`], in percent of one core, and the window's exact length.
async fn cpu_percent(pid: u32, clk_tck: f64) -> Result<(f64, Duration)> {
    let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
    tokio::time::sleep(CPU_WINDOW).await;
    let (t1, c1) = (Instant::now(), cpu_ticks(pid)?);
    let secs = c1.saturating_sub(c0) as f64 / clk_tck;
    Ok((100.0 * secs / (t1 - t0).as_secs_f64(), t1 - t0))
}

/// `getconf CLK_TCK` (100 on Linux unless configured otherwise).
pub(crate) async fn clock_ticks_per_second() -> f64 {
    let out = tokio::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .await;
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (drover (co)rd) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 12 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let machine = "cpu  100 5 50 800 20 3 2 1 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        assert_eq!(parse_machine_ticks(machine), Some((161, 820)));
        assert_eq!(parse_machine_ticks("intr 1 2 3"), None);
        let status = "Name:\tdrover\nVmPeak:\t  9000 kB\nVmRSS:\t  20480 kB\n";
        assert_eq!(parse_vmrss_kib(status), Some(20480));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_open_files(limits), Some(20000));
    }

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_mib(pid).unwrap() > 0.0);
        cpu_ticks(pid).unwrap();
        assert!(open_files_limit().unwrap() > 0);
    }
}
