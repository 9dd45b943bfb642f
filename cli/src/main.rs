//! `drover`: submit pipelines, follow their logs, fetch artifacts and operate the fleet.
//!
//! `main` only parses arguments and dispatches; each command group lives in its own module and
//! returns the process exit code, so that "the run failed" (exit 1) and "the pipeline is invalid"
//! (exit 2) are outcomes rather than errors. Real errors are printed as one line, `drover: ...`.

mod agents;
mod artifacts;
mod caches;
mod client;
mod completion;
mod context;
mod follow;
mod logs;
mod output;
mod progress;
mod runs;
mod secrets;
mod settings;
mod timestamps;
mod tokens;
mod validate;
mod why;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::output::OutputFormat;

/// The drover command line.
#[derive(Debug, Parser)]
#[command(
    name = "drover",
    version = drover_proto::VERSION,
    about = "Submit pipelines to a Drover coordinator, follow their logs, fetch artifacts, operate the fleet"
)]
pub(crate) struct Cli {
    /// Coordinator address (http://HOST:PORT).
    #[arg(
        long,
        global = true,
        env = "DROVER_COORDINATOR",
        default_value = drover_proto::DEFAULT_COORDINATOR,
        value_name = "URL"
    )]
    coordinator: String,

    /// Output format of listings and show commands.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,

    /// API token (else `token` in ~/.config/drover/config.toml).
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// CA certificate (PEM) to trust for an https:// coordinator, e.g. its `<data>/tls/ca.pem`.
    #[arg(long, global = true, env = "DROVER_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Check a pipeline file without creating anything.
    Validate {
        /// Pipeline YAML file.
        file: PathBuf,
    },
    /// Submit a pipeline (`drover run FILE`), or show a run (`drover run show ID`).
    Run(RunArgs),
    /// Show a run with its jobs and steps (same as `drover run show ID`).
    Show {
        /// Run id.
        id: String,
    },
    /// List recent runs, newest first.
    Runs {
        /// At most this many runs.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print a job's step logs, raw, to stdout.
    Logs(logs::LogsArgs),
    /// Cancel a run's unfinished jobs, or one job of it (`drover cancel RUN JOB`).
    Cancel {
        /// Run id.
        run: String,
        /// Job name: cancel only this job (jobs needing it are skipped).
        job: Option<String>,
    },
    /// List and download artifacts.
    #[command(subcommand)]
    Artifacts(artifacts::ArtifactsCommand),
    /// List the agents known to the coordinator (`drover agents [list]`), or drain, pause or
    /// resume one.
    Agents(agents::AgentsArgs),
    /// Manage tokens: create enrollment and API tokens, list them, revoke them.
    #[command(subcommand)]
    Tokens(tokens::TokensCommand),
    /// Manage secrets pipelines name in `secrets:` (set from stdin, list, delete; admin token).
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// List and delete job caches (`cache:` in pipelines).
    #[command(subcommand)]
    Caches(caches::CachesCommand),
    /// Explain why a job is not running yet: verdict, remedy, needs, place in line, every agent's fit.
    Why {
        /// Run id.
        run: String,
        /// Job name.
        job: String,
    },
    /// Print a shell completion script (bash, zsh or fish) to stdout.
    Completion {
        /// Shell to complete for.
        #[arg(value_enum)]
        shell: completion::CompletionShell,
    },
}

/// `drover run`: either the submit form (a FILE) or the `show` subcommand.
///
/// `args_conflicts_with_subcommands` makes clap try the subcommand name first, so `drover run show ID`
/// is the show form while `drover run show.yaml` (or `./show`) is a file to submit.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    disable_help_subcommand = true
)]
struct RunArgs {
    #[command(subcommand)]
    action: Option<RunAction>,

    #[command(flatten)]
    submit: SubmitArgs,
}

/// Subcommands of `drover run`.
#[derive(Debug, Subcommand)]
enum RunAction {
    /// Show a run with its jobs and steps.
    Show {
        /// Run id.
        id: String,
    },
}

/// Arguments of `drover run FILE`.
#[derive(Debug, Args)]
pub(crate) struct SubmitArgs {
    /// Pipeline YAML file.
    #[arg(required = true)]
    pub(crate) file: Option<PathBuf>,
    /// Directory to upload as the run's source tree (honours `.droverignore`).
    #[arg(long, value_name = "DIR")]
    pub(crate) context: Option<PathBuf>,
    /// Name shown for the run (default: the pipeline file name).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Stream every job's logs until the run finishes; exit 0 only if it succeeded.
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
}

fn main() -> ExitCode {
    // One TLS crypto provider for the whole process, chosen here rather than by feature unification.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("drover: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("drover: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command line.
async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = match settings::config_path() {
        Some(p) => settings::read_file(&p)?,
        None => settings::FileSettings::default(),
    };
    settings::set(settings::ConnectSettings {
        token: cli
            .token
            .clone()
            .or(file.token)
            .filter(|t| !t.trim().is_empty()),
        ca_file: cli.ca_file.clone().or(file.ca_file),
    });
    // The flag has a default, so the file's coordinator applies only when neither flag nor env chose one.
    let url = match file.coordinator {
        Some(u)
            if cli.coordinator == drover_proto::DEFAULT_COORDINATOR
                && std::env::var_os("DROVER_COORDINATOR").is_none() =>
        {
            u
        }
        _ => cli.coordinator,
    };
    let out = cli.output;
    match cli.command {
        Command::Validate { file } => validate::validate(&url, &file).await,
        Command::Run(RunArgs {
            action: Some(RunAction::Show { id }),
            ..
        })
        | Command::Show { id } => runs::show(&url, out, &id).await,
        Command::Run(RunArgs {
            action: None,
            submit,
        }) => runs::submit(&url, &submit).await,
        Command::Runs { limit } => runs::list(&url, out, limit).await,
        Command::Logs(args) => logs::logs(&url, &args).await,
        Command::Cancel { run, job: None } => runs::cancel(&url, &run).await,
        Command::Cancel {
            run,
            job: Some(job),
        } => agents::cancel_job(&url, &run, &job).await,
        Command::Artifacts(cmd) => artifacts::artifacts(&url, out, cmd).await,
        Command::Agents(args) => agents::agents(&url, out, args).await,
        Command::Tokens(cmd) => tokens::tokens(&url, out, cmd).await,
        Command::Secrets(cmd) => secrets::secrets(&url, out, cmd).await,
        Command::Caches(cmd) => caches::caches(&url, out, cmd).await,
        Command::Why { run, job } => why::why(&url, out, &run, &job).await,
        Command::Completion { shell } => completion::completion(shell),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("drover").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_file_is_the_submit_form() {
        let cli = parse(&["run", "pipeline.yaml", "--context", "src", "--follow"]).unwrap();
        match cli.command {
            Command::Run(RunArgs {
                action: None,
                submit,
            }) => {
                assert_eq!(submit.file, Some(PathBuf::from("pipeline.yaml")));
                assert_eq!(submit.context, Some(PathBuf::from("src")));
                assert!(submit.follow);
                assert_eq!(submit.name, None);
            }
            other => panic!("expected submit, got {other:?}"),
        }
    }

    #[test]
    fn run_show_id_is_the_show_form() {
        let cli = parse(&["run", "show", "r-123"]).unwrap();
        match cli.command {
            Command::Run(RunArgs {
                action: Some(RunAction::Show { id }),
                ..
            }) => assert_eq!(id, "r-123"),
            other => panic!("expected run show, got {other:?}"),
        }
    }

    #[test]
    fn a_file_named_like_show_is_still_a_file() {
        let cli = parse(&["run", "show.yaml"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Run(RunArgs { action: None, submit }) if submit.file == Some(PathBuf::from("show.yaml"))
        ));
    }

    #[test]
    fn run_without_file_is_an_error() {
        assert!(parse(&["run"]).is_err());
        assert!(parse(&["run", "show"]).is_err());
        // Submit flags do not mix with the show form.
        assert!(parse(&["run", "--follow", "show", "r-1"]).is_err());
    }

    #[test]
    fn top_level_show_alias() {
        let cli = parse(&["show", "r-9", "--output", "json"]).unwrap();
        assert!(matches!(cli.command, Command::Show { ref id } if id == "r-9"));
        assert_eq!(cli.output, OutputFormat::Json);
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse(&["runs", "--coordinator", "http://h:1", "--limit", "5"]).unwrap();
        assert_eq!(cli.coordinator, "http://h:1");
        assert!(matches!(cli.command, Command::Runs { limit: 5 }));
    }

    #[test]
    fn logs_arguments() {
        let cli = parse(&[
            "logs", "r1", "build", "compile", "--follow", "--offset", "10",
        ])
        .unwrap();
        match cli.command {
            Command::Logs(a) => {
                assert_eq!((a.run.as_str(), a.job.as_str()), ("r1", "build"));
                assert_eq!(a.step.as_deref(), Some("compile"));
                assert!(a.follow);
                assert_eq!(a.offset, 10);
            }
            other => panic!("expected logs, got {other:?}"),
        }
    }

    #[test]
    fn artifacts_get_requires_output() {
        assert!(parse(&["artifacts", "get", "r1", "build", "out/bin"]).is_err());
        let cli = parse(&["artifacts", "get", "r1", "build", "out/bin", "-o", "-"]).unwrap();
        assert!(matches!(cli.command, Command::Artifacts(_)));
    }

    #[test]
    fn tokens_create_parses_ttl_and_labels() {
        let cli = parse(&[
            "tokens",
            "create",
            "--uses",
            "3",
            "--ttl",
            "2h",
            "--labels",
            "os=linux,arch=amd64",
        ])
        .unwrap();
        match cli.command {
            Command::Tokens(tokens::TokensCommand::Create(c)) => {
                assert_eq!(c.uses, 3);
                assert_eq!(c.ttl.0, 7200);
                assert_eq!(c.labels.len(), 2);
            }
            other => panic!("expected tokens create, got {other:?}"),
        }
        assert!(parse(&["tokens", "create", "--ttl", "soon"]).is_err());
        assert!(parse(&["tokens", "create", "--labels", "novalue"]).is_err());
    }
}
