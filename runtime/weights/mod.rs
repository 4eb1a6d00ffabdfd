//! The memory-mapped weight pack.
//!
//! Principal types: [`ModelPack`] (an opened, validated model directory),
//! [`Matrix`] and [`LayerWeights`] (zero-copy views into the mapping),
//! [`TensorSpec`] (the pack layout). Errors are [`FileError`]s.
//!
//! A model directory holds `config.json` ([`ModelConfig`]), `tokenizer.json`
//! and `model.safetensors` ([safetensors format](https://github.com/huggingface/safetensors):
//! u64 little-endian header length, JSON header, raw little-endian data).
//! Tensor names follow Hugging Face's `LlamaForCausalLM`. Matrices are
//! `[out, in]` row-major; in an fp16 pack they are F16; in an int8 pack
//! `<name>.weight` is I8 `[out, in]` and `<name>.weight_scale` is F16
//! `[out, in / 32]` (symmetric per-block quantization: `w = q × scale`).
//! RMSNorm weights are F32 in both packs.
//!
//! Invariants:
//! - [`ModelPack::open`] validates the header, every dtype, shape, offset and
//!   alignment against `config.json` before it returns; no tensor is missing,
//!   unexpected, overlapping or out of bounds. After that, views cannot fail.
//! - No weight byte is copied: every view borrows the read-only mapping. Heap
//!   use at open is proportional to the number of tensors, not their size.
//! - Pages are read from disk only when touched (the kernel's readahead is
//!   hinted with `madvise(MADV_WILLNEED)`).
//! - The pack file must not be truncated or rewritten while it is mapped
//!   (the same contract as llama.cpp's mmap loader); packs are replaced by
//!   writing a new directory and renaming it.

use std::ops::Range;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::{Advice, Mmap};
use safetensors::{Dtype, SafeTensors};

use crate::config::{ModelConfig, INT8_BLOCK};
use crate::digest::parse_digest_line;
use crate::file_error::FileError;
use crate::file_read::{limit, open_regular, read_text_if_exists};
use crate::ids::ModelId;
use crate::profile::Precision;

#[cfg(target_endian = "big")]
compile_error!("weight packs are little-endian; big-endian targets are not supported");

/// Name of the configuration file in a model directory.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the tokenizer file in a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Name of the weights file in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the file holding the SHA-256 of [`WEIGHTS_FILE`] (`sha256sum`
/// format), written by the converter. It is the base model's id.
pub const DIGEST_FILE: &str = "model.sha256";
/// Suffix of the int8 scale tensor that accompanies `<name>.weight`.
pub const SCALE_SUFFIX: &str = "_scale";

/// What kind of tensor a [`TensorSpec`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// A `[rows, cols]` weight matrix, stored in the pack's precision.
    Matrix {
        /// Output dimension.
        rows: usize,
        /// Input dimension.
        cols: usize,
    },
    /// An RMSNorm weight vector of `len` elements, stored as F32.
    Norm {
        /// Elements.
        len: usize,
    },
}

/// One tensor of the pack layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape and role.
    pub kind: TensorKind,
}

/// Tensors per transformer layer, in [`pack_layout`] order: input norm, q, k,
/// v, o, post-attention norm, gate, up, down.
pub const TENSORS_PER_LAYER: usize = 9;

/// Bytes of tensor data a pack for `config` holds (what [`pack_layout`]
/// lists, in the config's precision), computed without allocating and with
/// checked arithmetic: `None` when it does not fit in a u64. Opening a pack
/// compares it with the file's size before anything is sized from the
/// config.
pub fn pack_data_bytes(config: &ModelConfig) -> Option<u64> {
    let wide = |n: usize| u64::try_from(n).ok();
    let (h, q, kv, ff, vocab, layers) = (
        wide(config.hidden_size)?,
        wide(config.q_width())?,
        wide(config.kv_width())?,
        wide(config.intermediate_size)?,
        wide(config.vocab_size)?,
        wide(config.num_hidden_layers)?,
    );
    let int8 = config.precision() == Precision::Int8;
    // Int8: one byte per value and a 2-byte f16 scale per block; F16: two bytes.
    let matrix = |rows: u64, cols: u64| -> Option<u64> {
        let n = rows.checked_mul(cols)?;
        if int8 { n.checked_add(n / INT8_BLOCK as u64 * 2) } else { n.checked_mul(2) }
    };
    let norm = h.checked_mul(4)?;
    let layer = [matrix(q, h)?, matrix(kv, h)?, matrix(kv, h)?, matrix(h, q)?, matrix(ff, h)?, matrix(ff, h)?, matrix(h, ff)?, norm, norm]
        .into_iter()
        .try_fold(0u64, u64::checked_add)?;
    let head = if config.tie_word_embeddings { 0 } else { matrix(vocab, h)? };
    matrix(vocab, h)?.checked_add(layer.checked_mul(layers)?)?.checked_add(norm)?.checked_add(head)
}

/// The tensors a pack for `config` holds, in a fixed order: the token
/// embedding, [`TENSORS_PER_LAYER`] tensors per layer, the final norm, and
/// `lm_head.weight` when embeddings are not tied.
pub fn pack_layout(config: &ModelConfig) -> Vec<TensorSpec> {
    layout(config).collect()
}

/// [`pack_layout`] one tensor at a time: nothing is allocated for layers
/// not reached, so a config that claims more layers than its file holds
/// costs nothing before the first missing tensor is found.
fn layout(config: &ModelConfig) -> impl Iterator<Item = TensorSpec> + '_ {
    let (h, q, kv, ff) = (config.hidden_size, config.q_width(), config.kv_width(), config.intermediate_size);
    let matrix = |name: String, rows, cols| TensorSpec { name, kind: TensorKind::Matrix { rows, cols } };
    let norm = |name: String, len| TensorSpec { name, kind: TensorKind::Norm { len } };
    let layers = (0..config.num_hidden_layers).flat_map(move |i| {
        let p = format!("model.layers.{i}");
        [
            norm(format!("{p}.input_layernorm.weight"), h),
            matrix(format!("{p}.self_attn.q_proj.weight"), q, h),
            matrix(format!("{p}.self_attn.k_proj.weight"), kv, h),
            matrix(format!("{p}.self_attn.v_proj.weight"), kv, h),
            matrix(format!("{p}.self_attn.o_proj.weight"), h, q),
            norm(format!("{p}.post_attention_layernorm.weight"), h),
            matrix(format!("{p}.mlp.gate_proj.weight"), ff, h),
            matrix(format!("{p}.mlp.up_proj.weight"), ff, h),
            matrix(format!("{p}.mlp.down_proj.weight"), h, ff),
        ]
    });
    std::iter::once(matrix("model.embed_tokens.weight".into(), config.vocab_size, h))
        .chain(layers)
        .chain(std::iter::once(norm("model.norm.weight".into(), h)))
        .chain((!config.tie_word_embeddings).then(|| matrix("lm_head.weight".into(), config.vocab_size, h)))
}

/// A zero-copy view of one weight matrix (`[rows, cols]`, row-major).
#[derive(Clone, Copy, Debug)]
pub enum Matrix<'a> {
    /// Int8 values and one f16 scale per [`INT8_BLOCK`] consecutive values of a
    /// row: element `(r, c)` is `values[r*cols + c] × scales[r*cols/32 + c/32]`.
    Int8 {
        /// Output dimension.
        rows: usize,
        /// Input dimension (a multiple of [`INT8_BLOCK`]).
        cols: usize,
        /// `rows × cols` values.
        values: &'a [i8],
        /// `rows × cols / 32` scales.
        scales: &'a [f16],
    },
    /// IEEE binary16 values.
    F16 {
        /// Output dimension.
        rows: usize,
        /// Input dimension.
        cols: usize,
        /// `rows × cols` values.
        values: &'a [f16],
    },
}

impl Matrix<'_> {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Matrix::Int8 { rows, cols, .. } | Matrix::F16 { rows, cols, .. } => (rows, cols),
        }
    }

    /// Bytes of weights (values and scales) a full matrix-vector product reads.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Int8 { values, scales, .. } => values.len() + 2 * scales.len(),
            Matrix::F16 { values, .. } => 2 * values.len(),
        }
    }
}

/// Views of one transformer layer's weights.
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a> {
    /// RMSNorm before attention, `[hidden]`.
    pub input_norm: &'a [f32],
    /// Query projection, `[heads × head_dim, hidden]`.
    pub q_proj: Matrix<'a>,
    /// Key projection, `[kv_heads × head_dim, hidden]`.
    pub k_proj: Matrix<'a>,
    /// Value projection, `[kv_heads × head_dim, hidden]`.
    pub v_proj: Matrix<'a>,
    /// Attention output projection, `[hidden, heads × head_dim]`.
    pub o_proj: Matrix<'a>,
    /// RMSNorm before the MLP, `[hidden]`.
    pub post_attention_norm: &'a [f32],
    /// MLP gate projection, `[intermediate, hidden]`.
    pub gate_proj: Matrix<'a>,
    /// MLP up projection, `[intermediate, hidden]`.
    pub up_proj: Matrix<'a>,
    /// MLP down projection, `[hidden, intermediate]`.
    pub down_proj: Matrix<'a>,
}

/// Where a validated tensor lives in the mapping.
#[derive(Clone, Debug)]
enum Slot {
    Matrix { rows: usize, cols: usize, values: Range<usize>, scales: Option<Range<usize>> },
    Norm(Range<usize>),
}

/// An opened, validated model directory whose weights are memory-mapped.
#[derive(Debug)]
pub struct ModelPack {
    dir: PathBuf,
    config: ModelConfig,
    map: Mmap,
    id: ModelId,
    /// One slot per [`pack_layout`] entry, same order.
    slots: Vec<Slot>,
}

impl ModelPack {
    /// Opens the model directory `dir`: reads `config.json`, checks that
    /// `tokenizer.json` exists, reads the weights' SHA-256 from
    /// `model.sha256` (not recomputed: that would read every page at start),
    /// maps `model.safetensors` read-only and validates it against the config.
    ///
    /// # Errors
    /// [`FileError`] naming the file and the problem: a missing or invalid
    /// config, a missing tokenizer, a missing or malformed digest file, an
    /// unreadable weights file, a malformed
    /// safetensors header (truncated file, offsets past the end, overlapping
    /// tensors), a missing or unexpected tensor, a wrong dtype or shape, or a
    /// misaligned tensor.
    pub fn open(dir: &Path) -> Result<ModelPack, FileError> {
        let config = ModelConfig::read(&dir.join(CONFIG_FILE))?;
        let tokenizer = dir.join(TOKENIZER_FILE);
        if !tokenizer.is_file() {
            return Err(FileError::invalid(&tokenizer, "missing: a model directory needs its tokenizer"));
        }
        let digest = dir.join(DIGEST_FILE);
        let text = read_text_if_exists(&digest, limit::SMALL)?.ok_or_else(|| {
            FileError::invalid(&digest, "missing: a model directory needs the SHA-256 of its weights (re-run `models/fetch`)")
        })?;
        let id = ModelId(parse_digest_line(&text, WEIGHTS_FILE).map_err(|p| FileError::invalid(&digest, p))?);
        let path = dir.join(WEIGHTS_FILE);
        let file = open_regular(&path)?;
        // SAFETY: the mapping is read-only and packs are never modified in
        // place (see the module invariants); every access is bounds-checked
        // by the validation below before a view is handed out.
        let map = unsafe { Mmap::map(&file) }.map_err(FileError::io(&path))?;
        // Advisory only: a kernel that ignores the hint still serves page faults.
        let _ = map.advise(Advice::WillNeed);
        let slots = validate(&map, &config).map_err(|problem| FileError::invalid(&path, problem))?;
        Ok(ModelPack { dir: dir.to_path_buf(), config, map, id, slots })
    }

    /// The base model's id: the SHA-256 of `model.safetensors`.
    pub fn id(&self) -> ModelId {
        self.id
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The validated `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Precision of the matrices.
    pub fn precision(&self) -> Precision {
        self.config.precision()
    }

    /// Size of the mapped weights file, bytes.
    pub fn mapped_bytes(&self) -> usize {
        self.map.len()
    }

    /// The token embedding, `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> Matrix<'_> {
        self.matrix(0)
    }

    /// The output projection, `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> Matrix<'_> {
        if self.config.tie_word_embeddings {
            self.embed_tokens()
        } else {
            self.matrix(self.slots.len() - 1)
        }
    }

    /// The final RMSNorm weight, `[hidden]`.
    pub fn final_norm(&self) -> &[f32] {
        self.norm(1 + TENSORS_PER_LAYER * self.config.num_hidden_layers)
    }

    /// Views of layer `index`.
    ///
    /// # Panics
    /// If `index >= num_hidden_layers` (a caller bug, not bad input).
    pub fn layer(&self, index: usize) -> LayerWeights<'_> {
        assert!(index < self.config.num_hidden_layers, "layer {index} out of range");
        let base = 1 + TENSORS_PER_LAYER * index;
        LayerWeights {
            input_norm: self.norm(base),
            q_proj: self.matrix(base + 1),
            k_proj: self.matrix(base + 2),
            v_proj: self.matrix(base + 3),
            o_proj: self.matrix(base + 4),
            post_attention_norm: self.norm(base + 5),
            gate_proj: self.matrix(base + 6),
            up_proj: self.matrix(base + 7),
            down_proj: self.matrix(base + 8),
        }
    }

    fn matrix(&self, slot: usize) -> Matrix<'_> {
        match &self.slots[slot] {
            Slot::Matrix { rows, cols, values, scales: Some(scales) } => Matrix::Int8 {
                rows: *rows,
                cols: *cols,
                values: bytemuck::cast_slice(&self.map[values.clone()]),
                scales: bytemuck::cast_slice(&self.map[scales.clone()]),
            },
            Slot::Matrix { rows, cols, values, scales: None } => {
                Matrix::F16 { rows: *rows, cols: *cols, values: bytemuck::cast_slice(&self.map[values.clone()]) }
            }
            Slot::Norm(_) => unreachable!("pack_layout puts a matrix in slot {slot}"),
        }
    }

    fn norm(&self, slot: usize) -> &[f32] {
        match &self.slots[slot] {
            Slot::Norm(range) => bytemuck::cast_slice(&self.map[range.clone()]),
            Slot::Matrix { .. } => unreachable!("pack_layout puts a norm in slot {slot}"),
        }
    }
}

/// The tensor table of a mapped safetensors file, and the one check of a
/// tensor that packs and adapters share: present, of the expected dtype and
/// shape, its data aligned to its elements. Byte ranges are checked by the
/// `safetensors` crate when the table is read (inside the file, contiguous,
/// not overlapping).
pub struct TensorIndex {
    metadata: safetensors::tensor::Metadata,
    data_start: usize,
    /// Tensors handed out by [`TensorIndex::range`] so far.
    found: std::collections::HashSet<String>,
}

impl TensorIndex {
    /// Reads the header of the safetensors file `bytes`.
    ///
    /// # Errors
    /// A message naming the problem (and, where `safetensors` does not, the
    /// tensor whose bytes lie outside the data or overlap another).
    pub fn read(bytes: &[u8]) -> Result<TensorIndex, String> {
        let (header_len, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
            let detail = diagnose_offsets(bytes).map_or(String::new(), |d| format!(" ({d})"));
            format!("not a valid safetensors file: {e}{detail}")
        })?;
        Ok(TensorIndex { metadata, data_start: 8 + header_len, found: Default::default() })
    }

    /// The dtype of tensor `name`.
    ///
    /// # Errors
    /// The tensor is missing.
    pub fn dtype(&self, name: &str) -> Result<Dtype, String> {
        Ok(self.metadata.info(name).ok_or_else(|| format!("missing tensor `{name}`"))?.dtype)
    }

    /// The byte range of tensor `name` in the file, checked to be `dtype`,
    /// `shape` and aligned to its elements.
    ///
    /// # Errors
    /// A message naming the tensor and what differs.
    pub fn range(&mut self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<Range<usize>, String> {
        let info = self.metadata.info(name).ok_or_else(|| format!("missing tensor `{name}`"))?;
        if info.dtype != dtype {
            return Err(format!("tensor `{name}` has dtype {:?}, expected {dtype:?}", info.dtype));
        }
        if info.shape != shape {
            return Err(format!("tensor `{name}` has shape {:?}, expected {shape:?}", info.shape));
        }
        let (start, end) = (self.data_start + info.data_offsets.0, self.data_start + info.data_offsets.1);
        let align = (dtype.bitsize() / 8).max(1);
        if !start.is_multiple_of(align) {
            return Err(format!("tensor `{name}` starts at byte {start}, not aligned to its {align}-byte elements"));
        }
        self.found.insert(name.to_string());
        Ok(start..end)
    }

    /// Checks that every tensor of the file was handed out by [`TensorIndex::range`].
    ///
    /// # Errors
    /// Names the first stray tensor.
    pub fn expect_no_others(&self) -> Result<(), String> {
        let total = self.metadata.offset_keys().len();
        match self.metadata.offset_keys().into_iter().find(|n| !self.found.contains(n)) {
            Some(extra) => Err(format!("unexpected tensor `{extra}` ({total} tensors, {} expected)", self.found.len())),
            None => Ok(()),
        }
    }
}

/// Checks the mapped file against `config` and returns one slot per
/// [`pack_layout`] entry, or a message naming the problem.
fn validate(bytes: &[u8], config: &ModelConfig) -> Result<Vec<Slot>, String> {
    let mut index = TensorIndex::read(bytes)?;
    // Sizes from config.json are bounded by the file before anything is
    // sized from them: the layout is walked lazily and every slot needs a
    // tensor the file holds; when it runs out, the error says how far the
    // config overshoots.
    let data = pack_data_bytes(config);
    let overshoot = |problem: String| match data {
        Some(needed) if needed <= bytes.len() as u64 => problem,
        needed => format!(
            "{problem} (config.json describes {} layers of width {} and a vocabulary of {}, {} bytes of weights, but the file holds {} bytes)",
            config.num_hidden_layers,
            config.hidden_size,
            config.vocab_size,
            needed.map_or("more than 2^64".to_string(), |b| b.to_string()),
            bytes.len()
        ),
    };
    let int8 = config.precision() == Precision::Int8;
    let mut slots = Vec::new();
    for spec in layout(config) {
        slots.push(match spec.kind {
            TensorKind::Norm { len } => Slot::Norm(index.range(&spec.name, Dtype::F32, &[len]).map_err(overshoot)?),
            TensorKind::Matrix { rows, cols } if int8 => Slot::Matrix {
                rows,
                cols,
                values: index.range(&spec.name, Dtype::I8, &[rows, cols]).map_err(overshoot)?,
                scales: Some(
                    index.range(&format!("{}{SCALE_SUFFIX}", spec.name), Dtype::F16, &[rows, cols / INT8_BLOCK]).map_err(overshoot)?,
                ),
            },
            TensorKind::Matrix { rows, cols } => {
                Slot::Matrix { rows, cols, values: index.range(&spec.name, Dtype::F16, &[rows, cols]).map_err(overshoot)?, scales: None }
            }
        });
    }
    index.expect_no_others()?;
    Ok(slots)
}

/// On the error path only: names the first tensor whose byte range lies past
/// the end of the data or overlaps another, which `safetensors`' own error
/// does not always identify.
fn diagnose_offsets(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let data_len = bytes.len() - 8 - n;
    let mut ranges: Vec<(u64, u64, &str)> = header
        .iter()
        .filter_map(|(name, t)| {
            let o = t.get("data_offsets")?.as_array()?;
            Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?, name.as_str()))
        })
        .collect();
    if let Some((start, end, name)) = ranges.iter().find(|(_, end, _)| *end > data_len as u64) {
        return Some(format!("tensor `{name}` spans bytes {start}..{end} of a {data_len}-byte data section"));
    }
    ranges.sort_unstable();
    ranges.windows(2).find(|w| w[1].0 < w[0].1).map(|w| {
        format!("tensors `{}` ({}..{}) and `{}` ({}..{}) overlap", w[0].2, w[0].0, w[0].1, w[1].2, w[1].0, w[1].1)
    })
}
