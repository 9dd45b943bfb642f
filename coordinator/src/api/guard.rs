//! Role checks in front of the ControlService: one place, keyed by the gRPC method name, so no rpc can
//! be added without a decision (unknown methods need `admin`, see [`crate::access::required_role`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::Status;

use crate::access::AccessControl;

/// `inner` (a generated service server) behind the API token check.
#[derive(Debug, Clone)]
pub struct RoleGuard<S> {
    inner: S,
    access: AccessControl,
}

impl<S> RoleGuard<S> {
    /// Guard `inner` with `access`.
    pub fn new(inner: S, access: AccessControl) -> Self {
        RoleGuard { inner, access }
    }
}

impl<S: NamedService> NamedService for RoleGuard<S> {
    const NAME: &'static str = S::NAME;
}

type Fut = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for RoleGuard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Fut;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        let auth = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self.access.check(auth, method) {
            Ok(_) => Box::pin(self.inner.call(req)),
            Err(e) => {
                tracing::info!(method, "refused: {e}");
                let resp = Status::from(e).into_http::<Body>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}
