//! Host acknowledgements: what the host holds of a device's journal, signed
//! by the trainer key, carried back to the device.
//!
//! Principal items: [`Ack`], [`write_ack`], [`read_ack`], [`ack_file_name`].
//!
//! An acknowledgement file `<device id>.ack` is a signed envelope
//! ([`crate::signing::seal`], domain [`ACK_DOMAIN`]) of the postcard [`Ack`].
//! `counter` grows by one with every acknowledgement the host issues for a
//! device; the device applies only a counter above the last it applied, so
//! an old acknowledgement delivered again (a replay) changes nothing.

use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::journal::WriterError;
use crate::signing::{open_sealed, seal, SealError};
use super::SyncError;
use crate::durable_file::write_atomic;
use crate::file_error::FileError;
use crate::ids::DeviceId;

/// Signature domain of acknowledgements.
pub const ACK_DOMAIN: &str = "nocturne host acknowledgement v1";

/// What the host holds for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The device.
    pub device: DeviceId,
    /// The host holds every segment of the device from 1 to this one.
    pub held_through: u64,
    /// Issue number of this acknowledgement for the device, from 1.
    pub counter: u64,
    /// When it was issued, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// File name of a device's acknowledgement.
pub fn ack_file_name(device: DeviceId) -> String {
    format!("{device}.ack")
}

/// Writes `ack` signed with the trainer key into `dir`, atomically.
///
/// # Errors
/// The file cannot be written.
pub fn write_ack(dir: &Path, key: &SigningKey, ack: &Ack) -> Result<PathBuf, FileError> {
    std::fs::create_dir_all(dir).map_err(FileError::io(dir))?;
    let path = dir.join(ack_file_name(ack.device));
    write_atomic(&path, &seal(ACK_DOMAIN, key, ack)).map_err(FileError::io(&path))?;
    Ok(path)
}

/// Why an acknowledgement is not applied.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AckRejection {
    /// Not signed by the provisioned trainer key, or malformed.
    #[error("{0}")]
    Seal(SealError),
    /// Signed for another device.
    #[error("it is for device {ack}, this is device {this}")]
    OtherDevice {
        /// The device it names.
        ack: DeviceId,
        /// This device.
        this: DeviceId,
    },
    /// The journal refused it (it names a segment that is not sealed).
    #[error("{0}")]
    Journal(WriterError),
}

/// Reads an acknowledgement and checks its signature with the trainer key.
///
/// # Errors
/// [`SyncError::Ack`] with [`AckRejection::Seal`]: not signed by the trainer
/// key, or malformed; [`SyncError::File`]: unreadable.
pub fn read_ack(path: &Path, trainer: &VerifyingKey) -> Result<Ack, SyncError> {
    let bytes = crate::file_read::read_bounded(path, crate::file_read::limit::SMALL)?;
    open_sealed(ACK_DOMAIN, &bytes, trainer).map_err(|e| SyncError::Ack { path: path.to_path_buf(), rejection: AckRejection::Seal(e) })
}
