//! SHA-256 of files (FIPS 180-4, through the `sha2` crate) and the
//! `sha256sum` text format that stores one next to the file it names.
//!
//! Principal functions: [`sha256_file`], [`hex`], [`from_hex`], [`digest_line`], [`parse_digest_line`].

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::file_error::FileError;

/// SHA-256 of a regular file's content, read in 1 MiB pieces.
///
/// # Errors
/// A [`FileError`] naming the file: it cannot be opened or read, or it is
/// not a regular file ([`crate::file_read::open_regular`]).
pub fn sha256_file(path: &Path) -> Result<[u8; 32], FileError> {
    let mut file = crate::file_read::open_regular(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(FileError::io(path))?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buf[..n]);
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One line of `sha256sum` output: hex digest, two spaces, file name, newline.
pub fn digest_line(digest: &[u8; 32], file_name: &str) -> String {
    format!("{}  {file_name}\n", hex(digest))
}

/// Bytes from exactly `2 × N` hex digits (either case); `None` otherwise.
pub fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The digest in a `sha256sum` line for `file_name`.
///
/// # Errors
/// A message naming what is wrong: not 64 hex digits, or another file's digest.
pub fn parse_digest_line(text: &str, file_name: &str) -> Result<[u8; 32], String> {
    let line = text.lines().next().unwrap_or_default();
    let (digest, name) = line.split_once("  ").ok_or("expected `<sha256 hex>  <file name>`")?;
    if name.trim_start_matches('*') != file_name {
        return Err(format!("holds the digest of `{name}`, not of `{file_name}`"));
    }
    from_hex(digest).ok_or_else(|| format!("`{digest}` is not 64 hex digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, "abc").unwrap();
        // FIPS 180-2, appendix B.1.
        let digest = sha256_file(&path).unwrap();
        assert_eq!(hex(&digest), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let line = digest_line(&digest, "abc");
        assert_eq!(parse_digest_line(&line, "abc"), Ok(digest));
        assert!(parse_digest_line(&line, "other").unwrap_err().contains("not of `other`"));
        assert!(parse_digest_line("xyz  abc", "abc").unwrap_err().contains("not 64 hex"));
    }
}
