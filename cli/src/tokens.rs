//! `drover tokens create|list|revoke`: enrollment tokens for new agents and API tokens for clients.

use std::collections::HashMap;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use drover_proto::v1::{
    CreateApiTokenRequest, CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo,
};

use crate::client::Coordinator;
use crate::output::{self, OutputFormat};

/// `drover tokens` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum TokensCommand {
    /// Create an enrollment token; prints only the token on stdout.
    Create(CreateArgs),
    /// List API and enrollment tokens (ids, never the tokens); admin only.
    List,
    /// Revoke an API or enrollment token by the id `list` shows; admin only.
    Revoke {
        /// Token id (or a longer prefix of its sha256).
        id: String,
    },
}

/// Arguments of `drover tokens create`.
#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// How many agents may enroll with it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) uses: u32,
    /// Lifetime: a number with a unit s, m, h or d (e.g. 90s, 30m, 1h, 7d); bare numbers are seconds.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub(crate) ttl: Ttl,
    /// Labels an enrolling agent must have: k=v,k2=v2.
    #[arg(long, value_parser = parse_labels, default_value = "")]
    pub(crate) labels: Labels,
    /// `enroll` (for a new agent) or `api` (for clients: the CLI, CI systems; needs --role).
    #[arg(long, value_enum, default_value_t = TokenKind::Enroll)]
    pub(crate) kind: TokenKind,
    /// Role of an API token: read (runs, logs, artifacts), submit (read + submit, cancel) or admin.
    #[arg(long, value_parser = ["read", "submit", "admin"], required_if_eq("kind", "api"))]
    pub(crate) role: Option<String>,
    /// Name of an API token, for operators.
    #[arg(long, default_value = "cli")]
    pub(crate) name: String,
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum TokenKind {
    /// Enrollment of a new agent.
    Enroll,
    /// A client's API token with a role.
    Api,
}

/// A token lifetime in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ttl(pub(crate) u64);

/// Label requirements.
pub(crate) type Labels = HashMap<String, String>;

/// Parses `90s`, `30m`, `1h`, `7d` or a bare number of seconds.
fn parse_ttl(text: &str) -> Result<Ttl, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("expected a duration like 30m, 1h or 7d, got {text:?}"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown duration unit {other:?}; use s, m, h or d")),
    };
    let secs = number
        .checked_mul(scale)
        .ok_or_else(|| format!("duration {text:?} is too long"))?;
    if secs == 0 {
        return Err("the lifetime must be longer than 0".to_string());
    }
    Ok(Ttl(secs))
}

/// Parses `k=v,k2=v2` (empty means no requirement).
fn parse_labels(text: &str) -> Result<Labels, String> {
    let mut labels = HashMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("label {pair:?} is not of the form key=value"))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("label {pair:?} has an empty key"));
        }
        if labels
            .insert(key.to_string(), value.trim().to_string())
            .is_some()
        {
            return Err(format!("label {key:?} is given twice"));
        }
    }
    Ok(labels)
}

/// Runs a `tokens` subcommand.
pub(crate) async fn tokens(
    url: &str,
    out: OutputFormat,
    command: TokensCommand,
) -> anyhow::Result<ExitCode> {
    let args = match command {
        TokensCommand::Create(args) => args,
        TokensCommand::List => return list(url, out).await,
        TokensCommand::Revoke { id } => return revoke(url, out, &id).await,
    };
    let coordinator = Coordinator::connect(url).await?;
    if args.kind == TokenKind::Api {
        let role = args.role.clone().unwrap_or_default();
        let r = coordinator
            .client()
            .create_api_token(CreateApiTokenRequest {
                role: role.clone(),
                name: args.name.clone(),
            })
            .await
            .map_err(|s| coordinator.error(s, "create API token"))?
            .into_inner();
        match out {
            OutputFormat::Text => {
                println!("{}", r.token);
                eprintln!(
                    "API token with role {}; it is shown only once (use it as DROVER_TOKEN)",
                    r.role
                );
            }
            OutputFormat::Json => print!(
                "{}",
                output::to_json_text(&serde_json::json!({"token": r.token, "role": r.role}))
            ),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let response = coordinator
        .client()
        .create_token(CreateTokenRequest {
            uses: args.uses,
            ttl_secs: args.ttl.0,
            labels: args.labels.clone(),
        })
        .await
        .map_err(|s| coordinator.error(s, "create token"))?
        .into_inner();
    match out {
        OutputFormat::Text => {
            // Only the token on stdout, so `TOKEN=$(drover tokens create)` works.
            println!("{}", response.token);
            let labels = if args.labels.is_empty() {
                "any".to_string()
            } else {
                output::format_labels(&args.labels)
            };
            eprintln!(
                "enrollment token for {} agent{} (labels: {labels}), expires {} UTC; it is shown only once",
                args.uses,
                if args.uses == 1 { "" } else { "s" },
                output::format_time(response.expires_ms),
            );
        }
        OutputFormat::Json => {
            let value = serde_json::json!({
                "token": response.token,
                "expires_ms": response.expires_ms,
                "uses": args.uses,
                "labels": args.labels,
            });
            print!("{}", output::to_json_text(&value));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn token_json(t: &TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "kind": t.kind,
        "role": t.role,
        "name": t.name,
        "labels": t.labels,
        "created_ms": t.created_ms,
        "expires_ms": t.expires_ms,
        "uses_left": t.uses_left,
    })
}

async fn list(url: &str, out: OutputFormat) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let tokens = coordinator
        .client()
        .list_tokens(ListTokensRequest {})
        .await
        .map_err(|s| coordinator.error(s, "list tokens"))?
        .into_inner()
        .tokens;
    match out {
        OutputFormat::Text => {
            let mut t = output::Table::new(&[
                "ID",
                "KIND",
                "ROLE/LABELS",
                "NAME",
                "CREATED",
                "EXPIRES",
                "USES LEFT",
            ]);
            for k in &tokens {
                let api = k.kind == "api";
                t.row(vec![
                    k.id.clone(),
                    k.kind.clone(),
                    if api {
                        k.role.clone()
                    } else if k.labels.is_empty() {
                        "any".into()
                    } else {
                        output::format_labels(&k.labels)
                    },
                    if api { k.name.clone() } else { "-".into() },
                    output::format_time(k.created_ms),
                    if api {
                        "never".into()
                    } else {
                        output::format_time(k.expires_ms)
                    },
                    if api {
                        "-".into()
                    } else {
                        k.uses_left.to_string()
                    },
                ]);
            }
            print!("{}", t.render());
        }
        OutputFormat::Json => {
            let list: Vec<_> = tokens.iter().map(token_json).collect();
            print!("{}", output::to_json_text(&serde_json::Value::Array(list)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn revoke(url: &str, out: OutputFormat, id: &str) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let t = coordinator
        .client()
        .revoke_token(RevokeTokenRequest { id: id.to_string() })
        .await
        .map_err(|s| coordinator.error(s, format!("revoke token {id}")))?
        .into_inner();
    match out {
        OutputFormat::Text => println!("{} token {}: revoked", t.kind, t.id),
        OutputFormat::Json => print!("{}", output::to_json_text(&token_json(&t))),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90"), Ok(Ttl(90)));
        assert_eq!(parse_ttl("90s"), Ok(Ttl(90)));
        assert_eq!(parse_ttl("30m"), Ok(Ttl(1800)));
        assert_eq!(parse_ttl("1h"), Ok(Ttl(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Ttl(604_800)));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("1w").unwrap_err().contains("unit"));
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }

    #[test]
    fn labels() {
        let l = parse_labels("os=linux, arch=amd64").unwrap();
        assert_eq!(l["os"], "linux");
        assert_eq!(l["arch"], "amd64");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels("os").unwrap_err().contains("key=value"));
        assert!(parse_labels("=x").is_err());
        assert!(parse_labels("a=1,a=2").unwrap_err().contains("twice"));
    }
}
