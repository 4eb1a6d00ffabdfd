//! The `nocturne` command: the device runtime's command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nocturne::profile::{self, Durability, Profile};
use nocturne::weights::ModelPack;

#[derive(Parser)]
#[command(name = "nocturne", version, about = "On-device language-model runtime that learns while it sleeps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the firmware profile this binary was built with and, with
    /// --model, the model pack it would serve.
    Info {
        /// A converted model directory (config.json, tokenizer.json, model.safetensors).
        #[arg(long)]
        model: Option<PathBuf>,
    },
}

fn print_profile(p: &Profile) {
    println!("profile            {} ({})", p.name, p.target_class);
    println!(
        "threads            {} of {} allowed ({} cores found)",
        profile::worker_threads(p),
        p.threads,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("memory budget      {} bytes ({:.1} MiB)", p.memory_budget_bytes, p.memory_budget_bytes as f64 / 1048576.0);
    println!("weight precision   {}", p.weight_precision.name());
    println!("context            {} tokens, at most {} new per reply", p.max_context_tokens, p.max_new_tokens);
    println!("deadline           {} ms per request", p.deadline_ms);
    println!(
        "sizing model       {} layers, {} KV heads x {} ({} KV bytes per token)",
        p.sizing.layers,
        p.sizing.kv_heads,
        p.sizing.head_dim,
        p.kv_bytes_per_token()
    );
    let durability = match p.journal.durability {
        Durability::FsyncEachRecord => "fsync each record".to_string(),
        Durability::GroupCommit => format!("group commit every {} ms", p.journal.group_commit_ms),
    };
    println!(
        "journal            {durability}; segments of {} bytes, quota {} bytes",
        p.journal.segment_bytes, p.journal.disk_quota_bytes
    );
    println!("recall memory      {}", if p.parts.recall { "compiled in" } else { "not compiled in" });
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { model } => {
            print_profile(&profile::ACTIVE);
            if let Some(dir) = model {
                let started = std::time::Instant::now();
                let pack = ModelPack::open(&dir)?;
                let opened = started.elapsed();
                let c = pack.config();
                println!("model              {}", dir.display());
                println!(
                    "architecture       {} layers, hidden {}, {} heads / {} KV heads of {}, MLP {}, vocab {}",
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    c.intermediate_size,
                    c.vocab_size
                );
                println!("mapped weights     {} bytes ({}), file-backed", pack.mapped_bytes(), pack.precision().name());
                println!("opened and validated in {:.2} ms", opened.as_secs_f64() * 1e3);
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
