//! Pipeline files: the YAML model and its validation with line/column errors.

mod error;
mod model;
mod parse;
#[cfg(test)]
mod secrets_tests;
#[cfg(test)]
mod tests;
mod yaml;

pub use error::PipelineError;
pub use model::{JobSpec, Pipeline, PullPolicy, Resources, StepSpec};
pub use parse::{parse, parse_with_secrets};
