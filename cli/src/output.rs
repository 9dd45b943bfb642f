//! Tables and JSON for listings and show commands, plus the names of states and failure classes.

use std::collections::HashMap;
use std::fmt::Write as _;

use drover_proto::v1::{Agent, Artifact, FailureClass, Job, JobState, Run, RunState, Step};
use serde_json::{json, Value};

/// How listings and show commands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OutputFormat {
    /// Aligned columns for people.
    Text,
    /// One JSON document for scripts.
    Json,
}

/// Lower-case name of a job state (also used for steps).
pub(crate) fn job_state_name(state: i32) -> &'static str {
    match JobState::try_from(state).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Skipped => "skipped",
        JobState::Canceled => "canceled",
        JobState::TimedOut => "timed_out",
        JobState::Lost => "lost",
    }
}

/// Lower-case name of a run state.
pub(crate) fn run_state_name(state: i32) -> &'static str {
    match RunState::try_from(state).unwrap_or(RunState::Unspecified) {
        RunState::Unspecified => "unknown",
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Canceled => "canceled",
    }
}

/// Lower-case name of a failure class; empty for none.
pub(crate) fn failure_name(class: i32) -> &'static str {
    match FailureClass::try_from(class).unwrap_or(FailureClass::None) {
        FailureClass::None => "",
        FailureClass::Script => "script",
        FailureClass::AgentLost => "agent_lost",
        FailureClass::ImagePull => "image_pull",
        FailureClass::Docker => "docker",
        FailureClass::Oom => "oom",
        FailureClass::Timeout => "timeout",
        FailureClass::Canceled => "canceled",
        FailureClass::Infra => "infra",
        FailureClass::Policy => "policy",
    }
}

/// True once a job can no longer change.
pub(crate) fn job_is_terminal(state: i32) -> bool {
    matches!(
        JobState::try_from(state).unwrap_or(JobState::Unspecified),
        JobState::Succeeded
            | JobState::Failed
            | JobState::Skipped
            | JobState::Canceled
            | JobState::TimedOut
            | JobState::Lost
    )
}

/// `failure: reason (exit N)` in short form, empty when the job has nothing to explain.
pub(crate) fn job_outcome(job: &Job) -> String {
    let mut parts = Vec::new();
    let class = failure_name(job.failure);
    if !class.is_empty() {
        parts.push(class.to_string());
    }
    if job.failure == FailureClass::Script as i32 && job.exit_code != 0 {
        parts.push(format!("exit {}", job.exit_code));
    }
    let mut text = parts.join(", ");
    if !job.reason.is_empty() {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&job.reason);
    }
    text
}

/// Formats Unix milliseconds as UTC `YYYY-MM-DD HH:MM:SS`; `-` for 0.
pub(crate) fn format_time(ms: i64) -> String {
    if ms <= 0 {
        return "-".to_string();
    }
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant), to avoid a date crate for one column.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Formats the span between two Unix-ms instants; `-` when it has not started.
pub(crate) fn format_duration(start_ms: i64, end_ms: i64) -> String {
    if start_ms <= 0 || end_ms < start_ms {
        return "-".to_string();
    }
    let secs = (end_ms - start_ms) / 1000;
    if secs < 60 {
        format!("{}.{}s", secs, (end_ms - start_ms) % 1000 / 100)
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    }
}

/// Formats a byte count with a binary unit.
pub(crate) fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `k=v,k2=v2` with keys sorted, so output is stable.
pub(crate) fn format_labels(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = labels.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A left-aligned text table; columns are as wide as their widest cell.
#[derive(Debug, Default)]
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with this header row.
    pub(crate) fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Appends a row.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with two spaces between columns and no trailing spaces.
    pub(crate) fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let _ = write!(line, "{cell:<width$}", width = widths[i]);
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// JSON form of a step.
pub(crate) fn step_json(step: &Step) -> Value {
    json!({
        "name": step.name,
        "image": step.image,
        "state": job_state_name(step.state),
        "exit_code": step.exit_code,
        "log_bytes": step.log_bytes,
        "truncated": step.truncated,
    })
}

/// JSON form of a job.
pub(crate) fn job_json(job: &Job) -> Value {
    json!({
        "name": job.name,
        "state": job_state_name(job.state),
        "needs": job.needs,
        "agents": job.agents,
        "agent_id": job.agent_id,
        "attempt_id": job.attempt_id,
        "attempts": job.attempts,
        "failure": failure_name(job.failure),
        "reason": job.reason,
        "exit_code": job.exit_code,
        "started_ms": job.started_ms,
        "finished_ms": job.finished_ms,
        "steps": job.steps.iter().map(step_json).collect::<Vec<_>>(),
    })
}

/// JSON form of a run.
pub(crate) fn run_json(run: &Run) -> Value {
    json!({
        "id": run.id,
        "name": run.name,
        "state": run_state_name(run.state),
        "created_ms": run.created_ms,
        "finished_ms": run.finished_ms,
        "jobs": run.jobs.iter().map(job_json).collect::<Vec<_>>(),
    })
}

/// JSON form of an agent.
pub(crate) fn agent_json(agent: &Agent) -> Value {
    json!({
        "id": agent.id,
        "hostname": agent.hostname,
        "labels": agent.labels,
        "capacity": agent.capacity,
        "state": agent.state,
        "running": agent.running,
        "last_seen_ms": agent.last_seen_ms,
        "availability": agent.availability,
    })
}

/// JSON form of an artifact.
pub(crate) fn artifact_json(artifact: &Artifact) -> Value {
    json!({
        "job": artifact.job,
        "path": artifact.path,
        "digest": artifact.digest,
        "size": artifact.size,
        "mode": format!("{:o}", artifact.mode),
    })
}

/// Pretty JSON with a trailing newline.
pub(crate) fn to_json_text(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_string());
    text.push('\n');
    text
}

/// The runs listing.
pub(crate) fn runs_table(runs: &[Run]) -> String {
    let now = now_ms();
    let mut table = Table::new(&["ID", "NAME", "STATE", "JOBS", "CREATED", "DURATION"]);
    for run in runs {
        let done = run
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Succeeded as i32)
            .count();
        let end = if run.finished_ms > 0 {
            run.finished_ms
        } else {
            now
        };
        table.row(vec![
            run.id.clone(),
            run.name.clone(),
            run_state_name(run.state).to_string(),
            format!("{done}/{}", run.jobs.len()),
            format_time(run.created_ms),
            format_duration(run.created_ms, end),
        ]);
    }
    table.render()
}

/// The jobs summary of a run (also printed at the end of `run --follow`).
pub(crate) fn jobs_table(run: &Run) -> String {
    let now = now_ms();
    let mut table = Table::new(&["JOB", "STATE", "AGENT", "ATTEMPTS", "DURATION", "FAILURE"]);
    for job in &run.jobs {
        let end = if job.finished_ms > 0 {
            job.finished_ms
        } else {
            now
        };
        table.row(vec![
            job.name.clone(),
            job_state_name(job.state).to_string(),
            if job.agent_id.is_empty() {
                "-".to_string()
            } else {
                job.agent_id.clone()
            },
            job.attempts.to_string(),
            format_duration(job.started_ms, end),
            job_outcome(job),
        ]);
    }
    table.render()
}

/// A run in full: header, jobs, and each job's steps.
pub(crate) fn run_details(run: &Run) -> String {
    let now = now_ms();
    let end = if run.finished_ms > 0 {
        run.finished_ms
    } else {
        now
    };
    let mut out = String::new();
    let _ = writeln!(out, "run       {}", run.id);
    let _ = writeln!(out, "name      {}", run.name);
    let _ = writeln!(out, "state     {}", run_state_name(run.state));
    let _ = writeln!(out, "created   {}", format_time(run.created_ms));
    let _ = writeln!(out, "finished  {}", format_time(run.finished_ms));
    let _ = writeln!(out, "duration  {}", format_duration(run.created_ms, end));
    out.push('\n');
    out.push_str(&jobs_table(run));
    for job in &run.jobs {
        out.push('\n');
        let mut title = format!("job {}", job.name);
        if !job.needs.is_empty() {
            let _ = write!(title, " (needs {})", job.needs.join(", "));
        }
        if !job.attempt_id.is_empty() {
            let _ = write!(title, " attempt {}", job.attempt_id);
        }
        if job.exit_code != 0 {
            let _ = write!(title, " exit code {}", job.exit_code);
        }
        out.push_str(&title);
        out.push('\n');
        if job.steps.is_empty() {
            out.push_str("  (no steps reported)\n");
            continue;
        }
        let mut table = Table::new(&["  STEP", "STATE", "EXIT", "LOG", "IMAGE"]);
        for step in &job.steps {
            let finished = job_is_terminal(step.state);
            table.row(vec![
                format!("  {}", step.name),
                job_state_name(step.state).to_string(),
                if finished {
                    step.exit_code.to_string()
                } else {
                    "-".to_string()
                },
                if step.truncated {
                    // The log cap cut this step's output: say so where the size is shown.
                    format!("{} (truncated)", format_bytes(step.log_bytes))
                } else {
                    format_bytes(step.log_bytes)
                },
                step.image.clone(),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

/// The agents listing.
pub(crate) fn agents_table(agents: &[Agent]) -> String {
    let mut table = Table::new(&[
        "ID",
        "HOSTNAME",
        "LABELS",
        "CAPACITY",
        "STATE",
        "RUNNING",
        "LAST SEEN",
    ]);
    for agent in agents {
        table.row(vec![
            agent.id.clone(),
            agent.hostname.clone(),
            format_labels(&agent.labels),
            agent.capacity.to_string(),
            // Paused or draining agents say so; active ones (or an older coordinator) show the state alone.
            match agent.availability.as_str() {
                "" | "active" => agent.state.clone(),
                other => format!("{} ({other})", agent.state),
            },
            agent.running.len().to_string(),
            format_time(agent.last_seen_ms),
        ]);
    }
    table.render()
}

/// The artifacts listing.
pub(crate) fn artifacts_table(artifacts: &[Artifact]) -> String {
    let mut table = Table::new(&["JOB", "PATH", "SIZE", "MODE", "SHA256"]);
    for a in artifacts {
        table.row(vec![
            a.job.clone(),
            a.path.clone(),
            format_bytes(a.size),
            format!("{:o}", a.mode & 0o7777),
            a.digest.clone(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_is_utc_calendar() {
        assert_eq!(format_time(0), "-");
        assert_eq!(format_time(86_400_000), "1970-01-02 00:00:00");
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(format_time(1_709_210_096_000), "2024-02-29 12:34:56");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(format_duration(0, 5), "-");
        assert_eq!(format_duration(1000, 3500), "2.5s");
        assert_eq!(format_duration(1000, 1000 + 125_000), "2m05s");
        assert_eq!(format_duration(1, 1 + 3_720_000), "1h02m");
        assert_eq!(format_bytes(12), "12 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        assert_eq!(t.render(), "A          LONGER\nwide cell  x\n");
    }

    #[test]
    fn job_outcome_names_class_exit_and_reason() {
        let job = Job {
            name: "build".into(),
            state: JobState::Failed as i32,
            failure: FailureClass::Script as i32,
            exit_code: 3,
            reason: "step compile exited 3".into(),
            ..Default::default()
        };
        assert_eq!(job_outcome(&job), "script, exit 3: step compile exited 3");
        assert_eq!(job_outcome(&Job::default()), "");
    }

    #[test]
    fn run_json_uses_names_not_numbers() {
        let run = Run {
            id: "r1".into(),
            state: RunState::Failed as i32,
            jobs: vec![Job {
                name: "build".into(),
                state: JobState::Lost as i32,
                failure: FailureClass::AgentLost as i32,
                steps: vec![Step {
                    name: "s".into(),
                    state: JobState::Succeeded as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let v = run_json(&run);
        assert_eq!(v["state"], "failed");
        assert_eq!(v["jobs"][0]["state"], "lost");
        assert_eq!(v["jobs"][0]["failure"], "agent_lost");
        assert_eq!(v["jobs"][0]["steps"][0]["state"], "succeeded");
        let text = run_details(&run);
        assert!(text.contains("agent_lost"), "{text}");
        assert!(text.contains("job build"), "{text}");
    }
}
