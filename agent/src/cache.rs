//! A job's `cache:`: the key rendered over the seeded workspace, the archive restored before the
//! first step and saved after success.
//!
//! Archives are zstd-compressed tars with workspace-relative paths, stored by the coordinator in its
//! content-addressed blob store. They go in and out of the workspace through the executor's archive
//! API, like the source context and artifacts. Nothing here fails a job: a restore or save that goes
//! wrong is logged in the job's log and the job goes on.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use drover_proto::cache_key::{check_key, compile_glob, Facts, Part, Template};
use drover_proto::v1::{
    cache_chunk, Assignment, CacheChunk, CacheHeader, CacheSaved, CacheSpec, ResolveCacheRequest,
};
use drover_proto::CHUNK_BYTES;
use globset::GlobMatcher;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{self, AgentClient};
use crate::executor::{ArchiveHelper, ExecError, Executor, Workspace, WORKSPACE_DIR};

/// zstd level of saved archives: fast, and still a large gain on build outputs.
const ZSTD_LEVEL: i32 = 3;

/// Why a cache could not be restored or saved (never a job failure).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The key templates could not be rendered into valid keys.
    #[error("{0}")]
    Key(String),
    /// The archive holds an entry that would land outside the workspace; nothing was restored.
    #[error("the archive entry {path:?} {why}; nothing was restored")]
    Escape {
        /// The entry.
        path: String,
        /// How it escapes.
        why: String,
    },
    /// Talking to the coordinator failed.
    #[error(transparent)]
    Client(#[from] client::ClientError),
    /// The executor failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// Local files failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CacheError {
    let context = context.into();
    move |source| CacheError::Io { context, source }
}

/// Run file work on the blocking pool; a panic there (or a lost task) becomes an I/O error saying what
/// was being done, like any failure of the work itself.
async fn blocking<T, E>(
    context: &str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, CacheError>
where
    T: Send + 'static,
    E: Into<CacheError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CacheError::Io {
            context: context.into(),
            source: io::Error::other(e.to_string()),
        })?
        .map_err(Into::into)
}

/// The cache of one attempt, once its keys are rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCache {
    /// The exact key.
    pub key: String,
    /// The restore-key prefixes, in order.
    pub restore_keys: Vec<String>,
    /// Workspace-relative paths to save.
    pub paths: Vec<String>,
    /// The exact key is stored already: nothing to save (keys are immutable).
    pub exact_hit: bool,
}

/// Renders the key templates of `spec`. `files` (path -> sha256 of every seeded file) is needed
/// only when a template calls `hashFiles`.
pub fn render_keys(
    spec: &CacheSpec,
    files: &BTreeMap<String, String>,
) -> Result<JobCache, CacheError> {
    let facts = Facts {
        files,
        os: std::env::consts::OS,
        arch: std::env::consts::ARCH,
    };
    let render = |text: &str, what: &str| {
        let t =
            Template::parse(text).map_err(|e| CacheError::Key(format!("{what} {text:?}: {e}")))?;
        Ok::<String, CacheError>(t.render(&facts))
    };
    let checked = |key: String, text: &str, what: &str| {
        check_key(&key).map_err(|e| CacheError::Key(format!("{what} {text:?}: {e}")))?;
        Ok::<String, CacheError>(key)
    };
    let mut restore_keys = Vec::with_capacity(spec.restore_keys.len());
    for text in &spec.restore_keys {
        let key = render(text, "restore key")?;
        // A restore key that renders empty (a `hashFiles` without match) would match every entry.
        if !key.is_empty() {
            restore_keys.push(checked(key, text, "restore key")?);
        }
    }
    Ok(JobCache {
        key: checked(render(&spec.key, "key")?, &spec.key, "key")?,
        restore_keys,
        paths: spec.paths.clone(),
        exact_hit: false,
    })
}

/// Every `hashFiles` glob of the key templates of `spec`, compiled: only files they match are read
/// (none at all when there is no `hashFiles`).
fn hashed_globs(spec: &CacheSpec) -> Vec<GlobMatcher> {
    std::iter::once(&spec.key)
        .chain(&spec.restore_keys)
        .filter_map(|t| Template::parse(t).ok())
        .flat_map(|t| t.parts().to_vec())
        .filter_map(|p| match p {
            Part::HashFiles(globs) => Some(globs),
            _ => None,
        })
        .flatten()
        .filter_map(|g| compile_glob(&g).ok())
        .collect()
}

/// The path of a tar entry as workspace-relative components; `None` when it is absolute, climbs
/// with `..` or is empty.
fn normal_components(path: &Path) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?.to_string()),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!parts.is_empty()).then_some(parts)
}

/// Path -> sha256 of every regular file the seeded tars put into the workspace that one of `globs`
/// matches (later tars win, as they are extracted later).
pub fn seeded_files(
    tars: &[PathBuf],
    globs: &[GlobMatcher],
) -> io::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for tar_path in tars {
        let file = std::fs::File::open(tar_path)?;
        let mut archive = tar::Archive::new(io::BufReader::new(file));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let Some(parts) = normal_components(&entry.path()?) else {
                continue;
            };
            let path = parts.join("/");
            if !globs.iter().any(|g| g.is_match(&path)) {
                continue;
            }
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                // A directory or link replaces a file of the same name.
                files.remove(&path);
                continue;
            }
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = entry.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            files.insert(path, hex::encode(hasher.finalize()));
        }
    }
    Ok(files)
}

/// Where a symlink at `link` (workspace-relative components) pointing to `target` leads, as
/// workspace-relative components; `None` when it leaves the workspace or is absolute.
fn link_destination(link: &[String], target: &Path) -> Option<Vec<String>> {
    if target.is_absolute() {
        return None;
    }
    let mut at: Vec<String> = link[..link.len().saturating_sub(1)].to_vec();
    for c in target.components() {
        match c {
            Component::Normal(p) => at.push(p.to_str()?.to_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                at.pop()?;
            }
            _ => return None,
        }
    }
    Some(at)
}

/// What went into or came out of an archive.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Entries written.
    pub entries: u64,
    /// Bytes of file content.
    pub content_bytes: u64,
    /// Entries left out (symlinks leaving the workspace, devices), workspace-relative.
    pub skipped: Vec<String>,
}

/// Copies one entry into `out` under `path`, keeping its header (mode, owner, times, type).
fn copy_entry<W: Write>(
    out: &mut tar::Builder<W>,
    entry: &mut tar::Entry<'_, impl Read>,
    path: &str,
    link: Option<&str>,
) -> io::Result<()> {
    let mut header = entry.header().clone();
    match link {
        Some(target) => out.append_link(&mut header, path, target),
        None => out.append_data(&mut header, path, entry),
    }
}

/// Packs the archives the executor fetched (each of one cache path, entries starting with that
/// path's base name; `parent` is the path's directory in the workspace, "" at the top) into one
/// zstd-compressed tar of workspace-relative paths at `dest`. Symlinks that lead out of the
/// workspace and special files are left out.
pub fn pack(fetched: &[(PathBuf, String)], dest: &Path) -> io::Result<ArchiveStats> {
    let file = std::fs::File::create(dest)?;
    let encoder = zstd::Encoder::new(io::BufWriter::new(file), ZSTD_LEVEL)?;
    let mut out = tar::Builder::new(encoder);
    let mut stats = ArchiveStats::default();
    for (tar_path, parent) in fetched {
        let rebase = |parts: Vec<String>| {
            if parent.is_empty() {
                parts.join("/")
            } else {
                format!("{parent}/{}", parts.join("/"))
            }
        };
        let mut archive = tar::Archive::new(io::BufReader::new(std::fs::File::open(tar_path)?));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let Some(parts) = normal_components(&entry.path()?) else {
                continue;
            };
            let path = rebase(parts);
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                copy_entry(&mut out, &mut entry, &path, None)?;
            } else if kind.is_file() || kind == tar::EntryType::Continuous {
                stats.content_bytes += entry.header().size()?;
                copy_entry(&mut out, &mut entry, &path, None)?;
            } else if kind.is_symlink() {
                let target = entry.link_name()?.map(|t| t.into_owned());
                let rel: Vec<String> = path.split('/').map(str::to_string).collect();
                match target {
                    Some(t) if link_destination(&rel, &t).is_some() => {
                        let t = t.to_string_lossy().into_owned();
                        copy_entry(&mut out, &mut entry, &path, Some(&t))?;
                    }
                    _ => {
                        stats.skipped.push(path);
                        continue;
                    }
                }
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name()?
                    .and_then(|t| normal_components(&t))
                    .map(rebase);
                match target {
                    Some(t) => copy_entry(&mut out, &mut entry, &path, Some(&t))?,
                    None => {
                        stats.skipped.push(path);
                        continue;
                    }
                }
            } else {
                stats.skipped.push(path);
                continue;
            }
            stats.entries += 1;
        }
    }
    out.into_inner()?.finish()?.flush()?;
    Ok(stats)
}

/// Checks the zstd-compressed cache archive at `archive` and writes its entries as a plain tar to
/// `dest`, ready for the executor. Any entry that would land outside the workspace (absolute,
/// `..`, below a symlink of the archive, a symlink or hard link leading out) rejects the whole
/// archive: a restore is all or nothing.
pub fn unpack_checked(archive: &Path, dest: &Path) -> Result<ArchiveStats, CacheError> {
    let file = std::fs::File::open(archive).map_err(io_err("opening the cache archive"))?;
    let decoder = zstd::Decoder::new(file).map_err(io_err("reading the cache archive"))?;
    let mut input = tar::Archive::new(decoder);
    let out_file = std::fs::File::create(dest).map_err(io_err("writing the restore tar"))?;
    let mut out = tar::Builder::new(io::BufWriter::new(out_file));
    let mut stats = ArchiveStats::default();
    let mut symlinks: HashSet<String> = HashSet::new();
    let mut files: HashSet<String> = HashSet::new();
    let reading = io_err("reading the cache archive");
    let writing = || io_err("writing the restore tar");
    for entry in input.entries().map_err(reading)? {
        let mut entry = entry.map_err(io_err("reading the cache archive"))?;
        let raw = entry
            .path()
            .map_err(io_err("reading the cache archive"))?
            .into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let escape = |why: &str| CacheError::Escape {
            path: shown.clone(),
            why: why.to_string(),
        };
        let parts = normal_components(&raw)
            .ok_or_else(|| escape("is absolute or climbs out with \"..\""))?;
        // Writing below a symlink would follow it, wherever it points.
        for i in 1..parts.len() {
            if symlinks.contains(&parts[..i].join("/")) {
                return Err(escape("lies below a symlink of the archive"));
            }
        }
        let path = parts.join("/");
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            copy_entry(&mut out, &mut entry, &path, None).map_err(writing())?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            stats.content_bytes += entry.header().size().unwrap_or(0);
            copy_entry(&mut out, &mut entry, &path, None).map_err(writing())?;
            files.insert(path);
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(io_err("reading the cache archive"))?
                .map(|t| t.into_owned())
                .ok_or_else(|| escape("is a symlink without a target"))?;
            if link_destination(&parts, &target).is_none() {
                return Err(escape(&format!(
                    "is a symlink to {:?}, outside the workspace",
                    target.display()
                )));
            }
            let t = target.to_string_lossy().into_owned();
            copy_entry(&mut out, &mut entry, &path, Some(&t)).map_err(writing())?;
            symlinks.insert(path);
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(io_err("reading the cache archive"))?
                .and_then(|t| normal_components(&t))
                .map(|p| p.join("/"))
                .filter(|t| files.contains(t))
                .ok_or_else(|| escape("is a hard link to no earlier file of the archive"))?;
            copy_entry(&mut out, &mut entry, &path, Some(&target)).map_err(writing())?;
        } else {
            return Err(escape("is neither a file, a directory nor a link"));
        }
        stats.entries += 1;
    }
    out.into_inner()
        .map_err(writing())?
        .flush()
        .map_err(writing())?;
    Ok(stats)
}

/// "12.3 MiB".
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs `f` with an archive helper on the workspace, removing the helper afterwards.
async fn with_helper<E: Executor, T>(
    exec: &E,
    ws: &Workspace,
    image: &str,
    f: impl AsyncFnOnce(&ArchiveHelper) -> Result<T, CacheError>,
) -> Result<T, CacheError> {
    let helper = exec.archive_helper(ws, image).await?;
    let result = f(&helper).await;
    if let Err(e) = exec.remove_helper(helper).await {
        tracing::warn!(attempt = %ws.attempt_id, error = %e, "removing the archive helper");
    }
    result
}

/// Renders the keys of the assignment's cache (over the seeded tars) and restores the best entry
/// into the workspace. Returns the cache to save after success (`None` when the job has no cache
/// or its keys could not be rendered) and the lines for the job's log.
pub async fn restore<E: Executor>(
    exec: &E,
    client: &AgentClient,
    a: &Assignment,
    ws: &Workspace,
    image: &str,
    scratch: &Path,
    seeded: &[PathBuf],
) -> (Option<JobCache>, String) {
    let Some(spec) = &a.cache else {
        return (None, String::new());
    };
    let globs = hashed_globs(spec);
    let files = if !globs.is_empty() {
        let tars = seeded.to_vec();
        match tokio::task::spawn_blocking(move || seeded_files(&tars, &globs)).await {
            Ok(Ok(files)) => files,
            Ok(Err(e)) => {
                return (
                    None,
                    format!("[drover] cache: disabled: reading the workspace for hashFiles: {e}\n"),
                )
            }
            Err(e) => {
                return (
                    None,
                    format!("[drover] cache: disabled: reading the workspace for hashFiles: {e}\n"),
                )
            }
        }
    } else {
        BTreeMap::new()
    };
    let mut cache = match render_keys(spec, &files) {
        Ok(c) => c,
        Err(e) => return (None, format!("[drover] cache: disabled: {e}\n")),
    };
    let line = match restore_entry(exec, client, a, ws, image, scratch, &cache).await {
        Ok(None) => format!("[drover] cache: miss for key {:?}\n", cache.key),
        Ok(Some((found, stats))) => {
            cache.exact_hit = found.exact;
            let how = if found.exact {
                String::new()
            } else {
                format!(" (restore key match for {:?})", cache.key)
            };
            format!(
                "[drover] cache: restored key {:?}{how}: {} files and directories, {} ({} compressed)\n",
                found.key,
                stats.entries,
                mib(stats.content_bytes),
                mib(found.size)
            )
        }
        Err(e) => format!("[drover] cache: restore failed, the job goes on without it: {e}\n"),
    };
    tracing::info!(attempt = %a.attempt_id, key = %cache.key, result = %line.trim_end(), "cache restore");
    (Some(cache), line)
}

async fn restore_entry<E: Executor>(
    exec: &E,
    client: &AgentClient,
    a: &Assignment,
    ws: &Workspace,
    image: &str,
    scratch: &Path,
    cache: &JobCache,
) -> Result<Option<(drover_proto::v1::ResolveCacheResponse, ArchiveStats)>, CacheError> {
    let found = client
        .clone()
        .resolve_cache(ResolveCacheRequest {
            attempt_id: a.attempt_id.clone(),
            epoch: a.epoch,
            key: cache.key.clone(),
            restore_keys: cache.restore_keys.clone(),
        })
        .await
        .map_err(|s| {
            CacheError::Client(client::ClientError::Rpc {
                what: "looking up the cache".into(),
                status: s,
            })
        })?
        .into_inner();
    if !found.found {
        return Ok(None);
    }
    let archive = scratch.join("cache-restore.tar.zst");
    client::download_blob(
        client,
        &a.attempt_id,
        &found.digest,
        Some(found.size),
        &archive,
    )
    .await?;
    let plain = scratch.join("cache-restore.tar");
    let stats = {
        let (archive, plain) = (archive.clone(), plain.clone());
        blocking("checking the cache archive", move || {
            unpack_checked(&archive, &plain)
        })
        .await?
    };
    let _ = tokio::fs::remove_file(&archive).await;
    with_helper(exec, ws, image, async |helper| {
        exec.put_archive(helper, WORKSPACE_DIR, &plain).await?;
        Ok(())
    })
    .await?;
    let _ = tokio::fs::remove_file(&plain).await;
    Ok(Some((found, stats)))
}

/// Packs the cache's paths from the workspace and saves them under the exact key, unless that key
/// was restored (it is stored already). Returns the lines for the job's log.
pub async fn save<E: Executor>(
    exec: &E,
    client: &AgentClient,
    a: &Assignment,
    ws: &Workspace,
    image: &str,
    scratch: &Path,
    cache: &JobCache,
) -> String {
    if cache.exact_hit {
        return format!(
            "[drover] cache: key {:?} was restored exactly; not saved again (keys are immutable)\n",
            cache.key
        );
    }
    let line = match save_entry(exec, client, a, ws, image, scratch, cache).await {
        Ok(None) => format!(
            "[drover] cache: nothing to save for key {:?}: none of {} exists\n",
            cache.key,
            cache.paths.join(", ")
        ),
        Ok(Some((saved, stats, missing))) => {
            let mut line = if saved.stored {
                format!(
                    "[drover] cache: saved key {:?}: {} files and directories, {} ({} compressed)\n",
                    cache.key,
                    stats.entries,
                    mib(stats.content_bytes),
                    mib(saved.size)
                )
            } else {
                format!(
                    "[drover] cache: key {:?} was saved by another job meanwhile; kept that one\n",
                    cache.key
                )
            };
            if !missing.is_empty() {
                line.push_str(&format!(
                    "[drover] cache: not found, not cached: {}\n",
                    missing.join(", ")
                ));
            }
            if !stats.skipped.is_empty() {
                line.push_str(&format!(
                    "[drover] cache: left out (symlinks leaving the workspace, special files): {}\n",
                    stats.skipped.join(", ")
                ));
            }
            line
        }
        Err(e) => format!("[drover] cache: save failed, the job is not affected: {e}\n"),
    };
    tracing::info!(attempt = %a.attempt_id, key = %cache.key, result = %line.trim_end(), "cache save");
    line
}

/// A cache path as (workspace path, its parent directory): "a/b" -> ("a/b", "a").
fn split_path(path: &str) -> Option<(String, String)> {
    let parts = normal_components(Path::new(path))?;
    let parent = parts[..parts.len() - 1].join("/");
    Some((parts.join("/"), parent))
}

type Saved = (CacheSaved, ArchiveStats, Vec<String>);

async fn save_entry<E: Executor>(
    exec: &E,
    client: &AgentClient,
    a: &Assignment,
    ws: &Workspace,
    image: &str,
    scratch: &Path,
    cache: &JobCache,
) -> Result<Option<Saved>, CacheError> {
    let mut missing = Vec::new();
    let fetched = with_helper(exec, ws, image, async |helper| {
        let mut fetched = Vec::new();
        for (n, raw) in cache.paths.iter().enumerate() {
            let Some((path, parent)) = split_path(raw) else {
                missing.push(raw.clone());
                continue;
            };
            let tar_path = scratch.join(format!("cache-save-{n}.tar"));
            match exec
                .get_archive(helper, &format!("{WORKSPACE_DIR}/{path}"), &tar_path)
                .await
            {
                Ok(()) => fetched.push((tar_path, parent)),
                Err(ExecError::NotFound(_)) => missing.push(raw.clone()),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(fetched)
    })
    .await?;
    if fetched.is_empty() {
        return Ok(None);
    }
    let archive = scratch.join("cache-save.tar.zst");
    let stats = {
        let (fetched, archive) = (fetched.clone(), archive.clone());
        blocking("packing the cache", move || {
            pack(&fetched, &archive).map_err(io_err("packing the cache"))
        })
        .await?
    };
    for (tar_path, _) in &fetched {
        let _ = tokio::fs::remove_file(tar_path).await;
    }
    let saved = upload(client, a, &cache.key, &archive).await;
    let _ = tokio::fs::remove_file(&archive).await;
    Ok(Some((saved?, stats, missing)))
}

/// Streams the archive at `path` to the coordinator's SaveCache.
async fn upload(
    client: &AgentClient,
    a: &Assignment,
    key: &str,
    path: &Path,
) -> Result<CacheSaved, CacheError> {
    let (size, digest) = {
        let path = path.to_path_buf();
        blocking("hashing the cache archive", move || {
            let hash = || {
                let mut file = std::fs::File::open(&path)?;
                let mut hasher = Sha256::new();
                let size = io::copy(&mut file, &mut hasher)?;
                Ok((size, hex::encode(hasher.finalize())))
            };
            hash().map_err(io_err("hashing the cache archive"))
        })
        .await?
    };
    let header = CacheHeader {
        attempt_id: a.attempt_id.clone(),
        epoch: a.epoch,
        key: key.to_string(),
        size,
        digest,
    };
    let file = tokio::fs::File::open(path)
        .await
        .map_err(io_err("opening the cache archive"))?;
    let (tx, rx) = mpsc::channel::<CacheChunk>(4);
    // The file is read beside the call so the request body streams while the call runs.
    let reader = tokio::spawn(async move {
        let mut file = tokio::io::BufReader::with_capacity(1 << 20, file);
        let header = CacheChunk {
            part: Some(cache_chunk::Part::Header(header)),
        };
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < buf.len() {
                let n = file.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok::<(), io::Error>(());
            }
            buf.truncate(filled);
            let chunk = CacheChunk {
                part: Some(cache_chunk::Part::Data(buf)),
            };
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
    });
    let response = client.clone().save_cache(ReceiverStream::new(rx)).await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io_err("reading the cache archive")(e)),
        Err(e) => {
            return Err(CacheError::Io {
                context: "reading the cache archive".into(),
                source: io::Error::other(e.to_string()),
            })
        }
    }
    response.map(|r| r.into_inner()).map_err(|s| {
        CacheError::Client(client::ClientError::Rpc {
            what: format!("saving cache {key:?}"),
            status: s,
        })
    })
}

#[cfg(test)]
mod tests;
