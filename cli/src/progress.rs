//! Progress bars for transfers, drawn on stderr only when it is a terminal (scripts and logs stay clean).

use std::io::IsTerminal as _;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-counting bar for a transfer of `total` bytes labelled `what`; hidden unless stderr is a
/// terminal, so callers can update it unconditionally.
pub(crate) fn transfer(what: &str, total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    // The template is a constant; should it ever fail to parse, a plain bar is still useful.
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_when_stderr_is_not_a_terminal() {
        // Under the test runner stderr is captured (a pipe), which is exactly the scripted case.
        if std::io::stderr().is_terminal() {
            return;
        }
        let bar = transfer("artifact", 10);
        assert!(bar.is_hidden());
        bar.inc(10);
        bar.finish_and_clear();
    }
}
