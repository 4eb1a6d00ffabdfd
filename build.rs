//! Bakes the chosen firmware profile into the runtime.
//!
//! The profile is `NOCTURNE_PROFILE_FILE` when set, otherwise the one named by
//! exactly one of the cargo features `profile-low`, `profile-mid` (default),
//! `profile-high`. The profile is parsed and validated by the same module the
//! runtime's unit tests use (`runtime/profile/spec.rs`); an invalid profile
//! fails the build with a message naming the field. The result is written to
//! `$OUT_DIR/profile.rs` as `pub const ACTIVE: Profile = ...;`.

#[path = "runtime/profile/spec.rs"]
#[allow(dead_code)]
mod spec;

use std::path::PathBuf;

fn fail(message: String) -> ! {
    eprintln!("error: nocturne firmware profile: {message}");
    std::process::exit(1);
}

fn main() {
    println!("cargo:rerun-if-env-changed=NOCTURNE_PROFILE_FILE");
    println!("cargo:rerun-if-changed=runtime/profile/spec.rs");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));

    let features: Vec<&str> = ["low", "mid", "high"]
        .into_iter()
        .filter(|name| std::env::var_os(format!("CARGO_FEATURE_PROFILE_{}", name.to_uppercase())).is_some())
        .collect();
    let path = match std::env::var_os("NOCTURNE_PROFILE_FILE") {
        Some(file) => PathBuf::from(file),
        None => match features.as_slice() {
            [one] => manifest_dir.join("firmware-profiles").join(format!("{one}.toml")),
            [] => fail("no profile selected: enable one of the features profile-low, profile-mid, profile-high \
                        or set NOCTURNE_PROFILE_FILE"
                .into()),
            many => fail(format!(
                "features {} are enabled at once; enable exactly one (use --no-default-features to drop profile-mid)",
                many.iter().map(|n| format!("profile-{n}")).collect::<Vec<_>>().join(" and ")
            )),
        },
    };
    println!("cargo:rerun-if-changed={}", path.display());
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| fail(format!("cannot read {}: {e}", path.display())));
    let profile = spec::Profile::from_toml(&text).unwrap_or_else(|e| fail(format!("{}: {e}", path.display())));

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("profile.rs");
    let source = format!(
        "/// The firmware profile this binary was built with (from `{}`).\npub const ACTIVE: Profile = {};\n",
        path.display(),
        profile.to_rust_const()
    );
    std::fs::write(&out, source).unwrap_or_else(|e| fail(format!("cannot write {}: {e}", out.display())));
}
