//! Step logs: one append-only file per (attempt, step), written at byte offsets so that a chunk resent after
//! a reconnect is idempotent, acknowledged only once durable, and followed live by readers.
//!
//! Layout under the store's directory: `<attempt>/<step>.log` holds the bytes while the log grows. A log
//! is complete once its row (attempt, step, final length) is durable in the index `complete.db`, written
//! after the bytes are synced and shared by every log completing at about the same time (see
//! [`journal`]); then it is compressed to `<attempt>/<step>.log.zst`, which names its length itself.
//! An empty log has no file or directory at all: its row is the whole of it. Stores written before the
//! index kept completions in a text journal (imported at open) or marked them with
//! `<attempt>/<step>.done` (still read).
//! After a restart the status of a log is recovered from the compressed file, or the plain file's length
//! and its completion record.

mod compress;
mod entry;
mod journal;
mod reader;
#[cfg(test)]
mod tests;
mod times;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use entry::LogEntry;
use journal::Journal;

/// How far a step's log has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStatus {
    /// Number of bytes stored.
    pub len: u64,
    /// True once the log has been marked complete (its last chunk arrived or its attempt was abandoned).
    pub complete: bool,
}

/// A piece of a log returned by [`LogStore::read`].
#[derive(Debug, Clone)]
pub struct LogPiece {
    /// Byte offset of `data` in the step's log.
    pub offset: u64,
    /// The bytes, at most [`drover_proto::CHUNK_BYTES`].
    pub data: Bytes,
    /// True on the last piece of a complete log.
    pub eof: bool,
}

/// What went wrong with a log operation.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The disk failed; the message names the file.
    #[error("log storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A chunk started past the end of the stored log: the bytes in between are missing.
    #[error("log chunk starts at offset {got} but only {expected} bytes are stored: resend from {expected}")]
    Gap {
        /// The stored length, where the next chunk must start (at the latest).
        expected: u64,
        /// The offset the chunk started at.
        got: u64,
    },
    /// Data arrived past the end of a log that is already complete.
    #[error("the log is already complete; no more data can be appended")]
    Complete,
    /// A bad argument (attempt id, offsets); the message says which and why.
    #[error("invalid log request: {0}")]
    Invalid(String),
}

/// Key of one log in the in-memory map.
type LogKey = (String, u32);

/// The coordinator's log store. Cheap to clone: all clones share the same files and followers.
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Completions and directory syncs, made durable in grouped flushes.
    journal: Arc<Journal>,
    /// Logs that someone is using right now, or that hold appended bytes not yet synced.
    /// A std Mutex: every section is a map lookup or insert/remove and never crosses an `.await`.
    live: Mutex<HashMap<LogKey, Arc<LogEntry>>>,
    /// Logs being compressed now, so a repeated sync does not start a second compression.
    compressing: Mutex<std::collections::HashSet<LogKey>>,
    /// Steps of attempts started by this process whose logs were never opened: nothing of them can be
    /// on disk, so their first use skips the trip to the disk (by attempt, the steps not opened yet).
    fresh: Mutex<HashMap<String, std::collections::BTreeSet<u32>>>,
}

/// A reference to a live log; when the last one is dropped and the log holds nothing unsynced, the entry
/// leaves the map so memory stays bounded by the logs in use (it is recovered from disk when needed again).
#[derive(Debug)]
struct EntryHandle {
    inner: Arc<Inner>,
    key: LogKey,
    entry: Arc<LogEntry>,
}

impl Drop for EntryHandle {
    fn drop(&mut self) {
        let mut live = self
            .inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Arcs of entries are only cloned under this lock, so 2 (the map's and ours) means nobody else has it.
        if Arc::strong_count(&self.entry) == 2 && self.entry.is_clean() {
            if let Some(current) = live.get(&self.key) {
                if Arc::ptr_eq(current, &self.entry) {
                    live.remove(&self.key);
                }
            }
        }
    }
}

/// Attempt ids become directory names: only `[A-Za-z0-9_-]`, so a request can never name a path outside
/// the store.
pub(crate) fn validate_attempt(attempt: &str) -> Result<(), LogError> {
    if attempt.is_empty() || attempt.len() > 128 {
        return Err(LogError::Invalid(format!(
            "attempt id must be 1 to 128 characters, got {}",
            attempt.len()
        )));
    }
    if let Some(bad) = attempt
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(LogError::Invalid(format!(
            "attempt id {attempt:?} contains {bad:?}; only letters, digits, '-' and '_' are allowed"
        )));
    }
    Ok(())
}

impl LogStore {
    /// Open (creating if needed) the log store rooted at `dir`, normally `<data>/logs`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LogError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| entry::io_context(e, "create log directory", &dir))?;
        let journal = Journal::open(&dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                journal: Arc::new(journal),
                dir,
                live: Mutex::new(HashMap::new()),
                compressing: Mutex::new(std::collections::HashSet::new()),
                fresh: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn handle(&self, attempt: &str, step: u32) -> Result<EntryHandle, LogError> {
        validate_attempt(attempt)?;
        let key = (attempt.to_owned(), step);
        let entry = {
            let mut live = self
                .inner
                .live
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            live.entry(key.clone())
                .or_insert_with(|| {
                    let (dir, journal) = (&self.inner.dir, self.inner.journal.clone());
                    Arc::new(if self.take_fresh(attempt, step) {
                        LogEntry::new_empty(dir, journal, attempt, step)
                    } else {
                        LogEntry::new(dir, journal, attempt, step)
                    })
                })
                .clone()
        };
        Ok(EntryHandle {
            inner: self.inner.clone(),
            key,
            entry,
        })
    }

    /// A new attempt with `steps` steps was started by this process: its logs are empty until written,
    /// so opening each the first time needs no look at the disk (about a third of the work of storing
    /// an empty step log). Its attempt id must be new (never used for a log before).
    pub fn attempt_started(&self, attempt: &str, steps: u32) {
        if steps == 0 {
            return;
        }
        self.fresh()
            .insert(attempt.to_owned(), (0..steps).collect());
    }

    /// The attempt ended: forget which of its logs were never opened.
    pub fn attempt_ended(&self, attempt: &str) {
        self.fresh().remove(attempt);
    }

    /// True (once) when the log of `step` of `attempt` was never opened since the attempt started here.
    fn take_fresh(&self, attempt: &str, step: u32) -> bool {
        let mut fresh = self.fresh();
        let Some(steps) = fresh.get_mut(attempt) else {
            return false;
        };
        let was = steps.remove(&step);
        if steps.is_empty() {
            fresh.remove(attempt);
        }
        was
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, HashMap<String, std::collections::BTreeSet<u32>>> {
        self.inner
            .fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Write a chunk at `offset`. Bytes before the current length are skipped (a resent chunk is idempotent);
    /// a chunk starting past the current length is [`LogError::Gap`] (nothing written). `eof` marks the log
    /// complete at `offset + data.len()` (after which further data beyond that length is
    /// [`LogError::Complete`]; an identical resend is fine).
    /// Not yet durable: call [`LogStore::sync`]. Followers see the bytes at once.
    pub async fn append(
        &self,
        attempt: &str,
        step: u32,
        offset: u64,
        data: &[u8],
        eof: bool,
    ) -> Result<LogStatus, LogError> {
        self.append_pieces(
            attempt,
            step,
            offset,
            vec![bytes::Bytes::copy_from_slice(data)],
            eof,
        )
        .await
    }

    /// [`LogStore::append`] of the bytes of `pieces`, one after the other, taken without a copy.
    pub async fn append_pieces(
        &self,
        attempt: &str,
        step: u32,
        offset: u64,
        pieces: Vec<bytes::Bytes>,
        eof: bool,
    ) -> Result<LogStatus, LogError> {
        let handle = self.handle(attempt, step)?;
        handle.entry.append(offset, pieces, eof).await
    }

    /// Make what was appended durable (fdatasync, then the completion record) and return the durable status:
    /// every byte before `len` is on disk, and `complete` is true only once the completion itself is on disk.
    pub async fn sync(&self, attempt: &str, step: u32) -> Result<LogStatus, LogError> {
        let handle = self.handle(attempt, step)?;
        let status = handle.entry.sync().await?;
        if status.complete {
            self.compress_in_background(attempt, step, &handle.entry.paths, status.len);
        }
        Ok(status)
    }

    /// Stores a complete log compressed (`<step>.log.zst`), off the caller's path: the ack of the
    /// last chunk does not wait for it. At most one compression per log runs at a time. Once the
    /// compressed file is durable, the plain one is removed.
    fn compress_in_background(&self, attempt: &str, step: u32, paths: &entry::LogPaths, len: u64) {
        // An empty log stays without any file: its row in the index is all of it.
        if len == 0 || !paths.log.exists() || compress::zst_path(&paths.log).exists() {
            return;
        }
        let key = (attempt.to_owned(), step);
        {
            let mut busy = self
                .inner
                .compressing
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !busy.insert(key.clone()) {
                return;
            }
        }
        let inner = self.inner.clone();
        let (log, attempt_dir) = (paths.log.clone(), paths.attempt_dir.clone());
        let span = tracing::debug_span!("compress_log", attempt, step);
        // Detached on purpose: it owns everything it needs and ends by itself; a failure leaves
        // the plain log in place, which reads the same.
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                if let Err(e) = finish_compressed(&inner, log, attempt_dir, len).await {
                    tracing::warn!(error = %e, "could not compress a finished log; keeping it plain");
                }
                inner
                    .compressing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
            },
            span,
        ));
    }

    /// The current status of a log (what readers can read now, durable or not); `{0, false}` if it does not
    /// exist.
    pub async fn status(&self, attempt: &str, step: u32) -> Result<LogStatus, LogError> {
        validate_attempt(attempt)?;
        // A complete log never changes again, so when memory knows its final length the answer needs
        // neither its entry nor the disk. GetRun and WatchRun ask this for every step of a run they
        // show, and a finished run's logs have usually left memory: each was a trip to a blocking
        // thread and two failed lookups (an empty log has no file) on the way to showing `succeeded`.
        if let Some(len) = self
            .inner
            .journal
            .completed_len_in_memory(&(attempt.to_owned(), step))
        {
            return Ok(LogStatus {
                len,
                complete: true,
            });
        }
        let handle = self.handle(attempt, step)?;
        handle.entry.status().await
    }

    /// The attempt ended without finishing its logs (agent lost, canceled...): complete each of its
    /// step logs that is not complete. `started[i]` says whether step `i` ran: a step that ran (or
    /// whose bytes arrived) gets a visible marker line `\n[drover] log incomplete: {reason}\n`
    /// appended; one that never started is completed empty (no file, its row in the index). Every
    /// completion is durable before this returns, and anyone following one of these logs is ended.
    pub async fn abandon(
        &self,
        attempt: &str,
        started: &[bool],
        reason: &str,
    ) -> Result<(), LogError> {
        validate_attempt(attempt)?;
        let marker = format!("\n[drover] log incomplete: {reason}\n");
        // All steps at once: their completions share the index's grouped flushes.
        let steps = started.iter().enumerate().map(|(step, &started)| {
            let marker = marker.as_bytes();
            async move {
                let handle = self.handle(attempt, step as u32)?;
                handle.entry.abandon(started, marker).await?;
                let status = handle.entry.sync().await?;
                if status.complete {
                    self.compress_in_background(
                        attempt,
                        step as u32,
                        &handle.entry.paths,
                        status.len,
                    );
                }
                Ok::<(), LogError>(())
            }
        });
        futures::future::try_join_all(steps).await?;
        Ok(())
    }

    /// Read a log from `offset`. With `follow == false`: what is there now, then the stream ends (with a final
    /// `eof` piece only if the log is complete). With `follow == true`: keep streaming as bytes are appended
    /// (woken by `append`, no polling) until the log is complete, then end with a piece whose `eof` is true.
    /// Pieces are at most [`drover_proto::CHUNK_BYTES`]. An offset at or past the end of a complete log yields
    /// one empty `eof` piece.
    pub fn read(
        &self,
        attempt: &str,
        step: u32,
        offset: u64,
        follow: bool,
    ) -> impl futures::Stream<Item = Result<LogPiece, LogError>> + Send + 'static {
        reader::read(self.clone(), attempt.to_owned(), step, offset, follow)
    }
}

/// Compresses a complete log, makes the compressed file's entry durable, then removes the plain
/// file. The directory syncs are done here, not in the index's
/// flush: acknowledgements waiting for that flush must not wait for background work.
async fn finish_compressed(
    inner: &Inner,
    log: PathBuf,
    attempt_dir: PathBuf,
    len: u64,
) -> Result<(), LogError> {
    let root = inner.dir.clone();
    tokio::task::spawn_blocking(move || -> Result<(), std::io::Error> {
        let done = compress::compress(&log, len)?;
        if done.renamed || log.exists() {
            entry::sync_dir(&attempt_dir)?;
        }
        if done.created_dir {
            entry::sync_dir(&root)?;
        }
        compress::remove_plain(&log)
    })
    .await
    .map_err(|e| std::io::Error::other(format!("log compression task failed: {e}")))??;
    Ok(())
}
