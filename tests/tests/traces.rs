//! Distributed tracing end to end: the coordinator and the agent export spans over OTLP/gRPC to a real
//! OTLP receiver this test runs (the OpenTelemetry proto crate's TraceService), and one run makes one
//! trace: `run` -> `schedule`, `run` -> `job_attempt` (coordinator) -> `attempt` -> `step` (agent),
//! with the step's processes seeing the W3C `TRACEPARENT` of their step span.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_proto::v1::RunState;
use drover_tests::{Cluster, IMAGE};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

fn attr_map(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// The OTLP receiver: keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .map(|r| attr_map(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Got {
                        service: service.clone(),
                        name: s.name.clone(),
                        trace_id: hex::encode(&s.trace_id),
                        span_id: hex::encode(&s.span_id),
                        parent: hex::encode(&s.parent_span_id),
                        attributes: attr_map(&s.attributes),
                    });
                }
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Starts serving on a free loopback port; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("OTLP receiver");
        });
        format!("http://{addr}")
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// The single span named `name` from `service` (panics on none or several, listing what arrived).
fn one<'a>(spans: &'a [Got], service: &str, name: &str) -> &'a Got {
    let found: Vec<&Got> = spans
        .iter()
        .filter(|s| s.service == service && s.name == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {service} span {name:?}, got {}: {spans:#?}",
        found.len()
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_per_run_across_coordinator_agent_and_steps() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    // Agents inherit these (the harness starts them with this process's environment): the standard
    // variable is the agent's way to learn the endpoint, and a short batch delay keeps the test quick.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let cluster = Cluster::new()
        .coordinator_args(&["--otlp-endpoint", &endpoint])
        .agent("a", "os=linux")
        .start()
        .await
        .unwrap();
    let run_id = cluster
        .submit(&format!(
            r#"
jobs:
  build:
    steps:
      - name: show
        image: {IMAGE}
        commands: ['echo "tp=$TRACEPARENT"']
      - name: second
        image: {IMAGE}
        commands: ['true']
"#
        ))
        .await
        .unwrap();
    let run = cluster
        .wait_run(&run_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(run.state(), RunState::Succeeded, "{run:#?}");
    let log = String::from_utf8(cluster.log(&run_id, "build", "show").await.unwrap()).unwrap();
    let step_tp = log
        .trim()
        .strip_prefix("tp=")
        .unwrap_or_else(|| panic!("unexpected log {log:?}"))
        .to_string();

    // Spans arrive in batches; the job_attempt span closes once the result is committed.
    let wanted = [
        ("drover-coordinator", "run"),
        ("drover-coordinator", "schedule"),
        ("drover-coordinator", "job_attempt"),
        ("drover-agent", "attempt"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans = receiver.spans();
        let complete = wanted
            .iter()
            .all(|(svc, name)| spans.iter().any(|s| s.service == *svc && s.name == *name))
            && spans
                .iter()
                .filter(|s| s.service == "drover-agent" && s.name == "step")
                .count()
                == 2;
        if complete {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans missing after 30 s; received: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let root = one(&spans, "drover-coordinator", "run");
    assert!(root.parent.is_empty(), "the run span is the root: {root:?}");
    assert_eq!(root.attributes.get("run.id"), Some(&run_id));
    let trace = root.trace_id.clone();
    assert_eq!(trace.len(), 32);

    let schedule = one(&spans, "drover-coordinator", "schedule");
    let attempt_c = one(&spans, "drover-coordinator", "job_attempt");
    let attempt_a = one(&spans, "drover-agent", "attempt");
    let steps: Vec<&Got> = spans
        .iter()
        .filter(|s| s.service == "drover-agent" && s.name == "step")
        .collect();
    for s in [schedule, attempt_c, attempt_a]
        .into_iter()
        .chain(steps.iter().copied())
    {
        assert_eq!(s.trace_id, trace, "{} is in the run's trace: {s:?}", s.name);
    }
    assert_eq!(schedule.parent, root.span_id, "schedule under run");
    assert_eq!(attempt_c.parent, root.span_id, "job_attempt under run");
    assert_eq!(
        attempt_c.attributes.get("state").map(String::as_str),
        Some("succeeded")
    );
    assert_eq!(
        attempt_a.parent, attempt_c.span_id,
        "the agent's attempt continues the coordinator's job_attempt across the gRPC hop"
    );
    for s in &steps {
        assert_eq!(s.parent, attempt_a.span_id, "step under attempt: {s:?}");
        assert_eq!(
            s.attributes.get("result").map(String::as_str),
            Some("succeeded")
        );
    }
    let show = steps
        .iter()
        .find(|s| s.attributes.get("name").map(String::as_str) == Some("show"))
        .expect("a step span named show");

    // The step saw its own span as TRACEPARENT: 00-<trace>-<span>-<flags>.
    let parts: Vec<&str> = step_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "TRACEPARENT {step_tp:?}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], trace, "TRACEPARENT carries the run's trace id");
    assert_eq!(parts[2], show.span_id, "TRACEPARENT names the step's span");
}
