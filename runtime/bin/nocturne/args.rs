//! Options several commands share: which pack to open (`ModelArgs`) and a
//! request's limits and sampling (`RequestArgs`). Options of one command
//! live with that command.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use nocturne::profile::{Precision, ACTIVE};
use nocturne::sampler::SamplerConfig;
use nocturne::session::{RequestOptions, SessionOptions};
use nocturne::tokenizer::{Tokenizer, DEFAULT_SYSTEM_PROMPT};
use nocturne::weights::{ModelPack, TOKENIZER_FILE};

use crate::personas::PersonaArgs;

/// Which model pack to serve.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model directory; default: smollm2-135m-instruct/<precision> under $NOCTURNE_MODELS, else ./models/cache, else $XDG_DATA_HOME/nocturne/models.
    #[arg(long, env = "NOCTURNE_MODEL")]
    pub model: Option<PathBuf>,
    /// Pack precision when --model is not given; default: the profile's.
    #[arg(long, value_parser = ["int8", "fp16"])]
    pub precision: Option<String>,
    /// Worker threads; default: the profile's, capped by the cores found.
    #[arg(long)]
    threads: Option<usize>,
    /// With an int8 pack, multiply int8 weights by int8-quantized activations
    /// (llama.cpp's Q8_0 scheme); answers may differ where the model's top
    /// two tokens are nearly tied.
    #[arg(long)]
    int8_activations: bool,
}

impl ModelArgs {
    fn precision(&self) -> Precision {
        match self.precision.as_deref() {
            Some("fp16") => Precision::Fp16,
            Some(_) => Precision::Int8,
            None => ACTIVE.weight_precision,
        }
    }

    /// The model directory these arguments name.
    pub fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(|| {
            crate::paths::models_root().join("smollm2-135m-instruct").join(self.precision().name())
        })
    }

    /// Opens the pack and its tokenizer.
    pub fn open(&self) -> anyhow::Result<(ModelPack, Tokenizer)> {
        let dir = self.dir();
        if !dir.is_dir() {
            bail!(
                "model directory {} does not exist (run `models/fetch` in the nocturne checkout to create the default one; \
                 with NOCTURNE_MODELS=DIR it installs into DIR)",
                dir.display()
            );
        }
        let pack = ModelPack::open(&dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
        // Parsing tokenizer.json leaves megabytes of freed heap that glibc
        // keeps mapped; hand it back before the first request pages the
        // weights in, so it does not add to the process's peak RSS (6 MB
        // for SmolLM2's tokenizer).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free heap memory; it has no preconditions and is thread-safe.
        unsafe {
            libc::malloc_trim(0);
        }
        Ok((pack, tokenizer))
    }

    /// Session options: the profile's, with --threads applied.
    pub fn session_options(&self) -> SessionOptions {
        let mut options = SessionOptions::for_profile(&ACTIVE);
        if let Some(t) = self.threads {
            options.threads = t.max(1);
        }
        options.int8_activations = self.int8_activations;
        options
    }
}

/// Sampling and request limits.
#[derive(Args, Clone)]
pub struct RequestArgs {
    /// Maximum new tokens, at least 1 (capped by the profile's max_new_tokens).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_new_tokens: Option<usize>,
    /// Deadline per request in milliseconds, at least 1 (default: the profile's).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    deadline_ms: Option<u64>,
    /// Sampling temperature, finite and ≥ 0; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = sampling(nocturne::sampler::temperature))]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p, in (0, 1].
    #[arg(long, default_value_t = 0.95, value_parser = sampling(nocturne::sampler::top_p))]
    top_p: f32,
    /// Repetition penalty, finite and > 0 (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = sampling(nocturne::sampler::repetition_penalty))]
    repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A string that ends the reply (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// System prompt (default: the model's, "You are a helpful AI assistant named SmolLM, …").
    #[arg(long, conflicts_with = "persona")]
    system: Option<String>,
    /// A persona's system prompt instead (technical, casual, formal, or one of --personas).
    #[arg(long)]
    persona: Option<String>,
    #[command(flatten)]
    personas: PersonaArgs,
}

impl RequestArgs {
    /// The persona named by `--persona` (it gives the system prompt, since
    /// `--system` conflicts with it).
    pub fn persona(&self) -> Option<&str> {
        self.persona.as_deref()
    }

    /// The system prompt: `--system`, else the `--persona`'s (personas from
    /// `state_dir` or `--personas`), else the model's default.
    ///
    /// # Errors
    /// An unknown persona, or a personas file that cannot be read.
    pub fn system_prompt(&self, state_dir: &std::path::Path) -> anyhow::Result<String> {
        match (&self.system, &self.persona) {
            (Some(system), _) => Ok(system.clone()),
            (None, Some(name)) => Ok(self.personas.load(state_dir)?.system(name)?.to_string()),
            (None, None) => Ok(DEFAULT_SYSTEM_PROMPT.to_string()),
        }
    }

    /// The request options these arguments describe.
    pub fn options(&self) -> RequestOptions {
        let mut options = RequestOptions::for_profile(&ACTIVE);
        if let Some(n) = self.max_new_tokens {
            options.max_new_tokens = n;
        }
        if let Some(ms) = self.deadline_ms {
            options.deadline = std::time::Duration::from_millis(ms);
        }
        options.stop = self.stop.clone();
        options.sampler = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
        };
        options
    }
}

/// A clap value parser: an f32 that the library's range check accepts (the
/// same rule `Session::generate` applies).
fn sampling(check: fn(f32) -> Result<f32, nocturne::sampler::SamplingError>) -> impl Fn(&str) -> Result<f32, String> + Clone {
    move |text: &str| {
        let value: f32 = text.parse().map_err(|e| format!("`{text}` is not a number: {e}"))?;
        check(value).map_err(|e| e.to_string())
    }
}
