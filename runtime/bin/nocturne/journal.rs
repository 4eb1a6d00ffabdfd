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
use nocturne::journal::writer::read_host_ack;
use nocturne::journal::{
    read_journal, Body, Feedback, ImplicitSignals, Interaction, Journal, JournalConfig, JournalReport, Thumbs,
};
use nocturne::profile::ACTIVE;
use nocturne::session::{ReplyStats, Session};
use nocturne::sync::adapters::{load_active, AdapterWatch};
use nocturne::weights::ModelPack;

/// Where the device keeps its state.
#[derive(Args, Clone)]
pub struct StateArgs {
    /// The device's state directory (device id, journal).
    #[arg(long, env = "NOCTURNE_STATE_DIR", default_value = "state")]
    state_dir: PathBuf,
}

impl StateArgs {
    /// The state directory.
    pub fn state(&self) -> StateDir {
        StateDir::new(&self.state_dir)
    }

    /// Opens the device's journal for appending, saying on stderr what
    /// recovery repaired or skipped.
    pub fn open_journal(&self) -> anyhow::Result<Journal> {
        let state = self.state();
        let device = state.device_id_or_create()?;
        let journal = Journal::open(&state.journal_dir(), device, JournalConfig::for_profile(&ACTIVE))?;
        let recovery = journal.recovery();
        if let Some((seq, tail)) = &recovery.truncated {
            eprintln!(
                "journal: cut an incomplete record ({} bytes at offset {}) from the end of segment {seq}",
                tail.range.end - tail.range.start,
                tail.range.start
            );
        }
        for (seq, d) in &recovery.damage {
            eprintln!("journal: segment {seq}: bytes {}..{} are damaged ({}) and skipped", d.range.start, d.range.end, d.reason);
        }
        if recovery.damage.iter().any(|(seq, _)| *seq != recovery.active_seq) {
            eprintln!("journal: the damaged segment is kept as it is; new records go to segment {}", recovery.active_seq);
        }
        for (path, why) in &recovery.skipped {
            eprintln!("journal: {} is not appended to: {why}", path.display());
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

/// Records the interactions and feedback of one conversation, and keeps the
/// session on the device's active adapter. Problems are reported on stderr
/// and never stop the conversation: an answer the journal could not store is
/// still an answer.
pub struct Recorder {
    journal: Option<Journal>,
    state: StateDir,
    watch: Option<AdapterWatch>,
    conversation: u64,
    turn: u32,
}

impl Recorder {
    /// A recorder for a new conversation (no journal with `--no-journal`).
    pub fn open(args: &RecordArgs) -> anyhow::Result<Recorder> {
        let journal = if args.no_journal { None } else { Some(args.state.open_journal()?) };
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("no random source for a conversation id: {e}"))?;
        Ok(Recorder { journal, state: args.state.state(), watch: None, conversation: u64::from_le_bytes(id), turn: 0 })
    }

    /// Puts `session` on the device's active adapter: at the first call, and
    /// afterwards whenever `nocturne sync import` switched it (no restart).
    pub fn follow_active_adapter(&mut self, session: &mut Session<'_>, pack: &ModelPack) {
        let result = match self.watch.as_mut() {
            Some(watch) => watch.poll(&self.state, pack, self.journal.as_mut()),
            None => load_active(&self.state, pack, self.journal.as_mut()).map(|(adapter, active)| {
                self.watch = Some(AdapterWatch::new(active));
                Some(adapter)
            }),
        };
        match result {
            Ok(Some(adapter)) => {
                if let Some(a) = &adapter {
                    eprintln!("(adapter {} active)", a.id());
                }
                session.set_adapter(adapter);
            }
            Ok(None) => {}
            Err(e) => eprintln!("warning: adapter not switched: {e}"),
        }
    }

    /// Starts a new conversation.
    pub fn new_conversation(&mut self) {
        self.conversation = self.conversation.wrapping_add(1);
        self.turn = 0;
    }

    /// The next interaction replaces the last one (a retry): same turn.
    pub fn replace_last_turn(&mut self) {
        self.turn = self.turn.saturating_sub(1);
    }

    /// Queues the interaction of a reply; returns its LSN (the interaction id).
    pub fn interaction(&mut self, session: &mut Session<'_>, texts: (&str, &str, &str), stats: &ReplyStats) -> Option<u64> {
        let journal = self.journal.as_mut()?;
        let models = (session.decoder().pack().id(), session.decoder().adapter().map(|a| a.id()));
        let body = Interaction::from_reply((self.conversation, self.turn), models, texts, stats, crate::peak_rss_bytes());
        self.turn += 1;
        match journal.append(&Body::Interaction(body)) {
            Ok(lsn) => Some(lsn),
            Err(e) => {
                eprintln!("warning: the interaction was not recorded: {e}");
                None
            }
        }
    }

    /// Appends feedback and waits until it is acknowledged; returns its LSN.
    pub fn feedback(&mut self, feedback: Feedback<'_>) -> anyhow::Result<u64> {
        let Some(journal) = self.journal.as_mut() else {
            bail!("journaling is off (--no-journal)");
        };
        Ok(journal.append_durable(&Body::Feedback(feedback))?)
    }

    /// Waits until `lsn` is acknowledged.
    pub fn wait(&self, lsn: u64) -> anyhow::Result<()> {
        match &self.journal {
            Some(journal) => Ok(journal.wait_durable(lsn)?),
            None => Ok(()),
        }
    }

    /// Syncs and closes the journal.
    pub fn close(self) -> anyhow::Result<()> {
        match self.journal {
            Some(journal) => Ok(journal.close()?),
            None => Ok(()),
        }
    }
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
    for problem in report.corruption() {
        eprintln!("corrupt: {problem}");
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
            let lsns = report.segments.iter().filter_map(|s| s.lsns);
            let range = lsns.clone().next().zip(lsns.last()).map(|((first, _), (_, last))| (first, last));
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
