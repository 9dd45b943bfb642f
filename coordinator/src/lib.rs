//! Drover coordinator library: accepts pipelines, keeps runs durable in SQLite, and pushes their jobs to
//! agents over gRPC.
//!
//! Layout: [`api`] holds thin gRPC services over the domain core [`engine`], which combines the pure
//! [`scheduler`], the durable [`store`], the step [`logs`] and the content-addressed [`artifacts`]. The [`http`] side serves
//! operators: probes, Prometheus metrics and the dashboard.

pub mod access;
pub mod api;
pub mod artifacts;
pub mod caches;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod logs;
pub mod mtls;
pub mod pipeline;
mod recent;
pub mod scheduler;
pub mod secrets;
pub mod server;
pub mod store;
pub mod tls;

pub use config::Config;
pub use engine::Engine;
pub use error::CoordError;
pub use server::{RunningServer, Server};
