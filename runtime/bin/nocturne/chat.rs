//! `nocturne chat`: a multi-turn conversation with the ChatML template,
//! every reply recorded in the journal, and feedback commands after a reply:
//! `/rate 1-5`, `/good`, `/bad`, `/fix <the answer you wanted>`, `/retry`
//! (a new reply, sampled; the old one gets implicit negative feedback).
//! Implicit signals are recorded too: a next message is a follow-up (with the
//! seconds since the reply), `/reset` after a reply that got no feedback is
//! abandonment. A retried reply's interaction has the turn of the one it replaces.
//! Older turns drop out when the context fills, and the user is told.
//! Recall memory is consulted before each reply (what it recalled is shown
//! on stderr), and `/fix` puts the correction into it at once.

use std::borrow::Cow;
use std::io::{BufRead, Write};
use std::time::Instant;

use nocturne::journal::{Feedback, ImplicitSignals, Thumbs};
use nocturne::profile::ACTIVE;
use nocturne::session::{RequestOptions, Session};
use nocturne::tokenizer::{ChatMessage, Tokenizer};

use nocturne::device::recorder::{Recorder, Texts};

use crate::journal::{follow_active_adapter, record_interaction, RecordArgs};
use crate::answer_recall::{Recall, RecallArgs};
use crate::args::{ModelArgs, RequestArgs};

const HELP: &str = "/rate 1-5, /good, /bad, /fix <answer>, /retry rate the last reply; /reset clears the conversation, /help shows this, /exit leaves.";

/// Lowest temperature of a `/retry`: greedy decoding would give the same reply again.
const RETRY_TEMPERATURE: f32 = 0.7;

/// The last reply, while feedback on it can still be given.
struct LastReply {
    interaction: Option<u64>,
    at: Instant,
    /// Feedback (explicit or implicit) was recorded for it.
    answered: bool,
}

/// What a line of input asks for.
enum Input<'a> {
    Message(&'a str),
    Feedback(Feedback<'static>, String),
    Retry,
    Reset,
    Exit,
    Help,
    Invalid(String),
}

fn parse(line: &str) -> Input<'_> {
    let (command, rest) = line.split_once(' ').map_or((line, ""), |(c, r)| (c, r.trim()));
    let feedback = |f: Feedback<'static>, said: &str| Input::Feedback(f, said.to_string());
    match command {
        "/exit" | "/quit" => Input::Exit,
        "/help" | "/?" => Input::Help,
        "/reset" => Input::Reset,
        "/retry" => Input::Retry,
        "/good" => feedback(Feedback { thumbs: Some(Thumbs::Up), ..Feedback::default() }, "thumbs up"),
        "/bad" => feedback(Feedback { thumbs: Some(Thumbs::Down), ..Feedback::default() }, "thumbs down"),
        "/rate" => match rest.parse::<u8>() {
            Ok(r @ 1..=5) => feedback(Feedback { rating: Some(r), ..Feedback::default() }, &format!("rated {r}")),
            _ => Input::Invalid(format!("/rate takes a number from 1 to 5, not `{rest}`")),
        },
        "/fix" if rest.is_empty() => Input::Invalid("/fix takes the answer you wanted: /fix <answer>".into()),
        "/fix" => feedback(Feedback { correction: Some(Cow::Owned(rest.to_string())), ..Feedback::default() }, "correction"),
        c if c.starts_with('/') => Input::Invalid(format!("unknown command {c}; {HELP}")),
        _ => Input::Message(line),
    }
}

struct Chat<'a> {
    session: Session<'a>,
    tokenizer: &'a Tokenizer,
    pack: &'a nocturne::weights::ModelPack,
    options: RequestOptions,
    messages: Vec<ChatMessage>,
    recorder: Recorder,
    last: Option<LastReply>,
    retries: u64,
    /// The persona that gave the system prompt, journaled with each interaction.
    persona: Option<String>,
    recall: Recall,
}

impl Chat<'_> {
    /// Records implicit feedback on the last reply.
    fn implicit(&mut self, signals: ImplicitSignals) {
        let Some(last) = self.last.as_mut() else {
            return;
        };
        last.answered = true;
        if let Some(interaction) = last.interaction {
            if let Err(e) = self.recorder.feedback(Feedback { interaction, implicit: signals, ..Feedback::default() }) {
                eprintln!("warning: feedback not recorded: {e:#}");
            }
        }
    }

    /// Answers the conversation's last user message.
    fn reply(&mut self, options: &RequestOptions) -> anyhow::Result<()> {
        if follow_active_adapter(&mut self.recorder, &mut self.session, self.pack) {
            self.recall.follow_active_adapter();
        }
        // Leave room for a full reply; drop the oldest exchanges until it fits.
        let capacity = self.session.decoder().capacity();
        let room = options.max_new_tokens.min(ACTIVE.max_new_tokens as usize);
        let mut dropped = 0;
        let (ids, recalled) = loop {
            let recalled = self.recall.prompt(&self.messages, self.tokenizer);
            let ids = recalled.encode(self.tokenizer)?;
            if ids.len() + room <= capacity || self.messages.len() <= 2 {
                break (ids, recalled);
            }
            self.messages.drain(1..3.min(self.messages.len() - 1));
            dropped += 1;
        };
        if dropped > 0 {
            eprintln!("(context full: the {dropped} oldest exchange(s) no longer fit and were dropped)");
        }
        self.session.apply_adapter(recalled.adapter_applies);
        for entry in &recalled.entries {
            eprintln!("(recalled, similarity {:.2}: {:?} → {:?})", entry.score, entry.text, entry.answer);
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(recalled.reply_prefix.as_bytes());
        let result = self.session.generate(&ids, options, &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        });
        let _ = writeln!(out);
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                self.messages.pop();
                return Err(e.into());
            }
        };
        let reply = format!("{}{}", recalled.reply_prefix, self.session.reply_text());
        let system = &self.messages[0].content;
        let prompt = &self.messages[self.messages.len() - 1].content;
        let interactions = recalled.interactions();
        let texts = Texts { system, prompt, reply: &reply, persona: self.persona.as_deref(), recalled: &interactions };
        let interaction = record_interaction(&mut self.recorder, &self.session, &texts, &stats);
        self.messages.push(ChatMessage::new("assistant", &reply));
        let recorded = interaction.map_or(String::new(), |id| format!("; interaction {id}"));
        eprintln!("[{}; {} new tokens, {:.1} tok/s{recorded}]", stats.stop_reason.name(), stats.new_tokens, stats.decode_tokens_per_second());
        self.last = Some(LastReply { interaction, at: Instant::now(), answered: false });
        Ok(())
    }

    fn handle(&mut self, input: Input<'_>) -> anyhow::Result<bool> {
        match input {
            Input::Exit => return Ok(false),
            Input::Invalid(message) => eprintln!("{message}"),
            Input::Help => eprintln!("{HELP}"),
            Input::Reset => {
                if self.last.as_ref().is_some_and(|l| !l.answered) {
                    self.implicit(ImplicitSignals { abandoned: true, ..ImplicitSignals::default() });
                }
                self.messages.truncate(1);
                self.session.reset();
                self.recorder.new_conversation();
                self.last = None;
                eprintln!("(conversation cleared)");
            }
            Input::Feedback(mut feedback, said) => match self.last.as_mut().and_then(|l| l.interaction.map(|i| (l, i))) {
                None => eprintln!("(no recorded reply to give feedback on yet)"),
                Some((last, interaction)) => {
                    last.answered = true;
                    feedback.interaction = interaction;
                    let correction = feedback.correction.clone();
                    match self.recorder.feedback(feedback) {
                        Ok(lsn) => {
                            eprintln!("({said} recorded for interaction {interaction} as record {lsn})");
                            // The question is the user message before the last reply.
                            let question = self.messages.iter().rev().find(|m| m.role == "user").map(|m| m.content.clone());
                            if let (Some(answer), Some(question)) = (correction, question) {
                                self.recall.teach(interaction, lsn, &question, &answer);
                            }
                        }
                        Err(e) => eprintln!("error: feedback not recorded: {e:#}"),
                    }
                }
            },
            Input::Retry => {
                if self.last.is_none() {
                    eprintln!("(nothing to retry yet)");
                    return Ok(true);
                }
                self.implicit(ImplicitSignals { regenerated: true, ..ImplicitSignals::default() });
                self.messages.pop();
                self.recorder.replace_last_turn();
                self.retries += 1;
                let mut options = self.options.clone();
                options.sampler.temperature = options.sampler.temperature.max(RETRY_TEMPERATURE);
                options.sampler.seed = options.sampler.seed.wrapping_add(self.retries);
                if let Err(e) = self.reply(&options) {
                    eprintln!("error: {e:#}");
                }
            }
            Input::Message(text) => {
                let seconds = self.last.as_ref().map(|l| l.at.elapsed().as_secs());
                if let Some(s) = seconds {
                    let follow_up_s = Some(u32::try_from(s).unwrap_or(u32::MAX));
                    self.implicit(ImplicitSignals { follow_up_s, ..ImplicitSignals::default() });
                }
                self.messages.push(ChatMessage::new("user", text));
                let options = self.options.clone();
                if let Err(e) = self.reply(&options) {
                    eprintln!("error: {e:#}");
                }
            }
        }
        Ok(true)
    }
}

/// Runs the conversation until end of input or `/exit`.
pub fn run(model: &ModelArgs, request: &RequestArgs, record: &RecordArgs, recall: &RecallArgs) -> anyhow::Result<()> {
    let (pack, tokenizer) = model.open()?;
    let state = record.state.state();
    let (recall, session) =
        Recall::open_beside(recall, &state, || Session::start(&pack, &tokenizer, &ACTIVE, model.session_options()), |s| s.memory_plan().total())?;
    let recorder = record.recorder()?;
    let mut chat = Chat {
        session,
        tokenizer: &tokenizer,
        pack: &pack,
        options: request.options(),
        messages: vec![ChatMessage::new("system", &request.system_prompt(record.state.state().root())?)],
        recorder,
        last: None,
        retries: 0,
        persona: request.persona().map(str::to_string),
        recall,
    };
    eprintln!(
        "nocturne chat ({}, {} context tokens). {HELP}",
        pack.precision().name(),
        chat.session.decoder().capacity()
    );
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        if !chat.handle(parse(input))? {
            break;
        }
    }
    Ok(chat.recorder.close()?)
}
