//! Agent authentication from request metadata.

use tonic::Request;

use crate::engine::Engine;
use crate::error::CoordResult;

/// The agent id proven by the request's `authorization: Bearer <agent_id>.<secret>` metadata.
pub fn agent_of<T>(engine: &Engine, req: &Request<T>) -> CoordResult<String> {
    let value = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    engine.authenticate(value)
}
