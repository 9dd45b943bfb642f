//! The store's completion journal and its grouped directory syncs.
//!
//! A log is complete once a line `<attempt> <step> <len> end\n` is durable in `<root>/complete.journal`.
//! Every log that completes at about the same time shares one write and one `fdatasync` of the
//! journal (a group commit: whoever flushes takes everything queued so far), and the directory
//! entries of new log files and directories are made durable in the same flush, each directory once
//! per flush however many files appeared in it. So the acknowledgement of a finished step costs no
//! marker file, no rename and no per-log directory sync.
//!
//! A record is needed only until the log is stored compressed: `<step>.log.zst` names the log's length
//! in its frame header and is renamed into place only once synced, so its presence proves completion.
//! The records still needed are held in memory (bounded by the logs completing or compressing now); the
//! journal is rewritten from them when it grows past [`ROTATE_BYTES`] and when the store opens, so it
//! stays small and a torn last line (a crash mid-write) never stays behind new records.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use super::entry::{io_context, sync_dir};
use super::LogKey;

/// File name of the journal in the store's directory.
pub(super) const JOURNAL: &str = "complete.journal";

/// The journal is rewritten (keeping only the records still needed) when it grows past this.
const ROTATE_BYTES: u64 = 4 << 20;

/// Work queued for the next flush.
#[derive(Debug, Default)]
struct Queued {
    /// Records not yet written.
    records: Vec<u8>,
    /// Directories whose entries must be made durable.
    dirs: BTreeSet<PathBuf>,
    /// Ticket of the latest request; a flush that took the queue covers every ticket up to it.
    ticket: u64,
}

/// The journal file, held by whoever flushes.
#[derive(Debug)]
struct Flusher {
    file: File,
    /// Bytes in the journal file.
    size: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush failed: what was queued for it may be lost, so nothing more is acknowledged.
    broken: Option<String>,
    /// Flushes done (tests check that they are shared).
    flushes: u64,
}

/// The completion journal of one store.
#[derive(Debug)]
pub(super) struct Journal {
    root: PathBuf,
    path: PathBuf,
    /// A std Mutex: held only to queue or take work, never across an await.
    queued: Mutex<Queued>,
    /// A tokio Mutex: held across the flush, so the flushes are one at a time and the requests that
    /// queue meanwhile are all covered by the next one.
    flusher: tokio::sync::Mutex<Flusher>,
    /// Completed logs not yet stored compressed: their final length. A std Mutex, short sections only.
    pending: Mutex<HashMap<LogKey, u64>>,
}

/// Parses journal text into records; lines that do not parse are skipped. A crash mid-write leaves
/// a prefix of a line, which lacks the closing `end` (so a torn `42` read as `4` is impossible).
fn parse(text: &str) -> HashMap<LogKey, u64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split(' ');
        let (Some(attempt), Some(step), Some(len), Some("end"), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        let (Ok(step), Ok(len)) = (step.parse::<u32>(), len.parse::<u64>()) else {
            continue;
        };
        if super::validate_attempt(attempt).is_err() {
            continue;
        }
        out.insert((attempt.to_owned(), step), len);
    }
    out
}

fn record(out: &mut Vec<u8>, key: &LogKey, len: u64) {
    // Attempt ids are `[A-Za-z0-9_-]` (validated), so a space separates fields unambiguously.
    let _ = writeln!(out, "{} {} {len} end", key.0, key.1);
}

/// Writes `records` as the whole journal: to a temporary file, synced, renamed over the journal and
/// the directory synced. Returns the open journal (for appending) and its size.
fn rewrite(root: &Path, path: &Path, records: &HashMap<LogKey, u64>) -> io::Result<(File, u64)> {
    let mut text = Vec::new();
    for (key, len) in records {
        record(&mut text, key, *len);
    }
    let tmp = root.join(format!("{JOURNAL}.tmp"));
    let mut f = File::create(&tmp).map_err(|e| io_context(e, "create log journal", &tmp))?;
    f.write_all(&text)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_context(e, "write log journal", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_context(e, "replace log journal", path))?;
    sync_dir(root)?;
    let file = OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io_context(e, "open log journal", path))?;
    Ok((file, text.len() as u64))
}

impl Journal {
    /// Opens the journal of the store at `root`: reads its records, drops those of logs already
    /// stored compressed (`compressed` says whether one is; its rename is made durable first) and
    /// rewrites the rest.
    pub(super) fn open(
        root: &Path,
        compressed: impl Fn(&LogKey) -> Option<PathBuf>,
    ) -> io::Result<Self> {
        let path = root.join(JOURNAL);
        let mut records = match std::fs::read(&path) {
            Ok(bytes) => parse(&String::from_utf8_lossy(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(io_context(e, "read log journal", &path)),
        };
        let mut synced = BTreeSet::new();
        records.retain(|key, _| match compressed(key) {
            Some(dir) => {
                // The compressed file's directory entry may still be only in memory (a clean
                // restart does not flush it): make it durable before its record goes.
                if synced.insert(dir.clone()) {
                    if let Err(e) = sync_dir(&dir) {
                        tracing::warn!(error = %e, "keeping a journal record");
                        return true;
                    }
                }
                false
            }
            None => true,
        });
        let (file, size) = rewrite(root, &path, &records)?;
        Ok(Self {
            root: root.to_owned(),
            path,
            queued: Mutex::new(Queued::default()),
            flusher: tokio::sync::Mutex::new(Flusher {
                file,
                size,
                durable: 0,
                broken: None,
                flushes: 0,
            }),
            pending: Mutex::new(records),
        })
    }

    /// The final length of a completed log whose record is still kept (not yet compressed).
    pub(super) fn completed_len(&self, key: &LogKey) -> Option<u64> {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// The log is stored compressed (durably): its record is no longer needed.
    pub(super) fn forget(&self, key: &LogKey) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }

    /// Makes durable the completion of `complete` (a log and its final length) if given, and the
    /// entries of `dirs`; returns once they are on disk. Callers that arrive while a flush runs are
    /// all served by the next one.
    pub(super) async fn commit(
        &self,
        complete: Option<(&LogKey, u64)>,
        dirs: &[&Path],
    ) -> Result<(), io::Error> {
        let ticket = {
            let mut q = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((key, len)) = complete {
                record(&mut q.records, key, len);
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key.clone(), len);
            }
            q.dirs.extend(dirs.iter().map(|d| d.to_path_buf()));
            q.ticket += 1;
            q.ticket
        };
        let mut f = self.flusher.lock().await;
        if let Some(why) = &f.broken {
            return Err(io::Error::other(format!(
                "the log journal failed earlier ({why}); restart the coordinator"
            )));
        }
        if f.durable >= ticket {
            return Ok(());
        }
        let (records, dirs, upto) = {
            let mut q = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
            (
                std::mem::take(&mut q.records),
                std::mem::take(&mut q.dirs),
                q.ticket,
            )
        };
        let appended = records.len() as u64;
        let rotate = f.size + appended > ROTATE_BYTES;
        let snapshot = rotate.then(|| {
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        });
        let file = f.file.try_clone()?;
        let (root, path) = (self.root.clone(), self.path.clone());
        let flushed = tokio::task::spawn_blocking(move || -> io::Result<Option<(File, u64)>> {
            // Directories first: a record may name a log whose file was just created.
            for dir in &dirs {
                sync_dir(dir)?;
            }
            if let Some(records) = snapshot {
                // Every queued record is in the snapshot (it was inserted before its ticket).
                return rewrite(&root, &path, &records).map(Some);
            }
            if !records.is_empty() {
                let mut file = file;
                file.write_all(&records)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io_context(e, "write log journal", &path))?;
            }
            Ok(None)
        })
        .await
        .map_err(|e| io::Error::other(format!("log journal task failed: {e}")))
        .and_then(|r| r);
        match flushed {
            Ok(Some((file, size))) => {
                f.file = file;
                f.size = size;
            }
            Ok(None) => f.size += appended,
            Err(e) => {
                f.broken = Some(e.to_string());
                return Err(e);
            }
        }
        f.durable = upto;
        f.flushes += 1;
        Ok(())
    }

    /// Flushes done so far.
    #[cfg(test)]
    pub(super) async fn flushes(&self) -> u64 {
        self.flusher.lock().await.flushes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_and_foreign_lines_are_skipped() {
        let got = parse("a 0 5 end\nb 1 0 end\nbad line here x\n../x 0 1 end\nc 2 17 end");
        assert_eq!(got.get(&("a".into(), 0)), Some(&5));
        assert_eq!(got.get(&("b".into(), 1)), Some(&0));
        assert_eq!(got.get(&("c".into(), 2)), Some(&17));
        assert_eq!(got.len(), 3);
        // Every prefix of a record (a write torn by a crash) is skipped, including a shorter length.
        let line = "c 2 17 end";
        for cut in 0..line.len() {
            assert!(parse(&line[..cut]).is_empty(), "{:?}", &line[..cut]);
        }
    }

    #[tokio::test]
    async fn records_survive_reopening_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let key = ("att".to_string(), 3);
        {
            let j = Journal::open(dir.path(), |_| None).unwrap();
            j.commit(Some((&key, 42)), &[dir.path()]).await.unwrap();
            assert_eq!(j.completed_len(&key), Some(42));
        }
        // A torn line appended by a crash is dropped when the journal opens again.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(JOURNAL))
            .unwrap()
            .write_all(b"other 1 1 en")
            .unwrap();
        let j = Journal::open(dir.path(), |_| None).unwrap();
        assert_eq!(j.completed_len(&key), Some(42));
        let text = std::fs::read_to_string(dir.path().join(JOURNAL)).unwrap();
        assert_eq!(text, "att 3 42 end\n");
        drop(j);
        // Once the log is compressed, its record goes.
        let j = Journal::open(dir.path(), |_| Some(dir.path().to_owned())).unwrap();
        assert_eq!(j.completed_len(&key), None);
        assert_eq!(std::fs::read(dir.path().join(JOURNAL)).unwrap(), b"");
    }

    #[tokio::test]
    async fn concurrent_commits_all_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(dir.path(), |_| None).unwrap());
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                let key = ("a".to_string(), i);
                j.commit(Some((&key, u64::from(i))), &[]).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join(JOURNAL)).unwrap();
        let got = parse(&text);
        assert_eq!(got.len(), 200);
        assert_eq!(text.lines().count(), 200);
    }
}
