//! The device's state directory: its identity, its journal, its adapters,
//! and the recording of a front end's conversations into them.
//!
//! Principal type: [`StateDir`]; [`recorder::Recorder`] (what `generate`,
//! `chat` and any other front end journal through), [`adapters`] (installed
//! adapters: install, self-test, switch, roll back), [`recall`] (the recall
//! index file, topped up from the journal).
//!
//! Layout: `device-id` (32 hex digits and a newline, made once from the
//! operating system's random source and never changed), `device.key` (its
//! ed25519 private key, mode 0600) and `device.pub` (the public key file to
//! enrol on the host), both made with the id; `trainer.pub` (the trainer's
//! public key, set at provisioning); `last-ack` (the last host
//! acknowledgement applied); `journal/` (see [`crate::journal`]);
//! `recall.idx` (the recall index, see [`recall`]).
//!
//! Invariant: a device id and key, once written, are never replaced; a
//! malformed one is an error, not a reason to make a new identity.

pub mod adapters;
#[cfg(feature = "recall")]
pub mod recall;
pub mod recorder;

use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::durable_file::write_atomic;
use crate::file_error::FileError;
use crate::file_read::{limit, read_text_if_exists};
use crate::ids::DeviceId;
use crate::journal::{Journal, JournalConfig, JournalError};
use crate::signing::{self, PublicKeyFile};

/// Name of the device id file.
pub const DEVICE_ID_FILE: &str = "device-id";
/// Name of the device's private key file.
pub const DEVICE_KEY_FILE: &str = "device.key";
/// Name of the device's public key file.
pub const DEVICE_PUBLIC_FILE: &str = "device.pub";
/// Name of the trainer's public key file.
pub const TRAINER_PUBLIC_FILE: &str = "trainer.pub";
/// Name of the journal directory.
pub const JOURNAL_DIR: &str = "journal";

/// A device's state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root` (not created until needed).
    pub fn new(root: impl Into<PathBuf>) -> StateDir {
        StateDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The journal directory.
    pub fn journal_dir(&self) -> PathBuf {
        self.root.join(JOURNAL_DIR)
    }

    /// Opens the device's journal for appending (making the device identity
    /// on first use), and journals the adapter events other processes queued
    /// while it was held ([`adapters::journal_pending_events`]). What recovery repaired or skipped is in
    /// [`Journal::recovery`] ([`crate::journal::Recovery::notes`] words it).
    ///
    /// # Errors
    /// The identity cannot be made or read; the journal cannot be opened.
    pub fn open_journal(&self, config: JournalConfig) -> Result<Journal, JournalError> {
        let device = self.device_id_or_create()?;
        let mut journal = Journal::open(&self.journal_dir(), device, config)?;
        adapters::journal_pending_events(self, &mut journal).map_err(|e| match e {
            adapters::AdapterError::Journal(e) => e,
            other => JournalError::File(crate::file_error::FileError::invalid(&self.root.join(adapters::ADAPTERS_DIR), other.to_string())),
        })?;
        Ok(journal)
    }

    /// The device id, if one was made.
    ///
    /// # Errors
    /// The file exists but cannot be read or is not 32 hex digits.
    pub fn device_id(&self) -> Result<Option<DeviceId>, FileError> {
        let path = self.root.join(DEVICE_ID_FILE);
        match read_text_if_exists(&path, limit::SMALL)? {
            Some(text) => DeviceId::from_hex(&text)
                .map(Some)
                .ok_or_else(|| FileError::invalid(&path, "is not a device id (32 hex digits)")),
            None => Ok(None),
        }
    }

    /// The device id, made (and stored durably, with the device's key pair)
    /// on first use.
    ///
    /// # Errors
    /// Those of [`StateDir::device_id`]; the directory or files cannot be
    /// created; the random source fails.
    pub fn device_id_or_create(&self) -> Result<DeviceId, FileError> {
        if let Some(id) = self.device_id()? {
            return Ok(id);
        }
        let path = self.root.join(DEVICE_ID_FILE);
        std::fs::create_dir_all(&self.root).map_err(FileError::io(&self.root))?;
        let no_random = |e: String| FileError::invalid(&path, e);
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| no_random(format!("no random source for a device id: {e}")))?;
        let id = DeviceId(bytes);
        // The key first: an id on disk always has its key beside it.
        let key = signing::generate().map_err(|e| no_random(e.to_string()))?;
        signing::write_signing_key(&self.root.join(DEVICE_KEY_FILE), &key)?;
        let public = PublicKeyFile { device: Some(id), key: key.verifying_key() };
        let public_path = self.root.join(DEVICE_PUBLIC_FILE);
        write_atomic(&public_path, public.to_text().as_bytes()).map_err(FileError::io(&public_path))?;
        write_atomic(&path, format!("{id}\n").as_bytes()).map_err(FileError::io(&path))?;
        Ok(id)
    }

    /// The device's private key.
    ///
    /// # Errors
    /// Missing (no identity yet), too open, or malformed.
    pub fn device_key(&self) -> Result<SigningKey, FileError> {
        signing::read_signing_key(&self.root.join(DEVICE_KEY_FILE))
    }

    /// The trainer's public key, set at provisioning.
    ///
    /// # Errors
    /// Not provisioned yet (the message says how), or malformed.
    pub fn trainer_key(&self) -> Result<VerifyingKey, FileError> {
        let path = self.root.join(TRAINER_PUBLIC_FILE);
        if !path.exists() {
            return Err(FileError::invalid(&path, "missing: provision the trainer's key with `nocturne sync trust TRAINER_PUB`"));
        }
        Ok(PublicKeyFile::read(&path)?.key)
    }

    /// Provisions the trainer's public key (replacing any earlier one).
    ///
    /// # Errors
    /// The key file is malformed or names a device; the copy cannot be written.
    pub fn trust_trainer(&self, public_key_file: &Path) -> Result<VerifyingKey, FileError> {
        let public = PublicKeyFile::read(public_key_file)?;
        if public.device.is_some() {
            return Err(FileError::invalid(public_key_file, "is a device's key, not the trainer's"));
        }
        std::fs::create_dir_all(&self.root).map_err(FileError::io(&self.root))?;
        let path = self.root.join(TRAINER_PUBLIC_FILE);
        write_atomic(&path, public.to_text().as_bytes()).map_err(FileError::io(&path))?;
        Ok(public.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_id_is_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        assert_eq!(state.device_id().unwrap(), None);
        let id = state.device_id_or_create().unwrap();
        assert_eq!(state.device_id_or_create().unwrap(), id);
        assert_eq!(state.device_id().unwrap(), Some(id));
        let public = PublicKeyFile::read(&dir.path().join("state").join(DEVICE_PUBLIC_FILE)).unwrap();
        assert_eq!(public, PublicKeyFile { device: Some(id), key: state.device_key().unwrap().verifying_key() });
        std::fs::write(dir.path().join("state").join(DEVICE_ID_FILE), "xyz").unwrap();
        assert!(state.device_id_or_create().unwrap_err().to_string().contains("not a device id"));
    }
}
