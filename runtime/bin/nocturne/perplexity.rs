//! `nocturne perplexity`: the pack's perplexity on a text file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use nocturne::profile::ACTIVE;
use nocturne::session::Session;

use crate::args::ModelArgs;

/// Scores at most `max_tokens` tokens of `file`.
pub fn run(file: &PathBuf, max_tokens: usize, model: &ModelArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (pack, tokenizer) = model.open()?;
    let mut ids = tokenizer.encode(&text)?;
    let mut options = model.session_options();
    options.all_logits = true;
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, options)?;
    ids.truncate(max_tokens.min(session.decoder().capacity()));
    if ids.len() < 2 {
        bail!("{} has fewer than two tokens", file.display());
    }
    let ppl = nocturne::session::perplexity(session.decoder(), &ids)?;
    println!(
        "perplexity {ppl:.4} over {} tokens of {} ({})",
        ids.len() - 1,
        file.display(),
        pack.precision().name()
    );
    Ok(())
}
