//! The host store: the trainer's key, enrolled devices, and every segment
//! each device has delivered, exactly once.
//!
//! Principal type: [`Store`]; [`IngestReport`], [`IngestError`].
//!
//! Layout of a store directory:
//!
//! | path | content |
//! |---|---|
//! | `trainer.key`, `trainer.pub` | the trainer's ed25519 key pair (`keygen`) |
//! | `enrolled/<device id>.pub` | public key files of enrolled devices (`enroll`) |
//! | `devices/<device id>/<segment>.seg` | segments, keyed by (device, sequence) |
//! | `devices/<device id>/ack-counter` | number of the last acknowledgement issued |
//! | `devices/<device id>/lost` | segment ranges the device declared lost: `first last reason` lines |
//! | `outbox/<device id>.ack` | the newest acknowledgement, to carry to the device |
//! | `paraphrases.json` ([`PARAPHRASE_CACHE`]) | paraphrases earlier nights wrote (`consolidate`'s, `crate::paraphrase::ParaphraseCache`) |
//!
//! Invariants: a bundle is verified completely (signature of an enrolled
//! device, names, sizes, SHA-256, headers) and checked against what the store
//! holds before anything is written, so a rejected bundle leaves the store
//! unchanged; a segment is stored once under its (device, sequence) and never
//! rewritten (a second delivery with the same bytes is a no-op, with other
//! bytes a rejection); segment files appear complete or not at all.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ed25519_dalek::{SigningKey, VerifyingKey};
use nocturne::digest::sha256_file;
use nocturne::durable_file::{sync_dir, write_atomic};
use nocturne::journal::reader::list_segments;
use nocturne::journal::record::now_ms;
use nocturne::ids::DeviceId;
use nocturne::sync::ack::{write_ack, Ack};
use nocturne::signing::{self, PublicKeyFile};
use nocturne::sync::bundle::{verify_bundle, LostRange, Manifest, Rejection};
use nocturne::sync::SyncError;

/// The file under a store where nights keep the paraphrases they wrote.
pub const PARAPHRASE_CACHE: &str = "paraphrases.json";

/// A host store directory.
pub struct Store {
    root: PathBuf,
}

/// What one ingest did.
#[derive(Debug, PartialEq, Eq)]
pub struct IngestReport {
    /// The device.
    pub device: DeviceId,
    /// Segments stored now.
    pub stored: Vec<u64>,
    /// Segments the store already held, byte for byte.
    pub duplicates: Vec<u64>,
    /// Bytes stored now.
    pub bytes: u64,
    /// The acknowledgement written to the outbox.
    pub ack: Ack,
    /// Its path.
    pub ack_path: PathBuf,
}

/// Why a bundle was not ingested.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The bundle was rejected (the reason is a [`Rejection`] variant); the store is unchanged.
    #[error("{}: rejected: {rejection}", bundle.display())]
    Rejected {
        /// The bundle directory.
        bundle: PathBuf,
        /// Why.
        rejection: Rejection,
    },
    /// The store could not be read or written (keys, files, fsync).
    #[error(transparent)]
    Store(#[from] anyhow::Error),
}

impl From<SyncError> for IngestError {
    fn from(e: SyncError) -> IngestError {
        match e {
            SyncError::Bundle { path, rejection } => IngestError::Rejected { bundle: path, rejection },
            other => IngestError::Store(other.into()),
        }
    }
}

impl Store {
    /// The store at `root` (created by [`Store::keygen`]).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    fn key_path(&self) -> PathBuf {
        self.root.join("trainer.key")
    }

    /// Creates the store and the trainer's key pair; refuses to replace an existing key.
    ///
    /// # Errors
    /// A key exists already; files cannot be written.
    pub fn keygen(&self) -> anyhow::Result<PathBuf> {
        if self.key_path().exists() {
            bail!("{} exists: a store keeps its trainer key (devices trust it)", self.key_path().display());
        }
        std::fs::create_dir_all(&self.root).with_context(|| format!("cannot create {}", self.root.display()))?;
        let key = signing::generate()?;
        signing::write_signing_key(&self.key_path(), &key)?;
        let public = self.root.join("trainer.pub");
        write_atomic(&public, PublicKeyFile { device: None, key: key.verifying_key() }.to_text().as_bytes())
            .with_context(|| format!("cannot write {}", public.display()))?;
        Ok(public)
    }

    fn signing_key(&self) -> anyhow::Result<SigningKey> {
        if !self.key_path().exists() {
            bail!("{} has no trainer key: run `nocturne-trainer keygen --store {}` first", self.root.display(), self.root.display());
        }
        Ok(signing::read_signing_key(&self.key_path())?)
    }

    /// Enrols a device from its `device.pub`.
    ///
    /// # Errors
    /// The file is malformed or names no device; the copy cannot be written.
    pub fn enroll(&self, device_public: &Path) -> anyhow::Result<DeviceId> {
        let public = PublicKeyFile::read(device_public)?;
        let Some(device) = public.device else {
            bail!("{} names no device (is it the trainer's key?)", device_public.display());
        };
        let dir = self.root.join("enrolled");
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{device}.pub"));
        write_atomic(&path, public.to_text().as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(device)
    }

    fn enrolled(&self, device: DeviceId) -> Option<VerifyingKey> {
        let public = PublicKeyFile::read(&self.root.join("enrolled").join(format!("{device}.pub"))).ok()?;
        (public.device == Some(device)).then_some(public.key)
    }

    /// Directory of a device's stored segments.
    pub fn device_dir(&self, device: DeviceId) -> PathBuf {
        self.root.join("devices").join(device.to_string())
    }

    /// Verifies a bundle, stores its new segments, and writes the device's
    /// acknowledgement to the outbox.
    ///
    /// # Errors
    /// [`IngestError::Rejected`] (the store is unchanged), or
    /// [`IngestError::Store`] when a file cannot be read or written.
    pub fn ingest(&self, bundle: &Path) -> Result<IngestReport, IngestError> {
        let reject = |rejection: Rejection| IngestError::Rejected { bundle: bundle.to_path_buf(), rejection };
        let key = self.signing_key()?;
        let manifest: Manifest = verify_bundle(bundle, &|d| self.enrolled(d))?;
        let dir = self.device_dir(manifest.device);
        let mut new = Vec::new();
        let mut duplicates = Vec::new();
        for entry in &manifest.segments {
            let target = dir.join(&entry.name);
            if !target.exists() {
                new.push(entry);
            } else if sha256_file(&target).map_err(anyhow::Error::from)? == entry.sha256 {
                duplicates.push(entry.seq);
            } else {
                return Err(reject(Rejection::Conflict { device: manifest.device, seq: entry.seq }));
            }
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut bytes = 0;
        for entry in &new {
            let source = bundle.join(&entry.name);
            let tmp = dir.join(format!("{}.tmp", entry.name));
            std::fs::copy(&source, &tmp).with_context(|| format!("cannot copy {} to {}", source.display(), tmp.display()))?;
            if sha256_file(&tmp).map_err(anyhow::Error::from)? != entry.sha256 {
                std::fs::remove_file(&tmp).ok();
                return Err(reject(Rejection::Changed(entry.name.clone())));
            }
            std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("cannot fsync {}", tmp.display()))?;
            std::fs::rename(&tmp, dir.join(&entry.name)).with_context(|| format!("cannot store {}", entry.name))?;
            bytes += entry.bytes;
        }
        sync_dir(&dir).with_context(|| format!("cannot fsync {}", dir.display()))?;
        self.record_lost(manifest.device, &manifest.lost)?;
        let (ack, ack_path) = self.acknowledge(manifest.device, &key)?;
        Ok(IngestReport { device: manifest.device, stored: new.iter().map(|e| e.seq).collect(), duplicates, bytes, ack, ack_path })
    }

    /// The segments of a device the store holds, in order.
    ///
    /// # Errors
    /// The directory cannot be listed.
    pub fn segments(&self, device: DeviceId) -> anyhow::Result<Vec<(u64, PathBuf)>> {
        let dir = self.device_dir(device);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        Ok(list_segments(&dir)?)
    }

    /// The segment ranges `device` declared lost, as `(first, last, reason)`, by `first`.
    ///
    /// # Errors
    /// The file cannot be read or is malformed.
    pub fn lost(&self, device: DeviceId) -> anyhow::Result<Vec<(u64, u64, String)>> {
        let path = self.device_dir(device).join("lost");
        let Some(text) = nocturne::file_read::read_text_if_exists(&path, nocturne::file_read::limit::CONFIG)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for line in text.lines() {
            let mut parts = line.splitn(3, ' ');
            let mut number = || parts.next().and_then(|n| n.parse::<u64>().ok()).with_context(|| format!("{}: malformed line `{line}`", path.display()));
            let (first, last) = (number()?, number()?);
            out.push((first, last, parts.next().unwrap_or_default().to_string()));
        }
        out.sort();
        Ok(out)
    }

    /// Adds `lost` to the device's record of lost segments (durably).
    fn record_lost(&self, device: DeviceId, lost: &[LostRange]) -> anyhow::Result<()> {
        if lost.is_empty() {
            return Ok(());
        }
        let mut all = self.lost(device)?;
        for l in lost {
            let entry = (l.first, l.last, l.reason.replace('\n', " "));
            if !all.contains(&entry) {
                all.push(entry);
            }
        }
        all.sort();
        let text: String = all.iter().map(|(f, l, r)| format!("{f} {l} {r}\n")).collect();
        let path = self.device_dir(device).join("lost");
        write_atomic(&path, text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Issues the next acknowledgement for `device`: every segment from 1 on
    /// that the store holds or the device declared lost, without a gap.
    fn acknowledge(&self, device: DeviceId, key: &SigningKey) -> anyhow::Result<(Ack, PathBuf)> {
        let held: std::collections::BTreeSet<u64> = self.segments(device)?.into_iter().map(|(seq, _)| seq).collect();
        let lost = self.lost(device)?;
        let mut held_through = 0u64;
        loop {
            let next = held_through + 1;
            if held.contains(&next) {
                held_through = next;
            } else if let Some(&(_, last, _)) = lost.iter().find(|(first, last, _)| (*first..=*last).contains(&next)) {
                held_through = last;
            } else {
                break;
            }
        }
        let counter_path = self.device_dir(device).join("ack-counter");
        let counter = match std::fs::read_to_string(&counter_path) {
            Ok(text) => text.trim().parse::<u64>().with_context(|| format!("{} is not a number", counter_path.display()))? + 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", counter_path.display())),
        };
        write_atomic(&counter_path, format!("{counter}\n").as_bytes()).with_context(|| format!("cannot write {}", counter_path.display()))?;
        let ack = Ack { device, held_through, counter, created_ms: now_ms() };
        let path = write_ack(&self.root.join("outbox"), key, &ack)?;
        Ok((ack, path))
    }
}
