//! Pipeline files: the YAML model and its validation with line/column errors.

mod error;
mod model;
mod parse;
#[cfg(test)]
mod tests;
mod yaml;

pub use error::PipelineError;
pub use model::{JobSpec, Pipeline, PullPolicy, StepSpec};
pub use parse::parse;
