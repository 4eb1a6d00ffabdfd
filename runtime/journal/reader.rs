//! Reading a journal directory: every segment checked, every record decoded,
//! every problem reported with its file and byte range.
//!
//! Principal items: [`read_journal`], [`read_segment`], [`list_segments`],
//! [`JournalReport`], [`SegmentReport`].
//!
//! Invariants: reading never modifies a file and never panics on any bytes.
//! Records come out in segment order, each once; a record is returned only if
//! its checksums hold, it decodes, and its LSN is above every earlier LSN of
//! its segment. A segment from another device, or with a bad header, is
//! reported and its records are not returned.

use std::path::{Path, PathBuf};

use super::record::{decode, Decoded, Record};
use crate::ids::DeviceId;
use super::segment::{parse_segment_file_name, scan, Damage, DamageReason, SegmentHeader, Tail};
use super::JournalError;
use crate::file_error::FileError;
use crate::file_read::{limit, read_bounded};

/// What one segment holds and what is wrong with it.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentReport {
    /// The file.
    pub path: PathBuf,
    /// Sequence number from the file name.
    pub seq: u64,
    /// File size, bytes.
    pub bytes: u64,
    /// The header, when it is valid.
    pub header: Option<SegmentHeader>,
    /// Why the segment as a whole was not read (bad header, another device,
    /// a sequence number that disagrees with the file name).
    pub problem: Option<String>,
    /// Records returned.
    pub records: u64,
    /// Records of kinds this build does not know, skipped.
    pub unknown: u64,
    /// LSN of the first and last record returned.
    pub lsns: Option<(u64, u64)>,
    /// Damaged regions followed by readable records, and records whose
    /// checksums hold but whose content is invalid.
    pub damage: Vec<Damage>,
    /// Incomplete bytes after the last record.
    pub tail: Option<Tail>,
    /// End of the last complete record.
    pub valid_end: u64,
}

/// A whole journal directory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JournalReport {
    /// The device whose segments were read.
    pub device: Option<DeviceId>,
    /// Every segment, in sequence order.
    pub segments: Vec<SegmentReport>,
}

impl JournalReport {
    /// Records returned.
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }

    /// Bytes of segment files.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Damaged regions in the middle of segments, as (segment, damage).
    pub fn damage(&self) -> impl Iterator<Item = (&SegmentReport, &Damage)> {
        self.segments.iter().flat_map(|s| s.damage.iter().map(move |d| (s, d)))
    }

    /// Problems that are corruption rather than an interrupted write: damage,
    /// unreadable or foreign segments, and a tail in any segment but the
    /// newest (only the newest is written to, so only it can be torn).
    pub fn corruption(&self) -> Vec<String> {
        let mut out = Vec::new();
        let newest = self.segments.last().map(|s| s.seq);
        for s in &self.segments {
            if let Some(p) = &s.problem {
                out.push(format!("{}: {p}", s.path.display()));
            }
            for d in &s.damage {
                out.push(format!("{}: bytes {}..{}: {}", s.path.display(), d.range.start, d.range.end, d.reason));
            }
            if let (Some(t), false) = (&s.tail, Some(s.seq) == newest) {
                out.push(format!(
                    "{}: bytes {}..{} after the last record of a sealed segment are incomplete",
                    s.path.display(),
                    t.range.start,
                    t.range.end
                ));
            }
        }
        // A sealed segment cut at a record boundary has no torn tail, but the
        // next segment's first LSN shows what it held: records are missing.
        // (After damage the writer skips LSNs on purpose; that is reported above.)
        for pair in self.segments.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let clean = a.problem.is_none() && a.damage.is_empty() && a.tail.is_none();
            if let (true, Some(ha), Some(hb)) = (clean, a.header, b.header) {
                let last = a.lsns.map_or(ha.first_lsn.saturating_sub(1), |(_, last)| last);
                if ha.device == hb.device && hb.seq == a.seq + 1 && hb.first_lsn > last + 1 {
                    out.push(format!(
                        "{}: ends at LSN {last} but the next segment starts at LSN {}: records {}..{} were written and are missing",
                        a.path.display(),
                        hb.first_lsn,
                        last + 1,
                        hb.first_lsn - 1
                    ));
                }
            }
        }
        out
    }
}

/// The segment files of `dir` as (sequence, path), in sequence order.
/// Other files are ignored.
///
/// # Errors
/// The directory cannot be listed.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let entries = std::fs::read_dir(dir).map_err(JournalError::io(dir))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(JournalError::io(dir))?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads one segment file and calls `visit` for each record. `device` is the
/// device the segment must belong to (`None`: any).
///
/// # Errors
/// Only when the file cannot be read; everything wrong inside it, and a file
/// that is not a regular file or is larger than [`limit::SEGMENT`], is in the
/// report (`problem`).
pub fn read_segment(
    path: &Path,
    seq: u64,
    device: Option<DeviceId>,
    visit: &mut dyn FnMut(&Record),
) -> Result<SegmentReport, JournalError> {
    let (bytes, unreadable) = match read_bounded(path, limit::SEGMENT) {
        Ok(bytes) => (bytes, None),
        Err(FileError::Invalid { problem, .. }) => (Vec::new(), Some(problem)),
        Err(e) => return Err(e.into()),
    };
    let mut report = SegmentReport {
        path: path.to_path_buf(),
        seq,
        bytes: bytes.len() as u64,
        header: None,
        problem: None,
        records: 0,
        unknown: 0,
        lsns: None,
        damage: Vec::new(),
        tail: None,
        valid_end: 0,
    };
    if let Some(problem) = unreadable {
        report.problem = Some(problem);
        return Ok(report);
    }
    let header = match SegmentHeader::decode(&bytes) {
        Ok(h) => h,
        Err(problem) => {
            report.problem = Some(problem.to_string());
            return Ok(report);
        }
    };
    report.header = Some(header);
    if let Some(expected) = device.filter(|d| *d != header.device) {
        report.problem = Some(format!("belongs to device {}, not to this journal's device {expected}", header.device));
        return Ok(report);
    }
    if header.seq != seq {
        report.problem = Some(format!("header says segment {}, the file name says {seq}", header.seq));
        return Ok(report);
    }
    let mut last_lsn = header.first_lsn.saturating_sub(1);
    let mut invalid = Vec::new();
    let frames = scan(&bytes, &mut |offset, payload| {
        let range = offset..offset + payload.len() as u64;
        match decode(payload) {
            Ok(decoded) => {
                let lsn = match &decoded {
                    Decoded::Known(r) => r.lsn,
                    Decoded::Unknown { lsn, .. } => *lsn,
                };
                if lsn <= last_lsn {
                    invalid.push(Damage { range, reason: DamageReason::LsnOrder { lsn, after: last_lsn } });
                    return;
                }
                last_lsn = lsn;
                match decoded {
                    Decoded::Known(record) => {
                        report.records += 1;
                        let first = report.lsns.map_or(lsn, |(f, _)| f);
                        report.lsns = Some((first, lsn));
                        visit(&record);
                    }
                    Decoded::Unknown { .. } => report.unknown += 1,
                }
            }
            Err(e) => invalid.push(Damage { range, reason: e.into() }),
        }
    });
    report.damage = frames.damage;
    report.damage.extend(invalid);
    report.damage.sort_by_key(|d| d.range.start);
    report.tail = frames.tail;
    report.valid_end = frames.valid_end;
    Ok(report)
}

/// Reads every segment of `dir` in order, calling `visit` for each record.
/// `device` is the journal's device; `None` takes the device of the first
/// segment with a valid header.
///
/// # Errors
/// The directory or a segment file cannot be read.
pub fn read_journal(
    dir: &Path,
    device: Option<DeviceId>,
    visit: &mut dyn FnMut(&Record),
) -> Result<JournalReport, JournalError> {
    let mut report = JournalReport { device, segments: Vec::new() };
    for (seq, path) in list_segments(dir)? {
        let segment = read_segment(&path, seq, report.device, visit)?;
        if report.device.is_none() && segment.problem.is_none() {
            report.device = segment.header.map(|h| h.device);
        }
        report.segments.push(segment);
    }
    Ok(report)
}
