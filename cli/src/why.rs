//! `drover why RUN JOB`: why a job is not running yet, and what would let it run.

use std::process::ExitCode;

use drover_proto::v1::{AgentFit, ExplainJobRequest, ExplainJobResponse};
use serde_json::{json, Value};

use crate::client::Coordinator;
use crate::output::{self, OutputFormat, Table};

/// Runs `drover why RUN JOB`.
pub(crate) async fn why(
    url: &str,
    out: OutputFormat,
    run: &str,
    job: &str,
) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let explained = coordinator
        .client()
        .explain_job(ExplainJobRequest {
            run_id: run.to_string(),
            job: job.to_string(),
        })
        .await
        .map_err(|s| coordinator.error(s, format!("job {job} of run {run}")))?
        .into_inner();
    match out {
        OutputFormat::Text => print!("{}", explain_text(&explained)),
        OutputFormat::Json => print!("{}", output::to_json_text(&explain_json(&explained))),
    }
    Ok(ExitCode::SUCCESS)
}

/// "yes", or the mismatches (or why it can never take work) in one cell.
fn fit_cell(fit: &AgentFit) -> String {
    if fit.revoked {
        return "no (revoked)".to_string();
    }
    if fit.matches {
        "yes".to_string()
    } else if fit.mismatches.is_empty() {
        "no".to_string()
    } else {
        format!("no: {}", fit.mismatches.join("; "))
    }
}

/// The human form: verdict and remedy first (what people came for), then the details.
pub(crate) fn explain_text(e: &ExplainJobResponse) -> String {
    let mut text = format!(
        "job {} of run {}: {}\n",
        e.job,
        e.run_id,
        output::job_state_name(e.state)
    );
    text.push_str(&format!("verdict: {}\n", e.verdict));
    if !e.remedy.is_empty() {
        text.push_str(&format!("remedy:  {}\n", e.remedy));
    }
    if e.waiting_on_needs || !e.unfinished_needs.is_empty() {
        let needs = if e.unfinished_needs.is_empty() {
            "-".to_string()
        } else {
            e.unfinished_needs.join(", ")
        };
        text.push_str(&format!("waiting on: {needs}\n"));
    }
    let selector = output::format_labels(&e.selector);
    text.push_str(&format!(
        "selector: {}\n",
        if selector.is_empty() {
            "(any agent)"
        } else {
            &selector
        }
    ));
    if e.queue_position > 0 {
        text.push_str(&format!(
            "place in line: {} (of {} queued in total)\n",
            e.queue_position, e.queue_length
        ));
    } else {
        text.push_str(&format!("queued jobs in total: {}\n", e.queue_length));
    }
    if !e.agents.is_empty() {
        let mut agents: Vec<&AgentFit> = e.agents.iter().collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        let mut table = Table::new(&[
            "AGENT",
            "HOST",
            "MATCHES",
            "CONNECTED",
            "FREE/CAP",
            "BUSY WITH",
        ]);
        for fit in agents {
            table.row(vec![
                fit.agent_id.clone(),
                fit.hostname.clone(),
                fit_cell(fit),
                if fit.connected { "yes" } else { "no" }.to_string(),
                format!("{}/{}", fit.free, fit.capacity),
                if fit.busy_with.is_empty() {
                    "-".to_string()
                } else {
                    fit.busy_with.join(", ")
                },
            ]);
        }
        text.push('\n');
        text.push_str(&table.render());
    }
    text
}

/// The JSON form, field for field.
pub(crate) fn explain_json(e: &ExplainJobResponse) -> Value {
    let agents: Vec<Value> = e
        .agents
        .iter()
        .map(|fit| {
            json!({
                "agent_id": fit.agent_id,
                "hostname": fit.hostname,
                "matches": fit.matches,
                "mismatches": fit.mismatches,
                "connected": fit.connected,
                "revoked": fit.revoked,
                "capacity": fit.capacity,
                "free": fit.free,
                "busy_with": fit.busy_with,
            })
        })
        .collect();
    let mut selector: Vec<_> = e.selector.iter().collect();
    selector.sort();
    json!({
        "run_id": e.run_id,
        "job": e.job,
        "state": output::job_state_name(e.state),
        "verdict": e.verdict,
        "remedy": e.remedy,
        "waiting_on_needs": e.waiting_on_needs,
        "unfinished_needs": e.unfinished_needs,
        "selector": selector.into_iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
        "queue_position": e.queue_position,
        "queue_length": e.queue_length,
        "agents": agents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_proto::v1::JobState;

    fn sample() -> ExplainJobResponse {
        ExplainJobResponse {
            run_id: "r-1".into(),
            job: "build".into(),
            state: JobState::Queued as i32,
            waiting_on_needs: false,
            unfinished_needs: vec![],
            selector: [("queue".to_string(), "gpu".to_string())].into(),
            queue_position: 2,
            queue_length: 5,
            agents: vec![
                AgentFit {
                    agent_id: "a-2".into(),
                    hostname: "h2".into(),
                    matches: false,
                    mismatches: vec!["queue=gpu (agent has queue=cpu)".into()],
                    connected: true,
                    revoked: false,
                    capacity: 2,
                    free: 2,
                    busy_with: vec![],
                },
                AgentFit {
                    agent_id: "a-1".into(),
                    hostname: "h1".into(),
                    matches: true,
                    mismatches: vec![],
                    connected: true,
                    revoked: false,
                    capacity: 1,
                    free: 0,
                    busy_with: vec!["r-0/test (attempt t-1)".into()],
                },
            ],
            verdict: "every matching agent is busy".into(),
            remedy: "wait, or add an agent with queue=gpu".into(),
        }
    }

    #[test]
    fn text_has_verdict_remedy_place_and_one_row_per_agent() {
        let text = explain_text(&sample());
        assert!(text.starts_with("job build of run r-1: queued\n"), "{text}");
        assert!(text.contains("verdict: every matching agent is busy"));
        assert!(text.contains("remedy:  wait, or add an agent with queue=gpu"));
        assert!(text.contains("selector: queue=gpu"));
        assert!(text.contains("place in line: 2 (of 5 queued in total)"));
        let rows: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("AGENT"))
            .collect();
        assert_eq!(rows.len(), 3, "{text}");
        // Sorted by id; busy agent shows what it runs, the other why it does not match.
        assert!(
            rows[1].starts_with("a-1") && rows[1].contains("0/1") && rows[1].contains("r-0/test")
        );
        assert!(
            rows[2].starts_with("a-2") && rows[2].contains("no: queue=gpu (agent has queue=cpu)")
        );
    }

    #[test]
    fn waiting_on_needs_is_listed() {
        let mut e = sample();
        e.waiting_on_needs = true;
        e.unfinished_needs = vec!["compile (running)".into()];
        e.queue_position = 0;
        e.agents.clear();
        let text = explain_text(&e);
        assert!(text.contains("waiting on: compile (running)"), "{text}");
        assert!(!text.contains("AGENT"));
    }

    #[test]
    fn json_carries_every_field() {
        let v = explain_json(&sample());
        assert_eq!(v["state"], "queued");
        assert_eq!(v["queue_position"], 2);
        assert_eq!(v["selector"]["queue"], "gpu");
        assert_eq!(v["agents"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["agents"][1]["busy_with"][0], "r-0/test (attempt t-1)");
    }
}
