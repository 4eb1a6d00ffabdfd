//! Crash-safe file replacement: write a temporary file, fsync it, rename it
//! over the target, fsync the directory (the sequence SQLite and LevelDB use
//! for their small state files). After a crash the target holds either the
//! old content or the new one, never a mix.
//!
//! Principal functions: [`write_atomic`], [`sync_dir`].

use std::fs::File;
use std::io::Write;
use std::path::Path;

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
