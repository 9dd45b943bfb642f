//! Thin gRPC services over the [`Engine`](crate::engine::Engine): decode, call one domain method, map
//! the error (through `From<CoordError> for Status`).

pub mod agent;
pub mod auth;
pub mod control;
pub mod guard;

pub use agent::AgentApi;
pub use control::ControlApi;
