//! The adapter return path on the device: install a verified adapter
//! bundle atomically, keep the previous one, switch, self-test, roll back.
//!
//! Principal items: [`install`], [`load_active`], [`ActiveAdapters`],
//! [`AdapterWatch`], [`self_test`], [`InstallOutcome`], [`AdapterError`].
//!
//! Layout: `state/adapters/<adapter id>.adapter/` (installed bundles, as
//! received) and `state/adapters/ACTIVE`, the switch: `active <id|none>`,
//! `previous <id|none>` and, while an install is being self-tested,
//! `candidate <id>`. ACTIVE is only ever replaced whole (temporary file,
//! fsync, rename, directory fsync).
//!
//! Install steps: (1) verify the bundle (trainer signature, base model id,
//! checksum, tensors); (2) copy it under a temporary name, fsync, rename,
//! fsync the directory; (3) ACTIVE names it `candidate`; (4) self-test: a
//! fixed prompt decodes with it to finite logits; (5) ACTIVE makes it
//! `active` and the old one `previous` — or, if the self-test failed, drops
//! the candidate, and an adapter event `rolled_back` goes to the journal.
//!
//! Invariant (crash safety): whenever the process stops, ACTIVE names an
//! `active` adapter whose directory was complete and verified before ACTIVE
//! named it, or none; a `candidate` left by an interrupted install is
//! dropped by [`load_active`]. An active adapter that fails to load is
//! rolled back to `previous` (and journaled).
//!
//! Installing does not need the journal: when another process (a running
//! `chat`, the server) holds it, adapter events are queued in
//! `adapters/pending-events` (JSON lines, replaced whole) and journaled by
//! whichever process next holds the journal ([`journal_pending_events`]:
//! the running session at its next request, or the next to open it). As for
//! a journaled event, a process killed between switching `ACTIVE` and
//! recording the event loses that event (the switch itself stands); a crash
//! between journaling the queue and removing it journals it twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;

use super::StateDir;
use crate::adapter::{read_manifest, LoraAdapter, ADAPTER_SUFFIX};
use crate::budget::PlanSettings;
use crate::decoder::Decoder;
use crate::durable_file::{sync_dir, write_atomic, write_dir_atomic};
use crate::file_error::FileError;
use crate::file_read::{limit, read_text_if_exists};
use crate::ids::AdapterId;
use crate::journal::{AdapterAction, AdapterEvent, Body, Journal, JournalError};
use crate::weights::ModelPack;

/// Why an adapter could not be installed or loaded.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// A file could not be read or written, or holds something malformed.
    #[error(transparent)]
    File(#[from] FileError),
    /// The journal refused the adapter event.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The trainer's gate did not publish the adapter (its manifest says
    /// `published: false`, or says nothing); installed only when forced.
    #[error("{}: not installed: the trainer's gate did not publish this adapter ({decision}); install it anyway with --allow-unpublished", path.display())]
    Unpublished {
        /// The bundle.
        path: PathBuf,
        /// The gate's decision, as the manifest states it.
        decision: String,
    },
    /// The bundle does not verify for this device and pack (signature, base
    /// model, checksum, tensors); nothing was changed.
    #[error("{}: rejected: {error}", path.display())]
    Rejected {
        /// The bundle.
        path: PathBuf,
        /// What `LoraAdapter::open` found.
        error: FileError,
    },
}

/// Directory of installed adapters in the state directory.
pub const ADAPTERS_DIR: &str = "adapters";
/// The switch file.
pub const ACTIVE_FILE: &str = "ACTIVE";

/// The fixed prompt of the self-test (token ids of the pack's vocabulary
/// are not assumed: the first tokens of the vocabulary are used).
const SELF_TEST_TOKENS: usize = 8;

/// What ACTIVE says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActiveAdapters {
    /// The adapter requests use (None: the base model alone).
    pub active: Option<AdapterId>,
    /// The one before it, kept for rollback.
    pub previous: Option<AdapterId>,
    /// An adapter being installed (self-test not yet passed).
    pub candidate: Option<AdapterId>,
}

fn id_text(id: Option<AdapterId>) -> String {
    id.map_or("none".into(), |i| i.to_string())
}

impl ActiveAdapters {
    /// Reads ACTIVE (all `None` when there is none).
    ///
    /// # Errors
    /// Unreadable or malformed.
    pub fn read(state: &StateDir) -> Result<ActiveAdapters, FileError> {
        let path = active_path(state);
        let Some(text) = read_text_if_exists(&path, limit::SMALL)? else {
            return Ok(ActiveAdapters::default());
        };
        let mut out = ActiveAdapters::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line.split_once(' ').ok_or_else(|| FileError::invalid(&path, format!("malformed line `{line}`")))?;
            let id = match value.trim() {
                "none" => None,
                v => Some(AdapterId::from_hex(v).ok_or_else(|| FileError::invalid(&path, format!("`{v}` is not an adapter id")))?),
            };
            match key {
                "active" => out.active = id,
                "previous" => out.previous = id,
                "candidate" => out.candidate = id,
                _ => return Err(FileError::invalid(&path, format!("unknown key `{key}`"))),
            }
        }
        Ok(out)
    }

    fn write(&self, state: &StateDir) -> Result<(), FileError> {
        let mut text = format!("active {}\nprevious {}\n", id_text(self.active), id_text(self.previous));
        if let Some(c) = self.candidate {
            text.push_str(&format!("candidate {c}\n"));
        }
        let path = active_path(state);
        std::fs::create_dir_all(path.parent().expect("ACTIVE is in a directory")).map_err(FileError::io(&path))?;
        write_atomic(&path, text.as_bytes()).map_err(FileError::io(&path))
    }
}

fn active_path(state: &StateDir) -> PathBuf {
    state.root().join(ADAPTERS_DIR).join(ACTIVE_FILE)
}

/// Directory of an installed adapter.
pub fn installed_dir(state: &StateDir, id: AdapterId) -> PathBuf {
    state.root().join(ADAPTERS_DIR).join(format!("{id}{ADAPTER_SUFFIX}"))
}

/// Decodes [`SELF_TEST_TOKENS`] tokens with `adapter` and checks every logit is finite.
///
/// # Errors
/// A message saying what went wrong.
pub fn self_test(pack: &ModelPack, adapter: &Arc<LoraAdapter>) -> Result<(), String> {
    let settings = PlanSettings { prefill_block: SELF_TEST_TOKENS, ..PlanSettings::new(pack.config(), 2 * SELF_TEST_TOKENS, 1) };
    let mut decoder = Decoder::new(pack, settings);
    decoder.set_adapter(Some(Arc::clone(adapter)));
    let prompt: Vec<u32> = (0..SELF_TEST_TOKENS as u32).collect();
    let mut next = {
        let logits = decoder.forward(&prompt).map_err(|e| e.to_string())?;
        finite_argmax(logits)?
    };
    for _ in 0..SELF_TEST_TOKENS - 1 {
        next = finite_argmax(decoder.forward(&[next]).map_err(|e| e.to_string())?)?;
    }
    Ok(())
}

fn finite_argmax(logits: &[f32]) -> Result<u32, String> {
    if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
        return Err(format!("logit {i} is {} with the adapter applied", logits[i]));
    }
    Ok(crate::sampler::argmax(logits))
}

/// Whether [`install`] takes an adapter the trainer's gate did not publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unpublished {
    /// Refuse it ([`AdapterError::Unpublished`]): the default.
    Refuse,
    /// Install it (the operator's explicit choice).
    Allow,
}

/// What [`install`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum InstallOutcome {
    /// The adapter is active now; the one before is kept as previous.
    Installed {
        /// The new adapter.
        adapter: AdapterId,
        /// The one it replaced.
        previous: Option<AdapterId>,
    },
    /// It was already active.
    AlreadyActive(AdapterId),
    /// It failed its self-test; the previous adapter stays active.
    RolledBack {
        /// The adapter that failed.
        adapter: AdapterId,
        /// Why.
        reason: String,
    },
}

/// Copies the regular files of `from` into `to` (made durable by the caller).
fn copy_files(from: &Path, to: &Path) -> Result<(), FileError> {
    for entry in std::fs::read_dir(from).map_err(FileError::io(from))? {
        let entry = entry.map_err(FileError::io(from))?;
        if !entry.file_type().map_err(FileError::io(from))?.is_file() {
            continue;
        }
        let target = to.join(entry.file_name());
        std::fs::copy(entry.path(), &target).map_err(FileError::io(&target))?;
    }
    Ok(())
}

/// Queue of adapter events waiting for the journal, in the adapters directory.
pub const PENDING_EVENTS_FILE: &str = "pending-events";

/// Journals an adapter event, or queues it when no journal is at hand.
fn event(
    state: &StateDir,
    journal: Option<&mut Journal>,
    action: AdapterAction,
    adapter: AdapterId,
    previous: Option<AdapterId>,
    reason: &str,
) -> Result<(), AdapterError> {
    let body = AdapterEvent { action, adapter, previous, reason: reason.into() };
    match journal {
        Some(journal) => {
            journal.append_durable(&Body::Adapter(body))?;
        }
        None => {
            let path = state.root().join(ADAPTERS_DIR).join(PENDING_EVENTS_FILE);
            let mut text = read_text_if_exists(&path, limit::SMALL)?.unwrap_or_default();
            text.push_str(&serde_json::to_string(&body).expect("events serialise to JSON"));
            text.push('\n');
            std::fs::create_dir_all(state.root().join(ADAPTERS_DIR)).map_err(FileError::io(&path))?;
            write_atomic(&path, text.as_bytes()).map_err(FileError::io(&path))?;
        }
    }
    Ok(())
}

/// Journals the adapter events queued while another process held the
/// journal, then removes the queue; returns how many were journaled. A line
/// that is not an event (the file was edited) is dropped: it could never be
/// journaled.
///
/// # Errors
/// The queue is not a regular file within its size limit; the journal refused.
pub fn journal_pending_events(state: &StateDir, journal: &mut Journal) -> Result<usize, AdapterError> {
    let path = state.root().join(ADAPTERS_DIR).join(PENDING_EVENTS_FILE);
    let Some(text) = read_text_if_exists(&path, limit::SMALL)? else {
        return Ok(0);
    };
    let mut events = Vec::new();
    for line in text.lines() {
        if let Ok(event) = serde_json::from_str::<AdapterEvent<'static>>(line) {
            events.push(event);
        }
    }
    for event in &events {
        journal.append_durable(&Body::Adapter(event.clone()))?;
    }
    std::fs::remove_file(&path).map_err(FileError::io(&path))?;
    let dir = state.root().join(ADAPTERS_DIR);
    sync_dir(&dir).map_err(FileError::io(&dir))?;
    Ok(events.len())
}

/// Installs the adapter bundle `bundle` for `pack` (steps in the module
/// documentation).
///
/// Adapter events go to `journal`, or are queued for the process holding
/// it when `None` (module documentation).
///
/// # Errors
/// [`AdapterError::Rejected`] when the bundle does not verify, and
/// [`AdapterError::Unpublished`] when the gate did not publish it and
/// `unpublished` is [`Unpublished::Refuse`] (nothing is written in either
/// case); file and journal errors.
pub fn install(
    state: &StateDir,
    pack: &ModelPack,
    bundle: &Path,
    mut journal: Option<&mut Journal>,
    unpublished: Unpublished,
) -> Result<InstallOutcome, AdapterError> {
    let trainer = state.trainer_key()?;
    let reject = |error: FileError| AdapterError::Rejected { path: bundle.to_path_buf(), error };
    let verified = LoraAdapter::open(bundle, pack, &trainer).map_err(reject)?;
    if unpublished == Unpublished::Refuse && verified.manifest().published() != Some(true) {
        return Err(AdapterError::Unpublished { path: bundle.to_path_buf(), decision: verified.manifest().decision() });
    }
    let id = verified.id();
    drop(verified);
    let mut active = load_active(state, pack, journal.as_deref_mut())?.1;
    if active.active == Some(id) {
        return Ok(InstallOutcome::AlreadyActive(id));
    }
    let target = installed_dir(state, id);
    if LoraAdapter::open(&target, pack, &trainer).is_err() {
        write_dir_atomic(&state.root().join(ADAPTERS_DIR), &format!(".{id}.tmp"), |tmp| {
            copy_files(bundle, tmp)?;
            Ok::<_, AdapterError>(format!("{id}{ADAPTER_SUFFIX}"))
        })?;
    }
    active.candidate = Some(id);
    active.write(state)?;
    let tested = LoraAdapter::open(&target, pack, &trainer)
        .map_err(|e| e.to_string())
        .and_then(|a| self_test(pack, &Arc::new(a)));
    active.candidate = None;
    match tested {
        Ok(()) => {
            let previous = active.active;
            ActiveAdapters { active: Some(id), previous, candidate: None }.write(state)?;
            event(state, journal, AdapterAction::Installed, id, previous, "installed after its self-test")?;
            Ok(InstallOutcome::Installed { adapter: id, previous })
        }
        Err(reason) => {
            active.write(state)?;
            event(state, journal, AdapterAction::RolledBack, id, active.active, &reason)?;
            Ok(InstallOutcome::RolledBack { adapter: id, reason })
        }
    }
}

/// The active adapter for `pack`, loaded: drops a candidate an interrupted
/// install left, and rolls back to the previous adapter when the active one
/// fails to load; each change is journaled, or queued when no journal is
/// given. Returns it with what ACTIVE now says.
///
/// # Errors
/// ACTIVE is malformed or cannot be rewritten; journal errors.
pub fn load_active(
    state: &StateDir,
    pack: &ModelPack,
    mut journal: Option<&mut Journal>,
) -> Result<(Option<Arc<LoraAdapter>>, ActiveAdapters), AdapterError> {
    let mut active = ActiveAdapters::read(state)?;
    if let Some(candidate) = active.candidate.take() {
        active.write(state)?;
        event(state, journal.as_deref_mut(), AdapterAction::RolledBack, candidate, active.active, "install interrupted before its self-test passed")?;
    }
    let Some(id) = active.active else {
        return Ok((None, active));
    };
    let loaded = state
        .trainer_key()
        .and_then(|key| LoraAdapter::open(&installed_dir(state, id), pack, &key));
    match loaded {
        Ok(adapter) => Ok((Some(Arc::new(adapter)), active)),
        Err(e) => {
            let rolled = ActiveAdapters { active: active.previous, previous: None, candidate: None };
            rolled.write(state)?;
            event(state, journal, AdapterAction::RolledBack, id, rolled.active, &format!("failed to load: {e}"))?;
            let adapter = match rolled.active {
                Some(prev) => Some(Arc::new(
                    LoraAdapter::open(&installed_dir(state, prev), pack, &state.trainer_key()?)
                        .map_err(|error| AdapterError::Rejected { path: installed_dir(state, prev), error })?,
                )),
                None => None,
            };
            Ok((adapter, rolled))
        }
    }
}

/// Notices a change of ACTIVE between requests, so a running session picks
/// up a newly installed adapter without a restart.
pub struct AdapterWatch {
    seen: ActiveAdapters,
}

impl AdapterWatch {
    /// Watches from what `current` says.
    pub fn new(current: ActiveAdapters) -> AdapterWatch {
        AdapterWatch { seen: current }
    }

    /// The newly active adapter when ACTIVE changed since the last call
    /// (`Some(None)`: back to the base model), `None` when it did not.
    ///
    /// # Errors
    /// Those of [`load_active`].
    pub fn poll(&mut self, state: &StateDir, pack: &ModelPack, journal: Option<&mut Journal>) -> Result<Option<Option<Arc<LoraAdapter>>>, AdapterError> {
        let now = ActiveAdapters::read(state)?;
        if now.active == self.seen.active {
            return Ok(None);
        }
        let (adapter, active) = load_active(state, pack, journal)?;
        self.seen = active;
        Ok(Some(adapter))
    }
}

/// The adapter bundles directly inside `dir`.
///
/// # Errors
/// The directory cannot be listed.
pub fn adapter_bundles(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(FileError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.to_string_lossy().ends_with(ADAPTER_SUFFIX))
        .collect();
    out.sort();
    Ok(out)
}

/// The manifest of an installed adapter, for status output.
///
/// # Errors
/// Not installed or not verifiable.
pub fn installed_manifest(state: &StateDir, id: AdapterId, trainer: &VerifyingKey) -> Result<crate::adapter::AdapterManifest, FileError> {
    read_manifest(&installed_dir(state, id), trainer)
}
