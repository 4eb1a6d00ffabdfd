//! The trainer's candle forward: parity with the device decoder (with and
//! without an adapter, tiny packs of both precisions and the real SmolLM2
//! pack), gradient health of every LoRA parameter, a finite-difference
//! check of the gradients in f64, and packed examples against separate ones.

mod support;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use nocturne::adapter::{write_adapter_bundle, AdapterSpec, LoraAdapter, Target};
use nocturne::budget::{KvPrecision, PlanSettings};
use nocturne::decoder::Decoder;
use nocturne::profile::Precision;
use nocturne::weights::ModelPack;
use nocturne_trainer::convert::convert;
use nocturne_trainer::export::{device_tensors, AdapterPrecision};
use nocturne_trainer::gguf::GgufFile;
use nocturne_trainer::llama::{batch_loss, sequence_loss, BaseModel, Lora};

/// Tiny packs (hidden 64, 2 layers, vocabulary 8) in `dir`/{int8,fp16}.
fn tiny_packs(dir: &Path) {
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, support::tiny_llama(&[1])).unwrap();
    convert(&GgufFile::open(&path).unwrap(), dir, None).unwrap();
}

fn decoder_logits(pack: &ModelPack, ids: &[u32], adapter: Option<Arc<LoraAdapter>>) -> Vec<Vec<f32>> {
    let settings = PlanSettings { context_tokens: 64, prefill_block: 32, threads: 1, kv: KvPrecision::F32, logit_rows: 32, int8_activations: false };
    let mut decoder = Decoder::new(pack, settings);
    decoder.set_adapter(adapter);
    let mut out = Vec::new();
    decoder.forward_all(ids, |_, logits| out.push(logits.to_vec())).unwrap();
    out
}

fn assert_parity(trainer: &Tensor, device: &[Vec<f32>], what: &str) {
    let trainer: Vec<Vec<f32>> = trainer.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
    for (i, (t, d)) in trainer.iter().zip(device).enumerate() {
        let scale = d.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = t.iter().zip(d).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-3 * scale, "{what}, token {i}: max difference {worst} against max |logit| {scale}");
    }
}

/// A trained-looking adapter: LoRA with `B` set to seeded values, bundled
/// for the device in `precision` and read back, so both sides use the same
/// rounded values. Read back, every parameter is within half a rounding step
/// of what was exported.
fn adapter_for(pack: &ModelPack, base: &BaseModel, dir: &Path, targets: &[Target], precision: AdapterPrecision) -> (Arc<LoraAdapter>, Lora) {
    let lora = Lora::new(base, 4, 8.0, targets, 3).unwrap();
    for (i, (name, var)) in lora.named_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            let dims = var.as_tensor().dims().to_vec();
            let values = Tensor::randn(0f32, 0.2, dims, base.device()).unwrap().to_dtype(base.dtype()).unwrap();
            var.set(&values).unwrap();
            assert!(i > 0);
        }
    }
    let trainer_key = nocturne::signing::generate().unwrap();
    let spec = AdapterSpec { parent: None, base_model: pack.id(), rank: 4, alpha: 8.0, targets: targets.to_vec(), description: String::new() };
    let bundle = write_adapter_bundle(dir, &trainer_key, &spec, &device_tensors(&lora, precision).unwrap()).unwrap();
    let adapter = LoraAdapter::open(&bundle, pack, &trainer_key.verifying_key()).unwrap();
    let back = Lora::from_adapter(base, &adapter).unwrap();
    for ((name, _, exported), (_, _, read)) in lora.to_f32_tensors().unwrap().into_iter().zip(back.to_f32_tensors().unwrap()) {
        let amax = exported.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Int8: half a step of the largest block scale (amax / 127); f16: 2^-11 relative.
        let bound = match precision { AdapterPrecision::Int8 => amax / 127.0 * 0.5 * 1.01, AdapterPrecision::F16 => amax * 4.9e-4 };
        let worst = exported.iter().zip(&read).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= bound, "{precision:?} {name}: read back {worst} away (bound {bound})");
    }
    (Arc::new(adapter), back)
}

#[test]
fn trainer_and_device_agree_on_tiny_packs_with_and_without_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_packs(tmp.path());
    let ids: Vec<u32> = (0..20).map(|i| (i * 5 + 3) % 8).collect();
    for precision in [Precision::Fp16, Precision::Int8] {
        let pack = ModelPack::open(&tmp.path().join(precision.name())).unwrap();
        let base = BaseModel::from_pack(&pack, DType::F32, &Device::Cpu, 64).unwrap();
        assert_parity(&base.forward(&ids, None).unwrap(), &decoder_logits(&pack, &ids, None), precision.name());
        for adapter_precision in [AdapterPrecision::F16, AdapterPrecision::Int8] {
            let (adapter, lora) = adapter_for(&pack, &base, &tmp.path().join("adapters"), &Target::ALL, adapter_precision);
            let with = base.forward(&ids, Some(&lora)).unwrap();
            assert_parity(&with, &decoder_logits(&pack, &ids, Some(adapter)), &format!("{} with an {adapter_precision:?} adapter", precision.name()));
        }
        let (_, lora) = adapter_for(&pack, &base, &tmp.path().join("adapters"), &Target::ALL, AdapterPrecision::F16);
        let with = base.forward(&ids, Some(&lora)).unwrap();
        let without: Vec<Vec<f32>> = base.forward(&ids, None).unwrap().to_vec2().unwrap();
        let moved = with.to_vec2::<f32>().unwrap()[5].iter().zip(&without[5]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-2, "the adapter changes the logits ({moved})");
    }
}

#[test]
fn trainer_and_device_agree_on_the_smollm2_pack() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cache/smollm2-135m-instruct/int8");
    assert!(dir.is_dir(), "{} is missing: run `models/fetch` first", dir.display());
    let pack = ModelPack::open(&dir).unwrap();
    let tokenizer = nocturne::tokenizer::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let ids = tokenizer.encode("The capital of France is Paris, and the capital of Italy is").unwrap();
    let base = BaseModel::from_pack(&pack, DType::F32, &Device::Cpu, 64).unwrap();
    assert_parity(&base.forward(&ids, None).unwrap(), &decoder_logits(&pack, &ids, None), "SmolLM2 int8");
    let tmp = tempfile::tempdir().unwrap();
    for precision in [AdapterPrecision::F16, AdapterPrecision::Int8] {
        let (adapter, lora) = adapter_for(&pack, &base, tmp.path(), &[Target::Q, Target::K, Target::V, Target::O], precision);
        assert_parity(&base.forward(&ids, Some(&lora)).unwrap(), &decoder_logits(&pack, &ids, Some(adapter)), &format!("SmolLM2 int8 with an {precision:?} adapter"));
    }
}

fn task_loss(base: &BaseModel, lora: &Lora) -> Tensor {
    let ids = [1u32, 5, 3, 7, 2, 6, 4, 1, 3];
    let labels: Vec<Option<u32>> = (0..ids.len()).map(|i| if i >= 3 && i + 1 < ids.len() { Some(ids[i + 1]) } else { None }).collect();
    sequence_loss(base, &ids, &labels, Some(lora)).unwrap()
}

#[test]
fn every_lora_parameter_gets_a_gradient_from_the_task_loss() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_packs(tmp.path());
    let pack = ModelPack::open(&tmp.path().join("int8")).unwrap();
    let base = BaseModel::from_pack(&pack, DType::F32, &Device::Cpu, 64).unwrap();
    let lora = Lora::new(&base, 4, 8.0, &Target::ALL, 1).unwrap();
    let vars: Vec<_> = lora.named_vars();
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), ParamsAdamW { lr: 1e-2, ..Default::default() }).unwrap();
    // With B = 0 at the start (LoRA's initialisation) A's gradient is exactly
    // zero, so one step first; after it, every parameter must get a gradient.
    opt.backward_step(&task_loss(&base, &lora)).unwrap();
    let grads = task_loss(&base, &lora).backward().unwrap();
    assert_eq!(vars.len(), 2 * 7 * 2);
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
}

/// The fp16 tiny pack's base model in f64 (`_tmp` holds its files) and a
/// rank-2 LoRA on every target with `B` random (seeded by `seed`), so every
/// parameter has a gradient.
fn f64_model_and_lora(seed: u64) -> (tempfile::TempDir, BaseModel, Lora) {
    let tmp = tempfile::tempdir().unwrap();
    tiny_packs(tmp.path());
    let pack = ModelPack::open(&tmp.path().join("fp16")).unwrap();
    let base = BaseModel::from_pack(&pack, DType::F64, &Device::Cpu, 64).unwrap();
    let lora = Lora::new(&base, 2, 4.0, &Target::ALL, seed).unwrap();
    for (name, var) in lora.named_vars() {
        if name.contains("lora_B") {
            let dims = var.as_tensor().dims().to_vec();
            var.set(&Tensor::randn(0f64, 0.3, dims, &Device::Cpu).unwrap()).unwrap();
        }
    }
    (tmp, base, lora)
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let (_tmp, base, lora) = f64_model_and_lora(2);
    let grads = task_loss(&base, &lora).backward().unwrap();
    let eps = 1e-6;
    let mut checked = 0;
    for (name, var) in lora.named_vars().into_iter().step_by(3) {
        let original = var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for index in [0, original.len() / 2, original.len() - 1] {
            let loss_at = |delta: f64| {
                let mut v = original.clone();
                v[index] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                task_loss(&base, &lora).to_scalar::<f64>().unwrap()
            };
            let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(original.clone(), var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
            let tolerance = 1e-6 + 1e-4 * numeric.abs().max(analytic[index].abs());
            assert!((numeric - analytic[index]).abs() <= tolerance, "{name}[{index}]: numeric {numeric}, autograd {}", analytic[index]);
            checked += 1;
        }
    }
    assert!(checked >= 12);
}

#[test]
fn packing_examples_changes_neither_the_loss_nor_its_gradients() {
    let (_tmp, base, lora) = f64_model_and_lora(4);
    // Three examples of different lengths and label counts.
    let ids: [&[u32]; 3] = [&[1, 5, 3, 7, 2, 6, 4, 1, 3], &[2, 4, 6], &[7, 1, 1, 5, 0, 2]];
    let labels: Vec<Vec<Option<u32>>> = ids.iter().map(|ids| (0..ids.len()).map(|i| (i >= 1 && i + 1 < ids.len()).then(|| ids[i + 1])).collect()).collect();
    let examples: Vec<(&[u32], &[Option<u32>])> = ids.iter().zip(&labels).map(|(i, l)| (*i, &l[..])).collect();
    let packed = batch_loss(&base, &examples, Some(&lora)).unwrap();
    let mut separate = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
    for (ids, labels) in &examples {
        separate = (separate + sequence_loss(&base, ids, labels, Some(&lora)).unwrap()).unwrap();
    }
    let separate = (separate / examples.len() as f64).unwrap();
    let (p, s) = (packed.to_scalar::<f64>().unwrap(), separate.to_scalar::<f64>().unwrap());
    assert!((p - s).abs() <= 1e-12 * s.abs(), "packed loss {p}, separate {s}");
    let (packed_grads, separate_grads) = (packed.backward().unwrap(), separate.backward().unwrap());
    for (name, var) in lora.named_vars() {
        let a = packed_grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = separate_grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f64, f64::max);
        assert!(scale > 0.0 && worst <= 1e-10 * scale, "{name}: packed gradient {worst} away from the separate one (max {scale})");
    }
    // An example whose labels do not match its tokens is refused, by index.
    let short: &[Option<u32>] = &[None, Some(1)];
    let err = batch_loss(&base, &[examples[0], (ids[1], short)], Some(&lora)).unwrap_err().to_string();
    assert!(err.contains("example 1: 2 labels for 3 tokens"), "{err}");
}
