//! Step output: captured into a spool file per step (the source of truth), shipped to the
//! coordinator on a `PushLogs` stream from the last acknowledged offset.
//!
//! The spool writer publishes the spool length on a watch channel after every write, so the
//! shipper wakes up at once (no polling, no batching delay) and a reconnect resends from the
//! coordinator's durable offset.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use drover_proto::direct::DirectAppend;
use drover_proto::v1::{LineTime, LogAck, LogChunk};
use drover_proto::CHUNK_BYTES;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::executor::OutputSink;
use crate::logtimes::{self, LineClock};

/// What the shipper knows of one step's spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepLogState {
    /// Bytes in the spool file.
    pub len: u64,
    /// The step will write no more.
    pub finished: bool,
    /// The step passed the log cap; its later output was dropped.
    pub truncated: bool,
}

/// What the shipper knows of an attempt's spools.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogState {
    /// Steps that have a spool, by index.
    pub steps: BTreeMap<u32, StepLogState>,
    /// No more steps will be added.
    pub closed: bool,
}

/// The spool directory of one attempt: `<state>/spool/<attempt>/<step>.log`, with the line
/// times of each step in `<step>.times` (see [`crate::logtimes`]).
#[derive(Debug)]
pub struct AttemptSpool {
    dir: PathBuf,
    state: watch::Sender<LogState>,
    /// The latest bytes written, for the shipper.
    tail: Arc<Mutex<SpoolTail>>,
    /// Per-step log cap in bytes; output past it is dropped behind a marker line.
    max_log_bytes: u64,
}

/// Default per-step log cap: 100 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 100 * 1024 * 1024;

impl AttemptSpool {
    /// Creates (or empties) the spool directory of `attempt_id` under `spool_root`.
    pub async fn create(spool_root: &Path, attempt_id: &str) -> io::Result<Self> {
        let dir = spool_root.join(safe_file_name(attempt_id));
        if tokio::fs::try_exists(&dir).await? {
            tokio::fs::remove_dir_all(&dir).await?;
        }
        tokio::fs::create_dir_all(&dir).await?;
        Ok(Self {
            dir,
            state: watch::Sender::new(LogState::default()),
            tail: Arc::default(),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        })
    }

    /// Sets the per-step log cap (0 means no cap).
    pub fn with_max_log_bytes(mut self, max_log_bytes: u64) -> Self {
        self.max_log_bytes = if max_log_bytes == 0 {
            u64::MAX
        } else {
            max_log_bytes
        };
        self
    }

    /// Opens the spool an earlier run of the agent left for `attempt_id` (after a crash), keeping
    /// its bytes: steps before `current` are finished at their spool's length; step `current` is
    /// reopened for appending (it is created if missing). The shipper resends from offset 0 and
    /// the coordinator's idempotent append skips what it already has.
    pub async fn reopen(
        spool_root: &Path,
        attempt_id: &str,
        current: u32,
    ) -> io::Result<(Self, StepSpool)> {
        let dir = spool_root.join(safe_file_name(attempt_id));
        tokio::fs::create_dir_all(&dir).await?;
        let mut state = LogState::default();
        for index in 0..current {
            let len = match tokio::fs::metadata(step_path(&dir, index)).await {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            };
            state.steps.insert(
                index,
                StepLogState {
                    len,
                    finished: true,
                    ..Default::default()
                },
            );
        }
        let (file, appender) = open_spool(step_path(&dir, current), false).await?;
        let len = appender.len();
        state.steps.insert(
            current,
            StepLogState {
                len,
                finished: false,
                ..Default::default()
            },
        );
        let times = open_for_append(times_path(&dir, current)).await?;
        let spool = Self {
            dir,
            state: watch::Sender::new(state),
            tail: Arc::default(),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        };
        let step = StepSpool {
            file,
            appender,
            len,
            index: current,
            state: spool.state.clone(),
            tail: spool.tail.clone(),
            times: Arc::new(times),
            // Where the earlier run stopped is unknown: the next read is stamped as a line start.
            clock: LineClock::default(),
            cap: spool.max_log_bytes,
            truncated: len >= spool.max_log_bytes,
            ends_line: true,
        };
        Ok((spool, step))
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a step's spool file.
    pub fn step_path(&self, index: u32) -> PathBuf {
        step_path(&self.dir, index)
    }

    /// Creates the spool of step `index` and announces it to the shipper.
    pub async fn open_step(&self, index: u32) -> io::Result<StepSpool> {
        let (file, appender) = open_spool(self.step_path(index), true).await?;
        let times = create_for_append(times_path(&self.dir, index)).await?;
        self.state.send_modify(|s| {
            s.steps.insert(index, StepLogState::default());
        });
        Ok(StepSpool {
            file,
            appender,
            len: 0,
            index,
            state: self.state.clone(),
            tail: self.tail.clone(),
            times: Arc::new(times),
            clock: LineClock::default(),
            cap: self.max_log_bytes,
            truncated: false,
            ends_line: true,
        })
    }

    /// No more steps will be added: the shipper finishes once every step is acknowledged.
    pub fn close(&self) {
        self.state.send_modify(|s| s.closed = true);
    }

    /// A receiver for a shipper.
    pub fn subscribe(&self) -> watch::Receiver<LogState> {
        self.state.subscribe()
    }

    /// Deletes the spool files (after the attempt completed).
    pub async fn remove(&self) -> io::Result<()> {
        match tokio::fs::remove_dir_all(&self.dir).await {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The spool file of one step. Dropping it marks the step's log finished.
#[derive(Debug)]
pub struct StepSpool {
    /// Appended to by `append`, one write at a time, through `appender`.
    file: std::fs::File,
    /// Writes the whole blocks of a fast log past the page cache: copying them into fresh
    /// page-cache pages was the largest part of the agent's CPU per MiB of log (`perf`). The
    /// shipper reads the spool only for bytes its in-memory tail no longer holds.
    appender: DirectAppend,
    len: u64,
    index: u32,
    state: watch::Sender<LogState>,
    /// Where each write is also kept for the shipper.
    tail: Arc<Mutex<SpoolTail>>,
    /// The line-time sidecar.
    times: Arc<std::fs::File>,
    clock: LineClock,
    /// Bytes of step output kept at most.
    cap: u64,
    /// The cap was reached and the marker written: everything further is dropped.
    truncated: bool,
    /// The last byte written was a newline (or nothing was written).
    ends_line: bool,
}

impl StepSpool {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl StepSpool {
    /// Appends `data` to the spool, its line time (if it starts a line) to the sidecar first, so
    /// the shipper never reads bytes whose times are not written yet: plain `write`s to files
    /// opened for appending, readable by the shipper as soon as they return. The bytes are also
    /// kept in the attempt's [`SpoolTail`], so the shipper sends them without reading them back.
    ///
    /// Written on the calling task, not on a blocking thread: a write of at most a MiB into the
    /// page cache takes microseconds, while the two thread switches of a trip to a blocking
    /// thread per write were half the agent's CPU time on a fast log (profiled with `perf`).
    async fn append(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let time = self.clock.observe(self.len, &data, logtimes::now_ms());
        if let Some(t) = &time {
            (&*self.times).write_all(&logtimes::encode(t))?;
        }
        self.appender.append(&self.file, &[&data])?;
        let offset = self.len;
        self.len += data.len() as u64;
        self.ends_line = data.last() == Some(&b'\n');
        lock(&self.tail).push(self.index, offset, data, time);
        Ok(())
    }
}

impl OutputSink for StepSpool {
    async fn write(&mut self, data: Bytes) -> io::Result<()> {
        if data.is_empty() || self.truncated {
            return Ok(());
        }
        let room = self.cap.saturating_sub(self.len);
        if (data.len() as u64) <= room {
            self.append(data).await?;
        } else {
            // Keep what fits, then say (in the log itself) that the rest is dropped: the job runs on.
            self.append(data.slice(..room as usize)).await?;
            let marker = format!(
                "{}[drover] log truncated at {} bytes\n",
                if self.ends_line { "" } else { "\n" },
                self.cap
            );
            self.append(Bytes::from(marker)).await?;
            self.truncated = true;
        }
        let (index, len, truncated) = (self.index, self.len, self.truncated);
        self.state.send_modify(|s| {
            let st = s.steps.entry(index).or_default();
            st.len = len;
            st.truncated = truncated;
        });
        Ok(())
    }
}

/// Most bytes an attempt's [`SpoolTail`] holds.
const TAIL_BYTES: usize = 4 << 20;

/// The latest bytes written to an attempt's spools (at most [`TAIL_BYTES`]) and their line times,
/// kept in memory so the shipper sends the very buffers the spool writer wrote instead of reading
/// them back from the page cache (a copy, and a zeroed buffer to copy into, per byte of a fast log,
/// plus a binary search of the times sidecar per span). The spool files stay the source of truth:
/// bytes the tail no longer holds (a shipper that fell behind, a resend after a reconnect, an agent
/// restart) are read from them.
#[derive(Debug, Default)]
struct SpoolTail {
    /// In the order written, so ascending by `(step, offset)`.
    pieces: VecDeque<Held>,
    /// Bytes in `pieces`.
    held: usize,
}

/// One write to a step's spool.
#[derive(Debug)]
struct Held {
    step: u32,
    offset: u64,
    data: Bytes,
    /// The line time the write recorded in the sidecar, if any (at most one per write).
    time: Option<LineTime>,
}

impl Held {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

impl SpoolTail {
    /// Keeps the bytes written at `offset` of `step` (and the line time recorded with them),
    /// forgetting the oldest past [`TAIL_BYTES`].
    fn push(&mut self, step: u32, offset: u64, data: Bytes, time: Option<LineTime>) {
        if self
            .pieces
            .back()
            .is_some_and(|h| (h.step, h.end()) > (step, offset))
        {
            // Not after the last piece (a step's spool reopened): start over, the file has it all.
            self.pieces.clear();
            self.held = 0;
        }
        self.held += data.len();
        self.pieces.push_back(Held {
            step,
            offset,
            data,
            time,
        });
        while self.held > TAIL_BYTES {
            let Some(h) = self.pieces.pop_front() else {
                break;
            };
            self.held -= h.data.len();
        }
    }

    /// Forgets the bytes of `step` before `offset` (acknowledged: never sent again).
    fn forget(&mut self, step: u32, offset: u64) {
        while let Some(h) = self.pieces.front() {
            if h.step > step || (h.step == step && h.end() > offset) {
                break;
            }
            self.held -= h.data.len();
            self.pieces.pop_front();
        }
    }

    /// The bytes `[offset, offset + len)` of `step`, as slices of the pieces that hold them, and the
    /// line times recorded for them; `None` unless all of the bytes are held.
    fn get(&self, step: u32, offset: u64, len: usize) -> Option<(Vec<Bytes>, Vec<LineTime>)> {
        let end = offset + len as u64;
        let first = self
            .pieces
            .partition_point(|h| (h.step, h.end()) <= (step, offset));
        let mut out = Vec::new();
        let mut times = Vec::new();
        let mut at = offset;
        for h in self.pieces.range(first..) {
            if at == end || h.step != step || h.offset > at {
                break;
            }
            let to = (end - h.offset).min(h.data.len() as u64) as usize;
            out.push(h.data.slice((at - h.offset) as usize..to));
            times.extend(h.time.filter(|t| t.offset >= offset && t.offset < end));
            at = h.offset + to as u64;
        }
        (at == end).then_some((out, times))
    }
}

/// `pieces` cut and joined into chunks of at most [`CHUNK_BYTES`] each: a chunk within one piece
/// is a slice of it (no copy); only pieces smaller than a chunk are copied together.
fn into_chunks(pieces: Vec<Bytes>) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut gathered: Vec<Bytes> = Vec::new();
    let mut gathered_len = 0;
    let flush = |gathered: &mut Vec<Bytes>, out: &mut Vec<Bytes>| match gathered.len() {
        0 => {}
        1 => out.push(gathered.pop().unwrap_or_default()),
        _ => {
            let mut joined = BytesMut::with_capacity(gathered.iter().map(Bytes::len).sum());
            for p in gathered.drain(..) {
                joined.extend_from_slice(&p);
            }
            out.push(joined.freeze());
        }
    };
    for mut piece in pieces {
        while !piece.is_empty() {
            let take = piece.len().min(CHUNK_BYTES - gathered_len);
            gathered.push(piece.split_to(take));
            gathered_len += take;
            if gathered_len == CHUNK_BYTES {
                flush(&mut gathered, &mut out);
                gathered_len = 0;
            }
        }
    }
    flush(&mut gathered, &mut out);
    out
}

/// Locks `m`, whatever a panicking holder left (the tail is a cache; the spool file is the truth).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for StepSpool {
    fn drop(&mut self) {
        let index = self.index;
        self.state.send_modify(|s| {
            s.steps.entry(index).or_default().finished = true;
        });
    }
}

/// Opens a step's spool file for appending, created empty when `create`, else created if missing
/// with what is there kept.
async fn open_spool(path: PathBuf, create: bool) -> io::Result<(std::fs::File, DirectAppend)> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(create)
            .read(true)
            .write(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        let appender = DirectAppend::open(&path, &file, len)?;
        Ok((file, appender))
    })
    .await
    .map_err(io::Error::other)?
}

/// Opens `path` for appending, creating it if missing (keeps what is there).
async fn open_for_append(path: PathBuf) -> io::Result<std::fs::File> {
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    })
    .await
    .map_err(io::Error::other)?
}

/// Creates `path` empty for appending.
async fn create_for_append(path: PathBuf) -> io::Result<std::fs::File> {
    tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
    })
    .await
    .map_err(io::Error::other)?
}

fn step_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("{index}.log"))
}

fn times_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("{index}.times"))
}

/// A file name made of the safe characters of `s` (attempt ids come from the coordinator).
pub fn safe_file_name(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "_".to_string()
    } else {
        cleaned
    }
}

/// One open `PushLogs` stream.
#[derive(Debug)]
pub struct LogStream {
    /// Chunks to the coordinator.
    pub chunks: mpsc::Sender<LogChunk>,
    /// Acknowledgements from it; the stream ends or errors when the connection is gone.
    pub acks: mpsc::Receiver<Result<LogAck, Status>>,
}

/// Opens `PushLogs` streams (the gRPC client in production).
pub trait LogTransport: Send + Sync {
    /// Opens a new stream.
    fn open(&self) -> impl Future<Output = Result<LogStream, Status>> + Send;
}

/// Why shipping stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The coordinator refused the attempt's logs (stale epoch, revoked credential, ...).
    #[error("the coordinator refused the logs: {0}")]
    Rejected(Status),
    /// A spool file could not be read.
    #[error("reading the spool of step {step}: {source}")]
    Spool {
        /// Step index.
        step: u32,
        /// The I/O error.
        source: io::Error,
    },
}

/// Status codes that retrying cannot fix.
pub fn is_fatal(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::Aborted
    )
}

#[derive(Debug, Clone, Copy, Default)]
struct Acked {
    durable: u64,
    complete: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    next: u64,
    eof: bool,
}

/// A span shorter than a chunk waits until this long after the previous span was read. The
/// shipper wakes at every spool write (a read from the container: 30-40 KiB on a fast log), and
/// sending each as its own message cost a message, a wake-up of every task on the way in both
/// processes and a write at the coordinator per 40 KiB (`perf stat`: 28 messages and 116 context
/// switches of the agent per MiB). A log that sent nothing for this long sends its first bytes at
/// once.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(2);

/// Bytes of spool read at once, then sent as chunks of at most [`CHUNK_BYTES`].
const SPAN_BYTES: usize = 8 * CHUNK_BYTES;

/// The next span to send: (step, offset, length, eof); at most `max` bytes.
fn next_span(
    state: &LogState,
    sent: &BTreeMap<u32, Sent>,
    acked: &BTreeMap<u32, Acked>,
    max: usize,
) -> Option<(u32, u64, usize, bool)> {
    for (&step, s) in &state.steps {
        if acked.get(&step).is_some_and(|a| a.complete) {
            continue;
        }
        let at = sent.get(&step).copied().unwrap_or_default();
        if at.next < s.len {
            let n = (s.len - at.next).min(max as u64);
            let eof = s.finished && at.next + n == s.len;
            return Some((step, at.next, n as usize, eof));
        }
        if s.finished && !at.eof && at.next == s.len {
            return Some((step, at.next, 0, true));
        }
    }
    None
}

fn all_complete(state: &LogState, closed: bool, acked: &BTreeMap<u32, Acked>) -> bool {
    closed
        && state
            .steps
            .keys()
            .all(|s| acked.get(s).is_some_and(|a| a.complete))
}

/// Ships the spools of one attempt until each step's log is acknowledged complete.
#[derive(Debug)]
pub struct Shipper<T> {
    transport: T,
    attempt_id: String,
    epoch: u64,
    dir: PathBuf,
    state: watch::Receiver<LogState>,
    tail: Arc<Mutex<SpoolTail>>,
}

impl<T: LogTransport> Shipper<T> {
    /// A shipper for the spool of `attempt_id`.
    pub fn new(transport: T, attempt_id: &str, epoch: u64, spool: &AttemptSpool) -> Self {
        Self {
            transport,
            attempt_id: attempt_id.to_string(),
            epoch,
            dir: spool.dir().to_path_buf(),
            state: spool.subscribe(),
            tail: spool.tail.clone(),
        }
    }

    /// Runs until the spool is closed and every step's log is complete at the coordinator.
    /// Reconnects (with backoff) after stream errors and resends from the last acked offset.
    pub async fn run(mut self) -> Result<(), ShipError> {
        let mut backoff = Backoff::default();
        let mut acked: BTreeMap<u32, Acked> = BTreeMap::new();
        let mut released: HashMap<u32, Released> = HashMap::new();
        // False once the spool is gone: it will not change any more.
        let mut spool_alive = true;
        loop {
            let (state, closed) = {
                let s = self.state.borrow();
                (s.clone(), s.closed || !spool_alive)
            };
            if all_complete(&state, closed, &acked) {
                return Ok(());
            }
            let mut stream = match self.transport.open().await {
                Ok(s) => s,
                Err(status) if is_fatal(&status) => return Err(ShipError::Rejected(status)),
                Err(status) => {
                    tracing::debug!(attempt = %self.attempt_id, %status, "opening the log stream");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            // Resend everything the coordinator has not made durable.
            let mut sent: BTreeMap<u32, Sent> = acked
                .iter()
                .map(|(&k, a)| {
                    (
                        k,
                        Sent {
                            next: a.durable,
                            eof: a.complete,
                        },
                    )
                })
                .collect();
            let mut files: HashMap<u32, Arc<SpoolFiles>> = HashMap::new();
            // Chunks read from the spool and not sent yet (of one span, in order).
            let mut ready: VecDeque<LogChunk> = VecDeque::new();
            // When the last span was read: a log that sent one less than COALESCE ago streams.
            let mut last_span: Option<tokio::time::Instant> = None;
            loop {
                let (next, finished) = {
                    let s = self.state.borrow_and_update();
                    let closed = s.closed || !spool_alive;
                    let next = if ready.is_empty() {
                        next_span(&s, &sent, &acked, SPAN_BYTES).map(|span| {
                            let truncated = s.steps.get(&span.0).is_some_and(|st| st.truncated);
                            (span, truncated)
                        })
                    } else {
                        None
                    };
                    (next, ready.is_empty() && all_complete(&s, closed, &acked))
                };
                if finished {
                    return Ok(());
                }
                if let Some(((_, _, len, eof), _)) = next {
                    if let Some(due) = last_span.map(|at| at + COALESCE) {
                        if !eof && len < CHUNK_BYTES && tokio::time::Instant::now() < due {
                            tokio::time::sleep_until(due).await;
                            continue;
                        }
                    }
                }
                tokio::select! {
                    ack = stream.acks.recv() => match ack {
                        Some(Ok(ack)) => {
                            backoff.reset();
                            let a = acked.entry(ack.step_index).or_default();
                            a.durable = a.durable.max(ack.durable_offset);
                            a.complete |= ack.complete;
                            lock(&self.tail).forget(
                                ack.step_index,
                                if a.complete { u64::MAX } else { a.durable },
                            );
                            let s = sent.entry(ack.step_index).or_default();
                            s.next = s.next.max(a.durable);
                            s.eof |= a.complete;
                            if !a.complete {
                                self.release(&mut released, ack.step_index, a.durable);
                            }
                        }
                        Some(Err(status)) if is_fatal(&status) => {
                            return Err(ShipError::Rejected(status));
                        }
                        Some(Err(status)) => {
                            tracing::debug!(attempt = %self.attempt_id, %status, "log stream broke");
                            break;
                        }
                        None => break,
                    },
                    permit = stream.chunks.reserve(), if !ready.is_empty() || next.is_some() => {
                        let Ok(permit) = permit else { break };
                        if ready.is_empty() {
                            let Some(((step, offset, len, eof), truncated)) = next else { continue };
                            last_span = Some(tokio::time::Instant::now());
                            ready = self.read_span(&mut files, step, offset, len, eof, truncated).await?;
                        }
                        let Some(chunk) = ready.pop_front() else { continue };
                        let (step, end, eof) = (
                            chunk.step_index,
                            chunk.offset + chunk.data.len() as u64,
                            chunk.eof,
                        );
                        crate::metrics::metrics().log_shipped(chunk.data.len() as u64);
                        permit.send(chunk);
                        sent.insert(step, Sent { next: end, eof });
                    },
                    changed = self.state.changed(), if spool_alive => {
                        if changed.is_err() {
                            spool_alive = false;
                        }
                    },
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The bytes `[offset, offset + len)` of a step's spool and the line times recorded for them,
    /// cut into chunks of at most [`CHUNK_BYTES`]; only the last one carries `eof`. The bytes come
    /// from the attempt's [`SpoolTail`] when it still holds them all, else from the spool file.
    /// The spool and its sidecar stay open for the next span.
    async fn read_span(
        &self,
        files: &mut HashMap<u32, Arc<SpoolFiles>>,
        step: u32,
        offset: u64,
        len: usize,
        eof: bool,
        truncated: bool,
    ) -> Result<VecDeque<LogChunk>, ShipError> {
        let chunk = |offset, data, times, eof| LogChunk {
            attempt_id: self.attempt_id.clone(),
            epoch: self.epoch,
            step_index: step,
            offset,
            data,
            eof,
            times,
            truncated,
        };
        if len == 0 {
            return Ok(VecDeque::from([chunk(
                offset,
                Bytes::new(),
                Vec::new(),
                eof,
            )]));
        }
        let held = lock(&self.tail).get(step, offset, len);
        let (data, times) = match held {
            Some((pieces, times)) => (into_chunks(pieces), times),
            None => self.read_spool(files, step, offset, len)?,
        };
        let mut out = VecDeque::with_capacity(data.len());
        let mut times = times.into_iter().peekable();
        let mut at = 0usize;
        for piece in data {
            let start = offset + at as u64;
            let end = start + piece.len() as u64;
            let mut mine = Vec::new();
            while let Some(t) = times.next_if(|t| t.offset < end) {
                mine.push(t);
            }
            at += piece.len();
            out.push_back(chunk(start, piece, mine, eof && at == len));
        }
        Ok(out)
    }
}

/// A step spool's acknowledged start, released from the disk and the page cache.
#[derive(Debug, Default)]
struct Released {
    /// The spool opened for writing (a hole can only be punched through a writable descriptor),
    /// once there was something to release.
    file: Option<std::fs::File>,
    /// Bytes before this offset are released; `u64::MAX` once opening or punching failed (a file
    /// system that cannot punch holes): nothing more is tried.
    upto: u64,
}

/// Acknowledged bytes are released from a step's spool once this many have gathered.
const RELEASE_BYTES: u64 = 1 << 20;

impl<T> Shipper<T> {
    /// Punches a hole over the acknowledged start of a step's spool (whole 4 KiB blocks, the file's
    /// length kept): those bytes are durable at the coordinator and never sent again (a resend
    /// starts at the acknowledged offset; a restarted agent that resends from 0 sends zeros the
    /// coordinator skips, as it skips every byte below what it holds). A fast log then occupies a
    /// few MiB of the build host's page cache instead of its whole length, its dirty pages are
    /// dropped instead of written back to the disk, and the same memory serves its next writes.
    /// A log shorter than [`RELEASE_BYTES`] costs nothing (its spool is not even opened).
    fn release(&self, released: &mut HashMap<u32, Released>, step: u32, acked: u64) {
        let upto = acked & !4095;
        let r = released.entry(step).or_default();
        if upto < r.upto.saturating_add(RELEASE_BYTES) {
            return;
        }
        let file = match &mut r.file {
            Some(file) => file,
            None => match std::fs::OpenOptions::new()
                .write(true)
                .open(step_path(&self.dir, step))
            {
                Ok(file) => r.file.insert(file),
                Err(e) => {
                    tracing::debug!(attempt = %self.attempt_id, step, error = %e,
                        "opening the spool to release acknowledged bytes; keeping them");
                    r.upto = u64::MAX;
                    return;
                }
            },
        };
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&*file, flags, r.upto, upto - r.upto) {
            Ok(()) => r.upto = upto,
            Err(e) => {
                tracing::debug!(attempt = %self.attempt_id, step, error = %e,
                    "releasing acknowledged spool bytes; keeping them");
                r.file = None;
                r.upto = u64::MAX;
            }
        }
    }

    /// The bytes `[offset, offset + len)` of a step's spool file, one buffer per chunk (so none is
    /// copied again to be sent), and the line times its sidecar records for them: for bytes the
    /// tail no longer holds. The files stay open for the next span.
    ///
    /// Read on this task, not on a blocking thread: the files were just written and are in the
    /// page cache, so the read costs less than the thread switches (see `StepSpool::append`).
    fn read_spool(
        &self,
        files: &mut HashMap<u32, Arc<SpoolFiles>>,
        step: u32,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<Bytes>, Vec<LineTime>), ShipError> {
        let err = |source| ShipError::Spool { step, source };
        let opened = match files.get(&step) {
            Some(f) => f.clone(),
            None => {
                let (path, times) = (step_path(&self.dir, step), times_path(&self.dir, step));
                let opened = Arc::new(SpoolFiles {
                    log: std::fs::File::open(&path).map_err(err)?,
                    times: match std::fs::File::open(&times) {
                        Ok(f) => Some(f),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                        Err(e) => return Err(err(e)),
                    },
                });
                files.insert(step, opened.clone());
                opened
            }
        };
        let mut data = Vec::with_capacity(len.div_ceil(CHUNK_BYTES));
        let mut at = 0;
        while at < len {
            let mut piece = vec![0u8; (len - at).min(CHUNK_BYTES)];
            opened
                .log
                .read_exact_at(&mut piece, offset + at as u64)
                .map_err(err)?;
            at += piece.len();
            data.push(Bytes::from(piece));
        }
        let times = match &opened.times {
            Some(f) => logtimes::read_range_in(f, offset, offset + len as u64).map_err(err)?,
            None => Vec::new(),
        };
        Ok((data, times))
    }
}

/// A step's spool file and its line-time sidecar, open for the shipper.
#[derive(Debug)]
struct SpoolFiles {
    log: std::fs::File,
    /// None when the step has no sidecar (a spool from before line times).
    times: Option<std::fs::File>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// The coordinator side of PushLogs, in memory: appends chunks at their offsets (idempotent
    /// for resends, an error for gaps) and acks; can drop the connection after a number of chunks.
    /// Per step: the stored bytes and whether the log is complete.
    type StoredLogs = BTreeMap<u32, (Vec<u8>, bool)>;

    #[derive(Clone, Default)]
    struct MemoryCoordinator {
        // std Mutex: short sections, never held across an await.
        logs: Arc<Mutex<StoredLogs>>,
        chunks_seen: Arc<Mutex<u64>>,
        break_every: Option<u64>,
        opens: Arc<Mutex<u32>>,
    }

    impl MemoryCoordinator {
        fn apply(&self, c: &LogChunk) -> Result<LogAck, Status> {
            let mut logs = self.logs.lock().unwrap();
            let (log, complete) = logs.entry(c.step_index).or_default();
            let have = log.len() as u64;
            if c.offset > have {
                return Err(Status::invalid_argument(format!(
                    "gap: have {have}, chunk at {}",
                    c.offset
                )));
            }
            let skip = (have - c.offset) as usize;
            if skip < c.data.len() {
                log.extend_from_slice(&c.data[skip..]);
            }
            if c.eof && c.offset + c.data.len() as u64 == log.len() as u64 {
                *complete = true;
            }
            Ok(LogAck {
                attempt_id: c.attempt_id.clone(),
                step_index: c.step_index,
                durable_offset: log.len() as u64,
                complete: *complete,
            })
        }

        fn log(&self, step: u32) -> (Vec<u8>, bool) {
            self.logs
                .lock()
                .unwrap()
                .get(&step)
                .cloned()
                .unwrap_or_default()
        }
    }

    impl LogTransport for MemoryCoordinator {
        async fn open(&self) -> Result<LogStream, Status> {
            *self.opens.lock().unwrap() += 1;
            let (chunks, mut rx) = mpsc::channel::<LogChunk>(4);
            let (ack_tx, acks) = mpsc::channel(16);
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(chunk) = rx.recv().await {
                    let n = {
                        let mut seen = me.chunks_seen.lock().unwrap();
                        *seen += 1;
                        *seen
                    };
                    if me.break_every.is_some_and(|k| n % k == 0) {
                        // Drop the connection: this chunk is lost.
                        return;
                    }
                    let ack = me.apply(&chunk);
                    let failed = ack.is_err();
                    if ack_tx.send(ack).await.is_err() || failed {
                        return;
                    }
                }
            });
            Ok(LogStream { chunks, acks })
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    async fn ship_steps(coord: MemoryCoordinator, steps: Vec<Vec<Vec<u8>>>) {
        let root = tempfile::tempdir().unwrap();
        let spool = AttemptSpool::create(root.path(), "att/1").await.unwrap();
        let shipper = Shipper::new(coord.clone(), "att/1", 3, &spool);
        let handle = tokio::spawn(shipper.run());
        for (i, writes) in steps.iter().enumerate() {
            let mut step = spool.open_step(i as u32).await.unwrap();
            for w in writes {
                step.write(Bytes::copy_from_slice(w)).await.unwrap();
            }
            drop(step);
        }
        spool.close();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("shipper finished")
            .unwrap()
            .unwrap();
        for (i, writes) in steps.iter().enumerate() {
            let (log, complete) = coord.log(i as u32);
            assert!(complete, "step {i} complete");
            assert_eq!(log, writes.concat(), "step {i} byte-identical");
        }
        spool.remove().await.unwrap();
        assert!(!spool.dir().exists());
    }

    #[tokio::test]
    async fn ships_every_byte_of_every_step() {
        let coord = MemoryCoordinator::default();
        ship_steps(
            coord,
            vec![
                vec![b"hello\n".to_vec(), b"no newline".to_vec()],
                vec![pattern(3 * CHUNK_BYTES + 17, 1), pattern(5, 2)],
                vec![],
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn resends_from_the_acked_offset_after_connection_drops() {
        let coord = MemoryCoordinator {
            break_every: Some(3),
            ..Default::default()
        };
        let writes: Vec<Vec<u8>> = (0..40).map(|i| pattern(1000 + i * 997, i as u8)).collect();
        ship_steps(
            coord.clone(),
            vec![writes, vec![pattern(CHUNK_BYTES * 2, 9)]],
        )
        .await;
        assert!(
            *coord.opens.lock().unwrap() > 1,
            "the connection was re-opened"
        );
    }

    /// A shipper to a [`MemoryCoordinator`] for attempt "a", and its first step open for writing
    /// (keep the temporary directory alive as long as the spool).
    async fn shipping_one_step() -> (
        MemoryCoordinator,
        tempfile::TempDir,
        AttemptSpool,
        tokio::task::JoinHandle<Result<(), ShipError>>,
        StepSpool,
    ) {
        let coord = MemoryCoordinator::default();
        let root = tempfile::tempdir().unwrap();
        let spool = AttemptSpool::create(root.path(), "a").await.unwrap();
        let handle = tokio::spawn(Shipper::new(coord.clone(), "a", 1, &spool).run());
        let step = spool.open_step(0).await.unwrap();
        (coord, root, spool, handle, step)
    }

    #[tokio::test]
    async fn first_bytes_arrive_without_waiting_for_more() {
        let (coord, _root, spool, handle, mut step) = shipping_one_step().await;
        step.write(Bytes::from_static(b"first")).await.unwrap();
        let start = std::time::Instant::now();
        while coord.log(0).0 != b"first" {
            assert!(
                start.elapsed() < Duration::from_millis(500),
                "first bytes shipped"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!coord.log(0).1, "not complete before the step finished");
        drop(step);
        spool.close();
        handle.await.unwrap().unwrap();
        assert!(coord.log(0).1);
    }

    /// A container writing fast (32 KiB every ~100 us, as the engine delivers a busy log) is sent in
    /// full chunks, not one chunk per write: each chunk is a message, a wake-up of every task on
    /// the way and a write at the coordinator.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fast_log_goes_out_in_full_chunks() {
        let (coord, _root, spool, handle, mut step) = shipping_one_step().await;
        let writes: Vec<Vec<u8>> = (0..64).map(|i| pattern(32 * 1024, i as u8)).collect();
        for w in &writes {
            step.write(Bytes::copy_from_slice(w)).await.unwrap();
            // Blocks this worker, as a reader busy with the next frame would; the shipper runs on
            // the other one.
            std::thread::sleep(Duration::from_micros(100));
        }
        drop(step);
        spool.close();
        handle.await.unwrap().unwrap();
        assert_eq!(coord.log(0).0, writes.concat());
        // One chunk per write would be 64 (and the eof); 2 MiB in full chunks is 16, plus a short
        // chunk where a 2 ms window ends.
        let chunks = *coord.chunks_seen.lock().unwrap();
        assert!(chunks <= 40, "{chunks} chunks for 64 writes of 32 KiB");
    }

    /// Acknowledged bytes leave the spool (a hole, the length kept) while the step still runs; the
    /// coordinator still gets every byte.
    #[tokio::test]
    async fn acknowledged_spool_bytes_are_released_while_the_step_runs() {
        use std::os::unix::fs::MetadataExt;
        let (coord, _root, spool, handle, mut step) = shipping_one_step().await;
        let data = pattern(4 << 20, 7);
        for piece in data.chunks(256 * 1024) {
            step.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        let path = spool.step_path(0);
        let start = std::time::Instant::now();
        loop {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), data.len() as u64, "the length is kept");
            if meta.blocks() * 512 <= 2 << 20 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "acknowledged bytes still take {} bytes of disk",
                meta.blocks() * 512
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let head = std::fs::read(&path).unwrap();
        assert!(
            head[..1 << 20].iter().all(|&b| b == 0),
            "released bytes read as zeros"
        );
        drop(step);
        spool.close();
        handle.await.unwrap().unwrap();
        assert_eq!(coord.log(0), (data, true));
    }

    #[tokio::test]
    async fn a_fatal_status_stops_shipping() {
        #[derive(Clone)]
        struct Refusing;
        impl LogTransport for Refusing {
            async fn open(&self) -> Result<LogStream, Status> {
                Err(Status::failed_precondition("stale epoch"))
            }
        }
        let root = tempfile::tempdir().unwrap();
        let spool = AttemptSpool::create(root.path(), "a").await.unwrap();
        let mut step = spool.open_step(0).await.unwrap();
        step.write(Bytes::from_static(b"x")).await.unwrap();
        let err = Shipper::new(Refusing, "a", 1, &spool)
            .run()
            .await
            .unwrap_err();
        assert!(matches!(err, ShipError::Rejected(_)), "{err}");
    }

    #[tokio::test]
    async fn the_cap_keeps_the_first_bytes_then_one_marker_and_ships_times() {
        let coord = MemoryCoordinator::default();
        let root = tempfile::tempdir().unwrap();
        let spool = AttemptSpool::create(root.path(), "cap")
            .await
            .unwrap()
            .with_max_log_bytes(10);
        let handle = tokio::spawn(Shipper::new(coord.clone(), "cap", 1, &spool).run());
        let mut step = spool.open_step(0).await.unwrap();
        step.write(Bytes::from_static(b"12345\n")).await.unwrap();
        assert!(!spool.subscribe().borrow().steps[&0].truncated);
        step.write(Bytes::from_static(b"abcdefgh")).await.unwrap();
        step.write(Bytes::from_static(b"dropped\n")).await.unwrap();
        assert!(spool.subscribe().borrow().steps[&0].truncated);
        drop(step);
        spool.close();
        handle.await.unwrap().unwrap();
        let (log, complete) = coord.log(0);
        assert!(complete);
        assert_eq!(
            log,
            b"12345\nabcd\n[drover] log truncated at 10 bytes\n".to_vec()
        );
        // Line starts of the log were timed in the sidecar (the first line at offset 0 at least).
        let times = logtimes::read_range(&times_path(spool.dir(), 0), 0, u64::MAX).unwrap();
        assert_eq!(times.first().map(|t| t.offset), Some(0));
    }

    /// A span read in one trip comes out as chunks of at most `CHUNK_BYTES`, contiguous, with each
    /// line time in the chunk its offset falls in and `eof` on the last chunk only.
    #[tokio::test]
    async fn a_span_is_cut_into_chunks_with_their_own_line_times() {
        let root = tempfile::tempdir().unwrap();
        let spool = AttemptSpool::create(root.path(), "span").await.unwrap();
        let mut step = spool.open_step(0).await.unwrap();
        let data = pattern(3 * CHUNK_BYTES + 5, 7);
        step.write(Bytes::copy_from_slice(&data)).await.unwrap();
        drop(step);
        // More records at chosen offsets, after the one the write made at offset 0.
        let extra = [
            10u64,
            CHUNK_BYTES as u64 - 1,
            CHUNK_BYTES as u64,
            3 * CHUNK_BYTES as u64 + 4,
        ];
        let mut sidecar = std::fs::OpenOptions::new()
            .append(true)
            .open(times_path(spool.dir(), 0))
            .unwrap();
        for (i, off) in extra.iter().enumerate() {
            let t = drover_proto::v1::LineTime {
                offset: *off,
                unix_ms: 1000 + i as i64,
            };
            sidecar.write_all(&logtimes::encode(&t)).unwrap();
        }
        let shipper = Shipper::new(MemoryCoordinator::default(), "span", 1, &spool);
        let mut files = HashMap::new();
        // Once from the tail, which holds the write, and once from the file, after the tail let go.
        let from_tail = shipper
            .read_span(&mut files, 0, 5, data.len() - 5, true, false)
            .await
            .unwrap();
        lock(&spool.tail).forget(0, u64::MAX);
        assert!(lock(&spool.tail).get(0, 5, 1).is_none());
        let chunks = shipper
            .read_span(&mut files, 0, 5, data.len() - 5, true, false)
            .await
            .unwrap();
        // The same bytes either way; the extra records went to the sidecar only, so only the file
        // path (checked below) ships them.
        let strip = |cs: &VecDeque<LogChunk>| {
            cs.iter()
                .map(|c| (c.offset, c.data.clone(), c.eof))
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&from_tail), strip(&chunks));
        assert!(
            from_tail.iter().all(|c| c.times.is_empty()),
            "the write's own record is at 0, before the span"
        );
        assert_eq!(chunks.len(), 3);
        let mut next = 5u64;
        let mut times = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.offset, next);
            assert!(c.data.len() <= CHUNK_BYTES);
            assert_eq!(c.data, data[next as usize..next as usize + c.data.len()]);
            assert_eq!(c.eof, i == chunks.len() - 1);
            let end = next + c.data.len() as u64;
            assert!(
                c.times.iter().all(|t| t.offset >= next && t.offset < end),
                "{c:?}"
            );
            times.extend(c.times.iter().map(|t| t.offset));
            next = end;
        }
        assert_eq!(next, data.len() as u64);
        // The record at 0 is before the span; every other one is shipped once.
        assert_eq!(times, extra.to_vec());
    }

    /// The tail hands out slices of what was written while it holds all of a range, forgets
    /// acknowledged bytes and the oldest past its size, and starts over when a step is reopened.
    #[test]
    fn the_tail_holds_the_latest_bytes_and_hands_out_slices() {
        let mut tail = SpoolTail::default();
        let a = Bytes::from(pattern(100, 1));
        let b = Bytes::from(pattern(50, 2));
        let at = |offset| {
            Some(LineTime {
                offset,
                unix_ms: offset as i64,
            })
        };
        tail.push(0, 0, a.clone(), at(0));
        tail.push(0, 100, b.clone(), at(120));
        tail.push(1, 0, Bytes::from_static(b"next step"), None);
        let (got, times) = tail.get(0, 90, 20).unwrap();
        assert!(
            times.is_empty(),
            "line times at 0 and 120 are outside [90, 110)"
        );
        assert_eq!(
            tail.get(0, 0, 121).unwrap().1,
            vec![at(0).unwrap(), at(120).unwrap()]
        );
        assert_eq!(tail.get(0, 110, 40).unwrap().1, vec![at(120).unwrap()]);
        assert_eq!(got.concat(), [&a[90..], &b[..10]].concat());
        // A slice of the written buffer, not a copy.
        assert_eq!(got[0].as_ptr(), a[90..].as_ptr());
        assert_eq!(
            tail.get(0, 0, 150).unwrap().0.concat(),
            [&a[..], &b[..]].concat()
        );
        assert!(tail.get(0, 140, 11).is_none(), "past what step 0 has");
        assert_eq!(tail.get(1, 5, 4).unwrap().0.concat(), b"step");
        tail.forget(0, 120);
        assert!(
            tail.get(0, 99, 1).is_none(),
            "the first piece was acknowledged"
        );
        assert!(
            tail.get(0, 100, 50).is_some(),
            "the second was not, all of it"
        );
        tail.forget(0, u64::MAX);
        assert!(tail.get(0, 100, 1).is_none());
        assert!(tail.get(1, 0, 9).is_some(), "other steps are kept");
        // A step reopened at an earlier offset: what was held is dropped, the new bytes are held.
        tail.push(1, 3, Bytes::from_static(b"again"), None);
        assert!(tail.get(1, 0, 1).is_none());
        assert_eq!(tail.get(1, 3, 5).unwrap().0.concat(), b"again");
        // Bounded: pieces past TAIL_BYTES push the oldest out.
        let piece = Bytes::from(vec![7u8; 1 << 20]);
        for i in 0..6u64 {
            tail.push(2, i << 20, piece.clone(), None);
        }
        assert!(tail.held <= TAIL_BYTES);
        assert!(tail.get(2, 0, 1).is_none());
        assert!(tail.get(2, 2 << 20, 4 << 20).is_some());
    }

    #[test]
    fn pieces_become_chunks_of_at_most_chunk_bytes_without_copying_large_ones() {
        let big = Bytes::from(pattern(2 * CHUNK_BYTES + 10, 3));
        let chunks = into_chunks(vec![big.clone()]);
        assert_eq!(
            chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
            [CHUNK_BYTES, CHUNK_BYTES, 10]
        );
        assert_eq!(chunks[1].as_ptr(), big[CHUNK_BYTES..].as_ptr());
        // Small pieces are joined up to a chunk; the joins keep the bytes in order.
        let small: Vec<Bytes> = (0..100u8)
            .map(|i| Bytes::from(pattern(CHUNK_BYTES / 40, i)))
            .collect();
        let chunks = into_chunks(small.clone());
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_BYTES));
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), small.concat());
        assert!(into_chunks(Vec::new()).is_empty());
    }

    /// A shipper that starts late finds the first bytes gone from the tail and reads them from the
    /// spool file; the log arrives whole either way.
    #[tokio::test]
    async fn bytes_the_tail_let_go_are_read_from_the_spool() {
        let coord = MemoryCoordinator::default();
        let root = tempfile::tempdir().unwrap();
        let spool = AttemptSpool::create(root.path(), "late").await.unwrap();
        let mut step = spool.open_step(0).await.unwrap();
        let writes: Vec<Vec<u8>> = (0..100).map(|i| pattern(64 * 1024 + i, i as u8)).collect();
        for w in &writes {
            step.write(Bytes::copy_from_slice(w)).await.unwrap();
        }
        assert!(
            lock(&spool.tail).get(0, 0, 1).is_none(),
            "the start is only on disk"
        );
        drop(step);
        spool.close();
        Shipper::new(coord.clone(), "late", 1, &spool)
            .run()
            .await
            .unwrap();
        let (log, complete) = coord.log(0);
        assert!(complete);
        assert_eq!(log, writes.concat());
        assert_eq!(lock(&spool.tail).held, 0, "acknowledged bytes are let go");
    }

    #[test]
    fn next_chunk_walks_steps_in_order() {
        let mut state = LogState::default();
        state.steps.insert(
            0,
            StepLogState {
                len: 10,
                finished: true,
                truncated: false,
            },
        );
        state.steps.insert(
            1,
            StepLogState {
                len: 0,
                finished: false,
                truncated: false,
            },
        );
        let mut sent = BTreeMap::new();
        let acked = BTreeMap::new();
        assert_eq!(
            next_span(&state, &sent, &acked, CHUNK_BYTES),
            Some((0, 0, 10, true))
        );
        sent.insert(
            0,
            Sent {
                next: 10,
                eof: true,
            },
        );
        assert_eq!(next_span(&state, &sent, &acked, CHUNK_BYTES), None);
        state.steps.get_mut(&1).unwrap().finished = true;
        assert_eq!(
            next_span(&state, &sent, &acked, CHUNK_BYTES),
            Some((1, 0, 0, true))
        );
    }
}
