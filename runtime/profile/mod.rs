//! The firmware profile baked in at build time.
//!
//! Principal items: [`ACTIVE`] (the profile this binary was built with),
//! [`Profile`] and its parts (re-exported from [`spec`]), [`worker_threads`].
//!
//! Invariants: [`ACTIVE`] passed [`Profile::validate`] at build time (an
//! invalid profile does not compile); the runtime never uses more threads than
//! the profile allows.

pub mod spec;

use std::borrow::Cow;

pub use spec::{Durability, EmbeddingPrecision, JournalSpec, Parts, Precision, Profile, ProfileError, RecallSpec, ServerSpec, Sizing, MAX_RECALL_SEQUENCE};

include!(concat!(env!("OUT_DIR"), "/profile.rs"));

/// Worker threads the runtime uses: the smaller of the profile's `threads` and
/// the cores the operating system reports (1 if it reports none).
pub fn worker_threads(profile: &Profile) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(profile.threads as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MID: &str = include_str!("../../firmware-profiles/mid.toml");

    fn edited(from: &str, to: &str) -> String {
        assert!(MID.contains(from), "test edit target `{from}` not in mid.toml");
        MID.replacen(from, to, 1)
    }

    fn invalid_field(text: &str) -> &'static str {
        match Profile::from_toml(text) {
            Err(ProfileError::Invalid { field, .. }) => field,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    fn syntax_message(text: &str) -> String {
        match Profile::from_toml(text) {
            Err(ProfileError::Syntax(msg)) => msg,
            other => panic!("expected a Syntax error, got {other:?}"),
        }
    }

    #[test]
    fn shipped_profiles_are_valid() {
        for (name, text) in [
            ("low", include_str!("../../firmware-profiles/low.toml")),
            ("mid", MID),
            ("high", include_str!("../../firmware-profiles/high.toml")),
        ] {
            let profile = Profile::from_toml(text).unwrap_or_else(|e| panic!("{name}.toml: {e}"));
            assert_eq!(profile.name, name);
        }
    }

    #[test]
    fn active_profile_round_trips_through_generated_constant() {
        let reparsed = Profile::from_toml(&std::fs::read_to_string(format!(
            "{}/firmware-profiles/{}.toml",
            env!("CARGO_MANIFEST_DIR"),
            ACTIVE.name
        ))
        .unwrap());
        // A custom NOCTURNE_PROFILE_FILE build has no shipped file of its name.
        if let Ok(reparsed) = reparsed {
            assert_eq!(reparsed, ACTIVE);
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let msg = syntax_message(&edited("threads = 4", "threads = 4\nturbo = true"));
        assert!(msg.contains("turbo"), "{msg}");
    }

    #[test]
    fn unknown_key_in_a_table_is_named() {
        let msg = syntax_message(&edited("recall = true", "recall = true\nvector_db = 1"));
        assert!(msg.contains("vector_db"), "{msg}");
    }

    #[test]
    fn missing_field_is_named() {
        let msg = syntax_message(&edited("deadline_ms = 30000", ""));
        assert!(msg.contains("deadline_ms"), "{msg}");
    }

    #[test]
    fn wrong_type_is_reported() {
        let msg = syntax_message(&edited("weight_precision = \"int8\"", "weight_precision = \"int4\""));
        assert!(msg.contains("int4"), "{msg}");
    }

    #[test]
    fn zero_threads_is_rejected() {
        assert_eq!(invalid_field(&edited("threads = 4", "threads = 0")), "threads");
    }

    #[test]
    fn budget_too_small_for_own_context_is_rejected() {
        // 2048 tokens x 23040 bytes = 47,185,920 bytes of KV cache.
        let text = edited("memory_budget_bytes = 268435456", "memory_budget_bytes = 47185919");
        assert_eq!(invalid_field(&text), "memory_budget_bytes");
        let text = edited("memory_budget_bytes = 268435456", "memory_budget_bytes = 47185920");
        assert!(Profile::from_toml(&text).is_ok());
    }

    #[test]
    fn reply_budget_must_leave_room_for_a_prompt() {
        assert_eq!(invalid_field(&edited("max_new_tokens = 512", "max_new_tokens = 2048")), "max_new_tokens");
    }

    #[test]
    fn group_commit_needs_an_interval() {
        let text = edited("group_commit_ms = 50", "group_commit_ms = 0");
        assert_eq!(invalid_field(&text), "journal.group_commit_ms");
    }

    #[test]
    fn segment_must_fit_in_quota() {
        let text = edited("disk_quota_bytes = 536870912", "disk_quota_bytes = 1000");
        assert_eq!(invalid_field(&text), "journal.disk_quota_bytes");
    }

    #[test]
    fn worker_threads_never_exceed_profile() {
        let mut profile = ACTIVE;
        profile.threads = 1;
        assert_eq!(worker_threads(&profile), 1);
    }
}
