//! Crash safety of the journal, with real processes: a child appends records
//! and prints each LSN once it is acknowledged; the parent kills it with
//! SIGKILL at a seeded random moment, reopens the journal (as the next start
//! of the device would) and checks that every acknowledged record is present
//! and intact, none appears twice and no corrupt record is returned.
//! 1,000 kills per durability mode. A second child runs into the file-size
//! limit and shows that a failed write stops the writer for good.
//!
//! Run with `--nocapture` to see the counts.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nocturne::journal::{read_journal, Journal, JournalError};
use nocturne::profile::Durability;
use support::journal::{config, feedback, feedback_id, DEVICE};

const KILLS: u64 = 1000;
const CHILD_DIR: &str = "NOCTURNE_CRASH_DIR";
const CHILD_MODE: &str = "NOCTURNE_CRASH_MODE";
const CHILD_RUN: &str = "NOCTURNE_CRASH_RUN";
/// Small segments, so kills also land in segment rolls.
const SEGMENT_BYTES: u64 = 8 * 1024;

fn durability(mode: &str) -> Durability {
    match mode {
        "fsync" => Durability::FsyncEachRecord,
        _ => Durability::GroupCommit,
    }
}

/// The child: appends records for ever, printing `LSN ID` per acknowledged
/// record. Only runs when started by a parent test.
#[test]
#[ignore = "started by the crash tests as a child process"]
fn child_appends_until_killed() {
    let (Ok(dir), Ok(mode), Ok(run)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_MODE), std::env::var(CHILD_RUN)) else {
        return;
    };
    let run: u64 = run.parse().unwrap();
    let cfg = config(durability(&mode), SEGMENT_BYTES, 1 << 30);
    let mut journal = Journal::open(Path::new(&dir), DEVICE, cfg).unwrap();
    let mut out = std::io::stdout().lock();
    // The harness has printed "test NAME ... " without a newline: end that line.
    writeln!(out).unwrap();
    // In group-commit mode, batches of 4 are appended before waiting.
    let batch = if mode == "fsync" { 1 } else { 4 };
    for i in (1..).step_by(batch) {
        let mut acked = Vec::new();
        for id in (i..i + batch as u64).map(|k| run * 1_000_000 + k) {
            acked.push((journal.append(&feedback(id)).unwrap(), id));
        }
        journal.wait_durable(acked.last().unwrap().0).unwrap();
        for (lsn, id) in acked {
            writeln!(out, "{lsn} {id}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[derive(Debug, Default)]
struct Counts {
    kills: u64,
    acknowledged: u64,
    present: u64,
    truncated_tails: u64,
    runs_without_ack: u64,
}

fn crash_loop(mode: &str, seed: u64) -> Counts {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // Seeded, for reproducible kill times.
    let mut rng = nocturne::sampler::SplitMix64(seed);
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut counts = Counts::default();
    for run in 1..=KILLS {
        let delay = Duration::from_micros(1000 + rng.next_u64() % 40_000);
        let mut child = Command::new(&exe)
            .args(["--exact", "child_appends_until_killed", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_MODE, mode)
            .env(CHILD_RUN, run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        child.kill().unwrap();
        let output = child.wait_with_output().unwrap();
        counts.kills += 1;
        let text = String::from_utf8_lossy(&output.stdout);
        // A line cut by the kill was never fully reported: only whole lines count.
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        let before = acked.len();
        let harness = |l: &str| l.is_empty() || l.starts_with("running ") || l.starts_with("test ");
        for line in whole.lines().filter(|l| !harness(l)) {
            let (lsn, id) = line
                .split_once(' ')
                .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
                .unwrap_or_else(|| panic!("{mode} run {run}: child printed {line:?}"));
            assert!(acked.insert(lsn, id).is_none(), "{mode} run {run}: LSN {lsn} acknowledged twice");
        }
        if acked.len() == before {
            counts.runs_without_ack += 1;
        }
        // Restart: open (recovering), close, then read everything back.
        let journal = Journal::open(dir.path(), DEVICE, config(durability(mode), SEGMENT_BYTES, 1 << 30)).unwrap();
        counts.truncated_tails += u64::from(journal.recovery().truncated.is_some());
        journal.close().unwrap();
        let mut present: BTreeMap<u64, u64> = BTreeMap::new();
        let mut last_lsn = 0;
        let report = read_journal(dir.path(), Some(DEVICE), &mut |record| {
            assert!(record.lsn > last_lsn, "{mode} run {run}: LSN {} after {last_lsn}", record.lsn);
            last_lsn = record.lsn;
            let id = feedback_id(&record.body).unwrap_or_else(|| panic!("{mode} run {run}: corrupt record {record:?}"));
            present.insert(record.lsn, id);
        })
        .unwrap();
        assert!(report.corruption().is_empty(), "{mode} run {run}: {:?}", report.corruption());
        let mut ids: Vec<u64> = present.values().copied().collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), present.len(), "{mode} run {run}: a record appears twice");
        for (lsn, id) in &acked {
            assert_eq!(present.get(lsn), Some(id), "{mode} run {run}: acknowledged LSN {lsn} (id {id}) lost");
        }
        counts.present = present.len() as u64;
    }
    counts.acknowledged = acked.len() as u64;
    counts
}

#[test]
fn sigkill_in_fsync_each_record_mode_loses_no_acknowledged_record() {
    let counts = crash_loop("fsync", 0x5EED_0001);
    println!("fsync-each-record: {counts:?}");
    assert!(counts.acknowledged > KILLS, "too few records acknowledged to mean anything: {counts:?}");
}

#[test]
fn sigkill_in_group_commit_mode_loses_no_acknowledged_record() {
    let counts = crash_loop("group", 0x5EED_0002);
    println!("group-commit: {counts:?}");
    assert!(counts.acknowledged > KILLS, "too few records acknowledged to mean anything: {counts:?}");
}

/// The child of [`a_failed_write_stops_the_writer_for_good`]: writes under a
/// 64 KiB file-size limit until the writer fails.
#[test]
#[ignore = "started by a_failed_write_stops_the_writer_for_good as a child process"]
fn child_writes_into_the_file_size_limit() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    // SAFETY: plain libc calls on this process's own signal disposition and limits.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit { rlim_cur: 64 * 1024, rlim_max: libc::RLIM_INFINITY };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let mut journal = Journal::open(Path::new(&dir), DEVICE, config(Durability::FsyncEachRecord, 1 << 20, 1 << 30)).unwrap();
    let mut last_acked = 0;
    let failure = loop {
        let id = journal.next_lsn();
        match journal.append_durable(&feedback(id)) {
            Ok(lsn) => last_acked = lsn,
            Err(e) => break e,
        }
    };
    assert!(matches!(failure, JournalError::WriterFailed(_)), "{failure}");
    // Nothing after the failure is accepted or acknowledged.
    let again = journal.append(&feedback(journal.next_lsn()));
    assert!(matches!(again, Err(JournalError::WriterFailed(_))), "{again:?}");
    assert!(journal.wait_durable(last_acked + 1).is_err());
    assert!(journal.close().is_err());
    println!("acked {last_acked}");
    println!("failure {failure}");
}

#[test]
fn a_failed_write_stops_the_writer_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writes_into_the_file_size_limit", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    // The harness prints the test's name on the same line as its first output.
    let field = |name: &str| stdout.split(name).nth(1).and_then(|rest| rest.lines().next()).expect(&stdout).to_string();
    let acked: u64 = field("acked ").parse().unwrap();
    let failure = field("failure ");
    assert!(failure.contains("File too large"), "{failure}");
    assert!(acked > 100);
    // Every acknowledged record survives; the partial write is cut on reopen.
    let journal = Journal::open(dir.path(), DEVICE, config(Durability::FsyncEachRecord, 1 << 20, 1 << 30)).unwrap();
    assert_eq!(journal.next_lsn(), acked + 1);
    journal.close().unwrap();
    let mut lsns = Vec::new();
    let report = read_journal(dir.path(), Some(DEVICE), &mut |r| {
        assert_eq!(feedback_id(&r.body), Some(r.lsn));
        lsns.push(r.lsn);
    })
    .unwrap();
    assert!(report.corruption().is_empty());
    assert_eq!(lsns, (1..=acked).collect::<Vec<_>>());
}
