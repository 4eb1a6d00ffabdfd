//! A minimal GGUF writer for the trainer's tests: a tiny Llama with a
//! byte-level BPE vocabulary, tensors in any supported type.

#![allow(dead_code)]

use half::f16;

/// A metadata value to write.
pub enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// A tensor to write: name, ggml dims (innermost first), ggml type id, data bytes.
pub struct RawTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Serializes a GGUF v3 file.
pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[RawTensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        put_str(&mut out, key);
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|s| put_str(&mut out, s));
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|v| out.extend(v.to_le_bytes()));
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for t in tensors {
        out.extend(&t.data);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
    }
    out
}

/// Encodes f32 values as ggml type `ggml_type` (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0).
pub fn encode(values: &[f32], ggml_type: u32) -> Vec<u8> {
    let mut out = Vec::new();
    match ggml_type {
        0 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        1 => values.iter().for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        8 => {
            for block in values.chunks(32) {
                let d = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                out.extend(f16::from_f32(d).to_le_bytes());
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
            }
        }
        2 | 3 => {
            for block in values.chunks(32) {
                let (lo, hi) = block.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let (d, m) = if ggml_type == 3 { ((hi - lo) / 15.0, lo) } else { (hi.abs().max(lo.abs()) / 8.0, 0.0) };
                out.extend(f16::from_f32(d).to_le_bytes());
                if ggml_type == 3 {
                    out.extend(f16::from_f32(m).to_le_bytes());
                }
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let offset = if ggml_type == 2 { 8.0 } else { 0.0 };
                let q = |v: f32| (((v - m) * inv).round() + offset).clamp(0.0, 15.0) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        other => panic!("test writer does not encode type {other}"),
    }
    out
}

/// Pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Tokens of the tiny vocabulary: three ChatML specials, then byte-level pieces.
pub const TOKENS: [&str; 8] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "Ġ", "Ġab"];

/// A tiny Llama GGUF (hidden 64, 2 layers, 4 heads of 16, 2 KV heads,
/// vocabulary [`TOKENS`]) whose matrices use the ggml types in `matrix_types`
/// (cycled) and whose norms are F32.
pub fn tiny_llama(matrix_types: &[u32]) -> Vec<u8> {
    let (hidden, ff, layers, vocab) = (64u64, 128u64, 2, TOKENS.len() as u64);
    let meta = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.block_count", Meta::U32(layers)),
        ("llama.context_length", Meta::U32(256)),
        ("llama.embedding_length", Meta::U32(hidden as u32)),
        ("llama.feed_forward_length", Meta::U32(ff as u32)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.rope.freq_base", Meta::F32(10_000.0)),
        ("llama.rope.dimension_count", Meta::U32(16)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(TOKENS.iter().map(|s| s.to_string()).collect())),
        ("tokenizer.ggml.token_type", Meta::I32s(vec![3, 3, 3, 1, 1, 1, 1, 1])),
        ("tokenizer.ggml.merges", Meta::Strs(vec!["a b".into(), "Ġ ab".into()])),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
        ("tokenizer.ggml.padding_token_id", Meta::U32(2)),
        ("tokenizer.chat_template", Meta::Str("{{ messages }}".into())),
    ];
    let mut tensors = Vec::new();
    let mut types = matrix_types.iter().cycle();
    let mut matrix = |name: String, rows: u64, cols: u64| {
        let t = *types.next().unwrap();
        let seed = tensors_len_seed(&name);
        RawTensor { name, dims: vec![cols, rows], ggml_type: t, data: encode(&values((rows * cols) as usize, seed), t) }
    };
    let norm = |name: String| RawTensor { name, dims: vec![hidden], ggml_type: 0, data: encode(&vec![1.0; hidden as usize], 0) };
    tensors.push(matrix("token_embd.weight".into(), vocab, hidden));
    for i in 0..layers {
        tensors.push(norm(format!("blk.{i}.attn_norm.weight")));
        tensors.push(matrix(format!("blk.{i}.attn_q.weight"), 64, hidden));
        tensors.push(matrix(format!("blk.{i}.attn_k.weight"), 32, hidden));
        tensors.push(matrix(format!("blk.{i}.attn_v.weight"), 32, hidden));
        tensors.push(matrix(format!("blk.{i}.attn_output.weight"), hidden, 64));
        tensors.push(norm(format!("blk.{i}.ffn_norm.weight")));
        tensors.push(matrix(format!("blk.{i}.ffn_gate.weight"), ff, hidden));
        tensors.push(matrix(format!("blk.{i}.ffn_up.weight"), ff, hidden));
        tensors.push(matrix(format!("blk.{i}.ffn_down.weight"), hidden, ff));
    }
    tensors.push(norm("output_norm.weight".into()));
    gguf_bytes(&meta, &tensors)
}

fn tensors_len_seed(name: &str) -> u32 {
    name.bytes().fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
}
