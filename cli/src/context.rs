//! Packing a source directory into the tar a run receives as its context.
//!
//! The walk honours `.droverignore` files (gitignore syntax, in any directory, applying to that
//! directory and below) and nothing else: `.gitignore`, `.ignore` and git's global excludes do not
//! apply, and hidden files are included, because a build often needs `.cargo/config.toml` or
//! `.npmrc`. The `.droverignore` files themselves are packed (they are part of the source tree;
//! ignore them from within if unwanted). Headers keep the permission bits and store symlinks as
//! symlinks; owners and mtimes are normalised so the same tree always gives the same digest.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tar::{EntryType, Header, HeaderMode};

/// Name of the per-directory ignore file.
pub(crate) const IGNORE_FILE: &str = ".droverignore";

/// Errors while packing a context.
#[derive(Debug)]
pub(crate) enum ContextError {
    /// The context directory is missing or not a directory.
    NotADirectory(PathBuf),
    /// Walking the tree failed (unreadable directory, bad `.droverignore` pattern, ...).
    Walk(String),
    /// Reading a file or writing the archive failed.
    Io { path: PathBuf, source: io::Error },
}

impl std::fmt::Display for ContextError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotADirectory(p) => write!(f, "context {} is not a directory", p.display()),
            Self::Walk(msg) => write!(f, "cannot walk the context: {msg}"),
            Self::Io { path, source } => write!(f, "cannot pack {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for ContextError {}

/// A packed context: an anonymous temp file holding the tar, rewound to its start.
#[derive(Debug)]
pub(crate) struct PackedContext {
    /// The tar archive, positioned at offset 0.
    pub(crate) file: File,
    /// sha256 of the archive, hex.
    pub(crate) digest: String,
    /// Archive size in bytes.
    pub(crate) size: u64,
    /// Entries written (files, directories, symlinks).
    pub(crate) entries: usize,
    /// Paths skipped because tar cannot hold them (sockets, devices, fifos).
    pub(crate) skipped: Vec<PathBuf>,
}

/// Hashes and counts everything written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Packs `dir` into a temp file. Blocking: call it from `spawn_blocking`.
pub(crate) fn pack(dir: &Path) -> Result<PackedContext, ContextError> {
    if !dir.is_dir() {
        return Err(ContextError::NotADirectory(dir.to_path_buf()));
    }
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ContextError::Io { path, source }
    };
    let temp = tempfile::tempfile().map_err(io_err(Path::new("temporary file")))?;
    let writer = HashingWriter {
        inner: io::BufWriter::with_capacity(256 * 1024, temp),
        hasher: Sha256::new(),
        written: 0,
    };
    let mut builder = tar::Builder::new(writer);
    let mut entries = 0;
    let mut skipped = Vec::new();

    let walker = ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .hidden(false)
        .parents(false)
        .ignore(false)
        .git_ignore(false)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .follow_links(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        // Sorted so the same tree gives the same archive and digest.
        .sort_by_file_name(|a, b| a.cmp(b))
        .build();

    for entry in walker {
        let entry = entry.map_err(|e| ContextError::Walk(e.to_string()))?;
        let path = entry.path();
        let rel = match path.strip_prefix(dir) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel,
            // The root itself: the archive's entries are relative to it.
            _ => continue,
        };
        let meta = std::fs::symlink_metadata(path).map_err(io_err(path))?;
        let file_type = meta.file_type();
        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(&meta, HeaderMode::Deterministic);
        // Deterministic mode flattens permissions to 644/755; the build needs the real bits.
        header.set_mode(meta.mode() & 0o7777);
        if file_type.is_symlink() {
            let target = std::fs::read_link(path).map_err(io_err(path))?;
            header.set_entry_type(EntryType::Symlink);
            header.set_size(0);
            builder
                .append_link(&mut header, rel, &target)
                .map_err(io_err(path))?;
        } else if file_type.is_dir() {
            header.set_entry_type(EntryType::Directory);
            header.set_size(0);
            builder
                .append_data(&mut header, rel, io::empty())
                .map_err(io_err(path))?;
        } else if file_type.is_file() {
            let file = File::open(path).map_err(io_err(path))?;
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            // A file that changes size while packed would corrupt the archive; tar-rs checks
            // that exactly `size` bytes were read and fails otherwise.
            builder
                .append_data(&mut header, rel, file)
                .map_err(io_err(path))?;
        } else {
            skipped.push(rel.to_path_buf());
            continue;
        }
        entries += 1;
    }

    let mut writer = builder.into_inner().map_err(io_err(dir))?;
    writer.flush().map_err(io_err(dir))?;
    let HashingWriter {
        inner,
        hasher,
        written,
    } = writer;
    let mut file = inner.into_inner().map_err(|e| ContextError::Io {
        path: dir.to_path_buf(),
        source: e.into_error(),
    })?;
    file.seek(SeekFrom::Start(0)).map_err(io_err(dir))?;
    Ok(PackedContext {
        file,
        digest: hex::encode(hasher.finalize()),
        size: written,
        entries,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::Read;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// What an archive holds: path -> (kind, mode, content or link target).
    fn read_archive(packed: &mut PackedContext) -> BTreeMap<String, (char, u32, String)> {
        let mut bytes = Vec::new();
        packed.file.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, packed.size);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), packed.digest);
        let mut archive = tar::Archive::new(&bytes[..]);
        let mut out = BTreeMap::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_string();
            let mode = entry.header().mode().unwrap();
            let kind = entry.header().entry_type();
            let (k, content) = if kind.is_symlink() {
                let target = entry.link_name().unwrap().unwrap();
                ('l', target.to_string_lossy().into_owned())
            } else if kind.is_dir() {
                ('d', String::new())
            } else {
                let mut s = String::new();
                entry.read_to_string(&mut s).unwrap();
                ('f', s)
            };
            out.insert(path, (k, mode, content));
        }
        out
    }

    fn write(dir: &Path, rel: &str, content: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    #[test]
    fn packs_nested_dirs_modes_symlinks_and_hidden_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "src/main.rs", "fn main() {}\n");
        write(d, "src/deep/er/file.txt", "deep\n");
        write(d, ".cargo/config.toml", "[build]\n");
        write(d, "build.sh", "#!/bin/sh\necho hi\n");
        std::fs::set_permissions(d.join("build.sh"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::set_permissions(
            d.join("src/deep/er/file.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        symlink("src/main.rs", d.join("link-to-main")).unwrap();
        symlink("/does/not/exist", d.join("dangling")).unwrap();
        // .gitignore must have no effect.
        write(d, ".gitignore", "src/\n");

        let mut packed = pack(d).unwrap();
        let a = read_archive(&mut packed);
        assert_eq!(a["src/main.rs"], ('f', 0o644, "fn main() {}\n".into()));
        assert_eq!(a["src/deep/er/file.txt"], ('f', 0o600, "deep\n".into()));
        assert_eq!(a["build.sh"].1, 0o750);
        assert_eq!(a[".cargo/config.toml"].0, 'f');
        assert_eq!(a["src/deep/er"].0, 'd');
        assert_eq!(a["link-to-main"], ('l', 0o777, "src/main.rs".into()));
        assert_eq!(a["dangling"].2, "/does/not/exist");
        assert!(a.contains_key(".gitignore"));
        assert_eq!(packed.entries, a.len());
        assert!(packed.skipped.is_empty());
    }

    #[test]
    fn droverignore_rules_apply_per_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, IGNORE_FILE, "target/\n*.log\n!keep.log\n/top-only.txt\n");
        write(d, "target/debug/app", "binary");
        write(d, "a.log", "x");
        write(d, "keep.log", "kept");
        write(d, "top-only.txt", "x");
        write(d, "sub/top-only.txt", "nested one stays");
        write(d, "sub/b.log", "x");
        write(d, "sub/inner/.droverignore", "secret.txt\n");
        write(d, "sub/inner/secret.txt", "x");
        write(d, "sub/inner/public.txt", "y");
        write(d, "secret.txt", "only ignored below sub/inner");

        let mut packed = pack(d).unwrap();
        let a = read_archive(&mut packed);
        let names: Vec<&str> = a.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                ".droverignore",
                "keep.log",
                "secret.txt",
                "sub",
                "sub/inner",
                "sub/inner/.droverignore",
                "sub/inner/public.txt",
                "sub/top-only.txt",
            ]
        );
    }

    #[test]
    fn same_tree_same_digest() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "x/y.txt", "same");
        let first = pack(tmp.path()).unwrap();
        // Touching mtimes must not change the digest.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write(tmp.path(), "x/y.txt", "same");
        let second = pack(tmp.path()).unwrap();
        assert_eq!(first.digest, second.digest);
        assert_eq!(first.size, second.size);
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let err = pack(Path::new("/no/such/dir")).unwrap_err();
        assert_eq!(err.to_string(), "context /no/such/dir is not a directory");
    }
}
