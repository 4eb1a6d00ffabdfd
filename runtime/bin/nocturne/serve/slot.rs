//! The slots: one thread per [`Session`] (its KV cache allocated once from
//! the memory plan), each taking work from the shared queue one item at a
//! time: completions (streamed back as events, then journaled) and
//! feedback. The slots share the device's [`Recorder`] behind a mutex held
//! only to follow the active adapter and to append; waiting for a record's
//! acknowledgement happens outside it. A session keeps its previous
//! request's tokens, so a conversation's next turn reuses its KV prefix when
//! it lands on the same slot.
//!
//! Recall memory is shared by the slots behind its own mutex: a chat
//! completion's last user message is looked up before its prompt is
//! decoded (the reply prefix recall gives is streamed first and is part of
//! the reply), and a correction that arrives as feedback is put into it as
//! soon as the journal acknowledged it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nocturne::device::recorder::{Recorder, Texts};
use nocturne::journal::{Acknowledgements, Feedback};
use nocturne::session::{ReplyStats, RequestOptions, Session};
use nocturne::tokenizer::{ChatMessage, Tokenizer};
use nocturne::weights::ModelPack;
use tokio::sync::{mpsc, oneshot};

use super::telemetry;
use crate::answer_recall::{Recall, Recalled};

/// A completion to run.
pub struct Completion {
    /// Prompt token ids (chat template applied).
    pub prompt: Vec<u32>,
    /// The conversation `prompt` renders, system message first (chat
    /// completions: recall looks up its last user message); `None` for a
    /// raw text completion, which gets no recall.
    pub messages: Option<Vec<ChatMessage>>,
    /// Limits and sampling; `cancel` is set when the client goes away.
    pub options: RequestOptions,
    /// System prompt, last user message, and the persona that gave the
    /// system prompt, as journaled.
    pub texts: (String, String, Option<String>),
    /// Where this request stands in its conversation.
    pub position: (u64, u32),
    /// Streamed text, then the outcome.
    pub events: mpsc::UnboundedSender<Event>,
}

/// What a completion sends back.
pub enum Event {
    /// Reply text as characters complete.
    Text(String),
    /// The reply ended; `interaction` is its LSN once acknowledged (None:
    /// journaling off or the journal failed, said in the log); `recalled`
    /// lists what recall put into the prompt (JSON, as `generate --json`).
    Done { reply: String, stats: ReplyStats, interaction: Option<u64>, recalled: serde_json::Value },
    /// The request was refused (a client error the session found).
    Refused(String),
}

/// Work for a slot.
pub enum Work {
    /// A chat completion.
    Completion(Completion),
    /// Feedback to record; answered with its LSN or why not.
    Feedback(Feedback<'static>, oneshot::Sender<Result<u64, String>>),
}

/// Figures the HTTP side reads for `/metrics`.
#[derive(Default)]
pub struct SlotState {
    /// Slots running a completion.
    pub busy: AtomicUsize,
    /// Journal records not yet acknowledged as durable.
    pub unsynced: AtomicU64,
}

/// What every slot shares.
pub struct Shared<'a> {
    /// The mapped pack the sessions read.
    pub pack: &'a ModelPack,
    /// The pack's tokenizer (recalled prompts are encoded on the slot).
    pub tokenizer: &'a Tokenizer,
    /// Recall memory (off when it could not be opened or `--no-recall`).
    pub recall: Mutex<Recall>,
    /// The device's recorder (the journal's only writer in the process).
    pub recorder: Mutex<Recorder>,
    /// Acknowledgements, waited on without the recorder's lock.
    pub acknowledgements: Option<Acknowledgements>,
    /// The figures `/metrics` shows.
    pub state: Arc<SlotState>,
}

impl Shared<'_> {
    fn recorder(&self) -> MutexGuard<'_, Recorder> {
        // A slot that panicked while holding it leaves the recorder usable: every
        // recorder operation is one journal call.
        self.recorder.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn recall(&self) -> MutexGuard<'_, Recall> {
        // Every recall operation leaves the index whole; a panicked slot's is usable.
        self.recall.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, recorder: &Recorder) {
        self.state.unsynced.store(recorder.unsynced_records(), Ordering::Relaxed);
    }
}

/// Runs work from `queue` on `session` until every sender is gone.
pub fn run(mut session: Session<'_>, shared: &Shared<'_>, queue: crossbeam_channel::Receiver<Work>) {
    for work in queue {
        match work {
            Work::Completion(c) => {
                shared.state.busy.fetch_add(1, Ordering::Relaxed);
                let events = c.events.clone();
                let last = complete(&mut session, shared, c);
                // Free before the client hears the end, so it never sees its own slot busy.
                shared.state.busy.fetch_sub(1, Ordering::Relaxed);
                if let Some(last) = last {
                    let _ = events.send(last);
                }
            }
            Work::Feedback(feedback, answer) => {
                let correction = feedback.correction.is_some();
                let mut recorder = shared.recorder();
                let result = match recorder.next_lsn() {
                    None => Err("journaling is off (--no-journal): feedback has nowhere to go".to_string()),
                    Some(next) if feedback.interaction == 0 || feedback.interaction >= next => Err(format!(
                        "no interaction {} in the journal (its records are numbered 1 to {})",
                        feedback.interaction,
                        next - 1
                    )),
                    Some(_) => recorder.feedback(feedback).map_err(|e| e.to_string()),
                };
                shared.publish(&recorder);
                drop(recorder);
                // In recall before the client hears it is recorded, so its next question finds it.
                if correction && result.is_ok() {
                    shared.recall().catch_up();
                }
                let _ = answer.send(result);
            }
        }
    }
}

/// Puts `session` on the device's active adapter (an install by `nocturne
/// sync import` switches it between requests).
fn follow_active_adapter(session: &mut Session<'_>, shared: &Shared<'_>) {
    let mut recorder = shared.recorder();
    match recorder.follow_active_adapter(session, shared.pack) {
        Ok(Some(adapter)) => {
            tracing::info!(adapter = ?adapter.map(|a| a.id().to_string()), "adapter switched");
            shared.recall().follow_active_adapter();
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "adapter not switched"),
    }
    // Another slot may have seen the switch; a switch is reported once.
    let active = recorder.active_adapter();
    if session.decoder_ref().adapter().map(|a| a.id()) != active.as_ref().map(|a| a.id()) {
        session.set_adapter(active);
    }
}

/// Runs one completion and journals it unless the client went away;
/// returns the event that ends it (`None` when the client is gone).
fn complete(session: &mut Session<'_>, shared: &Shared<'_>, c: Completion) -> Option<Event> {
    follow_active_adapter(session, shared);
    let cancel = c.options.cancel.clone().unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
    let options = RequestOptions { cancel: Some(cancel.clone()), ..c.options };
    let events = &c.events;
    let (prompt, recalled) = with_recall(shared, c.messages.as_deref(), c.prompt, session.decoder_ref().capacity());
    session.apply_adapter(recalled.adapter_applies);
    if !recalled.reply_prefix.is_empty() {
        let _ = events.send(Event::Text(recalled.reply_prefix.clone()));
    }
    let result = session.generate(&prompt, &options, &mut |text| {
        if events.send(Event::Text(text.to_string())).is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
    });
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => return Some(Event::Refused(e.to_string())),
    };
    if cancel.load(Ordering::Relaxed) || events.is_closed() {
        tracing::info!(new_tokens = stats.new_tokens, "client went away; reply not journaled");
        return None;
    }
    let reply = format!("{}{}", recalled.reply_prefix, session.reply_text());
    let interactions = recalled.interactions();
    let queued = {
        let mut recorder = shared.recorder();
        recorder.set_position(c.position.0, c.position.1);
        let texts = Texts { system: &c.texts.0, prompt: &c.texts.1, reply: &reply, persona: c.texts.2.as_deref(), recalled: &interactions };
        let queued = recorder.interaction(session, &texts, &stats);
        shared.publish(&recorder);
        queued
    };
    let interaction = match (queued, &shared.acknowledgements) {
        (Ok(Some(lsn)), Some(acks)) => match acks.wait_durable(lsn) {
            Ok(()) => Some(lsn),
            Err(e) => {
                tracing::error!(error = %e, "the interaction was not acknowledged");
                None
            }
        },
        (Ok(_), _) => None,
        (Err(e), _) => {
            tracing::error!(error = %e, "the interaction was not recorded");
            None
        }
    };
    metrics::counter!(telemetry::PROMPT_TOKENS).increment(stats.prompt_tokens as u64);
    metrics::counter!(telemetry::COMPLETION_TOKENS).increment(stats.new_tokens as u64);
    metrics::histogram!(telemetry::TIME_TO_FIRST_TOKEN).record(stats.time_to_first_token.as_secs_f64());
    if stats.new_tokens > 1 {
        metrics::histogram!(telemetry::DECODE_SPEED).record(stats.decode_tokens_per_second());
    }
    Some(Event::Done { reply, stats, interaction, recalled: recalled.json() })
}

/// The prompt to decode: `prompt` with what recall finds for the last user
/// message of `messages`, or `prompt` as sent when there are no messages,
/// recall finds nothing, or what it adds would leave no room for a reply in
/// `capacity` tokens; and whether the active adapter answers it (recall's
/// scope decision stands when its entries are left out).
fn with_recall(shared: &Shared<'_>, messages: Option<&[ChatMessage]>, prompt: Vec<u32>, capacity: usize) -> (Vec<u32>, Recalled) {
    let Some(messages) = messages else {
        return (prompt, Recalled::none(&[]));
    };
    let recalled = shared.recall().prompt(messages, shared.tokenizer);
    if recalled.entries.is_empty() {
        return (prompt, recalled);
    }
    match recalled.encode(shared.tokenizer) {
        Ok(ids) if ids.len() < capacity => (ids, recalled),
        Ok(ids) => {
            tracing::info!(tokens = ids.len(), capacity, "the recalled prompt does not fit the context; answering without recall");
            (prompt, Recalled { adapter_applies: recalled.adapter_applies, ..Recalled::none(messages) })
        }
        Err(e) => {
            tracing::warn!(error = %e, "the recalled prompt cannot be encoded; answering without recall");
            (prompt, Recalled { adapter_applies: recalled.adapter_applies, ..Recalled::none(messages) })
        }
    }
}
