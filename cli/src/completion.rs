//! `drover completion SHELL`: a completion script for bash, zsh or fish on stdout.

use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::Cli;

/// Shells we print completions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CompletionShell {
    /// `source <(drover completion bash)`, or save it in bash-completion's directory.
    Bash,
    /// Save as `_drover` in a directory on `$fpath`.
    Zsh,
    /// Save as `~/.config/fish/completions/drover.fish`.
    Fish,
}

impl From<CompletionShell> for Shell {
    fn from(shell: CompletionShell) -> Self {
        match shell {
            CompletionShell::Bash => Shell::Bash,
            CompletionShell::Zsh => Shell::Zsh,
            CompletionShell::Fish => Shell::Fish,
        }
    }
}

/// Writes the script for `shell` to `out`.
pub(crate) fn generate(shell: CompletionShell, out: &mut dyn std::io::Write) {
    let mut command = Cli::command();
    clap_complete::generate(Shell::from(shell), &mut command, "drover", out);
}

/// Runs `drover completion SHELL`.
pub(crate) fn completion(shell: CompletionShell) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    generate(shell, &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
        .map_err(|e| anyhow::anyhow!("cannot write to stdout: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: CompletionShell) -> String {
        let mut out = Vec::new();
        generate(shell, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_shell_knows_the_subcommands() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let text = script(shell);
            for word in ["artifacts", "why", "completion", "output", "coordinator"] {
                assert!(text.contains(word), "{shell:?} script lacks {word}");
            }
        }
        assert!(script(CompletionShell::Bash).contains("complete -F"));
        assert!(script(CompletionShell::Zsh).starts_with("#compdef drover"));
        assert!(script(CompletionShell::Fish).contains("complete -c drover"));
        assert!(script(CompletionShell::Fish).contains("-l output"));
        assert!(script(CompletionShell::Bash).contains("--output"));
    }
}
