//! Sleep consolidation: LoRA training on the replay buffer over the frozen
//! base, with two terms against forgetting: a Memory Aware Synapses penalty
//! and rehearsal on the base model's own text.
//!
//! Principal items: [`TrainConfig`], [`train`], [`TrainOutcome`],
//! [`tokenize`], [`mas_importance`], [`rehearsal_samples`], [`targets_named`].
//!
//! Each step draws one example by priority ([`ReplayBuffer::sample`]), and
//! takes an AdamW step (Loshchilov & Hutter, ICLR 2019; learning rate warmed
//! up, then cosine-decayed) on
//! `cross-entropy(target tokens) + λ · Σ Ω ⊙ (θ − θ*)² + μ · KL(p_start ‖ p_θ)`,
//! the last on one rehearsal sequence per step ([`rehearsal_samples`]), where
//! `p_start` is the model training starts from (base + previous adapter).
//! The example's gradient and the rehearsal term's are taken on two threads
//! and summed before the update.
//!
//! The penalty follows Memory Aware Synapses (Aljundi et al., "Memory Aware
//! Synapses: Learning what (not) to forget", ECCV 2018): the importance Ω of
//! each LoRA parameter is the mean over reference prompts of
//! `|∂ ‖F(x)‖²₂ / ∂θ|`, F the model's output logits, measured at the starting
//! parameters, then scaled so that its mean over all parameters is 1 (so λ
//! does not depend on the output scale); θ* are the previous adapter's parameters (a warm start), or
//! zero on the first night (where `B = 0`, so only `B`, which carries the
//! whole update, is held back).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use std::sync::Arc;

use nocturne::adapter::{LoraAdapter, Target};
use nocturne::budget::PlanSettings;
use nocturne::decoder::Decoder;
use nocturne::sampler::{Sampler, SamplerConfig};
use nocturne::tokenizer::{ChatMessage, Tokenizer, DEFAULT_SYSTEM_PROMPT, IM_END, IM_START};
use nocturne::weights::ModelPack;

use crate::llama::{batch_loss, BaseModel, Lora};
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
    /// Optimisation steps (default 600: at two examples a step, 400 left
    /// a fifth of 40 corrections unlearned when paraphrases share the steps).
    pub steps: usize,
    /// Examples drawn per step (default 2): the task loss is their mean
    /// ([`batch_loss`]: one forward over them packed into one sequence), so
    /// a step's gradient averages several corrections; the rehearsal term
    /// stays one sequence per step.
    pub examples_per_step: usize,
    /// Weight λ of the MAS penalty (default 0.005; 0 turns it off). With the
    /// importance normalised to mean 1, the penalty sums over every LoRA
    /// parameter, so small values already hold the adapter back strongly.
    pub mas_lambda: f64,
    /// Longest example, tokens (longer contexts are cut from the left).
    pub max_tokens: usize,
    /// Weight μ of the rehearsal term (default 30; 0 turns it off; see [`rehearsal_samples`]).
    pub rehearsal_weight: f64,
    /// Rehearsal sequences sampled from the base model (default 32).
    pub rehearsal_sequences: usize,
    /// Tokens per rehearsal sequence at most (default 80).
    pub rehearsal_tokens: usize,
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
            steps: 600,
            examples_per_step: 2,
            mas_lambda: 0.005,
            max_tokens: 256,
            rehearsal_weight: 30.0,
            rehearsal_sequences: 32,
            rehearsal_tokens: 80,
            seed: 0,
        }
    }
}

/// The projections named `names` (`q_proj`, …, `down_proj`, as PEFT names
/// them), in the order given.
///
/// # Errors
/// A name that is not a target, with the names that are.
pub fn targets_named(names: &[String]) -> anyhow::Result<Vec<Target>> {
    names
        .iter()
        .map(|n| {
            Target::from_name(n).ok_or_else(|| anyhow::anyhow!("unknown target `{n}` ({})", Target::ALL.map(Target::name).join(", ")))
        })
        .collect()
}

/// Token ids of an example and the label of each position: the next token
/// where it belongs to the target (the answer and its `<|im_end|>`), else none.
///
/// # Errors
/// Tokenizer errors.
pub fn tokenize(tokenizer: &Tokenizer, example: &Example, max_tokens: usize) -> anyhow::Result<(Vec<u32>, Vec<Option<u32>>)> {
    let prompt = tokenizer.encode_chat(&example.messages, true)?;
    let mut target = tokenizer.encode(&example.target)?;
    target.push(tokenizer.special_id(IM_END)?);
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

/// Rehearsal sequences: text the device's current model (the base, with
/// `adapter` when a previous night's adapter is active) itself writes,
/// sampled at temperature 1 with nucleus sampling (top-p 0.9, no penalty) on
/// the device decoder, `count` sequences of at most `tokens` tokens,
/// alternately:
/// - from a document boundary (`<|endoftext|>`): whatever text it writes;
/// - a whole chat exchange as the device holds one: the default system
///   prompt, a user message the model writes (at most a third of `tokens`,
///   ended by `<|im_end|>`), and the model's own reply to it, up to its
///   `<|im_end|>` or the length. The reply is what keeps the adapter from
///   changing how the model answers questions nobody taught: with free text
///   only, the adapter learned the corrections' house style (short answers)
///   and every general answer changed with it (issue 15's locality).
///
/// Training adds `μ · KL(p_start ‖ p_θ)` averaged over the positions of one
/// such sequence per step, `p_start` being the model training starts from
/// (the same current model): since the text is drawn from its own
/// distribution, this is the expected divergence of the adapted model from
/// it on what it writes, which keeps the adapter from changing behaviour
/// away from the corrected answers (and, on later nights, from forgetting
/// what earlier adapters learned). Rehearsal on self-generated
/// text follows Huang et al., "Mitigating Catastrophic Forgetting in Large
/// Language Models with Self-Synthesized Rehearsal" (ACL 2024), whose
/// rehearsal data are likewise instructions and answers the model writes;
/// distilling the old model's outputs follows Li & Hoiem, "Learning without
/// Forgetting" (ECCV 2016). It needs no data besides the pack.
///
/// # Errors
/// Decoder errors.
pub fn rehearsal_samples(
    pack: &ModelPack,
    adapter: Option<Arc<LoraAdapter>>,
    tokenizer: &Tokenizer,
    count: usize,
    tokens: usize,
    seed: u64,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let (im_start, im_end) = (tokenizer.special_id(IM_START)?, tokenizer.special_id(IM_END)?);
    let mut chat_opening = tokenizer.encode_chat(&[ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT)], false)?;
    chat_opening.push(im_start);
    chat_opening.extend(tokenizer.encode("user\n")?);
    let mut reply_opening = vec![im_end];
    reply_opening.extend(tokenizer.encode("\n")?);
    reply_opening.push(im_start);
    reply_opening.extend(tokenizer.encode("assistant\n")?);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut decoder = Decoder::new(pack, PlanSettings::new(pack.config(), tokens.max(2), threads));
    decoder.set_adapter(adapter);
    let vocab = pack.config().vocab_size;
    let config = SamplerConfig { temperature: 1.0, top_k: 0, top_p: 0.9, repetition_penalty: 1.0, seed };
    let mut sampler = Sampler::new(config, vocab);
    // Samples onto `ids` (whose tokens up to the last the decoder has seen)
    // until `limit` tokens or the `stop` token (kept).
    let mut extend = |decoder: &mut Decoder<'_>, ids: &mut Vec<u32>, limit: usize, stop: Option<u32>| -> anyhow::Result<()> {
        while ids.len() < limit && (stop.is_none() || ids.last() != stop.as_ref()) {
            let logits = decoder.forward(&ids[ids.len() - 1..])?;
            let next = sampler.sample(logits, ids);
            ids.push(next);
        }
        Ok(())
    };
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        decoder.truncate(0);
        if i % 2 == 0 {
            let mut ids = vec![0u32];
            extend(&mut decoder, &mut ids, tokens, None)?;
            out.push(ids);
            continue;
        }
        let mut ids = chat_opening.clone();
        ids.truncate(tokens.saturating_sub(reply_opening.len() + 1).max(1));
        if ids.len() > 1 {
            decoder.forward(&ids[..ids.len() - 1])?;
        }
        let question_end = (ids.len() + tokens / 3).min(tokens.saturating_sub(reply_opening.len() + 1));
        extend(&mut decoder, &mut ids, question_end, Some(im_end))?;
        if ids.last() == Some(&im_end) {
            ids.pop();
            decoder.truncate(ids.len() - 1);
        }
        if ids.len() + reply_opening.len() < tokens {
            let at = ids.len();
            ids.extend(&reply_opening);
            decoder.forward(&ids[at - 1..ids.len() - 1])?;
            extend(&mut decoder, &mut ids, tokens, Some(im_end))?;
        }
        out.push(ids);
    }
    Ok(out)
}

/// What the rehearsal term holds the adapter to on one sequence: the
/// starting model's next-token probabilities after every token, `[T, vocab]`,
/// and their mean `Σ p log p` per position, both computed once, before
/// training, and detached (constants for every later step).
struct RehearsalTarget<'a> {
    ids: &'a [u32],
    p: Arc<[f32]>,
    neg_entropy: Tensor,
}

impl<'a> RehearsalTarget<'a> {
    fn new(base: &BaseModel, lora: &Lora, ids: &'a [u32]) -> candle_core::Result<RehearsalTarget<'a>> {
        let logits = base.forward(ids, Some(lora))?.detach();
        let p: Arc<[f32]> = candle_nn::ops::softmax(&logits, candle_core::D::Minus1)?.flatten_all()?.to_vec1::<f32>()?.into();
        // Σ p log p, computed as the cross-entropy of p against itself by the
        // same op as every later step's, so the divergence of the starting
        // model is exactly 0.
        let neg_entropy = logits.apply_op1_no_bwd(&SoftCrossEntropy { p: Arc::clone(&p) })?.neg()?;
        Ok(RehearsalTarget { ids, p, neg_entropy })
    }

    /// Mean over positions of `KL(p_start ‖ p_θ) = Σ p log p − Σ p log p_θ`.
    fn divergence(&self, base: &BaseModel, lora: &Lora) -> candle_core::Result<Tensor> {
        let logits = base.forward(self.ids, Some(lora))?;
        let cross = logits.apply_op1(SoftCrossEntropy { p: Arc::clone(&self.p) })?;
        &self.neg_entropy + cross
    }
}

/// `−(1/T) Σₜ Σᵥ pₜᵥ log softmax(zₜ)ᵥ` for logits `z` `[T, vocab]` against a
/// constant distribution `p` `[T, vocab]` (rows summing to 1), in one pass
/// per row instead of candle's composed log-softmax (which allocates a
/// `[T, vocab]` tensor per elementary op, forward and backward). Its
/// gradient is the classic `∂/∂zₜ = (softmax(zₜ) − pₜ) / T`. f32 only; `p`
/// row-major, read once per rehearsal sequence, shared by every step.
struct SoftCrossEntropy {
    p: Arc<[f32]>,
}

impl SoftCrossEntropy {
    /// Each row of `z` `[rows, vocab]` with its `p` row and `z`'s
    /// log-sum-exp; an error when `z` and `p` differ in size.
    fn rows<'a>(&'a self, z: &'a [f32], vocab: usize) -> candle_core::Result<impl Iterator<Item = (&'a [f32], &'a [f32], f32)> + 'a> {
        if z.len() != self.p.len() {
            candle_core::bail!("soft cross-entropy: {} logits against {} target probabilities", z.len(), self.p.len());
        }
        Ok(z.chunks_exact(vocab).zip(self.p.chunks_exact(vocab)).map(|(z, p)| {
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = z.iter().map(|v| f64::from((v - max).exp())).sum();
            (z, p, max + sum.ln() as f32)
        }))
    }
}

impl candle_core::CustomOp1 for SoftCrossEntropy {
    fn name(&self) -> &'static str {
        "soft-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (candle_core::CpuStorage::F32(z), Some((a, b)), (rows, vocab)) = (storage, layout.contiguous_offsets(), layout.shape().dims2()?) else {
            candle_core::bail!("soft cross-entropy: the logits must be contiguous f32");
        };
        let total: f64 = self.rows(&z[a..b], vocab)?.map(|(z, p, lse)| z.iter().zip(p).map(|(z, p)| f64::from(p * (lse - z))).sum::<f64>()).sum();
        Ok((candle_core::CpuStorage::F32(vec![(total / rows.max(1) as f64) as f32]), candle_core::Shape::from(())))
    }

    fn bwd(&self, z: &Tensor, _loss: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (rows, vocab) = z.dims2()?;
        let values: Vec<f32> = z.flatten_all()?.to_vec1()?;
        let scale = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / rows.max(1) as f32;
        let mut out = Vec::with_capacity(values.len());
        for (z, p, lse) in self.rows(&values, vocab)? {
            out.extend(z.iter().zip(p).map(|(z, p)| scale * ((z - lse).exp() - p)));
        }
        Ok(Some(Tensor::from_vec(out, (rows, vocab), z.device())?))
    }
}

/// Makes candle's CPU ops single-threaded, so that [`train`] takes the
/// example's gradient and the rehearsal term's on two threads of its own.
/// candle splits each product and elementwise op over a thread pool; at a
/// few dozen tokens per sequence that scales poorly: on 2 cores, 118 tokens/s
/// with one thread and 134 with two, while two single-threaded sides reach
/// 181 (`examples/train_bench.rs`). It sets `RAYON_NUM_THREADS=1` (the
/// variable candle's CPU backend reads) unless the user set it; [`train`]
/// runs the two sides one after the other when candle has more threads.
///
/// Call it first in `main`, before any other thread starts (setting the
/// environment is only sound while no other thread reads it).
pub fn single_threaded_ops() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
}

/// What a training run produced.
pub struct TrainOutcome {
    /// The trained parameters.
    pub lora: Lora,
    /// Task loss (cross-entropy only) of every step.
    pub losses: Vec<f32>,
    /// Rehearsal divergence of every step (empty without rehearsal).
    pub divergences: Vec<f32>,
    /// Tokens processed (forward and backward) per second.
    pub tokens_per_second: f64,
    /// Wall time of training, seconds.
    pub seconds: f64,
}

/// What holds the adapter near the model training starts from: the
/// reference prompts of the MAS importance, and the sequences of the
/// rehearsal term (from [`rehearsal_samples`]; unused when its weight is 0).
#[derive(Clone, Copy)]
pub struct Retention<'a> {
    /// Reference prompts (token ids) of the MAS importance.
    pub reference: &'a [Vec<u32>],
    /// Rehearsal sequences (token ids) the starting model sampled.
    pub rehearsal: &'a [Vec<u32>],
}

/// Trains LoRA parameters on every example of `examples`,
/// sampled by priority. `previous` is the warm start (the previous night's
/// adapter, already loaded as [`Lora`]); `retention` holds it near the
/// starting model. `progress(step, loss, tokens_per_second)`
/// is called after every step.
///
/// # Errors
/// Tokenizer or candle errors; no training example.
pub fn train(
    base: &BaseModel,
    tokenizer: &Tokenizer,
    examples: &ReplayBuffer,
    previous: Option<Lora>,
    retention: Retention<'_>,
    config: &TrainConfig,
    progress: &mut dyn FnMut(usize, f32, f64),
) -> anyhow::Result<TrainOutcome> {
    if examples.examples.is_empty() {
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
    let importance = if config.mas_lambda > 0.0 { mas_importance(base, &lora, retention.reference)? } else { Vec::new() };
    let tokenized: Vec<_> = examples.examples.iter().map(|e| tokenize(tokenizer, e, config.max_tokens)).collect::<anyhow::Result<_>>()?;
    let rehearsal: Vec<RehearsalTarget<'_>> = if config.rehearsal_weight > 0.0 {
        retention.rehearsal.iter().map(|ids| RehearsalTarget::new(base, &lora, ids)).collect::<candle_core::Result<_>>()?
    } else {
        Vec::new()
    };
    let parallel_sides = candle_core::utils::get_num_threads() == 1;
    let mut opt = AdamW::new(vars.clone(), ParamsAdamW { lr: config.learning_rate, weight_decay: 0.0, ..Default::default() })?;
    let started = std::time::Instant::now();
    let (mut losses, mut divergences, mut tokens) = (Vec::with_capacity(config.steps), Vec::new(), 0usize);
    for (step, picked) in batches(examples, config).iter().enumerate() {
        let target = rehearsal.get(step % rehearsal.len().max(1));
        // The example's loss (with the penalty) and the rehearsal term share
        // nothing until the update: their gradients are taken on two threads
        // and summed, when candle's ops are single-threaded
        // ([`single_threaded_ops`]); else one after the other.
        let (task_side, rehearsal_side) = join(parallel_sides,
            || -> candle_core::Result<(Tensor, GradStore)> {
                let batch: Vec<(&[u32], &[Option<u32>])> = picked.iter().map(|&i| (&tokenized[i].0[..], &tokenized[i].1[..])).collect();
                let task = batch_loss(base, &batch, Some(&lora))?;
                let mut loss = task.clone();
                if config.mas_lambda > 0.0 {
                    let mut penalty = Tensor::zeros((), base.dtype(), base.device())?;
                    for ((v, anchor), omega) in vars.iter().zip(&anchors).zip(&importance) {
                        penalty = (penalty + (omega * (v.as_tensor() - anchor)?.sqr()?)?.sum_all()?)?;
                    }
                    loss = (loss + (penalty * config.mas_lambda)?)?;
                }
                let grads = loss.backward()?;
                Ok((task, grads))
            },
            || -> candle_core::Result<Option<(Tensor, GradStore)>> {
                let Some(target) = target else { return Ok(None) };
                let divergence = target.divergence(base, &lora)?;
                let grads = (&divergence * config.rehearsal_weight)?.backward()?;
                Ok(Some((divergence, grads)))
            },
        );
        let (task, mut grads) = task_side?;
        if let (Some((divergence, rehearsal_grads)), Some(target)) = (rehearsal_side?, target) {
            grads.extend(rehearsal_grads)?;
            divergences.push(divergence.to_dtype(candle_core::DType::F32)?.to_scalar()?);
            tokens += target.ids.len();
        }
        opt.set_learning_rate(learning_rate(config, step));
        opt.step(&grads)?;
        tokens += picked.iter().map(|&i| tokenized[i].0.len()).sum::<usize>();
        let task: f32 = task.to_dtype(candle_core::DType::F32)?.to_scalar()?;
        losses.push(task);
        progress(step + 1, task, tokens as f64 / started.elapsed().as_secs_f64());
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainOutcome { lora, losses, divergences, tokens_per_second: tokens as f64 / seconds, seconds })
}

/// The examples each step of [`train`] trains on: `config.steps` batches
/// of `config.examples_per_step` (at least 1) indices into `examples`,
/// drawn by priority ([`ReplayBuffer::sample`], seeded by `config.seed`).
pub fn batches(examples: &ReplayBuffer, config: &TrainConfig) -> Vec<Vec<usize>> {
    let per_step = config.examples_per_step.max(1);
    examples.sample(config.steps * per_step, config.seed ^ 0x5EED).chunks(per_step).map(<[usize]>::to_vec).collect()
}

/// Runs `a`, and `b` on a scoped thread when `parallel` (else after `a`); both results.
fn join<A: Send, B: Send>(parallel: bool, a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    if !parallel {
        return (a(), b());
    }
    std::thread::scope(|s| {
        let other = s.spawn(b);
        let first = a();
        (first, other.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

/// The learning rate at `step` (from 0): a linear warm-up over the first 5%
/// of the steps, then a cosine decay to zero (Loshchilov & Hutter, "SGDR",
/// ICLR 2017), so that the last steps settle instead of moving the adapter
/// around at full rate.
fn learning_rate(config: &TrainConfig, step: usize) -> f64 {
    let warmup = (config.steps / 20).max(1);
    if step < warmup {
        return config.learning_rate * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (config.steps - warmup).max(1) as f64;
    config.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
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

#[cfg(test)]
mod tests {
    use super::targets_named;
    use nocturne::adapter::Target;

    #[test]
    fn targets_by_name_and_unknown_names_listed() {
        let names: Vec<String> = ["v_proj", "down_proj"].map(String::from).to_vec();
        assert_eq!(targets_named(&names).unwrap(), vec![Target::V, Target::Down]);
        let err = targets_named(&["w_proj".to_string()]).unwrap_err().to_string();
        assert!(err.contains("`w_proj`") && err.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"), "{err}");
    }
}
