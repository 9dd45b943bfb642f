//! Prometheus metrics of the agent, served on `--metrics-listen` (off by default).
//!
//! One process-wide registry: the counters are atomics updated where the work happens (session,
//! runner, log shipper, artifact upload), which keeps them out of every signature and costs nothing
//! when nobody scrapes.

use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Content type of [`AgentMetrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label set of the step counter: `result` (succeeded, failed, timed_out, canceled).
type ResultLabel = Vec<(String, String)>;

/// The agent's metric handles.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    jobs_running: Gauge,
    steps_finished: Family<ResultLabel, Counter>,
    step_duration: Histogram,
    log_bytes: Counter,
    artifact_bytes: Counter,
    reconnects: Counter,
}

impl AgentMetrics {
    fn new() -> Self {
        let m = AgentMetrics {
            registry: Registry::default(),
            jobs_running: Gauge::default(),
            steps_finished: Family::default(),
            // 50 ms .. ~3.6 h in ×3 steps: build steps span that range.
            step_duration: Histogram::new(exponential_buckets(0.05, 3.0, 12)),
            log_bytes: Counter::default(),
            artifact_bytes: Counter::default(),
            reconnects: Counter::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "drover_agent_jobs_running",
            "Job attempts this agent is running now",
            m.jobs_running.clone(),
        );
        registry.register(
            "drover_agent_steps_finished",
            "Steps this agent finished, by result (succeeded, failed, timed_out, canceled)",
            m.steps_finished.clone(),
        );
        registry.register(
            "drover_agent_step_duration_seconds",
            "Wall time of steps on this agent, from container start to exit",
            m.step_duration.clone(),
        );
        registry.register(
            "drover_agent_log_shipped_bytes",
            "Step log bytes sent to the coordinator (resent bytes included)",
            m.log_bytes.clone(),
        );
        registry.register(
            "drover_agent_artifact_uploaded_bytes",
            "Artifact bytes sent to the coordinator",
            m.artifact_bytes.clone(),
        );
        registry.register(
            "drover_agent_reconnects",
            "Times the session with the coordinator was lost and attached again",
            m.reconnects.clone(),
        );
        AgentMetrics { registry, ..m }
    }

    /// A job attempt started running; the guard marks its end when dropped (whatever path ends it).
    pub fn job_started(&self) -> JobGuard {
        self.jobs_running.inc();
        JobGuard(())
    }

    /// A step ended with `result` after `elapsed`.
    pub fn step_finished(&self, result: &str, elapsed: Duration) {
        self.steps_finished
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
        self.step_duration.observe(elapsed.as_secs_f64());
    }

    /// `n` log bytes went out on the log stream.
    pub fn log_shipped(&self, n: u64) {
        self.log_bytes.inc_by(n);
    }

    /// `n` artifact bytes went out.
    pub fn artifact_uploaded(&self, n: u64) {
        self.artifact_bytes.inc_by(n);
    }

    /// The session re-attached after losing the coordinator.
    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Decrements the running-jobs gauge when the attempt's task ends.
#[derive(Debug)]
pub struct JobGuard(());

impl Drop for JobGuard {
    fn drop(&mut self) {
        metrics().jobs_running.dec();
    }
}

static METRICS: LazyLock<AgentMetrics> = LazyLock::new(AgentMetrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static AgentMetrics {
    &METRICS
}

/// Binding the metrics listener failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}")]
pub struct ListenError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// Binds `addr` and serves `GET /metrics` until `shutdown`; returns the bound address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), ListenError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ListenError { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                metrics().render(),
            )
        }),
    );
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::warn!(error = %e, "the metrics listener stopped");
        }
    });
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = metrics();
        let guard = m.job_started();
        m.step_finished("succeeded", Duration::from_millis(120));
        m.log_shipped(10);
        m.artifact_uploaded(7);
        m.reconnected();
        let text = m.render();
        for name in [
            "drover_agent_jobs_running ",
            "drover_agent_steps_finished_total{result=\"succeeded\"}",
            "drover_agent_step_duration_seconds_bucket",
            "drover_agent_log_shipped_bytes_total",
            "drover_agent_artifact_uploaded_bytes_total",
            "drover_agent_reconnects_total",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        drop(guard);
    }
}
