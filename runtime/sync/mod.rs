//! Offline sync: the journal travels to a host as signed bundles of sealed
//! segments, and the host's signed acknowledgements travel back.
//!
//! Principal items: [`bundle`] (segment bundles), [`ack`]
//! (acknowledgements), [`export`] and [`import_acks`] (the device side),
//! [`SyncError`]. Keys and signed envelopes are [`crate::signing`]'s;
//! installing the adapter bundles that come back is
//! [`crate::device::adapters`]'. The host side (ingest into a store) is
//! `nocturne-trainer ingest`.
//!
//! Invariants: nothing unsigned or unverified is acted on; a device never
//! deletes a segment the host has not acknowledged (it only records the
//! acknowledgement; the journal's quota reclaims); every file that is
//! written appears complete or not at all.

pub mod ack;
pub mod bundle;

use std::path::{Path, PathBuf};

use crate::device::StateDir;
use crate::durable_file::write_atomic;
use crate::file_error::FileError;
use crate::file_read::{limit, read_text_if_exists};
use crate::journal::reader::list_segments;
use bundle::LostRange;
use crate::ids::DeviceId;
use crate::journal::directory::read_host_ack;
use crate::journal::reader::{read_segment, SegmentReport};
use crate::journal::record::now_ms;
use crate::journal::{Journal, JournalError};

/// Why a sync step failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A file could not be read or written, or holds something malformed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The journal refused.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A host acknowledgement was rejected; nothing was changed.
    #[error("{}: rejected: {rejection}", path.display())]
    Ack {
        /// The acknowledgement file.
        path: PathBuf,
        /// Why.
        rejection: ack::AckRejection,
    },
    /// A segment bundle was rejected; nothing was changed.
    #[error("{}: rejected: {rejection}", path.display())]
    Bundle {
        /// The bundle.
        path: PathBuf,
        /// Why.
        rejection: bundle::Rejection,
    },
    /// There is nothing to do.
    #[error("nothing to export: {0}")]
    Nothing(String),
}

/// What [`export`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportOutcome {
    /// The bundle directory.
    pub bundle: PathBuf,
    /// Whether it was written now (`false`: the same bundle was already exported).
    pub new: bool,
    /// Segments the bundle declares lost: they could not be exported intact.
    pub lost: Vec<LostRange>,
}

/// What [`exportable`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exportable {
    /// Segments that can be exported intact: (sequence, path), in order.
    pub segments: Vec<(u64, PathBuf)>,
    /// Ranges that cannot, and why.
    pub lost: Vec<LostRange>,
}

/// The sealed, unacknowledged segments `cursor+1..=through` of `device` in
/// `dir`, read and sorted by [`classify`].
///
/// # Errors
/// The directory cannot be listed or a segment cannot be read.
pub fn exportable(dir: &Path, device: DeviceId, cursor: u64, through: u64) -> Result<Exportable, SyncError> {
    let mut reports = Vec::new();
    for (seq, path) in list_segments(dir)? {
        if seq > cursor && seq <= through {
            reports.push(read_segment(&path, seq, Some(device), &mut |_| {})?);
        }
    }
    Ok(classify(&reports, cursor, through))
}

/// Which of the segments `cursor+1..=through` (`segments`: the reports of
/// those present, by sequence; others are ignored) can be exported intact,
/// and which ranges cannot, with the reason: a missing file, a file of
/// another device or unreadable, damage found in a sealed segment.
pub fn classify(segments: &[SegmentReport], cursor: u64, through: u64) -> Exportable {
    let mut intact = Vec::new();
    let mut lost: Vec<LostRange> = Vec::new();
    let mut lose = |first: u64, last: u64, reason: String| match lost.last_mut() {
        Some(l) if l.last + 1 == first && l.reason == reason => l.last = last,
        _ => lost.push(LostRange { first, last, reason }),
    };
    let mut next = cursor + 1;
    for report in segments.iter().filter(|r| r.seq > cursor && r.seq <= through) {
        let seq = report.seq;
        if seq > next {
            lose(next, seq - 1, "missing from the journal directory".into());
        }
        next = seq + 1;
        if let Some(problem) = &report.problem {
            lose(seq, seq, problem.clone());
        } else if let Some(d) = report.damage.first() {
            lose(seq, seq, format!("damaged after sealing: bytes {}..{} ({})", d.range.start, d.range.end, d.reason));
        } else if let Some(tail) = &report.tail {
            lose(seq, seq, format!("damaged after sealing: {} bytes cut or zeroed at its end", tail.range.end - tail.range.start));
        } else {
            intact.push((seq, report.path.clone()));
        }
    }
    if next <= through {
        lose(next, through, "missing from the journal directory".into());
    }
    Exportable { segments: intact, lost }
}

/// Seals the journal's current segment (if it holds records) and writes a
/// bundle of every sealed segment the host has not acknowledged into
/// `out_dir`; segments that cannot be exported intact are declared lost in
/// it (see [`exportable`]), so the host acknowledges past them and sync goes
/// on. A damaged segment stays on disk, untouched, until the host's
/// acknowledgement lets the quota reclaim it; a foreign one is never deleted.
///
/// # Errors
/// Nothing to export; journal, key or file errors.
pub fn export(state: &StateDir, journal: &mut Journal, out_dir: &Path) -> Result<ExportOutcome, SyncError> {
    let device = state.device_id_or_create()?;
    let key = state.device_key()?;
    let sealed_through = journal.seal()?;
    let cursor = read_host_ack(&state.journal_dir())?;
    let Exportable { segments, lost } = exportable(&state.journal_dir(), device, cursor, sealed_through)?;
    let (bundle, new) = bundle::write_bundle(out_dir, &key, device, &segments, &lost, cursor, now_ms())?;
    Ok(ExportOutcome { bundle, new, lost })
}

/// Name of the file recording the last acknowledgement applied.
pub const LAST_ACK_FILE: &str = "last-ack";

/// The last acknowledgement a device applied, if any.
///
/// # Errors
/// The file exists but is unreadable or malformed.
pub fn last_ack(state: &StateDir) -> Result<Option<ack::Ack>, FileError> {
    let path = state.root().join(LAST_ACK_FILE);
    let Some(text) = read_text_if_exists(&path, limit::SMALL)? else {
        return Ok(None);
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
            .ok_or_else(|| FileError::invalid(&path, format!("no `{name} N` line")))
    };
    let device = state.device_id()?.ok_or_else(|| FileError::invalid(&path, "exists but the device has no id"))?;
    Ok(Some(ack::Ack { device, held_through: field("held_through")?, counter: field("counter")?, created_ms: field("created_ms")? }))
}

/// What [`import_acks`] did with one acknowledgement file.
#[derive(Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// Applied: segments up to `held_through` may now be reclaimed.
    Applied(ack::Ack),
    /// Not newer than the last applied (a replay or a second delivery): ignored.
    Stale(ack::Ack),
}

/// Applies the acknowledgement for this device found in `from` (if any):
/// checks the trainer's signature, the device, and that it is newer than
/// the last applied, then records it in the journal.
///
/// # Errors
/// No trainer key provisioned; a rejected acknowledgement (nothing changed).
pub fn import_acks(state: &StateDir, journal: &mut Journal, from: &Path) -> Result<Option<AckOutcome>, SyncError> {
    let device = state.device_id_or_create()?;
    let path = from.join(ack::ack_file_name(device));
    if !path.exists() {
        return Ok(None);
    }
    let trainer = state.trainer_key()?;
    let ack = ack::read_ack(&path, &trainer)?;
    if ack.device != device {
        return Err(SyncError::Ack { path, rejection: ack::AckRejection::OtherDevice { ack: ack.device, this: device } });
    }
    if last_ack(state)?.is_some_and(|last| ack.counter <= last.counter) {
        return Ok(Some(AckOutcome::Stale(ack)));
    }
    journal.acknowledge_through(ack.held_through).map_err(|e| match e {
        JournalError::Acknowledge(error) => SyncError::Ack { path: path.clone(), rejection: ack::AckRejection::Journal(error) },
        other => SyncError::Journal(other),
    })?;
    let text = format!("counter {}\nheld_through {}\ncreated_ms {}\n", ack.counter, ack.held_through, ack.created_ms);
    let last = state.root().join(LAST_ACK_FILE);
    write_atomic(&last, text.as_bytes()).map_err(FileError::io(&last))?;
    Ok(Some(AckOutcome::Applied(ack)))
}
