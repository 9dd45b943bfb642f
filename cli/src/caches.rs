//! `drover caches list|delete`: the job caches (`cache:` in pipelines) the coordinator stores.

use std::process::ExitCode;

use clap::Subcommand;
use drover_proto::v1::{CacheEntry, DeleteCacheRequest, ListCachesRequest};

use crate::client::Coordinator;
use crate::output::{self, OutputFormat};

/// `drover caches` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum CachesCommand {
    /// List cache entries: scope, key, size, saved and last used, newest first per scope.
    List {
        /// Only this scope (the pipeline's run name, or its `cache.scope`).
        #[arg(long)]
        scope: Option<String>,
    },
    /// Delete a cache entry: the next run with its key misses and saves it again (admin token).
    Delete {
        /// The key, as `drover caches list` shows it.
        key: String,
        /// Its scope; needed only when several scopes hold the key.
        #[arg(long)]
        scope: Option<String>,
    },
}

fn entry_json(c: &CacheEntry) -> serde_json::Value {
    serde_json::json!({
        "scope": c.scope,
        "key": c.key,
        "digest": c.digest,
        "size": c.size,
        "created_ms": c.created_ms,
        "last_used_ms": c.last_used_ms,
        "run_id": c.run_id,
        "job": c.job,
    })
}

/// Runs a `caches` subcommand.
pub(crate) async fn caches(
    url: &str,
    out: OutputFormat,
    command: CachesCommand,
) -> anyhow::Result<ExitCode> {
    let coordinator = Coordinator::connect(url).await?;
    let list = |scope: Option<String>| {
        let coordinator = &coordinator;
        async move {
            coordinator
                .client()
                .list_caches(ListCachesRequest {
                    scope: scope.unwrap_or_default(),
                })
                .await
                .map(|r| r.into_inner().caches)
                .map_err(|s| coordinator.error(s, "list caches"))
        }
    };
    match command {
        CachesCommand::List { scope } => {
            let caches = list(scope).await?;
            match out {
                OutputFormat::Text => {
                    if caches.is_empty() {
                        eprintln!("no caches");
                    }
                    for c in &caches {
                        println!(
                            "{}\t{}\t{}\tsaved {}\tused {}",
                            c.scope,
                            c.key,
                            output::format_bytes(c.size),
                            output::format_time(c.created_ms),
                            output::format_time(c.last_used_ms)
                        );
                    }
                }
                OutputFormat::Json => {
                    let items: Vec<_> = caches.iter().map(entry_json).collect();
                    print!("{}", output::to_json_text(&serde_json::json!(items)));
                }
            }
        }
        CachesCommand::Delete { key, scope } => {
            let scope = match scope {
                Some(s) => s,
                None => {
                    let mut scopes: Vec<String> = list(None)
                        .await?
                        .into_iter()
                        .filter(|c| c.key == key)
                        .map(|c| c.scope)
                        .collect();
                    match scopes.len() {
                        0 => {
                            eprintln!("drover: no cache with key {key:?}");
                            return Ok(ExitCode::FAILURE);
                        }
                        1 => scopes.remove(0),
                        _ => anyhow::bail!(
                            "the key {key:?} is stored in several scopes ({}); choose one with --scope",
                            scopes.join(", ")
                        ),
                    }
                }
            };
            let r = coordinator
                .client()
                .delete_cache(DeleteCacheRequest {
                    scope: scope.clone(),
                    key: key.clone(),
                })
                .await
                .map_err(|s| coordinator.error(s, "delete cache"))?
                .into_inner();
            if !r.deleted {
                eprintln!("drover: no cache with key {key:?} in scope {scope:?}");
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("cache {key:?} of scope {scope:?} deleted");
        }
    }
    Ok(ExitCode::SUCCESS)
}
