//! The `nocturne` command: the device runtime's command-line interface.
//!
//! `generate` answers one prompt, `chat` holds a conversation (both record
//! their interactions in the journal), `feedback` records feedback from a
//! script, `journal` reads the journal, `sync` carries it to the host and
//! applies acknowledgements, `info` prints the profile, the pack
//! and the memory plan, `perplexity` scores a text, `bench` measures prefill,
//! decode, start-up and bandwidth, `serve` answers apps over the local API,
//! `recall` shows and searches the recall index, `embed` prints the recall
//! encoder's embeddings.

mod answer_recall;
mod args;
mod bench;
#[cfg(feature = "recall")]
mod bench_recall;
mod chat;
#[cfg(feature = "recall")]
mod embed;
mod generate;
mod info;
mod journal;
mod paths;
mod perplexity;
mod personas;
#[cfg(feature = "recall")]
mod recall;
mod serve;
mod serve_load;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::args::{ModelArgs, RequestArgs};
use crate::journal::{FeedbackArgs, JournalCommand, RecordArgs};

/// Counts heap use, so the memory plan can hold what the tract graphs measure.
#[global_allocator]
static GLOBAL: nocturne::heap::Counting = nocturne::heap::Counting;

#[derive(Parser)]
#[command(name = "nocturne", version, about = "On-device language-model runtime that learns while it sleeps", after_help = "Exit status: 0 when everything asked for was done; 1 when anything was not (an error, a rejected bundle or adapter, damage found by `journal verify`), with the reason on standard error; 2 for a usage error (an unknown or out-of-range option).")]
struct Cli {
    #[command(subcommand)]
    command: Command,
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
        /// Print one JSON object (reply, stop reason, token counts, speeds, interaction id, recalled entries) instead of streaming.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        record: RecordArgs,
        #[command(flatten)]
        recall: answer_recall::RecallArgs,
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
        #[command(flatten)]
        recall: answer_recall::RecallArgs,
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
    /// Serve the local API (OpenAI-compatible chat completions, plus feedback) until SIGTERM.
    Serve(serve::ServeArgs),
    /// Print the recall encoder's embedding of each text as a JSON line (texts from the arguments, else stdin lines).
    /// Recall memory: stat, search, rebuild the index of taught answers.
    #[cfg(feature = "recall")]
    #[command(subcommand)]
    Recall(recall::RecallCommand),
    #[cfg(feature = "recall")]
    Embed {
        /// The texts.
        texts: Vec<String>,
        #[command(flatten)]
        encoder: embed::EncoderArgs,
    },
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Generate { prompt, model, request, raw, json, record, recall } => {
            generate::run(prompt, &model, &request, generate::Output { raw, json }, &record, &recall)
        }
        Command::Chat { model, request, record, recall } => chat::run(&model, &request, &record, &recall),
        Command::Feedback(args) => journal::feedback(&args),
        Command::Sync(command) => sync::run(&command),
        Command::Journal(command) => return journal::run(&command),
        Command::Info { model, plan } => info::run(&model, plan),
        Command::Perplexity { file, tokens, model } => perplexity::run(&file, tokens, &model),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => serve::run(&args),
        #[cfg(feature = "recall")]
        Command::Embed { texts, encoder } => embed::run(&texts, &encoder),
        #[cfg(feature = "recall")]
        Command::Recall(command) => recall::run(&command),
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
