//! The attempt journal: one small JSON file per running attempt, `<state>/attempts/<id>.json`,
//! rewritten each time a step container starts. After a crash or a `kill -9` of the agent, the
//! next start reads it to find the attempts whose step container still runs, reports them in its
//! hello, and resumes them (re-attach, finish the step, run the rest) instead of reaping them.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use drover_proto::v1::Assignment;
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::logs::safe_file_name;

/// What the agent needs to pick an attempt up again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Attempt id.
    pub attempt_id: String,
    /// Fencing epoch.
    pub epoch: u64,
    /// The whole assignment, protobuf-encoded, as hex (steps, artifacts, timeouts).
    pub assignment_hex: String,
    /// Unix milliseconds when the attempt started here (for the job timeout).
    pub started_ms: i64,
    /// Index of the step whose container is running.
    pub step_index: u32,
    /// Unix milliseconds when that step started (for the step timeout).
    pub step_started_ms: i64,
    /// Engine id of the step's container.
    pub container_id: String,
    /// Engine name of the attempt's workspace volume.
    pub volume: String,
    /// Spool length of each step when the entry was written (informational: the spool files
    /// themselves are the source of truth and only grow).
    pub spool_offsets: BTreeMap<u32, u64>,
}

impl JournalEntry {
    /// A new entry for `assignment` (the step fields are filled when a step starts).
    pub fn new(assignment: &Assignment, started_ms: i64, volume: &str) -> Self {
        Self {
            attempt_id: assignment.attempt_id.clone(),
            epoch: assignment.epoch,
            assignment_hex: hex::encode(assignment.encode_to_vec()),
            started_ms,
            step_index: 0,
            step_started_ms: started_ms,
            container_id: String::new(),
            volume: volume.to_string(),
            spool_offsets: BTreeMap::new(),
        }
    }

    /// The assignment this entry was written for.
    pub fn assignment(&self) -> Result<Assignment, JournalError> {
        let bytes = hex::decode(&self.assignment_hex).map_err(|e| JournalError::Corrupt {
            attempt: self.attempt_id.clone(),
            reason: format!("assignment is not hex: {e}"),
        })?;
        let a = Assignment::decode(bytes.as_slice()).map_err(|e| JournalError::Corrupt {
            attempt: self.attempt_id.clone(),
            reason: format!("assignment does not decode: {e}"),
        })?;
        if a.attempt_id != self.attempt_id || a.epoch != self.epoch {
            return Err(JournalError::Corrupt {
                attempt: self.attempt_id.clone(),
                reason: format!(
                    "assignment is for attempt {} epoch {}, entry says epoch {}",
                    a.attempt_id, a.epoch, self.epoch
                ),
            });
        }
        Ok(a)
    }
}

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing a journal file failed.
    #[error("attempt journal {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A journal entry cannot be used.
    #[error("attempt journal entry of {attempt} is unusable: {reason}")]
    Corrupt {
        /// Attempt id.
        attempt: String,
        /// What is wrong.
        reason: String,
    },
}

/// The journal directory `<state>/attempts`.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal under the agent's state directory.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("attempts"),
        }
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, attempt_id: &str) -> PathBuf {
        self.dir
            .join(format!("{}.json", safe_file_name(attempt_id)))
    }

    /// Writes (replaces) the entry of its attempt atomically: a crash leaves the old or the new
    /// entry, never half of one.
    pub async fn write(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(io_err(&self.dir))?;
        let path = self.path(&entry.attempt_id);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec(entry).map_err(|e| JournalError::Corrupt {
            attempt: entry.attempt_id.clone(),
            reason: e.to_string(),
        })?;
        // 0600: the entry holds the Assignment, secrets included; only the agent's user may read it.
        let write = async {
            use tokio::io::AsyncWriteExt;
            let _ = tokio::fs::remove_file(&tmp).await;
            let mut f = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .await?;
            f.write_all(&json).await?;
            f.flush().await
        };
        write.await.map_err(io_err(&tmp))?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(io_err(&path))?;
        Ok(())
    }

    /// Removes the entry of `attempt_id` (the attempt is over or abandoned). One unlink, on the calling
    /// task: it is on the path of every job's result, and a blocking-pool trip costs more than the unlink.
    pub async fn remove(&self, attempt_id: &str) -> Result<(), JournalError> {
        let path = self.path(attempt_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(JournalError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }

    /// Every readable entry. Unreadable files are removed with a warning: their attempts cannot
    /// be resumed and will be reaped.
    pub async fn load_all(&self) -> Result<Vec<JournalEntry>, JournalError> {
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(JournalError::Io {
                    path: self.dir.clone(),
                    source,
                })
            }
        };
        let mut out = Vec::new();
        loop {
            let next = dir.next_entry().await.map_err(|source| JournalError::Io {
                path: self.dir.clone(),
                source,
            })?;
            let Some(file) = next else { break };
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                // A temporary file of a write the crash interrupted.
                let _ = tokio::fs::remove_file(&path).await;
                continue;
            }
            let parsed = tokio::fs::read(&path)
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<JournalEntry>(&b).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(entry) => out.push(entry),
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "dropping an unreadable attempt journal entry");
                    let _ = tokio::fs::remove_file(&path).await;
                }
            }
        }
        out.sort_by(|a, b| a.attempt_id.cmp(&b.attempt_id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_round_trip_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path());
        assert!(journal.load_all().await.unwrap().is_empty());
        let a = Assignment {
            attempt_id: "att/1".into(),
            epoch: 4,
            job: "build".into(),
            timeout_secs: 9,
            ..Default::default()
        };
        let mut e = JournalEntry::new(&a, 1000, "vol");
        e.step_index = 2;
        e.container_id = "c1".into();
        e.spool_offsets.insert(0, 12);
        journal.write(&e).await.unwrap();
        journal.write(&e).await.unwrap();
        std::fs::write(journal.dir().join("junk.json"), b"{not json").unwrap();
        let all = journal.load_all().await.unwrap();
        assert_eq!(all, vec![e.clone()]);
        assert_eq!(all[0].assignment().unwrap(), a);
        assert!(
            !journal.dir().join("junk.json").exists(),
            "corrupt entry dropped"
        );
        journal.remove("att/1").await.unwrap();
        journal.remove("att/1").await.unwrap();
        assert!(journal.load_all().await.unwrap().is_empty());
    }

    #[test]
    fn a_mismatched_assignment_is_corrupt() {
        let a = Assignment {
            attempt_id: "x".into(),
            epoch: 1,
            ..Default::default()
        };
        let mut e = JournalEntry::new(&a, 0, "v");
        e.epoch = 2;
        assert!(matches!(e.assignment(), Err(JournalError::Corrupt { .. })));
        e.assignment_hex = "zz".into();
        assert!(matches!(e.assignment(), Err(JournalError::Corrupt { .. })));
    }
}
