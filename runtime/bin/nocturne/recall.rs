//! `nocturne recall`: the recall index of the state directory: `stat`,
//! `search TEXT`, `rebuild`.

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
    /// Rebuild the index from the journal alone and replace the file atomically.
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
        RecallCommand::Rebuild { state, encoder } => {
            let (memory, report) = RecallMemory::rebuild(&state.state(), encoder.load()?, &ACTIVE.recall)?;
            describe(&report);
            println!("recall index rebuilt: {} entries, journal read up to LSN {}", memory.index().entries().len(), memory.index().last_lsn());
        }
    }
    Ok(())
}
