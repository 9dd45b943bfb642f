//! Logging and tracing shared by the coordinator and the agent.
//!
//! [`init`] installs one `tracing` subscriber: log lines on stderr (text or JSON) and, when an OTLP
//! endpoint is configured, an OpenTelemetry layer exporting spans over OTLP/gRPC (tonic, the same
//! version as the rest of Drover). Spans cross process boundaries as W3C `traceparent` strings:
//! [`traceparent`] renders a span's context, [`set_parent`] makes a span the child of one received.
//! Without an endpoint no OpenTelemetry layer exists, [`traceparent`] returns `None`, and nothing
//! is exported.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// The W3C trace context header and environment variable name.
pub const TRACEPARENT: &str = "traceparent";

/// How long one OTLP export may take before it is abandoned.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Setting up telemetry failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint URL and the like).
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The endpoint given.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// A global subscriber was already installed.
    #[error("cannot install the tracing subscriber: {0}")]
    Subscriber(String),
}

/// What [`init`] sets up.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans (`drover-coordinator`, `drover-agent`).
    pub service: &'static str,
    /// Log lines as JSON objects instead of text.
    pub json_logs: bool,
    /// OTLP/gRPC endpoint such as `http://127.0.0.1:4317`; `None` exports nothing.
    pub otlp_endpoint: Option<String>,
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes spans not yet exported.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered and stops the exporter. Blocks (the batch processor has its own
    /// thread); call it from `spawn_blocking` or after the runtime's work is done.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry: flushing spans at exit failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filtering (default `info`) for log lines, plus the
/// OpenTelemetry layer when `cfg.otlp_endpoint` is set. Must run inside a Tokio runtime when
/// exporting (the gRPC channel lives on it).
pub fn init(cfg: TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if cfg.json_logs {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter())
            .boxed()
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_filter(filter())
            .boxed()
    };
    let (otel, provider) = match cfg.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        None => (None, None),
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(EXPORT_TIMEOUT)
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    endpoint: endpoint.to_string(),
                    message: e.to_string(),
                })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(cfg.service).build())
                .build();
            let tracer = provider.tracer(cfg.service);
            // Only Drover's own spans: library internals (h2, tonic, hyper) would drown them and
            // the exporter's own requests must not trace themselves.
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                    meta.target().starts_with("drover")
                }));
            (Some(layer), Some(provider))
        }
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(Telemetry { provider })
}

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), or `None` when it is not
/// traced (no exporter, or the span is disabled).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    // Without an exporter every span's context is invalid: say so before building a propagator and a
    // map for nothing (this runs on every submitted run).
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT).filter(|v| !v.is_empty())
}

/// Makes `span` a child of the remote span `traceparent` (ignored when empty or malformed, so a
/// bad header never breaks the work it describes). Call before the span is first entered.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier: HashMap<String, String> =
        HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    // Fails only when the span is disabled or already started; either way there is nothing to link.
    let _ = span.set_parent(cx);
}

/// The trace id (32 hex digits) of a `traceparent`, if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_of_a_traceparent() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id(""), None);
    }

    #[test]
    fn untraced_spans_have_no_traceparent() {
        // No subscriber with an OpenTelemetry layer here: nothing to propagate.
        let span = tracing::info_span!("x");
        assert_eq!(traceparent(&span), None);
        set_parent(&span, "garbage");
        set_parent(&span, "");
    }
}
