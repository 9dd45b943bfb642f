//! Pipeline files: the YAML model and its validation with line/column errors.

#[cfg(test)]
mod cache_tests;
mod error;
#[cfg(test)]
mod host_tests;
mod memo;
mod model;
mod parse;
#[cfg(test)]
mod secrets_tests;
#[cfg(test)]
mod tests;
mod yaml;

pub use error::PipelineError;
pub use memo::ParseMemo;
pub use model::{
    CacheSpec, HostAccess, JobSpec, Pipeline, PullPolicy, Resources, StepSpec, Volume,
};
pub use parse::{parse, parse_with_secrets};
