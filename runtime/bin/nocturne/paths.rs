//! Where the command finds models and keeps state when no flag says, so
//! that `nocturne` works from any directory (the XDG Base Directory
//! specification's per-user directories, as other Linux tools use them):
//!
//! - models: `$NOCTURNE_MODELS`, else `models/cache` when run from a
//!   checkout that has fetched them, else `$XDG_DATA_HOME/nocturne/models`
//!   (`~/.local/share/nocturne/models`); `NOCTURNE_MODELS=DIR models/fetch`
//!   installs the packs into `DIR`;
//! - state (device identity, journal, adapters): `--state-dir` or
//!   `$NOCTURNE_STATE_DIR`, else `$XDG_STATE_HOME/nocturne`
//!   (`~/.local/state/nocturne`).
//!
//! A system service sets both variables (the README's systemd unit uses
//! `/var/lib/nocturne`).

use std::path::PathBuf;

/// `$name` if set and absolute, else `$HOME/fallback` (XDG's rule: relative
/// values are ignored); `None` without a home directory.
fn xdg(name: &str, fallback: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(fallback)))
}

/// The directory model packs are looked up in (see the module documentation).
pub fn models_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("NOCTURNE_MODELS") {
        return PathBuf::from(dir);
    }
    let checkout = PathBuf::from("models/cache");
    if checkout.is_dir() {
        return checkout;
    }
    xdg("XDG_DATA_HOME", ".local/share").map_or(checkout, |d| d.join("nocturne/models"))
}

/// The default state directory (see the module documentation).
pub fn default_state_dir() -> PathBuf {
    xdg("XDG_STATE_HOME", ".local/state").map_or_else(|| PathBuf::from("state"), |d| d.join("nocturne"))
}
