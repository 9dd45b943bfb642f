//! Removes what earlier runs of this agent left behind (after a crash or a kill -9).

use std::collections::HashSet;
use std::path::Path;

use crate::executor::{ExecError, Executor, Leftover};
use crate::journal::{Journal, JournalEntry};

/// At start, after a crash or `kill -9` of an earlier run: the journaled attempts whose step
/// container still exists are returned for re-adoption (their containers, volumes, spools and
/// journal entries are kept); every other leftover, spool, scratch directory and journal entry
/// is removed. Docker errors only cost re-adoption (they are logged); a state directory that
/// cannot be cleared is an error.
pub async fn recover<E: Executor>(
    exec: &E,
    agent_id: &str,
    state_dir: &Path,
) -> std::io::Result<Vec<JournalEntry>> {
    let journal = Journal::new(state_dir);
    let entries = journal.load_all().await.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the attempt journal; nothing is re-adopted");
        Vec::new()
    });
    let containers: HashSet<String> = match exec.leftovers(agent_id).await {
        Ok(l) => l
            .into_iter()
            .filter_map(|l| match l {
                Leftover::Container { id, .. } => Some(id),
                Leftover::Volume { .. } => None,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this agent's containers; nothing is re-adopted");
            HashSet::new()
        }
    };
    let mut adopted = Vec::new();
    for entry in entries {
        if !entry.container_id.is_empty() && containers.contains(&entry.container_id) {
            tracing::info!(attempt = %entry.attempt_id, step = entry.step_index, "found a running attempt of an earlier run");
            adopted.push(entry);
        } else {
            if let Err(e) = journal.remove(&entry.attempt_id).await {
                tracing::warn!(attempt = %entry.attempt_id, error = %e, "removing a journal entry");
            }
        }
    }
    let keep: HashSet<String> = adopted.iter().map(|e| e.attempt_id.clone()).collect();
    clear_state_dirs_except(state_dir, &keep).await?;
    match reap(exec, agent_id, &keep).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(removed = n, "removed leftovers of an earlier run"),
        Err(e) => tracing::warn!(error = %e, "could not remove every leftover of an earlier run"),
    }
    Ok(adopted)
}

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

/// Deletes the spool and scratch directories of attempts from an earlier run, except those of the
/// attempts in `keep` (re-adopted at start: their spools hold log bytes not yet shipped).
pub async fn clear_state_dirs_except(
    state_dir: &Path,
    keep: &HashSet<String>,
) -> std::io::Result<()> {
    let kept: HashSet<String> = keep
        .iter()
        .map(|a| crate::logs::safe_file_name(a))
        .collect();
    for sub in ["spool", "work"] {
        let mut dir = match tokio::fs::read_dir(state_dir.join(sub)).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        while let Some(entry) = dir.next_entry().await? {
            if kept.contains(entry.file_name().to_string_lossy().as_ref()) {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type().await?.is_dir() {
                tokio::fs::remove_dir_all(&path).await
            } else {
                tokio::fs::remove_file(&path).await
            };
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
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
