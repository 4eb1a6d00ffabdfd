//! Ed25519 keys (RFC 8032, through `ed25519-dalek`) on disk, and signed
//! envelopes.
//!
//! Principal items: [`generate`], [`write_signing_key`], [`read_signing_key`],
//! [`PublicKeyFile`], [`seal`], [`open_sealed`], [`SealError`].
//!
//! Files: a signing key is 64 hex digits and a newline, mode 0600 (refused
//! when group or others may read it, as OpenSSH does). A public key file is
//! `key = value` lines: `ed25519 <64 hex>` and, for a device, `device <32 hex>`.
//!
//! A signed envelope is postcard of `(body bytes, 64-byte signature)`; the
//! signature covers a domain string (`nocturne bundle manifest v1`, …) and
//! the body, so a signature made for one kind of file never verifies as another.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::durable_file::sync_dir;
use crate::file_error::FileError;
use crate::ids::DeviceId;

/// Why a signed envelope or a key cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The bytes are not a postcard envelope.
    #[error("not a signed file ({0})")]
    NotAnEnvelope(String),
    /// The signature field is not 64 bytes.
    #[error("the signature is not 64 bytes")]
    SignatureLength,
    /// The signature does not verify with the expected key for the domain.
    #[error("the signature does not verify with the expected key")]
    BadSignature,
    /// The signed body does not decode as the expected type.
    #[error("signed content does not decode ({0})")]
    Body(String),
    /// The operating system gave no random bytes for a new key.
    #[error("no random source for a key: {0}")]
    NoRandom(String),
}

/// A new signing key from the operating system's random source.
///
/// # Errors
/// [`SealError::NoRandom`] when the random source fails.
pub fn generate() -> Result<SigningKey, SealError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| SealError::NoRandom(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes a signing key durably with mode 0600 (temporary file, fsync,
/// rename, directory fsync).
///
/// # Errors
/// The file cannot be written.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), FileError> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(FileError::io(&tmp))?;
    file.write_all(format!("{}\n", crate::digest::hex(&key.to_bytes())).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(FileError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(FileError::io(path))?;
    sync_dir(path.parent().unwrap_or(Path::new("."))).map_err(FileError::io(path))
}

/// Reads a signing key.
///
/// # Errors
/// The file cannot be read, may be read by group or others, or is not 64 hex digits.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, FileError> {
    let mode = std::fs::metadata(path).map_err(FileError::io(path))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(FileError::invalid(path, format!("permissions {:04o} are too open for a private key (must be 0600)", mode & 0o777)));
    }
    let text = crate::file_read::read_text(path, crate::file_read::limit::SMALL)?;
    crate::digest::from_hex::<32>(&text)
        .map(|seed| SigningKey::from_bytes(&seed))
        .ok_or_else(|| FileError::invalid(path, "is not an ed25519 private key (64 hex digits)"))
}

/// A public key file: the key, and the device it belongs to (for devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKeyFile {
    /// The device, for a device's key; `None` for the trainer's.
    pub device: Option<DeviceId>,
    /// The public key.
    pub key: VerifyingKey,
}

impl PublicKeyFile {
    /// The file's text.
    pub fn to_text(&self) -> String {
        let device = self.device.map_or(String::new(), |d| format!("device {d}\n"));
        format!("{device}ed25519 {}\n", crate::digest::hex(self.key.as_bytes()))
    }

    /// Reads a public key file.
    ///
    /// # Errors
    /// The file cannot be read, a line is unknown, or a value is malformed.
    pub fn read(path: &Path) -> Result<PublicKeyFile, FileError> {
        let text = crate::file_read::read_text(path, crate::file_read::limit::SMALL)?;
        let (mut device, mut key) = (None, None);
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad = |what: &str| FileError::invalid(path, format!("line {}: {what}", n + 1));
            match line.split_once(' ') {
                Some(("device", v)) => device = Some(DeviceId::from_hex(v).ok_or_else(|| bad("not a device id (32 hex digits)"))?),
                Some(("ed25519", v)) => {
                    let bytes = crate::digest::from_hex::<32>(v).ok_or_else(|| bad("not an ed25519 public key (64 hex digits)"))?;
                    key = Some(VerifyingKey::from_bytes(&bytes).map_err(|_| bad("not a valid ed25519 point"))?);
                }
                _ => return Err(bad("expected `device <hex>` or `ed25519 <hex>`")),
            }
        }
        let key = key.ok_or_else(|| FileError::invalid(path, "no `ed25519` line"))?;
        Ok(PublicKeyFile { device, key })
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    body: Vec<u8>,
    signature: Vec<u8>,
}

fn signed_message(domain: &str, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(domain.len() + 1 + body.len());
    message.extend(domain.as_bytes());
    message.push(0);
    message.extend(body);
    message
}

/// Encodes `value` with postcard and signs it for `domain`.
pub fn seal<T: Serialize>(domain: &str, key: &SigningKey, value: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(value).expect("postcard encodes plain structs");
    let signature = key.sign(&signed_message(domain, &body)).to_bytes().to_vec();
    postcard::to_stdvec(&Envelope { body, signature }).expect("postcard encodes plain structs")
}

/// Decodes a signed envelope, checking the signature with `key` (strict
/// RFC 8032 verification) before decoding the body.
///
/// # Errors
/// [`SealError`]: not an envelope, a bad signature, a body that does not decode.
pub fn open_sealed<T: DeserializeOwned>(domain: &str, bytes: &[u8], key: &VerifyingKey) -> Result<T, SealError> {
    let envelope: Envelope = postcard::from_bytes(bytes).map_err(|e| SealError::NotAnEnvelope(e.to_string()))?;
    let signature: [u8; 64] = envelope.signature.as_slice().try_into().map_err(|_| SealError::SignatureLength)?;
    key.verify_strict(&signed_message(domain, &envelope.body), &Signature::from_bytes(&signature))
        .map_err(|_| SealError::BadSignature)?;
    postcard::from_bytes(&envelope.body).map_err(|e| SealError::Body(e.to_string()))
}

/// The body of a signed envelope, without checking the signature (to learn
/// which key should check it).
///
/// # Errors
/// [`SealError::NotAnEnvelope`] or [`SealError::Body`].
pub fn peek_sealed<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SealError> {
    let envelope: Envelope = postcard::from_bytes(bytes).map_err(|e| SealError::NotAnEnvelope(e.to_string()))?;
    postcard::from_bytes(&envelope.body).map_err(|e| SealError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_private_keys_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate().unwrap();
        let path = dir.path().join("k.key");
        write_signing_key(&path, &key).unwrap();
        assert_eq!(read_signing_key(&path).unwrap().to_bytes(), key.to_bytes());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_signing_key(&path).unwrap_err().to_string().contains("too open"));
        let public = PublicKeyFile { device: Some(DeviceId([3; 16])), key: key.verifying_key() };
        let pub_path = dir.path().join("k.pub");
        std::fs::write(&pub_path, public.to_text()).unwrap();
        assert_eq!(PublicKeyFile::read(&pub_path).unwrap(), public);
    }

    #[test]
    fn envelopes_verify_only_with_their_key_and_domain() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        let sealed = seal("test v1", &a, &(7u64, "x".to_string()));
        assert_eq!(open_sealed::<(u64, String)>("test v1", &sealed, &a.verifying_key()), Ok((7, "x".into())));
        assert!(open_sealed::<(u64, String)>("test v1", &sealed, &b.verifying_key()).is_err());
        assert!(open_sealed::<(u64, String)>("other v1", &sealed, &a.verifying_key()).is_err());
        let mut flipped = sealed.clone();
        flipped[3] ^= 1;
        assert!(open_sealed::<(u64, String)>("test v1", &flipped, &a.verifying_key()).is_err());
    }
}
