//! Content-addressed blob store: artifacts and source contexts, named by their sha256, behind the
//! `object_store` crate: local disk by default, an S3-compatible bucket when configured.
//!
//! Layout: `sha256/<first 2 hex>/<digest>` for blobs (under the store's directory, or under the
//! bucket's prefix), and always a local `tmp/` for uploads in progress. A blob appears under its name
//! only once its bytes are verified against its digest and complete in the backend, so a name always
//! means complete, correct content; identical content is stored once.
//!
//! Uploads can be resumed: an upload with an id ([`BlobStore::claim_upload`]) that loses its
//! connection stays parked with the bytes received so far (and their running hash) for
//! [`PARTIAL_UPLOAD_TTL`]; the uploader asks how much is held ([`BlobStore::upload_progress`]) and
//! continues from there. Reads can start at any offset ([`BlobStore::read_from`]).

mod backend;
#[cfg(test)]
mod tests;
mod uploads;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;

pub use backend::{S3Settings, DEFAULT_S3_REGION};
pub use uploads::{ResumableUpload, UploadTicket, PARTIAL_UPLOAD_TTL};
pub use writer::BlobWriter;

/// What went wrong with a blob operation.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The disk failed; the message names the file.
    #[error("blob storage I/O error: {0}")]
    Io(#[from] io::Error),
    /// The uploaded bytes do not hash to the digest the uploader announced; nothing was stored.
    #[error("blob digest mismatch: expected sha256 {expected}, content hashes to {actual}")]
    DigestMismatch {
        /// The digest the uploader announced.
        expected: String,
        /// The digest of what was received.
        actual: String,
    },
    /// No blob with this digest is stored.
    #[error("blob {0} not found")]
    NotFound(String),
    /// A malformed argument; the message says which and why.
    #[error("invalid blob request: {0}")]
    Invalid(String),
    /// The upload exceeded the store's size limit; nothing was stored.
    #[error("blob exceeds the size limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// The storage backend (S3, local object store) failed; `what` says which operation.
    #[error("blob storage: {what}: {source}")]
    Storage {
        /// The operation, naming the blob.
        what: String,
        /// What object_store reported (never carries credentials).
        source: Box<object_store::Error>,
    },
    /// The storage settings are wrong or the backend is not usable with them; the message says which.
    #[error("{0}")]
    Config(String),
    /// A resumable upload is still held by another connection (the previous one has not ended yet).
    #[error("upload {0} is busy on another connection; retry shortly")]
    Busy(String),
}

pub(crate) use drover_proto::errors::error_chain;

/// Attach the operation and the path to an I/O error, so the message says which file failed.
pub(crate) fn io_context(err: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(err.kind(), format!("{what} {}: {err}", path.display()))
}

/// Check that `digest` is a sha256 in the store's spelling: 64 lowercase hex digits. Digests become file
/// names, so this is also what keeps requests inside the store's directory.
pub fn validate_digest(digest: &str) -> Result<(), BlobError> {
    let ok = digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BlobError::Invalid(format!(
            "digest {digest:?} is not a sha256: expected 64 lowercase hex digits"
        )))
    }
}

/// The coordinator's blob store. Cheap to clone; clones share the backend and the parked uploads.
#[derive(Debug, Clone)]
pub struct BlobStore {
    shared: Arc<Shared>,
    /// Largest blob accepted through this handle, if limited.
    max_size: Option<u64>,
}

#[derive(Debug)]
struct Shared {
    /// Local directory: `tmp/` for uploads in progress, and the blobs themselves with the local backend.
    dir: PathBuf,
    backend: backend::Backend,
    uploads: uploads::Parking,
}

impl BlobStore {
    /// Open (creating if needed) the local blob store rooted at `dir`, normally `<data>/blobs`. Uploads
    /// left in `tmp/` by a previous process are removed: call this once per directory, at startup.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let dir = dir.into();
        Self::prepare_dir(&dir)?;
        let backend = backend::Backend::local(&dir)?;
        Ok(Self::with_backend(dir, backend))
    }

    /// Open the blob store: in an S3 bucket when `s3` is given (staging uploads under `dir/tmp`),
    /// else on local disk under `dir`. The bucket is checked first (list, write and delete a probe):
    /// [`BlobError::Config`] says clearly when it is unreachable or the credentials are wrong.
    pub async fn open_with(
        dir: impl Into<PathBuf>,
        s3: Option<&S3Settings>,
    ) -> Result<Self, BlobError> {
        let Some(s3) = s3 else {
            return Self::open(dir);
        };
        let dir = dir.into();
        Self::prepare_dir(&dir)?;
        let backend = backend::Backend::s3(s3).await?;
        Ok(Self::with_backend(dir, backend))
    }

    fn prepare_dir(dir: &Path) -> Result<(), BlobError> {
        for sub in ["tmp", "sha256"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|e| io_context(e, "create blob directory", &path))?;
        }
        let tmp = dir.join("tmp");
        let leftovers =
            std::fs::read_dir(&tmp).map_err(|e| io_context(e, "list blob directory", &tmp))?;
        for leftover in leftovers.flatten() {
            let path = leftover.path();
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a stale blob upload");
            }
        }
        Ok(())
    }

    fn with_backend(dir: PathBuf, backend: backend::Backend) -> Self {
        tracing::info!(storage = %backend.describe(&dir), "blob store open");
        let shared = Arc::new(Shared {
            dir,
            backend,
            uploads: uploads::Parking::default(),
        });
        uploads::spawn_sweeper(Arc::downgrade(&shared));
        Self {
            shared,
            max_size: None,
        }
    }

    /// Refuse blobs larger than `max_size` bytes ([`BlobError::TooLarge`] from [`BlobWriter::write`]).
    pub fn with_max_size(self, max_size: u64) -> Self {
        Self {
            max_size: Some(max_size),
            ..self
        }
    }

    /// The local directory of the store (uploads in progress; the blobs too with the local backend).
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Where the blobs live, for messages: the directory or `s3://bucket/prefix at endpoint`.
    pub fn describe(&self) -> String {
        self.shared.backend.describe(&self.shared.dir)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.shared.dir.join("tmp")
    }

    /// Start an upload into a temporary file under `tmp/`.
    pub async fn writer(&self) -> Result<BlobWriter, BlobError> {
        BlobWriter::create(self.clone()).await
    }

    /// Whether the blob `digest` is stored.
    pub async fn exists(&self, digest: &str) -> Result<bool, BlobError> {
        validate_digest(digest)?;
        Ok(self.shared.backend.size(digest).await?.is_some())
    }

    /// Size in bytes of the blob `digest`; [`BlobError::NotFound`] if it is not stored.
    pub async fn size(&self, digest: &str) -> Result<u64, BlobError> {
        validate_digest(digest)?;
        self.shared
            .backend
            .size(digest)
            .await?
            .ok_or_else(|| BlobError::NotFound(digest.to_owned()))
    }

    /// Stream the blob `digest` in pieces of [`drover_proto::CHUNK_BYTES`] (the last may be shorter; an
    /// empty blob yields no pieces). [`BlobError::NotFound`] if it is not stored.
    pub async fn read(
        &self,
        digest: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static, BlobError> {
        self.read_from(digest, 0).await
    }

    /// Like [`BlobStore::read`], from byte `offset` on (a resumed download). [`BlobError::Invalid`] when
    /// `offset` is past the end of the blob.
    pub async fn read_from(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static, BlobError> {
        validate_digest(digest)?;
        self.shared
            .backend
            .read_from(&self.shared.dir, digest, offset, drover_proto::CHUNK_BYTES)
            .await
    }
}
