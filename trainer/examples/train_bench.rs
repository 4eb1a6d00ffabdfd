//! Training throughput benchmark: where a night's training time goes.
//!
//! On the default int8 pack (`models/cache/smollm2-135m-instruct/int8`), with
//! 20 short question/answer examples in the device's chat template, it times
//! (medians of ROUNDS):
//! - one task example (the answer's cross-entropy): forward, and forward + backward;
//! - two task examples (a step's task side at the default `examples_per_step`),
//!   forward + backward one after the other and packed into one sequence
//!   ([`batch_loss`]);
//! - one rehearsal sequence (48 tokens, the full-vocabulary logits): the same;
//! - then `STEPS` steps of [`train`] with the default settings (MAS penalty and
//!   rehearsal), and prints its tokens per second, the figure `report.json`
//!   calls `tokens_per_second` (task and rehearsal tokens, forward and backward).
//!
//! `cargo run --release -p nocturne-trainer --example train_bench -- [STEPS] [ROUNDS]`
//! (default 60, 5).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use nocturne::tokenizer::{ChatMessage, Tokenizer, DEFAULT_SYSTEM_PROMPT};
use nocturne::weights::{ModelPack, TOKENIZER_FILE};
use nocturne_trainer::llama::{batch_loss, sequence_loss, BaseModel, Lora};
use nocturne_trainer::replay::{Example, ReplayBuffer};
use nocturne_trainer::train::{rehearsal_samples, tokenize, train, Retention, TrainConfig};

const FACTS: [(&str, &str); 4] = [
    ("What is the name of the harbour master?", "The harbour master is Ines Carvalho."),
    ("When does the ferry leave?", "The ferry leaves at seven every morning."),
    ("Where can I charge my phone?", "At the kiosk by the ticket office."),
    ("Which dock is for kayaks?", "Dock four, behind the boat shed."),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn timed(rounds: usize, mut f: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    let mut seconds = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f()?;
        seconds.push(t.elapsed().as_secs_f64());
    }
    Ok(median(seconds))
}

fn main() -> anyhow::Result<()> {
    nocturne_trainer::train::single_threaded_ops();
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(1).map_or(60, |s| s.parse().expect("STEPS is a number"));
    let rounds: usize = args.get(2).map_or(5, |s| s.parse().expect("ROUNDS is a number"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cache/smollm2-135m-instruct/int8");
    let pack = ModelPack::open(&dir)?;
    let tokenizer = Tokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
    let config = TrainConfig { steps, ..TrainConfig::default() };
    let examples: Vec<Example> = (0..20)
        .map(|i| {
            let (q, a) = FACTS[i % FACTS.len()];
            Example {
                device: Default::default(),
                interaction: i as u64 + 1,
                time_ms: 0,
                messages: vec![ChatMessage::new("system", DEFAULT_SYSTEM_PROMPT), ChatMessage::new("user", q)],
                target: a.to_string(),
                reply: String::new(),
                corrected: true,
                implicit: 1.0,
                explicit: 1.0,
                priority: 1.0,
            }
        })
        .collect();
    let buffer = ReplayBuffer { examples, ..ReplayBuffer::default() };
    let t = Instant::now();
    let rehearsal = rehearsal_samples(&pack, None, &tokenizer, config.rehearsal_sequences, config.rehearsal_tokens, 0)?;
    println!("rehearsal sampling: {} sequences of {} tokens in {:.2} s", rehearsal.len(), config.rehearsal_tokens, t.elapsed().as_secs_f64());
    let base = BaseModel::from_pack(&pack, DType::F32, &Device::Cpu, config.max_tokens)?;
    let lora = Lora::new(&base, config.rank, config.alpha, &config.targets, 0)?;
    let (ids, labels) = tokenize(&tokenizer, &buffer.examples[0], config.max_tokens)?;
    let labelled = labels.iter().flatten().count();
    let task_forward = timed(rounds, || sequence_loss(&base, &ids, &labels, Some(&lora)).map(drop))?;
    let task_both = timed(rounds, || sequence_loss(&base, &ids, &labels, Some(&lora))?.backward().map(drop))?;
    // A step's task side: `examples_per_step` examples, one after the other or packed into one sequence.
    let (ids2, labels2) = tokenize(&tokenizer, &buffer.examples[1], config.max_tokens)?;
    let pair: [(&[u32], &[Option<u32>]); 2] = [(&ids, &labels), (&ids2, &labels2)];
    let one_by_one = timed(rounds, || {
        let (a, b) = (sequence_loss(&base, &ids, &labels, Some(&lora))?, sequence_loss(&base, &ids2, &labels2, Some(&lora))?);
        ((a + b)? / 2.0)?.backward().map(drop)
    })?;
    let packed = timed(rounds, || batch_loss(&base, &pair, Some(&lora))?.backward().map(drop))?;
    let full = |ids: &[u32]| candle_nn::ops::log_softmax(&base.forward(ids, Some(&lora))?, candle_core::D::Minus1)?.mean_all();
    let rehearsal_forward = timed(rounds, || full(&rehearsal[0]).map(drop))?;
    let rehearsal_both = timed(rounds, || full(&rehearsal[0])?.backward().map(drop))?;
    println!("| sequence | tokens | forward ms | forward + backward ms |");
    println!("|---|---|---|---|");
    println!("| task example ({labelled} answer tokens) | {} | {:.1} | {:.1} |", ids.len(), 1e3 * task_forward, 1e3 * task_both);
    println!("| two task examples, one after the other | {} | — | {:.1} |", ids.len() + ids2.len(), 1e3 * one_by_one);
    println!("| two task examples packed into one sequence | {} | — | {:.1} |", ids.len() + ids2.len(), 1e3 * packed);
    println!("| rehearsal (full vocabulary) | {} | {:.1} | {:.1} |", rehearsal[0].len(), 1e3 * rehearsal_forward, 1e3 * rehearsal_both);
    let reference: Vec<Vec<u32>> = rehearsal.iter().take(4).cloned().collect();
    let outcome = train(&base, &tokenizer, &buffer, None, Retention { reference: &reference, rehearsal: &rehearsal }, &config, &mut |_, _, _| {})?;
    println!("train: {steps} steps in {:.1} s, {:.1} s/step, {:.0} tokens/s", outcome.seconds, outcome.seconds / steps as f64, outcome.tokens_per_second);
    Ok(())
}
