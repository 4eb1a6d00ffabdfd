//! Fuzzing (proptest, mutation-based) of the GGUF reader: a valid tiny GGUF
//! with random bytes changed, inserted or cut must open or be refused,
//! never panic, and allocate at most 64 KiB plus 64 bytes per file byte
//! while opening; every tensor of a file that opens dequantizes within
//! 16 bytes per file byte (its data lies inside the file). `FUZZ_CASES`
//! (default 500) sets the number of cases.

mod support;

use nocturne::heap::{bytes_allocated_by, Counting};
use nocturne_trainer::gguf::GgufFile;
use proptest::prelude::*;

#[global_allocator]
static GLOBAL: Counting = Counting;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn gguf_files(
        overwrites in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
        types in prop::sample::select(vec![vec![0u32], vec![1], vec![2], vec![3], vec![8]]),
    ) {
        let mut bytes = support::tiny_llama(&types);
        for (at, byte) in overwrites {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Some(cut) = cut {
            let keep = cut.index(bytes.len() + 1);
            bytes.truncate(keep);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let (allocated, opened) = bytes_allocated_by(|| GgufFile::open(&path));
        prop_assert!(allocated <= 64 * 1024 + 64 * bytes.len(), "{allocated} bytes allocated opening a {}-byte file", bytes.len());
        if let Ok(gguf) = opened {
            for tensor in gguf.tensors.clone() {
                let (allocated, values) = bytes_allocated_by(|| gguf.dequantize(&tensor.name));
                prop_assert!(values.is_ok());
                prop_assert!(allocated <= 16 * bytes.len(), "{allocated} bytes for tensor {}", tensor.name);
            }
        }
    }
}
