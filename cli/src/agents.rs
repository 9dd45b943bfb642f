//! `drover agents`: the fleet as the coordinator sees it; `drover agents drain|pause|resume ID`;
//! `drover cancel RUN JOB`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use drover_proto::v1::{AgentRequest, CancelJobRequest, ListAgentsRequest};

use crate::client::Coordinator;
use crate::output::{self, OutputFormat};

/// `drover agents [COMMAND]`.
#[derive(Debug, Args)]
pub(crate) struct AgentsArgs {
    /// What to do; listing when omitted.
    #[command(subcommand)]
    action: Option<AgentsCommand>,
}

/// Subcommands of `drover agents`.
#[derive(Debug, Subcommand)]
pub(crate) enum AgentsCommand {
    /// List the agents (the default).
    List,
    /// Drain an agent: it finishes its running jobs, takes no new ones, then exits.
    Drain {
        /// Agent id.
        id: String,
    },
    /// Pause an agent: it keeps running its jobs but gets no new ones until resumed.
    Pause {
        /// Agent id.
        id: String,
    },
    /// Resume a paused or drained agent: it gets new jobs again.
    Resume {
        /// Agent id.
        id: String,
    },
    /// Revoke an agent: the coordinator refuses it from now on, ends its session and requeues its jobs.
    Revoke {
        /// Agent id.
        id: String,
    },
}

/// Runs `drover agents [list|drain|pause|resume]`.
pub(crate) async fn agents(
    url: &str,
    out: OutputFormat,
    args: AgentsArgs,
) -> anyhow::Result<ExitCode> {
    let (id, verb) = match args.action {
        None | Some(AgentsCommand::List) => return list(url, out).await,
        Some(AgentsCommand::Drain { id }) => (id, "drain"),
        Some(AgentsCommand::Pause { id }) => (id, "pause"),
        Some(AgentsCommand::Resume { id }) => (id, "resume"),
        Some(AgentsCommand::Revoke { id }) => (id, "revoke"),
    };
    let coordinator = Coordinator::connect(url).await?;
    let mut client = coordinator.client();
    let req = AgentRequest {
        agent_id: id.clone(),
    };
    let agent = match verb {
        "drain" => client.drain_agent(req).await,
        "pause" => client.pause_agent(req).await,
        "revoke" => client.revoke_agent(req).await,
        _ => client.resume_agent(req).await,
    }
    .map_err(|s| coordinator.error(s, format!("{verb} agent {id}")))?
    .into_inner();
    match out {
        OutputFormat::Text if verb == "revoke" => println!("agent {}: {}", agent.id, agent.state),
        OutputFormat::Text => println!("agent {}: {}", agent.id, agent.availability),
        OutputFormat::Json => print!("{}", output::to_json_text(&output::agent_json(&agent))),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `drover cancel RUN JOB`.
pub(crate) async fn cancel_job(url: &str, run: &str, job: &str) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let canceled = coordinator
        .client()
        .cancel_job(CancelJobRequest {
            run_id: run.to_string(),
            job: job.to_string(),
        })
        .await
        .map_err(|s| coordinator.error(s, format!("run {run} job {job:?}")))?
        .into_inner()
        .canceled;
    if canceled {
        println!("run {run}: canceled job {job}");
    } else {
        println!("run {run}: job {job} had already finished; nothing changed");
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `drover agents`.
pub(crate) async fn list(url: &str, out: OutputFormat) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let mut agents = coordinator
        .client()
        .list_agents(ListAgentsRequest {})
        .await
        .map_err(|s| coordinator.error(s, "list agents"))?
        .into_inner()
        .agents;
    // Stable order for people and diffs alike.
    agents.sort_by(|a, b| a.id.cmp(&b.id));
    match out {
        OutputFormat::Text => print!("{}", output::agents_table(&agents)),
        OutputFormat::Json => {
            let list: Vec<_> = agents.iter().map(output::agent_json).collect();
            print!("{}", output::to_json_text(&serde_json::Value::Array(list)));
        }
    }
    Ok(ExitCode::SUCCESS)
}
