//! Reading and following a log.

use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

use super::compress::LogSource;
use super::{EntryHandle, LogError, LogPiece, LogStatus, LogStore};

/// A reader's progress through one log.
struct Reader {
    store: LogStore,
    attempt: String,
    step: u32,
    /// Next byte to return.
    offset: u64,
    follow: bool,
    /// Keeps the log's entry (and so its watch sender) alive while we read.
    handle: Option<EntryHandle>,
    rx: Option<watch::Receiver<LogStatus>>,
    /// The log file (plain or compressed), opened on first use.
    file: Option<LogSource>,
    finished: bool,
}

pub(super) fn read(
    store: LogStore,
    attempt: String,
    step: u32,
    offset: u64,
    follow: bool,
) -> impl Stream<Item = Result<LogPiece, LogError>> + Send + 'static {
    let reader = Reader {
        store,
        attempt,
        step,
        offset,
        follow,
        handle: None,
        rx: None,
        file: None,
        finished: false,
    };
    futures::stream::unfold(reader, |mut reader| async move {
        if reader.finished {
            return None;
        }
        match reader.next_piece().await {
            Ok(Some(piece)) => {
                reader.finished = piece.eof;
                Some((Ok(piece), reader))
            }
            Ok(None) => None,
            Err(e) => {
                reader.finished = true;
                Some((Err(e), reader))
            }
        }
    })
}

/// Read exactly `len` bytes at `offset`, opening the file (plain, or compressed once the log was
/// compressed) on first use.
async fn read_at(
    file: &mut Option<LogSource>,
    path: PathBuf,
    offset: u64,
    len: usize,
) -> Result<Bytes, LogError> {
    let cached = file.take();
    let (opened, data) =
        tokio::task::spawn_blocking(move || -> io::Result<(LogSource, Vec<u8>)> {
            let mut f = match cached {
                Some(f) => f,
                None => LogSource::open(&path)?,
            };
            let mut buf = vec![0u8; len];
            f.read_exact_at(&path, &mut buf, offset)?;
            Ok((f, buf))
        })
        .await
        .map_err(|e| io::Error::other(format!("log read task failed: {e}")))??;
    *file = Some(opened);
    Ok(Bytes::from(data))
}

impl Reader {
    async fn next_piece(&mut self) -> Result<Option<LogPiece>, LogError> {
        if self.rx.is_none() {
            let handle = self.store.handle(&self.attempt, self.step)?;
            // Subscribe before loading the status: an append after this point wakes us.
            let rx = handle.entry.subscribe();
            handle.entry.status().await?;
            self.rx = Some(rx);
            self.handle = Some(handle);
        }
        let (Some(rx), Some(handle)) = (self.rx.as_mut(), self.handle.as_ref()) else {
            return Ok(None);
        };
        loop {
            // `borrow_and_update` marks this value seen, so `changed` below only returns for later changes.
            let status = *rx.borrow_and_update();
            if self.offset < status.len {
                let len = (status.len - self.offset).min(drover_proto::CHUNK_BYTES as u64);
                let data = read_at(
                    &mut self.file,
                    handle.entry.paths.log.clone(),
                    self.offset,
                    len as usize,
                )
                .await?;
                let piece = LogPiece {
                    offset: self.offset,
                    data,
                    eof: status.complete && self.offset + len == status.len,
                };
                self.offset += len;
                return Ok(Some(piece));
            }
            if status.complete {
                return Ok(Some(LogPiece {
                    offset: self.offset,
                    data: Bytes::new(),
                    eof: true,
                }));
            }
            if !self.follow {
                return Ok(None);
            }
            if rx.changed().await.is_err() {
                // Unreachable while we hold the handle (it owns the sender); fail loudly rather than hang.
                return Err(LogError::Io(io::Error::other(
                    "log status channel closed while following",
                )));
            }
        }
    }
}
