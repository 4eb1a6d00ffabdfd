//! `nocturne bench`: prefill and decode speed for the int8 and fp16 packs at
//! one thread and at the profile's threads, time from process start to the
//! first token and peak RSS (measured on a child `nocturne generate`), and
//! the weight-streaming bandwidth of decode next to the machine's measured
//! memory read bandwidth (`--bandwidth-bytes 0` skips that). The int8 pack
//! runs twice: with f32 activations, and with `--int8-activations` (int8 ×
//! int8 products). Per decoded token it also reports the worker pool's
//! joins and the time the calling thread waited at them after finishing its
//! own share. `--json` prints the rows as JSON lines. With `--journal`: decode speed with the journal
//! off and on, in both durability modes; with `--lora-rank R`: decode speed
//! without and with an unmerged LoRA adapter; with `--serve`: a load test of
//! the local API (`serve_load.rs`).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use nocturne::adapter::{write_adapter_bundle, AdapterSpec, AdapterTensor, LoraAdapter, Target};
use nocturne::journal::{Body, Feedback, Interaction, Journal, JournalConfig};
use nocturne::ids::DeviceId;
use nocturne::pool::{share, PoolStats, WorkerPool};
use nocturne::profile::{worker_threads, Durability, ACTIVE};
use nocturne::sampler::argmax;
use nocturne::session::{Session, SessionOptions};
use nocturne::journal::StopReason;
use nocturne::tokenizer::Tokenizer;
use nocturne::weights::{ModelPack, TOKENIZER_FILE};

/// Benchmark settings.
#[derive(Args)]
pub struct BenchArgs {
    /// Directory holding the int8/ and fp16/ packs; default: smollm2-135m-instruct in the models directory (see `--model` of generate).
    #[arg(long)]
    packs: Option<PathBuf>,
    /// Prompt length for prefill, at least 1.
    #[arg(long, default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Bytes read to measure memory bandwidth.
    #[arg(long, default_value_t = 512 << 20)]
    bandwidth_bytes: usize,
    /// Instead of the table: decode tokens/s with the journal off and on.
    #[arg(long)]
    journal: bool,
    /// Instead of the table: decode tokens/s without and with a LoRA adapter
    /// of this rank on q, k, v and o (zero weights: speed does not depend on them).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// Instead of the table: a load test of `nocturne serve` on loopback (JSON
    /// report: requests/s, first-token p50/p99, decode tok/s, peak RSS, and
    /// that every completed response was journaled once).
    #[arg(long)]
    serve: bool,
    /// With --serve: concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// With --serve: requests in all.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// With --serve: the server's slots (default: the profile's).
    #[arg(long)]
    slots: Option<usize>,
    /// With --serve: new tokens per request at most.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// With --serve: seed of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Instead of the table: recall memory with this many corrections in the
    /// journal (rebuild, load and search times; first token and peak RSS of
    /// `generate` with recall on and off). Needs the `recall` feature.
    #[arg(long)]
    recall: Option<usize>,
    /// Rounds of the journal or adapter comparison (each round runs every mode once).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Print one JSON object per table row instead of the table (for scripts;
    /// `--bandwidth-bytes 0` skips the bandwidth columns).
    #[arg(long)]
    json: bool,
}

const TEXT: &str = "The lighthouse keeper climbed the spiral stairs each evening, counting the steps \
    and listening to the sea below. Ships passed in the dark, guided by the slow turn of the lamp, \
    and in the morning he wrote their names in a book that nobody else ever read. ";

/// Weight bytes one decode step reads: every matrix once (the tied output
/// projection included), one embedding row, and the norms.
fn weight_bytes_per_token(pack: &ModelPack) -> usize {
    let c = pack.config();
    let mut bytes = pack.lm_head().bytes() + pack.embed_tokens().bytes() / c.vocab_size;
    for l in 0..c.num_hidden_layers {
        let w = pack.layer(l);
        bytes += [w.q_proj, w.k_proj, w.v_proj, w.o_proj, w.gate_proj, w.up_proj, w.down_proj]
            .iter()
            .map(|m| m.bytes())
            .sum::<usize>();
        bytes += 2 * 4 * c.hidden_size;
    }
    bytes + 4 * c.hidden_size
}

/// Read bandwidth of `bytes` of memory with `threads` threads, best of five, bytes/s.
fn read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let data: Vec<u64> = (0..bytes / 8).map(|i| i as u64).collect();
    let pool = WorkerPool::new(threads);
    let sink = std::sync::atomic::AtomicU64::new(0);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        pool.run(&|w, n| {
            let part = &data[share(data.len(), w, n)];
            let mut lanes = [0u64; 8];
            for chunk in part.chunks_exact(8) {
                for (l, v) in lanes.iter_mut().zip(chunk) {
                    *l = l.wrapping_add(*v);
                }
            }
            sink.fetch_add(lanes.iter().fold(0, |a, b| a.wrapping_add(*b)), std::sync::atomic::Ordering::Relaxed);
        });
        best = best.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink.into_inner());
    bytes as f64 / best
}

/// Runs `nocturne generate ARGS` as a child process; returns the time from
/// spawning it to its first byte of output, and its peak RSS in MiB as the
/// child reports it (`VmHWM`; a parent's `wait4` figure would include the
/// parent's own pages, inherited across fork and exec).
pub fn child_first_token(args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let started = Instant::now();
    let mut child = Command::new(std::env::current_exe()?)
        .arg("generate")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start a child nocturne")?;
    let mut stdout = child.stdout.take().context("child has no stdout")?;
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).context("the child printed nothing")?;
    let ttft = started.elapsed().as_secs_f64();
    std::io::copy(&mut stdout, &mut std::io::sink())?;
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("the child nocturne generate failed: {stderr}");
    }
    let rss = stderr
        .split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .context("the child did not report its peak RSS")?;
    Ok((ttft, rss / (1024.0 * 1024.0)))
}

/// The profile's pack, its tokenizer, and the benchmark prompt's tokens.
fn open_pack(args: &BenchArgs, precision: &str) -> anyhow::Result<(ModelPack, Tokenizer, Vec<u32>)> {
    let packs = args.packs.clone().unwrap_or_else(|| crate::paths::models_root().join("smollm2-135m-instruct"));
    let dir = packs.join(precision);
    let pack = ModelPack::open(&dir)?;
    let tokenizer = Tokenizer::from_file(&dir.join(TOKENIZER_FILE))?;
    // The text is over 40 tokens, so this many copies always suffice.
    let mut ids = tokenizer.encode(&TEXT.repeat(1 + args.prompt_tokens / 40))?;
    ids.truncate(args.prompt_tokens);
    Ok((pack, tokenizer, ids))
}

/// Prefills `ids` and decodes `new_tokens` greedily; returns (prefill,
/// decode) tokens/s and the pool's joins and join wait during decode.
fn prefill_decode(session: &mut Session<'_>, ids: &[u32], new_tokens: usize) -> anyhow::Result<(f64, f64, PoolStats)> {
    let decoder = session.decoder();
    decoder.truncate(0);
    let started = Instant::now();
    let mut next = argmax(decoder.forward(ids)?);
    let prefill = ids.len() as f64 / started.elapsed().as_secs_f64();
    let before = decoder.pool_stats();
    let started = Instant::now();
    for _ in 0..new_tokens {
        next = argmax(decoder.forward(&[next])?);
    }
    let decode = new_tokens as f64 / started.elapsed().as_secs_f64();
    let after = decoder.pool_stats();
    let joins = PoolStats { jobs: after.jobs - before.jobs, caller_wait_ns: after.caller_wait_ns - before.caller_wait_ns };
    Ok((prefill, decode, joins))
}

/// Decode tokens/s with the journal off, and on in each durability mode:
/// every request appends its interaction and a feedback record, as `chat`
/// does, so the writer thread writes and syncs while the next request
/// decodes. Modes alternate within each round; medians are reported.
fn journal_overhead(args: &BenchArgs) -> anyhow::Result<()> {
    let (pack, tokenizer, ids) = open_pack(args, ACTIVE.weight_precision.name())?;
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, SessionOptions::for_profile(&ACTIVE))?;
    let scratch = std::env::temp_dir().join(format!("nocturne-bench-journal-{}", std::process::id()));
    let reply = tokenizer.decode(&ids)?;
    let mut modes: Vec<(&str, Option<Journal>)> = vec![("off", None)];
    for (name, durability) in [("group commit", Durability::GroupCommit), ("fsync each record", Durability::FsyncEachRecord)] {
        let mut config = JournalConfig::for_profile(&ACTIVE);
        config.durability = durability;
        let journal = Journal::open(&scratch.join(name.replace(' ', "-")), DeviceId::default(), config)?;
        modes.push((name, Some(journal)));
    }
    prefill_decode(&mut session, &ids[..8], 8)?; // warm-up
    let mut speeds = vec![Vec::new(); modes.len()];
    for _ in 0..args.rounds {
        for ((_, journal), speeds) in modes.iter_mut().zip(&mut speeds) {
            let (_, decode, _) = prefill_decode(&mut session, &ids, args.new_tokens)?;
            speeds.push(decode);
            if let Some(journal) = journal {
                let interaction = Interaction {
                    conversation: 1,
                    turn: 0,
                    base_model: pack.id(),
                    adapter: None,
                    system: "".into(),
                    prompt: reply.as_str().into(),
                    reply: reply.as_str().into(),
                    prompt_tokens: ids.len() as u32,
                    reused_tokens: 0,
                    new_tokens: args.new_tokens as u32,
                    stop_reason: StopReason::MaxTokens,
                    prefill_tokens_per_s: 0.0,
                    decode_tokens_per_s: decode as f32,
                    time_to_first_token_ms: 0.0,
                    peak_memory_bytes: 0,
                    persona: None,
                    recalled: Default::default(),
                };
                let lsn = journal.append(&Body::Interaction(interaction))?;
                let rating = Feedback { interaction: lsn, rating: Some(4), ..Feedback::default() };
                journal.append(&Body::Feedback(rating))?;
            }
        }
    }
    for (_, journal) in modes.iter_mut() {
        if let Some(journal) = journal.take() {
            journal.close()?;
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let rows = modes.iter().map(|(name, _)| name.to_string()).zip(speeds).collect();
    print_comparison("journal", &session, args, ids.len(), rows);
    Ok(())
}

/// Prints medians of decode speeds per mode, each against the first mode.
fn print_comparison(what: &str, session: &Session<'_>, args: &BenchArgs, prompt: usize, rows: Vec<(String, Vec<f64>)>) {
    let medians: Vec<(String, f64)> = rows
        .into_iter()
        .map(|(name, mut v)| {
            v.sort_by(f64::total_cmp);
            (name, v[v.len() / 2])
        })
        .collect();
    let base = medians[0].1;
    let decoder = session.decoder_ref();
    println!(
        "\n{} pack, {} threads, {} rounds of {prompt} prompt + {} decoded tokens; profile {}\n",
        decoder.pack().precision().name(),
        decoder.threads(),
        args.rounds,
        args.new_tokens,
        ACTIVE.name
    );
    println!("| {what} | median decode tok/s | vs {} |\n|---|---|---|", medians[0].0);
    for (name, m) in &medians {
        println!("| {name} | {m:.1} | {:+.1}% |", 100.0 * (m - base) / base);
    }
}

/// Decode tokens/s without and with a rank-`rank` adapter on q, k, v, o (F16,
/// then int8 with `B` transposed), alternating within each round; medians
/// reported.
fn adapter_overhead(args: &BenchArgs, rank: usize) -> anyhow::Result<()> {
    let (pack, tokenizer, ids) = open_pack(args, ACTIVE.weight_precision.name())?;
    let scratch = std::env::temp_dir().join(format!("nocturne-bench-adapter-{}", std::process::id()));
    let trainer = nocturne::signing::generate()?;
    let targets = vec![Target::Q, Target::K, Target::V, Target::O];
    let mut adapters = Vec::new();
    for int8 in [false, true] {
        // Small non-zero weights, so every term is computed on real values.
        let tensor = |rows: usize, cols: usize| match int8 {
            false => AdapterTensor::F16(vec![half::f16::from_f32(1e-3); rows * cols]),
            true => AdapterTensor::Int8(vec![1e-3; rows * cols]),
        };
        let mut tensors = Vec::new();
        for layer in 0..pack.config().num_hidden_layers {
            let w = pack.layer(layer);
            for (t, m) in targets.iter().zip([w.q_proj, w.k_proj, w.v_proj, w.o_proj]) {
                let (out, inp) = m.shape();
                tensors.push((t.tensor_name(layer, 'A'), vec![rank, inp], tensor(rank, inp)));
                tensors.push((t.tensor_name(layer, 'B'), vec![out, rank], tensor(out, rank)));
            }
        }
        let spec = AdapterSpec { parent: None, base_model: pack.id(), rank: rank as u32, alpha: rank as f32, targets: targets.clone(), description: "bench".into() };
        let bundle = write_adapter_bundle(&scratch, &trainer, &spec, &tensors)?;
        adapters.push(Arc::new(LoraAdapter::open(&bundle, &pack, &trainer.verifying_key())?));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, SessionOptions::for_profile(&ACTIVE))?;
    prefill_decode(&mut session, &ids[..8], 8)?; // warm-up
    let mut speeds = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..args.rounds {
        for (mode, speeds) in speeds.iter_mut().enumerate() {
            session.set_adapter(mode.checked_sub(1).map(|i| Arc::clone(&adapters[i])));
            speeds.push(prefill_decode(&mut session, &ids, args.new_tokens)?.1);
        }
    }
    let [off, f16, int8] = speeds;
    let rows = vec![("none".to_string(), off), (format!("rank {rank}, q/k/v/o, F16, unmerged"), f16), (format!("rank {rank}, q/k/v/o, int8, unmerged"), int8)];
    print_comparison("adapter", &session, args, ids.len(), rows);
    Ok(())
}

/// A pack and how its products run.
struct Mode {
    /// Row label.
    name: &'static str,
    precision: &'static str,
    int8_activations: bool,
}

const MODES: [Mode; 3] = [
    Mode { name: "int8", precision: "int8", int8_activations: false },
    Mode { name: "int8, int8 activations", precision: "int8", int8_activations: true },
    Mode { name: "fp16", precision: "fp16", int8_activations: false },
];

/// Runs the benchmark and prints its table.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.serve {
        let load = crate::serve_load::Load {
            clients: args.clients.max(1),
            requests: args.requests,
            slots: args.slots,
            max_tokens: args.max_tokens.max(1),
            seed: args.seed,
        };
        println!("{}", crate::serve_load::run(&load)?);
        return Ok(());
    }
    if args.journal {
        return journal_overhead(args);
    }
    if let Some(corrections) = args.recall {
        #[cfg(feature = "recall")]
        return crate::bench_recall::run(corrections, args.rounds);
        #[cfg(not(feature = "recall"))]
        anyhow::bail!("bench --recall {corrections}: this build has no recall memory (the `recall` feature)");
    }
    if let Some(rank) = args.lora_rank {
        return adapter_overhead(args, rank);
    }
    let profile_threads = worker_threads(&ACTIVE);
    let mut thread_counts = vec![1, profile_threads];
    thread_counts.dedup();
    let measure = args.bandwidth_bytes > 0;
    let bandwidth: Vec<(usize, f64)> = thread_counts
        .iter()
        .map(|&t| (t, if measure { read_bandwidth(args.bandwidth_bytes, t) } else { f64::NAN }))
        .collect();
    if !args.json {
        for (t, bw) in bandwidth.iter().filter(|_| measure) {
            println!("memory read bandwidth ({} MiB), {t} thread(s): {:.2} GB/s", args.bandwidth_bytes >> 20, bw / 1e9);
        }
        println!(
            "\n| pack | threads | prefill tok/s ({} tokens) | decode tok/s ({} tokens) | decode joins/token | join wait µs/token | start to first token ms | peak RSS MiB | weight MB/token | streaming GB/s | % of read bandwidth |",
            args.prompt_tokens, args.new_tokens
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
    }
    for mode in &MODES {
        let (pack, tokenizer, ids) = open_pack(args, mode.precision)?;
        let prompt_text = tokenizer.decode(&ids)?;
        let per_token = weight_bytes_per_token(&pack);
        for &(threads, read_bw) in &bandwidth {
            let mut options = SessionOptions::for_profile(&ACTIVE);
            options.threads = threads;
            options.int8_activations = mode.int8_activations;
            let mut session = Session::start(&pack, &tokenizer, &ACTIVE, options)?;
            prefill_decode(&mut session, &ids[..ids.len().min(8)], 0)?; // warm-up: fault in the pages, wake the pool
            let (prefill, decode, joins) = prefill_decode(&mut session, &ids, args.new_tokens)?;
            let each_token = |v: u64| v as f64 / args.new_tokens.max(1) as f64;
            let (joins_per_token, wait_us) = (each_token(joins.jobs), each_token(joins.caller_wait_ns) / 1e3);
            let (threads_arg, new_tokens_arg) = (threads.to_string(), args.new_tokens.to_string());
            let mut child = vec!["--raw", "--no-journal", "--precision", mode.precision, "--threads", &threads_arg];
            child.extend(mode.int8_activations.then_some("--int8-activations"));
            child.extend(["--max-new-tokens", &new_tokens_arg, &prompt_text]);
            let (ttft, rss) = child_first_token(&child)?;
            let streaming = per_token as f64 * decode;
            if args.json {
                let row = serde_json::json!({
                    "pack": mode.precision, "int8_activations": mode.int8_activations, "threads": threads,
                    "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                    "first_token_s": ttft, "peak_rss_mib": rss,
                    "decode_joins_per_token": joins_per_token, "decode_join_wait_us_per_token": wait_us,
                });
                println!("{row}");
                continue;
            }
            println!(
                "| {} | {threads} | {prefill:.1} | {decode:.1} | {joins_per_token:.0} | {wait_us:.0} | {:.0} | {rss:.1} | {:.1} | {:.2} | {} |",
                mode.name,
                ttft * 1e3,
                per_token as f64 / 1e6,
                streaming / 1e9,
                if measure { format!("{:.0}%", 100.0 * streaming / read_bw) } else { "-".into() }
            );
        }
    }
    Ok(())
}
