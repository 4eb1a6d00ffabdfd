//! Sleep consolidation: LoRA training on the replay buffer over the frozen
//! base, with a Memory Aware Synapses penalty against forgetting.
//!
//! Principal items: [`TrainConfig`], [`train`], [`TrainOutcome`],
//! [`tokenize`], [`mas_importance`].
//!
//! Each step draws one example by priority ([`ReplayBuffer::sample`]), and
//! takes an AdamW step (Loshchilov & Hutter, ICLR 2019) on
//! `cross-entropy(target tokens) + λ · Σ Ω ⊙ (θ − θ*)²`.
//!
//! The penalty follows Memory Aware Synapses (Aljundi et al., "Memory Aware
//! Synapses: Learning what (not) to forget", ECCV 2018): the importance Ω of
//! each LoRA parameter is the mean over reference prompts of
//! `|∂ ‖F(x)‖²₂ / ∂θ|`, F the model's output logits, measured at the starting
//! parameters, then scaled so that its mean over all parameters is 1 (so λ
//! does not depend on the output scale); θ* are the previous adapter's parameters (a warm start), or
//! zero on the first night (where `B = 0`, so only `B`, which carries the
//! whole update, is held back).

use candle_core::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use nocturne::adapter::Target;
use nocturne::tokenizer::{chatml, Tokenizer};

use crate::model::{sequence_loss, BaseModel, Lora};
use crate::replay::{Example, ReplayBuffer};

/// Training settings.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// LoRA rank (default 8).
    pub rank: usize,
    /// LoRA alpha (default 16).
    pub alpha: f32,
    /// Targeted projections (default q, k, v, o).
    pub targets: Vec<Target>,
    /// AdamW learning rate (default 2e-3).
    pub learning_rate: f64,
    /// Optimisation steps, one example each (default 300).
    pub steps: usize,
    /// Weight λ of the MAS penalty (default 0.5; 0 turns it off).
    pub mas_lambda: f64,
    /// Longest example, tokens (longer contexts are cut from the left).
    pub max_tokens: usize,
    /// Seed of initialisation and sampling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> TrainConfig {
        TrainConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Q, Target::K, Target::V, Target::O],
            learning_rate: 2e-3,
            steps: 300,
            mas_lambda: 0.5,
            max_tokens: 256,
            seed: 0,
        }
    }
}

/// Token ids of an example and the label of each position: the next token
/// where it belongs to the target (the answer and its `<|im_end|>`), else none.
///
/// # Errors
/// Tokenizer errors.
pub fn tokenize(tokenizer: &Tokenizer, example: &Example, max_tokens: usize) -> anyhow::Result<(Vec<u32>, Vec<Option<u32>>)> {
    let prompt = tokenizer.encode(&chatml(&example.messages, true))?;
    let target = tokenizer.encode(&format!("{}<|im_end|>", example.target))?;
    let mut ids = prompt.clone();
    ids.extend(&target);
    let mut labels: Vec<Option<u32>> = (0..ids.len()).map(|i| (i + 1 >= prompt.len() && i + 1 < ids.len()).then(|| ids[i + 1])).collect();
    if ids.len() > max_tokens {
        let cut = ids.len() - max_tokens;
        ids.drain(..cut);
        labels.drain(..cut);
    }
    Ok((ids, labels))
}

/// MAS importance of every LoRA parameter: mean over `prompts` of the
/// absolute gradient of the squared L2 norm of the output logits.
///
/// # Errors
/// candle errors.
pub fn mas_importance(base: &BaseModel, lora: &Lora, prompts: &[Vec<u32>]) -> candle_core::Result<Vec<Tensor>> {
    let vars = lora.named_vars();
    let mut total: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().zeros_like()).collect::<candle_core::Result<_>>()?;
    for prompt in prompts {
        let out = base.forward(prompt, Some(lora))?;
        let norm = out.sqr()?.sum_all()?;
        let grads = norm.backward()?;
        for ((_, var), acc) in vars.iter().zip(total.iter_mut()) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *acc = (&*acc + g.abs()?)?;
            }
        }
    }
    // Scale so the mean importance over all parameters is 1: λ then means the
    // same whatever the model's output scale.
    let count: usize = total.iter().map(|t| t.elem_count()).sum();
    let mut sum = 0.0;
    for t in &total {
        sum += t.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    let mean = sum / count.max(1) as f64;
    if mean == 0.0 {
        return Ok(total);
    }
    total.into_iter().map(|t| t / mean).collect()
}

/// What a training run produced.
pub struct TrainOutcome {
    /// The trained parameters.
    pub lora: Lora,
    /// Task loss (cross-entropy only) of every step.
    pub losses: Vec<f32>,
    /// Tokens processed (forward and backward) per second.
    pub tokens_per_second: f64,
    /// Wall time of training, seconds.
    pub seconds: f64,
}

/// Trains LoRA parameters on the examples `train` of `buffer` (indices),
/// sampled by priority. `previous` is the warm start (the previous night's
/// adapter, already loaded as [`Lora`]); `reference` holds the reference
/// prompts of the MAS importance. `progress(step, loss, tokens_per_second)`
/// is called after every step.
///
/// # Errors
/// Tokenizer or candle errors; no training example.
pub fn train(
    base: &BaseModel,
    tokenizer: &Tokenizer,
    buffer: &ReplayBuffer,
    train: &[usize],
    previous: Option<Lora>,
    reference: &[Vec<u32>],
    config: &TrainConfig,
    progress: &mut dyn FnMut(usize, f32, f64),
) -> anyhow::Result<TrainOutcome> {
    if train.is_empty() {
        anyhow::bail!("no training example: the journals hold no correction and no positively rated reply");
    }
    let lora = match previous {
        Some(lora) => lora,
        None => Lora::new(base, config.rank, config.alpha, &config.targets, config.seed)?,
    };
    let vars: Vec<Var> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    // θ*: the starting point (the previous adapter), or zero on the first night.
    let anchors: Vec<Tensor> = if lora_is_fresh(&lora)? {
        vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<candle_core::Result<_>>()?
    } else {
        vars.iter().map(|v| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?
    };
    let importance = if config.mas_lambda > 0.0 { mas_importance(base, &lora, reference)? } else { Vec::new() };
    let subset = ReplayBuffer { examples: train.iter().map(|&i| buffer.examples[i].clone()).collect(), report: buffer.report.clone() };
    let tokenized: Vec<_> = subset.examples.iter().map(|e| tokenize(tokenizer, e, config.max_tokens)).collect::<anyhow::Result<_>>()?;
    let mut opt = AdamW::new(vars.clone(), ParamsAdamW { lr: config.learning_rate, weight_decay: 0.0, ..Default::default() })?;
    let started = std::time::Instant::now();
    let (mut losses, mut tokens) = (Vec::with_capacity(config.steps), 0usize);
    for (step, i) in subset.sample(config.steps, config.seed ^ 0x5EED).into_iter().enumerate() {
        let (ids, labels) = &tokenized[i];
        let task = sequence_loss(base, ids, labels, Some(&lora))?;
        let mut loss = task.clone();
        if config.mas_lambda > 0.0 {
            let mut penalty = Tensor::zeros((), base.dtype(), base.device())?;
            for ((v, anchor), omega) in vars.iter().zip(&anchors).zip(&importance) {
                penalty = (penalty + (omega * (v.as_tensor() - anchor)?.sqr()?)?.sum_all()?)?;
            }
            loss = (loss + (penalty * config.mas_lambda)?)?;
        }
        opt.backward_step(&loss)?;
        tokens += ids.len();
        let task: f32 = task.to_dtype(candle_core::DType::F32)?.to_scalar()?;
        losses.push(task);
        progress(step + 1, task, tokens as f64 / started.elapsed().as_secs_f64());
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainOutcome { lora, losses, tokens_per_second: tokens as f64 / seconds, seconds })
}

/// True when every `B` is zero (a fresh initialisation).
fn lora_is_fresh(lora: &Lora) -> candle_core::Result<bool> {
    for (name, var) in lora.named_vars() {
        if name.contains("lora_B") && var.as_tensor().abs()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? != 0.0 {
            return Ok(false);
        }
    }
    Ok(true)
}
