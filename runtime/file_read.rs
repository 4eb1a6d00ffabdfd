//! Reading files from directories nocturne does not control (model
//! directories, carried bundle directories, the state directory): only
//! regular files are opened, and a whole-file read is refused past a size
//! limit per kind of file, so a link to `/dev/zero`, a FIFO or a huge file
//! gives a clear error instead of exhausting memory or hanging.
//!
//! Principal items: [`open_regular`], [`read_bounded`], [`read_text`],
//! [`read_text_if_exists`], and the limits ([`limit`]).
//!
//! Invariants: a file is opened without blocking (`O_NONBLOCK`, so opening a
//! FIFO with no writer returns at once) and checked with `fstat` on the open
//! descriptor (no check-then-open race); at most `limit + 1` bytes are ever
//! read into memory.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::file_error::FileError;

/// Size limits per kind of file, bytes.
pub mod limit {
    /// Acknowledgements, adapter manifests, key files, small state files.
    pub const SMALL: u64 = 64 * 1024;
    /// Segment-bundle manifests (about 80 bytes per listed segment).
    pub const BUNDLE_MANIFEST: u64 = 4 * 1024 * 1024;
    /// `config.json`, `tokenizer_config.json`, firmware profiles.
    pub const CONFIG: u64 = 4 * 1024 * 1024;
    /// `tokenizer.json` (a multilingual vocabulary is tens of MiB).
    pub const TOKENIZER: u64 = 64 * 1024 * 1024;
    /// A journal segment (16 times the largest profile's segment size).
    pub const SEGMENT: u64 = 256 * 1024 * 1024;
}

/// Opens `path` for reading if it is a regular file (links followed).
///
/// # Errors
/// [`FileError::Io`] when it cannot be opened; [`FileError::Invalid`]
/// naming what it is when it is not a regular file.
pub fn open_regular(path: &Path) -> Result<File, FileError> {
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(FileError::io(path))?;
    let kind = file.metadata().map_err(FileError::io(path))?.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() { "a directory" } else if kind.is_symlink() { "a link" } else { "not a regular file (a device, FIFO or socket)" };
        return Err(FileError::invalid(path, format!("is {what}; expected a regular file")));
    }
    Ok(file)
}

/// The whole of the regular file `path`, at most `limit` bytes.
///
/// # Errors
/// As [`open_regular`]; [`FileError::Invalid`] when the file is larger than `limit`.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let file = open_regular(path)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(FileError::io(path))?;
    if bytes.len() as u64 > limit {
        return Err(FileError::invalid(path, format!("is larger than the {limit}-byte limit for this kind of file")));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
///
/// # Errors
/// As [`read_bounded`]; [`FileError::Invalid`] for bytes that are not UTF-8.
pub fn read_text(path: &Path, limit: u64) -> Result<String, FileError> {
    String::from_utf8(read_bounded(path, limit)?)
        .map_err(|e| FileError::invalid(path, format!("is not UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to())))
}

/// [`read_text`], or `None` when nothing exists at `path`.
///
/// # Errors
/// As [`read_text`], for a file that exists.
pub fn read_text_if_exists(path: &Path, limit: u64) -> Result<Option<String>, FileError> {
    match read_text(path, limit) {
        Err(FileError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => other.map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_fifos_directories_and_oversized_files_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let zero = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        for (path, expected) in [(&fifo, "not a regular file"), (&zero, "not a regular file"), (&dir.path().to_path_buf(), "a directory")] {
            let err = read_bounded(path, limit::SMALL).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 101]).unwrap();
        assert!(read_bounded(&big, 100).unwrap_err().to_string().contains("100-byte limit"));
        assert_eq!(read_bounded(&big, 101).unwrap().len(), 101);
        std::fs::write(&big, [0xff, 0xfe]).unwrap();
        assert!(read_text(&big, 100).unwrap_err().to_string().contains("not UTF-8"));
        assert_eq!(read_text_if_exists(&dir.path().join("absent"), 100).unwrap(), None);
        assert!(read_text_if_exists(&zero, 100).is_err());
    }
}
