//! `drover secrets set|list|delete`: secrets that pipelines name in `secrets:` (admin token needed).
//! Values are read from stdin, never from the command line, so they stay out of shell history and `ps`.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use drover_proto::v1::{DeleteSecretRequest, ListSecretsRequest, SetSecretRequest};

use crate::client::Coordinator;
use crate::output::{self, OutputFormat};

/// Largest value read from stdin (the coordinator's limit).
const MAX_VALUE: u64 = 64 * 1024;

/// `drover secrets` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum SecretsCommand {
    /// Store a secret; its value is read from stdin (one trailing newline is dropped).
    Set {
        /// Name: letters, digits and _, not starting with a digit.
        name: String,
    },
    /// List secret names and when they were set (never their values).
    List,
    /// Delete a secret (refused while an unfinished run uses it).
    Delete {
        /// Name.
        name: String,
    },
}

/// The value from `input`: at most [`MAX_VALUE`] bytes; one trailing `\n` or `\r\n` is dropped, since
/// `echo x | drover secrets set X` should store `x`.
fn read_value(input: impl Read) -> anyhow::Result<Vec<u8>> {
    let mut value = Vec::new();
    input
        .take(MAX_VALUE + 2)
        .read_to_end(&mut value)
        .context("reading the secret value from stdin")?;
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    if value.len() as u64 > MAX_VALUE {
        anyhow::bail!("the secret value is longer than {MAX_VALUE} bytes");
    }
    if value.is_empty() {
        anyhow::bail!("the secret value on stdin is empty");
    }
    Ok(value)
}

/// Runs a `secrets` subcommand.
pub(crate) async fn secrets(
    url: &str,
    out: OutputFormat,
    command: SecretsCommand,
) -> anyhow::Result<ExitCode> {
    // Read stdin before connecting: a missing value should not need a coordinator to be reported.
    let value = match &command {
        SecretsCommand::Set { .. } => Some(read_value(std::io::stdin().lock())?),
        _ => None,
    };
    let coordinator = Coordinator::connect(url).await?;
    match command {
        SecretsCommand::Set { name } => {
            let info = coordinator
                .client()
                .set_secret(SetSecretRequest {
                    name,
                    value: value.unwrap_or_default(),
                })
                .await
                .map_err(|s| coordinator.error(s, "set secret"))?
                .into_inner();
            match out {
                OutputFormat::Text => eprintln!("secret {} set", info.name),
                OutputFormat::Json => print!(
                    "{}",
                    output::to_json_text(
                        &serde_json::json!({"name": info.name, "updated_ms": info.updated_ms})
                    )
                ),
            }
        }
        SecretsCommand::List => {
            let list = coordinator
                .client()
                .list_secrets(ListSecretsRequest {})
                .await
                .map_err(|s| coordinator.error(s, "list secrets"))?
                .into_inner();
            match out {
                OutputFormat::Text => {
                    if list.secrets.is_empty() {
                        eprintln!("no secrets");
                    }
                    for s in &list.secrets {
                        println!("{}\t{}", s.name, output::format_time(s.updated_ms));
                    }
                }
                OutputFormat::Json => {
                    let items: Vec<_> = list
                        .secrets
                        .iter()
                        .map(|s| serde_json::json!({"name": s.name, "updated_ms": s.updated_ms}))
                        .collect();
                    print!("{}", output::to_json_text(&serde_json::json!(items)));
                }
            }
        }
        SecretsCommand::Delete { name } => {
            let r = coordinator
                .client()
                .delete_secret(DeleteSecretRequest { name: name.clone() })
                .await
                .map_err(|s| coordinator.error(s, "delete secret"))?
                .into_inner();
            if !r.deleted {
                eprintln!("drover: no secret {name:?}");
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("secret {name} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_from_stdin() {
        assert_eq!(read_value(&b"s3cr3t\n"[..]).unwrap(), b"s3cr3t");
        assert_eq!(read_value(&b"s3cr3t\r\n"[..]).unwrap(), b"s3cr3t");
        assert_eq!(read_value(&b"a\nb\n\n"[..]).unwrap(), b"a\nb\n");
        assert!(read_value(&b"\n"[..]).is_err());
        assert!(read_value(&vec![b'x'; 64 * 1024 + 1][..]).is_err());
        assert_eq!(
            read_value(&vec![b'x'; 64 * 1024][..]).unwrap().len(),
            64 * 1024
        );
    }
}
