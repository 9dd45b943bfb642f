//! Agent authentication from request metadata, and the client certificate when mutual TLS is on.

use tonic::Request;

use crate::engine::Engine;
use crate::error::CoordResult;
use crate::mtls::AgentCa;

/// The agent id proven by the request's `authorization: Bearer <agent_id>.<secret>` metadata and, with
/// mutual TLS (`mtls`), by the client certificate of the connection, which must name the same agent.
/// A revoked agent is refused whatever it presents: its credential no longer authenticates.
pub fn agent_of<T>(
    engine: &Engine,
    mtls: Option<&AgentCa>,
    req: &Request<T>,
) -> CoordResult<String> {
    let value = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    let agent_id = engine.authenticate(value)?;
    if let Some(ca) = mtls {
        let certs = req.peer_certs();
        ca.check_peer(certs.as_ref().map(|c| c.as_slice()), &agent_id)?;
    }
    Ok(agent_id)
}
