//! Offline sync end to end, device and host in one process: exactly-once
//! storage under cut, repeated and reordered deliveries (1,000 seeded
//! cases), no loss under a full quota, and every kind of tampering rejected
//! with nothing written.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nocturne::device::{StateDir, DEVICE_PUBLIC_FILE};
use nocturne::journal::reader::list_segments;
use nocturne::journal::{Body, Feedback, Journal, JournalConfig, JournalError, WriterError};
use nocturne::profile::Durability;
use nocturne::sync::ack::{ack_file_name, write_ack, Ack, AckRejection};
use nocturne::sampler::SplitMix64;
use nocturne::signing::{self, peek_sealed, seal, SealError};
use nocturne::sync::bundle::{Manifest, Rejection, MANIFEST_DOMAIN, MANIFEST_FILE};
use nocturne::sync::{export, import_acks, AckOutcome, ExportOutcome, SyncError};
use nocturne_trainer::store::{IngestError, Store};

/// A number below `n` from the seeded generator, for reproducible cases.
fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    rng.next_u64() % n.max(1)
}

/// A device and a host, with the device enrolled and the trainer key provisioned.
struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    state: StateDir,
    store: Store,
    journal: Journal,
}

fn config(quota: u64) -> JournalConfig {
    JournalConfig {
        durability: Durability::GroupCommit,
        group_commit: Duration::from_millis(1),
        segment_bytes: 2048,
        disk_quota_bytes: quota,
    }
}

impl World {
    fn new(quota: u64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let state = StateDir::new(root.join("state"));
        let device = state.device_id_or_create().unwrap();
        let store = Store::new(root.join("store"));
        store.keygen().unwrap();
        store.enroll(&root.join("state").join(DEVICE_PUBLIC_FILE)).unwrap();
        state.trust_trainer(&root.join("store/trainer.pub")).unwrap();
        let journal = Journal::open(&state.journal_dir(), device, config(quota)).unwrap();
        World { _dir: dir, root, state, store, journal }
    }

    /// Appends `n` records durably; returns how many the quota accepted.
    fn append(&mut self, n: usize) -> usize {
        let mut accepted = 0;
        for i in 0..n {
            let body = Body::Feedback(Feedback {
                interaction: self.journal.next_lsn(),
                correction: Some(Cow::Owned(format!("answer {i} {}", "z".repeat(100)))),
                ..Feedback::default()
            });
            match self.journal.append(&body) {
                Ok(_) => accepted += 1,
                Err(JournalError::QuotaFull { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        self.journal.wait_durable(self.journal.next_lsn() - 1).unwrap();
        accepted
    }

    fn export(&mut self, to: &Path) -> PathBuf {
        export(&self.state, &mut self.journal, to).unwrap().bundle
    }

    fn device_segments(&self) -> BTreeMap<u64, Vec<u8>> {
        list_segments(&self.state.journal_dir()).unwrap().into_iter().map(|(s, p)| (s, std::fs::read(p).unwrap())).collect()
    }

    fn host_segments(&self) -> BTreeMap<u64, Vec<u8>> {
        let device = self.state.device_id().unwrap().unwrap();
        self.store.segments(device).unwrap().into_iter().map(|(s, p)| (s, std::fs::read(p).unwrap())).collect()
    }

    /// The tree of the store (paths and contents), to prove a rejection wrote nothing.
    fn store_tree(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.insert(path.clone(), std::fs::read(&path).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root.join("store"), &mut out);
        out
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Copies a bundle the way an interrupted transfer does: files in name
/// order, the copy stopping after `cut` bytes in total.
fn copy_cut(from: &Path, to: &Path, cut: u64) {
    std::fs::create_dir_all(to).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(from).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    let mut left = cut;
    for name in names {
        let bytes = std::fs::read(from.join(&name)).unwrap();
        let n = (bytes.len() as u64).min(left) as usize;
        std::fs::write(to.join(&name), &bytes[..n]).unwrap();
        left -= n as u64;
        if left == 0 {
            return;
        }
    }
}

fn bundle_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

#[test]
fn exactly_once_under_cut_repeated_and_reordered_deliveries() {
    let mut totals = (0u64, 0u64, 0u64); // deliveries, rejected, acknowledgements applied
    for case in 0..1000u64 {
        let mut rng = SplitMix64(0xB0_0000 + case);
        let mut world = World::new(1 << 30);
        let outbox = world.root.join("device-outbox");
        let mut bundles = Vec::new();
        // Three days: records, then an export; bundles pile up on the stick.
        for _ in 0..3 {
            world.append(5 + below(&mut rng, 20) as usize);
            bundles.push(world.export(&outbox));
        }
        let sealed = world.device_segments();
        // Deliveries: any bundle, cut at any byte or whole, repeated, in any order.
        for d in 0..4 + below(&mut rng, 6) {
            let bundle = &bundles[below(&mut rng, bundles.len() as u64) as usize];
            let stick = world.root.join(format!("stick-{d}"));
            let target = stick.join(bundle.file_name().unwrap());
            let size = bundle_bytes(bundle);
            if below(&mut rng, 2) == 0 {
                copy_cut(bundle, &target, below(&mut rng, size));
            } else {
                copy_dir(bundle, &target);
            }
            totals.0 += 1;
            match world.store.ingest(&target) {
                Ok(report) => {
                    // Sometimes the acknowledgement travels back at once.
                    if below(&mut rng, 2) == 0 {
                        let outcome = import_acks(&world.state, &mut world.journal, report.ack_path.parent().unwrap()).unwrap();
                        totals.2 += u64::from(matches!(outcome, Some(AckOutcome::Applied(_))));
                    }
                }
                Err(e) => {
                    totals.1 += 1;
                    assert!(matches!(e, IngestError::Rejected { .. }), "case {case}: {e:#}");
                }
            }
        }
        // Finally the newest bundle arrives whole.
        let last = bundles.last().unwrap();
        let stick = world.root.join("stick-final").join(last.file_name().unwrap());
        copy_dir(last, &stick);
        world.store.ingest(&stick).unwrap();
        // Every sealed segment is on the host exactly once, byte for byte.
        let host = world.host_segments();
        let newest = *sealed.keys().last().unwrap();
        let expected: BTreeMap<u64, Vec<u8>> = sealed.into_iter().filter(|(s, _)| *s < newest).collect();
        assert_eq!(host.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "case {case}");
        assert!(host == expected, "case {case}: stored bytes differ from the device's");
        let leftovers = std::fs::read_dir(world.store.device_dir(world.state.device_id().unwrap().unwrap()))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0, "case {case}");
    }
    println!("1000 cases: {} deliveries, {} rejected as incomplete, {} acknowledgements applied", totals.0, totals.1, totals.2);
}

#[test]
fn a_full_quota_never_deletes_an_unacknowledged_segment() {
    let mut world = World::new(8 * 2048);
    let accepted = world.append(1000);
    assert!(accepted < 1000, "the quota filled up");
    // (The first refusal counts records still in flight; fill what is left.)
    while world.append(10) > 0 {}
    let before = world.device_segments();
    // Export and ingest, but the acknowledgement has not come back: nothing goes.
    let bundle = world.export(&world.root.join("usb"));
    world.store.ingest(&bundle).unwrap();
    assert_eq!(world.append(10), 0, "still full");
    let after: BTreeMap<u64, Vec<u8>> = world.device_segments();
    assert!(before.keys().all(|s| after.contains_key(s)), "a segment was deleted before the host acknowledged it");
    // The acknowledgement arrives: acknowledged segments make room, the rest stay.
    let outcome = import_acks(&world.state, &mut world.journal, &world.root.join("store/outbox")).unwrap();
    let Some(AckOutcome::Applied(ack)) = outcome else { panic!("{outcome:?}") };
    assert!(world.append(10) > 0, "room after the acknowledgement");
    let now = world.device_segments();
    for (seq, bytes) in &after {
        if !now.contains_key(seq) {
            assert!(*seq <= ack.held_through, "segment {seq} deleted without an acknowledgement");
            assert_eq!(world.host_segments().get(seq), Some(bytes), "deleted segment {seq} is not on the host");
        }
    }
}

#[test]
fn exporting_twice_without_new_data_makes_no_new_bundle() {
    let mut world = World::new(1 << 30);
    world.append(30);
    let usb = world.root.join("usb");
    let ExportOutcome { bundle: first, new, .. } = export(&world.state, &mut world.journal, &usb).unwrap();
    assert!(new);
    let ExportOutcome { bundle: second, new, .. } = export(&world.state, &mut world.journal, &usb).unwrap();
    assert!(!new);
    assert_eq!(first, second);
    assert_eq!(std::fs::read_dir(&usb).unwrap().count(), 1);
    world.append(1);
    let ExportOutcome { bundle: third, new, .. } = export(&world.state, &mut world.journal, &usb).unwrap();
    assert!(new && third != first);
}

/// Re-signs a bundle's manifest after `edit`, with `key`.
fn resign(bundle: &Path, key: &ed25519_dalek::SigningKey, edit: impl FnOnce(&mut Manifest)) {
    let path = bundle.join(MANIFEST_FILE);
    let mut manifest: Manifest = peek_sealed(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, seal(MANIFEST_DOMAIN, key, &manifest)).unwrap();
}

#[test]
fn tampered_bundles_are_rejected_and_the_store_is_unchanged() {
    let mut world = World::new(1 << 30);
    world.append(30);
    let original = world.export(&world.root.join("usb"));
    let device_key = world.state.device_key().unwrap();
    let other_key = signing::generate().unwrap();
    type Tamper<'a> = (&'static str, Box<dyn Fn(&Path) + 'a>);
    let cases: Vec<Tamper<'_>> = vec![
        ("a modified segment byte", Box::new(|b: &Path| {
            let seg = b.join("00000000000000000001.seg");
            let mut bytes = std::fs::read(&seg).unwrap();
            bytes[300] ^= 1;
            std::fs::write(&seg, bytes).unwrap();
        })),
        ("a manifest signed by another key", Box::new(|b: &Path| resign(b, &other_key, |_| {}))),
        ("a segment listed as ../escape", Box::new(|b: &Path| {
            std::fs::copy(b.join("00000000000000000001.seg"), b.parent().unwrap().join("escape")).unwrap();
            resign(b, &device_key, |m| m.segments[0].name = "../escape".into());
        })),
        ("a segment listed by absolute path", Box::new(|b: &Path| {
            let abs = b.join("00000000000000000001.seg").to_string_lossy().into_owned();
            resign(b, &device_key, |m| m.segments[0].name = abs);
        })),
        ("a truncated segment (partial copy)", Box::new(|b: &Path| {
            let seg = b.join("00000000000000000002.seg");
            let bytes = std::fs::read(&seg).unwrap();
            std::fs::write(&seg, &bytes[..bytes.len() / 2]).unwrap();
        })),
        ("a missing manifest", Box::new(|b: &Path| std::fs::remove_file(b.join(MANIFEST_FILE)).unwrap())),
        ("a manifest that is a FIFO", Box::new(|b: &Path| {
            std::fs::remove_file(b.join(MANIFEST_FILE)).unwrap();
            let path = std::ffi::CString::new(b.join(MANIFEST_FILE).to_str().unwrap()).unwrap();
            // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        })),
        ("a manifest linked to /dev/zero", Box::new(|b: &Path| {
            std::fs::remove_file(b.join(MANIFEST_FILE)).unwrap();
            std::os::unix::fs::symlink("/dev/zero", b.join(MANIFEST_FILE)).unwrap();
        })),
        ("a segment of another sequence under this name", Box::new(|b: &Path| {
            std::fs::copy(b.join("00000000000000000002.seg"), b.join("00000000000000000001.seg")).unwrap();
            let sha = nocturne::digest::sha256_file(&b.join("00000000000000000001.seg")).unwrap();
            let len = std::fs::metadata(b.join("00000000000000000001.seg")).unwrap().len();
            resign(b, &device_key, |m| {
                m.segments[0].sha256 = sha;
                m.segments[0].bytes = len;
            });
        })),
    ];
    let expected: [fn(&Rejection) -> bool; 9] = [
        |r| matches!(r, Rejection::Checksum(_)),
        |r| matches!(r, Rejection::ManifestSignature { error: SealError::BadSignature, .. }),
        |r| matches!(r, Rejection::BadName { .. }),
        |r| matches!(r, Rejection::BadName { .. }),
        |r| matches!(r, Rejection::Size { .. }),
        |r| matches!(r, Rejection::ManifestMissing(_)),
        |r| matches!(r, Rejection::ManifestMissing(why) if why.contains("not a regular file")),
        |r| matches!(r, Rejection::ManifestMissing(why) if why.contains("not a regular file")),
        |r| matches!(r, Rejection::HeaderMismatch { .. }),
    ];
    let before = world.store_tree();
    for ((name, tamper), expected) in cases.iter().zip(expected) {
        let copy = world.root.join("tampered").join(name.replace(' ', "-")).join(original.file_name().unwrap());
        copy_dir(&original, &copy);
        tamper(&copy);
        let err = world.store.ingest(&copy).unwrap_err();
        assert!(matches!(&err, IngestError::Rejected { rejection, .. } if expected(rejection)), "{name}: {err}");
        assert!(world.store_tree() == before, "{name}: the store changed");
    }
    // A device that is not enrolled.
    let stranger = World::new(1 << 30);
    let mut stranger = stranger;
    stranger.append(5);
    let foreign = stranger.export(&stranger.root.join("usb"));
    let err = world.store.ingest(&foreign).unwrap_err();
    assert!(matches!(err, IngestError::Rejected { rejection: Rejection::NotEnrolled(_), .. }), "{err}");
    assert!(world.store_tree() == before);
    // And the intact bundle still goes in.
    world.store.ingest(&original).unwrap();
}

#[test]
fn replayed_or_forged_acknowledgements_change_nothing() {
    let mut world = World::new(1 << 30);
    world.append(30);
    let bundle = world.export(&world.root.join("usb"));
    let first = world.store.ingest(&bundle).unwrap();
    let old = world.root.join("old-ack");
    copy_dir(&world.root.join("store/outbox"), &old);
    world.append(30);
    let bundle = world.export(&world.root.join("usb"));
    world.store.ingest(&bundle).unwrap();
    let outbox = world.root.join("store/outbox");
    assert!(matches!(import_acks(&world.state, &mut world.journal, &outbox).unwrap(), Some(AckOutcome::Applied(_))));
    let host_ack = std::fs::read(world.state.journal_dir().join("host-ack")).unwrap();
    // The old acknowledgement delivered again: stale, nothing changes.
    let outcome = import_acks(&world.state, &mut world.journal, &old).unwrap();
    assert_eq!(outcome, Some(AckOutcome::Stale(first.ack)));
    assert_eq!(std::fs::read(world.state.journal_dir().join("host-ack")).unwrap(), host_ack);
    // An acknowledgement signed by another key: rejected.
    let device = world.state.device_id().unwrap().unwrap();
    let forged = world.root.join("forged");
    let ack = Ack { device, held_through: 1_000, counter: 99, created_ms: 0 };
    write_ack(&forged, &signing::generate().unwrap(), &ack).unwrap();
    let err = import_acks(&world.state, &mut world.journal, &forged).unwrap_err();
    assert!(matches!(&err, SyncError::Ack { rejection: AckRejection::Seal(SealError::BadSignature), .. }), "{err}");
    // Signed by the trainer but claiming segments the device has not sealed: rejected.
    let trainer = signing::read_signing_key(&world.root.join("store/trainer.key")).unwrap();
    write_ack(&forged, &trainer, &ack).unwrap();
    let err = import_acks(&world.state, &mut world.journal, &forged).unwrap_err();
    assert!(matches!(&err, SyncError::Ack { rejection: AckRejection::Journal(WriterError::NotSealed { .. }), .. }), "{err}");
    assert_eq!(std::fs::read(world.state.journal_dir().join("host-ack")).unwrap(), host_ack);
    assert!(forged.join(ack_file_name(device)).exists());
}

#[test]
fn keygen_enroll_and_ingest_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let trainer = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nocturne-trainer")).args(args).output().unwrap()
    };
    let store = tmp.path().join("store");
    let store_arg = store.to_str().unwrap();
    let out = trainer(&["keygen", "--store", store_arg]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("trainer.pub"));
    assert!(!trainer(&["keygen", "--store", store_arg]).status.success(), "a second keygen must not replace the key");
    // A device, with its journal exported by the library.
    let state = StateDir::new(tmp.path().join("state"));
    let device = state.device_id_or_create().unwrap();
    let mut journal = Journal::open(&state.journal_dir(), device, config(1 << 30)).unwrap();
    for i in 0..50 {
        let body = Body::Feedback(Feedback { interaction: i + 1, rating: Some(3), ..Feedback::default() });
        journal.append(&body).unwrap();
    }
    let usb = tmp.path().join("usb");
    let bundle = export(&state, &mut journal, &usb).unwrap().bundle;
    // Not enrolled yet: rejected, exit status 1.
    let out = trainer(&["ingest", usb.to_str().unwrap(), "--store", store_arg]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not enrolled"));
    let device_pub = tmp.path().join("state").join(DEVICE_PUBLIC_FILE);
    let out = trainer(&["enroll", device_pub.to_str().unwrap(), "--store", store_arg]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("enrolled device {device}")));
    let out = trainer(&["ingest", usb.to_str().unwrap(), "--store", store_arg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("segment(s) stored") && text.contains("0 already held"), "{text}");
    let out = trainer(&["ingest", bundle.to_str().unwrap(), "--store", store_arg]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0 segment(s) stored"));
    assert!(store.join("outbox").join(ack_file_name(device)).exists());
}

#[test]
fn a_foreign_or_damaged_segment_is_declared_lost_and_sync_goes_on() {
    let mut world = World::new(1 << 30);
    world.append(40);
    // The host receives and holds the first delivery; its acknowledgement does not reach the device yet.
    let first = world.export(&world.root.join("usb1"));
    world.store.ingest(&first).unwrap();
    let clean = world.host_segments();
    assert!(clean.len() >= 4, "{} segments", clean.len());
    // A sealed segment the host holds is damaged on the device afterwards...
    let journal_dir = world.state.journal_dir();
    let segments = list_segments(&journal_dir).unwrap();
    let (damaged_seq, damaged_path) = segments[0].clone();
    let mut bytes = std::fs::read(&damaged_path).unwrap();
    bytes[400] ^= 0x40;
    std::fs::write(&damaged_path, bytes).unwrap();
    // ...and another device's segment is copied over the next one.
    let mut stranger = World::new(1 << 30);
    stranger.append(40);
    let (foreign_seq, foreign_path) = segments[1].clone();
    std::fs::copy(&list_segments(&stranger.state.journal_dir()).unwrap()[1].1, &foreign_path).unwrap();
    world.append(10);
    let outcome = export(&world.state, &mut world.journal, &world.root.join("usb2")).unwrap();
    let declared: Vec<(u64, u64)> = outcome.lost.iter().map(|l| (l.first, l.last)).collect();
    assert_eq!(declared, [(damaged_seq, damaged_seq), (foreign_seq, foreign_seq)], "{:?}", outcome.lost);
    assert!(outcome.lost[0].reason.contains("damaged after sealing"), "{:?}", outcome.lost);
    assert!(outcome.lost[1].reason.contains("device"), "{:?}", outcome.lost);
    // The host ingests the rest, keeps its clean copies, and acknowledges past the loss.
    let report = world.store.ingest(&outcome.bundle).unwrap();
    let newest_sealed = list_segments(&journal_dir).unwrap().iter().rev().nth(1).unwrap().0;
    assert_eq!(report.ack.held_through, newest_sealed);
    let held = world.host_segments();
    assert_eq!(held[&damaged_seq], clean[&damaged_seq]);
    assert_eq!(held[&foreign_seq], clean[&foreign_seq]);
    let outcome = import_acks(&world.state, &mut world.journal, report.ack_path.parent().unwrap()).unwrap();
    assert!(matches!(outcome, Some(AckOutcome::Applied(_))), "{outcome:?}");
    // Sync goes on: later segments are exported whole and acknowledged.
    world.append(20);
    let later = export(&world.state, &mut world.journal, &world.root.join("usb3")).unwrap();
    assert!(later.lost.is_empty(), "{:?}", later.lost);
    let report = world.store.ingest(&later.bundle).unwrap();
    assert_eq!(report.ack.held_through, list_segments(&journal_dir).unwrap().iter().rev().nth(1).unwrap().0);
}
