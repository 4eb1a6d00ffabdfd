//! `nocturne embed`: the recall encoder's embedding of texts, as JSON lines
//! for scripts; and `EncoderArgs`, which says where the encoder is.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use nocturne::profile::ACTIVE;
use nocturne::recall::encoder::SentenceEncoder;

/// Directory name of the default encoder under the models directory.
const DEFAULT_ENCODER: &str = "all-minilm-l6-v2";

/// Which sentence encoder recall uses.
#[derive(Args, Clone)]
pub struct EncoderArgs {
    /// Encoder directory (encoder.onnx + tokenizer.json); default: all-minilm-l6-v2 under the models directory.
    #[arg(long, env = "NOCTURNE_ENCODER")]
    pub encoder: Option<PathBuf>,
}

impl EncoderArgs {
    /// The encoder directory these arguments name.
    pub fn dir(&self) -> PathBuf {
        self.encoder.clone().unwrap_or_else(|| crate::paths::models_root().join(DEFAULT_ENCODER))
    }

    /// Loads the encoder, planned for the profile's longest recall text.
    pub fn load(&self) -> anyhow::Result<SentenceEncoder> {
        let dir = self.dir();
        SentenceEncoder::load(&dir, ACTIVE.recall.max_sequence_tokens as usize).with_context(|| {
            format!("cannot load the sentence encoder in {} (`models/fetch` in the nocturne checkout creates the default one)", dir.display())
        })
    }
}

/// Prints one JSON object per text: `{"text", "tokens", "dimension", "ms", "embedding"}`.
/// Texts come from the arguments, else one per line of standard input.
pub fn run(texts: &[String], encoder: &EncoderArgs) -> anyhow::Result<()> {
    let encoder = encoder.load()?;
    let embed = |text: &str| -> anyhow::Result<()> {
        let started = Instant::now();
        let embedding = encoder.embed(text)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let tokens = encoder.tokens(text)?.len();
        let line = serde_json::json!({
            "text": text,
            "tokens": tokens,
            "dimension": embedding.len(),
            "ms": (ms * 1000.0).round() / 1000.0,
            "embedding": embedding,
        });
        println!("{line}");
        Ok(())
    };
    if texts.is_empty() {
        for line in std::io::stdin().lock().lines() {
            embed(&line.context("cannot read standard input")?)?;
        }
    } else {
        for text in texts {
            embed(text)?;
        }
    }
    Ok(())
}
