//! Uploading one blob: hash while writing a temporary file, then verify it and hand it to the backend
//! under its digest.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_proto::direct::{AlignedBuf, BatchPipe, BatchSink, DirectFile};
use sha2::{Digest, Sha256};

use super::{io_context, validate_digest, BlobError, BlobStore};

/// Bytes gathered into one batch: hashed and written to the temporary file by one blocking task.
/// A multiple of [`drover_proto::direct::DIRECT_ALIGN`], so every batch but an upload's last can be written with `O_DIRECT`.
const WRITE_BUFFER: usize = 1 << 20;

/// What error messages name as the file of an upload that is already finished.
const FINISHED: &str = "<finished upload>";

/// Bytes written between two background syncs of the temporary file. Without them the kernel keeps
/// a whole upload in the page cache (a GiB is far below its writeback threshold on a large host) and
/// the sync in [`BlobWriter::finish`] writes all of it while the uploader waits; with them the disk
/// writes the upload while it streams in and `finish` waits only for the tail.
const SYNC_EVERY: u64 = 16 << 20;

/// One upload in progress. Dropped without [`BlobWriter::finish`], it removes its temporary file.
///
/// Chunks are gathered into batches of [`WRITE_BUFFER`] bytes; each batch is hashed and written on
/// the blocking pool while the next one is received, so the upload's receiving, hashing and writing
/// overlap instead of taking turns. At most one batch is in flight: a parked upload holds no thread.
///
/// The file is written with `O_DIRECT` where the file system takes it: a blob is read again rarely
/// and much later, so copying it through the page cache only evicts hotter pages, and that copy was
/// most of the coordinator's work on an upload (`perf`: 65 % of its samples in
/// `copy_folio_from_iter_atomic` on a VM whose page cache grew into memory it never touched). The
/// two batch buffers are reused for the whole upload.
#[derive(Debug)]
pub struct BlobWriter {
    store: BlobStore,
    /// The temporary file and the running hash, behind the batch being gathered and the one in
    /// flight; `None` once `finish` took them.
    disk: Option<BatchPipe<Sink>>,
    /// Path of the temporary file while it exists.
    tmp_path: Option<PathBuf>,
    /// Early syncs: started every [`SYNC_EVERY`] bytes, one at a time.
    early: EarlySync,
}

/// The temporary file and the hash of what was written to it.
#[derive(Debug)]
struct Sink {
    file: DirectFile,
    hasher: Sha256,
}

impl BatchSink for Sink {
    /// Hashes and writes `batch` (directly when it is whole, see [`DirectFile::write`]).
    fn write(&mut self, batch: &AlignedBuf) -> io::Result<()> {
        self.hasher.update(batch.data());
        self.file.write(batch)
    }
}

/// Background syncs of an upload's temporary file while it is written. They run on a second handle
/// of the same open file, so a failure they see would not be reported again to the final sync: it is
/// kept and fails the upload.
#[derive(Debug)]
struct EarlySync {
    /// A second handle of the temporary file (same open file description).
    file: Arc<std::fs::File>,
    /// The sync in flight, if any.
    running: Option<tokio::task::JoinHandle<io::Result<()>>>,
    /// Size from which the next sync starts.
    next_at: u64,
}

impl EarlySync {
    /// The result of the sync in flight, waiting for it if `wait` (else only if it is done). A
    /// cancelled wait leaves the sync in place, so its result is still seen.
    async fn reap(&mut self, wait: bool) -> io::Result<()> {
        let Some(handle) = self.running.as_mut() else {
            return Ok(());
        };
        if !wait && !handle.is_finished() {
            return Ok(());
        }
        let joined = handle.await;
        self.running = None;
        joined.map_err(|e| io::Error::other(format!("blob sync task failed: {e}")))?
    }

    /// Start a sync of what was written so far if `written` passed the next mark and none is
    /// running.
    fn maybe_start(&mut self, written: u64) {
        if written < self.next_at || self.running.is_some() {
            return;
        }
        self.next_at = written + SYNC_EVERY;
        let file = self.file.clone();
        self.running = Some(tokio::task::spawn_blocking(move || file.sync_data()));
    }
}

impl BlobWriter {
    pub(super) async fn create(store: BlobStore) -> Result<Self, BlobError> {
        let tmp_path = store
            .tmp_dir()
            .join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let file = DirectFile::create_off_thread(&tmp_path, true)
            .await
            .map_err(|e| io_context(e, "create blob upload", &tmp_path))?;
        let second = file
            .file()
            .try_clone()
            .map_err(|e| io_context(e, "open blob upload", &tmp_path))?;
        Ok(Self {
            store,
            disk: Some(BatchPipe::new(
                Sink {
                    file,
                    hasher: Sha256::new(),
                },
                WRITE_BUFFER,
            )),
            tmp_path: Some(tmp_path),
            early: EarlySync {
                file: Arc::new(second),
                running: None,
                next_at: SYNC_EVERY,
            },
        })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.disk.as_ref().map_or(0, BatchPipe::accepted)
    }

    fn tmp_path(&self) -> &Path {
        self.tmp_path.as_deref().unwrap_or(Path::new(FINISHED))
    }

    /// Append `data` to the upload. [`BlobError::TooLarge`] if it would pass the store's size limit (the
    /// upload is then unusable: drop it). A failure to write an earlier batch may be reported here.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        if let Some(limit) = self.store.max_size {
            if self.size() + data.len() as u64 > limit {
                return Err(BlobError::TooLarge { limit });
            }
        }
        let Some(disk) = self.disk.as_mut() else {
            return Err(BlobError::Invalid(
                "write to a blob upload that is already finished".to_owned(),
            ));
        };
        // The pipe counts each byte as it enters a batch, so an upload whose connection ends while
        // a batch waits for the one in flight (the call is dropped) holds exactly what `size` says.
        let path = self.tmp_path.as_deref().unwrap_or(Path::new(FINISHED));
        disk.push(data)
            .await
            .map_err(|e| io_context(e, "write blob upload", path))?;
        self.early
            .reap(false)
            .await
            .map_err(|e| io_context(e, "sync blob upload", path))?;
        self.early.maybe_start(disk.written());
        Ok(())
    }

    /// Sync the upload, verify it against `expected` (if given, 64 lowercase hex), and store it as
    /// `sha256/<first 2 hex>/<digest>` in the backend; if that blob already exists the upload is dropped
    /// (identical content is stored once). Returns `(digest, size)`. On any error nothing is stored and the temporary file is
    /// removed.
    pub async fn finish(mut self, expected: Option<&str>) -> Result<(String, u64), BlobError> {
        if let Some(expected) = expected {
            validate_digest(expected)?;
        }
        let tmp_path = self.tmp_path().to_owned();
        let Some(disk) = self.disk.take() else {
            return Err(BlobError::Invalid(
                "blob upload is already finished".to_owned(),
            ));
        };
        let size = disk.accepted();
        let Sink { file, hasher } = disk
            .finish()
            .await
            .map_err(|e| io_context(e, "write blob upload", &tmp_path))?;
        let synced = self.early.reap(true).await;
        synced
            .and(
                tokio::task::spawn_blocking(move || file.into_file().sync_all())
                    .await
                    .map_err(|e| io::Error::other(format!("blob sync task failed: {e}")))
                    .and_then(|r| r),
            )
            .map_err(|e| io_context(e, "sync blob upload", &tmp_path))?;

        let digest = hex::encode(hasher.finalize());
        if let Some(expected) = expected {
            if expected != digest {
                return Err(BlobError::DigestMismatch {
                    expected: expected.to_owned(),
                    actual: digest,
                });
            }
        }

        let stored = self
            .store
            .shared
            .backend
            .commit(self.store.dir(), &tmp_path, &digest)
            .await?;
        if stored && matches!(self.store.shared.backend, super::backend::Backend::Local(_)) {
            // Renamed into place: nothing left to remove.
            self.tmp_path = None;
        }
        // Otherwise (already stored, or copied to the bucket) Drop removes the upload.
        Ok((digest, size))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(path) = self.tmp_path.take() {
            // Close our handle first. A batch still in flight finishes writing to the removed
            // file, which goes away with its last handle.
            self.disk = None;
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an unfinished blob upload");
                }
            }
        }
    }
}
