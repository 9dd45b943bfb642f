//! The coordinator's HTTP side, for operators: probes (`/healthz`, `/readyz`), Prometheus `/metrics`, and
//! the dashboard (`/`, its embedded assets and its JSON and log-streaming endpoints under `/api/`).
//!
//! Handlers are thin: they read from the [`Engine`] and shape the answer; the dashboard's JSON views live
//! in [`dashboard`], the metrics in [`metrics`].
//!
//! Access: everything under `/api/` needs `authorization: Bearer TOKEN` with an API token of role `read`
//! or higher (the ControlService's tokens); `/metrics` is open to clients on loopback and needs such a
//! token from anywhere else; the probes, the page and its assets (which hold no data) are open.

pub mod dashboard;
pub mod metrics;

use std::convert::Infallible;
use std::future::Future;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use drover_proto::v1 as pb;
use futures::StreamExt;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use std::net::SocketAddr;

use crate::access::{AccessControl, Role};
use crate::engine::{now_ms, Engine};
use crate::error::CoordError;

/// The HTTP routes over `engine`, with `access` deciding who reads the API and the metrics.
pub fn router(engine: Engine, access: AccessControl) -> Router {
    let api = Router::new()
        .route("/api/runs", get(dashboard::runs))
        .route("/api/run/{id}", get(dashboard::run))
        .route("/api/agents", get(dashboard::agents))
        .route("/api/queue", get(dashboard::queue))
        .route("/api/explain/{run}/{job}", get(dashboard::explain))
        .route("/api/logs/{run}/{job}/{step}", get(logs))
        .route_layer(middleware::from_fn_with_state(access.clone(), require_read));
    let metrics = Router::new()
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(access, metrics_access));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/", get(dashboard::index))
        .route("/assets/dashboard.css", get(dashboard::css))
        .route("/assets/dashboard.js", get(dashboard::js))
        .merge(api)
        .merge(metrics)
        .with_state(engine)
}

/// Serve the routes on `listener` until `shutdown` completes. Open log streams end when the engine
/// closes (they watch [`Engine::closing`]), so a graceful shutdown does not hang on them.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    access: AccessControl,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(engine, access).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The request's bearer token checked for role `read`.
fn check_read(access: &AccessControl, req: &Request) -> Result<(), CoordError> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    access
        .check_role(auth, Role::Read, &format!("GET {}", req.uri().path()))
        .map(|_| ())
}

/// 401/403 with the reason and a `WWW-Authenticate: Bearer` challenge.
fn refusal(e: CoordError) -> Response {
    let mut resp = HttpError::from(e).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"drover\""),
    );
    resp
}

async fn require_read(State(access): State<AccessControl>, req: Request, next: Next) -> Response {
    match check_read(&access, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => refusal(e),
    }
}

/// `/metrics`: open to a scraper on loopback (the default listener is loopback only); from any other
/// address it needs a read token, which Prometheus sends with `authorization: {credentials: ...}`.
async fn metrics_access(State(access): State<AccessControl>, req: Request, next: Next) -> Response {
    let loopback = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback());
    if loopback {
        return next.run(req).await;
    }
    match check_read(&access, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => refusal(e),
    }
}

/// An error answer: status and a one-line plain-text message.
#[derive(Debug)]
pub struct HttpError(StatusCode, String);

impl From<CoordError> for HttpError {
    fn from(e: CoordError) -> Self {
        let code = match &e {
            CoordError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            CoordError::NotFound(_) => StatusCode::NOT_FOUND,
            CoordError::FailedPrecondition(_) => StatusCode::CONFLICT,
            CoordError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            CoordError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            CoordError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            CoordError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        HttpError(code, e.to_string())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.0, format!("{}\n", self.1)).into_response()
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(engine): State<Engine>) -> Response {
    match engine.ready().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

async fn metrics_text(State(engine): State<Engine>) -> Response {
    let fleet = engine.fleet_view();
    // Shown only once durable (a failed store shows up on /readyz; the figures are still worth showing).
    let _ = engine.settled().await;
    let body = engine.metrics().render(&fleet, engine.pace(), now_ms());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

/// Query of the log endpoint.
#[derive(Debug, Deserialize)]
pub struct LogQuery {
    /// Start at this byte offset of the step's log.
    #[serde(default)]
    pub offset: u64,
    /// `1`/`true`: keep streaming until the log is complete.
    #[serde(default)]
    pub follow: Option<String>,
}

/// `GET /api/logs/{run}/{job}/{step}?offset=N&follow=1`: the step's raw log bytes from `offset`; with
/// `follow`, the response stays open and carries bytes as they are stored, until the log is complete.
async fn logs(
    State(engine): State<Engine>,
    Path((run, job, step)): Path<(String, String, String)>,
    Query(q): Query<LogQuery>,
) -> Result<Response, HttpError> {
    let follow = match q.follow.as_deref() {
        None | Some("") | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(other) => {
            return Err(HttpError(
                StatusCode::BAD_REQUEST,
                format!("follow={other:?}: expected 1 or 0"),
            ))
        }
    };
    let rx = crate::api::control::start_follow_logs(
        &engine,
        pb::FollowLogsRequest {
            run_id: run,
            job,
            step,
            offset: q.offset,
            follow,
            ..Default::default()
        },
    )
    .await?;
    let body = ReceiverStream::new(rx).filter_map(|ev| async move {
        match ev {
            Ok(ev) if ev.data.is_empty() => None,
            Ok(ev) => Some(Ok::<_, Infallible>(Bytes::from(ev.data))),
            // The status line is already sent: say it in the body, where the reader looks.
            Err(status) => Some(Ok(Bytes::from(format!(
                "\n[drover] log stream failed: {}\n",
                status.message()
            )))),
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}
