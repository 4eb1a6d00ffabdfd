//! The journal end to end: exact round trips, recovery from torn writes and
//! zero-filled tails, damage reports for bit flips and foreign segments,
//! the quota, the lock, a fuzzed reader, and an allocation-free append.

mod support;

use std::borrow::Cow;
use std::cell::Cell;
use std::path::{Path, PathBuf};

use nocturne::journal::reader::read_segment;
use nocturne::journal::record::{self, RECORD_PREFIX};
use nocturne::journal::writer::QUEUE_DEPTH;
use nocturne::journal::segment::{scan, Framer, SegmentHeader, BLOCK, CHUNK_HEADER, HEADER_LEN};
use nocturne::ids::{AdapterId, DeviceId, ModelId};
use nocturne::journal::{
    read_journal, AdapterAction, AdapterEvent, Body, Feedback, ImplicitSignals, Interaction, Journal, JournalError,
    JournalReport, MetricsSnapshot, Record, StopReason, Thumbs,
};
use nocturne::profile::Durability;
use proptest::prelude::*;
use nocturne::heap::{Counting, THREAD_ALLOCATIONS};
use support::journal::{config, feedback, feedback_id, DEVICE};

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: u64 = 1 << 20;

fn read_all(dir: &Path) -> (Vec<Record>, JournalReport) {
    let mut records = Vec::new();
    let report = read_journal(dir, Some(DEVICE), &mut |r| records.push(r.clone())).unwrap();
    (records, report)
}

/// Writes feedback records `ids` to a fresh journal in `dir`, durably.
fn write(dir: &Path, ids: impl IntoIterator<Item = u64>, segment_bytes: u64) {
    let mut journal = Journal::open(dir, DEVICE, config(Durability::GroupCommit, segment_bytes, 64 * MIB)).unwrap();
    for id in ids {
        journal.append(&feedback(id)).unwrap();
    }
    journal.close().unwrap();
}

fn ids(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| feedback_id(&r.body).expect("an intact test record")).collect()
}

fn only_segment(dir: &Path) -> PathBuf {
    let mut segments = nocturne::journal::reader::list_segments(dir).unwrap();
    assert_eq!(segments.len(), 1);
    segments.remove(0).1
}

fn text() -> impl Strategy<Value = Cow<'static, str>> {
    ".{0,120}".prop_map(Cow::Owned)
}

fn body() -> impl Strategy<Value = Body<'static>> {
    let id = prop::array::uniform16(any::<u8>());
    let interaction = (
        (any::<u64>(), any::<u32>(), prop::array::uniform32(any::<u8>()), prop::option::of(id)),
        (text(), text(), text()),
        (any::<u32>(), any::<u32>(), any::<u32>(), 0..5usize),
        (any::<f32>().prop_filter("comparable", |x| !x.is_nan()), any::<u16>(), any::<u16>(), any::<u64>()),
    )
        .prop_map(|((conversation, turn, base, adapter), (system, prompt, reply), (p, r, n, stop), (pf, d, t, mem))| {
            Body::Interaction(Interaction {
                conversation,
                turn,
                base_model: ModelId(base),
                adapter: adapter.map(AdapterId),
                system,
                prompt,
                reply,
                prompt_tokens: p,
                reused_tokens: r,
                new_tokens: n,
                stop_reason: [StopReason::Eos, StopReason::StopString, StopReason::MaxTokens, StopReason::ContextFull, StopReason::Deadline][stop],
                prefill_tokens_per_s: pf,
                decode_tokens_per_s: f32::from(d),
                time_to_first_token_ms: f32::from(t),
                peak_memory_bytes: mem,
                persona: (turn % 3 == 0).then(|| "formal".into()),
                recalled: if turn % 2 == 0 { Cow::Borrowed(&[]) } else { Cow::Owned(vec![u64::from(turn), 1]) },
            })
        });
    let feedback = (
        1..u64::MAX,
        prop::option::of(1..=5u8),
        prop::option::of(prop_oneof![Just(Thumbs::Up), Just(Thumbs::Down)]),
        prop::option::of(text()),
        (any::<[bool; 4]>(), prop::option::of(any::<u32>())),
    )
        .prop_map(|(interaction, rating, thumbs, correction, (b, follow_up_s))| Feedback {
            interaction,
            rating,
            thumbs,
            correction,
            implicit: ImplicitSignals { regenerated: b[0], copied: b[1], edited: b[2], abandoned: b[3], follow_up_s },
        })
        .prop_filter("says something", |f| Body::Feedback(f.clone()).validate().is_ok())
        .prop_map(Body::Feedback);
    let metrics = any::<[u64; 5]>().prop_map(|m| {
        Body::Metrics(MetricsSnapshot {
            uptime_s: m[0],
            requests: m[1],
            tokens_generated: m[2],
            peak_memory_bytes: m[3],
            journal_bytes: m[4],
        })
    });
    let adapter = (any::<bool>(), id, prop::option::of(id), text()).prop_map(|(installed, a, p, reason)| {
        Body::Adapter(AdapterEvent {
            action: if installed { AdapterAction::Installed } else { AdapterAction::RolledBack },
            adapter: AdapterId(a),
            previous: p.map(AdapterId),
            reason,
        })
    });
    prop_oneof![interaction, feedback, metrics, adapter]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the device writes comes back exactly, in order, with LSNs 1, 2, …
    #[test]
    fn records_round_trip_exactly(bodies in prop::collection::vec(body(), 1..40), reopen_at in 0usize..40) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(Durability::GroupCommit, 2048, 64 * MIB);
        let mut journal = Journal::open(dir.path(), DEVICE, cfg).unwrap();
        for (i, b) in bodies.iter().enumerate() {
            if i == reopen_at {
                journal.close().unwrap();
                journal = Journal::open(dir.path(), DEVICE, cfg).unwrap();
            }
            prop_assert_eq!(journal.append(b).unwrap(), i as u64 + 1);
        }
        journal.close().unwrap();
        let (records, report) = read_all(dir.path());
        prop_assert!(report.corruption().is_empty(), "{:?}", report.corruption());
        let got: Vec<_> = records.iter().map(|r| (r.lsn, r.body.clone())).collect();
        let want: Vec<_> = bodies.into_iter().enumerate().map(|(i, b)| (i as u64 + 1, b)).collect();
        prop_assert_eq!(got, want);
    }
}

proptest! {
    // The reader's fuzz targets: many cases, each cheap.
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// The reader never panics, whatever the bytes after a valid header.
    #[test]
    fn reader_survives_arbitrary_bytes(tail in prop::collection::vec(any::<u8>(), 0..3 * BLOCK)) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = SegmentHeader { device: DEVICE, seq: 1, first_lsn: 1, created_ms: 0 }.encode().to_vec();
        bytes.extend(tail);
        let path = dir.path().join("00000000000000000001.seg");
        std::fs::write(&path, &bytes).unwrap();
        read_segment(&path, 1, Some(DEVICE), &mut |_| {}).unwrap();
        scan(&bytes[HEADER_LEN..], &mut |_, _| {});
    }

    /// Random byte edits of a real segment never make the reader return a
    /// record that was not written, nor panic.
    #[test]
    fn damaged_segments_never_yield_corrupt_records(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..20)) {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1..=300, 64 * MIB);
        let path = only_segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, value) in edits {
            let i = HEADER_LEN + at.index(bytes.len() - HEADER_LEN);
            bytes[i] = value;
        }
        std::fs::write(&path, &bytes).unwrap();
        let (records, _) = read_all(dir.path());
        let got = ids(&records);
        prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "records out of order or repeated");
        prop_assert!(records.iter().all(|r| r.lsn == feedback_id(&r.body).unwrap()));
    }
}

#[test]
fn a_torn_last_record_is_detected_at_every_cut_and_truncated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    // 40 records put the last one across the first block boundary.
    let mut ids_written: Vec<u64> = (1..=150).collect();
    write(dir.path(), ids_written.clone(), 64 * MIB);
    let path = only_segment(dir.path());
    let full = std::fs::read(&path).unwrap();
    let (records, report) = read_all(dir.path());
    assert_eq!(ids(&records), ids_written);
    let last_start = report.segments[0].damage.first().map_or(0, |d| d.range.start);
    assert_eq!(last_start, 0, "a clean segment has no damage");
    // The start of the last record: the end of the record before it.
    let mut offsets = Vec::new();
    scan(&full, &mut |offset, _| offsets.push(offset));
    let start = *offsets.last().unwrap() as usize;
    assert!(full.len() - start > 100, "the last record is long enough to cut many ways");
    for cut in start + 1..full.len() {
        std::fs::write(&path, &full[..cut]).unwrap();
        let segment = read_segment(&path, 1, Some(DEVICE), &mut |_| {}).unwrap();
        assert_eq!(segment.records, 149, "cut at {cut}");
        assert!(segment.damage.is_empty(), "cut at {cut}: {:?}", segment.damage);
        let tail = segment.tail.unwrap_or_else(|| panic!("cut at {cut}: no tail reported"));
        assert_eq!(tail.range, start as u64..cut as u64);
    }
    // Opening repairs: the tail is cut and new records follow the last intact one.
    std::fs::write(&path, &full[..full.len() - 3]).unwrap();
    let mut journal = Journal::open(dir.path(), DEVICE, config(Durability::FsyncEachRecord, 64 * MIB, 64 * MIB)).unwrap();
    let (seq, tail) = journal.recovery().truncated.clone().expect("the torn tail is reported");
    assert_eq!((seq, tail.range), (1, start as u64..full.len() as u64 - 3));
    assert_eq!(journal.append_durable(&feedback(1000)).unwrap(), 150);
    journal.close().unwrap();
    ids_written.pop();
    ids_written.push(1000);
    let (records, report) = read_all(dir.path());
    assert!(report.corruption().is_empty(), "{:?}", report.corruption());
    assert_eq!(records.iter().map(|r| r.lsn).collect::<Vec<_>>(), (1..=150).collect::<Vec<_>>());
    assert_eq!(records.last().unwrap().body, feedback(1000));
}

#[test]
fn every_cut_of_a_record_spanning_blocks_recovers_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let big = |id: u64| {
        Body::Feedback(Feedback {
            interaction: id,
            correction: Some(Cow::Owned("x".repeat(12_000))),
            ..Feedback::default()
        })
    };
    let cfg = config(Durability::GroupCommit, 64 * MIB, 64 * MIB);
    let mut journal = Journal::open(dir.path(), DEVICE, cfg).unwrap();
    for id in 1..=3 {
        journal.append(&big(id)).unwrap();
    }
    journal.close().unwrap();
    let path = only_segment(dir.path());
    let full = std::fs::read(&path).unwrap();
    let mut offsets = Vec::new();
    scan(&full, &mut |offset, _| offsets.push(offset));
    let start = offsets[2] as usize;
    assert!(start < BLOCK && full.len() > BLOCK, "the third record crosses the block boundary");
    // Every 97th byte keeps the number of opens reasonable while hitting both
    // fragments, their headers and the padding-free boundary.
    for cut in (start..full.len()).step_by(97).chain([BLOCK - 1, BLOCK, BLOCK + 1, BLOCK + 7]) {
        std::fs::write(&path, &full[..cut]).unwrap();
        let mut journal = Journal::open(dir.path(), DEVICE, cfg).unwrap();
        assert_eq!(journal.recovery().truncated.as_ref().map(|(_, t)| t.range.start), (cut > start).then_some(start as u64));
        assert_eq!(journal.next_lsn(), 3, "cut at {cut}");
        journal.append(&feedback(9)).unwrap();
        journal.close().unwrap();
        let (records, report) = read_all(dir.path());
        assert!(report.corruption().is_empty(), "cut at {cut}: {:?}", report.corruption());
        let bodies: Vec<_> = records.into_iter().map(|r| r.body).collect();
        assert_eq!(bodies, vec![big(1), big(2), feedback(9)], "cut at {cut}");
        std::fs::write(&path, &full).unwrap();
    }
}

#[test]
fn a_zero_filled_tail_is_reported_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1..=20, 64 * MIB);
    let path = only_segment(dir.path());
    let clean = std::fs::read(&path).unwrap();
    let mut bytes = clean.clone();
    bytes.extend(std::iter::repeat_n(0u8, 5000));
    std::fs::write(&path, &bytes).unwrap();
    let (records, report) = read_all(dir.path());
    assert_eq!(ids(&records), (1..=20).collect::<Vec<_>>());
    let tail = report.segments[0].tail.clone().unwrap();
    assert!(tail.zero_filled);
    assert_eq!(tail.range, clean.len() as u64..bytes.len() as u64);
    assert!(report.corruption().is_empty(), "a tail of the newest segment is not corruption");
    let journal = Journal::open(dir.path(), DEVICE, config(Durability::GroupCommit, 64 * MIB, 64 * MIB)).unwrap();
    assert!(journal.recovery().truncated.is_some());
    journal.close().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), clean);
}

#[test]
fn bit_flips_in_length_and_payload_are_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1..=400, 64 * MIB);
    let path = only_segment(dir.path());
    let clean = std::fs::read(&path).unwrap();
    let mut offsets = Vec::new();
    scan(&clean, &mut |offset, _| offsets.push(offset as usize));
    let victim = offsets[100];
    // Every bit of the length field (bytes 4-5 of the chunk), then payload bytes.
    let targets = (32..48).map(|bit| (victim + bit / 8, 1u8 << (bit % 8)));
    let payload = (0..12).map(|i| (victim + 7 + RECORD_PREFIX + i * 3, 0x40));
    for (byte, mask) in targets.chain(payload) {
        let mut bytes = clean.clone();
        bytes[byte] ^= mask;
        std::fs::write(&path, &bytes).unwrap();
        let (records, report) = read_all(dir.path());
        let got = ids(&records);
        let block_end = (victim / BLOCK + 1) * BLOCK;
        let lost: Vec<u64> = (1..=400).filter(|id| !got.contains(id)).collect();
        assert!(!lost.is_empty() && lost[0] == 101, "flip {byte}/{mask:#x}: lost {lost:?}");
        // Only records starting before the end of the damaged block are lost.
        assert!(lost.iter().all(|&id| offsets[id as usize - 1] < block_end), "flip {byte}/{mask:#x}");
        assert_eq!(got.last(), Some(&400));
        let damage: Vec<_> = report.damage().collect();
        assert_eq!(damage.len(), 1, "flip {byte}/{mask:#x}");
        assert_eq!(damage[0].1.range.start, victim as u64);
        assert_eq!(report.corruption().len(), 1);
    }
}

#[test]
fn a_damaged_header_or_foreign_segment_is_skipped_never_appended_to_or_deleted() {
    for case in ["header", "foreign"] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1..=10, 64 * MIB);
        let path = only_segment(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        match case {
            "header" => bytes[20] ^= 1,
            _ => {
                let other = tempfile::tempdir().unwrap();
                let mut journal = Journal::open(other.path(), DeviceId([9; 16]), config(Durability::GroupCommit, 64 * MIB, 64 * MIB)).unwrap();
                journal.append(&feedback(5)).unwrap();
                journal.close().unwrap();
                bytes = std::fs::read(only_segment(other.path())).unwrap();
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        let (records, report) = read_all(dir.path());
        assert!(records.is_empty());
        let problem = report.segments[0].problem.clone().unwrap();
        let expected = if case == "header" { "segment header checksum mismatch" } else { "belongs to device" };
        assert!(problem.contains(expected), "{case}: {problem}");
        assert_eq!(report.corruption().len(), 1);
        // The writer starts a new segment after it and leaves it as it was,
        // even when the quota is tight.
        let cfg = config(Durability::GroupCommit, 4096, 3 * 4096);
        let mut journal = Journal::open(dir.path(), DEVICE, cfg).unwrap();
        assert_eq!(journal.recovery().active_seq, 2, "{case}");
        assert_eq!(journal.recovery().skipped.len(), 1);
        while journal.append(&feedback(journal.next_lsn())).is_ok() {}
        journal.close().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{case}: the skipped segment changed");
    }
}

#[test]
fn damage_reaching_the_end_of_the_newest_segment_is_kept_and_lsns_move_on() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1..=20, 64 * MIB);
    let path = only_segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let mut offsets = Vec::new();
    scan(&bytes, &mut |offset, _| offsets.push(offset as usize));
    bytes[offsets[17] + CHUNK_HEADER + RECORD_PREFIX] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (records, report) = read_all(dir.path());
    assert_eq!(ids(&records), (1..=17).collect::<Vec<_>>());
    assert_eq!(report.segments[0].tail, None, "a checksum mismatch is not a torn write");
    assert_eq!(report.damage().next().unwrap().1.range, offsets[17] as u64..bytes.len() as u64);
    let mut journal = Journal::open(dir.path(), DEVICE, config(Durability::GroupCommit, 64 * MIB, 64 * MIB)).unwrap();
    assert_eq!(journal.recovery().truncated, None);
    assert_eq!(journal.recovery().active_seq, 2);
    let lsn = journal.append(&feedback(500)).unwrap();
    journal.close().unwrap();
    // Records 18-20 were acknowledged; their LSNs are never reused.
    assert!(lsn > 20, "LSN {lsn} may repeat a lost record's");
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "the damaged segment is kept as it is");
    let (records, report) = read_all(dir.path());
    assert_eq!(records.last().unwrap().lsn, lsn);
    assert_eq!(report.corruption().len(), 1);
}

#[test]
fn unknown_record_kinds_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = SegmentHeader { device: DEVICE, seq: 1, first_lsn: 1, created_ms: 0 }.encode().to_vec();
    let mut framer = Framer { offset: HEADER_LEN as u64 };
    let mut buf = vec![0u8; 1024];
    for lsn in 1..=3 {
        let n = record::encode(&mut buf, lsn, 0, &feedback(lsn)).unwrap();
        if lsn == 2 {
            buf[0] = 99; // a kind from a future version
        }
        framer.frame(&buf[..n], &mut bytes);
    }
    std::fs::write(dir.path().join("00000000000000000001.seg"), &bytes).unwrap();
    let (records, report) = read_all(dir.path());
    assert_eq!(records.iter().map(|r| r.lsn).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(report.segments[0].unknown, 1);
    assert!(report.corruption().is_empty());
    let journal = Journal::open(dir.path(), DEVICE, config(Durability::GroupCommit, 64 * MIB, 64 * MIB)).unwrap();
    assert_eq!(journal.next_lsn(), 4, "the unknown record's LSN is not reused");
}

#[test]
fn a_full_quota_refuses_records_until_the_host_acknowledges() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(Durability::GroupCommit, 4096, 4 * 4096);
    let mut journal = Journal::open(dir.path(), DEVICE, cfg).unwrap();
    let mut written = Vec::new();
    let error = loop {
        let id = journal.next_lsn();
        match journal.append(&feedback(id)) {
            Ok(lsn) => written.push(lsn),
            Err(e) => break e,
        }
    };
    assert!(matches!(error, JournalError::QuotaFull { .. }), "{error}");
    assert!(error.to_string().contains("not yet acknowledged by the host"), "{error}");
    journal.wait_durable(*written.last().unwrap()).unwrap();
    assert!(journal.used_bytes() <= cfg.disk_quota_bytes);
    // Nothing was deleted to make room.
    let (records, _) = read_all(dir.path());
    assert_eq!(ids(&records), written);
    // The host acknowledges the first two segments; their space is reused.
    journal.acknowledge_through(2).unwrap();
    assert!(journal.acknowledge_through(99).unwrap_err().to_string().contains("is not sealed"));
    let mut more = 0;
    while journal.append(&feedback(journal.next_lsn())).is_ok() {
        more += 1;
    }
    journal.close().unwrap();
    assert!(more > 0);
    let (records, report) = read_all(dir.path());
    assert!(report.segments.iter().all(|s| s.seq > 2), "only acknowledged segments are reclaimed");
    let kept = ids(&records);
    assert!(written.iter().filter(|&&lsn| lsn >= kept[0]).all(|lsn| kept.contains(lsn)));
    assert!(kept[0] > 1);
    // Every record of an unacknowledged segment is still there.
    let first_unacked = report.segments[0].header.unwrap().first_lsn;
    assert_eq!(kept[0], first_unacked);
    assert_eq!(*kept.last().unwrap(), written.last().unwrap() + more);
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(Durability::GroupCommit, 64 * MIB, 64 * MIB);
    let journal = Journal::open(dir.path(), DEVICE, cfg).unwrap();
    let err = Journal::open(dir.path(), DEVICE, cfg).err().unwrap();
    assert!(matches!(err, JournalError::Locked(_)), "{err}");
    journal.close().unwrap();
    Journal::open(dir.path(), DEVICE, cfg).unwrap();
}

#[test]
fn append_makes_no_allocation_on_the_calling_thread() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path(), DEVICE, config(Durability::FsyncEachRecord, 16 * 1024, 64 * MIB)).unwrap();
    let reply = "Paris is the capital of France.".repeat(20);
    let body = Body::Interaction(Interaction {
        conversation: 1,
        turn: 0,
        base_model: ModelId([1; 32]),
        adapter: None,
        system: Cow::Borrowed("You are a helpful assistant."),
        prompt: Cow::Borrowed("What is the capital of France?"),
        reply: Cow::Borrowed(&reply),
        prompt_tokens: 30,
        reused_tokens: 0,
        new_tokens: 8,
        stop_reason: StopReason::Eos,
        prefill_tokens_per_s: 140.0,
        decode_tokens_per_s: 60.0,
        time_to_first_token_ms: 210.0,
        peak_memory_bytes: 200 << 20,
        persona: None,
        recalled: Cow::Borrowed(&[]),
    });
    // Warm-up: enough records to fill the queue once, so the channel has
    // registered this thread as a waiting sender (a one-time allocation).
    for _ in 0..4 * QUEUE_DEPTH {
        journal.append(&body).unwrap();
    }
    let before = THREAD_ALLOCATIONS.with(Cell::get);
    let mut last = 0;
    for _ in 0..200 {
        last = journal.append(&body).unwrap();
    }
    let allocations = THREAD_ALLOCATIONS.with(Cell::get) - before;
    assert_eq!(allocations, 0);
    journal.wait_durable(last).unwrap();
    journal.close().unwrap();
    let (records, report) = read_all(dir.path());
    assert_eq!(records.len(), 200 + 4 * QUEUE_DEPTH);
    assert!(report.segments.len() > 5, "the 200 records rolled segments");
}

#[test]
fn a_sealed_segment_cut_at_a_record_boundary_is_reported_as_lost_records() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 1..=200, 4096);
    let segments = nocturne::journal::reader::list_segments(dir.path()).unwrap();
    assert!(segments.len() >= 3);
    let (records, report) = read_all(dir.path());
    assert!(report.corruption().is_empty(), "{:?}", report.corruption());
    let first_of_third = report.segments[2].lsns.unwrap().0;
    let (second_first, second_last) = report.segments[1].lsns.unwrap();
    // Cut the second (sealed) segment back to its header: no torn bytes remain,
    // but the third segment's first LSN shows what it held.
    let file = std::fs::OpenOptions::new().write(true).open(&segments[1].1).unwrap();
    file.set_len(HEADER_LEN as u64).unwrap();
    let (after, report) = read_all(dir.path());
    assert_eq!(after.len() as u64, records.len() as u64 - (second_last - second_first + 1));
    let problems = report.corruption();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains(&format!("next segment starts at LSN {first_of_third}")) && problems[0].contains("missing"), "{problems:?}");
}
