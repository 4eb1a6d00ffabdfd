//! Fuzzing (proptest, mutation-based) of every reader of bytes that arrive
//! from outside: segment-bundle manifests, host acknowledgements, adapter
//! manifests, safetensors headers and `config.json`. Each input is a valid
//! sample with random bytes changed, inserted or cut; every reader must
//! return (an error or a value), never panic, and allocate at most a stated
//! bound: 64 KiB plus 64 bytes per input byte. A bounded number of cases runs
//! in CI (`FUZZ_CASES`, default 2,000 per reader; set it higher for a longer
//! run).

mod support;

use nocturne::config::ModelConfig;
use nocturne::ids::{AdapterId, DeviceId, ModelId};
use nocturne::profile::Precision;
use nocturne::signing::{open_sealed, peek_sealed, seal};
use nocturne::sync::ack::{Ack, ACK_DOMAIN};
use nocturne::sync::bundle::{LostRange, Manifest, SegmentEntry, MANIFEST_DOMAIN};
use nocturne::weights::TensorIndex;
use proptest::prelude::*;
use nocturne::heap::{bytes_allocated_by, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

/// Most bytes a reader may allocate for an input of `len` bytes.
fn bound(len: usize) -> usize {
    64 * 1024 + 64 * len
}

/// `sample` with random edits: byte overwrites, insertions and a cut.
fn mutated(sample: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = sample.len();
    (
        prop::collection::vec((0..len.max(1), any::<u8>()), 0..8),
        prop::collection::vec((0..=len, prop::collection::vec(any::<u8>(), 1..16)), 0..2),
        prop::option::of(0..=len),
    )
        .prop_map(move |(overwrites, inserts, cut)| {
            let mut bytes = sample.clone();
            for (at, byte) in overwrites {
                if at < bytes.len() {
                    bytes[at] = byte;
                }
            }
            for (at, extra) in inserts {
                let at = at.min(bytes.len());
                bytes.splice(at..at, extra);
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            bytes
        })
}

fn key() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

fn manifest_sample() -> Vec<u8> {
    let segments = (1..=3)
        .map(|seq| SegmentEntry { name: format!("{seq:020}.seg"), seq, bytes: 4096 * seq, sha256: [seq as u8; 32] })
        .collect();
    let lost = vec![LostRange { first: 4, last: 6, reason: "damaged after sealing".into() }];
    seal(MANIFEST_DOMAIN, &key(), &Manifest { format: 2, device: DeviceId([1; 16]), segments, cursor: 0, created_ms: 5, lost })
}

fn ack_sample() -> Vec<u8> {
    seal(ACK_DOMAIN, &key(), &Ack { device: DeviceId([2; 16]), held_through: 9, counter: 3, created_ms: 5 })
}

fn adapter_manifest_sample() -> Vec<u8> {
    let manifest = nocturne::adapter::AdapterManifest {
        format: 1,
        adapter: AdapterId([3; 16]),
        parent: None,
        base_model: ModelId([4; 32]),
        rank: 8,
        alpha: 16.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
        weights_sha256: [5; 32],
        description: r#"{"published": true}"#.into(),
        created_ms: 5,
    };
    seal(nocturne::adapter::ADAPTER_DOMAIN, &key(), &manifest)
}

fn safetensors_sample() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    support::write_pack(dir.path(), &support::tiny_config(64, 1, Precision::Int8));
    std::fs::read(dir.path().join("model.safetensors")).unwrap()
}

fn config_sample() -> Vec<u8> {
    serde_json::to_vec_pretty(&support::tiny_config(64, 2, Precision::Int8)).unwrap()
}

/// Runs `read` on `input`, checking the allocation bound.
fn check<T>(input: &[u8], read: impl FnOnce(&[u8]) -> T) -> Result<(), TestCaseError> {
    let (bytes, _) = bytes_allocated_by(|| read(input));
    prop_assert!(bytes <= bound(input.len()), "{bytes} bytes allocated for a {}-byte input", input.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn bundle_manifests(input in mutated(manifest_sample())) {
        let verifying = key().verifying_key();
        check(&input, |b| (peek_sealed::<Manifest>(b).is_ok(), open_sealed::<Manifest>(MANIFEST_DOMAIN, b, &verifying).is_ok()))?;
    }

    #[test]
    fn acknowledgements(input in mutated(ack_sample())) {
        let verifying = key().verifying_key();
        check(&input, |b| open_sealed::<Ack>(ACK_DOMAIN, b, &verifying).is_ok())?;
    }

    #[test]
    fn adapter_manifests(input in mutated(adapter_manifest_sample())) {
        let verifying = key().verifying_key();
        check(&input, |b| {
            open_sealed::<nocturne::adapter::AdapterManifest>(nocturne::adapter::ADAPTER_DOMAIN, b, &verifying).map(|m| (m.published(), m.decision())).is_ok()
        })?;
    }

    #[test]
    fn safetensors_headers(input in mutated(safetensors_sample())) {
        check(&input, |b| TensorIndex::read(b).map(|mut index| index.range("model.norm.weight", safetensors::Dtype::F32, &[64]).is_ok()).is_ok())?;
    }

    #[test]
    fn model_configs(input in mutated(config_sample())) {
        check(&input, |b| serde_json::from_slice::<ModelConfig>(b).map(|c| c.validate().is_ok()).is_ok())?;
    }
}

#[test]
fn the_samples_are_valid() {
    let verifying = key().verifying_key();
    assert!(open_sealed::<Manifest>(MANIFEST_DOMAIN, &manifest_sample(), &verifying).is_ok());
    assert!(open_sealed::<Ack>(ACK_DOMAIN, &ack_sample(), &verifying).is_ok());
    assert!(TensorIndex::read(&safetensors_sample()).is_ok());
    assert!(serde_json::from_slice::<ModelConfig>(&config_sample()).unwrap().validate().is_ok());
}
