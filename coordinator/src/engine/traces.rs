//! Spans of a run's trace on the coordinator: the root `run` span at submit, a `schedule` span for
//! each dispatch decision and a `job_attempt` span that lives from assignment to the attempt's end.
//! All of them are parented on the run's stored W3C trace context rather than on whatever span is
//! current, because the work of one run happens in many unrelated requests (and across restarts).
//! When tracing is off these spans still exist for the log lines but carry no trace context.

use tracing::Span;

/// The root span of a run; its context is stored as the run's trace.
pub fn run_span(run_id: &str, name: &str, jobs: usize) -> Span {
    tracing::info_span!(parent: None, "run", run.id = %run_id, run.name = %name, run.jobs = jobs)
}

/// A dispatch decision placing `job` of `run_id` on `agent`.
pub fn schedule_span(run_trace: Option<&str>, run_id: &str, job: &str, agent: &str) -> Span {
    let span =
        tracing::info_span!(parent: None, "schedule", run.id = %run_id, job = %job, agent = %agent);
    drover_telemetry::set_parent(&span, run_trace.unwrap_or_default());
    span
}

/// One attempt of `job`, from its assignment until its result (or loss); `state` is recorded at
/// the end.
pub fn attempt_span(
    run_trace: Option<&str>,
    run_id: &str,
    job: &str,
    attempt_id: &str,
    agent: &str,
    epoch: u64,
) -> Span {
    let span = tracing::info_span!(
        parent: None,
        "job_attempt",
        run.id = %run_id,
        job = %job,
        attempt.id = %attempt_id,
        agent = %agent,
        epoch,
        state = tracing::field::Empty,
    );
    drover_telemetry::set_parent(&span, run_trace.unwrap_or_default());
    span
}
