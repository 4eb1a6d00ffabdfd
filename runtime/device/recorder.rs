//! Recording a front end's conversations: each answered request becomes an
//! interaction record, each piece of feedback a feedback record, and the
//! session follows the device's active adapter between requests. `generate`,
//! `chat` and any other front end (the local API) journal through this, so
//! none of them repeats how a record is made.
//!
//! Principal type: [`Recorder`]; [`Texts`], [`interaction_record`], [`peak_rss_bytes`].
//!
//! Invariants: a recorder never stops a conversation: every failure comes
//! back as a value for the front end to report, and an answer the journal
//! could not store is still an answer; an interaction's id (its LSN) is given
//! out by [`Recorder::interaction`] only after the journal queued it, and
//! callers that show it wait for its acknowledgement ([`Recorder::wait`]).

use std::borrow::Cow;
use std::sync::Arc;

use super::adapters::{journal_pending_events, load_active, AdapterError, AdapterWatch};
use super::StateDir;
use crate::adapter::LoraAdapter;
use crate::ids::{AdapterId, ModelId};
use crate::journal::{Acknowledgements, Body, Feedback, Interaction, Journal, JournalError};
use crate::session::{ReplyStats, Session};
use crate::weights::ModelPack;

/// Why a recorder operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    /// Journaling is off (`--no-journal`), so feedback has nowhere to go.
    #[error("journaling is off (--no-journal)")]
    JournalOff,
    /// The journal refused or failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The operating system gave no random bytes for a conversation id.
    #[error("no random source for a conversation id: {0}")]
    Random(String),
}

/// The interaction record of a reply: `stats` as the session measured it,
/// the texts borrowed (no allocation). Counts saturate at `u32::MAX`.
pub fn interaction_record<'a>(
    (conversation, turn): (u64, u32),
    (base_model, adapter): (ModelId, Option<AdapterId>),
    texts: &Texts<'a>,
    stats: &ReplyStats,
    peak_memory_bytes: u64,
) -> Interaction<'a> {
    let Texts { system, prompt, reply, persona, recalled } = *texts;
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Interaction {
        conversation,
        turn,
        base_model,
        adapter,
        system: Cow::Borrowed(system),
        prompt: Cow::Borrowed(prompt),
        reply: Cow::Borrowed(reply),
        prompt_tokens: count(stats.prompt_tokens),
        reused_tokens: count(stats.reused_tokens),
        new_tokens: count(stats.new_tokens),
        stop_reason: stats.stop_reason,
        prefill_tokens_per_s: stats.prefill_tokens_per_second() as f32,
        decode_tokens_per_s: stats.decode_tokens_per_second() as f32,
        time_to_first_token_ms: (stats.time_to_first_token.as_secs_f64() * 1e3) as f32,
        peak_memory_bytes,
        persona: persona.map(Cow::Borrowed),
        recalled: Cow::Borrowed(recalled),
    }
}

/// The texts of an answered request, as journaled.
#[derive(Clone, Copy, Debug)]
pub struct Texts<'a> {
    /// The system prompt ("" for a raw prompt).
    pub system: &'a str,
    /// The user's message.
    pub prompt: &'a str,
    /// The reply as shown.
    pub reply: &'a str,
    /// The persona that gave the system prompt, if one did.
    pub persona: Option<&'a str>,
    /// The taught answers recalled into the prompt (LSNs of the interactions
    /// they corrected), best first.
    pub recalled: &'a [u64],
}

/// Peak resident set of this process (`VmHWM` of /proc/self/status), bytes;
/// 0 where /proc is absent. Reads into a stack buffer: allocates nothing.
/// (`getrusage`'s `ru_maxrss` is not used: it keeps the high-water mark from
/// before `exec`, i.e. the parent's, in a child process.)
pub fn peak_rss_bytes() -> u64 {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    let n = std::fs::File::open("/proc/self/status").and_then(|mut f| f.read(&mut buf)).unwrap_or(0);
    let status = std::str::from_utf8(&buf[..n]).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Records the interactions and feedback of one conversation, and keeps a
/// session on the device's active adapter. See the module documentation.
pub struct Recorder {
    journal: Option<Journal>,
    state: StateDir,
    watch: Option<AdapterWatch>,
    /// The adapter the last switch went to (sessions sharing this recorder catch up to it).
    active: Option<Arc<LoraAdapter>>,
    conversation: u64,
    turn: u32,
}

impl Recorder {
    /// A recorder for a new conversation of the device at `state`, appending
    /// to `journal` (None: nothing is recorded).
    ///
    /// # Errors
    /// [`RecorderError::Random`] when no conversation id can be drawn.
    pub fn new(state: StateDir, journal: Option<Journal>) -> Result<Recorder, RecorderError> {
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| RecorderError::Random(e.to_string()))?;
        Ok(Recorder { journal, state, watch: None, active: None, conversation: u64::from_le_bytes(id), turn: 0 })
    }

    /// Puts `session` on the device's active adapter: at the first call, and
    /// afterwards whenever `nocturne sync import` switched it (no restart).
    /// Returns the adapter switched to (`Some(None)`: the base model alone),
    /// or `None` when nothing changed.
    ///
    /// # Errors
    /// Those of [`load_active`]; the session keeps its adapter then.
    pub fn follow_active_adapter(&mut self, session: &mut Session<'_>, pack: &ModelPack) -> Result<Option<Option<Arc<LoraAdapter>>>, AdapterError> {
        if let Some(journal) = self.journal.as_mut() {
            // An install by another process while this one held the journal queued its events.
            journal_pending_events(&self.state, journal)?;
        }
        let switched = match self.watch.as_mut() {
            Some(watch) => watch.poll(&self.state, pack, self.journal.as_mut())?,
            None => {
                let (adapter, active) = load_active(&self.state, pack, self.journal.as_mut())?;
                self.watch = Some(AdapterWatch::new(active));
                Some(adapter)
            }
        };
        if let Some(adapter) = &switched {
            session.set_adapter(adapter.clone());
            self.active = adapter.clone();
        }
        Ok(switched)
    }

    /// The adapter the device's active one was when last followed (`None`:
    /// the base model). A front end with several sessions sharing this
    /// recorder puts each of them on it, since a switch is reported once.
    pub fn active_adapter(&self) -> Option<Arc<LoraAdapter>> {
        self.active.clone()
    }

    /// A handle to wait for acknowledgements without holding the recorder
    /// (`None` when journaling is off).
    pub fn acknowledgements(&self) -> Option<Acknowledgements> {
        self.journal.as_ref().map(Journal::acknowledgements)
    }

    /// Starts a new conversation.
    pub fn new_conversation(&mut self) {
        self.conversation = self.conversation.wrapping_add(1);
        self.turn = 0;
    }

    /// The next interaction is turn `turn` of conversation `conversation`
    /// (a front end that receives whole conversations per request, like the
    /// local API, says where each request stands).
    pub fn set_position(&mut self, conversation: u64, turn: u32) {
        (self.conversation, self.turn) = (conversation, turn);
    }

    /// The LSN the next record will get (`None` when journaling is off): the
    /// interactions stored so far are numbered below it.
    pub fn next_lsn(&self) -> Option<u64> {
        self.journal.as_ref().map(|j| j.next_lsn())
    }

    /// Records not yet acknowledged as durable (0 when journaling is off).
    pub fn unsynced_records(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| (j.next_lsn() - 1).saturating_sub(j.durable_lsn()))
    }

    /// The next interaction replaces the last one (a retry): same turn.
    pub fn replace_last_turn(&mut self) {
        self.turn = self.turn.saturating_sub(1);
    }

    /// Queues the interaction of the reply `session` just gave; returns its
    /// LSN (the interaction id), or `None` when journaling is off. The turn
    /// advances either way.
    ///
    /// # Errors
    /// The journal refused the record (quota, a failed writer).
    pub fn interaction(&mut self, session: &Session<'_>, texts: &Texts<'_>, stats: &ReplyStats) -> Result<Option<u64>, JournalError> {
        let position = (self.conversation, self.turn);
        self.turn += 1;
        let Some(journal) = self.journal.as_mut() else {
            return Ok(None);
        };
        let decoder = session.decoder_ref();
        let models = (decoder.pack().id(), decoder.applied_adapter().map(|a| a.id()));
        let body = interaction_record(position, models, texts, stats, peak_rss_bytes());
        journal.append(&Body::Interaction(body)).map(Some)
    }

    /// Appends feedback and waits until it is acknowledged; returns its LSN.
    ///
    /// # Errors
    /// Journaling is off, or the journal refused or failed.
    pub fn feedback(&mut self, feedback: Feedback<'_>) -> Result<u64, RecorderError> {
        let journal = self.journal.as_mut().ok_or(RecorderError::JournalOff)?;
        Ok(journal.append_durable(&Body::Feedback(feedback))?)
    }

    /// Waits until `lsn` is acknowledged (at once when journaling is off).
    ///
    /// # Errors
    /// The journal failed before acknowledging it.
    pub fn wait(&self, lsn: u64) -> Result<(), JournalError> {
        match &self.journal {
            Some(journal) => journal.wait_durable(lsn),
            None => Ok(()),
        }
    }

    /// Syncs and closes the journal.
    ///
    /// # Errors
    /// The final sync failed.
    pub fn close(self) -> Result<(), JournalError> {
        match self.journal {
            Some(journal) => journal.close(),
            None => Ok(()),
        }
    }
}
