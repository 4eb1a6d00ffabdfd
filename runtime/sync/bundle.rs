//! Segment bundles: what a device exports and a host ingests.
//!
//! Principal items: [`Manifest`], [`SegmentEntry`], [`write_bundle`],
//! [`verify_bundle`], [`bundle_name`].
//!
//! A bundle is a directory `<device id>-<first segment>-<last segment>.bundle`
//! holding the sealed segment files, named as in the journal, and
//! `MANIFEST`: a signed envelope ([`crate::signing::seal`], domain
//! [`MANIFEST_DOMAIN`]) of the postcard [`Manifest`], signed by the device key.
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

use crate::signing::{open_sealed, peek_sealed, seal};
use super::SyncError;
use crate::durable_file::sync_dir;
use crate::file_error::FileError;
use crate::journal::segment::{parse_segment_file_name, segment_file_name, SegmentHeader, HEADER_LEN};
use crate::ids::DeviceId;

/// Name of the manifest file in a bundle.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// Signature domain of manifests.
pub const MANIFEST_DOMAIN: &str = "nocturne bundle manifest v1";
/// Version of the manifest layout.
pub const BUNDLE_FORMAT: u16 = 1;
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
}

/// Directory name of the bundle of `device`'s segments `first..=last`.
pub fn bundle_name(device: DeviceId, first: u64, last: u64) -> String {
    format!("{device}-{first:020}-{last:020}{BUNDLE_SUFFIX}")
}

fn copy_hashing(from: &Path, to: Option<&mut std::fs::File>) -> Result<(u64, [u8; 32]), FileError> {
    let mut file = std::fs::File::open(from).map_err(FileError::io(from))?;
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
/// `device`, in order) into `out_dir`, signed with `key`. Returns the bundle's
/// path and whether it was written now (`false`: an identical bundle exists).
///
/// # Errors
/// No segments; a file that cannot be read or written.
pub fn write_bundle(
    out_dir: &Path,
    key: &SigningKey,
    device: DeviceId,
    segments: &[(u64, PathBuf)],
    cursor: u64,
    created_ms: u64,
) -> Result<(PathBuf, bool), SyncError> {
    let (Some((first, _)), Some((last, _))) = (segments.first(), segments.last()) else {
        return Err(SyncError::Nothing("no sealed segment the host has not acknowledged".into()));
    };
    let path = out_dir.join(bundle_name(device, *first, *last));
    if path.is_dir() && verify_bundle(&path, &|d| (d == device).then(|| key.verifying_key())).is_ok() {
        return Ok((path, false));
    }
    std::fs::create_dir_all(out_dir).map_err(FileError::io(out_dir))?;
    let tmp = out_dir.join(format!(".{}.tmp", bundle_name(device, *first, *last)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(FileError::io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(FileError::io(&tmp))?;
    let mut entries = Vec::with_capacity(segments.len());
    for (seq, source) in segments {
        let name = segment_file_name(*seq);
        let target = tmp.join(&name);
        let mut out = std::fs::File::create(&target).map_err(FileError::io(&target))?;
        let (bytes, sha256) = copy_hashing(source, Some(&mut out))?;
        out.sync_all().map_err(FileError::io(&target))?;
        entries.push(SegmentEntry { name, seq: *seq, bytes, sha256 });
    }
    let manifest = Manifest { format: BUNDLE_FORMAT, device, segments: entries, cursor, created_ms };
    let manifest_path = tmp.join(MANIFEST_FILE);
    let mut file = std::fs::File::create(&manifest_path).map_err(FileError::io(&manifest_path))?;
    file.write_all(&seal(MANIFEST_DOMAIN, key, &manifest))
        .and_then(|()| file.sync_all())
        .map_err(FileError::io(&manifest_path))?;
    sync_dir(&tmp).map_err(FileError::io(&tmp))?;
    if path.exists() {
        std::fs::remove_dir_all(&path).map_err(FileError::io(&path))?;
    }
    std::fs::rename(&tmp, &path).map_err(FileError::io(&path))?;
    sync_dir(out_dir).map_err(FileError::io(out_dir))?;
    Ok((path, true))
}

/// Checks a bundle completely: the manifest's signature with the key
/// `enrolled(device)` gives, the names, and every segment's size, SHA-256
/// and header. Returns the manifest.
///
/// # Errors
/// [`SyncError::Rejected`] naming the bundle and what is wrong: a missing
/// manifest or segment, an unenrolled device, a bad signature, an unsafe or
/// unexpected name, a size or checksum that differs (a partial copy), a
/// header of another device or sequence.
pub fn verify_bundle(dir: &Path, enrolled: &dyn Fn(DeviceId) -> Option<VerifyingKey>) -> Result<Manifest, SyncError> {
    let reject = |problem: String| SyncError::Rejected { path: dir.to_path_buf(), problem };
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path)
        .map_err(|e| reject(format!("no readable {MANIFEST_FILE} ({e}): an incomplete copy?")))?;
    let unverified: Manifest = peek_sealed(&bytes).map_err(|e| reject(format!("{MANIFEST_FILE}: {e}")))?;
    let key = enrolled(unverified.device)
        .ok_or_else(|| reject(format!("device {} is not enrolled on this host", unverified.device)))?;
    let manifest: Manifest = open_sealed(MANIFEST_DOMAIN, &bytes, &key)
        .map_err(|e| reject(format!("{MANIFEST_FILE} of device {}: {e}", unverified.device)))?;
    if manifest.format != BUNDLE_FORMAT {
        return Err(reject(format!("bundle format {}; this build reads {BUNDLE_FORMAT}", manifest.format)));
    }
    if manifest.segments.is_empty() {
        return Err(reject("the manifest lists no segment".into()));
    }
    let mut previous = manifest.cursor;
    for entry in &manifest.segments {
        if parse_segment_file_name(&entry.name) != Some(entry.seq) || entry.name != segment_file_name(entry.seq) {
            return Err(reject(format!("the manifest lists `{}`, which is not the file name of segment {}", entry.name, entry.seq)));
        }
        if entry.seq <= previous {
            return Err(reject(format!("segment {} is listed out of order (after {previous})", entry.seq)));
        }
        previous = entry.seq;
        let path = dir.join(&entry.name);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| reject(format!("{} is missing ({e}): an incomplete copy?", entry.name)))?;
        if !meta.file_type().is_file() {
            return Err(reject(format!("{} is not a regular file", entry.name)));
        }
        if meta.len() != entry.bytes {
            return Err(reject(format!("{} has {} bytes, the manifest says {}: an incomplete copy?", entry.name, meta.len(), entry.bytes)));
        }
        let (_, sha256) = copy_hashing(&path, None)?;
        if sha256 != entry.sha256 {
            return Err(reject(format!("{} does not match its SHA-256 in the manifest", entry.name)));
        }
        let mut header = [0u8; HEADER_LEN];
        std::fs::File::open(&path).and_then(|mut f| f.read_exact(&mut header)).map_err(FileError::io(&path))?;
        let header = SegmentHeader::decode(&header).map_err(|e| reject(format!("{}: {e}", entry.name)))?;
        if header.device != manifest.device || header.seq != entry.seq {
            return Err(reject(format!(
                "{}: its header names device {} segment {}, not device {} segment {}",
                entry.name, header.device, header.seq, manifest.device, entry.seq
            )));
        }
    }
    Ok(manifest)
}
