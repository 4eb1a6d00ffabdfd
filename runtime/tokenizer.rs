//! The tokenizer of a model directory (`tokenizer.json`, Hugging Face
//! `tokenizers` format).
//!
//! Principal types: [`Tokenizer`], [`TokenTable`] (the UTF-8 bytes of every
//! token, for allocation-free streaming), [`ChatMessage`], [`chatml`] and
//! [`Tokenizer::encode_chat`] (the chat template), [`TokenizerError`].
//!
//! Invariants: text is never parsed for special tokens: a user (or pasted
//! text) who writes `<|im_start|>` gets the characters, not the marker, so
//! no one can forge a system or assistant turn that would be journaled and
//! trained on. Only the template ([`Tokenizer::encode_chat`]) and callers
//! that name a marker ([`Tokenizer::special_id`]) insert special tokens.
//! Nothing is added around the text (no BOS), as SmolLM2's
//! `add_bos_token = false` requires; decoding the ids of any UTF-8 text gives
//! the text back.

use std::path::{Path, PathBuf};

/// A tokenizer that cannot be loaded or cannot process its input.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is missing or malformed.
    #[error("{path}: cannot load tokenizer: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
    /// The vocabulary lacks a special token the template needs.
    #[error("the tokenizer has no special token `{0}`")]
    MissingSpecial(String),
}

/// A byte-level BPE tokenizer loaded from `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `path` (a `tokenizer.json`).
    ///
    /// # Errors
    /// [`TokenizerError::Load`] naming the file.
    pub fn from_file(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let load = |message: String| TokenizerError::Load { path: path.into(), message };
        let bytes = crate::file_read::read_bounded(path, crate::file_read::limit::TOKENIZER).map_err(|e| load(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| load(e.to_string()))?;
        // Special tokens in text are encoded as the text they spell (module docs).
        inner.set_encode_special_tokens(true);
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text` as plain text: a special token's spelling in it
    /// encodes as ordinary characters; nothing is added.
    ///
    /// # Errors
    /// [`TokenizerError::Codec`] if the tokenizer rejects the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The id of the special token `marker` (`<|im_start|>`, say).
    ///
    /// # Errors
    /// [`TokenizerError::MissingSpecial`] when the vocabulary has no such special token.
    pub fn special_id(&self, marker: &str) -> Result<u32, TokenizerError> {
        self.special_tokens()
            .into_iter()
            .find_map(|(id, content)| (content == marker).then_some(id))
            .ok_or_else(|| TokenizerError::MissingSpecial(marker.into()))
    }

    /// Every special token of the vocabulary: `(id, spelling)`, by id.
    pub fn special_tokens(&self) -> Vec<(u32, String)> {
        let mut out: Vec<(u32, String)> =
            self.inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, t)| (id, t.content)).collect();
        out.sort();
        out
    }

    /// Token ids of `messages` under the chat template ([`chatml`]): the
    /// markers are inserted by id, every role and content is encoded as plain
    /// text ([`Tokenizer::encode`]).
    ///
    /// # Errors
    /// A template marker missing from the vocabulary; the tokenizer rejects a text.
    pub fn encode_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        for segment in chat_segments(messages, add_generation_prompt) {
            match segment {
                Segment::Marker(marker) => ids.push(self.special_id(marker)?),
                Segment::Text(text) => ids.extend(self.encode(&text)?),
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens included.
    ///
    /// # Errors
    /// [`TokenizerError::Codec`] for an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// The vocabulary entry of `id` (byte-level form, e.g. `Ġworld`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a vocabulary entry or special token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including special tokens: one past the largest id
    /// of the model's vocabulary or of an added token. (`tokenizers`
    /// 0.22's `get_vocab_size(true)` builds the whole vocabulary as a map
    /// to count it: about 20 ms of start-up for SmolLM2's 49,152 tokens.)
    pub fn vocab_size(&self) -> usize {
        let past_added = self.inner.get_added_tokens_decoder().keys().map(|&id| id as usize + 1).max().unwrap_or(0);
        self.inner.get_vocab_size(false).max(past_added)
    }

    /// The byte table of every token (see [`TokenTable`]).
    pub fn token_table(&self) -> TokenTable {
        let vocab = self.vocab_size();
        let added = self.inner.get_added_tokens_decoder();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(vocab + 1);
        offsets.push(0u32);
        for id in 0..vocab as u32 {
            if let Some(token) = added.get(&id) {
                bytes.extend_from_slice(token.content.as_bytes());
            } else if let Some(piece) = self.inner.id_to_token(id) {
                bytes.extend(piece.chars().filter_map(byte_of_char));
            }
            offsets.push(bytes.len() as u32);
        }
        bytes.shrink_to_fit();
        TokenTable { bytes, offsets }
    }
}

/// The inverse of GPT-2's `bytes_to_unicode` (openai/gpt-2, `encoder.py`),
/// which byte-level BPE uses to spell bytes as printable characters: bytes
/// `!`..`~`, `¡`..`¬` and `®`..`ÿ` stand for themselves; the other 68 bytes
/// are spelled, in order, by U+0100 onwards.
fn byte_of_char(c: char) -> Option<u8> {
    let code = c as u32;
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    if code < 256 && printable(code) {
        return Some(code as u8);
    }
    let index = code.checked_sub(256)?;
    (0u32..256).filter(|&b| !printable(b)).nth(index as usize).map(|b| b as u8)
}

/// The UTF-8 bytes each token id stands for, in one buffer: byte-level BPE
/// tokens may hold part of a character, so a reply is assembled as bytes and
/// cut at character boundaries when streamed.
pub struct TokenTable {
    bytes: Vec<u8>,
    offsets: Vec<u32>,
}

impl TokenTable {
    /// Bytes of token `id` (empty for an id outside the vocabulary).
    pub fn bytes(&self, id: u32) -> &[u8] {
        match (self.offsets.get(id as usize), self.offsets.get(id as usize + 1)) {
            (Some(&a), Some(&b)) => &self.bytes[a as usize..b as usize],
            _ => &[],
        }
    }

    /// Length of the longest token, bytes.
    pub fn longest(&self) -> usize {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }

    /// Bytes the table occupies.
    pub fn allocated(&self) -> usize {
        self.bytes.capacity() + self.offsets.capacity() * 4
    }
}

/// The default system prompt of SmolLM2-Instruct (from its chat template).
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A piece of the rendered template: a marker the template inserts, or text.
enum Segment {
    Marker(&'static str),
    Text(String),
}

/// The ChatML start and end markers.
pub const IM_START: &str = "<|im_start|>";
/// See [`IM_START`].
pub const IM_END: &str = "<|im_end|>";

/// The ChatML template SmolLM2 ships (`<|im_start|>{role}\n{content}<|im_end|>\n`
/// per message, a default system message when the first is not one, the
/// assistant header when `add_generation_prompt`), as markers and texts.
fn chat_segments(messages: &[ChatMessage], add_generation_prompt: bool) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut message = |role: &str, content: &str| {
        out.extend([Segment::Marker(IM_START), Segment::Text(format!("{role}\n{content}")), Segment::Marker(IM_END), Segment::Text("\n".into())]);
    };
    if messages.first().is_none_or(|m| m.role != "system") {
        message("system", DEFAULT_SYSTEM_PROMPT);
    }
    for m in messages {
        message(&m.role, &m.content);
    }
    if add_generation_prompt {
        out.extend([Segment::Marker(IM_START), Segment::Text("assistant\n".into())]);
    }
    out
}

/// Renders `messages` with the chat template as text (for display and
/// logs; encode with [`Tokenizer::encode_chat`], which keeps user text from
/// becoming markers).
pub fn chatml(messages: &[ChatMessage], add_generation_prompt: bool) -> String {
    chat_segments(messages, add_generation_prompt)
        .into_iter()
        .map(|s| match s {
            Segment::Marker(m) => m.to_string(),
            Segment::Text(t) => t,
        })
        .collect()
}
