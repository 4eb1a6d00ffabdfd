//! The `nocturne` command: the device runtime's command-line interface.
//!
//! `generate` answers one prompt, `chat` holds a conversation (both record
//! their interactions in the journal), `feedback` records feedback from a
//! script, `journal` reads the journal, `sync` carries it to the host and
//! applies acknowledgements, `info` prints the profile, the pack
//! and the memory plan, `perplexity` scores a text, `bench` measures prefill,
//! decode, start-up and bandwidth.

mod bench;
mod chat;
mod info;
mod journal;
mod sync;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use nocturne::profile::{Precision, ACTIVE};
use nocturne::sampler::SamplerConfig;
use nocturne::session::{RequestOptions, Session, SessionOptions};
use nocturne::tokenizer::{chatml, ChatMessage, Tokenizer, DEFAULT_SYSTEM_PROMPT};
use nocturne::weights::{ModelPack, TOKENIZER_FILE};

use nocturne::device::recorder::peak_rss_bytes;

use crate::journal::{follow_active_adapter, record_interaction, FeedbackArgs, JournalCommand, RecordArgs};

#[derive(Parser)]
#[command(name = "nocturne", version, about = "On-device language-model runtime that learns while it sleeps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which model pack to serve.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model directory; default: models/cache/smollm2-135m-instruct/<precision>.
    #[arg(long, env = "NOCTURNE_MODEL")]
    model: Option<PathBuf>,
    /// Pack precision when --model is not given; default: the profile's.
    #[arg(long, value_parser = ["int8", "fp16"])]
    precision: Option<String>,
    /// Worker threads; default: the profile's, capped by the cores found.
    #[arg(long)]
    threads: Option<usize>,
}

impl ModelArgs {
    fn precision(&self) -> Precision {
        match self.precision.as_deref() {
            Some("fp16") => Precision::Fp16,
            Some(_) => Precision::Int8,
            None => ACTIVE.weight_precision,
        }
    }

    /// The model directory these arguments name.
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(|| {
            PathBuf::from("models/cache/smollm2-135m-instruct").join(self.precision().name())
        })
    }

    /// Opens the pack and its tokenizer.
    pub fn open(&self) -> anyhow::Result<(ModelPack, Tokenizer)> {
        let dir = self.dir();
        if !dir.is_dir() {
            bail!("model directory {} does not exist (run `models/fetch` to create the default one)", dir.display());
        }
        let pack = ModelPack::open(&dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        Ok((pack, tokenizer))
    }

    /// Session options: the profile's, with --threads applied.
    pub fn session_options(&self) -> SessionOptions {
        let mut options = SessionOptions::for_profile(&ACTIVE);
        if let Some(t) = self.threads {
            options.threads = t.max(1);
        }
        options
    }
}

/// Sampling and request limits.
#[derive(Args, Clone)]
pub struct RequestArgs {
    /// Maximum new tokens (capped by the profile's max_new_tokens).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Deadline per request in milliseconds (default: the profile's).
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A string that ends the reply (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// System prompt.
    #[arg(long, default_value = DEFAULT_SYSTEM_PROMPT)]
    system: String,
}

impl RequestArgs {
    /// The request options these arguments describe.
    pub fn options(&self) -> RequestOptions {
        let mut options = RequestOptions::for_profile(&ACTIVE);
        if let Some(n) = self.max_new_tokens {
            options.max_new_tokens = n;
        }
        if let Some(ms) = self.deadline_ms {
            options.deadline = std::time::Duration::from_millis(ms);
        }
        options.stop = self.stop.clone();
        options.sampler = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
        };
        options
    }
}

#[derive(Subcommand)]
enum Command {
    /// Answer one prompt (from the argument or standard input), streaming the reply.
    Generate {
        /// The prompt; read from standard input when absent.
        prompt: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        request: RequestArgs,
        /// Send the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// Print one JSON object (reply, stop reason, token counts, speeds, interaction id) instead of streaming.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        record: RecordArgs,
    },
    /// A multi-turn conversation on standard input, with feedback commands
    /// (/rate 1-5, /good, /bad, /fix ANSWER, /retry, /reset, /exit).
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        request: RequestArgs,
        #[command(flatten)]
        record: RecordArgs,
    },
    /// Record feedback on an interaction (rating, thumbs, correction, implicit signals).
    Feedback(FeedbackArgs),
    /// Read the journal: stat, dump (JSON lines), verify.
    #[command(subcommand)]
    Journal(JournalCommand),
    /// Offline sync: export bundles, import acknowledgements, status, trust the trainer key.
    #[command(subcommand)]
    Sync(sync::SyncCommand),
    /// Print the firmware profile, and with --model or --precision the pack and its memory plan.
    Info {
        #[command(flatten)]
        model: ModelArgs,
        /// Also open the default pack and print its memory plan.
        #[arg(long)]
        plan: bool,
    },
    /// Perplexity of the pack on a text file (no chat template).
    Perplexity {
        /// The text.
        file: PathBuf,
        /// Score at most this many tokens.
        #[arg(long, default_value_t = 2000)]
        tokens: usize,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Benchmark prefill, decode, start-up, peak RSS and weight-streaming bandwidth.
    Bench(bench::BenchArgs),
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

fn generate(prompt: Option<String>, model: &ModelArgs, request: &RequestArgs, raw: bool, json: bool, record: &RecordArgs) -> anyhow::Result<()> {
    let prompt = read_prompt(prompt)?;
    let (pack, tokenizer) = model.open()?;
    let mut recorder = record.recorder()?;
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, model.session_options())?;
    follow_active_adapter(&mut recorder, &mut session, &pack);
    let text = if raw {
        prompt.clone()
    } else {
        chatml(&[ChatMessage::new("system", &request.system), ChatMessage::new("user", prompt.trim_end())], true)
    };
    let ids = tokenizer.encode(&text)?;
    let options = request.options();
    let stats = if json {
        session.generate(&ids, &options, &mut |_| {})?
    } else {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let stats = session.generate(&ids, &options, &mut |t| {
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        let _ = writeln!(out);
        stats
    };
    let system = if raw { "" } else { request.system.as_str() };
    let reply = session.reply_text().into_owned();
    let interaction = record_interaction(&mut recorder, &session, (system, prompt.trim_end(), &reply), &stats);
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
            "adapter": session.decoder().adapter().map(|a| a.id().to_string()),
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
        });
        println!("{value}");
    } else {
        let recorded = interaction.map_or(String::new(), |id| format!("; interaction {id}"));
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

fn perplexity(file: &PathBuf, max_tokens: usize, model: &ModelArgs) -> anyhow::Result<()> {
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

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Generate { prompt, model, request, raw, json, record } => generate(prompt, &model, &request, raw, json, &record),
        Command::Chat { model, request, record } => chat::run(&model, &request, &record),
        Command::Feedback(args) => journal::feedback(&args),
        Command::Sync(command) => sync::run(&command),
        Command::Journal(command) => return journal::run(&command),
        Command::Info { model, plan } => info::run(&model, plan),
        Command::Perplexity { file, tokens, model } => perplexity(&file, tokens, &model),
        Command::Bench(args) => bench::run(&args),
    }
    .map(|()| ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Like other Unix filters, end quietly when the reader of our output goes
    // away (`nocturne journal dump | head`) instead of panicking in println!.
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
