//! The tokenizer of a model directory (`tokenizer.json`, Hugging Face
//! `tokenizers` format).
//!
//! Principal types: [`Tokenizer`], [`TokenizerError`].
//!
//! Invariants: special tokens written in the text (the ChatML markers
//! `<|im_start|>`, `<|im_end|>`) encode to their single ids; nothing is added
//! around the text (no BOS), as SmolLM2's `add_bos_token = false` requires;
//! decoding the ids of any UTF-8 text gives the text back.

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
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.into(), message: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`, special-token markers included, nothing added.
    ///
    /// # Errors
    /// [`TokenizerError::Codec`] if the tokenizer rejects the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, false).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
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

    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
