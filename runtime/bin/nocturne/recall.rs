//! `nocturne recall`: the recall index of the state directory: `stat`,
//! `search TEXT`, `rebuild`, and documents: `add FILE...`, `remove SOURCE`.

use anyhow::Context;
use clap::Subcommand;
use nocturne::device::recall::{OpenReport, RecallMemory, RECALL_INDEX_FILE};
use nocturne::profile::ACTIVE;
use nocturne::recall::index::Origin;

use crate::embed::EncoderArgs;
use crate::journal::StateArgs;

/// `nocturne recall ...`
#[derive(Subcommand)]
pub enum RecallCommand {
    /// Entries, capacity, precision, memory and the eviction rule of the index.
    Stat {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        encoder: EncoderArgs,
    },
    /// The entries closest to TEXT, best first, with their similarity.
    Search {
        /// The question.
        text: String,
        /// At most this many entries.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        encoder: EncoderArgs,
    },
    /// Index text files (UTF-8) as documents: each is cut into passages of
    /// the encoder's window (the profile's `recall.max_sequence_tokens`),
    /// consecutive ones overlapping by a quarter, and recalled like taught
    /// answers. Adding a file again replaces its passages.
    Add {
        /// The files; each is named in the index as given here.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        encoder: EncoderArgs,
    },
    /// Remove the passages of a document, named as it was added.
    Remove {
        /// The document, as `recall add` was given it (`recall stat` lists them).
        source: String,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        encoder: EncoderArgs,
    },
    /// Rebuild the taught answers from the journal and replace the file
    /// atomically (documents are not journaled: their passages are kept).
    Rebuild {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        encoder: EncoderArgs,
    },
}

/// Opens the recall memory of `state`, saying on stderr what opening did.
fn open(state: &StateArgs, encoder: &EncoderArgs) -> anyhow::Result<RecallMemory> {
    let (mut memory, report) = RecallMemory::open(&state.state(), encoder.load()?, &ACTIVE.recall)?;
    describe(&report);
    if let Err(e) = memory.follow_active_adapter(&state.state()) {
        eprintln!("warning: cannot tell what the active adapter learned: {e:#}");
    }
    Ok(memory)
}

/// Says on stderr what opening recall memory found and did.
pub fn describe(report: &OpenReport) {
    if let Some(why) = &report.rebuilt {
        eprintln!("recall: the index was rebuilt ({why})");
    }
    if let Some(lost) = report.unrecovered.filter(|&n| n > 0) {
        eprintln!("recall: {lost} entries of the damaged index are no longer in the journal and could not be recovered");
    }
    if report.added > 0 {
        eprintln!("recall: {} taught answers added from the journal", report.added);
    }
    if report.orphaned > 0 {
        eprintln!("recall: {} corrections name an interaction the journal does not hold; skipped", report.orphaned);
    }
    if report.evicted > 0 {
        eprintln!("recall: {} entries evicted (index full)", report.evicted);
    }
}

/// Runs a `recall` subcommand.
pub fn run(command: &RecallCommand) -> anyhow::Result<()> {
    match command {
        RecallCommand::Stat { state, encoder } => {
            let memory = open(state, encoder)?;
            let index = memory.index();
            let taught = index.entries().iter().filter(|e| matches!(e.origin, Origin::Taught { .. })).count();
            let learned = index.entries().iter().filter(|e| e.learned_by.is_some()).count();
            println!("file: {}", state.state().root().join(RECALL_INDEX_FILE).display());
            println!("entries: {} of {} ({taught} taught, {} passages; {learned} learned by an installed adapter)", index.entries().len(), index.capacity(), index.entries().len() - taught);
            println!("embeddings: {} dims, {:?}, {} bytes planned", index.dimension(), index.precision(), index.embedding_bytes());
            let graph = memory.encoder().graph();
            println!("encoder graph: {} bytes kept, {} bytes peak per run at {} tokens", graph.weight_bytes(), graph.run_peak_bytes(), graph.max_sequence());
            println!("journal read up to LSN {}", index.last_lsn());
            let mut sources = std::collections::BTreeMap::<&str, usize>::new();
            for entry in index.entries() {
                if let Origin::Passage { source, .. } = &entry.origin {
                    *sources.entry(source).or_default() += 1;
                }
            }
            for (source, passages) in sources {
                println!("document {source}: {passages} passages");
            }
            println!("when full: the oldest entry an installed adapter has learned goes first, then the oldest entry");
        }
        RecallCommand::Search { text, top_k, state, encoder } => {
            let memory = open(state, encoder)?;
            for (entry, score) in memory.search(text, *top_k, -1.0)? {
                let origin = match &entry.origin {
                    Origin::Taught { interaction, .. } => format!("interaction {interaction}"),
                    Origin::Passage { source, number } => format!("{source} #{number}"),
                };
                let line = serde_json::json!({"score": score, "origin": origin, "text": entry.text, "answer": entry.answer, "learned": entry.learned_by.is_some()});
                println!("{line}");
            }
        }
        RecallCommand::Add { files, state, encoder } => {
            let mut memory = open(state, encoder)?;
            for file in files {
                let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
                let text = String::from_utf8(bytes).map_err(|e| {
                    anyhow::anyhow!("{} is not UTF-8 text (invalid byte at offset {})", file.display(), e.utf8_error().valid_up_to())
                })?;
                let source = file.to_string_lossy();
                let (added, evicted) = memory.add_document(&source, &text)?;
                let evicted = if evicted > 0 { format!("; {evicted} older entries evicted (index full)") } else { String::new() };
                println!("{source}: {added} passages{evicted}");
            }
        }
        RecallCommand::Remove { source, state, encoder } => {
            let removed = open(state, encoder)?.remove_document(source)?;
            if removed == 0 {
                anyhow::bail!("no document `{source}` in the recall index (`nocturne recall stat` lists them)");
            }
            println!("{source}: {removed} passages removed");
        }
        RecallCommand::Rebuild { state, encoder } => {
            let (memory, report) = RecallMemory::rebuild(&state.state(), encoder.load()?, &ACTIVE.recall)?;
            describe(&report);
            println!("recall index rebuilt: {} entries, journal read up to LSN {}", memory.index().entries().len(), memory.index().last_lsn());
        }
    }
    Ok(())
}
