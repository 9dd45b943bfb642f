//! Line start times and truncation flags stored beside a step's log.
//!
//! `<attempt>/<step>.times` holds 16-byte records, little endian `(offset: u64, unix_ms: i64)`, in
//! strictly increasing offset order, exactly as the agent recorded them: every line starting at or
//! after `offset` (up to the next record) started at `unix_ms`. A resent chunk brings the same
//! records again; only records past the last stored one are appended, so resends are idempotent.
//! The times are auxiliary: they are not fsynced with each batch (the log bytes are), so a crash of
//! the coordinator may lose the times of the last moments, never log bytes.
//!
//! `<attempt>/<step>.truncated` exists when the agent reported that the step passed its log cap.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use drover_proto::v1::LineTime;

use super::entry::io_context;
use super::{validate_attempt, LogError, LogStore};

/// Size of one record in a `.times` file.
pub(crate) const RECORD: u64 = 16;

fn encode(t: &LineTime) -> [u8; RECORD as usize] {
    let mut out = [0u8; RECORD as usize];
    out[..8].copy_from_slice(&t.offset.to_le_bytes());
    out[8..].copy_from_slice(&t.unix_ms.to_le_bytes());
    out
}

fn record_at(file: &File, index: u64) -> io::Result<LineTime> {
    let mut buf = [0u8; RECORD as usize];
    file.read_exact_at(&mut buf, index * RECORD)?;
    let (off, ms) = buf.split_at(8);
    Ok(LineTime {
        offset: u64::from_le_bytes(off.try_into().unwrap_or_default()),
        unix_ms: i64::from_le_bytes(ms.try_into().unwrap_or_default()),
    })
}

fn times_path(dir: &Path, attempt: &str, step: u32) -> PathBuf {
    dir.join(attempt).join(format!("{step}.times"))
}

fn truncated_path(dir: &Path, attempt: &str, step: u32) -> PathBuf {
    dir.join(attempt).join(format!("{step}.truncated"))
}

/// A step's `.times` file held open for appending: its record count and last offset are read once,
/// so each batch of a streaming log costs one write, not an open, a stat, a read and a close.
#[derive(Debug)]
pub(super) struct TimesFile {
    file: File,
    path: PathBuf,
    /// Whole records in the file (a torn record at the end, from a crash mid-write, is overwritten).
    count: u64,
    /// The offset of the last stored record.
    last: Option<u64>,
}

impl TimesFile {
    /// Opens (creating it and its directory if missing) the times file of `step` of `attempt`.
    pub(super) fn open(dir: &Path, attempt: &str, step: u32) -> io::Result<Self> {
        let path = times_path(dir, attempt, step);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| io_context(e, "create log directory", parent))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_context(e, "open log times", &path))?;
        let count = file
            .metadata()
            .map_err(|e| io_context(e, "stat log times", &path))?
            .len()
            / RECORD;
        let last = if count == 0 {
            None
        } else {
            Some(
                record_at(&file, count - 1)
                    .map_err(|e| io_context(e, "read log times", &path))?
                    .offset,
            )
        };
        Ok(Self {
            file,
            path,
            count,
            last,
        })
    }

    /// Appends the records of `times` past the last stored one (records must increase in offset),
    /// so a resent chunk's records are not stored twice. A write of a few records into the page
    /// cache: done on the caller's thread.
    pub(super) fn append(&mut self, times: &[LineTime]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(times.len() * RECORD as usize);
        let mut last = self.last;
        for t in times {
            if last.is_none_or(|l| t.offset > l) {
                buf.extend_from_slice(&encode(t));
                last = Some(t.offset);
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&buf, self.count * RECORD)
            .map_err(|e| io_context(e, "write log times", &self.path))?;
        self.count += buf.len() as u64 / RECORD;
        self.last = last;
        Ok(())
    }
}

/// The records that time the bytes `[from, to)`: the one covering `from` (the latest at or before
/// it, if any) and every later one before `to`. Found by binary search, so reading a piece of a
/// long log costs a few small reads.
fn covering(path: &Path, from: u64, to: u64) -> io::Result<Vec<LineTime>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_context(e, "open log times", path)),
    };
    let count = file
        .metadata()
        .map_err(|e| io_context(e, "stat log times", path))?
        .len()
        / RECORD;
    let read = |i| record_at(&file, i).map_err(|e| io_context(e, "read log times", path));
    // First record with offset > from.
    let (mut lo, mut hi) = (0u64, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if read(mid)?.offset <= from {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut out = Vec::new();
    if lo > 0 {
        out.push(read(lo - 1)?);
    }
    for i in lo..count {
        let t = read(i)?;
        if t.offset >= to {
            break;
        }
        out.push(t);
    }
    Ok(out)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, LogError> {
    Ok(tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| io::Error::other(format!("log times task failed: {e}")))??)
}

impl LogStore {
    /// Stores the line times the agent sent with a chunk (idempotent for resends).
    pub async fn record_times(
        &self,
        attempt: &str,
        step: u32,
        times: &[LineTime],
    ) -> Result<(), LogError> {
        validate_attempt(attempt)?;
        if times.is_empty() {
            return Ok(());
        }
        if times.windows(2).any(|w| w[0].offset >= w[1].offset) {
            return Err(LogError::Invalid(
                "line times must be in strictly increasing offset order".into(),
            ));
        }
        // The log's entry keeps the file open and serialises its writers: two PushLogs streams of
        // one attempt (a reconnect racing the old stream) never interleave their appends.
        self.handle(attempt, step)?.entry.record_times(times).await
    }

    /// The line times covering bytes `[from, from + len)` of a step's log: the record of the line
    /// `from` falls in (which may start before `from`) and those of the lines starting inside.
    pub async fn times(
        &self,
        attempt: &str,
        step: u32,
        from: u64,
        len: u64,
    ) -> Result<Vec<LineTime>, LogError> {
        validate_attempt(attempt)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let path = times_path(self.dir(), attempt, step);
        blocking(move || covering(&path, from, from.saturating_add(len))).await
    }

    /// Records that the step's output passed the agent's log cap.
    pub async fn mark_truncated(&self, attempt: &str, step: u32) -> Result<(), LogError> {
        validate_attempt(attempt)?;
        let path = truncated_path(self.dir(), attempt, step);
        blocking(move || {
            if path.exists() {
                return Ok(());
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| io_context(e, "create log directory", parent))?;
            }
            File::create(&path)
                .map(drop)
                .map_err(|e| io_context(e, "mark log truncated", &path))
        })
        .await
    }

    /// Whether the step's output passed the agent's log cap.
    pub async fn is_truncated(&self, attempt: &str, step: u32) -> Result<bool, LogError> {
        validate_attempt(attempt)?;
        let path = truncated_path(self.dir(), attempt, step);
        Ok(tokio::fs::try_exists(&path)
            .await
            .map_err(|e| io_context(e, "look up log truncation", &path))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lt(offset: u64, unix_ms: i64) -> LineTime {
        LineTime { offset, unix_ms }
    }

    #[tokio::test]
    async fn times_are_idempotent_and_cover_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        store
            .record_times("a", 0, &[lt(0, 100), lt(10, 200)])
            .await
            .unwrap();
        // A resend overlapping what is stored only adds what is new.
        store
            .record_times("a", 0, &[lt(10, 200), lt(20, 300)])
            .await
            .unwrap();
        let all = store.times("a", 0, 0, 1000).await.unwrap();
        assert_eq!(all, vec![lt(0, 100), lt(10, 200), lt(20, 300)]);
        // A piece starting mid-line gets the record of that line first.
        assert_eq!(
            store.times("a", 0, 15, 10).await.unwrap(),
            vec![lt(10, 200), lt(20, 300)]
        );
        assert_eq!(store.times("a", 0, 12, 3).await.unwrap(), vec![lt(10, 200)]);
        assert_eq!(store.times("a", 0, 25, 5).await.unwrap(), vec![lt(20, 300)]);
        assert!(store.times("a", 1, 0, 5).await.unwrap().is_empty());
        assert!(store
            .record_times("a", 0, &[lt(40, 1), lt(30, 2)])
            .await
            .is_err());
        assert!(store.record_times("../x", 0, &[lt(0, 1)]).await.is_err());
    }

    #[tokio::test]
    async fn truncation_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path()).unwrap();
        assert!(!store.is_truncated("a", 0).await.unwrap());
        store.mark_truncated("a", 0).await.unwrap();
        store.mark_truncated("a", 0).await.unwrap();
        assert!(store.is_truncated("a", 0).await.unwrap());
        let reopened = LogStore::open(dir.path()).unwrap();
        assert!(reopened.is_truncated("a", 0).await.unwrap());
        assert!(!reopened.is_truncated("a", 1).await.unwrap());
    }
}
