//! Finished logs are stored compressed: once a step's log is complete and its completion durable, a
//! background task writes `<step>.log.zst` (zstd, its length in the frame header), syncs it, and
//! removes `<step>.log`. Readers that
//! hold the plain file open keep reading it (an unlinked file stays readable); later readers
//! decompress from the start and skip to their offset, so any offset still reads the same bytes.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::entry::io_context;

/// zstd level: fast enough to keep up with a busy coordinator, still several times smaller for logs.
const LEVEL: i32 = 3;

/// `<step>.log.zst` beside `<step>.log`.
pub(super) fn zst_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".zst");
    PathBuf::from(name)
}

/// What [`compress`] did.
#[derive(Debug, Default)]
pub(super) struct Compressed {
    /// A compressed file was renamed into place: its directory entry still needs a sync.
    pub(super) renamed: bool,
    /// The log's directory was created for it (an empty log has no other file): the store's
    /// directory needs a sync too.
    pub(super) created_dir: bool,
}

/// Compresses the complete log at `log` (`len` bytes) into `<log>.zst`, whose frame header records
/// `len`; an empty log that has no plain file gets an empty compressed one, so every complete log
/// ends up with the file that proves it complete. Does nothing when `<log>.zst` exists already.
/// Crash-safe: the compressed file appears under its name only once synced. The caller makes the
/// rename durable (a grouped directory sync) and only then removes the plain file
/// ([`remove_plain`]).
pub(super) fn compress(log: &Path, len: u64) -> io::Result<Compressed> {
    let target = zst_path(log);
    if target.exists() {
        return Ok(Compressed::default());
    }
    let mut done = Compressed::default();
    // Read past the page cache: the log's bytes were written past it too, and are read once here.
    let input = match drover_proto::direct::DirectReader::open(log) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound && len == 0 => None,
        Err(e) => return Err(io_context(e, "open log", log)),
    };
    if input.is_none() {
        if let Some(dir) = log.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| io_context(e, "create log directory", dir))?;
                done.created_dir = true;
            }
        }
    }
    let mut tmp_name = target.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let out = File::create(&tmp).map_err(|e| io_context(e, "create compressed log", &tmp))?;
    let result = (|| {
        let mut enc = zstd::stream::Encoder::new(out, LEVEL)?;
        enc.include_contentsize(true)?;
        enc.set_pledged_src_size(Some(len))?;
        if let Some(input) = input {
            let copied = io::copy(&mut input.take(len), &mut enc)?;
            if copied != len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the log holds {copied} bytes, {len} expected"),
                ));
            }
        }
        let out = enc.finish()?;
        out.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_context(e, "compress log", log));
    }
    std::fs::rename(&tmp, &target).map_err(|e| io_context(e, "store compressed log", &target))?;
    done.renamed = true;
    Ok(done)
}

/// Removes the plain log once its compressed form is durable. Not synced: should a crash bring it
/// back, it reads the same and is removed when the log is next loaded.
pub(super) fn remove_plain(log: &Path) -> io::Result<()> {
    match std::fs::remove_file(log) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_context(e, "remove uncompressed log", log))
        }
        _ => Ok(()),
    }
}

/// The length of the log stored compressed at `zst`: from its frame header, or (a file written
/// without it) by decoding it.
pub(super) fn content_size(zst: &Path) -> io::Result<u64> {
    let mut f = File::open(zst).map_err(|e| io_context(e, "open compressed log", zst))?;
    let mut head = [0u8; 18];
    let mut got = 0;
    while got < head.len() {
        let n = f
            .read(&mut head[got..])
            .map_err(|e| io_context(e, "read compressed log", zst))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if let Ok(Some(len)) = zstd::zstd_safe::get_frame_content_size(&head[..got]) {
        return Ok(len);
    }
    let f = File::open(zst).map_err(|e| io_context(e, "open compressed log", zst))?;
    let mut decoder = zstd::stream::read::Decoder::new(f)
        .map_err(|e| io_context(e, "open compressed log", zst))?;
    io::copy(&mut decoder, &mut io::sink()).map_err(|e| io_context(e, "decompress log", zst))
}

/// Reads a log from either form: the plain file while it exists, else the compressed one.
pub(super) enum LogSource {
    /// The plain file: random access.
    Plain(File),
    /// The compressed file, decoded sequentially; `pos` is the offset of the next decoded byte.
    Zst {
        /// The decoder.
        decoder: Box<zstd::stream::read::Decoder<'static, io::BufReader<File>>>,
        /// Next offset it will produce.
        pos: u64,
    },
}

impl std::fmt::Debug for LogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(file) => f.debug_tuple("Plain").field(file).finish(),
            Self::Zst { pos, .. } => f.debug_struct("Zst").field("pos", pos).finish(),
        }
    }
}

impl LogSource {
    /// Opens the log at `log`, plain or compressed.
    pub(super) fn open(log: &Path) -> io::Result<Self> {
        match File::open(log) {
            Ok(f) => return Ok(Self::Plain(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_context(e, "open log", log)),
        }
        let zst = zst_path(log);
        match File::open(&zst) {
            Ok(f) => Ok(Self::Zst {
                decoder: Box::new(
                    zstd::stream::read::Decoder::new(f)
                        .map_err(|e| io_context(e, "open compressed log", &zst))?,
                ),
                pos: 0,
            }),
            // Compressed and removed between the two opens is impossible (the .zst is never
            // removed), so a missing .zst means the log has no file at all.
            Err(e) => Err(io_context(e, "open log", log)),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`. A compressed source reopens itself (`log`) when
    /// asked to go backwards, and skips forwards by decoding.
    pub(super) fn read_exact_at(
        &mut self,
        log: &Path,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if let Self::Zst { pos, .. } = self {
            if *pos > offset {
                *self = Self::open(log)?;
            }
        }
        match self {
            Self::Plain(f) => f
                .read_exact_at(buf, offset)
                .map_err(|e| io_context(e, "read log", log)),
            Self::Zst { decoder, pos } => {
                let skip = offset - *pos;
                let skipped = io::copy(&mut (&mut **decoder).take(skip), &mut io::sink())
                    .map_err(|e| io_context(e, "decompress log", log))?;
                *pos += skipped;
                if skipped < skip {
                    return Err(io_context(
                        io::ErrorKind::UnexpectedEof.into(),
                        "decompress log",
                        log,
                    ));
                }
                decoder
                    .read_exact(buf)
                    .map_err(|e| io_context(e, "decompress log", log))?;
                *pos += buf.len() as u64;
                Ok(())
            }
        }
    }
}

/// Writes `data` as a compressed log (tests and tools).
#[cfg(test)]
pub(super) fn write_compressed(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let mut enc = zstd::stream::Encoder::new(File::create(path)?, LEVEL)?;
    enc.write_all(data)?;
    enc.finish()?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_logs_read_at_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        std::fs::write(&log, &data).unwrap();
        assert!(compress(&log, data.len() as u64).unwrap().renamed);
        remove_plain(&log).unwrap();
        assert!(!log.exists());
        let zst = zst_path(&log);
        assert!(std::fs::metadata(&zst).unwrap().len() < data.len() as u64 / 3);
        assert_eq!(content_size(&zst).unwrap(), data.len() as u64);
        // Compressing again is a no-op.
        assert!(!compress(&log, data.len() as u64).unwrap().renamed);
        let mut src = LogSource::open(&log).unwrap();
        for (off, len) in [
            (1000u64, 10usize),
            (5000, 70_000),
            (10, 5),
            (data.len() as u64 - 3, 3),
        ] {
            let mut buf = vec![0; len];
            src.read_exact_at(&log, &mut buf, off).unwrap();
            assert_eq!(buf, data[off as usize..off as usize + len]);
        }
        let mut buf = vec![0; 4];
        assert!(src
            .read_exact_at(&log, &mut buf, data.len() as u64 - 2)
            .is_err());
        write_compressed(&dir.path().join("1.log.zst"), b"abc").unwrap();
        let mut src = LogSource::open(&dir.path().join("1.log")).unwrap();
        let mut buf = [0u8; 2];
        src.read_exact_at(&log, &mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc");
        assert!(LogSource::open(&dir.path().join("2.log")).is_err());
        // Written without its length in the header: decoded to find it.
        assert_eq!(content_size(&dir.path().join("1.log.zst")).unwrap(), 3);
        // An empty log without a plain file gets an empty compressed one (in a new directory).
        let empty = dir.path().join("new").join("3.log");
        let done = compress(&empty, 0).unwrap();
        assert!(done.renamed && done.created_dir);
        assert_eq!(content_size(&zst_path(&empty)).unwrap(), 0);
        // A missing plain file of a non-empty log is an error, not an empty log.
        assert!(compress(&dir.path().join("4.log"), 5).is_err());
    }

    async fn read_all(store: &super::super::LogStore, offset: u64, follow: bool) -> Vec<u8> {
        use futures::StreamExt;
        let mut out = Vec::new();
        let mut s = std::pin::pin!(store.read("att", 0, offset, follow));
        while let Some(p) = s.next().await {
            out.extend_from_slice(&p.unwrap().data);
        }
        out
    }

    /// A completed log is compressed in the background; reads from any offset, a follower that
    /// started before, and a restarted store all see the same bytes.
    #[tokio::test]
    async fn the_store_compresses_complete_logs_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::LogStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let half = data.len() / 2;
        store
            .append("att", 0, 0, &data[..half], false)
            .await
            .unwrap();
        let follower = {
            let store = store.clone();
            tokio::spawn(async move { read_all(&store, 0, true).await })
        };
        store
            .append("att", 0, half as u64, &data[half..], true)
            .await
            .unwrap();
        let status = store.sync("att", 0).await.unwrap();
        assert!(status.complete);
        let log = dir.path().join("att").join("0.log");
        let start = std::time::Instant::now();
        while log.exists() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "compressed in time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(zst_path(&log).exists());
        assert_eq!(follower.await.unwrap(), data);
        assert_eq!(read_all(&store, 0, false).await, data);
        assert_eq!(read_all(&store, 12_345, true).await, data[12_345..]);
        drop(store);
        let reopened = super::super::LogStore::open(dir.path()).unwrap();
        let st = reopened.status("att", 0).await.unwrap();
        assert_eq!((st.len, st.complete), (data.len() as u64, true));
        assert_eq!(read_all(&reopened, 777, false).await, data[777..]);
        // A resend of the last chunk after the restart is still idempotent.
        reopened
            .append("att", 0, half as u64, &data[half..], true)
            .await
            .unwrap();
        assert!(reopened.sync("att", 0).await.unwrap().complete);
    }
}
