//! The store's completion index and its grouped directory syncs.
//!
//! A log is complete once its row `(attempt, step, len)` is durable in `<root>/complete.db` (SQLite,
//! WAL, `synchronous=FULL`). Every log that completes at about the same time shares one transaction
//! and one sync of the index (a group commit: whoever flushes takes everything queued so far), and the
//! directory entries of new log files and directories are made durable in the same flush, each
//! directory once per flush however many files appeared in it. So the acknowledgement of a finished
//! step costs no marker file, no rename and no per-log directory sync.
//!
//! Rows are kept: they are small (an attempt id, two integers), so an empty log (a step that printed
//! nothing, common for `mkdir`, `cp`, `true`) needs no file or directory at all, ever: its row is its
//! whole record. A compressed `<step>.log.zst` also proves completion by itself (its frame header names
//! the length), so a non-empty log is readable whether or not its row survived.
//!
//! Stores written by earlier versions keep their completions in a text journal `complete.journal`
//! (one line `<attempt> <step> <len> end` each); it is imported into the index when the store opens
//! and then removed.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rusqlite::{params, Connection, OptionalExtension};

use super::entry::{io_context, sync_dir};
use super::LogKey;
use crate::recent::Recent;
use std::io;

/// File name of the text journal of earlier versions, imported and removed at open.
pub(super) const JOURNAL: &str = "complete.journal";

/// File name of the completion index in the store's directory.
pub(super) const INDEX: &str = "complete.db";

/// Work queued for the next flush.
#[derive(Debug, Default)]
struct Queued {
    /// Completions not yet written.
    records: HashMap<LogKey, u64>,
    /// Directories whose entries must be made durable.
    dirs: BTreeSet<PathBuf>,
    /// Ticket of the latest request; a flush that took the queue covers every ticket up to it.
    ticket: u64,
}

/// The writer's side, held by whoever flushes.
#[derive(Debug)]
struct Flusher {
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A flush failed: what was queued for it may be lost, so nothing more is acknowledged.
    broken: Option<String>,
    /// Flushes done (tests check that they are shared).
    flushes: u64,
}

/// Durable completions kept in memory after their flush.
const RECENT: usize = 8192;

/// The completion index of one store.
#[derive(Debug)]
pub(super) struct Journal {
    /// A std Mutex: held only to queue or take work, never across an await.
    queued: Mutex<Queued>,
    /// Completions taken by the flush under way, still answered from memory until they are durable
    /// (a reader must never see a log go from complete back to incomplete).
    flushing: Mutex<HashMap<LogKey, u64>>,
    /// A tokio Mutex: held across the flush, so the flushes are one at a time and the requests that
    /// queue meanwhile are all covered by the next one.
    flusher: tokio::sync::Mutex<Flusher>,
    /// The writing connection, used by one flush at a time (on a blocking thread).
    writer: Arc<Mutex<Connection>>,
    /// The last [`RECENT`] completions made durable, answered without a lookup in the index: a job's
    /// result, which checks every step's log is complete, follows their completion closely.
    recent: Mutex<Recent<LogKey, u64>>,
    /// A second connection for lookups: in WAL mode it reads the last commit while a flush writes.
    reader: Mutex<Connection>,
}

/// Parses text-journal lines into records; lines that do not parse are skipped. A crash mid-write
/// leaves a prefix of a line, which lacks the closing `end` (so a torn `42` read as `4` is impossible).
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

fn db_error(e: rusqlite::Error, what: &str, path: &Path) -> io::Error {
    io::Error::other(format!("{what} {}: {e}", path.display()))
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn open_connection(path: &Path) -> io::Result<Connection> {
    let conn = Connection::open(path).map_err(|e| db_error(e, "open log index", path))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
        .and_then(|()| conn.busy_timeout(std::time::Duration::from_secs(30)))
        .map_err(|e| db_error(e, "configure log index", path))?;
    Ok(conn)
}

/// Writes `records` in one transaction (one sync).
fn insert(conn: &mut Connection, records: &HashMap<LogKey, u64>, path: &Path) -> io::Result<()> {
    let tx = conn
        .transaction()
        .map_err(|e| db_error(e, "write log index", path))?;
    {
        let mut stmt = tx
            .prepare_cached(
                "INSERT OR REPLACE INTO complete (attempt, step, len) VALUES (?1, ?2, ?3)",
            )
            .map_err(|e| db_error(e, "write log index", path))?;
        for ((attempt, step), len) in records {
            let len = i64::try_from(*len).map_err(|_| io::Error::other("log length overflows"))?;
            stmt.execute(params![attempt, step, len])
                .map_err(|e| db_error(e, "write log index", path))?;
        }
    }
    tx.commit()
        .map_err(|e| db_error(e, "write log index", path))
}

impl Journal {
    /// Opens (or creates) the index of the store at `root`, importing and removing the text journal of
    /// an earlier version if there is one.
    pub(super) fn open(root: &Path) -> io::Result<Self> {
        let path = root.join(INDEX);
        let mut writer = open_connection(&path)?;
        writer
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS complete (
                    attempt TEXT NOT NULL,
                    step INTEGER NOT NULL,
                    len INTEGER NOT NULL,
                    PRIMARY KEY (attempt, step)
                ) WITHOUT ROWID;",
            )
            .map_err(|e| db_error(e, "create log index", &path))?;
        // The index file's own directory entry (and its WAL's) must be durable before anything in it
        // is acknowledged.
        sync_dir(root)?;
        let legacy = root.join(JOURNAL);
        match std::fs::read(&legacy) {
            Ok(bytes) => {
                insert(&mut writer, &parse(&String::from_utf8_lossy(&bytes)), &path)?;
                std::fs::remove_file(&legacy)
                    .map_err(|e| io_context(e, "remove imported log journal", &legacy))?;
                sync_dir(root)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_context(e, "read log journal", &legacy)),
        }
        let reader = open_connection(&path)?;
        Ok(Self {
            queued: Mutex::new(Queued::default()),
            flushing: Mutex::new(HashMap::new()),
            flusher: tokio::sync::Mutex::new(Flusher {
                durable: 0,
                broken: None,
                flushes: 0,
            }),
            writer: Arc::new(Mutex::new(writer)),
            recent: Mutex::new(Recent::new(RECENT)),
            reader: Mutex::new(reader),
        })
    }

    /// [`Journal::completed_len`] when memory knows it (queued, being flushed, or among the recent
    /// durable ones); `None` means "look in the index", not "incomplete".
    pub(super) fn completed_len_in_memory(&self, key: &LogKey) -> Option<u64> {
        if let Some(len) = guard(&self.queued).records.get(key) {
            return Some(*len);
        }
        if let Some(len) = guard(&self.flushing).get(key) {
            return Some(*len);
        }
        guard(&self.recent).get(key).copied()
    }

    /// The final length of a log whose completion was recorded (durable, or queued for the next
    /// flush). Blocking: a point lookup in the index unless memory knows.
    pub(super) fn completed_len(&self, key: &LogKey) -> io::Result<Option<u64>> {
        if let Some(len) = self.completed_len_in_memory(key) {
            return Ok(Some(len));
        }
        let conn = guard(&self.reader);
        conn.prepare_cached("SELECT len FROM complete WHERE attempt = ?1 AND step = ?2")
            .and_then(|mut stmt| {
                stmt.query_row(params![key.0, key.1], |r| r.get::<_, i64>(0))
                    .optional()
            })
            .map(|len| len.map(|l| l.max(0) as u64))
            .map_err(|e| io::Error::other(format!("read log index: {e}")))
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
            let mut q = guard(&self.queued);
            if let Some((key, len)) = complete {
                q.records.insert(key.clone(), len);
            }
            q.dirs.extend(dirs.iter().map(|d| d.to_path_buf()));
            q.ticket += 1;
            q.ticket
        };
        let mut f = self.flusher.lock().await;
        if let Some(why) = &f.broken {
            return Err(io::Error::other(format!(
                "the log index failed earlier ({why}); restart the coordinator"
            )));
        }
        if f.durable >= ticket {
            return Ok(());
        }
        let (records, dirs, upto) = {
            let mut q = guard(&self.queued);
            let records = std::mem::take(&mut q.records);
            // Still visible to lookups while it is written.
            guard(&self.flushing).clone_from(&records);
            (records, std::mem::take(&mut q.dirs), q.ticket)
        };
        let writer = self.writer.clone();
        let flushed = tokio::task::spawn_blocking(move || -> io::Result<HashMap<LogKey, u64>> {
            // Directories first: a record may name a log whose file was just created.
            for dir in &dirs {
                sync_dir(dir)?;
            }
            if !records.is_empty() {
                let mut conn = guard(&writer);
                let path = conn.path().map(PathBuf::from).unwrap_or_default();
                insert(&mut conn, &records, &path)?;
            }
            Ok(records)
        })
        .await
        .map_err(|e| io::Error::other(format!("log index task failed: {e}")))
        .and_then(|r| r);
        let records = match flushed {
            Ok(records) => records,
            Err(e) => {
                // Keep answering the lost records from memory: the entries that asked for them fail,
                // and nothing more is acknowledged.
                f.broken = Some(e.to_string());
                return Err(e);
            }
        };
        // Recent before the flushing copy goes: a lookup never misses a completion in between.
        let mut recent = guard(&self.recent);
        for (key, len) in records {
            recent.insert(key, len);
        }
        drop(recent);
        guard(&self.flushing).clear();
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
    async fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let key = ("att".to_string(), 3);
        {
            let j = Journal::open(dir.path()).unwrap();
            assert_eq!(j.completed_len(&key).unwrap(), None);
            j.commit(Some((&key, 42)), &[dir.path()]).await.unwrap();
            assert_eq!(j.completed_len(&key).unwrap(), Some(42));
        }
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.completed_len(&key).unwrap(), Some(42));
        assert_eq!(j.completed_len(&("att".to_string(), 4)).unwrap(), None);
    }

    /// The text journal of an earlier version is imported (torn lines skipped) and removed.
    #[tokio::test]
    async fn a_text_journal_is_imported_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(JOURNAL),
            "att 3 42 end\nempty 0 0 end\nother 1 1 en",
        )
        .unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert!(!dir.path().join(JOURNAL).exists());
        assert_eq!(j.completed_len(&("att".into(), 3)).unwrap(), Some(42));
        assert_eq!(j.completed_len(&("empty".into(), 0)).unwrap(), Some(0));
        assert_eq!(j.completed_len(&("other".into(), 1)).unwrap(), None);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.completed_len(&("att".into(), 3)).unwrap(), Some(42));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_commits_all_become_durable_in_shared_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let j = std::sync::Arc::new(Journal::open(dir.path()).unwrap());
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
        assert!(j.flushes().await < 200);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        for i in 0..200u32 {
            assert_eq!(
                j.completed_len(&("a".to_string(), i)).unwrap(),
                Some(u64::from(i))
            );
        }
    }
}
