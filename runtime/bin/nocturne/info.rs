//! `nocturne info`: the firmware profile, the kernels, the pack and the memory plan.

use nocturne::kernels::Kernels;
use nocturne::profile::{self, Durability, Profile, ACTIVE};
use nocturne::session::Session;

use crate::args::ModelArgs;

const MIB: f64 = 1024.0 * 1024.0;

fn print_profile(p: &Profile) {
    println!("profile            {} ({})", p.name, p.target_class);
    println!(
        "threads            {} of {} allowed ({} cores found)",
        profile::worker_threads(p),
        p.threads,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("memory budget      {} bytes ({:.1} MiB)", p.memory_budget_bytes, p.memory_budget_bytes as f64 / MIB);
    println!("weight precision   {}", p.weight_precision.name());
    println!("context            {} tokens, at most {} new per reply", p.max_context_tokens, p.max_new_tokens);
    println!("deadline           {} ms per request", p.deadline_ms);
    println!(
        "sizing model       {} layers, {} KV heads x {} ({} KV bytes per token)",
        p.sizing.layers,
        p.sizing.kv_heads,
        p.sizing.head_dim,
        p.kv_bytes_per_token()
    );
    let durability = match p.journal.durability {
        Durability::FsyncEachRecord => "fsync each record".to_string(),
        Durability::GroupCommit => format!("group commit every {} ms", p.journal.group_commit_ms),
    };
    println!(
        "journal            {durability}; segments of {} bytes, quota {} bytes",
        p.journal.segment_bytes, p.journal.disk_quota_bytes
    );
    println!("kernels            {}", Kernels::detect().isa.name());
}

/// Prints the profile; with a model named (or `plan`), the pack and its plan.
pub fn run(model: &ModelArgs, plan: bool) -> anyhow::Result<()> {
    print_profile(&ACTIVE);
    if !(plan || model.model.is_some() || model.precision.is_some()) {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let (pack, tokenizer) = model.open()?;
    let opened = started.elapsed();
    let c = pack.config();
    println!("model              {}", pack.dir().display());
    println!(
        "architecture       {} layers, hidden {}, {} heads / {} KV heads of {}, MLP {}, vocab {}",
        c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size, c.vocab_size
    );
    println!("pack and tokenizer loaded in {:.2} ms", opened.as_secs_f64() * 1e3);
    let (settings, _, plan) = Session::plan(&pack, &tokenizer, &ACTIVE, model.session_options());
    println!("memory plan        ({} context tokens, {} threads, {:?} KV cache)", settings.context_tokens, settings.threads, settings.kv);
    for (name, bytes) in plan.items() {
        println!("  {name:<17}{bytes:>12} bytes  {:>8.2} MiB", bytes as f64 / MIB);
    }
    println!("  {:<17}{:>12} bytes  {:>8.2} MiB of {:.2} MiB budget{}", "total", plan.total(), plan.total() as f64 / MIB,
        ACTIVE.memory_budget_bytes as f64 / MIB,
        if plan.total() as u64 > ACTIVE.memory_budget_bytes { "  (DOES NOT FIT: sessions will refuse to start)" } else { "" });
    println!(
        "  {:<17}{:>12} bytes  {:>8.2} MiB ({}, file-backed, beside the budget)",
        "mapped weights",
        pack.mapped_bytes(),
        pack.mapped_bytes() as f64 / MIB,
        pack.precision().name()
    );
    #[cfg(feature = "recall")]
    print_recall_plan(plan.total());
    Ok(())
}

/// The recall lines of the plan: the encoder graph as measured at load and
/// the index's embedding table; then the total with the session's plan.
#[cfg(feature = "recall")]
fn print_recall_plan(session_total: usize) {
    if !ACTIVE.parts.recall {
        println!("recall             not in this profile");
        return;
    }
    let encoder = match (crate::embed::EncoderArgs { encoder: None }).load() {
        Ok(encoder) => encoder,
        Err(e) => {
            println!("recall             {e:#}");
            return;
        }
    };
    let spec = &ACTIVE.recall;
    let graph = encoder.graph();
    let index = spec.capacity as usize * encoder.dimension() * spec.embedding_precision.bytes();
    let lines = [
        ("recall graph", graph.weight_bytes(), format!("{}, measured at load", graph.path().display())),
        ("recall run peak", graph.run_peak_bytes(), format!("one run at {} tokens, measured", spec.max_sequence_tokens)),
        ("recall index", index, format!("{} entries x {} dims, {:?}", spec.capacity, encoder.dimension(), spec.embedding_precision)),
    ];
    for (name, bytes, what) in &lines {
        println!("  {name:<17}{bytes:>12} bytes  {:>8.2} MiB ({what})", *bytes as f64 / MIB);
    }
    let load = graph.load_peak_bytes();
    println!("  {:<17}{load:>12} bytes  {:>8.2} MiB (transient: reading and optimising the graph, before the first run)", "recall load peak", load as f64 / MIB);
    // The high-water mark: the load peak, or what stays when that is higher.
    let total = session_total + nocturne::recall::plan_bytes(graph, index);
    println!("  {:<17}{:>12} bytes  {:>8.2} MiB of {:.2} MiB budget{}", "total with recall", total, total as f64 / MIB,
        ACTIVE.memory_budget_bytes as f64 / MIB,
        if total as u64 > ACTIVE.memory_budget_bytes { "  (DOES NOT FIT)" } else { "" });
}
