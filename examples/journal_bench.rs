//! Journal benchmark: records per second and acknowledgement latency (p50,
//! p99) of 200-byte records in both durability modes, next to SQLite on the
//! same disk (WAL, `synchronous=FULL`) inserting the same records.
//!
//! `cargo run --example journal_bench -- [DIR] [RECORDS]` (default
//! `target/journal-bench`, 2000). DIR must be on the disk being measured
//! (not a tmpfs).
//!
//! Modes:
//! - one at a time: append, wait for the acknowledgement, repeat (a client
//!   that needs each record stored before going on; SQLite: one INSERT per
//!   autocommit transaction);
//! - pipelined: append as fast as the queue takes records, acknowledgements
//!   observed from another thread (SQLite: one transaction per group-commit
//!   interval, a record acknowledged when its transaction commits).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nocturne::journal::record::{encode, RECORD_MAX};
use nocturne::journal::{Body, Feedback, Journal, JournalConfig};
use nocturne::ids::DeviceId;
use nocturne::profile::{Durability, ACTIVE};

const RECORD_BYTES: usize = 200;

/// A feedback record whose encoding is exactly [`RECORD_BYTES`] long.
fn record(i: u64) -> Body<'static> {
    let make = |n: usize| {
        Body::Feedback(Feedback {
            interaction: i + 1,
            rating: Some(4),
            correction: Some(Cow::Owned("x".repeat(n))),
            ..Feedback::default()
        })
    };
    let mut buf = vec![0u8; RECORD_MAX];
    let overhead = encode(&mut buf, u64::MAX, u64::MAX, &make(150)).unwrap() - 150;
    make(RECORD_BYTES - overhead)
}

struct Result {
    name: String,
    records: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Result {
    fn print(mut self) {
        self.latencies.sort();
        let q = |p: f64| self.latencies[((self.latencies.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} |",
            self.name,
            self.records,
            self.records as f64 / self.seconds,
            q(0.5),
            q(0.99)
        );
    }
}

fn config(durability: Durability) -> JournalConfig {
    let mut config = JournalConfig::for_profile(&ACTIVE);
    config.durability = durability;
    config.disk_quota_bytes = u64::MAX / 2;
    config
}

fn fresh(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    dir.to_path_buf()
}

fn journal_one_at_a_time(dir: &Path, durability: Durability, n: usize, name: &str) -> Result {
    let mut journal = Journal::open(&fresh(dir), DeviceId([1; 16]), config(durability)).unwrap();
    let bodies: Vec<_> = (0..n as u64).map(record).collect();
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for body in &bodies {
        let t = Instant::now();
        journal.append_durable(body).unwrap();
        latencies.push(t.elapsed());
    }
    let seconds = started.elapsed().as_secs_f64();
    journal.close().unwrap();
    Result { name: name.into(), records: n, seconds, latencies }
}

fn journal_pipelined(dir: &Path, durability: Durability, n: usize, name: &str) -> Result {
    let mut journal = Journal::open(&fresh(dir), DeviceId([1; 16]), config(durability)).unwrap();
    let bodies: Vec<_> = (0..n as u64).map(record).collect();
    let first = journal.next_lsn();
    let acks = journal.acknowledgements();
    // The observer notes when each LSN became durable.
    let observer = std::thread::spawn(move || {
        let mut at = Vec::with_capacity(n);
        let mut next = first;
        while next < first + n as u64 {
            acks.wait_durable(next).unwrap();
            let now = Instant::now();
            let durable = acks.durable_lsn().min(first + n as u64 - 1);
            at.extend(std::iter::repeat_n(now, (durable - next + 1) as usize));
            next = durable + 1;
        }
        at
    });
    let started = Instant::now();
    let mut appended = Vec::with_capacity(n);
    for body in &bodies {
        appended.push(Instant::now());
        journal.append(body).unwrap();
    }
    let acked = observer.join().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    journal.close().unwrap();
    let latencies = acked.iter().zip(&appended).map(|(a, b)| a.duration_since(*b)).collect();
    Result { name: name.into(), records: n, seconds, latencies }
}

fn sqlite(dir: &Path) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(fresh(dir).join("journal.db")).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.pragma_update(None, "synchronous", "FULL").unwrap();
    db.execute("CREATE TABLE record (lsn INTEGER PRIMARY KEY, body BLOB NOT NULL)", []).unwrap();
    db
}

fn encoded(n: usize) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; RECORD_MAX];
    (0..n as u64)
        .map(|i| {
            let len = encode(&mut buf, i + 1, 0, &record(i)).unwrap();
            assert_eq!(len, RECORD_BYTES);
            buf[..len].to_vec()
        })
        .collect()
}

fn sqlite_one_at_a_time(dir: &Path, n: usize) -> Result {
    let db = sqlite(dir);
    let records = encoded(n);
    let mut insert = db.prepare("INSERT INTO record (lsn, body) VALUES (?1, ?2)").unwrap();
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    for (i, body) in records.iter().enumerate() {
        let t = Instant::now();
        insert.execute(rusqlite::params![i as i64 + 1, body]).unwrap();
        latencies.push(t.elapsed());
    }
    let seconds = started.elapsed().as_secs_f64();
    Result { name: "SQLite WAL, synchronous=FULL, one INSERT per transaction".into(), records: n, seconds, latencies }
}

fn sqlite_grouped(dir: &Path, n: usize, interval: Duration) -> Result {
    let mut db = sqlite(dir);
    let records = encoded(n);
    let mut latencies = Vec::with_capacity(n);
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let tx = db.transaction().unwrap();
        let opened = Instant::now();
        let mut pending = Vec::new();
        {
            let mut insert = tx.prepare("INSERT INTO record (lsn, body) VALUES (?1, ?2)").unwrap();
            while i < n && opened.elapsed() < interval {
                pending.push(Instant::now());
                insert.execute(rusqlite::params![i as i64 + 1, records[i]]).unwrap();
                i += 1;
            }
        }
        tx.commit().unwrap();
        let now = Instant::now();
        latencies.extend(pending.iter().map(|t| now.duration_since(*t)));
    }
    let seconds = started.elapsed().as_secs_f64();
    let name = format!("SQLite WAL, synchronous=FULL, one transaction per {} ms", interval.as_millis());
    Result { name, records: n, seconds, latencies }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("target/journal-bench", String::as_str));
    let n: usize = args.get(2).map_or(2000, |s| s.parse().expect("RECORDS is a number"));
    let group = config(Durability::GroupCommit).group_commit;
    println!("{n} records of {RECORD_BYTES} bytes in {}; group commit every {} ms (profile {})", dir.display(), group.as_millis(), ACTIVE.name);
    println!("\n| writer | records | records/s | p50 ack ms | p99 ack ms |\n|---|---|---|---|---|");
    journal_one_at_a_time(&dir, Durability::FsyncEachRecord, n, "journal, fsync each record, one at a time").print();
    journal_pipelined(&dir, Durability::FsyncEachRecord, n, "journal, fsync each record, pipelined").print();
    journal_pipelined(&dir, Durability::GroupCommit, n * 10, "journal, group commit, pipelined").print();
    sqlite_one_at_a_time(&dir, n).print();
    sqlite_grouped(&dir, n * 10, group).print();
    let _ = std::fs::remove_dir_all(&dir);
}
