//! Token sampling from logits.
//!
//! Principal types: [`Sampler`], [`SamplerConfig`].
//!
//! Order of operations (as in llama.cpp's default chain): repetition penalty
//! over the last [`PENALTY_WINDOW`] tokens (CTRL, Keskar et al. 2019: a
//! positive logit is divided by the penalty, a negative one multiplied),
//! then greedy argmax when `temperature == 0`, else temperature scaling,
//! top-k, softmax, top-p (nucleus, Holtzman et al. 2020) and a draw from the
//! seeded SplitMix64 generator (Steele, Lea & Flood 2014), so a seed
//! reproduces a reply exactly.
//!
//! Invariants: candidate buffers are allocated once (`vocab` indices and
//! probabilities); [`Sampler::sample`] never allocates.

/// The SplitMix64 generator (Steele, Lea & Flood, "Fast splittable
/// pseudorandom number generators", OOPSLA 2014): the state is the seed and
/// advances by the golden-ratio constant; every output is a mix of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next uniform value in `[0, 1)` (24 bits).
    pub fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// How many recent tokens the repetition penalty looks at.
pub const PENALTY_WINDOW: usize = 64;

/// Sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 for greedy decoding; otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Repetition penalty (1 = none).
    pub repetition_penalty: f32,
    /// Seed of the random generator.
    pub seed: u64,
}

/// A sampling parameter outside its range.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// Not finite, or negative.
    #[error("temperature {0} is not a finite number ≥ 0 (0 is greedy)")]
    Temperature(f32),
    /// Not in (0, 1].
    #[error("top-p {0} is not in (0, 1]")]
    TopP(f32),
    /// Not finite, or not positive (0 makes every seen token certain).
    #[error("repetition penalty {0} is not a finite number > 0 (1 is none)")]
    RepetitionPenalty(f32),
}

/// `t` if it is a valid temperature (finite, ≥ 0).
///
/// # Errors
/// [`SamplingError::Temperature`].
pub fn temperature(t: f32) -> Result<f32, SamplingError> {
    if t.is_finite() && t >= 0.0 { Ok(t) } else { Err(SamplingError::Temperature(t)) }
}

/// `p` if it is a valid top-p (in `(0, 1]`).
///
/// # Errors
/// [`SamplingError::TopP`].
pub fn top_p(p: f32) -> Result<f32, SamplingError> {
    if p > 0.0 && p <= 1.0 { Ok(p) } else { Err(SamplingError::TopP(p)) }
}

/// `r` if it is a valid repetition penalty (finite, > 0).
///
/// # Errors
/// [`SamplingError::RepetitionPenalty`].
pub fn repetition_penalty(r: f32) -> Result<f32, SamplingError> {
    if r.is_finite() && r > 0.0 { Ok(r) } else { Err(SamplingError::RepetitionPenalty(r)) }
}

impl SamplerConfig {
    /// Checks every parameter's range ([`temperature`], [`top_p`],
    /// [`repetition_penalty`]): the rules the CLI's options and the local API
    /// apply too.
    ///
    /// # Errors
    /// The first parameter out of range.
    pub fn check(&self) -> Result<(), SamplingError> {
        temperature(self.temperature)?;
        top_p(self.top_p)?;
        repetition_penalty(self.repetition_penalty)?;
        Ok(())
    }
}

impl Default for SamplerConfig {
    /// Greedy decoding, no penalty.
    fn default() -> SamplerConfig {
        SamplerConfig { temperature: 0.0, top_k: 40, top_p: 0.95, repetition_penalty: 1.0, seed: 0 }
    }
}

/// A sampler with preallocated candidate buffers.
pub struct Sampler {
    config: SamplerConfig,
    rng: SplitMix64,
    candidates: Vec<u32>,
    probs: Vec<f32>,
}

impl Sampler {
    /// A sampler for a vocabulary of `vocab` tokens.
    pub fn new(config: SamplerConfig, vocab: usize) -> Sampler {
        Sampler { config, rng: SplitMix64(config.seed), candidates: Vec::with_capacity(vocab), probs: Vec::with_capacity(vocab) }
    }

    /// Bytes this sampler allocated.
    pub fn allocated(&self) -> usize {
        self.candidates.capacity() * 4 + self.probs.capacity() * 4
    }

    /// Replaces the configuration and restarts the generator from its seed.
    pub fn reconfigure(&mut self, config: SamplerConfig) {
        self.config = config;
        self.rng = SplitMix64(config.seed);
    }

    fn next_unit(&mut self) -> f32 {
        self.rng.next_unit()
    }

    /// Picks the next token from `logits` (modified in place by the penalty
    /// and temperature); `history` is the sequence so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = self.config;
        if c.repetition_penalty != 1.0 {
            let window = &history[history.len().saturating_sub(PENALTY_WINDOW)..];
            for (i, &t) in window.iter().enumerate() {
                if window[..i].contains(&t) {
                    continue;
                }
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / c.repetition_penalty } else { *l * c.repetition_penalty };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        self.candidates.clear();
        self.candidates.extend(0..logits.len() as u32);
        let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        let k = if c.top_k == 0 { logits.len() } else { c.top_k.min(logits.len()) };
        if k < logits.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_logit);
        let max = logits[self.candidates[0] as usize];
        self.probs.clear();
        let mut sum = 0.0;
        for &t in &self.candidates {
            let p = ((logits[t as usize] - max) / c.temperature).exp();
            sum += p;
            self.probs.push(p);
        }
        let mut kept = 0;
        let mut mass = 0.0;
        for &p in &self.probs {
            mass += p;
            kept += 1;
            if mass >= c.top_p * sum {
                break;
            }
        }
        let target = self.next_unit() * mass;
        let mut acc = 0.0;
        for (i, &p) in self.probs[..kept].iter().enumerate() {
            acc += p;
            if acc > target {
                return self.candidates[i];
            }
        }
        self.candidates[kept - 1]
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(temperature: f32, top_k: usize, top_p: f32) -> SamplerConfig {
        SamplerConfig { temperature, top_k, top_p, repetition_penalty: 1.0, seed: 7 }
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplerConfig::default(), 4);
        assert_eq!(s.sample(&mut [0.1, 2.0, -1.0, 1.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_choices() {
        let logits = [0.0, 1.0, 2.0, 3.0, 2.5];
        let mut s = Sampler::new(config(1.0, 1, 1.0), 5);
        assert!((0..50).all(|_| s.sample(&mut logits.clone(), &[]) == 3));
        let mut s = Sampler::new(config(5.0, 2, 1.0), 5);
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&mut logits.clone(), &[])).collect();
        assert!(picks.iter().all(|&t| t == 3 || t == 4) && picks.contains(&3) && picks.contains(&4));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Token 0 holds ~0.88 of the mass at temperature 1: top_p 0.5 keeps only it.
        let logits = [4.0, 2.0, 0.0, 0.0];
        let mut s = Sampler::new(config(1.0, 0, 0.5), 4);
        assert!((0..100).all(|_| s.sample(&mut logits.clone(), &[]) == 0));
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let draws = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..config(1.0, 50, 0.9) }, 100);
            (0..30).map(|_| s.sample(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draws(1), draws(1));
        assert_ne!(draws(1), draws(2));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens_once() {
        let mut s = Sampler::new(SamplerConfig { repetition_penalty: 2.0, ..SamplerConfig::default() }, 3);
        let mut logits = [3.0, 2.0, -1.0];
        assert_eq!(s.sample(&mut logits, &[0, 0, 2]), 1);
        assert_eq!(logits, [1.5, 2.0, -2.0]);
    }
}
