//! `nocturne chat`: a multi-turn conversation with the ChatML template.
//! Older turns drop out when the context fills, and the user is told.

use std::io::{BufRead, Write};

use nocturne::profile::ACTIVE;
use nocturne::session::Session;
use nocturne::tokenizer::{chatml, ChatMessage};

use crate::{ModelArgs, RequestArgs};

/// Runs the conversation until end of input or `/exit`.
pub fn run(model: &ModelArgs, request: &RequestArgs) -> anyhow::Result<()> {
    let (pack, tokenizer) = model.open()?;
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, model.session_options())?;
    let options = request.options();
    let capacity = session.decoder().capacity();
    let mut messages = vec![ChatMessage::new("system", &request.system)];
    eprintln!("nocturne chat ({}, {} context tokens). /reset clears the conversation, /exit leaves.", pack.precision().name(), capacity);
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.truncate(1);
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", input));
        // Leave room for a full reply; drop the oldest exchanges until it fits.
        let room = options.max_new_tokens.min(ACTIVE.max_new_tokens as usize);
        let mut dropped = 0;
        let ids = loop {
            let ids = tokenizer.encode(&chatml(&messages, true))?;
            if ids.len() + room <= capacity || messages.len() <= 2 {
                break ids;
            }
            messages.drain(1..3.min(messages.len() - 1));
            dropped += 1;
        };
        if dropped > 0 {
            eprintln!("(context full: the {dropped} oldest exchange(s) no longer fit and were dropped)");
        }
        let mut out = std::io::stdout().lock();
        let result = session.generate(&ids, &options, &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        });
        let _ = writeln!(out);
        match result {
            Ok(stats) => {
                messages.push(ChatMessage::new("assistant", &session.reply_text()));
                eprintln!("[{}; {} new tokens, {:.1} tok/s]", stats.stop_reason.name(), stats.new_tokens, stats.decode_tokens_per_second());
            }
            Err(e) => {
                messages.pop();
                eprintln!("error: {e}");
            }
        }
    }
    Ok(())
}
