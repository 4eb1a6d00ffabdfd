//! The scope of a scoped adapter: which requests the active adapter answers.
//!
//! Principal item: [`in_adapter_scope`].
//!
//! A night's adapter learns a few dozen corrections, but applied to every
//! prompt it changes answers to questions nobody taught: on the scenario's
//! night, 96–98% of the 48-token greedy answers to untaught questions
//! changed. So the trainer marks an adapter scoped (the manifest
//! description's `"scope"` is [`crate::adapter::SCOPE_LEARNED`]), and the device applies a
//! scoped adapter to a request only when the closest taught question recall
//! finds, at a similarity of at least
//! [`DEFAULT_THRESHOLD`](super::prompt::DEFAULT_THRESHOLD), is one the
//! adapter learned (its manifest lists it): the question is a taught one or
//! a rewording of one. Every other request is answered by the model as it
//! was before the adapter. This is the scope classifier of SERAC (Mitchell
//! et al., "Memory-Based Model Editing at Scale", ICML 2022) and the
//! retrieval-indexed LoRA of MELO (Yu et al., AAAI 2024), with recall's own
//! encoder and threshold as the classifier. The trainer's evaluation applies
//! the same rule, so what it measures is what ships.
//!
//! The device knows the corrections it was taught itself: corrections other
//! devices taught the same adapter are out of its scope there.

use super::index::{Entry, Origin};
use super::prompt::DEFAULT_THRESHOLD;

/// Whether a request whose search gave `hits` (entries with their cosine
/// similarity, best first) falls to the active adapter: the first taught
/// entry at or above [`DEFAULT_THRESHOLD`] exists and is marked learned.
/// Passages and entries below the threshold are skipped.
pub fn in_adapter_scope<'a>(hits: impl IntoIterator<Item = (&'a Entry, f32)>) -> bool {
    hits.into_iter()
        .find(|(e, s)| matches!(e.origin, Origin::Taught { .. }) && *s >= DEFAULT_THRESHOLD)
        .is_some_and(|(e, _)| e.learned_by.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::AdapterId;

    fn taught(i: u64, learned: bool) -> Entry {
        let learned_by = learned.then_some(AdapterId([1; 16]));
        Entry { origin: Origin::Taught { interaction: i, feedback: i + 1 }, text: format!("q{i}"), answer: format!("a{i}"), learned_by }
    }

    #[test]
    fn the_closest_taught_entry_above_the_threshold_decides() {
        let (learned, other) = (taught(1, true), taught(3, false));
        let passage = Entry { origin: Origin::Passage { source: "m.txt".into(), number: 0 }, text: "p".into(), answer: String::new(), learned_by: None };
        assert!(in_adapter_scope([(&learned, 0.9), (&other, 0.8)]));
        assert!(!in_adapter_scope([(&other, 0.9), (&learned, 0.8)]), "a closer unlearned correction: recall answers");
        assert!(in_adapter_scope([(&passage, 0.95), (&learned, 0.75)]), "passages do not decide");
        assert!(!in_adapter_scope([(&learned, DEFAULT_THRESHOLD - 0.01)]), "below the threshold: out of scope");
        assert!(in_adapter_scope([(&learned, DEFAULT_THRESHOLD)]));
        assert!(!in_adapter_scope(std::iter::empty()));
    }
}
