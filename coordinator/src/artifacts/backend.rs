//! Where verified blobs live: the local data directory (object_store's `LocalFileSystem` layout,
//! `sha256/<2 hex>/<digest>`) or an S3-compatible bucket (`<prefix>/sha256/<2 hex>/<digest>`).
//!
//! Uploads are always staged in a local temporary file while their sha256 is computed; only a verified
//! file is handed to [`Backend::commit`], which makes it visible under its name in one step: a rename on
//! local disk, the completion of a multipart upload (or a single PUT) on S3. So a name always means
//! complete, verified content, whichever backend holds it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{io_context, BlobError};

/// Part size of multipart uploads to S3 (S3 wants at least 5 MiB per part but the last).
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts in flight at once during a multipart upload.
const PARTS_IN_FLIGHT: usize = 4;

/// Settings of the S3-compatible bucket that holds blobs. Credentials are not here: they come from the
/// standard `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and optional `AWS_SESSION_TOKEN`)
/// environment, so they never appear in a config file, a flag listing or a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// Bucket name.
    pub bucket: String,
    /// Endpoint URL of an S3-compatible server (MinIO, Ceph, moto, ...); `None`: AWS itself. A custom
    /// endpoint is addressed path-style (`<endpoint>/<bucket>/<key>`).
    pub endpoint: Option<String>,
    /// Region used for signing.
    pub region: String,
    /// Key prefix under which the store keeps its `sha256/` tree; empty for the bucket's root.
    pub prefix: String,
    /// Allow a plain `http://` endpoint (a loopback test server); off by default.
    pub allow_http: bool,
}

/// The region used when none is configured.
pub const DEFAULT_S3_REGION: &str = "us-east-1";

/// The storage behind a [`super::BlobStore`].
#[derive(Debug)]
pub(super) enum Backend {
    /// Files under the store's directory.
    Local(LocalFileSystem),
    /// Objects in a bucket.
    S3 {
        store: Arc<AmazonS3>,
        /// `<prefix>` (may be empty).
        prefix: ObjectPath,
        /// `s3://bucket/prefix at endpoint`, for messages.
        label: String,
    },
}

/// The name a blob has inside the store, relative to the store's root.
fn relative_key(digest: &str) -> String {
    format!("sha256/{}/{digest}", &digest[..2])
}

/// Wrap an object_store error with what was being done.
fn storage(what: impl Into<String>, source: object_store::Error) -> BlobError {
    BlobError::Storage {
        what: what.into(),
        source: Box::new(source),
    }
}

impl Backend {
    /// The local backend rooted at `dir` (which must exist).
    pub(super) fn local(dir: &Path) -> Result<Self, BlobError> {
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| storage(format!("open blob directory {}", dir.display()), e))?;
        Ok(Backend::Local(fs))
    }

    /// Connect to the bucket and check that it answers with these credentials: writes a probe object,
    /// reads it back and deletes it, so a wrong endpoint, bucket, region or credentials, or a
    /// read-only key, is reported at startup rather than at the first artifact.
    pub(super) async fn s3(settings: &S3Settings) -> Result<Self, BlobError> {
        // reqwest is built without a bundled crypto provider; the binary installs ring. Installing it
        // here too keeps library users (tests) working; a provider already installed wins.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let label = match &settings.endpoint {
            Some(e) => format!("s3://{}/{} at {e}", settings.bucket, settings.prefix),
            None => format!("s3://{}/{}", settings.bucket, settings.prefix),
        };
        let access_key = std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default();
        let secret_key = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default();
        if access_key.is_empty() || secret_key.is_empty() {
            return Err(BlobError::Config(format!(
                "blob storage {label}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the coordinator's environment"
            )));
        }
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&settings.bucket)
            .with_region(&settings.region)
            .with_access_key_id(access_key)
            .with_secret_access_key(secret_key)
            .with_allow_http(settings.allow_http)
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(300))
                    .with_allow_http(settings.allow_http),
            );
        if let Ok(token) = std::env::var("AWS_SESSION_TOKEN") {
            if !token.is_empty() {
                builder = builder.with_token(token);
            }
        }
        if let Some(endpoint) = &settings.endpoint {
            if endpoint.starts_with("http://") && !settings.allow_http {
                return Err(BlobError::Config(format!(
                    "blob storage {label}: the endpoint is plain http; pass --s3-allow-http to allow it"
                )));
            }
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        let store = builder
            .build()
            .map_err(|e| BlobError::Config(format!("blob storage {label}: {e}")))?;
        let prefix = ObjectPath::from(settings.prefix.trim_matches('/'));
        let backend = Backend::S3 {
            store: Arc::new(store),
            prefix,
            label: label.clone(),
        };
        backend.check().await?;
        Ok(backend)
    }

    async fn check(&self) -> Result<(), BlobError> {
        let Backend::S3 {
            store,
            prefix,
            label,
        } = self
        else {
            return Ok(());
        };
        let unusable = |step: &str, e: object_store::Error| {
            let text = super::error_chain(&e);
            let hint = if text.contains("NoSuchBucket") {
                "the bucket does not exist: create it or fix --s3-bucket"
            } else if text.contains("InvalidAccessKeyId")
                || text.contains("SignatureDoesNotMatch")
                || text.contains("AccessDenied")
                || text.contains("403 Forbidden")
                || matches!(
                    e,
                    object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                )
            {
                "the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's permissions"
            } else if text.contains("error sending request")
                || text.contains("connect")
                || text.contains("dns error")
            {
                "the endpoint cannot be reached: check --s3-endpoint"
            } else {
                "check --s3-endpoint, --s3-bucket, --s3-region and the credentials"
            };
            BlobError::Config(format!(
                "blob storage {label} is not usable: {step} failed: {hint}. The server said: {text}"
            ))
        };
        // Exactly the operations the store relies on: write an object, read it back. (No listing: the
        // store never lists, and a key may well lack that permission.)
        let probe = prefix
            .clone()
            .join(format!(".drover-probe-{}", uuid::Uuid::new_v4().simple()));
        store
            .put(&probe, PutPayload::from_static(b"drover"))
            .await
            .map_err(|e| unusable("writing a probe object", e))?;
        store
            .head(&probe)
            .await
            .map_err(|e| unusable("reading the probe object back", e))?;
        if let Err(e) = store.delete(&probe).await {
            // Deleting is not needed to store blobs; a key without that permission only leaves the probe.
            tracing::warn!(probe = %probe, error = %e, "could not delete the storage probe object");
        }
        Ok(())
    }

    /// What the store is, for logs: a directory or a bucket.
    pub(super) fn describe(&self, dir: &Path) -> String {
        match self {
            Backend::Local(_) => dir.display().to_string(),
            Backend::S3 { label, .. } => label.clone(),
        }
    }

    fn location(&self, digest: &str) -> ObjectPath {
        match self {
            Backend::Local(_) => ObjectPath::from(relative_key(digest)),
            Backend::S3 { prefix, .. } => {
                let mut p = prefix.clone();
                for part in relative_key(digest).split('/') {
                    p = p.join(part);
                }
                p
            }
        }
    }

    fn store(&self) -> &dyn ObjectStore {
        match self {
            Backend::Local(fs) => fs,
            Backend::S3 { store, .. } => store.as_ref(),
        }
    }

    /// Size of the blob `digest` (validated), `None` when it is not stored.
    pub(super) async fn size(&self, digest: &str) -> Result<Option<u64>, BlobError> {
        match self.store().head(&self.location(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(storage(format!("look up blob {digest}"), e)),
        }
    }

    /// Make the verified file `staged` visible as blob `digest`. Returns `false` when that blob was
    /// already stored (identical content is stored once; `staged` is left for the caller to remove).
    pub(super) async fn commit(
        &self,
        dir: &Path,
        staged: &Path,
        digest: &str,
    ) -> Result<bool, BlobError> {
        match self {
            Backend::Local(_) => commit_local(dir, staged, digest).await,
            Backend::S3 { store, .. } => {
                let location = self.location(digest);
                match store.head(&location).await {
                    Ok(_) => return Ok(false),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(storage(format!("look up blob {digest}"), e)),
                }
                upload_file(store.as_ref(), &location, staged, digest).await?;
                Ok(true)
            }
        }
    }

    /// Stream the blob `digest` from byte `offset`, in pieces of `chunk` bytes (the last may be
    /// shorter). [`BlobError::NotFound`] when it is not stored, [`BlobError::Invalid`] when `offset`
    /// is past its end.
    pub(super) async fn read_from(
        &self,
        dir: &Path,
        digest: &str,
        offset: u64,
        chunk: usize,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, BlobError>>, BlobError> {
        let size = self
            .size(digest)
            .await?
            .ok_or_else(|| BlobError::NotFound(digest.to_owned()))?;
        if offset > size {
            return Err(BlobError::Invalid(format!(
                "offset {offset} is past the end of blob {digest} ({size} bytes)"
            )));
        }
        match self {
            Backend::Local(_) => {
                let path = dir.join(relative_key(digest));
                Ok(read_local(path, digest, offset, chunk).await?.boxed())
            }
            Backend::S3 { store, .. } => {
                if offset == size {
                    return Ok(futures::stream::empty().boxed());
                }
                let what = format!("read blob {digest}");
                let result = store
                    .get_opts(
                        &self.location(digest),
                        GetOptions {
                            range: Some(GetRange::Offset(offset)),
                            ..GetOptions::default()
                        },
                    )
                    .await
                    .map_err(|e| match e {
                        object_store::Error::NotFound { .. } => {
                            BlobError::NotFound(digest.to_owned())
                        }
                        e => storage(what.clone(), e),
                    })?;
                let pieces = result
                    .into_stream()
                    .map_err(move |e| storage(what.clone(), e));
                Ok(rechunk(pieces, chunk).boxed())
            }
        }
    }
}

/// Regroup a stream of arbitrary pieces into pieces of exactly `chunk` bytes (the last may be shorter).
fn rechunk(
    pieces: impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static,
    chunk: usize,
) -> impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static {
    futures::stream::unfold(
        Some((Box::pin(pieces), BytesMut::new())),
        move |state| async move {
            let (mut pieces, mut buf) = state?;
            while buf.len() < chunk {
                match pieces.next().await {
                    Some(Ok(b)) => buf.extend_from_slice(&b),
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => break,
                }
            }
            if buf.is_empty() {
                return None;
            }
            let out = buf.split_to(buf.len().min(chunk)).freeze();
            Some((Ok(out), Some((pieces, buf))))
        },
    )
}

async fn read_local(
    path: PathBuf,
    digest: &str,
    offset: u64,
    chunk: usize,
) -> Result<impl Stream<Item = Result<Bytes, BlobError>> + Send + 'static, BlobError> {
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BlobError::NotFound(digest.to_owned()))
        }
        Err(e) => return Err(io_context(e, "open blob", &path).into()),
    };
    if offset > 0 {
        file.seek(io::SeekFrom::Start(offset))
            .await
            .map_err(|e| io_context(e, "seek in blob", &path))?;
    }
    Ok(futures::stream::unfold(
        Some((file, path)),
        move |state| async move {
            let (mut file, path) = state?;
            let mut buf = BytesMut::with_capacity(chunk);
            // Fill whole chunks: a short read from the file is not the end of the blob.
            while buf.len() < chunk {
                match file.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => return Some((Err(io_context(e, "read blob", &path).into()), None)),
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

/// fsync a directory so a rename into it survives a crash.
async fn sync_dir(dir: PathBuf) -> io::Result<()> {
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_context(e, "sync directory", &dir))
    })
    .await
    .map_err(|e| io::Error::other(format!("blob sync task failed: {e}")))?
}

/// Rename the synced, verified `staged` file to `<dir>/sha256/<2 hex>/<digest>`: the same file the
/// `LocalFileSystem` store reads, written the way it writes (staging file + rename), without copying.
async fn commit_local(dir: &Path, staged: &Path, digest: &str) -> Result<bool, BlobError> {
    let final_path = dir.join(relative_key(digest));
    let shard = final_path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| dir.to_owned());
    if tokio::fs::try_exists(&final_path)
        .await
        .map_err(|e| io_context(e, "look up blob", &final_path))?
    {
        return Ok(false);
    }
    let shard_existed = tokio::fs::try_exists(&shard)
        .await
        .map_err(|e| io_context(e, "look up blob directory", &shard))?;
    if !shard_existed {
        tokio::fs::create_dir_all(&shard)
            .await
            .map_err(|e| io_context(e, "create blob directory", &shard))?;
    }
    // rename replaces atomically, so a concurrent upload of the same content is harmless.
    tokio::fs::rename(staged, &final_path)
        .await
        .map_err(|e| io_context(e, "store blob", &final_path))?;
    sync_dir(shard.clone()).await?;
    if !shard_existed {
        if let Some(parent) = shard.parent() {
            sync_dir(parent.to_owned()).await?;
        }
    }
    Ok(true)
}

/// Copy the verified file `staged` to `location`: one PUT when it fits a part, else a multipart upload
/// that S3 assembles only on completion (aborted on any error, so no partial object is ever visible).
async fn upload_file(
    store: &AmazonS3,
    location: &ObjectPath,
    staged: &Path,
    digest: &str,
) -> Result<(), BlobError> {
    let what = || format!("store blob {digest}");
    let mut file = tokio::fs::File::open(staged)
        .await
        .map_err(|e| io_context(e, "open blob upload", staged))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| io_context(e, "stat blob upload", staged))?
        .len();
    if len <= PART_BYTES as u64 {
        let mut buf = Vec::with_capacity(len as usize);
        file.read_to_end(&mut buf)
            .await
            .map_err(|e| io_context(e, "read blob upload", staged))?;
        store
            .put(location, PutPayload::from(buf))
            .await
            .map_err(|e| storage(what(), e))?;
        return Ok(());
    }
    let upload = store
        .put_multipart(location)
        .await
        .map_err(|e| storage(what(), e))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let copied: Result<(), BlobError> = async {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| io_context(e, "read blob upload", staged))?;
            if n == 0 {
                return Ok(());
            }
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .map_err(|e| storage(what(), e))?;
            writer.write(&buf[..n]);
        }
    }
    .await;
    match copied {
        Ok(()) => {
            writer.finish().await.map_err(|e| storage(what(), e))?;
            Ok(())
        }
        Err(e) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(blob = %digest, error = %abort, "could not abort a multipart upload");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rechunk_makes_whole_chunks() {
        let pieces = futures::stream::iter(
            [3usize, 5, 1, 7, 2]
                .into_iter()
                .map(|n| Ok::<_, BlobError>(Bytes::from(vec![1u8; n]))),
        );
        let out: Vec<Bytes> = rechunk(pieces, 4).try_collect().await.unwrap();
        let sizes: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(sizes, vec![4, 4, 4, 4, 2]);
    }
}
