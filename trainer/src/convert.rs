//! GGUF → nocturne model packs (HF-style model directories).
//!
//! Principal items: [`convert`], [`model_config`], [`gguf_name`],
//! [`unpermute_rows`], [`ConvertReport`].
//!
//! One GGUF file becomes two directories, `int8/` and `fp16/`, each holding
//! `config.json`, `tokenizer.json`, `tokenizer_config.json` and
//! `model.safetensors` in the layout of [`nocturne::weights`]. Every tensor is
//! dequantized to f32 once and encoded for both packs. llama.cpp's
//! `convert_hf_to_gguf.py` permutes the rows of `attn_q` and `attn_k` so that
//! each head's rotary pairs are interleaved (`(n_head, 2, d/2)` →
//! `(n_head, d/2, 2)`); [`unpermute_rows`] restores Hugging Face's
//! half-split layout, which the runtime's RoPE expects.
//!
//! Invariants: a pack directory appears complete or not at all (written under
//! a temporary name, then renamed); tensor shapes are checked against the
//! config before anything is written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use half::f16;
use indicatif::{ProgressBar, ProgressStyle};
use nocturne::config::{ModelConfig, QuantizationConfig, INT8_BLOCK, INT8_MODEL_TYPE, INT8_QUANT_METHOD};
use nocturne::profile::Precision;
use nocturne::weights::{pack_layout, TensorKind, CONFIG_FILE, DIGEST_FILE, SCALE_SUFFIX, TOKENIZER_FILE, WEIGHTS_FILE};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::gguf::{GgufError, GgufFile};
use crate::gguf_tokenizer::build_tokenizer;
use nocturne::durable_file::write_dir_atomic;
use nocturne::quant::quantize_int8;

/// What a conversion wrote.
#[derive(Debug)]
pub struct ConvertReport {
    /// `(precision, pack directory, weights file bytes)` for each pack.
    pub packs: Vec<(Precision, PathBuf, u64)>,
    /// Tensors converted per pack.
    pub tensors: usize,
}

/// The Hugging Face config of the fp16 pack, from `llama.*` metadata.
///
/// # Errors
/// When the architecture is not `llama` or a required key is missing.
pub fn model_config(gguf: &GgufFile) -> Result<ModelConfig, GgufError> {
    let arch = gguf.str("general.architecture")?;
    if arch != "llama" {
        return Err(GgufError::invalid(gguf.path(), format!("architecture {arch:?} is not supported (only \"llama\")")));
    }
    let hidden = gguf.usize("llama.embedding_length")?;
    let heads = gguf.usize("llama.attention.head_count")?;
    Ok(ModelConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        name_or_path: None,
        hidden_size: hidden,
        intermediate_size: gguf.usize("llama.feed_forward_length")?,
        num_hidden_layers: gguf.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: gguf.usize("llama.attention.head_count_kv").unwrap_or(heads),
        head_dim: gguf.usize("llama.rope.dimension_count").unwrap_or(hidden / heads.max(1)),
        max_position_embeddings: gguf.usize("llama.context_length")?,
        rms_norm_eps: gguf.f64("llama.attention.layer_norm_rms_epsilon")? as f32,
        rope_theta: gguf.f64("llama.rope.freq_base").unwrap_or(10_000.0) as f32,
        vocab_size: gguf.array("tokenizer.ggml.tokens")?.len(),
        tie_word_embeddings: gguf.tensor("output.weight").is_none(),
        bos_token_id: gguf.usize("tokenizer.ggml.bos_token_id")? as u32,
        eos_token_id: gguf.usize("tokenizer.ggml.eos_token_id")? as u32,
        hidden_act: "silu".into(),
        torch_dtype: "float16".into(),
        quantization_config: None,
    })
}

/// The GGUF name of a Hugging Face Llama tensor name, or `None` if the name is
/// not part of the Llama layout.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "input_layernorm.weight" => "attn_norm",
        "self_attn.q_proj.weight" => "attn_q",
        "self_attn.k_proj.weight" => "attn_k",
        "self_attn.v_proj.weight" => "attn_v",
        "self_attn.o_proj.weight" => "attn_output",
        "post_attention_layernorm.weight" => "ffn_norm",
        "mlp.gate_proj.weight" => "ffn_gate",
        "mlp.up_proj.weight" => "ffn_up",
        "mlp.down_proj.weight" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}.weight"))
}

/// Undoes llama.cpp's rotary row permutation of a `[rows, cols]` Q or K
/// matrix with `n_head` heads: row `h·d + 2j + i` of the GGUF tensor becomes
/// row `h·d + i·d/2 + j` (`d = rows / n_head`, `i ∈ {0, 1}`, `j < d/2`).
pub fn unpermute_rows(x: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let d = rows / n_head;
    let mut out = vec![0.0; x.len()];
    for h in 0..n_head {
        for j in 0..d / 2 {
            for i in 0..2 {
                let src = (h * d + 2 * j + i) * cols;
                let dst = (h * d + i * d / 2 + j) * cols;
                out[dst..dst + cols].copy_from_slice(&x[src..src + cols]);
            }
        }
    }
    out
}

/// One tensor ready to be written: name, dtype, shape, little-endian bytes.
type Encoded = (String, Dtype, Vec<usize>, Vec<u8>);

/// Converts `gguf` into `out/int8` and `out/fp16`, replacing earlier packs.
/// Shows a progress bar on a terminal.
///
/// # Errors
/// Unsupported or malformed GGUF content (naming the file and tensor), or a
/// write failure (naming the path).
pub fn convert(gguf: &GgufFile, out: &Path, upstream: Option<&str>) -> anyhow::Result<ConvertReport> {
    let mut config = model_config(gguf)?;
    config.name_or_path = upstream.map(str::to_string);
    let built = build_tokenizer(gguf)?;
    let mut int8_config = config.clone();
    int8_config.quantization_config =
        Some(QuantizationConfig { quant_method: INT8_QUANT_METHOD.into(), block_size: INT8_BLOCK });
    int8_config.model_type = INT8_MODEL_TYPE.into();
    int8_config.validate().map_err(|e| anyhow::anyhow!("{}: model shape: {e}", gguf.path().display()))?;

    let layers_possible = gguf.tensors.len() / nocturne::weights::TENSORS_PER_LAYER;
    if config.num_hidden_layers > layers_possible {
        bail!(
            "{}: llama.block_count is {} but the file holds only {} tensors",
            gguf.path().display(),
            config.num_hidden_layers,
            gguf.tensors.len()
        );
    }
    let layout = pack_layout(&config);
    let bar = ProgressBar::new(layout.len() as u64).with_style(
        ProgressStyle::with_template("converting {bar:40} {pos}/{len} tensors {msg}").expect("static template"),
    );
    let (mut int8, mut fp16): (Vec<Encoded>, Vec<Encoded>) = (Vec::new(), Vec::new());
    for spec in &layout {
        bar.set_message(spec.name.clone());
        let source = gguf_name(&spec.name).expect("pack_layout names are Llama names");
        let tensor = gguf.tensor(&source).with_context(|| format!("{}: tensor `{source}` is missing", gguf.path().display()))?;
        let (rows, cols) = match spec.kind {
            TensorKind::Matrix { rows, cols } => (rows, cols),
            TensorKind::Norm { len } => (1, len),
        };
        let expected_dims: &[usize] = if rows == 1 { &[cols] } else { &[cols, rows] };
        if tensor.dims != expected_dims {
            bail!(
                "{}: tensor `{source}` has ggml dimensions {:?}, the config implies {expected_dims:?}",
                gguf.path().display(),
                tensor.dims
            );
        }
        let mut values = gguf.dequantize(&source)?;
        if spec.name.ends_with("q_proj.weight") {
            values = unpermute_rows(&values, rows, cols, config.num_attention_heads);
        } else if spec.name.ends_with("k_proj.weight") {
            values = unpermute_rows(&values, rows, cols, config.num_key_value_heads);
        }
        match spec.kind {
            TensorKind::Norm { len } => {
                let bytes = bytemuck::cast_slice::<f32, u8>(&values).to_vec();
                int8.push((spec.name.clone(), Dtype::F32, vec![len], bytes.clone()));
                fp16.push((spec.name.clone(), Dtype::F32, vec![len], bytes));
            }
            TensorKind::Matrix { rows, cols } => {
                let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
                fp16.push((spec.name.clone(), Dtype::F16, vec![rows, cols], bytemuck::cast_slice(&halves).to_vec()));
                let q = quantize_int8(&values);
                int8.push((spec.name.clone(), Dtype::I8, vec![rows, cols], bytemuck::cast_slice(&q.values).to_vec()));
                int8.push((
                    format!("{}{SCALE_SUFFIX}", spec.name),
                    Dtype::F16,
                    vec![rows, cols / INT8_BLOCK],
                    bytemuck::cast_slice(&q.scales).to_vec(),
                ));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();

    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut packs = Vec::new();
    for (precision, pack_config, tensors) in [(Precision::Int8, &int8_config, int8), (Precision::Fp16, &config, fp16)] {
        let dir = out.join(precision.name());
        write_pack(&dir, pack_config, &built, &tensors)?;
        let bytes = std::fs::metadata(dir.join(WEIGHTS_FILE))?.len();
        packs.push((precision, dir, bytes));
    }
    Ok(ConvertReport { packs, tensors: layout.len() })
}

/// Writes one pack directory whole ([`write_dir_atomic`]: into `.<name>.tmp`
/// beside it, fsynced, renamed).
fn write_pack(
    dir: &Path,
    config: &ModelConfig,
    tokenizer: &crate::gguf_tokenizer::BuiltTokenizer,
    tensors: &[Encoded],
) -> anyhow::Result<()> {
    let parent = dir.parent().context("a pack directory has a parent")?;
    let name = dir.file_name().context("a pack directory has a name")?.to_string_lossy().to_string();
    write_dir_atomic(parent, &format!(".{name}.tmp"), |tmp| {
        let write_json = |file: &str, value: &serde_json::Value| -> anyhow::Result<()> {
            let path = tmp.join(file);
            std::fs::write(&path, serde_json::to_string_pretty(value)? + "\n")
                .with_context(|| format!("cannot write {}", path.display()))
        };
        write_json(CONFIG_FILE, &serde_json::to_value(config)?)?;
        write_json("tokenizer_config.json", &tokenizer.config)?;
        let tokenizer_path = tmp.join(TOKENIZER_FILE);
        tokenizer
            .tokenizer
            .save(&tokenizer_path, false)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tokenizer_path.display()))?;
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| Ok((name.as_str(), TensorView::new(*dtype, shape.clone(), bytes)?)))
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let metadata = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
        let weights = tmp.join(WEIGHTS_FILE);
        safetensors::serialize_to_file(views, metadata, &weights)
            .with_context(|| format!("cannot write {}", weights.display()))?;
        let digest = nocturne::digest::sha256_file(&weights)?;
        std::fs::write(tmp.join(DIGEST_FILE), nocturne::digest::digest_line(&digest, WEIGHTS_FILE))
            .with_context(|| format!("cannot write {}", tmp.join(DIGEST_FILE).display()))?;
        Ok::<_, anyhow::Error>(name)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permutation, written from its definition: reshape to
    /// `(n_head, 2, d/2, cols)`, swap axes 1 and 2.
    fn permute_like_llama_cpp(x: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let d = rows / n_head;
        let mut out = vec![0.0; x.len()];
        for h in 0..n_head {
            for i in 0..2 {
                for j in 0..d / 2 {
                    let src = (h * d + i * d / 2 + j) * cols;
                    let dst = (h * d + j * 2 + i) * cols;
                    out[dst..dst + cols].copy_from_slice(&x[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_restores_half_split_rows_of_a_known_tensor() {
        // One head of dimension 4, one column: HF rows r0 r1 r2 r3 are stored
        // by llama.cpp as r0 r2 r1 r3 (rotary pairs (r0, r2), (r1, r3) interleaved).
        assert_eq!(unpermute_rows(&[0.0, 2.0, 1.0, 3.0], 4, 1, 1), vec![0.0, 1.0, 2.0, 3.0]);
        // Two heads of dimension 4, two columns.
        let gguf = [10., 11., 30., 31., 20., 21., 40., 41., 50., 51., 70., 71., 60., 61., 80., 81.];
        let hf = [10., 11., 20., 21., 30., 31., 40., 41., 50., 51., 60., 61., 70., 71., 80., 81.];
        assert_eq!(unpermute_rows(&gguf, 8, 2, 2), hf);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        let (rows, cols, heads) = (3 * 64, 5, 3);
        let x: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        assert_eq!(unpermute_rows(&permute_like_llama_cpp(&x, rows, cols, heads), rows, cols, heads), x);
    }

    #[test]
    fn every_layout_name_has_a_gguf_name() {
        assert_eq!(gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(), Some("blk.12.attn_output.weight"));
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_name("model.layers.0.rotary_emb.inv_freq"), None);
    }
}
