//! Segment bundles: what a device exports and a host ingests.
//!
//! Principal items: [`Manifest`], [`SegmentEntry`], [`LostRange`],
//! [`write_bundle`], [`verify_bundle`], [`bundle_name`].
//!
//! A bundle is a directory `<device id>-<first segment>-<last segment>.bundle`
//! holding the sealed segment files, named as in the journal, and
//! `MANIFEST`: a signed envelope ([`crate::signing::seal`], domain
//! [`MANIFEST_DOMAIN`]) of the postcard [`Manifest`], signed by the device key.
//!
//! Format 1 lists segments; format 2 (written only when there are any) also
//! declares segments the device cannot export intact ([`LostRange`]: a
//! foreign or unreadable file under a segment's name, damage found after
//! sealing, a missing file), so the host can acknowledge past them instead
//! of waiting forever for a gap. A format-2 manifest is format 1 with the
//! `lost` list appended, and a format-1 reader ignores trailing bytes, so a
//! format-1 manifest written by this build reads everywhere.
//!
//! Invariants: a bundle directory appears under its final name only when
//! complete and durable (written under a temporary name, every file fsynced,
//! renamed, parent fsynced); [`verify_bundle`] reads nothing but regular files
//! whose names are exactly segment file names (no path separators, no `..`),
//! and accepts a bundle only if the signature, every size, every SHA-256 and
//! every segment header agree with the manifest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SyncError;
use crate::durable_file::write_dir_atomic;
use crate::file_error::FileError;
use crate::file_read::{limit, read_bounded};
use crate::ids::DeviceId;
use crate::journal::segment::{parse_segment_file_name, segment_file_name, HeaderError, SegmentHeader, HEADER_LEN};
use crate::signing::{open_sealed, peek_sealed, seal, SealError};

/// Name of the manifest file in a bundle.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// Signature domain of manifests.
pub const MANIFEST_DOMAIN: &str = "nocturne bundle manifest v1";
/// The newest manifest layout this build reads and writes (2: with lost
/// segments; a bundle without any is written as format 1).
pub const BUNDLE_FORMAT: u16 = 2;
/// Suffix of bundle directory names.
pub const BUNDLE_SUFFIX: &str = ".bundle";

/// One segment in a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// File name inside the bundle (must be the journal's name for `seq`).
    pub name: String,
    /// Segment sequence number.
    pub seq: u64,
    /// File size, bytes.
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
}

/// Segments `first..=last` of a device that it cannot export intact, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRange {
    /// First segment of the range.
    pub first: u64,
    /// Last segment of the range (`≥ first`).
    pub last: u64,
    /// What the device found.
    pub reason: String,
}

/// What a bundle holds, signed by the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`BUNDLE_FORMAT`].
    pub format: u16,
    /// The device that wrote the segments.
    pub device: DeviceId,
    /// Segments, in sequence order.
    pub segments: Vec<SegmentEntry>,
    /// The device's cursor: the newest segment the host had acknowledged when
    /// the bundle was made (every listed segment is newer).
    pub cursor: u64,
    /// When the bundle was made, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Segments declared lost (format 2; empty in format 1).
    pub lost: Vec<LostRange>,
}

/// A format-1 manifest as older devices wrote it (no `lost` list).
#[derive(Deserialize)]
struct ManifestV1 {
    format: u16,
    device: DeviceId,
    segments: Vec<SegmentEntry>,
    cursor: u64,
    created_ms: u64,
}

impl From<ManifestV1> for Manifest {
    fn from(m: ManifestV1) -> Manifest {
        Manifest { format: m.format, device: m.device, segments: m.segments, cursor: m.cursor, created_ms: m.created_ms, lost: Vec::new() }
    }
}

/// `decode` as the current manifest, or else as a format-1 one.
fn decode_manifest(decode: impl Fn(bool) -> Result<Manifest, SealError>) -> Result<Manifest, SealError> {
    decode(true).or_else(|_| decode(false))
}

/// Directory name of the bundle of `device`'s segments `first..=last`.
pub fn bundle_name(device: DeviceId, first: u64, last: u64) -> String {
    format!("{device}-{first:020}-{last:020}{BUNDLE_SUFFIX}")
}

fn copy_hashing(from: &Path, to: Option<&mut std::fs::File>) -> Result<(u64, [u8; 32]), FileError> {
    let mut file = crate::file_read::open_regular(from)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    let mut to = to;
    loop {
        let n = file.read(&mut buf).map_err(FileError::io(from))?;
        if n == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        hasher.update(&buf[..n]);
        if let Some(out) = to.as_mut() {
            out.write_all(&buf[..n]).map_err(FileError::io(from))?;
        }
        total += n as u64;
    }
}

/// Writes the bundle of `segments` (sequence, path; sealed segments of
/// `device`, in order) and the declaration of `lost` ranges into `out_dir`,
/// signed with `key`. Returns the bundle's path and whether it was written
/// now (`false`: an identical bundle exists).
///
/// # Errors
/// Neither segments nor lost ranges; a file that cannot be read or written.
pub fn write_bundle(
    out_dir: &Path,
    key: &SigningKey,
    device: DeviceId,
    segments: &[(u64, PathBuf)],
    lost: &[LostRange],
    cursor: u64,
    created_ms: u64,
) -> Result<(PathBuf, bool), SyncError> {
    let seqs = segments.iter().map(|(s, _)| (*s, *s)).chain(lost.iter().map(|l| (l.first, l.last)));
    let (Some(first), Some(last)) = (seqs.clone().map(|(f, _)| f).min(), seqs.map(|(_, l)| l).max()) else {
        return Err(SyncError::Nothing("no sealed segment the host has not acknowledged".into()));
    };
    let path = out_dir.join(bundle_name(device, first, last));
    if path.is_dir() && verify_bundle(&path, &|d| (d == device).then(|| key.verifying_key())).is_ok() {
        return Ok((path, false));
    }
    let name = bundle_name(device, first, last);
    write_dir_atomic(out_dir, &format!(".{name}.tmp"), |tmp| {
        let mut entries = Vec::with_capacity(segments.len());
        for (seq, source) in segments {
            let name = segment_file_name(*seq);
            let target = tmp.join(&name);
            let mut out = std::fs::File::create(&target).map_err(FileError::io(&target))?;
            let (bytes, sha256) = copy_hashing(source, Some(&mut out))?;
            entries.push(SegmentEntry { name, seq: *seq, bytes, sha256 });
        }
        let format = if lost.is_empty() { 1 } else { BUNDLE_FORMAT };
        let manifest = Manifest { format, device, segments: entries, cursor, created_ms, lost: lost.to_vec() };
        let manifest_path = tmp.join(MANIFEST_FILE);
        std::fs::write(&manifest_path, seal(MANIFEST_DOMAIN, key, &manifest)).map_err(FileError::io(&manifest_path))?;
        Ok::<_, SyncError>(name)
    })?;
    Ok((path, true))
}

/// Why a bundle is rejected. Nothing is stored from a rejected bundle.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The manifest cannot be read.
    #[error("no readable MANIFEST ({0}): an incomplete copy?")]
    ManifestMissing(String),
    /// The manifest is not a signed envelope of a manifest.
    #[error("MANIFEST: {0}")]
    ManifestMalformed(SealError),
    /// The device that claims the bundle is not enrolled on this host.
    #[error("device {0} is not enrolled on this host")]
    NotEnrolled(DeviceId),
    /// The manifest does not verify with the enrolled device's key.
    #[error("MANIFEST of device {device}: {error}")]
    ManifestSignature {
        /// The device it claims.
        device: DeviceId,
        /// What failed.
        error: SealError,
    },
    /// A bundle format this build does not read.
    #[error("bundle format {0}; this build reads {BUNDLE_FORMAT}")]
    Format(u16),
    /// The manifest lists no segment.
    #[error("the manifest lists no segment")]
    Empty,
    /// A listed name is not the canonical file name of its segment (`../x`, an absolute path…).
    #[error("the manifest lists `{name}`, which is not the file name of segment {seq}")]
    BadName {
        /// The listed name.
        name: String,
        /// The listed sequence.
        seq: u64,
    },
    /// Segments not in increasing order past the cursor.
    #[error("segment {seq} is listed out of order (after {previous})")]
    OutOfOrder {
        /// The segment.
        seq: u64,
        /// The one before it.
        previous: u64,
    },
    /// A listed segment is missing.
    #[error("{name} is missing ({problem}): an incomplete copy?")]
    Missing {
        /// The segment file.
        name: String,
        /// The operating system's message.
        problem: String,
    },
    /// A listed segment is a directory, a link or a device.
    #[error("{0} is not a regular file")]
    NotAFile(String),
    /// A segment's size differs from the manifest's (a partial copy).
    #[error("{name} has {bytes} bytes, the manifest says {expected}: an incomplete copy?")]
    Size {
        /// The segment file.
        name: String,
        /// Its size.
        bytes: u64,
        /// The manifest's.
        expected: u64,
    },
    /// A segment's SHA-256 differs from the manifest's.
    #[error("{0} does not match its SHA-256 in the manifest")]
    Checksum(String),
    /// A segment's header is invalid.
    #[error("{name}: {error}")]
    Header {
        /// The segment file.
        name: String,
        /// What is wrong.
        error: HeaderError,
    },
    /// A segment's header names another device or sequence.
    #[error("{name}: its header names device {device} segment {seq}, not device {expected_device} segment {expected_seq}")]
    HeaderMismatch {
        /// The segment file.
        name: String,
        /// The header's device.
        device: DeviceId,
        /// The header's sequence.
        seq: u64,
        /// The manifest's device.
        expected_device: DeviceId,
        /// The listed sequence.
        expected_seq: u64,
    },
    /// The store already holds different bytes for a segment (host side).
    #[error("the store holds different bytes for segment {seq} of device {device}")]
    Conflict {
        /// The device.
        device: DeviceId,
        /// The segment.
        seq: u64,
    },
    /// A segment changed between verification and storing (host side).
    #[error("{0} changed while it was being stored")]
    Changed(String),
}

/// Checks a bundle completely: the manifest's signature with the key
/// `enrolled(device)` gives, the names, and every segment's size, SHA-256
/// and header. Returns the manifest.
///
/// # Errors
/// [`SyncError::Bundle`] naming the bundle and what is wrong ([`Rejection`]): a missing
/// manifest or segment, an unenrolled device, a bad signature, an unsafe or
/// unexpected name, a size or checksum that differs (a partial copy), a
/// header of another device or sequence.
pub fn verify_bundle(dir: &Path, enrolled: &dyn Fn(DeviceId) -> Option<VerifyingKey>) -> Result<Manifest, SyncError> {
    let reject = |rejection: Rejection| SyncError::Bundle { path: dir.to_path_buf(), rejection };
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = read_bounded(&manifest_path, limit::BUNDLE_MANIFEST).map_err(|e| reject(Rejection::ManifestMissing(e.to_string())))?;
    let unverified = decode_manifest(|current| if current { peek_sealed(&bytes) } else { peek_sealed::<ManifestV1>(&bytes).map(Into::into) })
        .map_err(|e| reject(Rejection::ManifestMalformed(e)))?;
    let device = unverified.device;
    let key = enrolled(device).ok_or_else(|| reject(Rejection::NotEnrolled(device)))?;
    let manifest = decode_manifest(|current| {
        if current { open_sealed(MANIFEST_DOMAIN, &bytes, &key) } else { open_sealed::<ManifestV1>(MANIFEST_DOMAIN, &bytes, &key).map(Into::into) }
    })
    .map_err(|error| reject(Rejection::ManifestSignature { device, error }))?;
    if !(manifest.format == 1 || manifest.format == BUNDLE_FORMAT) || (manifest.format == 1 && !manifest.lost.is_empty()) {
        return Err(reject(Rejection::Format(manifest.format)));
    }
    if manifest.segments.is_empty() && manifest.lost.is_empty() {
        return Err(reject(Rejection::Empty));
    }
    // Lost ranges and listed segments cover increasing, disjoint sequences past the cursor.
    let mut covered: Vec<(u64, u64)> = manifest.segments.iter().map(|e| (e.seq, e.seq)).chain(manifest.lost.iter().map(|l| (l.first, l.last))).collect();
    covered.sort_unstable();
    let mut end = manifest.cursor;
    for &(first, last) in &covered {
        if first <= end || last < first {
            return Err(reject(Rejection::OutOfOrder { seq: first, previous: end }));
        }
        end = last;
    }
    let mut previous = manifest.cursor;
    for entry in &manifest.segments {
        let name = || entry.name.clone();
        if parse_segment_file_name(&entry.name) != Some(entry.seq) || entry.name != segment_file_name(entry.seq) {
            return Err(reject(Rejection::BadName { name: name(), seq: entry.seq }));
        }
        if entry.seq <= previous {
            return Err(reject(Rejection::OutOfOrder { seq: entry.seq, previous }));
        }
        previous = entry.seq;
        let path = dir.join(&entry.name);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| reject(Rejection::Missing { name: name(), problem: e.to_string() }))?;
        if !meta.file_type().is_file() {
            return Err(reject(Rejection::NotAFile(name())));
        }
        if meta.len() != entry.bytes {
            return Err(reject(Rejection::Size { name: name(), bytes: meta.len(), expected: entry.bytes }));
        }
        let (_, sha256) = copy_hashing(&path, None)?;
        if sha256 != entry.sha256 {
            return Err(reject(Rejection::Checksum(name())));
        }
        let mut header = [0u8; HEADER_LEN];
        std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut header)).map_err(FileError::io(&path))?;
        let header = SegmentHeader::decode(&header).map_err(|error| reject(Rejection::Header { name: name(), error }))?;
        if header.device != manifest.device || header.seq != entry.seq {
            return Err(reject(Rejection::HeaderMismatch {
                name: name(),
                device: header.device,
                seq: header.seq,
                expected_device: manifest.device,
                expected_seq: entry.seq,
            }));
        }
    }
    Ok(manifest)
}
