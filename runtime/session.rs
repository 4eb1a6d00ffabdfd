//! A device session: the decoder, sampler and token table, allocated once
//! under the profile's memory budget, answering requests within their budget.
//!
//! Principal types: [`Session`], [`RequestOptions`], [`ReplyStats`],
//! [`SessionError`]; requests end with a [`StopReason`] (the journal
//! schema's, which owns its variant order).
//!
//! Invariants:
//! - [`Session::start`] computes the [`MemoryPlan`], refuses to start when it
//!   exceeds the profile's budget, and otherwise allocates exactly the plan.
//! - A request ends at end-of-sequence, a stop string, its token budget, the
//!   context's end, or its deadline, whichever comes first, and says which.
//!   The deadline is checked after every token, so a request stops at most one
//!   token after its deadline passes.
//! - After the first token, generating a token allocates nothing (decoder,
//!   sampler, reply text and streaming all use preallocated buffers).
//! - A prompt that shares a prefix with the previous sequence reuses its KV
//!   cache entries (as llama.cpp's prompt cache does).

use std::time::{Duration, Instant};

use crate::budget::{BudgetError, KvPrecision, MemoryPlan, PlanSettings};
use crate::decoder::{DecodeError, Decoder};
use crate::journal::StopReason;
use crate::profile::{worker_threads, Profile};
use crate::sampler::{Sampler, SamplerConfig, SamplingError};
use crate::tokenizer::{TokenTable, Tokenizer};
use crate::weights::ModelPack;

/// A session or request that cannot proceed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The memory plan exceeds the profile's budget.
    #[error(transparent)]
    Budget(#[from] BudgetError),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt leaves no room for a reply.
    #[error("the prompt has {tokens} tokens but the context holds {capacity}, and a reply needs at least one more")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Context capacity.
        capacity: usize,
    },
    /// The decoder rejected the input.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A sampling parameter is out of range.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The request allows no new token.
    #[error("max_new_tokens is 0: a request must allow at least one new token")]
    NoNewTokens,
}

/// How a session is set up beyond the profile.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    /// Worker threads (default: the profile's, capped by the cores found).
    pub threads: usize,
    /// KV cache precision (default f16).
    pub kv: KvPrecision,
    /// Keep logits of every prefill token (for perplexity).
    pub all_logits: bool,
    /// Products of an int8 pack in int8 × int8 ([`PlanSettings::int8_activations`]; default off).
    pub int8_activations: bool,
}

impl SessionOptions {
    /// The device defaults under `profile`.
    pub fn for_profile(profile: &Profile) -> SessionOptions {
        SessionOptions { threads: worker_threads(profile), kv: KvPrecision::F16, all_logits: false, int8_activations: false }
    }
}

/// One request's limits and sampling.
#[derive(Clone, Debug)]
pub struct RequestOptions {
    /// Maximum new tokens (capped by the profile's at session start).
    pub max_new_tokens: usize,
    /// Time from the start of the request to its end.
    pub deadline: Duration,
    /// Strings that end the reply.
    pub stop: Vec<String>,
    /// Sampling.
    pub sampler: SamplerConfig,
    /// Set by another thread to end the request early (a client that went
    /// away); checked after every token like the deadline, and the request
    /// then ends with [`StopReason::Deadline`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl RequestOptions {
    /// The profile's limits with greedy sampling and no stop strings.
    pub fn for_profile(profile: &Profile) -> RequestOptions {
        RequestOptions {
            max_new_tokens: profile.max_new_tokens as usize,
            deadline: Duration::from_millis(profile.deadline_ms.into()),
            stop: Vec::new(),
            sampler: SamplerConfig::default(),
            cancel: None,
        }
    }
}

/// Figures of one finished request.
#[derive(Clone, Copy, Debug)]
pub struct ReplyStats {
    /// Why it ended.
    pub stop_reason: StopReason,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV entries were reused from the previous request.
    pub reused_tokens: usize,
    /// Tokens generated (the end-of-sequence token excluded).
    pub new_tokens: usize,
    /// Time from the request's start to the first sampled token.
    pub time_to_first_token: Duration,
    /// Prefill time (prompt tokens not reused).
    pub prefill: Duration,
    /// Decode time (after the first token).
    pub decode: Duration,
}

impl ReplyStats {
    /// Prefill tokens per second.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Decode tokens per second (tokens after the first over the decode time).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.new_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// A running session. See the module documentation.
pub struct Session<'m> {
    decoder: Decoder<'m>,
    sampler: Sampler,
    table: TokenTable,
    plan: MemoryPlan,
    /// Tokens of the current sequence (the last one may not be in the KV cache yet).
    history: Vec<u32>,
    reply: Vec<u8>,
    max_new_tokens: usize,
    eos: u32,
}

impl<'m> Session<'m> {
    /// Plans the session for `pack` under `profile`, checks the plan against
    /// the budget, then allocates it.
    ///
    /// # Errors
    /// [`SessionError::Budget`] naming the plan and the budget when it does not fit.
    pub fn start(
        pack: &'m ModelPack,
        tokenizer: &Tokenizer,
        profile: &Profile,
        options: SessionOptions,
    ) -> Result<Session<'m>, SessionError> {
        let (settings, table, plan) = Session::plan(pack, tokenizer, profile, options);
        plan.check(&profile.name, profile.memory_budget_bytes)?;
        let max_new_tokens = profile.max_new_tokens as usize;
        let reply_bytes = max_new_tokens * table.longest();
        let session = Session {
            decoder: Decoder::new(pack, settings),
            sampler: Sampler::new(SamplerConfig::default(), pack.config().vocab_size),
            table,
            plan,
            history: Vec::with_capacity(settings.context_tokens),
            reply: Vec::with_capacity(reply_bytes),
            max_new_tokens,
            eos: pack.config().eos_token_id,
        };
        assert_eq!(session.allocated(), plan, "a session allocates exactly its memory plan");
        Ok(session)
    }

    /// `slots` sessions answering requests side by side (a server's), after
    /// checking their plans together against the budget; each gets
    /// `options`, so the caller divides the threads among them.
    ///
    /// # Errors
    /// [`SessionError::Budget`] when `slots` plans do not fit.
    pub fn start_slots(
        pack: &'m ModelPack,
        tokenizer: &Tokenizer,
        profile: &Profile,
        options: SessionOptions,
        slots: usize,
    ) -> Result<Vec<Session<'m>>, SessionError> {
        let (_, _, plan) = Session::plan(pack, tokenizer, profile, options);
        plan.times(slots).check(&profile.name, profile.memory_budget_bytes)?;
        (0..slots).map(|_| Session::start(pack, tokenizer, profile, options)).collect()
    }

    /// The plan a session for `pack` under `profile` would allocate, with the
    /// settings it derives from them and the token table it needs.
    pub fn plan(
        pack: &ModelPack,
        tokenizer: &Tokenizer,
        profile: &Profile,
        options: SessionOptions,
    ) -> (PlanSettings, TokenTable, MemoryPlan) {
        let base = PlanSettings::new(pack.config(), profile.max_context_tokens as usize, options.threads);
        let logit_rows = if options.all_logits { base.prefill_block } else { 1 };
        let settings = PlanSettings { kv: options.kv, logit_rows, int8_activations: options.int8_activations, ..base };
        let table = tokenizer.token_table();
        let reply_bytes = profile.max_new_tokens as usize * table.longest();
        let plan = MemoryPlan::new(pack.config(), &settings, table.allocated(), reply_bytes);
        (settings, table, plan)
    }

    /// The memory plan this session allocated.
    pub fn memory_plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Bytes actually allocated, itemized as the plan is.
    pub fn allocated(&self) -> MemoryPlan {
        MemoryPlan {
            sampler: self.sampler.allocated(),
            token_table: self.table.allocated(),
            request: self.history.capacity() * 4 + self.reply.capacity(),
            ..self.decoder.allocated()
        }
    }

    /// The decoder (for perplexity and inspection).
    pub fn decoder(&mut self) -> &mut Decoder<'m> {
        &mut self.decoder
    }

    /// The decoder, read-only.
    pub fn decoder_ref(&self) -> &Decoder<'m> {
        &self.decoder
    }

    /// Forgets the current sequence.
    pub fn reset(&mut self) {
        self.decoder.truncate(0);
        self.history.clear();
    }

    /// Makes `adapter` active from the next request on (`None`: the base
    /// model alone); the cached sequence is forgotten, since its KV entries
    /// were computed with the previous weights.
    pub fn set_adapter(&mut self, adapter: Option<std::sync::Arc<crate::adapter::LoraAdapter>>) {
        self.decoder.set_adapter(adapter);
        self.history.clear();
    }

    /// Applies the active adapter to the next requests or sets it aside
    /// ([`Decoder::apply_adapter`]); when that changes, the cached sequence
    /// is forgotten.
    pub fn apply_adapter(&mut self, applied: bool) {
        if self.decoder.apply_adapter(applied) {
            self.history.clear();
        }
    }

    /// The text of the last reply (invalid UTF-8 replaced).
    pub fn reply_text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.reply)
    }

    /// Runs one request on `prompt` (token ids, chat template applied by the
    /// caller), streaming text to `on_text` as characters complete.
    ///
    /// # Errors
    /// A sampling parameter out of range, `max_new_tokens` 0, an empty
    /// prompt, a prompt that leaves no room for a reply, or a token outside
    /// the vocabulary; nothing is decoded then and the session stays usable.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &RequestOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<ReplyStats, SessionError> {
        let started = Instant::now();
        let capacity = self.decoder.capacity();
        options.sampler.check()?;
        if options.max_new_tokens == 0 {
            return Err(SessionError::NoNewTokens);
        }
        if prompt.is_empty() {
            return Err(SessionError::EmptyPrompt);
        }
        if prompt.len() >= capacity {
            return Err(SessionError::PromptTooLong { tokens: prompt.len(), capacity });
        }
        let vocab = self.decoder.pack().config().vocab_size;
        if let Some(&id) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(DecodeError::TokenOutOfRange { id, vocab }.into());
        }
        let mut reused = self.history.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        reused = reused.min(self.decoder.position()).min(prompt.len() - 1);
        self.decoder.truncate(reused);
        self.history.truncate(reused);
        self.history.extend_from_slice(&prompt[reused..]);
        self.sampler.reconfigure(options.sampler);
        self.reply.clear();

        let max_new = options.max_new_tokens.min(self.max_new_tokens);
        let hold_back = options.stop.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
        let mut emitted = 0;
        let mut first_token_at = None;
        let mut new_tokens = 0;
        let mut logits = self.decoder.forward(&prompt[reused..])?;
        let prefill = started.elapsed();
        let stop_reason = loop {
            let token = self.sampler.sample(logits, &self.history);
            let now = Instant::now();
            first_token_at.get_or_insert(now);
            if token == self.eos {
                break StopReason::Eos;
            }
            self.history.push(token);
            new_tokens += 1;
            let piece = self.table.bytes(token);
            self.reply.extend_from_slice(piece);
            if let Some(cut) = stop_position(&self.reply, piece.len(), &options.stop) {
                self.reply.truncate(cut);
                break StopReason::StopString;
            }
            emitted = stream(&self.reply, emitted, self.reply.len().saturating_sub(hold_back), on_text);
            if new_tokens >= max_new {
                break StopReason::MaxTokens;
            }
            let cancelled = options.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
            if cancelled || now.duration_since(started) >= options.deadline {
                break StopReason::Deadline;
            }
            if self.decoder.position() + 1 > capacity {
                break StopReason::ContextFull;
            }
            logits = self.decoder.forward(&[token])?;
        };
        stream(&self.reply, emitted, self.reply.len(), on_text);
        let first = first_token_at.unwrap_or(started + prefill);
        Ok(ReplyStats {
            stop_reason,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            new_tokens,
            time_to_first_token: first.duration_since(started),
            prefill,
            decode: first.elapsed(),
        })
    }
}

/// Where the earliest stop string in `reply` starts, if one appeared with
/// the last `added` bytes (checked after every token, so a match must end
/// inside them and start at most `len − 1` bytes before them).
fn stop_position(reply: &[u8], added: usize, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = s.as_bytes();
            let from = reply.len().saturating_sub(added + s.len() - 1);
            reply[from..].windows(s.len()).position(|w| w == s).map(|p| from + p)
        })
        .min()
}

/// Passes `reply[emitted..upto]`, cut back to a character boundary, to
/// `on_text`; returns the new `emitted`.
fn stream(reply: &[u8], emitted: usize, upto: usize, on_text: &mut dyn FnMut(&str)) -> usize {
    if upto <= emitted {
        return emitted;
    }
    let text = match std::str::from_utf8(&reply[emitted..upto]) {
        Ok(text) => text,
        Err(e) if e.error_len().is_none() => {
            // A character cut by the token boundary: emit up to it, keep the rest.
            std::str::from_utf8(&reply[emitted..emitted + e.valid_up_to()]).unwrap_or_default()
        }
        Err(e) => {
            // An invalid sequence the model produced: skip past it.
            let good = std::str::from_utf8(&reply[emitted..emitted + e.valid_up_to()]).unwrap_or_default();
            on_text(good);
            on_text("\u{fffd}");
            return emitted + e.valid_up_to() + e.error_len().unwrap_or(1);
        }
    };
    if !text.is_empty() {
        on_text(text);
    }
    emitted + text.len()
}

/// Perplexity of `tokens` under the model: `exp(−mean log p(tokenᵢ₊₁ | tokens≤ᵢ))`,
/// from a fresh sequence. The decoder must keep logits of every token
/// (`SessionOptions::all_logits`).
///
/// # Errors
/// When the tokens do not fit the context or hold an id outside the vocabulary.
pub fn perplexity(decoder: &mut Decoder<'_>, tokens: &[u32]) -> Result<f64, DecodeError> {
    decoder.truncate(0);
    let mut nll = 0.0f64;
    decoder.forward_all(&tokens[..tokens.len() - 1], |i, logits| {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let log_sum = logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() + max as f64;
        nll += log_sum - logits[tokens[i + 1] as usize] as f64;
    })?;
    decoder.truncate(0);
    Ok((nll / (tokens.len() - 1) as f64).exp())
}
