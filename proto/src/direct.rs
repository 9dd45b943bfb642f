//! Large files written past the page cache (`O_DIRECT`), shared by the coordinator (uploaded blobs)
//! and the agent (archives fetched from the engine).
//!
//! On the machines Drover runs on, copying a GiB into fresh page-cache pages was most of the CPU
//! either side spent on an artifact (`perf`: `copy_folio_from_iter_atomic`); a direct write hands
//! the buffer to the device instead. Direct writes need the memory, the file offset and the length
//! aligned, so data is gathered into [`AlignedBuf`]s of a multiple of [`DIRECT_ALIGN`] bytes, and a
//! [`DirectFile`] writes each whole one directly and falls back to the page cache for a short last
//! buffer or a file system that refuses direct writes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::OFlags;
use rustix::io::Errno;

/// Alignment of the memory, file offset and length of a direct write (the largest logical block
/// size in use).
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer of up to `capacity` bytes whose data starts at a [`DIRECT_ALIGN`]ed address. It never
/// grows (that would move it), so it is reused for a whole file.
#[derive(Debug)]
pub struct AlignedBuf {
    /// `start` bytes of padding, then the data.
    buf: Vec<u8>,
    start: usize,
    capacity: usize,
}

impl AlignedBuf {
    /// An empty buffer for `capacity` bytes (a multiple of [`DIRECT_ALIGN`] for every buffer but a
    /// file's last to be written directly).
    pub fn new(capacity: usize) -> Self {
        let mut buf: Vec<u8> = Vec::with_capacity(capacity + DIRECT_ALIGN);
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
        buf.resize(start, 0);
        Self {
            buf,
            start,
            capacity,
        }
    }

    /// The bytes gathered.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// How many bytes are gathered.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True when nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the buffer holds `capacity` bytes.
    pub fn is_full(&self) -> bool {
        self.len() == self.capacity
    }

    /// Takes as much of `data` as fits; returns the rest.
    pub fn fill<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let take = data.len().min(self.capacity - self.len());
        self.buf.extend_from_slice(&data[..take]);
        &data[take..]
    }

    /// Empties the buffer (keeping its memory).
    pub fn clear(&mut self) {
        self.buf.truncate(self.start);
    }
}

/// A file written sequentially from [`AlignedBuf`]s, with `O_DIRECT` while it can be.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    /// Whether the file is still open with `O_DIRECT`.
    direct: bool,
}

impl DirectFile {
    /// Creates `path` for writing (it must not exist when `create_new`, else it is truncated), with
    /// `O_DIRECT` where the file system takes it.
    pub fn create(path: &Path, create_new: bool) -> io::Result<Self> {
        let open = |flags: OFlags| {
            let mut options = OpenOptions::new();
            options.write(true).custom_flags(flags.bits() as i32);
            if create_new {
                options.create_new(true);
            } else {
                options.create(true).truncate(true);
            }
            options.open(path)
        };
        match open(OFlags::DIRECT) {
            // Refused by the file system (tmpfs before Linux 6.6, some FUSE mounts): the page cache.
            Err(e) if is_einval(&e) => Ok(Self {
                file: open(OFlags::empty())?,
                direct: false,
            }),
            other => other.map(|file| Self { file, direct: true }),
        }
    }

    /// [`DirectFile::create`] on the blocking pool, for async callers.
    pub async fn create_off_thread(path: &Path, create_new: bool) -> io::Result<Self> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::create(&path, create_new))
            .await
            .map_err(|e| io::Error::other(format!("the open task failed: {e}")))?
    }

    /// The open file (to sync it, or for a second handle).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether writes still bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Appends `buf`: directly when its length is aligned (every write before it was), through the
    /// page cache when it is a file's short last piece or the file system refuses direct writes.
    pub fn write(&mut self, buf: &AlignedBuf) -> io::Result<()> {
        let data = buf.data();
        if self.direct && !data.len().is_multiple_of(DIRECT_ALIGN) {
            self.buffered()?;
        }
        match self.file.write_all(data) {
            // Some file systems refuse direct writes only at the first write.
            Err(e) if self.direct && is_einval(&e) => {
                self.buffered()?;
                self.file.write_all(data)
            }
            other => other,
        }
    }

    /// Clears `O_DIRECT`: later writes go through the page cache.
    fn buffered(&mut self) -> io::Result<()> {
        let flags = rustix::fs::fcntl_getfl(&self.file)?;
        rustix::fs::fcntl_setfl(&self.file, flags - OFlags::DIRECT)?;
        self.direct = false;
        Ok(())
    }

    /// The file, closed for writing through this handle.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// What a [`BatchPipe`] writes each batch to.
pub trait BatchSink: Send + 'static {
    /// Writes all of `batch` (on a blocking thread).
    fn write(&mut self, batch: &AlignedBuf) -> io::Result<()>;
}

impl BatchSink for DirectFile {
    fn write(&mut self, batch: &AlignedBuf) -> io::Result<()> {
        DirectFile::write(self, batch)
    }
}

/// Where a [`BatchPipe`]'s sink is.
#[derive(Debug)]
enum Slot<S> {
    Idle(S),
    /// A batch is being written; the task gives the sink and the buffer back with the outcome.
    Busy(tokio::task::JoinHandle<(S, AlignedBuf, io::Result<()>)>),
    Gone,
}

/// Bytes gathered into batches and written one after the other on the blocking pool while the
/// caller gathers the next: receiving and writing overlap instead of taking turns. At most one batch
/// is in flight, and its buffer comes back for the next-but-one batch, so a file of any size takes
/// two buffers and a parked writer holds no thread.
#[derive(Debug)]
pub struct BatchPipe<S> {
    slot: Slot<S>,
    /// The batch being gathered.
    batch: AlignedBuf,
    /// The buffer of the batch written last.
    spare: Option<AlignedBuf>,
    /// Bytes taken by [`Self::push`] so far (gathered, in flight or written).
    accepted: u64,
    /// Bytes of the batches written so far (not counting one in flight).
    written: u64,
}

impl<S: BatchSink> BatchPipe<S> {
    /// A pipe into `sink` for batches of `capacity` bytes.
    pub fn new(sink: S, capacity: usize) -> Self {
        Self {
            slot: Slot::Idle(sink),
            batch: AlignedBuf::new(capacity),
            spare: None,
            accepted: 0,
            written: 0,
        }
    }

    /// Bytes taken by [`Self::push`] so far. Each byte counts as it enters a batch, so after a
    /// `push` dropped midway (its caller was cancelled) this says exactly how much of it was taken.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Bytes of the batches written so far (a batch in flight counts once it is seen done).
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data`, handing each full batch to the blocking pool after the one before it. A
    /// failure to write an earlier batch may be reported here.
    pub async fn push(&mut self, mut data: &[u8]) -> io::Result<()> {
        loop {
            let before = data.len();
            data = self.batch.fill(data);
            self.accepted += (before - data.len()) as u64;
            if self.batch.is_full() {
                self.submit().await?;
            }
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    /// Waits until no batch is in flight; the error the last batch met. A cancelled wait leaves
    /// the batch in flight in place.
    async fn settle(&mut self) -> io::Result<()> {
        if let Slot::Busy(task) = &mut self.slot {
            let joined = task.await;
            let (sink, buf, outcome) = match joined {
                Ok(done) => done,
                Err(e) => {
                    self.slot = Slot::Gone;
                    return Err(io::Error::other(format!("the write task failed: {e}")));
                }
            };
            // A failed batch leaves a hole: nothing more may be written after it.
            if let Err(e) = outcome {
                self.slot = Slot::Gone;
                return Err(e);
            }
            self.slot = Slot::Idle(sink);
            self.written += buf.len() as u64;
            self.spare = Some(buf);
        }
        match self.slot {
            Slot::Idle(_) => Ok(()),
            _ => Err(io::Error::other("the file is gone")),
        }
    }

    /// Writes the gathered batch in the background after the batch before it, gathering on in an
    /// empty buffer. Cancellation-safe: the batch is taken only after the one await, so a
    /// cancelled call leaves it as it was.
    async fn submit(&mut self) -> io::Result<()> {
        self.settle().await?;
        let mut next = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedBuf::new(self.batch.capacity));
        next.clear();
        let full = std::mem::replace(&mut self.batch, next);
        let Slot::Idle(mut sink) = std::mem::replace(&mut self.slot, Slot::Gone) else {
            return Err(io::Error::other("the file is gone"));
        };
        self.slot = Slot::Busy(tokio::task::spawn_blocking(move || {
            let outcome = sink.write(&full);
            (sink, full, outcome)
        }));
        Ok(())
    }

    /// Writes what is still gathered (the short last batch), waits for it and returns the sink,
    /// or the error a batch met; an error too if fewer bytes were written than accepted.
    pub async fn finish(mut self) -> io::Result<S> {
        if !self.batch.is_empty() {
            self.submit().await?;
        }
        self.settle().await?;
        if self.written != self.accepted {
            return Err(io::Error::other(format!(
                "{} bytes written of {} accepted",
                self.written, self.accepted
            )));
        }
        match std::mem::replace(&mut self.slot, Slot::Gone) {
            Slot::Idle(sink) => Ok(sink),
            _ => Err(io::Error::other("the file is gone")),
        }
    }
}

fn is_einval(e: &io::Error) -> bool {
    e.raw_os_error() == Some(Errno::INVAL.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_fill_up_to_their_capacity() {
        for _ in 0..8 {
            let mut b = AlignedBuf::new(3 * DIRECT_ALIGN);
            assert_eq!(b.data().as_ptr() as usize % DIRECT_ALIGN, 0);
            let data = vec![7u8; 2 * DIRECT_ALIGN];
            assert!(b.fill(&data).is_empty());
            let rest = b.fill(&data);
            assert_eq!(rest.len(), DIRECT_ALIGN);
            assert!(b.is_full());
            let at = b.data().as_ptr();
            b.clear();
            assert!(b.is_empty());
            b.fill(&data);
            assert_eq!(b.data().as_ptr(), at, "the buffer must not move");
        }
    }

    /// Whole buffers, then a short last one: the file holds every byte in order, whether the
    /// file system took direct writes or not.
    #[test]
    fn whole_buffers_and_a_short_last_one_store_every_byte() {
        let dir = std::env::temp_dir().join(format!("drover-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let _ = std::fs::remove_file(&path);
        let content: Vec<u8> = (0..5 * DIRECT_ALIGN + 123)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut f = DirectFile::create(&path, true).unwrap();
        assert!(
            DirectFile::create(&path, true).is_err(),
            "create_new must refuse an existing file"
        );
        let mut buf = AlignedBuf::new(2 * DIRECT_ALIGN);
        let mut rest = &content[..];
        while !rest.is_empty() {
            rest = buf.fill(rest);
            if buf.is_full() || rest.is_empty() {
                f.write(&buf).unwrap();
                buf.clear();
            }
        }
        assert!(
            !f.is_direct(),
            "a short last write goes through the page cache"
        );
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), content);
        // Truncated when reopened without create_new.
        drop(DirectFile::create(&path, false).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Bytes pushed in odd pieces land in order, batch by batch and the short tail at the end; a
    /// failing batch fails a later call and nothing is written after it.
    #[tokio::test]
    async fn the_pipe_writes_batches_in_order_and_reports_a_failed_one() {
        #[derive(Default)]
        struct Collect {
            got: Vec<u8>,
            fail_at: Option<usize>,
        }
        impl BatchSink for Collect {
            fn write(&mut self, batch: &AlignedBuf) -> io::Result<()> {
                if self.fail_at == Some(self.got.len()) {
                    return Err(io::Error::other("disk on fire"));
                }
                self.got.extend_from_slice(batch.data());
                Ok(())
            }
        }
        let content: Vec<u8> = (0..10 * DIRECT_ALIGN + 5)
            .map(|i| (i % 253) as u8)
            .collect();
        let mut pipe = BatchPipe::new(Collect::default(), DIRECT_ALIGN);
        for piece in content.chunks(1000) {
            pipe.push(piece).await.unwrap();
            assert!(pipe.written() <= pipe.accepted());
        }
        assert_eq!(pipe.accepted(), content.len() as u64);
        assert_eq!(pipe.finish().await.unwrap().got, content);

        let failing = Collect {
            fail_at: Some(2 * DIRECT_ALIGN),
            ..Collect::default()
        };
        let mut pipe = BatchPipe::new(failing, DIRECT_ALIGN);
        let mut failed = None;
        for n in 0..5 {
            if let Err(e) = pipe
                .push(&content[n * DIRECT_ALIGN..(n + 1) * DIRECT_ALIGN])
                .await
            {
                failed = Some((n, e));
                break;
            }
        }
        let (n, e) = failed.expect("the third batch's failure must be reported");
        assert_eq!(n, 3, "reported by the push after the failed batch's");
        assert!(e.to_string().contains("disk on fire"), "{e}");
        assert_eq!(pipe.written(), 2 * DIRECT_ALIGN as u64);
        assert!(
            pipe.finish().await.is_err(),
            "a pipe with a hole never finishes"
        );
    }
}
