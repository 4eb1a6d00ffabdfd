//! Loading a pack maps it: heap use at open does not grow with the weights,
//! and resident memory grows only as pages are touched.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use nocturne::profile::Precision;
use nocturne::weights::{Matrix, ModelPack};
use nocturne::heap::{Counting, BYTES};
use support::{tiny_config, write_pack};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The tests of this binary measure process-wide counters: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn heap_bytes_of_open(dir: &std::path::Path) -> (usize, ModelPack) {
    let before = BYTES.load(Ordering::SeqCst);
    let pack = ModelPack::open(dir).unwrap();
    (BYTES.load(Ordering::SeqCst) - before, pack)
}

#[test]
fn heap_use_at_open_is_independent_of_weight_size() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    for precision in [Precision::Int8, Precision::Fp16] {
        // Same tensor count, 16x the weight bytes.
        let small = tmp.path().join(format!("small-{}", precision.name()));
        let large = tmp.path().join(format!("large-{}", precision.name()));
        write_pack(&small, &tiny_config(64, 4, precision));
        write_pack(&large, &tiny_config(256, 4, precision));
        let (small_heap, small_pack) = heap_bytes_of_open(&small);
        let (large_heap, large_pack) = heap_bytes_of_open(&large);
        assert!(large_pack.mapped_bytes() > 10 * small_pack.mapped_bytes());
        // Header parsing sees longer digits in the large header's offsets;
        // anything proportional to the weights would be megabytes.
        assert!(
            large_heap.abs_diff(small_heap) < 1024,
            "{}: open allocated {small_heap} bytes for {} mapped bytes and {large_heap} for {}",
            precision.name(),
            small_pack.mapped_bytes(),
            large_pack.mapped_bytes()
        );
        assert!(large_heap < 256 << 10, "{large_heap} heap bytes at open");
    }
}

fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
}

#[test]
fn resident_set_grows_only_as_pages_are_touched() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    // About 50 MB of fp16 weights.
    write_pack(tmp.path(), &tiny_config(1024, 4, Precision::Fp16));
    let before = resident_bytes();
    let pack = ModelPack::open(tmp.path()).unwrap();
    let after_open = resident_bytes();
    let mapped = pack.mapped_bytes();
    assert!(mapped > 40 << 20, "{mapped}");
    assert!(
        after_open.saturating_sub(before) < mapped / 20,
        "opening made {} of {mapped} mapped bytes resident",
        after_open - before
    );
    let mut checksum = 0u64;
    for layer in 0..pack.config().num_hidden_layers {
        let w = pack.layer(layer);
        for m in [w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.gate_proj, w.up_proj, w.down_proj] {
            let Matrix::F16 { values, .. } = m else { panic!("fp16 pack") };
            checksum += values.iter().step_by(512).map(|v| v.to_bits() as u64).sum::<u64>();
        }
    }
    let after_touch = resident_bytes();
    assert!(checksum > 0);
    assert!(
        after_touch - after_open > mapped / 2,
        "touching every page made only {} of {mapped} bytes resident",
        after_touch - after_open
    );
}
