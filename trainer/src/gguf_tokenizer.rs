//! Builds a Hugging Face `tokenizer.json` from GGUF tokenizer metadata.
//!
//! Principal function: [`build_tokenizer`].
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE) with the
//! `smollm` pre-tokenizer. llama.cpp's `smollm` pre-tokenizer splits every
//! digit on its own, then applies the GPT-2 split regex; in `tokenizers` terms
//! that is `Sequence[Digits(individual_digits), ByteLevel(add_prefix_space =
//! false, use_regex = true)]`, the pre-tokenizer of SmolLM2's own
//! `tokenizer.json`. Tokens of GGUF type 3 (control) become special added
//! tokens (ChatML's `<|im_start|>`, `<|im_end|>`, ...), type 4 (user-defined)
//! plain added tokens. The chat template goes to `tokenizer_config.json`.

use serde_json::json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::gguf::{GgufError, GgufFile, MetaValue};

/// GGUF token type of control (special) tokens.
const TOKEN_TYPE_CONTROL: i128 = 3;
/// GGUF token type of user-defined added tokens.
const TOKEN_TYPE_USER_DEFINED: i128 = 4;

/// A tokenizer and the contents of its `tokenizer_config.json`.
pub struct BuiltTokenizer {
    /// The tokenizer, ready to `save` as `tokenizer.json`.
    pub tokenizer: Tokenizer,
    /// `tokenizer_config.json`: chat template and special-token names.
    pub config: serde_json::Value,
    /// Number of entries (vocabulary size).
    pub vocab_size: usize,
}

fn strings<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, GgufError> {
    gguf.array(key)?
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            MetaValue::Str(s) => Ok(s.as_str()),
            _ => Err(GgufError::invalid(gguf.path(), format!("`{key}`[{i}] is not a string"))),
        })
        .collect()
}

/// Builds the tokenizer described by `gguf`'s `tokenizer.*` metadata.
///
/// # Errors
/// Missing metadata, an unsupported tokenizer model or pre-tokenizer, a merge
/// that is not two tokens, or special-token ids outside the vocabulary.
pub fn build_tokenizer(gguf: &GgufFile) -> Result<BuiltTokenizer, GgufError> {
    let invalid = |problem: String| GgufError::invalid(gguf.path(), problem);
    let model = gguf.str("tokenizer.ggml.model")?;
    let pre = gguf.str("tokenizer.ggml.pre")?;
    if model != "gpt2" || pre != "smollm" {
        return Err(invalid(format!(
            "tokenizer model {model:?} with pre-tokenizer {pre:?} is not supported (only \"gpt2\" with \"smollm\")"
        )));
    }
    let tokens = strings(gguf, "tokenizer.ggml.tokens")?;
    let types = gguf.array("tokenizer.ggml.token_type")?;
    if types.len() != tokens.len() {
        return Err(invalid(format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let merges = strings(gguf, "tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| invalid(format!("merge {i} ({m:?}) is not two space-separated tokens")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| invalid(format!("BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        Digits::new(true).into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(true, false, true)));
    let added = |kind: i128, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|(_, t)| **t == MetaValue::Int(kind))
            .map(|(tok, _)| AddedToken::from(tok.to_string(), special))
            .collect()
    };
    tokenizer.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
    tokenizer.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));

    let name_of = |key: &str| -> Result<&str, GgufError> {
        let id = gguf.usize(key)?;
        tokens.get(id).copied().ok_or_else(|| invalid(format!("`{key}` = {id} is outside the vocabulary")))
    };
    let config = json!({
        // transformers builds `tokenizer.json` as it is only for the fast class;
        // named GPT2Tokenizer it rebuilds one without the Digits pre-tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": false,
        "bos_token": name_of("tokenizer.ggml.bos_token_id")?,
        "eos_token": name_of("tokenizer.ggml.eos_token_id")?,
        "unk_token": name_of("tokenizer.ggml.unknown_token_id")?,
        "pad_token": name_of("tokenizer.ggml.padding_token_id")?,
        "chat_template": gguf.str("tokenizer.chat_template")?,
        "clean_up_tokenization_spaces": false,
        "model_max_length": gguf.usize("llama.context_length")?,
    });
    Ok(BuiltTokenizer { tokenizer, config, vocab_size: tokens.len() })
}
