//! `nocturne generate`: one prompt, streamed (or one JSON object), recorded
//! in the journal.

use std::io::Read;

use anyhow::{bail, Context};
use nocturne::device::recorder::{peak_rss_bytes, Texts};
use nocturne::profile::ACTIVE;
use nocturne::session::Session;
use nocturne::tokenizer::ChatMessage;

use crate::answer_recall::{Recall, RecallArgs};
use crate::args::{ModelArgs, RequestArgs};
use crate::journal::{follow_active_adapter, record_interaction, RecordArgs};

/// What `generate` prints.
pub struct Output {
    /// Send the prompt as is, without the chat template.
    pub raw: bool,
    /// One JSON object instead of streaming.
    pub json: bool,
}

fn read_prompt(prompt: Option<String>) -> anyhow::Result<String> {
    let text = match prompt {
        Some(p) => p,
        None => {
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes).context("cannot read the prompt from standard input")?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!("standard input is not valid UTF-8 (invalid byte at offset {})", e.utf8_error().valid_up_to())
            })?
        }
    };
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    Ok(text)
}

/// Answers `prompt` (standard input when `None`); a raw prompt gets no recall.
pub fn run(
    prompt: Option<String>,
    model: &ModelArgs,
    request: &RequestArgs,
    Output { raw, json }: Output,
    record: &RecordArgs,
    recall: &RecallArgs,
) -> anyhow::Result<()> {
    let prompt = read_prompt(prompt)?;
    let state = record.state.state();
    let system = request.system_prompt(state.root())?;
    let (pack, tokenizer) = model.open()?;
    let mut recorder = record.recorder()?;
    // Recall memory (the encoder graph, the index) opens while the session plans and allocates.
    let no_recall = RecallArgs { no_recall: recall.no_recall || raw, ..recall.clone() };
    let (recall, mut session) =
        Recall::open_beside(&no_recall, &state, || Session::start(&pack, &tokenizer, &ACTIVE, model.session_options()), |s| s.memory_plan().total())?;
    // Recall followed the active adapter when it opened.
    follow_active_adapter(&mut recorder, &mut session, &pack);
    let recalled = recall.prompt(&[ChatMessage::new("system", &system), ChatMessage::new("user", prompt.trim_end())], &tokenizer);
    session.apply_adapter(recalled.adapter_applies);
    let ids = if raw {
        tokenizer.encode(&prompt)?
    } else {
        recalled.encode(&tokenizer)?
    };
    let options = request.options();
    let stats = if json {
        session.generate(&ids, &options, &mut |_| {})?
    } else {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(recalled.reply_prefix.as_bytes());
        let stats = session.generate(&ids, &options, &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        stats
    };
    let system = if raw { "" } else { system.as_str() };
    let reply = format!("{}{}", recalled.reply_prefix, session.reply_text());
    let interactions = recalled.interactions();
    let texts = Texts { system, prompt: prompt.trim_end(), reply: &reply, persona: request.persona().filter(|_| !raw), recalled: &interactions };
    let interaction = record_interaction(&mut recorder, &session, &texts, &stats);
    // The id is only given out once the interaction is stored.
    let interaction = match interaction.map(|lsn| recorder.wait(lsn).map(|()| lsn)) {
        Some(Err(e)) => {
            eprintln!("warning: the interaction was not recorded: {e:#}");
            None
        }
        Some(Ok(lsn)) => Some(lsn),
        None => None,
    };
    recorder.close()?;
    if json {
        let value = serde_json::json!({
            "reply": reply,
            "adapter": session.decoder().applied_adapter().map(|a| a.id().to_string()),
            "stop_reason": stats.stop_reason.name(),
            "prompt_tokens": stats.prompt_tokens,
            "new_tokens": stats.new_tokens,
            "prefill_tokens_per_s": stats.prefill_tokens_per_second(),
            "decode_tokens_per_s": stats.decode_tokens_per_second(),
            "time_to_first_token_ms": stats.time_to_first_token.as_secs_f64() * 1e3,
            "model": model.dir(),
            "precision": pack.precision().name(),
            "threads": session.decoder().threads(),
            "peak_rss_bytes": peak_rss_bytes(),
            "interaction": interaction,
            "recalled": recalled.json(),
        });
        println!("{value}");
    } else {
        let recorded = interaction.map_or(String::new(), |id| format!("; interaction {id}"));
        let recorded = match recalled.interactions().as_slice() {
            [] => recorded,
            ids => format!("{recorded}; recalled taught answers of interactions {ids:?}"),
        };
        eprintln!(
            "[{}; {} prompt + {} new tokens; prefill {:.1} tok/s, decode {:.1} tok/s, first token after {:.0} ms; peak RSS {} bytes{recorded}]",
            stats.stop_reason.name(),
            stats.prompt_tokens,
            stats.new_tokens,
            stats.prefill_tokens_per_second(),
            stats.decode_tokens_per_second(),
            stats.time_to_first_token.as_secs_f64() * 1e3,
            peak_rss_bytes()
        );
    }
    Ok(())
}
