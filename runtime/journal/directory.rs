//! The journal directory's files besides the records: `LOCK` (one writer
//! per directory, an advisory `flock` as LevelDB takes), `host-ack` (the
//! newest segment the host holds), leftovers of an interrupted segment
//! creation, and creating a segment file complete.
//!
//! Principal items: [`read_host_ack`], [`HOST_ACK_FILE`], [`LOCK_FILE`].
//!
//! Invariants: `host-ack` and new segment files are replaced or created
//! whole (temporary file, fsync, rename, directory fsync; see
//! [`crate::durable_file::write_atomic`]); a reader of the directory never
//! takes the lock.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::segment::{segment_file_name, SegmentHeader, HEADER_LEN};
use super::JournalError;
use crate::durable_file::write_atomic;
use crate::file_error::FileError;
use crate::file_read::{limit, open_regular, read_text_if_exists};

/// File in the journal directory naming the newest segment the host holds.
pub const HOST_ACK_FILE: &str = "host-ack";

/// File locked by the writer.
pub const LOCK_FILE: &str = "LOCK";

/// Takes the writer's lock on `dir` (held while the returned file is open).
///
/// # Errors
/// [`JournalError::Locked`] when another process holds it; I/O errors.
pub(super) fn lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(JournalError::io(&path))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(JournalError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

/// Reads the host acknowledgement: the newest segment the host holds (0: none).
///
/// # Errors
/// The file exists but cannot be read or does not hold `acknowledged_through_segment N`.
pub fn read_host_ack(dir: &Path) -> Result<u64, JournalError> {
    let path = dir.join(HOST_ACK_FILE);
    let Some(text) = read_text_if_exists(&path, limit::SMALL)? else {
        return Ok(0);
    };
    text.trim()
        .strip_prefix("acknowledged_through_segment ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| FileError::invalid(&path, "expected `acknowledged_through_segment N`").into())
}

/// Replaces `host-ack` with `seq`, durably.
pub(super) fn write_host_ack(dir: &Path, seq: u64) -> std::io::Result<()> {
    write_atomic(&dir.join(HOST_ACK_FILE), format!("acknowledged_through_segment {seq}\n").as_bytes())
}

/// Removes the temporary files an interrupted segment creation left.
pub(super) fn remove_temporary_files(dir: &Path) -> Result<(), JournalError> {
    for entry in std::fs::read_dir(dir).map_err(JournalError::io(dir))? {
        let path = entry.map_err(JournalError::io(dir))?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            std::fs::remove_file(&path).map_err(JournalError::io(&path))?;
        }
    }
    Ok(())
}

/// The header of the segment file at `path`, if it is a regular file with a
/// valid one.
pub fn read_header(path: &Path) -> Option<SegmentHeader> {
    use std::io::Read;
    let mut bytes = [0u8; HEADER_LEN];
    open_regular(path).ok()?.read_exact(&mut bytes).ok()?;
    SegmentHeader::decode(&bytes).ok()
}

/// Creates the segment `header` describes, complete with its header, and
/// opens it for appending.
pub(super) fn create_segment(dir: &Path, header: &SegmentHeader) -> std::io::Result<File> {
    let path = dir.join(segment_file_name(header.seq));
    write_atomic(&path, &header.encode())?;
    OpenOptions::new().append(true).open(&path)
}
