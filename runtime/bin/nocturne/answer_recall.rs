//! Recall memory for the commands that answer (`generate`, `chat`): opened
//! from the state directory, consulted before each reply, taught by `/fix`.
//! Without the `recall` feature, or with `--no-recall`, prompts pass through
//! unchanged. A recall memory that cannot be opened is said once on stderr
//! and the command answers without it.

use clap::Args;
use nocturne::device::StateDir;
use nocturne::tokenizer::{ChatMessage, Tokenizer};

/// Recall options of the answering commands.
#[derive(Args, Clone)]
pub struct RecallArgs {
    /// Do not recall taught answers into the prompt.
    #[arg(long)]
    pub no_recall: bool,
    #[cfg(feature = "recall")]
    #[command(flatten)]
    pub encoder: crate::embed::EncoderArgs,
}

/// One entry recall put into a prompt.
pub struct RecalledEntry {
    /// The corrected interaction (taught entries).
    pub interaction: Option<u64>,
    /// Cosine similarity to the question.
    pub score: f32,
    /// The question (or passage) recalled.
    pub text: String,
    /// The taught answer.
    pub answer: String,
}

/// A prompt after recall.
pub struct Recalled {
    /// The conversation to render.
    pub messages: Vec<ChatMessage>,
    /// Text the reply begins with (shown and journaled as part of it).
    pub reply_prefix: String,
    /// What went in, best first.
    pub entries: Vec<RecalledEntry>,
    /// Whether the session's active adapter answers this request
    /// (`nocturne::recall::scope`; always without recall memory).
    pub adapter_applies: bool,
}

impl Recalled {
    /// `messages` unchanged: nothing recalled.
    pub fn none(messages: &[ChatMessage]) -> Recalled {
        Recalled { messages: messages.to_vec(), reply_prefix: String::new(), entries: Vec::new(), adapter_applies: true }
    }

    /// The token ids to decode: the conversation with the chat template and
    /// the generation prompt, then the reply prefix.
    ///
    /// # Errors
    /// The tokenizer failing.
    pub fn encode(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, nocturne::tokenizer::TokenizerError> {
        let mut ids = tokenizer.encode_chat(&self.messages, true)?;
        ids.extend(tokenizer.encode(&self.reply_prefix)?);
        Ok(ids)
    }

    /// The corrected interactions that went in, for the interaction record.
    pub fn interactions(&self) -> Vec<u64> {
        self.entries.iter().filter_map(|e| e.interaction).collect()
    }

    /// The entries as JSON (`generate --json`).
    pub fn json(&self) -> serde_json::Value {
        self.entries
            .iter()
            .map(|e| serde_json::json!({"interaction": e.interaction, "score": e.score, "text": e.text, "answer": e.answer}))
            .collect()
    }
}

/// Recall memory of a front end (module docs).
pub struct Recall {
    #[cfg(feature = "recall")]
    memory: Option<(nocturne::device::recall::RecallMemory, StateDir)>,
}

impl Recall {
    /// No recall memory: prompts pass through unchanged.
    pub fn off() -> Recall {
        Recall {
            #[cfg(feature = "recall")]
            memory: None,
        }
    }

    /// Runs `start` (planning and allocating the sessions) while recall memory
    /// for `state` opens in a second thread ([`Recall::open`]); keeps recall
    /// only when the sessions' plan (`plan_bytes` of what `start` gave) and
    /// recall's ([`nocturne::recall::plan_bytes`]) fit the profile's memory
    /// budget together, saying so on stderr when they do not.
    ///
    /// # Errors
    /// What `start` returned.
    pub fn open_beside<T, E>(args: &RecallArgs, state: &StateDir, start: impl FnOnce() -> Result<T, E>, plan_bytes: impl FnOnce(&T) -> usize) -> Result<(Recall, T), E> {
        let (mut recall, started) = std::thread::scope(|scope| {
            let opening = scope.spawn(|| Recall::open(args, state));
            let started = start();
            (opening.join().unwrap_or_else(|_| Recall::off()), started)
        });
        let started = started?;
        let total = plan_bytes(&started) + recall.plan_bytes();
        if total as u64 > nocturne::profile::ACTIVE.memory_budget_bytes {
            eprintln!(
                "warning: answering without recall memory: with it the memory plan is {total} bytes, over the profile's budget of {} (see `nocturne info --plan`)",
                nocturne::profile::ACTIVE.memory_budget_bytes
            );
            recall = Recall::off();
        }
        Ok((recall, started))
    }

    /// Bytes recall adds to the memory plan (0 when off).
    pub fn plan_bytes(&self) -> usize {
        #[cfg(feature = "recall")]
        if let Some((memory, _)) = &self.memory {
            return memory.plan_bytes();
        }
        0
    }

    /// Opens recall memory for `state` unless `--no-recall`; on failure says
    /// why on stderr and answers without it.
    fn open(args: &RecallArgs, state: &StateDir) -> Recall {
        #[cfg(feature = "recall")]
        {
            if args.no_recall || !nocturne::profile::ACTIVE.parts.recall {
                return Recall::off();
            }
            let opened = args.encoder.load().and_then(|encoder| {
                let (memory, report) = nocturne::device::recall::RecallMemory::open(state, encoder, &nocturne::profile::ACTIVE.recall)?;
                crate::recall::describe(&report);
                Ok(memory)
            });
            match opened {
                Ok(memory) => {
                    let mut recall = Recall { memory: Some((memory, state.clone())) };
                    recall.follow_active_adapter();
                    recall
                }
                Err(e) => {
                    eprintln!("warning: answering without recall memory: {e:#}");
                    Recall::off()
                }
            }
        }
        #[cfg(not(feature = "recall"))]
        {
            let _ = (args, state);
            Recall::off()
        }
    }

    /// `messages` with what recall finds for the last user message.
    pub fn prompt(&self, messages: &[ChatMessage], tokenizer: &Tokenizer) -> Recalled {
        let unchanged = || Recalled::none(messages);
        #[cfg(feature = "recall")]
        {
            use nocturne::recall::index::Origin;
            let Some((memory, _)) = &self.memory else {
                return unchanged();
            };
            match memory.recall_into(messages, tokenizer, &nocturne::profile::ACTIVE.recall) {
                Ok(recollection) => Recalled {
                    messages: recollection.prompt.messages,
                    reply_prefix: recollection.prompt.reply_prefix.unwrap_or_default(),
                    adapter_applies: recollection.adapter_applies,
                    entries: recollection
                        .used
                        .into_iter()
                        .map(|(entry, score)| RecalledEntry {
                            interaction: match entry.origin {
                                Origin::Taught { interaction, .. } => Some(interaction),
                                Origin::Passage { .. } => None,
                            },
                            score,
                            text: entry.text,
                            answer: entry.answer,
                        })
                        .collect(),
                },
                Err(e) => {
                    eprintln!("warning: recall failed for this message: {e:#}");
                    unchanged()
                }
            }
        }
        #[cfg(not(feature = "recall"))]
        {
            let _ = tokenizer;
            unchanged()
        }
    }

    /// Puts a correction acknowledged as the feedback record `feedback` into
    /// recall memory at once, and writes the index file.
    pub fn teach(&mut self, interaction: u64, feedback: u64, question: &str, answer: &str) {
        #[cfg(feature = "recall")]
        if let Some((memory, _)) = self.memory.as_mut() {
            if let Err(e) = memory.teach(interaction, feedback, question, answer).and_then(|_| memory.save()) {
                eprintln!("warning: the correction is journaled but not in recall memory until the next start: {e:#}");
            }
        }
        #[cfg(not(feature = "recall"))]
        let _ = (interaction, feedback, question, answer);
    }

    /// Puts the corrections acknowledged in the journal since the index's
    /// last LSN into recall memory and writes the index file: for a caller
    /// that knows a correction by its LSN alone (the local API's feedback).
    pub fn catch_up(&mut self) {
        #[cfg(feature = "recall")]
        if let Some((memory, state)) = self.memory.as_mut() {
            if let Err(e) = memory.catch_up(state) {
                eprintln!("warning: the correction is journaled but not in recall memory until the next start: {e:#}");
            }
        }
    }

    /// Stops injecting the corrections the device's active adapter learned
    /// (and injects again those of an adapter rolled back): call after the
    /// session switched adapter.
    pub fn follow_active_adapter(&mut self) {
        #[cfg(feature = "recall")]
        if let Some((memory, state)) = self.memory.as_mut() {
            if let Err(e) = memory.follow_active_adapter(state) {
                eprintln!("warning: recall cannot tell what the active adapter learned (all taught answers stay in use): {e:#}");
            }
        }
    }
}
