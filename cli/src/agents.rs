//! `drover agents`: the fleet as the coordinator sees it.

use std::process::ExitCode;

use drover_proto::v1::ListAgentsRequest;

use crate::client::Coordinator;
use crate::output::{self, OutputFormat};

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
