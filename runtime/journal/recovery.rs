//! Recovery when a journal is opened: what the last process left behind is
//! found, the torn tail of the newest segment cut, and where appending
//! continues decided.
//!
//! Principal types: [`Recovery`] (the report), `recover`.
//!
//! Invariants: only the incomplete tail of the newest segment is ever cut
//! (what an interrupted append leaves); a newest segment damaged up to its
//! end, a foreign or an unreadable one is left untouched and a new segment
//! started, with LSNs that skip every number the damaged bytes could have
//! held, so no LSN is ever reused.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::directory::{create_segment, read_header, read_host_ack};
use super::reader::{list_segments, read_segment};
use super::record::{now_ms, RECORD_PREFIX};
use super::segment::{Damage, SegmentHeader, Tail, CHUNK_HEADER, HEADER_LEN};
use super::JournalError;
use crate::ids::DeviceId;

/// Fewest bytes a record takes on disk: a chunk header and the record prefix.
const MIN_RECORD_BYTES: u64 = (CHUNK_HEADER + RECORD_PREFIX) as u64;

/// What [`Journal::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    /// Segment files found.
    pub segments: usize,
    /// The segment appended to.
    pub active_seq: u64,
    /// LSN the next record gets.
    pub next_lsn: u64,
    /// The torn tail cut from the newest segment: (segment, tail).
    pub truncated: Option<(u64, Tail)>,
    /// Damaged regions found in the newest segment of this device, as
    /// (segment, damage): skipped by readers, kept on disk.
    pub damage: Vec<(u64, Damage)>,
    /// Segments not appended to because they are another device's or unreadable: (file, why).
    pub skipped: Vec<(PathBuf, String)>,
}

impl Recovery {
    /// What recovery repaired or skipped, one sentence each, for an operator
    /// (empty when the journal was clean).
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some((seq, tail)) = &self.truncated {
            notes.push(format!(
                "cut an incomplete record ({} bytes at offset {}) from the end of segment {seq}",
                tail.range.end - tail.range.start,
                tail.range.start
            ));
        }
        for (seq, d) in &self.damage {
            notes.push(format!("segment {seq}: bytes {}..{} are damaged ({}) and skipped", d.range.start, d.range.end, d.reason));
        }
        if self.damage.iter().any(|(seq, _)| *seq != self.active_seq) {
            notes.push(format!("the damaged segment is kept as it is; new records go to segment {}", self.active_seq));
        }
        for (path, why) in &self.skipped {
            notes.push(format!("{} is not appended to: {why}", path.display()));
        }
        notes
    }
}

/// What the writer starts from.
pub(super) struct Recovered {
    pub recovery: Recovery,
    /// Sizes of this device's segments, by sequence (only those can ever be reclaimed).
    pub own: BTreeMap<u64, u64>,
    /// Bytes of segment files on disk.
    pub used: u64,
    /// The newest segment the host holds.
    pub acked: u64,
    /// The segment appended to, open for appending, and its valid end.
    pub seq: u64,
    pub file: File,
    pub offset: u64,
    /// LSN the next record gets.
    pub next_lsn: u64,
}

/// Recovers the journal in `dir` of `device` (the caller holds the lock).
///
/// # Errors
/// I/O errors naming the path; an unreadable host acknowledgement.
pub(super) fn recover(dir: &Path, device: DeviceId) -> Result<Recovered, JournalError> {
        let acked = read_host_ack(dir)?;
        let segments = list_segments(dir)?;
        let mut recovery = Recovery { segments: segments.len(), ..Recovery::default() };
        // Sizes of this device's segments: only those can ever be reclaimed.
        let mut own = BTreeMap::new();
        let mut used = 0;
        for (seq, path) in &segments {
            let bytes = std::fs::metadata(path).map_err(JournalError::io(path))?.len();
            used += bytes;
            if read_header(path).is_some_and(|h| h.device == device && h.seq == *seq) {
                own.insert(*seq, bytes);
            }
        }
        // Appending continues in the newest segment, if it is this device's
        // and intact up to its end. Otherwise (an unreadable or foreign
        // segment, damage reaching the end) those files are left as they are,
        // a new segment is started, and LSNs skip every number the unreadable
        // bytes could hold, so that no LSN is ever given out twice.
        let mut unreadable_bytes = 0;
        let mut append_to = None;
        let mut next_lsn = 1;
        for (seq, path) in segments.iter().rev() {
            let report = read_segment(path, *seq, Some(device), &mut |_| {})?;
            if let Some(problem) = report.problem {
                recovery.skipped.push((path.clone(), problem));
                own.remove(seq);
                unreadable_bytes += report.bytes;
                continue;
            }
            let header = report.header.expect("a segment without a problem has a header");
            if let Some(tail) = report.tail {
                let file = OpenOptions::new().write(true).open(path).map_err(JournalError::io(path))?;
                file.set_len(tail.range.start).and_then(|()| file.sync_all()).map_err(JournalError::io(path))?;
                used -= tail.range.end - tail.range.start;
                own.insert(*seq, tail.range.start);
                recovery.truncated = Some((*seq, tail));
            }
            next_lsn = report.lsns.map_or(header.first_lsn, |(_, last)| last + 1);
            if let Some(d) = report.damage.last().filter(|d| d.range.end == report.bytes) {
                unreadable_bytes += d.range.end - d.range.start;
            }
            if unreadable_bytes == 0 {
                append_to = Some((*seq, path.clone(), report.valid_end));
            }
            recovery.damage = report.damage.into_iter().map(|d| (*seq, d)).collect();
            break;
        }
        if unreadable_bytes > 0 {
            next_lsn += 1 + unreadable_bytes / MIN_RECORD_BYTES;
        }
        let (seq, file, offset) = match append_to {
            Some((seq, path, end)) => {
                // What an earlier process wrote but never synced becomes durable now.
                let file = OpenOptions::new().append(true).open(&path).map_err(JournalError::io(&path))?;
                file.sync_data().map_err(JournalError::io(&path))?;
                (seq, file, end)
            }
            None => {
                let seq = segments.last().map_or(0, |(s, _)| *s).max(acked) + 1;
                let header = SegmentHeader { device, seq, first_lsn: next_lsn, created_ms: now_ms() };
                let file = create_segment(dir, &header).map_err(JournalError::io(dir))?;
                own.insert(seq, HEADER_LEN as u64);
                used += HEADER_LEN as u64;
                (seq, file, HEADER_LEN as u64)
            }
        };
        recovery.active_seq = seq;
        recovery.next_lsn = next_lsn;
        Ok(Recovered { recovery, own, used, acked, seq, file, offset, next_lsn })
}
