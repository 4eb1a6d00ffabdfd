//! The journal on the command line: where it lives (`--state-dir`), how
//! `generate` and `chat` record into it, `nocturne feedback`, and
//! `nocturne journal stat|dump|verify`.

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use nocturne::device::StateDir;
use nocturne::journal::record::kind_name;
use nocturne::journal::directory::read_host_ack;
use nocturne::journal::{
    read_journal, Body, Feedback, ImplicitSignals, Journal, JournalConfig, JournalReport, Thumbs,
};
use nocturne::profile::ACTIVE;
use nocturne::device::recorder::{Recorder, Texts};
use nocturne::session::{ReplyStats, Session};
use nocturne::weights::ModelPack;

/// Where the device keeps its state.
#[derive(Args, Clone)]
pub struct StateArgs {
    /// The device's state directory (device id, journal); default: $XDG_STATE_HOME/nocturne (~/.local/state/nocturne).
    #[arg(long, env = "NOCTURNE_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

impl StateArgs {
    /// The state directory.
    pub fn state(&self) -> StateDir {
        StateDir::new(self.state_dir.clone().unwrap_or_else(crate::paths::default_state_dir))
    }

    /// Opens the device's journal for appending, saying on stderr what
    /// recovery repaired or skipped.
    pub fn open_journal(&self) -> anyhow::Result<Journal> {
        let journal = self.state().open_journal(JournalConfig::for_profile(&ACTIVE))?;
        for note in journal.recovery().notes() {
            eprintln!("journal: {note}");
        }
        Ok(journal)
    }
}

/// Journaling options of `generate` and `chat`.
#[derive(Args, Clone)]
pub struct RecordArgs {
    #[command(flatten)]
    pub state: StateArgs,
    /// Do not record interactions or feedback.
    #[arg(long)]
    pub no_journal: bool,
}

impl RecordArgs {
    /// The recorder of a new conversation (recording nothing with `--no-journal`).
    pub fn recorder(&self) -> anyhow::Result<Recorder> {
        let journal = if self.no_journal { None } else { Some(self.state.open_journal()?) };
        Ok(Recorder::new(self.state.state(), journal)?)
    }
}

/// Puts `session` on the device's active adapter, saying on stderr when it
/// switched or could not; returns whether it switched.
pub fn follow_active_adapter(recorder: &mut Recorder, session: &mut Session<'_>, pack: &ModelPack) -> bool {
    match recorder.follow_active_adapter(session, pack) {
        Ok(Some(adapter)) => {
            if let Some(adapter) = adapter {
                eprintln!("(adapter {} active)", adapter.id());
            }
            true
        }
        Ok(None) => false,
        Err(e) => {
            eprintln!("warning: adapter not switched: {e}");
            false
        }
    }
}

/// Queues the interaction of the reply `session` just gave; returns its id,
/// or `None` (with a warning on stderr) when it was not recorded.
pub fn record_interaction(recorder: &mut Recorder, session: &Session<'_>, texts: &Texts<'_>, stats: &ReplyStats) -> Option<u64> {
    recorder.interaction(session, texts, stats).unwrap_or_else(|e| {
        eprintln!("warning: the interaction was not recorded: {e}");
        None
    })
}

/// `nocturne feedback`: feedback on an interaction, from a script.
#[derive(Args)]
pub struct FeedbackArgs {
    /// The interaction (its id as `generate --json` or `chat` printed it).
    #[arg(long)]
    interaction: u64,
    /// Rating from 1 (worst) to 5 (best).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
    rating: Option<u8>,
    /// Thumbs up.
    #[arg(long, conflicts_with = "bad")]
    good: bool,
    /// Thumbs down.
    #[arg(long)]
    bad: bool,
    /// The reply the user wanted.
    #[arg(long)]
    fix: Option<String>,
    /// The user asked for another reply.
    #[arg(long)]
    regenerated: bool,
    /// The user copied the reply.
    #[arg(long)]
    copied: bool,
    /// The user edited the reply.
    #[arg(long)]
    edited: bool,
    /// The user left right after the reply.
    #[arg(long)]
    abandoned: bool,
    /// The user continued the conversation this many seconds after the reply.
    #[arg(long)]
    follow_up_s: Option<u32>,
    #[command(flatten)]
    state: StateArgs,
}

/// Records one piece of feedback and prints its LSN once acknowledged.
pub fn feedback(args: &FeedbackArgs) -> anyhow::Result<()> {
    let mut journal = args.state.open_journal()?;
    if args.interaction == 0 || args.interaction >= journal.next_lsn() {
        bail!(
            "no interaction {} in the journal (its records are numbered 1 to {})",
            args.interaction,
            journal.next_lsn() - 1
        );
    }
    let feedback = Feedback {
        interaction: args.interaction,
        rating: args.rating,
        thumbs: if args.good { Some(Thumbs::Up) } else if args.bad { Some(Thumbs::Down) } else { None },
        correction: args.fix.as_deref().map(Cow::Borrowed),
        implicit: ImplicitSignals {
            regenerated: args.regenerated,
            copied: args.copied,
            edited: args.edited,
            abandoned: args.abandoned,
            follow_up_s: args.follow_up_s,
        },
    };
    let lsn = journal.append_durable(&Body::Feedback(feedback))?;
    journal.close()?;
    println!("feedback on interaction {} recorded as record {lsn} (acknowledged)", args.interaction);
    Ok(())
}

/// `nocturne journal`: read the journal without writing to it.
#[derive(Subcommand)]
pub enum JournalCommand {
    /// Segments, records by kind, bytes, acknowledgement and problems.
    Stat(ReadArgs),
    /// Every record as one JSON object per line; problems on stderr.
    Dump(ReadArgs),
    /// Check every segment; exit status 1 when anything is corrupt.
    Verify(ReadArgs),
}

/// Which journal to read.
#[derive(Args)]
pub struct ReadArgs {
    #[command(flatten)]
    state: StateArgs,
    /// A journal directory to read instead of the state directory's
    /// (for example one carried off a device).
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl ReadArgs {
    fn read(&self, visit: &mut dyn FnMut(&nocturne::journal::Record)) -> anyhow::Result<(PathBuf, JournalReport)> {
        let state = self.state.state();
        let (dir, device) = match &self.dir {
            Some(dir) => (dir.clone(), None),
            None => (state.journal_dir(), state.device_id()?),
        };
        if !dir.is_dir() {
            bail!("{}: no journal here (it is created by the first `generate`, `chat` or `feedback`)", dir.display());
        }
        let report = read_journal(&dir, device, visit).with_context(|| format!("cannot read the journal in {}", dir.display()))?;
        Ok((dir, report))
    }
}

fn print_problems(report: &JournalReport) {
    let problems = report.corruption();
    for problem in &problems {
        eprintln!("corrupt: {problem}");
    }
    if !problems.is_empty() {
        eprintln!("journal: {} problem(s): damaged or missing records were skipped (`nocturne journal verify` exits 1 on them)", problems.len());
    }
    if let Some(tail) = report.segments.last().and_then(|s| s.tail.as_ref().map(|t| (s, t))) {
        let (segment, tail) = tail;
        eprintln!(
            "note: {}: bytes {}..{} after the last record are {} (cut at the next open for writing)",
            segment.path.display(),
            tail.range.start,
            tail.range.end,
            if tail.zero_filled { "zeros" } else { "an incomplete record" }
        );
    }
}

/// Runs a `journal` subcommand.
pub fn run(command: &JournalCommand) -> anyhow::Result<ExitCode> {
    match command {
        JournalCommand::Dump(args) => {
            let mut out = std::io::stdout().lock();
            let mut failed = None;
            let (_, report) = args.read(&mut |record| {
                if failed.is_none() {
                    let line = serde_json::to_string(record).expect("records serialise to JSON");
                    failed = writeln!(out, "{line}").err();
                }
            })?;
            if let Some(e) = failed {
                return Err(e).context("cannot write to standard output");
            }
            print_problems(&report);
            Ok(ExitCode::SUCCESS)
        }
        JournalCommand::Stat(args) => {
            let mut kinds = std::collections::BTreeMap::<&str, u64>::new();
            let (dir, report) = args.read(&mut |record| *kinds.entry(kind_name(record.body.kind())).or_default() += 1)?;
            let acked = read_host_ack(&dir)?;
            let unsynced: u64 = report.segments.iter().filter(|s| s.seq > acked).map(|s| s.bytes).sum();
            let mut lsns = report.segments.iter().filter_map(|s| s.lsns);
            let range = lsns.clone().next().zip(lsns.next_back()).map(|((first, _), (_, last))| (first, last));
            println!("journal            {}", dir.display());
            println!("device             {}", report.device.map_or("unknown".into(), |d| d.to_string()));
            println!("segments           {} ({} bytes)", report.segments.len(), report.bytes());
            println!("records            {}", report.records());
            for (kind, n) in &kinds {
                println!("  {kind:<16} {n}");
            }
            let unknown: u64 = report.segments.iter().map(|s| s.unknown).sum();
            if unknown > 0 {
                println!("  {:<16} {unknown} (kinds this build does not know; skipped)", "unknown");
            }
            if let Some((first, last)) = range {
                println!("LSNs               {first} to {last}");
            }
            println!(
                "host holds         {}",
                if acked == 0 { "nothing yet".to_string() } else { format!("segments up to {acked}") }
            );
            println!("not yet synced     {unsynced} bytes (quota {} bytes)", ACTIVE.journal.disk_quota_bytes);
            println!("problems           {}", report.corruption().len());
            print_problems(&report);
            Ok(ExitCode::SUCCESS)
        }
        JournalCommand::Verify(args) => {
            let (dir, report) = args.read(&mut |_| {})?;
            print_problems(&report);
            let problems = report.corruption().len();
            if problems > 0 {
                println!("{}: {problems} problem(s); {} records readable", dir.display(), report.records());
                return Ok(ExitCode::from(1));
            }
            println!("{}: ok, {} records in {} segments", dir.display(), report.records(), report.segments.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}
