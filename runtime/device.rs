//! The device's state directory: its identity and its journal.
//!
//! Principal type: [`StateDir`].
//!
//! Layout: `device-id` (32 hex digits and a newline, made once from the
//! operating system's random source and never changed), `journal/` (see
//! [`crate::journal`]).
//!
//! Invariant: a device id, once written, is never replaced; a malformed one
//! is an error, not a reason to make a new identity.

use std::path::{Path, PathBuf};

use crate::durable_file::write_atomic;
use crate::file_error::FileError;
use crate::journal::DeviceId;

/// Name of the device id file.
pub const DEVICE_ID_FILE: &str = "device-id";
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

    /// The device id, if one was made.
    ///
    /// # Errors
    /// The file exists but cannot be read or is not 32 hex digits.
    pub fn device_id(&self) -> Result<Option<DeviceId>, FileError> {
        let path = self.root.join(DEVICE_ID_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => DeviceId::from_hex(&text)
                .map(Some)
                .ok_or_else(|| FileError::invalid(&path, "is not a device id (32 hex digits)")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FileError::io(&path)(e)),
        }
    }

    /// The device id, made (and stored durably) on first use.
    ///
    /// # Errors
    /// Those of [`StateDir::device_id`]; the directory or file cannot be
    /// created; the random source fails.
    pub fn device_id_or_create(&self) -> Result<DeviceId, FileError> {
        if let Some(id) = self.device_id()? {
            return Ok(id);
        }
        let path = self.root.join(DEVICE_ID_FILE);
        std::fs::create_dir_all(&self.root).map_err(FileError::io(&self.root))?;
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| FileError::invalid(&path, format!("no random source for a device id: {e}")))?;
        let id = DeviceId(bytes);
        write_atomic(&path, format!("{id}\n").as_bytes()).map_err(FileError::io(&path))?;
        Ok(id)
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
        std::fs::write(dir.path().join("state").join(DEVICE_ID_FILE), "xyz").unwrap();
        assert!(state.device_id_or_create().unwrap_err().to_string().contains("not a device id"));
    }
}
