//! Drover agent: enrolls with a coordinator, holds a session with it, and runs the steps of the
//! jobs it is assigned in Docker containers, shipping logs and artifacts back.

pub mod artifacts;
pub mod backoff;
pub mod cache;
pub mod client;
pub mod config;
pub mod credential;
pub mod executor;
pub mod identity;
pub mod journal;
pub mod logs;
pub mod logtimes;
pub mod mask;
pub mod metrics;
pub mod ops;
pub mod reaper;
pub mod runner;
pub mod session;
pub mod workspace;
