//! Journals for tests: configurations and records whose content follows
//! from their id, so a reader can tell an intact record from a damaged one.

use std::borrow::Cow;
use std::time::Duration;

use nocturne::journal::{Body, Feedback, ImplicitSignals, JournalConfig, Thumbs};
use nocturne::ids::DeviceId;
use nocturne::profile::Durability;

/// The device of the journals under test.
pub const DEVICE: DeviceId = DeviceId([7; 16]);

/// A configuration with small segments, so tests cross segment boundaries.
pub fn config(durability: Durability, segment_bytes: u64, disk_quota_bytes: u64) -> JournalConfig {
    JournalConfig { durability, group_commit: Duration::from_millis(2), segment_bytes, disk_quota_bytes }
}

/// A feedback record that is a pure function of `id` (> 0): its correction
/// text is 0-299 bytes of letters derived from `id`.
pub fn feedback(id: u64) -> Body<'static> {
    let len = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 300;
    let text: String = (0..len).map(|i| (b'a' + ((id + i) % 26) as u8) as char).collect();
    Body::Feedback(Feedback {
        interaction: id,
        rating: Some((id % 5 + 1) as u8),
        thumbs: if id.is_multiple_of(2) { Some(Thumbs::Up) } else { None },
        correction: Some(Cow::Owned(text)),
        implicit: ImplicitSignals { copied: id.is_multiple_of(3), ..ImplicitSignals::default() },
    })
}

/// The id of a record made by [`feedback`], if it is one and is intact.
pub fn feedback_id(body: &Body<'_>) -> Option<u64> {
    match body {
        Body::Feedback(f) if *body == feedback(f.interaction) => Some(f.interaction),
        _ => None,
    }
}

/// An answered request whose user message is `prompt`.
pub fn interaction(prompt: &str) -> Body<'static> {
    let texts = nocturne::journal::Interaction::of_texts(1, nocturne::ids::ModelId([1; 32]), "You are a helpful assistant.", "", "I do not know.");
    Body::Interaction(nocturne::journal::Interaction { prompt: Cow::Owned(prompt.to_owned()), ..texts })
}

/// A correction of the interaction at `lsn`.
pub fn correction(lsn: u64, answer: &str) -> Body<'static> {
    Body::Feedback(Feedback {
        interaction: lsn,
        rating: None,
        thumbs: Some(Thumbs::Down),
        correction: Some(Cow::Owned(answer.to_owned())),
        implicit: ImplicitSignals::default(),
    })
}
