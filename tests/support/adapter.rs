//! Random adapters for tests, as the trainer would bundle them.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use half::f16;
use nocturne::adapter::{write_adapter_bundle, AdapterSpec, Target};
use nocturne::weights::ModelPack;

/// Writes a rank-`rank` adapter for `pack` on `targets` with weights of
/// magnitude about `magnitude` (seeded), signed with `trainer`, into `out`,
/// published by the gate as far as its manifest says.
pub fn random_adapter(out: &Path, pack: &ModelPack, trainer: &SigningKey, rank: usize, targets: &[Target], magnitude: f32, seed: u64) -> PathBuf {
    let description = format!("{{\"test\": {seed}, \"published\": true}}");
    described_adapter(out, pack, trainer, (rank, targets), magnitude, seed, &description)
}

/// [`random_adapter`] with the manifest description `description`.
pub fn described_adapter(
    out: &Path,
    pack: &ModelPack,
    trainer: &SigningKey,
    (rank, targets): (usize, &[Target]),
    magnitude: f32,
    seed: u64,
    description: &str,
) -> PathBuf {
    let c = pack.config();
    let mut tensors = Vec::new();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut value = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        f16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * magnitude)
    };
    for layer in 0..c.num_hidden_layers {
        let w = pack.layer(layer);
        let shapes = [w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.gate_proj, w.up_proj, w.down_proj].map(|m| m.shape());
        for &t in targets {
            let (rows, cols) = shapes[t as usize];
            tensors.push((t.tensor_name(layer, 'A'), vec![rank, cols], (0..rank * cols).map(|_| value()).collect::<Vec<_>>().into()));
            tensors.push((t.tensor_name(layer, 'B'), vec![rows, rank], (0..rows * rank).map(|_| value()).collect::<Vec<_>>().into()));
        }
    }
    let spec = AdapterSpec {
        parent: None,
        base_model: pack.id(),
        rank: rank as u32,
        alpha: 2.0 * rank as f32,
        targets: targets.to_vec(),
        description: description.to_string(),
    };
    write_adapter_bundle(out, trainer, &spec, &tensors).unwrap()
}
