//! The feedback journal: every interaction and every piece of feedback,
//! append-only and crash-safe, the device's only copy until it is synced.
//!
//! Principal types: [`Journal`] (the writer), [`JournalConfig`], [`Body`] and
//! [`Record`] (the schema), [`read_journal`] and [`JournalReport`] (the
//! reader), [`JournalError`].
//!
//! # What the storage medium is assumed to do
//!
//! The format and the recovery rules rest on these assumptions about the
//! file system (ext4, f2fs or similar on SD cards and eMMC), and on nothing
//! stronger:
//!
//! - A `write` that returned may be lost, wholly or in part, and in any
//!   order, by a power cut: only `fdatasync` returning makes the bytes
//!   written to that file before it durable. A crash can therefore leave a
//!   torn tail (a prefix of the last writes, or zeros) at the end of the
//!   newest segment, which recovery cuts; it never reorders bytes that an
//!   `fdatasync` already covered.
//! - Bits can still flip at rest (worn flash): every header and every chunk
//!   carries a CRC32C, and a bad one costs at most the rest of its 32 KiB
//!   block, never the records after it.
//! - A failed `fdatasync` may have dropped the dirty pages it reported on
//!   (PostgreSQL's "fsyncgate"): the writer never retries, it stops for good.
//! - `rename` within a directory is atomic, and becomes durable once the
//!   directory itself is `fsync`ed: small state files (`host-ack`) are
//!   replaced that way (temporary file, fsync, rename, directory fsync).
//!   Creating a segment is made durable the same way, by syncing the directory.
//! - `flock` on `LOCK` excludes a second writer on the same machine; network
//!   file systems are not supported.
//!
//! # Directory
//!
//! | file | content |
//! |---|---|
//! | `NNNNNNNNNNNNNNNNNNNN.seg` | segment number N (20 decimal digits) |
//! | `host-ack` | `acknowledged_through_segment N`: the host holds segments up to N |
//! | `LOCK` | locked (`flock`) by the one process writing |
//!
//! # Segment format, byte by byte (version 1)
//!
//! All integers are little-endian. A segment starts with a 64-byte header:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `NOCTJRNL` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | header length (64) |
//! | 12 | 16 | device id |
//! | 28 | 8 | segment sequence number (equals the file name's) |
//! | 36 | 8 | LSN of the segment's first record |
//! | 44 | 8 | creation time, milliseconds since the Unix epoch |
//! | 52 | 8 | reserved, zero |
//! | 60 | 4 | masked CRC32C of bytes 0–59 |
//!
//! The whole file, header included, is divided into 32,768-byte blocks
//! (offset 0, 32768, …). After the header come chunks, LevelDB's log format
//! (<https://github.com/google/leveldb/blob/main/doc/log_format.md>):
//!
//! | offset in chunk | size | field |
//! |---|---|---|
//! | 0 | 4 | masked CRC32C of the type byte and the data |
//! | 4 | 2 | data length L |
//! | 6 | 1 | type: 1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST |
//! | 7 | L | data |
//!
//! A chunk never crosses a block boundary. A record that fits the rest of the
//! block is one FULL chunk; otherwise FIRST, MIDDLE…, LAST chunks in
//! consecutive blocks. When fewer than 7 bytes remain in a block they are
//! zero padding and the next chunk starts the next block. The masked CRC is
//! LevelDB's: `crc.rotate_right(15) + 0xa282ead8` (wrapping), CRC32C
//! (Castagnoli, iSCSI polynomial). The data of a complete record is laid out
//! as described in [`record`] (kind, schema version, LSN, time, postcard body).
//!
//! # Damage and recovery
//!
//! - A chunk with a bad checksum, an impossible length or an unknown type
//!   loses the rest of its block: the reader resynchronises at the next block
//!   boundary. Fragments whose FIRST was lost are skipped. Each damaged range
//!   is reported (file, byte range, reason) and later records stay readable.
//! - Bytes after the last complete record that form no complete record are
//!   the tail: a write torn by a crash, or a zero-filled end. In the newest
//!   segment, [`Journal::open`] truncates it (and says so in [`Recovery`]);
//!   in a sealed segment it is corruption and reported.
//! - A segment whose header is invalid, whose sequence disagrees with its file
//!   name, or which belongs to another device is reported and not read; the
//!   writer never appends to it and never deletes it.
//! - Unknown record kinds are skipped and counted, never an error.
//! - A sealed segment cut at a record boundary leaves no torn bytes, but the
//!   next segment's first LSN shows what it held: readers report the missing
//!   LSNs (a torn tail of the newest segment is what a crash leaves; records
//!   missing before a later segment are data lost).
//!
//! # Durability
//!
//! A record is acknowledged when `fdatasync` of its segment returns: after
//! each record (`fsync-each-record`) or at the next group commit, every
//! `group_commit_ms` (`group-commit`). See [`writer`] for the invariants.

pub mod directory;
pub mod reader;
pub mod record;
pub mod recovery;
pub mod segment;
pub mod writer;
pub mod writer_thread;

use std::path::{Path, PathBuf};

use crate::file_error::FileError;

pub use reader::{read_journal, JournalReport, SegmentReport};
pub use record::{
    AdapterAction, AdapterEvent, Body, Feedback, ImplicitSignals, Interaction, MetricsSnapshot, Record, RecordError,
    StopReason, Thumbs,
};
pub use recovery::Recovery;
pub use writer::{Acknowledgements, Journal, JournalConfig};
pub use writer_thread::WriterError;

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed, or a journal file holds something unexpected.
    #[error(transparent)]
    File(#[from] FileError),
    /// Another process has the journal open for writing.
    #[error("{0}: the journal is open in another process (its LOCK file is held)")]
    Locked(PathBuf),
    /// The record cannot be encoded.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The quota is full of segments the host has not acknowledged.
    #[error(
        "journal full: {used} bytes in use of a {quota}-byte quota, {unacknowledged} of them not yet \
         acknowledged by the host; the record was refused (sync the journal to free space)"
    )]
    QuotaFull {
        /// Bytes of segments on disk and queued.
        used: u64,
        /// The profile's quota.
        quota: u64,
        /// Bytes that may not be reclaimed.
        unacknowledged: u64,
    },
    /// A write or fsync failed; the writer stopped and acknowledges nothing more.
    #[error("journal writer failed: {0}; records after the last acknowledged one are not stored")]
    WriterFailed(WriterError),
    /// A host acknowledgement could not be applied.
    #[error("cannot record the host's acknowledgement: {0}")]
    Acknowledge(WriterError),
}

impl JournalError {
    /// A [`FileError::Io`] for `path`, for use with `map_err`.
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
        move |source| JournalError::File(FileError::io(path)(source))
    }
}
