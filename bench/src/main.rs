//! `drover-bench`: Drover's benchmarks. Each prints one line per result, beside a floor measured in the
//! same run: `name value unit (floor X unit, ratio R, target T)`. See BENCHMARKS.md.

mod artifact_throughput;
mod cluster;
mod container_step;
mod dispatch;
mod e2e_noop;
mod echo;
mod failure_detection;
mod first_byte;
mod fleet;
mod jobs;
mod log_throughput;
mod parallelism;
mod report;
mod sim_agent;
mod store_size;
mod throughput;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The benchmarks, in the order they run.
const BENCHMARKS: [&str; 11] = [
    "failure_detection",
    "dispatch",
    "e2e_noop",
    "throughput",
    "container_step",
    "fleet",
    "store_size",
    "log_throughput",
    "first_byte",
    "artifact_throughput",
    "parallelism",
];

/// Drover's benchmarks, each beside its floor.
#[derive(Debug, Parser)]
#[command(name = "drover-bench", version)]
struct Cli {
    /// Run only this benchmark (see BENCHMARKS.md for the list).
    #[arg(long, value_name = "NAME")]
    only: Option<String>,
    /// Smaller counts, for a quick look.
    #[arg(long)]
    quick: bool,
    /// `throughput` only: jobs per load (default 3,000; 600 with --quick), e.g. a longer load to profile.
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// `throughput` only: this fleet size instead of 1, 8 and 64 agents (the open-loop run still uses 64).
    #[arg(long, value_name = "N")]
    agents: Option<usize>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The other end of the echo floor (spawned by the dispatch benchmark).
    #[command(hide = true)]
    EchoServer,
}

/// Options every benchmark reads.
#[derive(Debug, Clone)]
pub(crate) struct Opts {
    /// Smaller counts.
    pub(crate) quick: bool,
    /// `throughput`: jobs per load, when not the default.
    pub(crate) jobs: Option<usize>,
    /// `throughput`: the one fleet size to load, when not 1, 8 and 64.
    pub(crate) agents: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Cmd::EchoServer) = cli.cmd {
        return match runtime.block_on(echo::serve()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("drover-bench echo-server: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let selected: Vec<&str> = match &cli.only {
        Some(name) if BENCHMARKS.contains(&name.as_str()) => vec![name.as_str()],
        Some(name) => {
            eprintln!(
                "drover-bench: unknown benchmark {name:?}; expected one of {}",
                BENCHMARKS.join(", ")
            );
            return ExitCode::from(2);
        }
        None => BENCHMARKS.to_vec(),
    };
    let opts = Opts {
        quick: cli.quick,
        jobs: cli.jobs,
        agents: cli.agents,
    };
    let mut failed = Vec::new();
    for name in selected {
        eprintln!("==> {name}");
        match runtime.block_on(run_one(name, &opts)) {
            Ok(lines) => {
                let mut out = std::io::stdout().lock();
                for l in lines {
                    let _ = writeln!(out, "{l}");
                }
                let _ = out.flush();
            }
            Err(e) => {
                eprintln!("drover-bench: {name} failed: {e:#}");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("drover-bench: failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

async fn run_one(name: &str, opts: &Opts) -> Result<Vec<report::Line>> {
    match name {
        "failure_detection" => failure_detection::run(opts).await,
        "dispatch" => dispatch::run(opts).await,
        "e2e_noop" => e2e_noop::run(opts).await,
        "throughput" => throughput::run(opts).await,
        "container_step" => container_step::run(opts).await,
        "fleet" => fleet::run(opts).await,
        "store_size" => store_size::run(opts).await,
        "log_throughput" => log_throughput::run(opts).await,
        "first_byte" => first_byte::run(opts).await,
        "artifact_throughput" => artifact_throughput::run(opts).await,
        "parallelism" => parallelism::run(opts).await,
        other => anyhow::bail!("unknown benchmark {other:?}"),
    }
}
