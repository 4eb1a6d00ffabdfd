//! Adapter export: the device's signed adapter bundle, and the PEFT layout
//! (`adapter_config.json` + `adapter_model.safetensors`, tensor names with
//! PEFT's `base_model.model.` prefix) so other tools can load the adapter.
//!
//! Principal function: [`export_adapter`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use ed25519_dalek::SigningKey;
use nocturne::adapter::{write_adapter_bundle, AdapterSpec};
use nocturne::journal::{AdapterId, ModelId};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::model::Lora;

/// Where an export went.
pub struct Exported {
    /// The device bundle (`<id>.adapter`), for `nocturne sync import`.
    pub bundle: PathBuf,
    /// The PEFT directory (`<id>.peft`).
    pub peft: PathBuf,
    /// The adapter's id.
    pub id: AdapterId,
}

/// Writes `lora` as a device bundle signed with `trainer` and as a PEFT
/// directory, both into `out`.
///
/// # Errors
/// Files cannot be written; candle errors reading the parameters.
pub fn export_adapter(
    out: &Path,
    trainer: &SigningKey,
    lora: &Lora,
    base_model: ModelId,
    parent: Option<AdapterId>,
    description: &str,
) -> anyhow::Result<Exported> {
    let tensors = lora.to_f16_tensors()?;
    let spec = AdapterSpec {
        parent,
        base_model,
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
        "base_model_name_or_path": format!("nocturne pack {base_model}"),
    });
    std::fs::write(peft.join("adapter_config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    let f32_values: Vec<(String, Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(n, s, v)| (format!("base_model.model.{n}"), s, v.into_iter().map(|x| x.to_f32()).collect())).collect();
    let views = f32_values
        .iter()
        .map(|(n, s, v)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(v))?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &peft.join("adapter_model.safetensors"))?;
    Ok(Exported { bundle, peft, id })
}
