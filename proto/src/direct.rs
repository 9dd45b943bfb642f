//! Large files written past the page cache (`O_DIRECT`), shared by the coordinator (uploaded blobs)
//! and the agent (archives fetched from the engine).
//!
//! On the machines Drover runs on, copying a GiB into fresh page-cache pages was most of the CPU
//! either side spent on an artifact (`perf`: `copy_folio_from_iter_atomic`); a direct write hands
//! the buffer to the device instead. Direct writes need the memory, the file offset and the length
//! aligned, so data is gathered into [`AlignedBuf`]s of a multiple of [`DIRECT_ALIGN`] bytes, and a
//! [`DirectFile`] writes each whole one directly and falls back to the page cache for a short last
//! buffer or a file system that refuses direct writes. A [`DirectAppend`] does the same for a
//! file that grows by pieces of any length and is read while it grows (step logs, log spools).

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

    /// Reads up to `capacity` bytes of `file` at `offset` in place of what the buffer held;
    /// returns how many (fewer only at the end of the file).
    pub fn read_at(&mut self, file: &File, offset: u64) -> io::Result<usize> {
        // Zeroes only what the last read did not fill: a buffer read full stays full length.
        self.buf.resize(self.start + self.capacity, 0);
        let mut got = 0;
        let outcome = loop {
            let area = &mut self.buf[self.start + got..];
            if area.is_empty() {
                break Ok(());
            }
            match std::os::unix::fs::FileExt::read_at(file, area, offset + got as u64) {
                Ok(0) => break Ok(()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
            // A direct read continues only from an aligned offset; an unaligned count is the end.
            if !got.is_multiple_of(DIRECT_ALIGN) {
                break Ok(());
            }
        };
        self.buf.truncate(self.start + got);
        outcome.map(|()| got)
    }

    /// Keeps only the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        self.buf.truncate(self.start + len);
    }

    /// Drops the first `n` bytes, moving the rest to the front.
    pub fn consume(&mut self, n: usize) {
        let from = self.start + n.min(self.len());
        self.buf.copy_within(from.., self.start);
        self.buf.truncate(self.buf.len() - (from - self.start));
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
        let mut options = OpenOptions::new();
        options.write(true);
        if create_new {
            options.create_new(true);
        } else {
            options.create(true).truncate(true);
        }
        Ok(match open_direct(&mut options, path)? {
            Some(file) => Self { file, direct: true },
            None => Self {
                file: options.custom_flags(0).open(path)?,
                direct: false,
            },
        })
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
        clear_direct(&self.file)?;
        self.direct = false;
        Ok(())
    }

    /// The file, closed for writing through this handle.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// How much of a whole-block run an append must bring before it is written directly: a direct
/// write costs a trip to the device, so a slow log's small appends go through the page cache and
/// are written again directly once enough of them make up a large run.
pub const DIRECT_APPEND_MIN: usize = 64 * 1024;

/// Most bytes a [`DirectAppend`] holds before writing them directly.
const DIRECT_APPEND_BUF: usize = 1 << 20;

/// A file appended to in pieces of any length, and read by others while it grows, whose whole
/// blocks are written past the page cache.
///
/// Every appended byte is in the file (readable, its size right) when [`DirectAppend::append`]
/// returns: the bytes since the last block boundary are kept in an aligned buffer as well, and
/// go to the file through the page cache until they make up a run of whole blocks of at least
/// [`DIRECT_APPEND_MIN`] bytes; that run is then written again, directly (the kernel writes back
/// and drops the few cached pages it covers first), and only the short rest is kept. On the
/// machines Drover runs on, a fast log written this way costs a tenth of the CPU of one copied
/// into fresh page-cache pages. Readers see the same bytes either way.
#[derive(Debug)]
pub struct DirectAppend {
    /// The file opened again with `O_DIRECT`; `None` where the file system refuses it.
    direct: Option<File>,
    /// The file's bytes from `start` to its end.
    tail: AlignedBuf,
    /// Offset of the first byte of `tail`, a multiple of [`DIRECT_ALIGN`].
    start: u64,
    /// Bytes of the file written so far (its length).
    in_file: u64,
}

impl DirectAppend {
    /// Appends to `file` (at `path`, `len` bytes long, open for reading and writing).
    pub fn open(path: &Path, file: &File, len: u64) -> io::Result<Self> {
        let direct = open_direct(OpenOptions::new().write(true), path)?;
        let start = len - len % DIRECT_ALIGN as u64;
        let mut tail = AlignedBuf::new(DIRECT_APPEND_BUF);
        let mut partial = vec![0u8; (len - start) as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut partial, start)?;
        tail.fill(&partial);
        Ok(Self {
            direct,
            tail,
            start,
            in_file: len,
        })
    }

    /// Bytes appended (the file's length).
    pub fn len(&self) -> u64 {
        self.start + self.tail.len() as u64
    }

    /// True when the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `pieces` to `file` (the file given to [`DirectAppend::open`]), one after the other.
    /// On an error, [`DirectAppend::len`] is back at the bytes the file is known to hold.
    pub fn append<P: AsRef<[u8]>>(&mut self, file: &File, pieces: &[P]) -> io::Result<()> {
        let appended = self.append_all(file, pieces);
        if appended.is_err() {
            self.tail
                .truncate((self.in_file.max(self.start) - self.start) as usize);
        }
        appended
    }

    fn append_all<P: AsRef<[u8]>>(&mut self, file: &File, pieces: &[P]) -> io::Result<()> {
        for piece in pieces {
            let mut rest = piece.as_ref();
            while !rest.is_empty() {
                rest = self.tail.fill(rest);
                if self.tail.is_full() {
                    self.write_whole(file, true)?;
                }
            }
        }
        self.write_whole(file, false)?;
        // The rest through the page cache, so readers see it and the size is right.
        self.write_buffered(file, self.len())
    }

    /// Writes the bytes of `tail` the file does not hold yet, up to offset `end`, through the
    /// page cache.
    fn write_buffered(&mut self, file: &File, end: u64) -> io::Result<()> {
        let from = self.in_file.max(self.start);
        if from < end {
            let data = &self.tail.data()[(from - self.start) as usize..(end - self.start) as usize];
            std::os::unix::fs::FileExt::write_all_at(file, data, from)?;
            self.in_file = end;
        }
        Ok(())
    }

    /// Writes the whole blocks gathered directly when they make a long enough run (or `force`,
    /// with a full buffer), keeping only the partial block after them.
    fn write_whole(&mut self, file: &File, force: bool) -> io::Result<()> {
        let whole = self.tail.len() - self.tail.len() % DIRECT_ALIGN;
        if whole == 0 || (!force && whole < DIRECT_APPEND_MIN) {
            return Ok(());
        }
        let end = self.start + whole as u64;
        let direct = match &self.direct {
            Some(direct) => {
                let data = &self.tail.data()[..whole];
                match std::os::unix::fs::FileExt::write_all_at(direct, data, self.start) {
                    Ok(()) => true,
                    // Some file systems refuse direct writes only at the first write.
                    Err(e) if is_einval(&e) => {
                        self.direct = None;
                        false
                    }
                    Err(e) => return Err(e),
                }
            }
            None => false,
        };
        if !direct {
            self.write_buffered(file, end)?;
        }
        self.in_file = self.in_file.max(end);
        self.start = end;
        self.tail.consume(whole);
        Ok(())
    }
}

/// A file read from start to end past the page cache (`O_DIRECT` where the file system takes it):
/// a log read once to be compressed would otherwise be copied into fresh page-cache pages first.
#[derive(Debug)]
pub struct DirectReader {
    file: File,
    buf: AlignedBuf,
    /// Bytes of `buf` handed out.
    pos: usize,
    /// File offset of the next read.
    offset: u64,
    at_end: bool,
}

impl DirectReader {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = match open_direct(OpenOptions::new().read(true), path)? {
            Some(file) => file,
            None => File::open(path)?,
        };
        Ok(Self {
            file,
            buf: AlignedBuf::new(DIRECT_APPEND_BUF),
            pos: 0,
            offset: 0,
            at_end: false,
        })
    }

    fn refill(&mut self) -> io::Result<()> {
        let got = match self.buf.read_at(&self.file, self.offset) {
            // Refused at the first read by some file systems: read through the page cache.
            Err(e) if is_einval(&e) => {
                clear_direct(&self.file)?;
                self.buf.read_at(&self.file, self.offset)?
            }
            other => other?,
        };
        self.pos = 0;
        self.offset += got as u64;
        self.at_end = got == 0 || !got.is_multiple_of(DIRECT_ALIGN);
        Ok(())
    }
}

impl io::Read for DirectReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.at_end {
                return Ok(0);
            }
            self.refill()?;
        }
        let data = &self.buf.data()[self.pos..];
        let n = data.len().min(out.len());
        out[..n].copy_from_slice(&data[..n]);
        self.pos += n;
        Ok(n)
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

/// Opens `path` with `options` and `O_DIRECT`; `None` where the file system refuses it (tmpfs
/// before Linux 6.6, some FUSE mounts). Leaves `O_DIRECT` in `options`' custom flags.
fn open_direct(options: &mut OpenOptions, path: &Path) -> io::Result<Option<File>> {
    match options
        .custom_flags(OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if is_einval(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Clears `O_DIRECT` on an open file: later reads and writes go through the page cache.
fn clear_direct(file: &File) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(file)?;
    rustix::fs::fcntl_setfl(file, flags - OFlags::DIRECT)?;
    Ok(())
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

    /// Appends of every size (single bytes, runs under and over the direct threshold, more than
    /// the buffer at once), read back through a second handle after each one, and an appender
    /// reopened at an odd length carrying on: the file always holds exactly what was appended.
    #[test]
    fn appends_of_any_length_are_readable_at_once_and_in_order() {
        appends_read_back(false);
    }

    /// The same where the file system refuses direct writes: everything through the page cache.
    #[test]
    fn without_direct_writes_appends_are_the_same() {
        appends_read_back(true);
    }

    fn appends_read_back(refused: bool) {
        use std::os::unix::fs::FileExt as _;
        let dir =
            std::env::temp_dir().join(format!("drover-append-{}-{refused}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let _ = std::fs::remove_file(&path);
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let file = open();
        let reader = File::open(&path).unwrap();
        let open_appender = |file: &File, len: u64| {
            let mut appender = DirectAppend::open(&path, file, len).unwrap();
            if refused {
                appender.direct = None;
            }
            appender
        };
        let mut appender = open_appender(&file, 0);
        assert!(appender.is_empty());
        let mut expected: Vec<u8> = Vec::new();
        let mut seed = 0u32;
        let mut piece = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect()
        };
        let sizes: &[&[usize]] = &[
            &[1],
            &[100, 3000],
            &[DIRECT_ALIGN - 1],
            &[DIRECT_APPEND_MIN + 17],
            &[5; 40],
            &[DIRECT_APPEND_BUF + 3 * DIRECT_ALIGN + 1, 9],
            &[DIRECT_APPEND_MIN, DIRECT_APPEND_MIN, DIRECT_ALIGN],
            &[2 * DIRECT_APPEND_BUF],
            &[7],
        ];
        let check = |expected: &[u8], appender: &DirectAppend| {
            assert_eq!(appender.len(), expected.len() as u64);
            assert_eq!(reader.metadata().unwrap().len(), expected.len() as u64);
            let mut got = vec![0u8; expected.len()];
            reader.read_exact_at(&mut got, 0).unwrap();
            assert!(got == expected, "the file differs from what was appended");
        };
        for (i, round) in sizes.iter().enumerate() {
            let pieces: Vec<Vec<u8>> = round.iter().map(|&n| piece(n)).collect();
            for p in &pieces {
                expected.extend_from_slice(p);
            }
            appender.append(&file, &pieces).unwrap();
            check(&expected, &appender);
            if i == 4 {
                // A restart: the appender comes back at the file's (unaligned) length.
                assert_ne!(expected.len() % DIRECT_ALIGN, 0);
                appender = open_appender(&open(), expected.len() as u64);
                check(&expected, &appender);
            }
        }
        assert_eq!(
            appender.direct.is_some(),
            !refused,
            "the test directory takes direct writes, so the direct path must have been used"
        );
        // Read back past the page cache, in odd-sized reads.
        let mut back = Vec::new();
        let mut reader = DirectReader::open(&path).unwrap();
        let mut piece = vec![0u8; 3 * DIRECT_ALIGN + 5];
        loop {
            let n = io::Read::read(&mut reader, &mut piece).unwrap();
            if n == 0 {
                break;
            }
            back.extend_from_slice(&piece[..n]);
        }
        assert!(back == expected, "read back differs from what was appended");
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
