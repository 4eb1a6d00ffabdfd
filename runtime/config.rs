//! The model configuration (`config.json` of an HF-style model directory).
//!
//! Principal types: [`ModelConfig`] (the LlamaConfig fields nocturne uses),
//! [`QuantizationConfig`] (present in int8 packs). Errors are [`FileError`]s.
//!
//! Invariants of a validated config: all dimensions are non-zero;
//! `num_attention_heads` is a multiple of `num_key_value_heads`; `head_dim` is
//! even (RoPE rotates pairs); in an int8 pack every matrix input dimension is a
//! multiple of the quantization block.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::file_error::FileError;
use crate::profile::Precision;

/// Elements per int8 quantization block, along a matrix's input dimension.
pub const INT8_BLOCK: usize = 32;

/// Largest dimension (layers, heads, widths, vocabulary) a config may state:
/// far above any model this runtime can hold, small enough that products of
/// two dimensions cannot overflow.
pub const MAX_DIMENSION: usize = 1 << 24;

/// `quant_method` written into `config.json` of an int8 pack.
pub const INT8_QUANT_METHOD: &str = "nocturne-int8";

/// `model_type` of an int8 pack's `config.json`. Not "llama": Hugging Face
/// transformers skips a `quantization_config` it does not know with a
/// warning and would read the int8 codes as plain weights; an unknown
/// `model_type` makes it refuse the directory instead. (Packs written before
/// this say "llama" and are still read.)
pub const INT8_MODEL_TYPE: &str = "llama-nocturne-int8";

/// The `quantization_config` of an int8 pack: symmetric int8 values, one f16
/// scale per block of [`INT8_BLOCK`] inputs, stored as `<name>.weight` (I8,
/// `[out, in]`) and `<name>.weight_scale` (F16, `[out, in / block_size]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    /// Always [`INT8_QUANT_METHOD`].
    pub quant_method: String,
    /// Inputs per block; always [`INT8_BLOCK`].
    pub block_size: usize,
}

/// The fields of a Hugging Face `LlamaConfig` that nocturne reads and writes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `["LlamaForCausalLM"]`.
    pub architectures: Vec<String>,
    /// `"llama"`; [`INT8_MODEL_TYPE`] in int8 packs.
    pub model_type: String,
    /// The model these weights came from, as a Hugging Face repository id
    /// (`_name_or_path`, as transformers writes it), when the manifest names it.
    #[serde(rename = "_name_or_path", default, skip_serializing_if = "Option::is_none")]
    pub name_or_path: Option<String>,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Longest context the model was trained for, tokens.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence token id.
    pub bos_token_id: u32,
    /// End-of-sequence token id.
    pub eos_token_id: u32,
    /// `"silu"`.
    pub hidden_act: String,
    /// `"float16"` for both packs (the int8 pack's scales are f16).
    pub torch_dtype: String,
    /// Present in int8 packs only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<QuantizationConfig>,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    ///
    /// # Errors
    /// [`FileError::Io`] when the file cannot be read, [`FileError::Invalid`]
    /// when it is not a valid config (the message names the field).
    pub fn read(path: &Path) -> Result<ModelConfig, FileError> {
        let text = crate::file_read::read_text(path, crate::file_read::limit::CONFIG)?;
        let config: ModelConfig =
            serde_json::from_str(&text).map_err(|e| FileError::invalid(path, e.to_string()))?;
        config.validate().map_err(|problem| FileError::invalid(path, problem))?;
        Ok(config)
    }

    /// Weight precision of the pack this config describes.
    pub fn precision(&self) -> Precision {
        if self.quantization_config.is_some() {
            Precision::Int8
        } else {
            Precision::Fp16
        }
    }

    /// Width of the concatenated query heads (`num_attention_heads × head_dim`).
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads (`num_key_value_heads × head_dim`).
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Checks the invariants in the module documentation.
    ///
    /// # Errors
    /// A message naming the first field that breaks one.
    pub fn validate(&self) -> Result<(), String> {
        let int8 = self.quantization_config.is_some();
        if !(self.model_type == "llama" || (int8 && self.model_type == INT8_MODEL_TYPE)) {
            let expected = if int8 { format!("\"llama\" or {INT8_MODEL_TYPE:?}") } else { "\"llama\"".to_string() };
            return Err(format!("model_type is {:?}, expected {expected}", self.model_type));
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act is {:?}, only \"silu\" is supported", self.hidden_act));
        }
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if value == 0 {
                return Err(format!("{field} must be greater than zero"));
            }
            if value > MAX_DIMENSION {
                return Err(format!("{field} is {value}, above the largest this runtime accepts ({MAX_DIMENSION})"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err("rms_norm_eps and rope_theta must be positive".into());
        }
        if let Some(q) = &self.quantization_config {
            if q.quant_method != INT8_QUANT_METHOD || q.block_size != INT8_BLOCK {
                return Err(format!(
                    "quantization_config is {:?} with block_size {}, expected {INT8_QUANT_METHOD:?} with block_size {INT8_BLOCK}",
                    q.quant_method, q.block_size
                ));
            }
            for (field, value) in [
                ("hidden_size", self.hidden_size),
                ("intermediate_size", self.intermediate_size),
                ("num_attention_heads × head_dim", self.q_width()),
            ] {
                if value % INT8_BLOCK != 0 {
                    return Err(format!("{field} ({value}) is not a multiple of the int8 block ({INT8_BLOCK})"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2(int8: bool, model_type: &str) -> ModelConfig {
        ModelConfig {
            architectures: vec!["LlamaForCausalLM".into()],
            model_type: model_type.into(),
            name_or_path: None,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            max_position_embeddings: 8192,
            rms_norm_eps: 1e-5,
            rope_theta: 100_000.0,
            vocab_size: 49152,
            tie_word_embeddings: true,
            bos_token_id: 1,
            eos_token_id: 2,
            hidden_act: "silu".into(),
            torch_dtype: "float16".into(),
            quantization_config: int8.then(|| QuantizationConfig { quant_method: INT8_QUANT_METHOD.into(), block_size: INT8_BLOCK }),
        }
    }

    #[test]
    fn the_int8_model_type_needs_the_int8_quantization_and_old_int8_packs_still_read() {
        assert_eq!(smollm2(true, INT8_MODEL_TYPE).validate(), Ok(()));
        assert_eq!(smollm2(true, "llama").validate(), Ok(()), "packs written before the int8 model_type");
        assert_eq!(smollm2(false, "llama").validate(), Ok(()));
        let err = smollm2(false, INT8_MODEL_TYPE).validate().unwrap_err();
        assert!(err.contains("model_type is \"llama-nocturne-int8\", expected \"llama\""), "{err}");
        assert!(smollm2(true, "mistral").validate().unwrap_err().contains("expected \"llama\" or \"llama-nocturne-int8\""));
    }

    #[test]
    fn the_upstream_name_is_read_and_written_as_transformers_names_it() {
        let mut config = smollm2(false, "llama");
        config.name_or_path = Some("HuggingFaceTB/SmolLM2-135M-Instruct".into());
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["_name_or_path"], "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(serde_json::from_value::<ModelConfig>(json).unwrap(), config);
        let unnamed = serde_json::to_value(smollm2(false, "llama")).unwrap();
        assert!(unnamed.get("_name_or_path").is_none());
    }
}
