//! `nocturne sync`: export the journal as a signed bundle, import the host's
//! acknowledgements and adapters, show what is not yet synced and which
//! adapter is active, provision the trainer key.

use std::path::PathBuf;

use clap::Subcommand;
use nocturne::device::{StateDir, DEVICE_PUBLIC_FILE};
use nocturne::journal::read_journal;
use nocturne::journal::directory::read_host_ack;
use nocturne::device::adapters::{adapter_bundles, install, installed_manifest, ActiveAdapters, InstallOutcome, Unpublished};
use nocturne::journal::JournalError;
use nocturne::sync::ack::ack_file_name;
use nocturne::sync::{classify, export, import_acks, last_ack, AckOutcome};

use crate::journal::StateArgs;
use crate::args::ModelArgs;

/// Sync subcommands.
#[derive(Subcommand)]
pub enum SyncCommand {
    /// Seal the journal and write every segment the host has not
    /// acknowledged as one signed bundle into DIR (a USB stick, a phone…).
    Export {
        /// Where to write the bundle.
        #[arg(long)]
        to: PathBuf,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Apply the host's acknowledgement found in DIR (acknowledged segments
    /// may then be reclaimed when the journal's quota needs space), and
    /// install the adapter bundles found there (verified, self-tested,
    /// rolled back on failure; running sessions switch at their next request).
    Import {
        /// Where the host's files were copied.
        #[arg(long)]
        from: PathBuf,
        /// Also install adapters the trainer's gate did not publish.
        #[arg(long)]
        allow_unpublished: bool,
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Unsynced bytes and records, the last acknowledgement, the keys.
    Status {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Provision the trainer's public key (the host store's trainer.pub).
    Trust {
        /// The trainer's public key file.
        trainer_pub: PathBuf,
        #[command(flatten)]
        state: StateArgs,
    },
}

/// Runs a sync subcommand.
pub fn run(command: &SyncCommand) -> anyhow::Result<()> {
    match command {
        SyncCommand::Export { to, state } => {
            let mut journal = state.open_journal()?;
            let outcome = export(&state.state(), &mut journal, to)?;
            journal.close()?;
            if outcome.new {
                println!("wrote {}", outcome.bundle.display());
            } else {
                println!("{} is up to date: nothing new to export", outcome.bundle.display());
            }
            if !outcome.lost.is_empty() {
                for l in &outcome.lost {
                    eprintln!("error: segment(s) {}-{} cannot be exported intact ({}); the bundle declares them lost", l.first, l.last, l.reason);
                }
                anyhow::bail!("{} range(s) of segments were not exported (the host will acknowledge past them)", outcome.lost.len());
            }
        }
        SyncCommand::Import { from, state, model, allow_unpublished } => {
            // A running chat or server holds the journal: adapters are still
            // installed (their events queued for that process to journal), but
            // acknowledgements wait for the next import.
            let mut journal = match state.open_journal() {
                Ok(journal) => Some(journal),
                Err(e) if matches!(e.downcast_ref::<JournalError>(), Some(JournalError::Locked(_))) => {
                    eprintln!("note: the journal is in use by another process; adapter events are queued for it");
                    None
                }
                Err(e) => return Err(e),
            };
            let device = state.state().device_id_or_create()?;
            let ack_waiting = journal.is_none() && from.join(ack_file_name(device)).exists();
            let outcome = match journal.as_mut() {
                Some(journal) => import_acks(&state.state(), journal, from)?,
                None => None,
            };
            let bundles = adapter_bundles(from)?;
            let unpublished = if *allow_unpublished { Unpublished::Allow } else { Unpublished::Refuse };
            let mut not_installed = 0;
            if !bundles.is_empty() {
                let (pack, _) = model.open()?;
                for bundle in bundles {
                    match install(&state.state(), &pack, &bundle, journal.as_mut(), unpublished) {
                        Ok(InstallOutcome::Installed { adapter, previous }) => {
                            println!("adapter {adapter} installed and active (previous: {})", previous.map_or("none".into(), |p| p.to_string()))
                        }
                        Ok(InstallOutcome::AlreadyActive(adapter)) => println!("adapter {adapter} is already active"),
                        Ok(InstallOutcome::RolledBack { adapter, reason }) => {
                            not_installed += 1;
                            eprintln!("error: adapter {adapter} failed its self-test and was rolled back: {reason}")
                        }
                        Err(e) => {
                            not_installed += 1;
                            eprintln!("error: {e}")
                        }
                    }
                }
            }
            if let Some(journal) = journal {
                journal.close()?;
            }
            match outcome {
                None if ack_waiting => {
                    not_installed += 1;
                    eprintln!("error: the acknowledgement in {} was not applied: the journal is in use; import again when it is free", from.display())
                }
                None => println!("no acknowledgement for this device in {}", from.display()),
                Some(AckOutcome::Applied(ack)) => {
                    println!("acknowledgement {} applied: the host holds segments 1-{}", ack.counter, ack.held_through)
                }
                Some(AckOutcome::Stale(ack)) => {
                    println!("acknowledgement {} was applied before (or is older): nothing changed", ack.counter)
                }
            }
            if not_installed > 0 {
                anyhow::bail!("{not_installed} item(s) in {} not imported (see above)", from.display());
            }
        }
        SyncCommand::Status { state } => status(&state.state())?,
        SyncCommand::Trust { trainer_pub, state } => {
            let key = state.state().trust_trainer(trainer_pub)?;
            println!("trainer key {} provisioned", nocturne::digest::hex(key.as_bytes()));
        }
    }
    Ok(())
}

fn status(state: &StateDir) -> anyhow::Result<()> {
    let device = state.device_id_or_create()?;
    println!("device             {device} (public key: {})", state.root().join(DEVICE_PUBLIC_FILE).display());
    match state.trainer_key() {
        Ok(key) => println!("trainer key        {}", nocturne::digest::hex(key.as_bytes())),
        Err(_) => println!("trainer key        not provisioned (nocturne sync trust TRAINER_PUB)"),
    }
    let dir = state.journal_dir();
    let acked = if dir.exists() { read_host_ack(&dir)? } else { 0 };
    let (mut records, mut bytes, mut lost) = (0u64, 0u64, Vec::new());
    if dir.exists() {
        let report = read_journal(&dir, Some(device), &mut |_| {})?;
        for s in report.segments.iter().filter(|s| s.seq > acked) {
            records += s.records;
            bytes += s.bytes;
        }
        // Sealed segments (all but the newest) that the next export could not send intact.
        let newest = report.segments.last().map_or(0, |s| s.seq);
        if newest > acked + 1 {
            lost = classify(&report.segments, acked, newest - 1).lost;
        }
    }
    println!("not yet synced     {records} records, {bytes} bytes (segments after {acked})");
    match last_ack(state)? {
        Some(ack) => println!(
            "last acknowledgement {} ({} ms since the epoch): host holds segments 1-{}",
            ack.counter, ack.created_ms, ack.held_through
        ),
        None => println!("last acknowledgement none"),
    }
    let adapters = ActiveAdapters::read(state)?;
    let describe = |id: Option<nocturne::ids::AdapterId>| match (id, state.trainer_key()) {
        (None, _) => "none (base model only)".to_string(),
        (Some(id), Ok(key)) => match installed_manifest(state, id, &key) {
            Ok(m) => format!("{id} (rank {}, alpha {}, targets {})", m.rank, m.alpha, m.targets.join(",")),
            Err(e) => format!("{id} (unreadable: {e})"),
        },
        (Some(id), Err(_)) => id.to_string(),
    };
    println!("active adapter     {}", describe(adapters.active));
    println!("previous adapter   {}", describe(adapters.previous));
    for l in &lost {
        println!("cannot export      segments {}-{}: {}", l.first, l.last, l.reason);
    }
    if !lost.is_empty() {
        anyhow::bail!("{} range(s) of segments cannot be exported intact; `nocturne sync export` declares them lost to the host", lost.len());
    }
    Ok(())
}
