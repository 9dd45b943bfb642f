//! Collecting a job's artifacts from its workspace.
//!
//! For each declared path, dir or glob the literal directory prefix is fetched through the
//! engine's archive API (no tool needed in the image), spooled to a local tar, and its regular
//! files that match are extracted with their size, mode and sha256, ready for upload.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

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
    /// Local copy of the content.
    pub local: PathBuf,
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

/// Collects the files matching `patterns` from the workspace behind `helper` into `scratch`
/// (a local directory that must exist). Every pattern must match at least one regular file.
pub async fn collect<E: Executor>(
    exec: &E,
    helper: &ArchiveHelper,
    patterns: &[String],
    scratch: &Path,
) -> Result<Vec<CollectedFile>, ArtifactError> {
    let mut files: BTreeMap<String, CollectedFile> = BTreeMap::new();
    for (n, raw) in patterns.iter().enumerate() {
        let pattern = parse_pattern(raw)?;
        let Some(resolved) = resolve(exec, helper, &pattern).await? else {
            return Err(ArtifactError::NoMatch(raw.clone()));
        };
        let fetch = if resolved.is_empty() {
            WORKSPACE_DIR.to_string()
        } else {
            format!("{WORKSPACE_DIR}/{}", resolved.join("/"))
        };
        let tar_path = scratch.join(format!("artifacts-{n}.tar"));
        match exec.get_archive(helper, &fetch, &tar_path).await {
            Ok(()) => {}
            Err(ExecError::NotFound(_)) => return Err(ArtifactError::NoMatch(raw.clone())),
            Err(source) => {
                return Err(ArtifactError::Exec {
                    pattern: raw.clone(),
                    source,
                })
            }
        }
        let out_dir = scratch.join(format!("artifacts-{n}"));
        let found = {
            let tar_path = tar_path.clone();
            let pattern_raw = raw.clone();
            let prefix = pattern.prefix.clone();
            let glob = pattern.glob.clone();
            tokio::task::spawn_blocking(move || {
                extract_matching(&tar_path, &out_dir, &prefix, glob.as_ref()).map_err(
                    |(context, source)| ArtifactError::Io {
                        pattern: pattern_raw,
                        context,
                        source,
                    },
                )
            })
            .await
            .map_err(|e| ArtifactError::Io {
                pattern: raw.clone(),
                context: "reading the archive".to_string(),
                source: io::Error::other(e.to_string()),
            })??
        };
        let _ = tokio::fs::remove_file(&tar_path).await;
        if found.is_empty() {
            return Err(ArtifactError::NoMatch(raw.clone()));
        }
        for f in found {
            files.entry(f.path.clone()).or_insert(f);
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

/// Reads the tar at `tar_path` (whose entries start with the fetched path's base name) and
/// copies the selected regular files into `out_dir`.
fn extract_matching(
    tar_path: &Path,
    out_dir: &Path,
    prefix: &[String],
    glob: Option<&GlobMatcher>,
) -> Result<Vec<CollectedFile>, IoFail> {
    let ctx = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| (what, e)
    };
    std::fs::create_dir_all(out_dir).map_err(ctx("creating the artifact scratch dir"))?;
    let file = std::fs::File::open(tar_path).map_err(ctx("opening the fetched archive"))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let mut out: Vec<CollectedFile> = Vec::new();
    // Archive path -> index in `out`, for hard links to files already extracted.
    let mut by_archive_path: HashMap<String, usize> = HashMap::new();
    for (n, entry) in archive
        .entries()
        .map_err(ctx("reading the fetched archive"))?
        .enumerate()
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
                out.push(copy);
            }
            continue;
        }
        if kind.is_symlink() {
            let target = entry.link_name().ok().flatten();
            tracing::warn!(path = %rel_path, target = ?target, "not collecting a symlink as an artifact");
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            continue;
        }
        let mode = entry.header().mode().map_err(ctx("reading a file mode"))? & 0o7777;
        let local = out_dir.join(format!("{n}"));
        let mut dest = std::fs::File::create(&local).map_err(ctx("creating a local copy"))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = entry
                .read(&mut buf)
                .map_err(ctx("reading an archived file"))?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            dest.write_all(&buf[..k])
                .map_err(ctx("writing a local copy"))?;
            size += k as u64;
        }
        by_archive_path.insert(archive_key, out.len());
        out.push(CollectedFile {
            path: rel_path,
            mode,
            size,
            digest: hex::encode(hasher.finalize()),
            local,
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

    #[test]
    fn normalize_refuses_to_climb_above_root() {
        assert_eq!(
            normalize_abs("/workspace/a/../b").unwrap(),
            vec!["workspace", "b"]
        );
        assert!(normalize_abs("/../x").is_none());
    }
}
