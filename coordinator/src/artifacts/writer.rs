//! Uploading one blob: hash while writing a temporary file, then verify it and hand it to the backend
//! under its digest.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{io_context, validate_digest, BlobError, BlobStore};

/// Bytes gathered before a write to the temporary file.
const WRITE_BUFFER: usize = 1 << 20;

/// Bytes written between two background syncs of the temporary file. Without them the kernel keeps
/// a whole upload in the page cache (a GiB is far below its writeback threshold on a large host) and
/// the sync in [`BlobWriter::finish`] writes all of it while the uploader waits; with them the disk
/// writes the upload while it streams in and `finish` waits only for the tail.
const SYNC_EVERY: u64 = 16 << 20;

/// One upload in progress. Dropped without [`BlobWriter::finish`], it removes its temporary file.
#[derive(Debug)]
pub struct BlobWriter {
    store: BlobStore,
    /// The temporary file, buffered so that 128 KiB chunks reach the blocking pool a MiB at a time;
    /// `None` once it was renamed into place (or closed by `finish`).
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    /// Path of the temporary file while it exists.
    tmp_path: Option<PathBuf>,
    hasher: Sha256,
    size: u64,
    /// Early syncs: started every [`SYNC_EVERY`] bytes, one at a time.
    early: EarlySync,
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
    /// The result of the sync in flight, waiting for it if `wait` (else only if it is done).
    async fn reap(&mut self, wait: bool) -> io::Result<()> {
        let done = self
            .running
            .as_ref()
            .is_some_and(|h| wait || h.is_finished());
        match self.running.take() {
            Some(handle) if done => handle
                .await
                .map_err(|e| io::Error::other(format!("blob sync task failed: {e}")))?,
            other => {
                self.running = other;
                Ok(())
            }
        }
    }

    /// Start a sync of what was written so far if `size` passed the next mark and none is running.
    fn maybe_start(&mut self, size: u64) {
        if size < self.next_at || self.running.is_some() {
            return;
        }
        self.next_at = size + SYNC_EVERY;
        let file = self.file.clone();
        self.running = Some(tokio::task::spawn_blocking(move || file.sync_data()));
    }
}

impl BlobWriter {
    pub(super) async fn create(store: BlobStore) -> Result<Self, BlobError> {
        let tmp_path = store
            .tmp_dir()
            .join(format!("{}.part", uuid::Uuid::new_v4().simple()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .await
            .map_err(|e| io_context(e, "create blob upload", &tmp_path))?;
        let second = file
            .try_clone()
            .await
            .map_err(|e| io_context(e, "open blob upload", &tmp_path))?
            .into_std()
            .await;
        Ok(Self {
            store,
            file: Some(tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file)),
            tmp_path: Some(tmp_path),
            hasher: Sha256::new(),
            size: 0,
            early: EarlySync {
                file: Arc::new(second),
                running: None,
                next_at: SYNC_EVERY,
            },
        })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn tmp_path(&self) -> &Path {
        self.tmp_path
            .as_deref()
            .unwrap_or(Path::new("<finished upload>"))
    }

    /// Append `data` to the upload. [`BlobError::TooLarge`] if it would pass the store's size limit (the
    /// upload is then unusable: drop it).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let new_size = self.size + data.len() as u64;
        if let Some(limit) = self.store.max_size {
            if new_size > limit {
                return Err(BlobError::TooLarge { limit });
            }
        }
        let path = self.tmp_path().to_owned();
        let file = self.file.as_mut().ok_or_else(|| {
            BlobError::Invalid("write to a blob upload that is already finished".to_owned())
        })?;
        file.write_all(data)
            .await
            .map_err(|e| io_context(e, "write blob upload", &path))?;
        self.hasher.update(data);
        self.size = new_size;
        self.early
            .reap(false)
            .await
            .map_err(|e| io_context(e, "sync blob upload", &path))?;
        self.early.maybe_start(new_size);
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
        let mut file = self
            .file
            .take()
            .ok_or_else(|| BlobError::Invalid("blob upload is already finished".to_owned()))?;
        file.flush()
            .await
            .and(self.early.reap(true).await)
            .and(file.get_mut().sync_all().await)
            .map_err(|e| io_context(e, "sync blob upload", &tmp_path))?;
        drop(file);

        let digest = hex::encode(std::mem::take(&mut self.hasher).finalize());
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
        Ok((digest, self.size))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(path) = self.tmp_path.take() {
            // Close first so no write is in flight on the file being removed.
            drop(self.file.take());
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove an unfinished blob upload");
                }
            }
        }
    }
}
