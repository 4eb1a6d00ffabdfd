//! The slot: one thread that owns a [`Session`] (its KV cache allocated once
//! from the memory plan) and the [`Recorder`], and runs the queued work one
//! item at a time: completions (streamed back as events, then journaled) and
//! feedback. Being the only writer of the journal, it needs no lock; the
//! session keeps the previous request's tokens, so a conversation's next
//! turn reuses its KV prefix.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nocturne::device::recorder::Recorder;
use nocturne::journal::Feedback;
use nocturne::session::{ReplyStats, RequestOptions, Session};
use nocturne::weights::ModelPack;
use tokio::sync::{mpsc, oneshot};

/// A completion to run.
pub struct Completion {
    /// Prompt token ids (chat template applied).
    pub prompt: Vec<u32>,
    /// Limits and sampling; `cancel` is set when the client goes away.
    pub options: RequestOptions,
    /// System prompt and last user message, as journaled.
    pub texts: (String, String),
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
    /// journaling off or the journal failed, said in the log).
    Done { reply: String, stats: ReplyStats, interaction: Option<u64> },
    /// The request was refused (a client error the session found).
    Refused(String),
}

/// Work for the slot.
pub enum Work {
    /// A chat completion.
    Completion(Completion),
    /// Feedback to record; answered with its LSN or why not.
    Feedback(Feedback<'static>, oneshot::Sender<Result<u64, String>>),
}

/// Figures the HTTP side reads for `/metrics`.
#[derive(Default)]
pub struct SlotState {
    /// A completion is running.
    pub busy: AtomicBool,
    /// Journal records not yet acknowledged as durable.
    pub unsynced: AtomicU64,
}

/// Runs work from `queue` until every sender is gone, then closes the
/// journal (syncing it).
pub fn run(mut session: Session<'_>, pack: &ModelPack, mut recorder: Recorder, queue: crossbeam_channel::Receiver<Work>, state: Arc<SlotState>) {
    let publish = |recorder: &Recorder| state.unsynced.store(recorder.unsynced_records(), Ordering::Relaxed);
    publish(&recorder);
    for work in queue {
        match work {
            Work::Completion(c) => {
                state.busy.store(true, Ordering::Relaxed);
                complete(&mut session, pack, &mut recorder, c);
                state.busy.store(false, Ordering::Relaxed);
            }
            Work::Feedback(feedback, answer) => {
                let result = match recorder.next_lsn() {
                    None => Err("journaling is off (--no-journal): feedback has nowhere to go".to_string()),
                    Some(next) if feedback.interaction == 0 || feedback.interaction >= next => Err(format!(
                        "no interaction {} in the journal (its records are numbered 1 to {})",
                        feedback.interaction,
                        next - 1
                    )),
                    Some(_) => recorder.feedback(feedback).map_err(|e| e.to_string()),
                };
                let _ = answer.send(result);
            }
        }
        publish(&recorder);
    }
    if let Err(e) = recorder.close() {
        tracing::error!(error = %e, "the journal's final sync failed");
    }
}

/// Runs one completion and journals it unless the client went away.
fn complete(session: &mut Session<'_>, pack: &ModelPack, recorder: &mut Recorder, c: Completion) {
    match recorder.follow_active_adapter(session, pack) {
        Ok(Some(adapter)) => tracing::info!(adapter = ?adapter.map(|a| a.id().to_string()), "adapter switched"),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "adapter not switched"),
    }
    let cancel = c.options.cancel.clone().unwrap_or_else(|| Arc::new(AtomicBool::new(false)));
    let options = RequestOptions { cancel: Some(cancel.clone()), ..c.options };
    let events = &c.events;
    let result = session.generate(&c.prompt, &options, &mut |text| {
        if events.send(Event::Text(text.to_string())).is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
    });
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => {
            let _ = events.send(Event::Refused(e.to_string()));
            return;
        }
    };
    if cancel.load(Ordering::Relaxed) || events.is_closed() {
        tracing::info!(new_tokens = stats.new_tokens, "client went away; reply not journaled");
        return;
    }
    let reply = session.reply_text().into_owned();
    recorder.set_position(c.position.0, c.position.1);
    let interaction = match recorder.interaction(session, (&c.texts.0, &c.texts.1, &reply), &stats) {
        Ok(Some(lsn)) => match recorder.wait(lsn) {
            Ok(()) => Some(lsn),
            Err(e) => {
                tracing::error!(error = %e, "the interaction was not acknowledged");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "the interaction was not recorded");
            None
        }
    };
    metrics::counter!(super::telemetry::PROMPT_TOKENS).increment(stats.prompt_tokens as u64);
    metrics::counter!(super::telemetry::COMPLETION_TOKENS).increment(stats.new_tokens as u64);
    metrics::histogram!(super::telemetry::TIME_TO_FIRST_TOKEN).record(stats.time_to_first_token.as_secs_f64());
    if stats.new_tokens > 1 {
        metrics::histogram!(super::telemetry::DECODE_SPEED).record(stats.decode_tokens_per_second());
    }
    let _ = events.send(Event::Done { reply, stats, interaction });
}
