//! Errors of a pipeline file: where, and what was wrong.

use std::fmt;

/// One problem in a pipeline file, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineError {
    /// 1-based line, 0 when unknown.
    pub line: u32,
    /// 1-based column, 0 when unknown.
    pub column: u32,
    /// What was wrong and what was expected.
    pub message: String,
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(
                f,
                "line {}, column {}: {}",
                self.line, self.column, self.message
            )
        }
    }
}

impl std::error::Error for PipelineError {}
