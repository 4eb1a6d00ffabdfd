//! `nocturne bench --recall N`: recall memory at scale. A fresh state
//! directory gets a journal of N questions, each corrected; then: the first
//! open (every correction embedded, the index written), a second open (the
//! index file loaded, nothing embedded), search per request (embedding +
//! exact top-k, and top-k alone), and `generate`'s first token and peak RSS
//! with recall on and off (child processes, medians of ROUNDS).

use std::borrow::Cow;
use std::time::Instant;

use nocturne::device::recall::RecallMemory;
use nocturne::device::StateDir;
use nocturne::journal::{Body, Feedback, Interaction, Journal, JournalConfig};
use nocturne::profile::ACTIVE;

use crate::embed::EncoderArgs;

/// Question `i` of the synthetic journal: distinct texts on a few hundred topics.
fn question(i: usize) -> String {
    const TOPICS: [&str; 8] = ["the delivery schedule", "the kiosk printer", "opening hours", "the parking garage", "the loyalty card", "the returns desk", "the lift", "the wifi password"];
    format!("Question {i}: what should I know about {} on floor {}?", TOPICS[i % TOPICS.len()], i % 37)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and prints one JSON object.
pub fn run(corrections: usize, rounds: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = StateDir::new(dir.path());
    let device = state.device_id_or_create()?;
    let mut journal = Journal::open(&state.journal_dir(), device, JournalConfig::for_profile(&ACTIVE))?;
    for i in 0..corrections {
        let q = question(i);
        let interaction = Interaction::of_texts(i as u64, Default::default(), "", &q, "I do not know.");
        let lsn = journal.append(&Body::Interaction(interaction))?;
        let answer = format!("Answer {i}.");
        journal.append(&Body::Feedback(Feedback { interaction: lsn, correction: Some(Cow::Borrowed(&answer)), ..Feedback::default() }))?;
    }
    journal.close()?;
    let encoder = EncoderArgs { encoder: None };

    let started = Instant::now();
    let (memory, report) = RecallMemory::open(&state, encoder.load()?, &ACTIVE.recall)?;
    let first_open_s = started.elapsed().as_secs_f64();
    let entries = memory.index().entries().len();
    drop(memory);
    let loaded = encoder.load()?;
    let started = Instant::now();
    let (memory, _) = RecallMemory::open(&state, loaded, &ACTIVE.recall)?;
    let second_open_s = started.elapsed().as_secs_f64();

    let queries: Vec<String> = (0..100).map(|i| format!("Tell me about {} please ({i})", ["the lift", "parking", "printer paper", "opening times"][i % 4])).collect();
    let mut search_ms = Vec::new();
    for q in &queries {
        let t = Instant::now();
        std::hint::black_box(memory.search(q, ACTIVE.recall.top_k as usize, 0.0)?);
        search_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let query = memory.encoder().embed(&queries[0])?;
    let kernels = nocturne::kernels::Kernels::detect();
    let mut hits = Vec::with_capacity(ACTIVE.recall.top_k as usize);
    let mut topk_ms = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        memory.index().search(&kernels, &query, ACTIVE.recall.top_k as usize, 0.0, &mut hits);
        topk_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(memory);

    let state_arg = dir.path().to_str().unwrap_or_default().to_string();
    let asked = question(corrections / 2);
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        for (recall, out) in [(true, &mut on), (false, &mut off)] {
            let mut args = vec!["--state-dir", &state_arg, "--no-journal", "--max-new-tokens", "1"];
            args.extend((!recall).then_some("--no-recall"));
            args.push(&asked);
            out.push(crate::bench::child_first_token(&args)?);
        }
    }
    let split = |v: &[(f64, f64)]| (median(v.iter().map(|x| x.0).collect()), median(v.iter().map(|x| x.1).collect()));
    let ((ttft_on, rss_on), (ttft_off, rss_off)) = (split(&on), split(&off));
    let index_bytes = std::fs::metadata(dir.path().join(nocturne::device::recall::RECALL_INDEX_FILE))?.len();
    let value = serde_json::json!({
        "corrections": corrections,
        "entries": entries,
        "evicted": report.evicted,
        "capacity": ACTIVE.recall.capacity,
        "index_file_bytes": index_bytes,
        "first_open_rebuild_s": first_open_s,
        "second_open_load_s": second_open_s,
        "search_ms_median": median(search_ms),
        "top_k_only_ms_median": median(topk_ms),
        "generate_first_token_s": {"recall_on": ttft_on, "recall_off": ttft_off},
        "generate_peak_rss_mib": {"recall_on": rss_on, "recall_off": rss_off},
        "rounds": rounds.max(1),
    });
    println!("{value}");
    Ok(())
}
