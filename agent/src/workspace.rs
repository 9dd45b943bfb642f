//! Seeding an attempt's workspace: the source context (a tar) and the input files from the jobs
//! it needs, put in through the engine's archive API so any image works.

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::executor::{ExecError, Executor, Workspace, WORKSPACE_DIR};

/// One input file, downloaded to a local path.
#[derive(Debug, Clone)]
pub struct LocalInput {
    /// Path relative to the workspace.
    pub path: String,
    /// Unix mode bits.
    pub mode: u32,
    /// The downloaded content.
    pub local: PathBuf,
}

/// Why a workspace could not be seeded.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// An input path is not a plain relative path.
    #[error("input file {0:?} is not a path inside the workspace")]
    BadPath(String),
    /// Building the inputs archive failed.
    #[error("packing input files: {0}")]
    Io(#[from] io::Error),
    /// The executor failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// Checks an input path is relative and stays inside the workspace.
pub fn check_relative(path: &str) -> Result<(), SeedError> {
    let p = Path::new(path);
    let mut normal = 0;
    for c in p.components() {
        match c {
            Component::Normal(_) => normal += 1,
            Component::CurDir => {}
            _ => return Err(SeedError::BadPath(path.to_string())),
        }
    }
    if normal == 0 {
        return Err(SeedError::BadPath(path.to_string()));
    }
    Ok(())
}

/// Packs `inputs` into one tar at `dest` (paths and modes kept; content from their local files).
pub fn pack_inputs(inputs: &[LocalInput], dest: &Path) -> Result<(), SeedError> {
    for input in inputs {
        check_relative(&input.path)?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut builder = tar::Builder::new(io::BufWriter::new(std::fs::File::create(dest)?));
    for input in inputs {
        let file = std::fs::File::open(&input.local)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(file.metadata()?.len());
        header.set_mode(input.mode & 0o7777);
        header.set_mtime(now);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, input.path.trim_start_matches("./"), file)?;
    }
    builder
        .into_inner()?
        .into_inner()
        .map_err(|e| e.into_error())?;
    Ok(())
}

/// Puts the context tar (if any) and then the inputs tar (if any) into the workspace, through a
/// helper container made from `image` that is removed afterwards.
pub async fn seed<E: Executor>(
    exec: &E,
    ws: &Workspace,
    image: &str,
    context_tar: Option<&Path>,
    inputs_tar: Option<&Path>,
) -> Result<(), SeedError> {
    if context_tar.is_none() && inputs_tar.is_none() {
        return Ok(());
    }
    let helper = exec.archive_helper(ws, image).await?;
    let result = async {
        for tar in [context_tar, inputs_tar].into_iter().flatten() {
            exec.put_archive(&helper, WORKSPACE_DIR, tar).await?;
        }
        Ok::<(), SeedError>(())
    }
    .await;
    let removed = exec.remove_helper(helper).await;
    result?;
    removed?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_paths_must_stay_inside() {
        assert!(check_relative("a/b.txt").is_ok());
        assert!(check_relative("./a").is_ok());
        for bad in ["../a", "/etc/x", "a/../../b", "", "."] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn packs_paths_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"#!/bin/sh\necho hi\n").unwrap();
        let tar_path = dir.path().join("in.tar");
        pack_inputs(
            &[LocalInput {
                path: "bin/run.sh".into(),
                mode: 0o755,
                local: a,
            }],
            &tar_path,
        )
        .unwrap();
        let mut archive = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
        let entries: Vec<_> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().mode().unwrap(),
                    e.header().size().unwrap(),
                )
            })
            .collect();
        assert_eq!(entries, vec![("bin/run.sh".to_string(), 0o755, 18)]);
    }
}
