//! `drover validate FILE`, and the reading and error formatting shared with `drover run FILE`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use drover_proto::v1::{PipelineError, ValidatePipelineRequest};

use crate::client::Coordinator;

/// Reads a pipeline file as UTF-8 text.
pub(crate) async fn read_pipeline(file: &Path) -> anyhow::Result<String> {
    let bytes = tokio::fs::read(file)
        .await
        .with_context(|| format!("cannot read pipeline {}", file.display()))?;
    String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("pipeline {} is not UTF-8 text: {e}", file.display()))
}

/// `FILE:LINE:COLUMN: message` (the compiler convention editors jump to); without a position
/// when the coordinator does not know one.
pub(crate) fn format_pipeline_error(file: &Path, error: &PipelineError) -> String {
    let file = file.display();
    match (error.line, error.column) {
        (0, _) => format!("{file}: {}", error.message),
        (line, 0) => format!("{file}:{line}: {}", error.message),
        (line, column) => format!("{file}:{line}:{column}: {}", error.message),
    }
}

/// Turns SubmitRun's INVALID_ARGUMENT message (lines of `line L, column C: msg`) into
/// `FILE:L:C: msg` lines; lines of another shape are kept, prefixed with the file name.
pub(crate) fn format_rejection(file: &Path, message: &str) -> Vec<String> {
    let lines: Vec<String> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| match parse_positioned(line) {
            Some(error) => format_pipeline_error(file, &error),
            None => format!("{}: {line}", file.display()),
        })
        .collect();
    if lines.is_empty() {
        vec![format!("{}: rejected by the coordinator", file.display())]
    } else {
        lines
    }
}

/// Parses `line L, column C: message` (optionally after a leading `- ` or other text).
fn parse_positioned(line: &str) -> Option<PipelineError> {
    let start = line.find("line ")?;
    let rest = &line[start + "line ".len()..];
    let (line_no, rest) = rest.split_once(',')?;
    let rest = rest.trim_start().strip_prefix("column ")?;
    let (column, message) = rest.split_once(':')?;
    Some(PipelineError {
        line: line_no.trim().parse().ok()?,
        column: column.trim().parse().ok()?,
        message: message.trim().to_string(),
    })
}

/// Runs `drover validate`.
pub(crate) async fn validate(url: &str, file: &Path) -> anyhow::Result<ExitCode> {
    let pipeline = read_pipeline(file).await?;
    let coordinator = Coordinator::connect(url).await?;
    let response = coordinator
        .client()
        .validate_pipeline(ValidatePipelineRequest { pipeline })
        .await
        .map_err(|s| coordinator.error(s, format!("validate {}", file.display())))?
        .into_inner();
    if response.errors.is_empty() {
        println!("{}: ok", file.display());
        return Ok(ExitCode::SUCCESS);
    }
    for error in &response.errors {
        println!("{}", format_pipeline_error(file, error));
    }
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_in_compiler_format() {
        let f = Path::new("ci.yaml");
        let e = |line, column| PipelineError {
            line,
            column,
            message: "unknown field `imag`, expected `image`".into(),
        };
        assert_eq!(
            format_pipeline_error(f, &e(3, 7)),
            "ci.yaml:3:7: unknown field `imag`, expected `image`"
        );
        assert_eq!(
            format_pipeline_error(f, &e(0, 0)),
            "ci.yaml: unknown field `imag`, expected `image`"
        );
    }

    #[test]
    fn rejection_lines_become_positions() {
        let f = Path::new("p.yml");
        let msg = "pipeline is invalid:\nline 4, column 9: unknown job `buld` in needs\n  line 12, column 3: missing field `image`\n";
        assert_eq!(
            format_rejection(f, msg),
            vec![
                "p.yml: pipeline is invalid:",
                "p.yml:4:9: unknown job `buld` in needs",
                "p.yml:12:3: missing field `image`",
            ]
        );
        assert_eq!(
            format_rejection(f, ""),
            vec!["p.yml: rejected by the coordinator"]
        );
    }
}
