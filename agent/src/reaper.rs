//! Removes what earlier runs of this agent left behind (after a crash or a kill -9).

use std::collections::HashSet;
use std::path::Path;

use crate::executor::{ExecError, Executor, Leftover};

/// Removes every container, then every volume, labelled as made by `agent_id` whose attempt is
/// not in `running`. Returns how many resources were removed. At start `running` is empty: all
/// of them go.
pub async fn reap<E: Executor>(
    exec: &E,
    agent_id: &str,
    running: &HashSet<String>,
) -> Result<usize, ExecError> {
    let leftovers = exec.leftovers(agent_id).await?;
    let (containers, volumes): (Vec<_>, Vec<_>) = leftovers
        .into_iter()
        .filter(|l| !running.contains(l.attempt()))
        .partition(|l| matches!(l, Leftover::Container { .. }));
    let mut removed = 0;
    let mut first_error = None;
    // Containers first: a volume cannot go while a container still mounts it.
    for leftover in containers.iter().chain(volumes.iter()) {
        match exec.remove_leftover(leftover).await {
            Ok(()) => {
                removed += 1;
                tracing::info!(?leftover, "removed a leftover");
            }
            Err(e) => {
                tracing::warn!(?leftover, error = %e, "could not remove a leftover");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// Deletes the spool and scratch directories of attempts from an earlier run (at start, when no
/// attempt runs: their results were never reported and the coordinator retries them).
pub async fn clear_state_dirs(state_dir: &Path) -> std::io::Result<()> {
    for sub in ["spool", "work"] {
        match tokio::fs::remove_dir_all(state_dir.join(sub)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}
