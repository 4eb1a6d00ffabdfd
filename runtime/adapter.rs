//! LoRA adapters on the device: the signed adapter bundle, its validation
//! against the pack, and the zero-copy views the decoder applies.
//!
//! Principal types: [`LoraAdapter`], [`AdapterManifest`], [`Target`];
//! [`write_adapter_bundle`] makes a bundle (the trainer's export, tests).
//!
//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
//! ICLR 2022): a targeted projection `y = W x` becomes
//! `y = W x + (alpha / rank) · B (A x)`, with `A` `[rank, in]` and `B`
//! `[out, rank]`. The decoder applies it unmerged, so the base pack is never
//! modified and adapters switch without reloading it.
//!
//! An adapter bundle is a directory `<adapter id>.adapter` holding
//! `adapter.safetensors` and `MANIFEST`, a signed envelope (domain
//! [`ADAPTER_DOMAIN`]) of the postcard [`AdapterManifest`], signed by the
//! trainer key. The tensors are named as PEFT names them, without PEFT's
//! `base_model.model.` prefix, for every layer and every target, in one of
//! two precisions per projection:
//!
//! - F16: `model.layers.<i>.self_attn.q_proj.lora_A.weight` `[rank, in]` and
//!   `….lora_B.weight` `[out, rank]`.
//! - Int8, in the pack's block format (`crate::weights`: I8 values and one
//!   F16 scale per 32 consecutive values of a row, `<name>_scale`): `A`
//!   `[rank, in]`, and `B` stored transposed, `[rank, out]`, so that its
//!   blocks run along `out` (a rank below 32 could not be blocked along
//!   itself). The decoder reads a transposed `B` by columns.
//!
//! Invariants: [`LoraAdapter::open`] checks the signature, the base model id,
//! the weights' SHA-256 and every tensor's presence, dtype and shape before
//! returning; afterwards views cannot fail. Weights stay in the mapping.

use std::ops::Range;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use half::f16;
use memmap2::Mmap;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::budget::MAX_LORA_RANK;
use crate::config::INT8_BLOCK;
use crate::digest::sha256_file;
use crate::durable_file::write_dir_atomic;
use crate::file_error::FileError;
use crate::file_read::{limit, open_regular, read_bounded};
use crate::ids::{AdapterId, ModelId};
use crate::journal::record::now_ms;
use crate::quant::quantize_int8;
use crate::signing::open_sealed;
use crate::weights::{Matrix, ModelPack, TensorIndex, SCALE_SUFFIX};

/// Signature domain of adapter manifests.
pub const ADAPTER_DOMAIN: &str = "nocturne adapter manifest v1";
/// Manifest file of an adapter bundle.
pub const ADAPTER_MANIFEST_FILE: &str = "MANIFEST";
/// Weights file of an adapter bundle.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter.safetensors";
/// Suffix of adapter bundle directories.
pub const ADAPTER_SUFFIX: &str = ".adapter";
/// Version of the manifest layout.
pub const ADAPTER_FORMAT: u16 = 1;

/// A projection an adapter can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Attention query.
    Q,
    /// Attention key.
    K,
    /// Attention value.
    V,
    /// Attention output.
    O,
    /// MLP gate.
    Gate,
    /// MLP up.
    Up,
    /// MLP down.
    Down,
}

impl Target {
    /// Every target, in layer order.
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// The module name (`q_proj`, …) as PEFT's `target_modules` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The target with module name `name`.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// `self_attn` or `mlp`.
    fn block(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    /// Tensor name of the adapter's `A` (`lora_A`) or `B` (`lora_B`) for `layer`.
    pub fn tensor_name(self, layer: usize, matrix: char) -> String {
        format!("model.layers.{layer}.{}.{}.lora_{matrix}.weight", self.block(), self.name())
    }
}

/// The manifest description's `"scope"` value of a scoped adapter: it
/// applies only to requests in its scope (decided by `recall/scope.rs`).
pub const SCOPE_LEARNED: &str = "learned";

/// What an adapter is, signed by the trainer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterManifest {
    /// [`ADAPTER_FORMAT`].
    pub format: u16,
    /// The adapter's id (first 16 bytes of the weights' SHA-256).
    pub adapter: AdapterId,
    /// The adapter it was trained from (None: from the bare base model).
    pub parent: Option<AdapterId>,
    /// The base model it was trained for.
    pub base_model: ModelId,
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha (the update is scaled by `alpha / rank`).
    pub alpha: f32,
    /// Targeted projections (`q_proj`, …).
    pub targets: Vec<String>,
    /// SHA-256 of `adapter.safetensors`.
    pub weights_sha256: [u8; 32],
    /// Free-form description (training data range, evaluation results), JSON.
    pub description: String,
    /// When it was made, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl AdapterManifest {
    /// Whether the trainer's gate published the adapter: the `published`
    /// field of the description (JSON), `None` when there is none.
    pub fn published(&self) -> Option<bool> {
        serde_json::from_str::<serde_json::Value>(&self.description).ok()?.get("published")?.as_bool()
    }

    /// The interactions of `device` whose corrections the trainer's
    /// evaluation found this adapter answers as taught: the `learned` field of
    /// the description (`[{"device": hex, "interaction": lsn}, …]`), empty
    /// when there is none.
    pub fn learned(&self, device: crate::ids::DeviceId) -> Vec<u64> {
        let Ok(description) = serde_json::from_str::<serde_json::Value>(&self.description) else {
            return Vec::new();
        };
        let device = device.to_string();
        description
            .get("learned")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
            .filter(|e| e.get("device").and_then(|d| d.as_str()) == Some(device.as_str()))
            .filter_map(|e| e.get("interaction")?.as_u64())
            .collect()
    }

    /// Whether the adapter applies only to requests in its scope
    /// (decided by `recall/scope.rs`, above this module): the description's `"scope"` is
    /// `"learned"`. Adapters without it apply to every request.
    pub fn scoped(&self) -> bool {
        serde_json::from_str::<serde_json::Value>(&self.description).ok().and_then(|d| d.get("scope")?.as_str().map(|s| s == SCOPE_LEARNED)).unwrap_or(false)
    }

    /// The gate's decision as the description states it (empty when none).
    pub fn decision(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.description)
            .ok()
            .and_then(|d| d.get("decision")?.as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// The parts of an adapter a trainer chooses; [`write_adapter_bundle`]
/// derives the rest (id, checksum, time).
#[derive(Clone, Debug)]
pub struct AdapterSpec {
    /// The adapter trained from, if any.
    pub parent: Option<AdapterId>,
    /// The base model.
    pub base_model: ModelId,
    /// LoRA rank.
    pub rank: u32,
    /// LoRA alpha.
    pub alpha: f32,
    /// Targeted projections.
    pub targets: Vec<Target>,
    /// Free-form JSON description.
    pub description: String,
}

/// Values of one adapter tensor for [`write_adapter_bundle`], always in the
/// logical (PEFT) layout: `A` `[rank, in]`, `B` `[out, rank]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterTensor {
    /// Stored as F16, as given.
    F16(Vec<f16>),
    /// Stored in the int8 block format: quantized by
    /// [`crate::quant::quantize_int8`] (as `<name>` I8 and `<name>_scale`
    /// F16, one scale per [`INT8_BLOCK`] values of a stored row), a `B`
    /// transposed to `[rank, out]` first (module docs).
    Int8(Vec<f32>),
}

impl From<Vec<f16>> for AdapterTensor {
    fn from(values: Vec<f16>) -> AdapterTensor {
        AdapterTensor::F16(values)
    }
}

/// Writes an adapter bundle into `out_dir`: `tensors` (name, shape,
/// values; see the module docs for names, shapes and precisions) as
/// `adapter.safetensors`, and the manifest signed with
/// `trainer`. Written as a whole ([`write_dir_atomic`]). Returns the bundle
/// directory.
///
/// # Errors
/// Files cannot be written.
pub fn write_adapter_bundle(
    out_dir: &Path,
    trainer: &ed25519_dalek::SigningKey,
    spec: &AdapterSpec,
    tensors: &[(String, Vec<usize>, AdapterTensor)],
) -> Result<std::path::PathBuf, FileError> {
    write_dir_atomic(out_dir, &format!(".adapter-{}.tmp", std::process::id()), |tmp| {
        let view = |name: &str, dtype: Dtype, shape: Vec<usize>, bytes| {
            let view = safetensors::tensor::TensorView::new(dtype, shape, bytes).map_err(|e| FileError::invalid(tmp, format!("tensor `{name}`: {e}")))?;
            Ok::<_, FileError>((name.to_string(), view))
        };
        let mut views = Vec::with_capacity(2 * tensors.len());
        let mut quantized = Vec::new();
        for (name, shape, values) in tensors {
            match values {
                AdapterTensor::F16(v) => views.push(view(name, Dtype::F16, shape.clone(), bytemuck::cast_slice(v))?),
                AdapterTensor::Int8(logical) => {
                    let (rows, cols) = (shape.first().copied().unwrap_or(0), shape.get(1).copied().unwrap_or(0));
                    // The one place the rule lives: an int8 B is stored transposed.
                    let (stored, values) = if name.contains(".lora_B.") { ([cols, rows], transpose(rows, cols, logical)) } else { ([rows, cols], logical.clone()) };
                    if values.len() != rows * cols {
                        return Err(FileError::invalid(tmp, format!("tensor `{name}` has {} values for shape {shape:?}", values.len())));
                    }
                    if !stored[1].is_multiple_of(INT8_BLOCK) {
                        return Err(FileError::invalid(tmp, format!("tensor `{name}` is int8 with rows of {} values, not a multiple of {INT8_BLOCK}", stored[1])));
                    }
                    quantized.push((name.clone(), stored, quantize_int8(&values)));
                }
            }
        }
        for (name, stored, q) in &quantized {
            views.push(view(name, Dtype::I8, stored.to_vec(), bytemuck::cast_slice(&q.values))?);
            views.push(view(&format!("{name}{SCALE_SUFFIX}"), Dtype::F16, vec![stored[0], stored[1] / INT8_BLOCK], bytemuck::cast_slice(&q.scales))?);
        }
        let weights = tmp.join(ADAPTER_WEIGHTS_FILE);
        safetensors::serialize_to_file(views, None, &weights).map_err(|e| FileError::invalid(&weights, e.to_string()))?;
        let sha = sha256_file(&weights)?;
        let manifest = AdapterManifest {
            format: ADAPTER_FORMAT,
            adapter: AdapterId(sha[..16].try_into().expect("16 bytes")),
            parent: spec.parent,
            base_model: spec.base_model,
            rank: spec.rank,
            alpha: spec.alpha,
            targets: spec.targets.iter().map(|t| t.name().to_string()).collect(),
            weights_sha256: sha,
            description: spec.description.clone(),
            created_ms: now_ms(),
        };
        let manifest_path = tmp.join(ADAPTER_MANIFEST_FILE);
        std::fs::write(&manifest_path, crate::signing::seal(ADAPTER_DOMAIN, trainer, &manifest)).map_err(FileError::io(&manifest_path))?;
        Ok::<_, FileError>(format!("{}{ADAPTER_SUFFIX}", manifest.adapter))
    })
}

/// `[rows, cols]` → `[cols, rows]`, row-major.
fn transpose(rows: usize, cols: usize, values: &[f32]) -> Vec<f32> {
    (0..cols * rows).map(|i| values.get((i % rows) * cols + i / rows).copied().unwrap_or(0.0)).collect()
}

/// Where one matrix lives in the mapping: values, int8 scales (None: F16),
/// rows, columns.
type Slot = (Range<usize>, Option<Range<usize>>, usize, usize);

/// Where one projection's `A` and `B` live in the mapping.
#[derive(Clone, Debug)]
struct Pair {
    a: Slot,
    b: Slot,
}

/// A validated adapter, mapped.
pub struct LoraAdapter {
    manifest: AdapterManifest,
    map: Mmap,
    /// `[layer][target]`.
    pairs: Vec<[Option<Pair>; 7]>,
    scale: f32,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter").field("manifest", &self.manifest).finish()
    }
}

/// Reads and verifies an adapter bundle's manifest with the trainer key.
///
/// # Errors
/// Unreadable, not signed by `trainer`, or malformed.
pub fn read_manifest(dir: &Path, trainer: &VerifyingKey) -> Result<AdapterManifest, FileError> {
    let path = dir.join(ADAPTER_MANIFEST_FILE);
    let bytes = read_bounded(&path, limit::SMALL)?;
    let manifest: AdapterManifest = open_sealed(ADAPTER_DOMAIN, &bytes, trainer).map_err(|e| FileError::invalid(&path, e.to_string()))?;
    if manifest.format != ADAPTER_FORMAT {
        return Err(FileError::invalid(&path, format!("adapter format {}; this build reads {ADAPTER_FORMAT}", manifest.format)));
    }
    Ok(manifest)
}

impl LoraAdapter {
    /// Opens the adapter bundle `dir` for `pack`: checks the trainer's
    /// signature, that it was trained for this base model, the weights'
    /// SHA-256, the rank and every tensor, then maps the weights.
    ///
    /// # Errors
    /// A [`FileError`] naming the file and what is wrong.
    pub fn open(dir: &Path, pack: &ModelPack, trainer: &VerifyingKey) -> Result<LoraAdapter, FileError> {
        let manifest = read_manifest(dir, trainer)?;
        let manifest_path = dir.join(ADAPTER_MANIFEST_FILE);
        if manifest.base_model != pack.id() {
            return Err(FileError::invalid(
                &manifest_path,
                format!("adapter {} was trained for base model {}, not for this pack ({})", manifest.adapter, manifest.base_model, pack.id()),
            ));
        }
        let rank = manifest.rank as usize;
        if rank == 0 || rank > MAX_LORA_RANK || !manifest.alpha.is_finite() {
            return Err(FileError::invalid(&manifest_path, format!("rank {rank} / alpha {} out of range (rank 1-{MAX_LORA_RANK})", manifest.alpha)));
        }
        let mut targets = Vec::new();
        for name in &manifest.targets {
            targets.push(Target::from_name(name).ok_or_else(|| FileError::invalid(&manifest_path, format!("unknown target `{name}`")))?);
        }
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        if sha256_file(&path)? != manifest.weights_sha256 {
            return Err(FileError::invalid(&path, "does not match the SHA-256 in the manifest"));
        }
        let file = open_regular(&path)?;
        // SAFETY: read-only mapping of a file nocturne never modifies in place
        // (installs write a new directory); views are bounds-checked below.
        let map = unsafe { Mmap::map(&file) }.map_err(FileError::io(&path))?;
        let pairs = validate(&map, pack, rank, &targets).map_err(|p| FileError::invalid(&path, p))?;
        let scale = manifest.alpha / rank as f32;
        Ok(LoraAdapter { manifest, map, pairs, scale })
    }

    /// The signed manifest.
    pub fn manifest(&self) -> &AdapterManifest {
        &self.manifest
    }

    /// The adapter's id.
    pub fn id(&self) -> AdapterId {
        self.manifest.adapter
    }

    /// LoRA rank.
    pub fn rank(&self) -> usize {
        self.manifest.rank as usize
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `A` `[rank, in]` and `B` of `target` in `layer`, if targeted. `B` is
    /// `[out, rank]` when F16 and stored transposed, `[rank, out]`, when
    /// int8 (module docs).
    pub fn projection(&self, layer: usize, target: Target) -> Option<(Matrix<'_>, Matrix<'_>)> {
        let pair = self.pairs.get(layer)?[target as usize].as_ref()?;
        Some((self.view(&pair.a), self.view(&pair.b)))
    }

    fn view(&self, (values, scales, rows, cols): &Slot) -> Matrix<'_> {
        let bytes = &self.map[values.clone()];
        match scales {
            None => Matrix::F16 { rows: *rows, cols: *cols, values: bytemuck::cast_slice(bytes) },
            Some(scales) => Matrix::Int8 {
                rows: *rows,
                cols: *cols,
                values: bytemuck::cast_slice(bytes),
                scales: bytemuck::cast_slice(&self.map[scales.clone()]),
            },
        }
    }
}

fn validate(map: &[u8], pack: &ModelPack, rank: usize, targets: &[Target]) -> Result<Vec<[Option<Pair>; 7]>, String> {
    let mut index = TensorIndex::read(map)?;
    let c = pack.config();
    let mut pairs = Vec::with_capacity(c.num_hidden_layers);
    for layer in 0..c.num_hidden_layers {
        let w = pack.layer(layer);
        let shapes = [w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.gate_proj, w.up_proj, w.down_proj].map(|m| m.shape());
        let mut row: [Option<Pair>; 7] = Default::default();
        for &target in targets {
            let (out, inp) = shapes[target as usize];
            let mut get = |m: char, f16_shape: [usize; 2]| -> Result<(Slot, bool), String> {
                let name = target.tensor_name(layer, m);
                let int8 = match index.dtype(&name)? {
                    Dtype::F16 => false,
                    Dtype::I8 => true,
                    other => return Err(format!("tensor `{name}` is {other:?}; adapters on the device are F16 or I8")),
                };
                // An int8 B is stored transposed (module docs).
                let shape = if int8 && m == 'B' { [f16_shape[1], f16_shape[0]] } else { f16_shape };
                let values = index.range(&name, if int8 { Dtype::I8 } else { Dtype::F16 }, &shape)?;
                let scales = if int8 {
                    if !shape[1].is_multiple_of(INT8_BLOCK) {
                        return Err(format!("tensor `{name}` is int8 with rows of {} values, not a multiple of {INT8_BLOCK}", shape[1]));
                    }
                    let scale_name = format!("{name}{SCALE_SUFFIX}");
                    let range = index
                        .range(&scale_name, Dtype::F16, &[shape[0], shape[1] / INT8_BLOCK])
                        .map_err(|e| format!("{e} (the scales of the int8 `{name}`)"))?;
                    Some(range)
                } else {
                    None
                };
                Ok(((values, scales, shape[0], shape[1]), int8))
            };
            let ((a, a_int8), (b, b_int8)) = (get('A', [rank, inp])?, get('B', [out, rank])?);
            if a_int8 != b_int8 {
                return Err(format!("`{}` and `{}` differ in precision (both F16 or both I8)", target.tensor_name(layer, 'A'), target.tensor_name(layer, 'B')));
            }
            row[target as usize] = Some(Pair { a, b });
        }
        pairs.push(row);
    }
    index.expect_no_others()?;
    Ok(pairs)
}
