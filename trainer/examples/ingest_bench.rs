//! Sync benchmark: a device journal of about MEGABYTES of 200-byte feedback
//! records (the profile's segment size), exported as one bundle and
//! ingested into a fresh host store. Prints the raw journal size, the bundle
//! size, and export and ingest throughput.
//!
//! `cargo run -p nocturne-trainer --example ingest_bench -- [DIR] [MEGABYTES]`
//! (default `target/ingest-bench`, 64). DIR must be on the disk being measured.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Instant;

use nocturne::device::{StateDir, DEVICE_PUBLIC_FILE};
use nocturne::journal::{Body, Feedback, Journal, JournalConfig};
use nocturne::profile::Durability;
use nocturne::sync::export;
use nocturne_trainer::store::Store;

fn tree_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(args.get(1).map_or("target/ingest-bench", String::as_str));
    let megabytes: u64 = args.get(2).map_or(64, |s| s.parse().expect("MEGABYTES is a number"));
    let _ = std::fs::remove_dir_all(&dir);
    let state = StateDir::new(dir.join("state"));
    let device = state.device_id_or_create().unwrap();
    let mut config = JournalConfig::for_profile(&nocturne_trainer::eval::device_profile(None).unwrap());
    config.durability = Durability::GroupCommit;
    config.disk_quota_bytes = u64::MAX / 2;
    let mut journal = Journal::open(&state.journal_dir(), device, config).unwrap();
    let text = "x".repeat(160);
    while journal.used_bytes() < megabytes << 20 {
        let body = Body::Feedback(Feedback { interaction: journal.next_lsn(), rating: Some(4), correction: Some(Cow::Borrowed(&text)), ..Feedback::default() });
        journal.append(&body).unwrap();
    }
    let started = Instant::now();
    let bundle = export(&state, &mut journal, &dir.join("usb")).unwrap().bundle;
    let export_s = started.elapsed().as_secs_f64();
    journal.close().unwrap();
    let raw_sealed = tree_bytes(&state.journal_dir()) - 64; // minus the new, empty segment's header
    let bundle_bytes = tree_bytes(&bundle);
    let store = Store::new(dir.join("store"));
    store.keygen().unwrap();
    store.enroll(&dir.join("state").join(DEVICE_PUBLIC_FILE)).unwrap();
    let started = Instant::now();
    let report = store.ingest(&bundle).unwrap();
    let ingest_s = started.elapsed().as_secs_f64();
    println!("journal: {raw_sealed} bytes in {} sealed segments of at most {} bytes", report.stored.len(), config.segment_bytes);
    println!("bundle: {bundle_bytes} bytes ({:+.4}% against the raw segments)", 100.0 * (bundle_bytes as f64 - raw_sealed as f64) / raw_sealed as f64);
    println!("export: {export_s:.3} s ({:.1} MB/s)", bundle_bytes as f64 / 1e6 / export_s);
    println!("ingest: {ingest_s:.3} s ({:.1} MB/s), {} bytes stored", report.bytes as f64 / 1e6 / ingest_s, report.bytes);
    let _ = std::fs::remove_dir_all(&dir);
}
