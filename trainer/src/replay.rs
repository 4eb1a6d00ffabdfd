//! The replay buffer: training examples built from journaled interactions
//! and feedback, each with a priority that sampling follows.
//!
//! Principal types: [`ReplayBuffer`], [`Example`], [`PriorityWeights`],
//! [`ReplayReport`].
//!
//! An interaction becomes an example when it has a target:
//! - the user's correction (`/fix`, `feedback --fix`) when there is one, else
//! - the reply itself when the feedback on it is positive (explicit score at
//!   least 0.75: rating 4–5 or thumbs up; or, without explicit feedback, an
//!   implicit score of at least 2/3).
//!
//! Interactions whose feedback is only negative (explicit score at most 0.25,
//! or a regeneration) and carries no correction are kept out of the targets
//! and counted in [`ReplayReport::negative_only`].
//!
//! The input is the chat-templated context: the system prompt, the earlier
//! turns of the same conversation as the user saw them (for a turn that was
//! regenerated, its last reply), and the interaction's prompt.
//!
//! Priority = `implicit_weight × implicit + explicit_weight × explicit`
//! (0.7 and 0.3 by default, [`PriorityWeights`]):
//! - implicit ∈ [0, 1]: the mean of three signals: not regenerated, copied,
//!   conversation continued (a follow-up);
//! - explicit ∈ [0, 1]: 1 for a correction (the user wrote the answer);
//!   otherwise the mean of the rating mapped to `(r − 1) / 4` and thumbs
//!   (up 1, down 0); 0.5 when there is none.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use nocturne::journal::{read_journal, Body, Feedback, Interaction, Thumbs};
use nocturne::ids::DeviceId;
use nocturne::tokenizer::ChatMessage;

/// How implicit and explicit feedback weigh in an example's priority.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PriorityWeights {
    /// Weight of the implicit score (default 0.7).
    pub implicit: f32,
    /// Weight of the explicit score (default 0.3).
    pub explicit: f32,
}

impl Default for PriorityWeights {
    fn default() -> PriorityWeights {
        PriorityWeights { implicit: 0.7, explicit: 0.3 }
    }
}

/// One training example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The device it came from.
    pub device: DeviceId,
    /// LSN of the interaction.
    pub interaction: u64,
    /// When the interaction happened, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// System prompt, earlier turns, and the prompt (last, role `user`).
    pub messages: Vec<ChatMessage>,
    /// What the model should answer.
    pub target: String,
    /// The reply the device gave.
    pub reply: String,
    /// Whether the target is the user's correction (else the approved reply).
    pub corrected: bool,
    /// Implicit score, [0, 1].
    pub implicit: f32,
    /// Explicit score, [0, 1].
    pub explicit: f32,
    /// Sampling priority.
    pub priority: f32,
}

impl Example {
    /// The same example with its question (the last message) worded as
    /// `question`, sampled with `priority`: a paraphrase to train on.
    pub fn reworded(&self, question: &str, priority: f32) -> Example {
        let mut e = self.clone();
        if let Some(last) = e.messages.last_mut() {
            last.content = question.to_string();
        }
        e.priority = priority;
        e
    }
}

/// What building the buffer found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    /// Interactions read.
    pub interactions: usize,
    /// Feedback records read.
    pub feedback: usize,
    /// Examples whose target is a correction.
    pub corrected: usize,
    /// Examples whose target is an approved reply.
    pub approved: usize,
    /// Interactions with only negative feedback and no correction: not targets.
    pub negative_only: usize,
    /// Interactions without feedback, or with feedback neither positive nor negative.
    pub unrated: usize,
    /// Feedback about an interaction that is not in the journals read.
    pub orphan_feedback: usize,
}

/// Examples, with sampling by priority.
#[derive(Clone, Debug, Default)]
pub struct ReplayBuffer {
    /// The examples, in (device, interaction) order.
    pub examples: Vec<Example>,
    /// The context of every unrated interaction (no feedback, or feedback
    /// neither positive nor negative), in the same order: questions of the
    /// device's own domain that nobody taught, which the night uses to check
    /// locality (answers that must not change).
    pub untaught: Vec<Vec<ChatMessage>>,
    /// Counts.
    pub report: ReplayReport,
}

/// Feedback on one interaction, merged over all its records.
#[derive(Clone, Debug, Default)]
struct Merged {
    rating: Option<u8>,
    thumbs: Option<Thumbs>,
    correction: Option<String>,
    regenerated: bool,
    copied: bool,
    followed_up: bool,
}

impl Merged {
    fn add(&mut self, f: &Feedback<'_>) {
        self.rating = f.rating.or(self.rating);
        self.thumbs = f.thumbs.or(self.thumbs);
        if let Some(c) = &f.correction {
            self.correction = Some(c.to_string());
        }
        self.regenerated |= f.implicit.regenerated;
        self.copied |= f.implicit.copied;
        self.followed_up |= f.implicit.follow_up_s.is_some();
    }

    fn implicit(&self) -> f32 {
        [!self.regenerated, self.copied, self.followed_up].iter().filter(|&&b| b).count() as f32 / 3.0
    }

    /// Explicit score, if any explicit feedback was given.
    fn explicit(&self) -> Option<f32> {
        if self.correction.is_some() {
            return Some(1.0);
        }
        let mut parts = Vec::new();
        if let Some(r) = self.rating {
            parts.push((f32::from(r) - 1.0) / 4.0);
        }
        if let Some(t) = self.thumbs {
            parts.push(if t == Thumbs::Up { 1.0 } else { 0.0 });
        }
        (!parts.is_empty()).then(|| parts.iter().sum::<f32>() / parts.len() as f32)
    }
}

impl ReplayBuffer {
    /// The buffer of the examples at `indices` (same report).
    ///
    /// # Panics
    /// An index is out of range.
    pub fn subset(&self, indices: &[usize]) -> ReplayBuffer {
        ReplayBuffer { examples: indices.iter().map(|&i| self.examples[i].clone()).collect(), untaught: self.untaught.clone(), report: self.report.clone() }
    }

    /// Builds the buffer from journal directories (a device's `journal/`,
    /// or a host store's `devices/<id>/`).
    ///
    /// # Errors
    /// A directory cannot be read.
    pub fn build(dirs: &[PathBuf], weights: PriorityWeights) -> anyhow::Result<ReplayBuffer> {
        let mut interactions: BTreeMap<(DeviceId, u64), (u64, Interaction<'static>)> = BTreeMap::new();
        let mut feedback: BTreeMap<(DeviceId, u64), Merged> = BTreeMap::new();
        let mut report = ReplayReport::default();
        for dir in dirs {
            let (mut found, mut rated) = (Vec::new(), Vec::new());
            let scan = read_journal(dir, None, &mut |record| match &record.body {
                Body::Interaction(i) => found.push((record.lsn, record.time_ms, i.clone())),
                Body::Feedback(f) => rated.push(f.clone()),
                _ => {}
            })
            .with_context(|| format!("cannot read the journal in {}", dir.display()))?;
            let device = scan.device.unwrap_or_default();
            report.feedback += rated.len();
            for (lsn, time_ms, i) in found {
                interactions.insert((device, lsn), (time_ms, i));
            }
            for f in rated {
                feedback.entry((device, f.interaction)).or_default().add(&f);
            }
        }
        report.interactions = interactions.len();
        report.orphan_feedback = feedback.keys().filter(|k| !interactions.contains_key(k)).count();
        // The reply the user last saw for each (device, conversation, turn).
        let mut shown: BTreeMap<(DeviceId, u64, u32), (&str, &str)> = BTreeMap::new();
        for ((device, _), (_, i)) in &interactions {
            shown.insert((*device, i.conversation, i.turn), (&i.prompt, &i.reply));
        }
        let (mut examples, mut untaught) = (Vec::new(), Vec::new());
        for ((device, lsn), (time_ms, i)) in &interactions {
            let merged = feedback.get(&(*device, *lsn)).cloned().unwrap_or_default();
            let mut messages = Vec::new();
            if !i.system.is_empty() {
                messages.push(ChatMessage::new("system", &i.system));
            }
            for turn in 0..i.turn {
                if let Some((prompt, reply)) = shown.get(&(*device, i.conversation, turn)) {
                    messages.push(ChatMessage::new("user", prompt));
                    messages.push(ChatMessage::new("assistant", reply));
                }
            }
            messages.push(ChatMessage::new("user", &i.prompt));
            let implicit = merged.implicit();
            let explicit = merged.explicit();
            let (target, corrected) = match (&merged.correction, explicit) {
                (Some(c), _) => (c.clone(), true),
                (None, Some(e)) if e >= 0.75 && !merged.regenerated => (i.reply.to_string(), false),
                (None, None) if implicit >= 2.0 / 3.0 && feedback.contains_key(&(*device, *lsn)) => (i.reply.to_string(), false),
                (None, e) => {
                    if merged.regenerated || e.is_some_and(|e| e <= 0.25) {
                        report.negative_only += 1;
                    } else {
                        report.unrated += 1;
                        untaught.push(messages);
                    }
                    continue;
                }
            };
            let explicit = explicit.unwrap_or(0.5);
            let priority = weights.implicit * implicit + weights.explicit * explicit;
            if corrected {
                report.corrected += 1;
            } else {
                report.approved += 1;
            }
            examples.push(Example {
                device: *device,
                interaction: *lsn,
                time_ms: *time_ms,
                messages,
                target,
                reply: i.reply.to_string(),
                corrected,
                implicit,
                explicit,
                priority,
            });
        }
        Ok(ReplayBuffer { examples, untaught, report })
    }

    /// `n` example indices drawn with replacement, each with probability
    /// proportional to its priority (seeded SplitMix64, reproducible).
    pub fn sample(&self, n: usize, seed: u64) -> Vec<usize> {
        let total: f32 = self.examples.iter().map(|e| e.priority.max(1e-6)).sum();
        let mut rng = nocturne::sampler::SplitMix64(seed);
        (0..n)
            .map(|_| {
                let mut u = rng.next_unit() * total;
                for (i, e) in self.examples.iter().enumerate() {
                    u -= e.priority.max(1e-6);
                    if u <= 0.0 {
                        return i;
                    }
                }
                self.examples.len() - 1
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::Duration;

    use nocturne::journal::{ImplicitSignals, Journal, JournalConfig};
    use nocturne::ids::ModelId;
    use nocturne::profile::Durability;
    use nocturne::journal::StopReason;

    use super::*;

    fn interaction(conversation: u64, turn: u32, prompt: &'static str, reply: &'static str) -> Body<'static> {
        Body::Interaction(Interaction {
            conversation,
            turn,
            base_model: ModelId([1; 32]),
            adapter: None,
            system: Cow::Borrowed("Be brief."),
            prompt: Cow::Borrowed(prompt),
            reply: Cow::Borrowed(reply),
            prompt_tokens: 10,
            reused_tokens: 0,
            new_tokens: 5,
            stop_reason: StopReason::Eos,
            prefill_tokens_per_s: 1.0,
            decode_tokens_per_s: 1.0,
            time_to_first_token_ms: 1.0,
            peak_memory_bytes: 1,
            persona: None,
            recalled: Cow::Borrowed(&[]),
        })
    }

    fn feedback(interaction: u64, f: Feedback<'static>) -> Body<'static> {
        Body::Feedback(Feedback { interaction, ..f })
    }

    #[test]
    fn targets_priorities_and_context_follow_the_feedback() {
        let dir = tempfile::tempdir().unwrap();
        let config = JournalConfig { durability: Durability::GroupCommit, group_commit: Duration::from_millis(1), segment_bytes: 1 << 20, disk_quota_bytes: 1 << 30 };
        let mut j = Journal::open(dir.path(), DeviceId([5; 16]), config).unwrap();
        let none = Feedback::default();
        let bodies = [
            interaction(1, 0, "Capital of France?", "Lyon."),                                   // 1
            feedback(1, Feedback { correction: Some("Paris.".into()), ..none.clone() }),         // 2
            interaction(2, 0, "2+2?", "4"),                                                     // 3
            feedback(3, Feedback { rating: Some(5), ..none.clone() }),                          // 4
            feedback(3, Feedback { implicit: ImplicitSignals { copied: true, ..Default::default() }, ..none.clone() }), // 5
            interaction(3, 0, "Hi", "Go away."),                                                // 6
            feedback(6, Feedback { thumbs: Some(Thumbs::Down), ..none.clone() }),               // 7
            interaction(4, 0, "Tell a joke", "No."),                                            // 8
            interaction(2, 1, "And 3+3?", "7"),                                                 // 9: retried
            feedback(9, Feedback { implicit: ImplicitSignals { regenerated: true, ..Default::default() }, ..none.clone() }), // 10
            interaction(2, 1, "And 3+3?", "6"),                                                 // 11
            feedback(11, Feedback { implicit: ImplicitSignals { follow_up_s: Some(3), copied: true, ..Default::default() }, ..none.clone() }), // 12
            feedback(99, Feedback { rating: Some(2), ..none.clone() }),                         // 13: orphan
        ];
        for b in &bodies {
            j.append(b).unwrap();
        }
        j.close().unwrap();
        let buffer = ReplayBuffer::build(&[dir.path().to_path_buf()], PriorityWeights::default()).unwrap();
        let r = &buffer.report;
        assert_eq!((r.interactions, r.feedback, r.corrected, r.approved), (6, 7, 1, 2));
        assert_eq!((r.negative_only, r.unrated, r.orphan_feedback), (2, 1, 1));
        let by_lsn: BTreeMap<u64, &Example> = buffer.examples.iter().map(|e| (e.interaction, e)).collect();
        let fixed = by_lsn[&1];
        assert_eq!((fixed.target.as_str(), fixed.corrected, fixed.explicit), ("Paris.", true, 1.0));
        // Not regenerated, not copied, no follow-up: implicit 1/3.
        assert!((fixed.priority - (0.7 / 3.0 + 0.3)).abs() < 1e-6);
        let approved = by_lsn[&3];
        assert_eq!((approved.target.as_str(), approved.corrected), ("4", false));
        assert!((approved.priority - (0.7 * 2.0 / 3.0 + 0.3)).abs() < 1e-6);
        // The retried turn: its context shows turn 0 as the user saw it.
        let retried = by_lsn[&11];
        let roles: Vec<(&str, &str)> = retried.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(roles, [("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?")]);
        assert_eq!(retried.target, "6");
        assert!(!by_lsn.contains_key(&9) && !by_lsn.contains_key(&6) && !by_lsn.contains_key(&8));
        // The unrated interaction is a locality probe, in its context.
        let probes: Vec<Vec<&str>> = buffer.untaught.iter().map(|m| m.iter().map(|m| m.content.as_str()).collect()).collect();
        assert_eq!(probes, [["Be brief.", "Tell a joke"]]);
        // Sampling follows priority.
        let draws = buffer.sample(3000, 1);
        let count = |lsn: u64| draws.iter().filter(|&&i| buffer.examples[i].interaction == lsn).count() as f32;
        let (p1, p3) = (by_lsn[&1].priority, by_lsn[&3].priority);
        assert!((count(3) / count(1) - p3 / p1).abs() < 0.15, "{} {} vs {p3} {p1}", count(3), count(1));
    }
}
