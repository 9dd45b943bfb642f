//! Content-addressed blob store on local disk: artifacts and source contexts, named by their sha256.
//!
//! Layout under the store's directory: `sha256/<first 2 hex>/<digest>` for blobs, `tmp/` for uploads in
//! progress. A blob appears under its name only once its bytes are synced and its digest verified, so a
//! name always means complete, correct content; identical content is stored once.

#[cfg(test)]
mod tests;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::Stream;
use tokio::io::AsyncReadExt;

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
}

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

/// The coordinator's blob store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Largest blob accepted, if limited.
    max_size: Option<u64>,
}

impl BlobStore {
    /// Open (creating if needed) the blob store rooted at `dir`, normally `<data>/blobs`. Uploads left in
    /// `tmp/` by a previous process are removed: call this once per directory, at startup.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let dir = dir.into();
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
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                max_size: None,
            }),
        })
    }

    /// Refuse blobs larger than `max_size` bytes ([`BlobError::TooLarge`] from [`BlobWriter::write`]).
    pub fn with_max_size(self, max_size: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: self.inner.dir.clone(),
                max_size: Some(max_size),
            }),
        }
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn tmp_dir(&self) -> PathBuf {
        self.inner.dir.join("tmp")
    }

    /// Where the blob `digest` lives; `digest` must be validated.
    fn blob_path(&self, digest: &str) -> PathBuf {
        self.inner
            .dir
            .join("sha256")
            .join(&digest[..2])
            .join(digest)
    }

    /// Start an upload into a temporary file under `tmp/`.
    pub async fn writer(&self) -> Result<BlobWriter, BlobError> {
        BlobWriter::create(self.clone()).await
    }

    /// Whether the blob `digest` is stored.
    pub async fn exists(&self, digest: &str) -> Result<bool, BlobError> {
        validate_digest(digest)?;
        let path = self.blob_path(digest);
        tokio::fs::try_exists(&path)
            .await
            .map_err(|e| io_context(e, "look up blob", &path).into())
    }

    /// Size in bytes of the blob `digest`; [`BlobError::NotFound`] if it is not stored.
    pub async fn size(&self, digest: &str) -> Result<u64, BlobError> {
        validate_digest(digest)?;
        let path = self.blob_path(digest);
        match tokio::fs::metadata(&path).await {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(BlobError::NotFound(digest.to_owned()))
            }
            Err(e) => Err(io_context(e, "stat blob", &path).into()),
        }
    }

    /// Stream the blob `digest` in pieces of [`drover_proto::CHUNK_BYTES`] (the last may be shorter; an
    /// empty blob yields no pieces). [`BlobError::NotFound`] if it is not stored.
    pub async fn read(
        &self,
        digest: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static, BlobError> {
        validate_digest(digest)?;
        let path = self.blob_path(digest);
        let file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(digest.to_owned()))
            }
            Err(e) => return Err(io_context(e, "open blob", &path).into()),
        };
        Ok(futures::stream::unfold(
            Some((file, path)),
            |state| async move {
                let (mut file, path) = state?;
                let mut buf = BytesMut::with_capacity(drover_proto::CHUNK_BYTES);
                // Fill whole chunks: a short read from the file is not the end of the blob.
                while buf.len() < drover_proto::CHUNK_BYTES {
                    match file.read_buf(&mut buf).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            return Some((Err(io_context(e, "read blob", &path).into()), None))
                        }
                    }
                }
                if buf.is_empty() {
                    None
                } else {
                    Some((Ok(buf.freeze()), Some((file, path))))
                }
            },
        ))
    }
}
