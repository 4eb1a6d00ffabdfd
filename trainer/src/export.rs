//! Adapter export: the device's signed adapter bundle, and the PEFT layout
//! (`adapter_config.json` + `adapter_model.safetensors`, tensor names with
//! PEFT's `base_model.model.` prefix) so other tools can load the adapter.
//!
//! Principal items: [`export_adapter`], [`device_tensors`], [`AdapterPrecision`].
//!
//! The device bundle holds F16 tensors, or int8 ones in the pack's block
//! format (quantized, and `B` transposed, by
//! `nocturne::adapter::write_adapter_bundle`); the PEFT copy always holds
//! the f32 parameters.

use std::path::{Path, PathBuf};

use anyhow::Context;
use ed25519_dalek::SigningKey;
use half::f16;
use nocturne::adapter::{write_adapter_bundle, AdapterSpec, AdapterTensor};
use nocturne::ids::AdapterId;
use nocturne::weights::ModelPack;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::llama::Lora;

/// Precision of the device bundle's tensors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterPrecision {
    /// Half precision (2 bytes per parameter).
    #[default]
    F16,
    /// Int8 in the pack's block format (1 byte per parameter plus a 2-byte
    /// scale per 32).
    Int8,
}

/// The parameters of `lora` as device tensors in `precision`.
///
/// # Errors
/// candle errors reading the parameters.
pub fn device_tensors(lora: &Lora, precision: AdapterPrecision) -> candle_core::Result<Vec<(String, Vec<usize>, AdapterTensor)>> {
    Ok(lora
        .to_f32_tensors()?
        .into_iter()
        .map(|(name, shape, values)| match precision {
            AdapterPrecision::F16 => (name, shape, AdapterTensor::F16(values.into_iter().map(f16::from_f32).collect())),
            AdapterPrecision::Int8 => (name, shape, AdapterTensor::Int8(values)),
        })
        .collect())
}

/// Where an export went.
pub struct Exported {
    /// The device bundle (`<id>.adapter`), for `nocturne sync import`.
    pub bundle: PathBuf,
    /// The PEFT directory (`<id>.peft`).
    pub peft: PathBuf,
    /// The adapter's id.
    pub id: AdapterId,
}

/// Writes `lora`, trained on `base`, as a device bundle in `precision`
/// signed with `trainer` (bound to `base`'s id) and as a PEFT directory
/// naming `base`'s upstream model, both into `out`.
///
/// # Errors
/// Files cannot be written; candle errors reading the parameters.
pub fn export_adapter(
    out: &Path,
    trainer: &SigningKey,
    lora: &Lora,
    base: &ModelPack,
    parent: Option<AdapterId>,
    description: &str,
    precision: AdapterPrecision,
) -> anyhow::Result<Exported> {
    let tensors = device_tensors(lora, precision)?;
    let spec = AdapterSpec {
        parent,
        base_model: base.id(),
        rank: lora.rank() as u32,
        alpha: lora.alpha(),
        targets: lora.targets().to_vec(),
        description: description.to_string(),
    };
    let bundle = write_adapter_bundle(out, trainer, &spec, &tensors)?;
    let name = bundle.file_stem().context("bundle without a name")?.to_string_lossy().to_string();
    let id = AdapterId::from_hex(&name).context("bundle named by its id")?;
    let peft = out.join(format!("{name}.peft"));
    std::fs::create_dir_all(&peft).with_context(|| format!("cannot create {}", peft.display()))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank(),
        "lora_alpha": lora.alpha(),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "target_modules": lora.targets().iter().map(|t| t.name()).collect::<Vec<_>>(),
        // What PEFT loads the base from (a Hugging Face repository id); null when the pack does not name it.
        "base_model_name_or_path": base.config().name_or_path,
    });
    std::fs::write(peft.join("adapter_config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    let f32_values: Vec<(String, Vec<usize>, Vec<f32>)> = lora.to_f32_tensors()?.into_iter().map(|(n, s, v)| (format!("base_model.model.{n}"), s, v)).collect();
    let views = f32_values
        .iter()
        .map(|(n, s, v)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(v))?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &peft.join("adapter_model.safetensors"))?;
    Ok(Exported { bundle, peft, id })
}
