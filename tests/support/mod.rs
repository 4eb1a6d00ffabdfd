//! Synthetic model directories for the runtime's integration tests.

#![allow(dead_code)]

pub mod adapter;
pub mod journal;

use std::path::Path;

use half::f16;
use nocturne::config::{ModelConfig, QuantizationConfig, INT8_BLOCK, INT8_QUANT_METHOD};
use nocturne::profile::Precision;
use nocturne::weights::{pack_layout, TensorKind, CONFIG_FILE, DIGEST_FILE, SCALE_SUFFIX, TOKENIZER_FILE, WEIGHTS_FILE};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A small Llama config: `layers` layers of width `hidden`.
pub fn tiny_config(hidden: usize, layers: usize, precision: Precision) -> ModelConfig {
    ModelConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        name_or_path: None,
        hidden_size: hidden,
        intermediate_size: 2 * hidden,
        num_hidden_layers: layers,
        num_attention_heads: hidden / 16,
        num_key_value_heads: hidden / 32,
        head_dim: 16,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        vocab_size: 96,
        tie_word_embeddings: true,
        bos_token_id: 1,
        eos_token_id: 2,
        hidden_act: "silu".into(),
        torch_dtype: "float16".into(),
        quantization_config: (precision == Precision::Int8)
            .then(|| QuantizationConfig { quant_method: INT8_QUANT_METHOD.into(), block_size: INT8_BLOCK }),
    }
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// The tensors of a valid pack for `config`: `(name, dtype, shape, bytes)`.
pub fn pack_tensors(config: &ModelConfig) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, spec) in pack_layout(config).into_iter().enumerate() {
        match spec.kind {
            TensorKind::Norm { len } => {
                let ones: Vec<f32> = vec![1.0; len];
                out.push((spec.name, Dtype::F32, vec![len], bytemuck::cast_slice(&ones).to_vec()));
            }
            TensorKind::Matrix { rows, cols } => match config.precision() {
                Precision::Int8 => {
                    let scales = vec![f16::from_f32(0.01); rows * cols / INT8_BLOCK];
                    out.push((
                        format!("{}{SCALE_SUFFIX}", spec.name),
                        Dtype::F16,
                        vec![rows, cols / INT8_BLOCK],
                        bytemuck::cast_slice(&scales).to_vec(),
                    ));
                    out.push((spec.name, Dtype::I8, vec![rows, cols], noise(rows * cols, i as u64)));
                }
                Precision::Fp16 => {
                    let values: Vec<f16> =
                        noise(rows * cols, i as u64).iter().map(|&b| f16::from_f32((b as f32 - 128.0) / 512.0)).collect();
                    out.push((spec.name, Dtype::F16, vec![rows, cols], bytemuck::cast_slice(&values).to_vec()));
                }
            },
        }
    }
    out
}

/// Writes `config.json`, a placeholder `tokenizer.json` and `model.safetensors`
/// holding `tensors` into `dir`.
pub fn write_dir(dir: &Path, config: &ModelConfig, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(config).unwrap()).unwrap();
    std::fs::write(dir.join(TOKENIZER_FILE), "{}").unwrap();
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join(WEIGHTS_FILE)).unwrap();
    let digest = nocturne::digest::sha256_file(&dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(DIGEST_FILE), nocturne::digest::digest_line(&digest, WEIGHTS_FILE)).unwrap();
}

/// Writes a complete, valid pack for `config` into `dir`.
pub fn write_pack(dir: &Path, config: &ModelConfig) {
    write_dir(dir, config, &pack_tensors(config));
}

/// Replaces the JSON header of `dir/model.safetensors` with `edit(header)`,
/// keeping the data bytes.
pub fn edit_header(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_string(&header).unwrap();
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text.as_bytes());
    out.extend(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
}
