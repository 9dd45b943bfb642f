//! Collecting a job's artifacts from its workspace.
//!
//! For each declared path, dir or glob the literal directory prefix is fetched through the
//! engine's archive API (no tool needed in the image) and spooled to a local tar. Its regular
//! files that match are found with their size, mode, sha256 and the offset of their bytes in
//! the tar, and uploaded straight from there: the content is written to the agent's disk once
//! and read back once, with no extracted copy.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use futures::FutureExt;
use globset::{GlobBuilder, GlobMatcher};
use sha2::{Digest, Sha256};

use crate::executor::{ArchiveHelper, ExecError, Executor, WORKSPACE_DIR};

/// Most symlinks followed while resolving one artifact path.
const MAX_SYMLINK_HOPS: usize = 32;

/// One file to upload as an artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedFile {
    /// Path relative to the workspace (as declared, `/`-separated).
    pub path: String,
    /// Unix mode bits.
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// sha256, hex.
    pub digest: String,
    /// The local file holding the content: the fetched archive, shared by the files it holds.
    pub source: PathBuf,
    /// Where the content starts in `source`; it is `size` bytes long.
    pub offset: u64,
    /// The id of the upload that streamed this file while it was scanned (see [`Live`]), if one
    /// was started: the coordinator may hold all of it, part of it (a broken connection) or none.
    pub streamed_as: Option<String>,
}

/// A matching file's content, sent while the fetched archive is scanned, so that a file's upload
/// runs while the rest of the archive still arrives instead of after it. For each file: `Start`,
/// its bytes in order as `Data`, then `End` with the digest of exactly those bytes. A file whose
/// scan fails gets no `End`; the channel's end then says that no more will come.
#[derive(Debug)]
pub enum Live {
    /// A file's upload begins.
    Start {
        /// Path relative to the workspace.
        path: String,
        /// Unix mode bits.
        mode: u32,
        /// Size in bytes.
        size: u64,
        /// The upload's id (for resuming it after a broken connection).
        upload_id: String,
    },
    /// The next bytes of the file.
    Data(Vec<u8>),
    /// The file's last byte was sent; its sha256, hex.
    End {
        /// sha256 of the bytes sent, hex.
        digest: String,
    },
}

/// Where the scan sends [`Live`] files; shared by the scans of every pattern, so a file collected
/// by two patterns is streamed once.
#[derive(Debug, Clone)]
pub struct LiveSender {
    tx: tokio::sync::mpsc::Sender<Live>,
    claimed: std::sync::Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl LiveSender {
    /// A sender into `tx`.
    pub fn new(tx: tokio::sync::mpsc::Sender<Live>) -> Self {
        Self {
            tx,
            claimed: Default::default(),
        }
    }

    /// True for the first claim of `path`.
    fn claim(&self, path: &str) -> bool {
        self.claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_string())
    }

    /// Sends `item` from a blocking thread; false once nobody listens.
    fn send(&self, item: Live) -> bool {
        self.tx.blocking_send(item).is_ok()
    }
}

/// Removes the local files holding `files`' content (after their upload, or when it failed).
pub async fn remove_sources(files: &[CollectedFile]) {
    let sources: BTreeSet<&PathBuf> = files.iter().map(|f| &f.source).collect();
    for source in sources {
        if let Err(e) = tokio::fs::remove_file(source).await {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %source.display(), error = %e, "removing a fetched archive");
            }
        }
    }
}

/// Why artifacts could not be collected.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A declared path matched no regular file.
    #[error("artifact {0:?} matched no file")]
    NoMatch(String),
    /// A declared path is not a valid workspace-relative path or glob.
    #[error("artifact {pattern:?}: {reason}")]
    Invalid {
        /// The declared path.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A declared path leads out of the workspace through a symlink.
    #[error("artifact {pattern:?}: {reason}")]
    Escape {
        /// The declared path.
        pattern: String,
        /// Which symlink and where it points.
        reason: String,
    },
    /// The executor failed.
    #[error("artifact {pattern:?}: {source}")]
    Exec {
        /// The declared path.
        pattern: String,
        /// The executor error.
        source: ExecError,
    },
    /// Reading the archive or writing local copies failed.
    #[error("artifact {pattern:?}: {context}: {source}")]
    Io {
        /// The declared path.
        pattern: String,
        /// What was being done.
        context: String,
        /// The I/O error.
        source: io::Error,
    },
}

/// A declared artifact path, parsed.
#[derive(Debug)]
struct Pattern {
    raw: String,
    /// Literal leading components (the directory fetched, or the exact path).
    prefix: Vec<String>,
    /// The glob, when the path has glob characters.
    glob: Option<GlobMatcher>,
}

fn parse_pattern(raw: &str) -> Result<Pattern, ArtifactError> {
    let invalid = |reason: &str| ArtifactError::Invalid {
        pattern: raw.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err(invalid("empty path"));
    }
    if trimmed.starts_with('/') {
        return Err(invalid(
            "absolute paths are not allowed; give a path relative to the workspace",
        ));
    }
    let mut components = Vec::new();
    for c in trimmed.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(invalid("`..` would leave the workspace")),
            c => components.push(c.to_string()),
        }
    }
    if components.is_empty() {
        // `.` or `./`: the whole workspace.
        return Ok(Pattern {
            raw: raw.to_string(),
            prefix: Vec::new(),
            glob: None,
        });
    }
    let is_glob = |c: &str| c.contains(['*', '?', '[', '{']);
    let literal = components.iter().take_while(|c| !is_glob(c)).count();
    let glob = if literal == components.len() {
        None
    } else {
        let normalized = components.join("/");
        let glob = GlobBuilder::new(&normalized)
            .literal_separator(true)
            .build()
            .map_err(|e| invalid(&format!("invalid glob: {e}")))?;
        Some(glob.compile_matcher())
    };
    Ok(Pattern {
        raw: raw.to_string(),
        prefix: components[..literal].to_vec(),
        glob,
    })
}

/// Lexically normalizes an absolute `/`-separated path; `None` if it climbs above `/`.
fn normalize_abs(path: &str) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c.to_string()),
        }
    }
    Some(out)
}

/// Resolves symlinks along `prefix` (workspace-relative components) so the fetched path is a
/// real directory or file inside the workspace. `Ok(None)` when the path does not exist.
async fn resolve<E: Executor>(
    exec: &E,
    helper: &ArchiveHelper,
    pattern: &Pattern,
) -> Result<Option<Vec<String>>, ArtifactError> {
    let ws_root: Vec<String> = normalize_abs(WORKSPACE_DIR).unwrap_or_default();
    let mut comps = pattern.prefix.clone();
    let mut hops = 0;
    let mut i = 0;
    while i < comps.len() {
        let path = format!("{WORKSPACE_DIR}/{}", comps[..=i].join("/"));
        let info = exec
            .stat_path(helper, &path)
            .await
            .map_err(|source| ArtifactError::Exec {
                pattern: pattern.raw.clone(),
                source,
            })?;
        let Some(info) = info else { return Ok(None) };
        if let Some(target) = info.link_target {
            hops += 1;
            let escape = |why: &str| ArtifactError::Escape {
                pattern: pattern.raw.clone(),
                reason: format!(
                    "{:?} is a symlink to {target:?}, {why}",
                    comps[..=i].join("/")
                ),
            };
            if hops > MAX_SYMLINK_HOPS {
                return Err(escape("too many levels of symlinks"));
            }
            let joined = if target.starts_with('/') {
                target.clone()
            } else {
                format!("{WORKSPACE_DIR}/{}/{target}", comps[..i].join("/"))
            };
            let resolved = normalize_abs(&joined).ok_or_else(|| escape("outside the workspace"))?;
            if !resolved.starts_with(&ws_root) {
                return Err(escape("outside the workspace"));
            }
            let mut next: Vec<String> = resolved[ws_root.len()..].to_vec();
            next.extend_from_slice(&comps[i + 1..]);
            comps = next;
            i = 0;
            continue;
        }
        i += 1;
    }
    Ok(Some(comps))
}

/// Collects the files matching `patterns` from the workspace behind `helper`, fetching archives
/// into `scratch` (a local directory that must exist). Every pattern must match at least one
/// regular file. The files' content stays in the fetched archives until [`remove_sources`]; on an
/// error nothing is left behind.
pub async fn collect<E: Executor>(
    exec: &E,
    helper: &ArchiveHelper,
    patterns: &[String],
    scratch: &Path,
    live: Option<LiveSender>,
) -> Result<Vec<CollectedFile>, ArtifactError> {
    let collected = collect_archives(exec, helper, patterns, scratch, live).await;
    if collected.is_err() {
        for n in 0..patterns.len() {
            let _ = tokio::fs::remove_file(archive_path(scratch, n)).await;
        }
    }
    collected
}

/// Where the archive fetched for the `n`th pattern is spooled.
fn archive_path(scratch: &Path, n: usize) -> PathBuf {
    scratch.join(format!("artifacts-{n}.tar"))
}

async fn collect_archives<E: Executor>(
    exec: &E,
    helper: &ArchiveHelper,
    patterns: &[String],
    scratch: &Path,
    live: Option<LiveSender>,
) -> Result<Vec<CollectedFile>, ArtifactError> {
    // Every entry is checked before anything is fetched: files are uploaded while they are scanned,
    // so an entry that names nothing or leaves the workspace fails the job before any upload.
    let mut checked = Vec::with_capacity(patterns.len());
    for raw in patterns {
        let pattern = parse_pattern(raw)?;
        let Some(resolved) = resolve(exec, helper, &pattern).await? else {
            return Err(ArtifactError::NoMatch(raw.clone()));
        };
        checked.push((raw, pattern, resolved));
    }
    let mut files: BTreeMap<String, CollectedFile> = BTreeMap::new();
    for (n, (raw, pattern, resolved)) in checked.into_iter().enumerate() {
        let fetch = if resolved.is_empty() {
            WORKSPACE_DIR.to_string()
        } else {
            format!("{WORKSPACE_DIR}/{}", resolved.join("/"))
        };
        let tar_path = archive_path(scratch, n);
        // The archive is scanned (its files hashed and streamed) from memory while it arrives.
        let (pieces, arriving) = tokio::sync::mpsc::channel(ARCHIVE_QUEUE);
        let scan = {
            let tar_path = tar_path.clone();
            let pattern_raw = raw.clone();
            let prefix = pattern.prefix.clone();
            let glob = pattern.glob.clone();
            let live = live.clone();
            tokio::task::spawn_blocking(move || {
                let reader = PieceReader::new(arriving);
                scan_matching(reader, &tar_path, &prefix, glob.as_ref(), live.as_ref())
            })
            .map(move |joined| match joined {
                Ok(scanned) => scanned.map_err(|(context, source)| ArtifactError::Io {
                    pattern: pattern_raw,
                    context,
                    source,
                }),
                Err(e) => Err(ArtifactError::Io {
                    pattern: pattern_raw,
                    context: "reading the archive".to_string(),
                    source: io::Error::other(e.to_string()),
                }),
            })
        };
        // The fetch drops its sender when it ends: the scan then sees the archive's end.
        let fetched = exec
            .get_archive_streamed(helper, &fetch, &tar_path, pieces)
            .await;
        let found = scan.await;
        match fetched {
            Ok(()) => {}
            Err(ExecError::NotFound(_)) => return Err(ArtifactError::NoMatch(raw.clone())),
            Err(source) => {
                return Err(ArtifactError::Exec {
                    pattern: raw.clone(),
                    source,
                })
            }
        }
        let found = found?;
        if found.is_empty() {
            return Err(ArtifactError::NoMatch(raw.clone()));
        }
        for f in found {
            files.entry(f.path.clone()).or_insert(f);
        }
        // Every file of this archive may have been collected already by an earlier pattern.
        if !files.values().any(|f| f.source == tar_path) {
            let _ = tokio::fs::remove_file(&tar_path).await;
        }
    }
    Ok(files.into_values().collect())
}

/// Whether `path` (workspace-relative) is selected by `glob`: the path itself or one of its
/// directories matches (a matching directory selects everything under it).
fn glob_selects(glob: &GlobMatcher, path: &str) -> bool {
    let mut end = path.len();
    loop {
        if glob.is_match(&path[..end]) {
            return true;
        }
        match path[..end].rfind('/') {
            Some(i) => end = i,
            None => return false,
        }
    }
}

type IoFail = (String, io::Error);

/// Batches of an archive's pieces (about a MiB each) queued between its fetch and its scan.
const ARCHIVE_QUEUE: usize = 4;

/// An archive read as its pieces arrive (see [`Executor::get_archive_streamed`]): reads wait (on a
/// blocking thread) for the next batch; the sender's end is the archive's end.
struct PieceReader {
    arriving: tokio::sync::mpsc::Receiver<Vec<bytes::Bytes>>,
    queue: std::collections::VecDeque<bytes::Bytes>,
}

impl PieceReader {
    fn new(arriving: tokio::sync::mpsc::Receiver<Vec<bytes::Bytes>>) -> Self {
        Self {
            arriving,
            queue: Default::default(),
        }
    }
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(front) = self.queue.front_mut() {
                let n = buf.len().min(front.len());
                buf[..n].copy_from_slice(&front.split_to(n));
                if front.is_empty() {
                    self.queue.pop_front();
                }
                return Ok(n);
            }
            match self.arriving.blocking_recv() {
                Some(batch) => self
                    .queue
                    .extend(batch.into_iter().filter(|p| !p.is_empty())),
                None => return Ok(0),
            }
        }
    }
}

/// Bytes hashed per read of an archived file.
const HASH_BUFFER: usize = 256 * 1024;

/// Reads `tar`, the content of the file `tar_path` (whose entries start with the fetched path's
/// base name), and describes its selected regular files: their content is hashed where it lies in the tar, and
/// its offset there recorded, so they can be uploaded from the tar without a copy. With `live`, each
/// file no other scan claimed is also sent there as it is read.
fn scan_matching(
    tar: impl Read,
    tar_path: &Path,
    prefix: &[String],
    glob: Option<&GlobMatcher>,
    live: Option<&LiveSender>,
) -> Result<Vec<CollectedFile>, IoFail> {
    let ctx = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| (what, e)
    };
    let mut archive = tar::Archive::new(io::BufReader::new(tar));
    let mut out: Vec<CollectedFile> = Vec::new();
    // Archive path -> index in `out`, for hard links to files already seen.
    let mut by_archive_path: HashMap<String, usize> = HashMap::new();
    let mut buf = vec![0u8; HASH_BUFFER];
    for entry in archive
        .entries()
        .map_err(ctx("reading the fetched archive"))?
    {
        let mut entry = entry.map_err(ctx("reading the fetched archive"))?;
        let entry_path = entry
            .path()
            .map_err(ctx("reading an archive entry name"))?
            .into_owned();
        // Entries that climb out (`..`, absolute) are never accepted.
        let mut parts = Vec::new();
        let mut safe = true;
        for c in entry_path.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                Component::CurDir => {}
                _ => safe = false,
            }
        }
        if !safe || parts.is_empty() {
            tracing::warn!(entry = %entry_path.display(), "skipping an archive entry outside the workspace");
            continue;
        }
        // The first component is the fetched path's base name; the rest is below the prefix.
        let mut rel: Vec<String> = prefix.to_vec();
        rel.extend(parts[1..].iter().cloned());
        let rel_path = rel.join("/");
        let archive_key = parts.join("/");
        let selected = match glob {
            None => true,
            Some(g) => glob_selects(g, &rel_path),
        };
        let kind = entry.header().entry_type();
        if !selected {
            continue;
        }
        if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(ctx("reading a hard link"))?
                .map(|t| t.to_string_lossy().trim_start_matches("./").to_string());
            if let Some(&i) = target.as_ref().and_then(|t| by_archive_path.get(t)) {
                let mut copy = out[i].clone();
                copy.path = rel_path;
                copy.streamed_as = None;
                out.push(copy);
            }
            continue;
        }
        if kind.is_symlink() {
            let target = entry.link_name().ok().flatten();
            tracing::warn!(path = %rel_path, target = ?target, "not collecting a symlink as an artifact");
            continue;
        }
        // Both kinds store the content as it is, in one run of bytes (GNU sparse entries would
        // not; the engine never writes them).
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            continue;
        }
        let mode = entry.header().mode().map_err(ctx("reading a file mode"))? & 0o7777;
        let offset = entry.raw_file_position();
        let expected = entry.size();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut streaming = live.filter(|l| l.claim(&rel_path));
        let streamed_as = streaming.map(|l| {
            let upload_id = uuid::Uuid::new_v4().simple().to_string();
            let started = l.send(Live::Start {
                path: rel_path.clone(),
                mode,
                size: expected,
                upload_id: upload_id.clone(),
            });
            if !started {
                streaming = None;
            }
            upload_id
        });
        loop {
            let k = entry
                .read(&mut buf)
                .map_err(ctx("reading an archived file"))?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            size += k as u64;
            if let Some(l) = streaming {
                if !l.send(Live::Data(buf[..k].to_vec())) {
                    streaming = None;
                }
            }
        }
        if size != expected {
            return Err((
                "reading an archived file".to_string(),
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{rel_path}: the archive holds {size} of its {expected} bytes"),
                ),
            ));
        }
        let digest = hex::encode(hasher.finalize());
        if let Some(l) = streaming {
            l.send(Live::End {
                digest: digest.clone(),
            });
        }
        by_archive_path.insert(archive_key, out.len());
        out.push(CollectedFile {
            path: rel_path,
            mode,
            size,
            digest,
            source: tar_path.to_owned(),
            offset,
            streamed_as,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_split_into_literal_prefix_and_glob() {
        let p = parse_pattern("./out/bin/").unwrap();
        assert_eq!(p.prefix, vec!["out", "bin"]);
        assert!(p.glob.is_none());
        let p = parse_pattern("dist/**/*.txt").unwrap();
        assert_eq!(p.prefix, vec!["dist"]);
        let g = p.glob.unwrap();
        assert!(glob_selects(&g, "dist/a/b.txt"));
        assert!(glob_selects(&g, "dist/b.txt"));
        assert!(!glob_selects(&g, "dist/b.bin"));
        let p = parse_pattern("*.log").unwrap();
        assert!(p.prefix.is_empty());
        assert!(!glob_selects(p.glob.as_ref().unwrap(), "sub/x.log"));
        assert!(glob_selects(p.glob.as_ref().unwrap(), "x.log"));
    }

    #[test]
    fn patterns_leaving_the_workspace_are_rejected() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "", "  "] {
            let err = parse_pattern(bad).unwrap_err();
            assert!(matches!(err, ArtifactError::Invalid { .. }), "{bad}: {err}");
        }
    }

    /// Content that differs at every offset, so a range read from the wrong place shows.
    fn content(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    fn add_file(b: &mut tar::Builder<std::fs::File>, path: &str, data: &[u8], mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn add_dir(b: &mut tar::Builder<std::fs::File>, path: &str, mode: u32) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(mode);
        b.append_data(&mut h, path, io::empty()).unwrap();
    }

    fn add_link(b: &mut tar::Builder<std::fs::File>, kind: tar::EntryType, path: &str, to: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, path, to).unwrap();
    }

    fn scan_file(
        tar_path: &Path,
        prefix: &[String],
        glob: Option<&GlobMatcher>,
    ) -> Result<Vec<CollectedFile>, IoFail> {
        let file = std::fs::File::open(tar_path).unwrap();
        scan_matching(file, tar_path, prefix, glob, None)
    }

    /// The bytes `f` points at in its source.
    fn bytes_of(f: &CollectedFile) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut out = vec![0u8; f.size as usize];
        std::fs::File::open(&f.source)
            .unwrap()
            .read_exact_at(&mut out, f.offset)
            .unwrap();
        out
    }

    /// A directory fetched as a tar the way the engine sends it: several files, one larger than the
    /// hashing buffer and not a multiple of a tar block (so the next header is mid-buffer), one whose
    /// long name needs an extra header before it, an empty one, modes, a hard link and a symlink.
    #[test]
    fn files_are_found_in_place_in_the_fetched_archive() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("a.tar");
        let big = content(HASH_BUFFER * 2 + 12_345, 7);
        let small = content(513, 9);
        let long_name = format!("out/{}/deep.txt", "n".repeat(120));
        let long = content(70_001, 11);
        {
            let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
            add_dir(&mut b, "out", 0o755);
            add_file(&mut b, "out/big.bin", &big, 0o644);
            add_dir(&mut b, "out/bin", 0o700);
            add_file(&mut b, "out/bin/tool", &small, 0o755);
            add_file(&mut b, &long_name, &long, 0o600);
            add_file(&mut b, "out/empty", &[], 0o640);
            add_link(&mut b, tar::EntryType::Link, "out/again.bin", "out/big.bin");
            add_link(&mut b, tar::EntryType::Symlink, "out/escape", "/etc/passwd");
            b.finish().unwrap();
        }
        let found = scan_file(&tar_path, &["dist".to_string()], None).unwrap();
        let by_path: HashMap<&str, &CollectedFile> =
            found.iter().map(|f| (f.path.as_str(), f)).collect();
        let long_rel = format!("dist/{}", &long_name["out/".len()..]);
        let expect: [(&str, &[u8], u32); 5] = [
            ("dist/big.bin", &big, 0o644),
            ("dist/bin/tool", &small, 0o755),
            (&long_rel, &long, 0o600),
            ("dist/empty", &[], 0o640),
            ("dist/again.bin", &big, 0o644),
        ];
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        for (path, data, mode) in expect {
            let f = by_path
                .get(path)
                .unwrap_or_else(|| panic!("{path} missing"));
            assert_eq!(f.size, data.len() as u64, "{path}");
            assert_eq!(f.mode, mode, "{path}");
            assert_eq!(f.digest, hex::encode(Sha256::digest(data)), "{path}");
            assert_eq!(f.source, tar_path, "{path}");
            assert!(
                bytes_of(f) == data,
                "{path}: the recorded range holds other bytes"
            );
        }
        assert!(!by_path.contains_key("dist/escape"));

        // A glob selects among the same entries.
        let glob = parse_pattern("dist/**/*.bin").unwrap().glob.unwrap();
        let found = scan_file(&tar_path, &["dist".to_string()], Some(&glob)).unwrap();
        let paths: BTreeSet<&str> = found.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, BTreeSet::from(["dist/big.bin", "dist/again.bin"]));
    }

    /// Scanned from its pieces as they arrive (in odd sizes and batches), an archive gives the same
    /// files as when scanned complete, and streams each of them with its bytes and digest; a fetch
    /// that stops early is the end, and an error.
    #[tokio::test]
    async fn an_archive_scanned_while_it_arrives_gives_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.tar");
        {
            let mut b = tar::Builder::new(std::fs::File::create(&whole).unwrap());
            add_dir(&mut b, "out", 0o755);
            add_file(&mut b, "out/a.bin", &content(HASH_BUFFER + 3, 1), 0o644);
            add_file(&mut b, "out/b", &content(9_999, 2), 0o755);
            b.finish().unwrap();
        }
        let bytes = bytes::Bytes::from(std::fs::read(&whole).unwrap());
        let expected = scan_file(&whole, &[], None).unwrap();
        for stop_at in [bytes.len(), 5_000] {
            let (pieces, arriving) = tokio::sync::mpsc::channel(2);
            let (live, mut events) = tokio::sync::mpsc::channel(4);
            let scan = {
                let live = LiveSender::new(live);
                tokio::task::spawn_blocking(move || {
                    scan_matching(
                        PieceReader::new(arriving),
                        &whole_path(),
                        &[],
                        None,
                        Some(&live),
                    )
                })
            };
            let streamed = tokio::spawn(async move {
                let mut got: Vec<(String, Vec<u8>, String)> = Vec::new();
                while let Some(e) = events.recv().await {
                    match e {
                        Live::Start { path, .. } => got.push((path, Vec::new(), String::new())),
                        Live::Data(d) => got.last_mut().unwrap().1.extend_from_slice(&d),
                        Live::End { digest } => got.last_mut().unwrap().2 = digest,
                    }
                }
                got
            });
            let mut at = 0;
            while at < stop_at {
                let batch: Vec<bytes::Bytes> = [7_777, 1, 30_000]
                    .iter()
                    .map(|n| {
                        let piece = bytes.slice(at..(at + n).min(stop_at));
                        at += piece.len();
                        piece
                    })
                    .collect();
                pieces.send(batch).await.unwrap();
            }
            drop(pieces);
            let got = scan.await.unwrap();
            let streamed = streamed.await.unwrap();
            if stop_at == bytes.len() {
                let got = got.unwrap();
                assert_eq!(got.len(), expected.len());
                for (g, e) in got.iter().zip(&expected) {
                    assert_eq!(
                        (&g.path, g.mode, g.size, &g.digest, g.offset),
                        (&e.path, e.mode, e.size, &e.digest, e.offset)
                    );
                }
                assert_eq!(streamed.len(), expected.len());
                for ((path, data, digest), e) in streamed.iter().zip(&expected) {
                    assert_eq!((path, digest), (&e.path, &e.digest));
                    assert_eq!(data.len() as u64, e.size);
                    assert_eq!(hex::encode(Sha256::digest(data)), e.digest);
                }
            } else {
                assert!(got.is_err(), "a cut archive must not scan cleanly: {got:?}");
                assert!(
                    streamed.iter().all(|(_, _, digest)| digest.is_empty()),
                    "a file cut short must not end: {streamed:?}"
                );
            }
        }
    }

    fn whole_path() -> PathBuf {
        PathBuf::from("whole.tar")
    }

    /// A tar cut short in a file's content is an error, not a shorter artifact.
    #[test]
    fn a_truncated_archive_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("a.tar");
        {
            let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
            add_file(&mut b, "out/big.bin", &content(100_000, 3), 0o644);
            b.finish().unwrap();
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&tar_path)
            .unwrap();
        f.set_len(512 + 50_000).unwrap();
        assert!(scan_file(&tar_path, &[], None).is_err());
    }

    #[test]
    fn normalize_refuses_to_climb_above_root() {
        assert_eq!(
            normalize_abs("/workspace/a/../b").unwrap(),
            vec!["workspace", "b"]
        );
        assert!(normalize_abs("/../x").is_none());
    }
}
