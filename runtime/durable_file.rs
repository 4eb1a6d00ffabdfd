//! Crash-safe file replacement: write a temporary file, fsync it, rename it
//! over the target, fsync the directory (the sequence SQLite and LevelDB use
//! for their small state files). After a crash the target holds either the
//! old content or the new one, never a mix.
//!
//! Directories (segment bundles, adapter bundles, installed adapters, model
//! packs) are written the same way, one level up: files into a temporary
//! directory, each fsynced, the directory fsynced, renamed into place, the
//! parent fsynced ([`write_dir_atomic`]).
//!
//! Principal functions: [`write_atomic`], [`write_dir_atomic`], [`sync_dir`].

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::file_error::FileError;

/// Makes a directory's entries (created, renamed, removed files) durable.
///
/// # Errors
/// The directory cannot be opened or fsync fails.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically and durably.
///
/// # Errors
/// Any failed step; the target is then unchanged (a `.tmp` sibling may remain
/// and is overwritten by the next call).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")))
}

/// Writes a directory atomically and durably: `fill(tmp)` writes its files
/// into the fresh temporary directory `parent/tmp_name` (a leftover of an
/// interrupted earlier write is removed first) and returns the directory's
/// final name; every regular file in it is then fsynced, the temporary
/// directory fsynced, a directory already at the final name removed, the
/// temporary one renamed into place and `parent` fsynced. Returns the final
/// path. After a crash, the final name holds a complete directory or none
/// (or the previous one, up to the removal step).
///
/// # Errors
/// `fill`'s error, or a [`FileError`] naming the path of a failed step; the
/// temporary directory may remain and is removed by the next call with the
/// same `tmp_name`.
pub fn write_dir_atomic<E: From<FileError>>(
    parent: &Path,
    tmp_name: &str,
    fill: impl FnOnce(&Path) -> Result<String, E>,
) -> Result<PathBuf, E> {
    std::fs::create_dir_all(parent).map_err(FileError::io(parent))?;
    let tmp = parent.join(tmp_name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(FileError::io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(FileError::io(&tmp))?;
    let name = fill(&tmp)?;
    for entry in std::fs::read_dir(&tmp).map_err(FileError::io(&tmp))? {
        let path = entry.map_err(FileError::io(&tmp))?.path();
        if std::fs::symlink_metadata(&path).map_err(FileError::io(&path))?.is_file() {
            File::open(&path).and_then(|f| f.sync_all()).map_err(FileError::io(&path))?;
        }
    }
    sync_dir(&tmp).map_err(FileError::io(&tmp))?;
    let target = parent.join(&name);
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(FileError::io(&target))?;
    }
    std::fs::rename(&tmp, &target).map_err(FileError::io(&target))?;
    sync_dir(parent).map_err(FileError::io(parent))?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_appears_whole_under_the_name_fill_returns() {
        let root = tempfile::tempdir().unwrap();
        // A leftover of an interrupted write is replaced.
        std::fs::create_dir_all(root.path().join(".x.tmp")).unwrap();
        std::fs::write(root.path().join(".x.tmp/stale"), b"old").unwrap();
        let dir = write_dir_atomic::<FileError>(root.path(), ".x.tmp", |tmp| {
            std::fs::write(tmp.join("a"), b"1").unwrap();
            Ok("final".into())
        })
        .unwrap();
        assert_eq!(dir, root.path().join("final"));
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
        assert!(!dir.join("stale").exists() && !root.path().join(".x.tmp").exists());
        // A second write replaces the first.
        write_dir_atomic::<FileError>(root.path(), ".x.tmp", |tmp| {
            std::fs::write(tmp.join("b"), b"2").unwrap();
            Ok("final".into())
        })
        .unwrap();
        assert!(!dir.join("a").exists() && dir.join("b").exists());
        // A failing fill leaves the target as it was.
        let err = write_dir_atomic(root.path(), ".x.tmp", |_| Err(FileError::invalid(Path::new("x"), "no"))).unwrap_err();
        assert!(err.to_string().contains("no") && dir.join("b").exists());
    }
}
