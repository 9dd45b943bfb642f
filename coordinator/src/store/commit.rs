//! Group commit: one thread drains a queue of write batches and commits every batch waiting at that moment
//! in one SQLite transaction (one fsync), then runs each batch's `after` action in queue order and wakes
//! its waiter.
//!
//! Callers enqueue without blocking (the engine does so under its state lock, so the queue order is the
//! order in which changes were applied in memory) and await [`Commit::durable`]. The queue holds at most
//! one batch per operation in flight, since every caller awaits its own batch before answering anyone.
//!
//! A failed commit poisons the store: memory is then ahead of the file, so every later batch fails too and
//! nothing more is acknowledged; a restart reloads the last durable state.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use rusqlite::{Connection, Transaction};
use tokio::sync::{oneshot, watch};

use super::{apply_write, lock, StoreError, Write};

/// Runs after its batch is durable, on the committer thread, in queue order. Keep it short and never block
/// on anything the engine holds while it enqueues.
pub type After = Box<dyn FnOnce() + Send>;

/// A read-check-write step that runs inside the group's transaction, after the batch's writes, in queue
/// order (so it sees every batch queued before it). It reports its own outcome (for example through a
/// slot it captured, read once the batch is durable); an error it returns fails the whole group and
/// poisons the store, so it should return only SQLite failures and roll back its own refusals (a
/// savepoint) rather than error.
pub type Op = Box<dyn FnOnce(&mut Transaction<'_>) -> Result<(), StoreError> + Send>;

/// One queued batch.
struct Pending {
    writes: Vec<Write>,
    op: Option<Op>,
    after: Option<After>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

#[derive(Default)]
struct Queue {
    pending: Vec<Pending>,
    /// Sequence number of the last enqueued batch.
    enqueued: u64,
    /// Why the store stopped committing.
    poisoned: Option<String>,
    /// Every [`Store`](super::Store) handle is gone: the thread exits once the queue is empty.
    closed: bool,
    /// The committer is waiting on the condvar (or about to): the next enqueue must wake it. While it is
    /// writing or syncing a group it looks at the queue again before it waits, so enqueues then skip the
    /// wake-up (a futex syscall each, about three per job under load).
    idle: bool,
    /// When the committer last became idle.
    idle_since: Option<std::time::Instant>,
}

/// How long the committer must have been idle for [`Committer::enqueue_held`] to hold its wake-up
/// back: only a quiet coordinator trades a moment of its next commit for the latency of the messages
/// the change pushed. Under load the committer is rarely idle that long, and a held wake-up could
/// wait behind every task queued on the caller's worker.
const QUIET: std::time::Duration = std::time::Duration::from_micros(250);

/// State shared by the store handles and the committer thread.
pub(super) struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Sequence number of the last durable batch.
    durable: watch::Sender<u64>,
    /// Told how long each transaction took to write and sync.
    observer: Mutex<Option<Observer>>,
}

/// Receives the duration of every committed transaction (for metrics).
pub type Observer = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("durable", &*self.durable.borrow())
            .finish_non_exhaustive()
    }
}

fn queue(s: &Shared) -> MutexGuard<'_, Queue> {
    // Sections under this lock only move vectors and counters; recover rather than wedge.
    s.queue.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops the committer thread when the last store handle is dropped.
#[derive(Debug)]
pub(super) struct Committer {
    pub(super) shared: Arc<Shared>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        queue(&self.shared).closed = true;
        self.shared.wake.notify_all();
    }
}

/// The wake-up of an idle committer, held back by [`Committer::enqueue_held`]'s caller: it happens
/// when this is dropped (so also if the caller's future is dropped first).
#[derive(Debug)]
pub struct HeldWake {
    shared: Arc<Shared>,
}

impl Drop for HeldWake {
    fn drop(&mut self) {
        self.shared.wake.notify_one();
    }
}

/// A batch in the queue; await [`Commit::durable`].
#[derive(Debug)]
pub struct Commit {
    rx: oneshot::Receiver<Result<(), StoreError>>,
}

impl Commit {
    /// Resolves once the batch is committed (and its `after` action ran), or with the commit's error.
    pub async fn durable(self) -> Result<(), StoreError> {
        self.rx
            .await
            .map_err(|_| StoreError::Task("the committer thread stopped".into()))?
    }
}

impl Committer {
    /// Start the committer thread over `conn`.
    pub(super) fn start(conn: Arc<Mutex<Connection>>) -> Result<Committer, StoreError> {
        let (durable, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            durable,
            observer: Mutex::new(None),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("drover-store-commit".into())
            .spawn(move || run(&thread_shared, &conn))
            .map_err(|e| StoreError::Task(format!("cannot start the committer thread: {e}")))?;
        Ok(Committer { shared })
    }

    /// Queue `writes`; `after` runs once they are durable, before the waiter wakes.
    pub(super) fn enqueue(&self, writes: Vec<Write>, after: Option<After>) -> Commit {
        self.enqueue_op(writes, None, after)
    }

    /// [`Committer::enqueue`] with an [`Op`] that runs in the transaction after `writes`.
    pub(super) fn enqueue_op(
        &self,
        writes: Vec<Write>,
        op: Option<Op>,
        after: Option<After>,
    ) -> Commit {
        self.push(writes, op, after, false).0
    }

    /// [`Committer::enqueue`], but if the committer has been idle for [`QUIET`] its wake-up is handed
    /// to the caller, to happen when the [`HeldWake`] is dropped (nobody else wakes it meanwhile). For
    /// a caller with something more urgent to finish first on its thread; it must not hold the wake-up
    /// long.
    pub(super) fn enqueue_held(
        &self,
        writes: Vec<Write>,
        after: Option<After>,
    ) -> (Commit, Option<HeldWake>) {
        self.push(writes, None, after, true)
    }

    fn push(
        &self,
        writes: Vec<Write>,
        op: Option<Op>,
        after: Option<After>,
        hold: bool,
    ) -> (Commit, Option<HeldWake>) {
        let (done, rx) = oneshot::channel();
        let mut q = queue(&self.shared);
        if let Some(why) = &q.poisoned {
            let _ = done.send(Err(StoreError::Poisoned(why.clone())));
            return (Commit { rx }, None);
        }
        q.enqueued += 1;
        q.pending.push(Pending {
            writes,
            op,
            after,
            done,
        });
        let wake = std::mem::take(&mut q.idle);
        // The clock is read only for a caller that may hold the wake-up of an idle committer.
        let held_back = wake && hold && q.idle_since.is_some_and(|t| t.elapsed() >= QUIET);
        drop(q);
        if !wake {
            return (Commit { rx }, None);
        }
        let held = HeldWake {
            shared: self.shared.clone(),
        };
        if held_back {
            (Commit { rx }, Some(held))
        } else {
            drop(held);
            (Commit { rx }, None)
        }
    }

    /// Sequence number of the last enqueued batch.
    pub(super) fn enqueued(&self) -> u64 {
        queue(&self.shared).enqueued
    }

    /// Wait until every batch up to `seq` is durable.
    pub(super) async fn wait_durable(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.shared.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= seq {
                return Ok(());
            }
            if let Some(why) = &queue(&self.shared).poisoned {
                return Err(StoreError::Poisoned(why.clone()));
            }
            rx.changed()
                .await
                .map_err(|_| StoreError::Task("the committer thread stopped".into()))?;
        }
    }

    /// Tell `observer` how long each transaction takes from now on.
    pub(super) fn observe(&self, observer: Observer) {
        *self
            .shared
            .observer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(observer);
    }

    /// Why the store stopped committing, if it did.
    pub(super) fn poisoned(&self) -> Option<String> {
        queue(&self.shared).poisoned.clone()
    }
}

/// WAL frames (pages) past which the committer checkpoints between two groups so that the WAL starts
/// over from its beginning (16 MiB of 4 KiB pages).
///
/// Under a steady load the background checkpointer never catches up with the end of the WAL (the
/// committer appends while it copies), so SQLite never restarts the log and the file grows without
/// bound: every commit then writes into new file blocks, which costs page-cache allocation and
/// zeroing, block allocation and a journalled metadata update in every fsync (measured: the WAL grew
/// 80 MB/s at 1,400 jobs/s and `pwrite` alone was a fifth of the coordinator's CPU). Checkpointing
/// from the committer itself, between groups, copies only what the background pass left and lets
/// the next transaction rewrite the same, already allocated and cached, blocks.
const RESTART_WAL_AT: i32 = 4096;

thread_local! {
    /// Frames in the WAL after the last commit made on this thread (set by [`note_wal_frames`]).
    static WAL_FRAMES: std::cell::Cell<i32> = const { std::cell::Cell::new(0) };
}

/// The store connection's WAL hook: remembers how long the WAL is after each commit.
pub(super) fn note_wal_frames(
    _: &rusqlite::hooks::Wal,
    frames: std::ffi::c_int,
) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

/// Checkpoint the whole WAL (PASSIVE: when the background checkpointer holds the checkpoint lock this
/// returns at once and the next group tries again), so that the next transaction restarts the log.
fn restart_wal(conn: &Mutex<Connection>) {
    let c = lock(conn);
    match c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0)) {
        // Busy: the next group retries. Done: the next write starts the WAL over.
        Ok(_) => WAL_FRAMES.set(0),
        Err(e) => tracing::warn!("WAL checkpoint failed: {e}"),
    }
}

fn run(shared: &Shared, conn: &Mutex<Connection>) {
    let mut durable = 0u64;
    loop {
        let group = {
            let mut q = queue(shared);
            while q.pending.is_empty() && !q.closed {
                if !q.idle {
                    q.idle = true;
                    q.idle_since = Some(std::time::Instant::now());
                }
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.idle = false;
            if q.pending.is_empty() {
                return;
            }
            std::mem::take(&mut q.pending)
        };
        let mut group = group;
        let began = std::time::Instant::now();
        let result = write_group(conn, &mut group);
        match result {
            Ok(wrote) => {
                if wrote {
                    let observer = shared
                        .observer
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if let Some(o) = observer {
                        o(began.elapsed());
                    }
                }
                durable += group.len() as u64;
                let mut waiters = Vec::with_capacity(group.len());
                for p in group {
                    if let Some(after) = p.after {
                        after();
                    }
                    waiters.push(p.done);
                }
                shared.durable.send_replace(durable);
                for w in waiters {
                    let _ = w.send(Ok(()));
                }
                // After the waiters are answered: the checkpoint delays the next group, not this one.
                if WAL_FRAMES.get() >= RESTART_WAL_AT {
                    restart_wal(conn);
                }
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(
                    "store commit failed: {why}; no further change will be acknowledged until restart"
                );
                let mut q = queue(shared);
                q.poisoned = Some(why.clone());
                // Batches queued behind the failed one were computed from state that never became durable.
                let mut failed: Vec<Pending> = std::mem::take(&mut q.pending);
                drop(q);
                failed.extend(group);
                for p in failed {
                    let _ = p.done.send(Err(StoreError::Poisoned(why.clone())));
                }
                // Readers waiting for durability see the poison on their next wake-up.
                shared.durable.send_modify(|_| {});
            }
        }
    }
}

/// Write every batch of `group` in one transaction; false when there was nothing to write.
fn write_group(conn: &Mutex<Connection>, group: &mut [Pending]) -> Result<bool, StoreError> {
    if group.iter().all(|p| p.writes.is_empty() && p.op.is_none()) {
        return Ok(false);
    }
    let mut c = lock(conn);
    let mut tx = c.transaction()?;
    for p in group.iter_mut() {
        for w in &p.writes {
            apply_write(&tx, w)?;
        }
        if let Some(op) = p.op.take() {
            op(&mut tx)?;
        }
    }
    tx.commit()?;
    Ok(true)
}
