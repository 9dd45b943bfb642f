//! YAML -> validated [`Pipeline`].

use super::{Pipeline, PipelineError};

/// Parse and validate a pipeline file. On failure, every problem found, each with its line and column.
pub fn parse(src: &str) -> Result<Pipeline, Vec<PipelineError>> {
    let _ = src;
    unimplemented!("pipeline parser: being written")
}
