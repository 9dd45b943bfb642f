//! One live log: its file, its in-memory status and the watch channel that wakes its followers.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use drover_proto::direct::DirectAppend;
use drover_proto::v1::LineTime;

use super::journal::Journal;
use super::times::TimesFile;
use super::{LogError, LogKey, LogStatus};

/// Attach the operation and the path to an I/O error, so the message says which file failed.
pub(crate) fn io_context(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// Run blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io::Error::other(format!("log I/O task failed: {e}")))?
}

/// fsync a directory so the entries created in it (files, renames) survive a crash.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_context(e, "sync directory", dir))
}

/// Where one log lives on disk.
#[derive(Debug, Clone)]
pub(super) struct LogPaths {
    /// The store's directory.
    root: PathBuf,
    /// `<root>/<attempt>`.
    pub(super) attempt_dir: PathBuf,
    /// `<root>/<attempt>/<step>.log`: the bytes.
    pub(super) log: PathBuf,
    /// `<root>/<attempt>/<step>.done`: the completion marker of stores written before the journal,
    /// holding the final length in decimal; still read.
    done: PathBuf,
}

impl LogPaths {
    fn new(root: &Path, attempt: &str, step: u32) -> Self {
        let attempt_dir = root.join(attempt);
        Self {
            root: root.to_owned(),
            log: attempt_dir.join(format!("{step}.log")),
            done: attempt_dir.join(format!("{step}.done")),
            attempt_dir,
        }
    }
}

/// What is known about a log; guarded by the entry's async mutex, which also serialises its writers.
#[derive(Debug, Default)]
struct LogIo {
    /// False until the status was recovered from disk.
    loaded: bool,
    /// The log file, once it exists.
    file: Option<Arc<File>>,
    /// Writes appends to `file`, their whole blocks past the page cache; opened at the first append.
    appender: Option<DirectAppend>,
    /// Bytes written (visible to readers).
    len: u64,
    /// The log has been marked complete.
    complete: bool,
    /// Bytes known to be on disk.
    synced_len: u64,
    /// The completion is on disk (in the journal, a legacy marker, or the compressed file).
    marker_durable: bool,
    /// The directory entries leading to the file are on disk.
    dirs_synced: bool,
    /// The line-time file, once a batch brought times.
    times: Option<TimesFile>,
}

impl LogIo {
    fn status(&self) -> LogStatus {
        LogStatus {
            len: self.len,
            complete: self.complete,
        }
    }

    fn is_clean(&self) -> bool {
        self.len == self.synced_len && (!self.complete || self.marker_durable)
    }
}

/// State recovered from disk.
struct Loaded {
    file: Option<File>,
    len: u64,
    complete: bool,
}

/// Recover a log's status: the compressed file (complete, its length in its header), else the file
/// length and the completion recorded in the journal (or a legacy `.done` marker). A log that is not
/// complete may hold bytes a previous process wrote but never synced, so it is synced here: from then
/// on everything below `len` is durable, which keeps acks honest after a coordinator restart.
fn load(paths: &LogPaths, recorded: Option<u64>) -> io::Result<Loaded> {
    let zst = super::compress::zst_path(&paths.log);
    if zst.exists() {
        // Only a synced, complete log is renamed to its compressed name. A plain file beside it is
        // a leftover of a crash before it was removed: same bytes, removed now.
        let len = super::compress::content_size(&zst)?;
        super::compress::remove_plain(&paths.log)?;
        return Ok(Loaded {
            file: None,
            len,
            complete: true,
        });
    }
    let file = match OpenOptions::new().read(true).write(true).open(&paths.log) {
        Ok(file) => Some(file),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_context(e, "open log", &paths.log)),
    };
    let mut len = match &file {
        Some(f) => f
            .metadata()
            .map_err(|e| io_context(e, "stat log", &paths.log))?
            .len(),
        None => 0,
    };
    let marker = match recorded {
        Some(end) => Some(end),
        None => match std::fs::read_to_string(&paths.done) {
            Ok(text) => text.trim().parse::<u64>().ok(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_context(e, "read log marker", &paths.done)),
        },
    };
    let complete = match (marker, &file) {
        (Some(end), Some(f)) if len >= end => {
            // Bytes past the recorded end cannot have been acknowledged; drop them.
            if len > end {
                f.set_len(end)
                    .map_err(|e| io_context(e, "truncate log", &paths.log))?;
                len = end;
            }
            true
        }
        // An empty log completes without a file.
        (Some(0), None) => true,
        (Some(end), _) => {
            tracing::warn!(
                log = %paths.log.display(),
                marker_len = end,
                file_len = len,
                "log shorter than its recorded completion; treating it as incomplete"
            );
            false
        }
        (None, _) => false,
    };
    if !complete {
        if let Some(f) = &file {
            f.sync_data()
                .map_err(|e| io_context(e, "sync log", &paths.log))?;
            sync_dir(&paths.attempt_dir)?;
            sync_dir(&paths.root)?;
        }
    }
    Ok(Loaded {
        file,
        len,
        complete,
    })
}

/// One log in memory.
#[derive(Debug)]
pub(super) struct LogEntry {
    pub(super) paths: LogPaths,
    key: LogKey,
    /// Where completions and directory syncs are made durable, shared by every log of the store.
    journal: Arc<Journal>,
    /// Latest status, for followers; updated after every change.
    tx: watch::Sender<LogStatus>,
    io: Mutex<LogIo>,
    /// Serialises syncs. A sync holds it (not `io`) while it waits for the disk, so appends go on
    /// meanwhile: the bytes of the next batch are written while the previous batch is flushed.
    syncing: Mutex<()>,
}

impl LogEntry {
    pub(super) fn new(root: &Path, journal: Arc<Journal>, attempt: &str, step: u32) -> Self {
        Self {
            paths: LogPaths::new(root, attempt, step),
            key: (attempt.to_owned(), step),
            journal,
            tx: watch::Sender::new(LogStatus::default()),
            io: Mutex::new(LogIo::default()),
            syncing: Mutex::new(()),
        }
    }

    /// The log of a step of an attempt started by this process that nothing was ever stored for: its
    /// status is known (empty, open) without looking at the disk.
    pub(super) fn new_empty(root: &Path, journal: Arc<Journal>, attempt: &str, step: u32) -> Self {
        let mut entry = Self::new(root, journal, attempt, step);
        *entry.io.get_mut() = LogIo {
            loaded: true,
            // No file, so no directory entry to make durable (creating the file clears this).
            dirs_synced: true,
            ..LogIo::default()
        };
        entry
    }

    /// True when dropping this entry loses nothing: no unsynced bytes, no unwritten marker. Called from a
    /// `Drop` under the store's map lock, hence `try_lock`: a locked entry is in use, so not droppable.
    pub(super) fn is_clean(&self) -> bool {
        self.io.try_lock().map(|io| io.is_clean()).unwrap_or(false)
    }

    /// A receiver of status changes. Subscribe before reading so no change is missed.
    pub(super) fn subscribe(&self) -> watch::Receiver<LogStatus> {
        self.tx.subscribe()
    }

    fn publish(&self, io: &LogIo) -> LogStatus {
        let status = io.status();
        self.tx.send_replace(status);
        status
    }

    async fn ensure_loaded(&self, io: &mut LogIo) -> Result<(), LogError> {
        if io.loaded {
            return Ok(());
        }
        let paths = self.paths.clone();
        let (journal, key) = (self.journal.clone(), self.key.clone());
        let loaded = blocking(move || load(&paths, journal.completed_len(&key)?)).await?;
        io.file = loaded.file.map(Arc::new);
        io.len = loaded.len;
        io.synced_len = loaded.len;
        io.complete = loaded.complete;
        io.marker_durable = loaded.complete;
        io.dirs_synced = true;
        io.loaded = true;
        self.publish(io);
        Ok(())
    }

    /// The log file and its appender, the file created (with its directory) if it does not exist
    /// yet: one trip to a blocking thread, at the first write.
    async fn writer<'a>(
        &self,
        io: &'a mut LogIo,
    ) -> Result<(Arc<File>, &'a mut DirectAppend), LogError> {
        if io.appender.is_none() {
            let (paths, existing, len) = (self.paths.clone(), io.file.clone(), io.len);
            let created = existing.is_none();
            let (file, appender) = blocking(move || {
                let file = match existing {
                    Some(file) => file,
                    None => {
                        std::fs::create_dir_all(&paths.attempt_dir).map_err(|e| {
                            io_context(e, "create log directory", &paths.attempt_dir)
                        })?;
                        let file = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&paths.log)
                            .map_err(|e| io_context(e, "create log", &paths.log))?;
                        Arc::new(file)
                    }
                };
                let appender = DirectAppend::open(&paths.log, &file, len)
                    .map_err(|e| io_context(e, "open log for appending", &paths.log))?;
                Ok((file, appender))
            })
            .await?;
            if created {
                io.dirs_synced = false;
            }
            io.file = Some(file);
            io.appender = Some(appender);
        }
        match (&io.file, io.appender.as_mut()) {
            (Some(file), Some(appender)) => Ok((file.clone(), appender)),
            _ => Err(LogError::Io(io::Error::other("log file missing"))),
        }
    }

    /// Writes `pieces` one after the other at the end of the log, on the calling task: a batch is
    /// at most a few MiB, while a trip to a blocking thread per batch (two thread switches, each a
    /// wake-up across the machine's cores) cost more than the write on a fast log. The whole blocks
    /// of a fast log go past the page cache ([`DirectAppend`]): copying them into fresh page-cache
    /// pages was the largest part of the coordinator's CPU per MiB of log. The `fdatasync` that
    /// makes the bytes durable stays off the workers.
    async fn write_at(&self, io: &mut LogIo, pieces: Vec<bytes::Bytes>) -> Result<(), LogError> {
        let (file, appender) = self.writer(io).await?;
        let written = appender.append(&file, &pieces);
        // Visible to readers as far as it was written: a failed write leaves `len` at the bytes
        // the file holds.
        io.len = appender.len();
        written.map_err(|e| io_context(e, "write log", &self.paths.log))?;
        Ok(())
    }

    /// Stores line times sent with a chunk (past the last stored one, so a resend adds nothing),
    /// before the chunk's bytes: a follower never reads bytes whose times are missing.
    pub(super) async fn record_times(&self, times: &[LineTime]) -> Result<(), LogError> {
        let mut io = self.io.lock().await;
        if io.times.is_none() {
            let (root, attempt, step) = (self.paths.root.clone(), self.key.0.clone(), self.key.1);
            io.times = Some(blocking(move || TimesFile::open(&root, &attempt, step)).await?);
        }
        if let Some(file) = io.times.as_mut() {
            file.append(times)?;
        }
        Ok(())
    }

    pub(super) async fn status(&self) -> Result<LogStatus, LogError> {
        let mut io = self.io.lock().await;
        self.ensure_loaded(&mut io).await?;
        Ok(io.status())
    }

    /// Appends the bytes of `pieces` (one after the other) at `offset`.
    pub(super) async fn append(
        &self,
        offset: u64,
        mut pieces: Vec<bytes::Bytes>,
        eof: bool,
    ) -> Result<LogStatus, LogError> {
        let mut io = self.io.lock().await;
        self.ensure_loaded(&mut io).await?;
        let data_len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let end = offset.checked_add(data_len).ok_or_else(|| {
            LogError::Invalid(format!(
                "chunk at offset {offset} of {data_len} bytes overflows"
            ))
        })?;
        if offset > io.len {
            return Err(LogError::Gap {
                expected: io.len,
                got: offset,
            });
        }
        if io.complete {
            if end > io.len {
                return Err(LogError::Complete);
            }
            if eof && end != io.len {
                return Err(LogError::Invalid(format!(
                    "chunk marks the end of the log at {end}, but it is already complete at {}",
                    io.len
                )));
            }
            return Ok(io.status());
        }
        if eof && end < io.len {
            return Err(LogError::Invalid(format!(
                "chunk marks the end of the log at {end}, but {} bytes are already stored",
                io.len
            )));
        }
        if end > io.len {
            // `offset <= len < end`, so the skip is within the pieces: drop the bytes already stored.
            let mut skip = (io.len - offset) as usize;
            pieces.retain_mut(|p| {
                if skip >= p.len() {
                    skip -= p.len();
                    return false;
                }
                *p = p.slice(skip..);
                skip = 0;
                true
            });
            self.write_at(&mut io, pieces).await?;
        }
        if eof {
            // An empty log gets no file: its completion (in the journal) says all there is.
            io.complete = true;
        }
        Ok(self.publish(&io))
    }

    /// Make everything appended durable; returns the durable status. Appends made while the disk
    /// works are not waited for (they are in the next sync); the returned status covers only what was
    /// appended before the flush began, so an acknowledgement built from it never claims more.
    pub(super) async fn sync(&self) -> Result<LogStatus, LogError> {
        let _one_sync_at_a_time = self.syncing.lock().await;
        let (file, len, data_pending, dirs_pending, marker_pending) = {
            let mut io = self.io.lock().await;
            self.ensure_loaded(&mut io).await?;
            let data_pending = io.len > io.synced_len;
            let dirs_pending = io.file.is_some() && !io.dirs_synced;
            let marker_pending = io.complete && !io.marker_durable;
            if !(data_pending || dirs_pending || marker_pending) {
                return Ok(LogStatus {
                    len: io.synced_len,
                    complete: io.marker_durable,
                });
            }
            (
                io.file.clone(),
                io.len,
                data_pending,
                dirs_pending,
                marker_pending,
            )
        };
        if let (true, Some(file)) = (data_pending, file) {
            let path = self.paths.log.clone();
            blocking(move || {
                file.sync_data()
                    .map_err(|e| io_context(e, "sync log", &path))
            })
            .await?;
        }
        // The completion is recorded after the data sync, so it never claims lost bytes; a complete log
        // takes no more appends, so `len` is its final length. Directory entries of a new file and
        // completions go in the journal's next grouped flush.
        let dirs: &[&Path] = if dirs_pending {
            &[&self.paths.attempt_dir, &self.paths.root]
        } else {
            &[]
        };
        if marker_pending || dirs_pending {
            self.journal
                .commit(marker_pending.then_some((&self.key, len)), dirs)
                .await?;
        }
        let mut io = self.io.lock().await;
        io.synced_len = io.synced_len.max(len);
        if dirs_pending {
            io.dirs_synced = true;
        }
        if marker_pending {
            io.marker_durable = true;
        }
        Ok(LogStatus {
            len: io.synced_len,
            complete: io.marker_durable,
        })
    }

    /// Complete the log if it is not complete yet, for an attempt that ended without finishing it.
    /// A step that ran (`started`, or bytes of it arrived) gets `marker` appended: its output may
    /// have been cut short, and the log says so. A step that never started is completed empty,
    /// without a file. Either way the completion is made durable by the next [`LogEntry::sync`],
    /// like any other: a follower that comes later, after this entry has left memory, or after a
    /// restart, finds the log complete instead of waiting for bytes that will never come.
    pub(super) async fn abandon(&self, started: bool, marker: &[u8]) -> Result<(), LogError> {
        let mut io = self.io.lock().await;
        self.ensure_loaded(&mut io).await?;
        if io.complete {
            return Ok(());
        }
        if started || io.file.is_some() {
            self.write_at(&mut io, vec![bytes::Bytes::copy_from_slice(marker)])
                .await?;
        }
        io.complete = true;
        self.publish(&io);
        Ok(())
    }
}
