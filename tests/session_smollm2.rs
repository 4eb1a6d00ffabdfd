//! Sessions on the real SmolLM2 int8 pack: the memory plan is what gets
//! allocated, the budget is enforced, decode allocates nothing per token,
//! and every stop reason and bad request behaves as documented.
//! Needs the converted model: run `models/fetch` first.

mod support;

use std::sync::Arc;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use nocturne::adapter::{LoraAdapter, Target};
use nocturne::profile::ACTIVE;
use nocturne::sampler::{Sampler, SamplerConfig};
use nocturne::session::{RequestOptions, Session, SessionError, SessionOptions};
use nocturne::journal::StopReason;
use nocturne::tokenizer::{ChatMessage, Tokenizer};
use nocturne::weights::ModelPack;
use nocturne::heap::{Counting, ALLOCATIONS};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocation counts are process-wide: the tests of this binary run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn model() -> (ModelPack, Tokenizer) {
    let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "models/cache/smollm2-135m-instruct/int8"].iter().collect();
    assert!(dir.is_dir(), "{} is missing: run `models/fetch` first", dir.display());
    (ModelPack::open(&dir).unwrap(), Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap())
}

fn prompt(tokenizer: &Tokenizer, question: &str) -> Vec<u32> {
    tokenizer.encode_chat(&[ChatMessage::new("user", question)], true).unwrap()
}

#[test]
fn allocations_match_the_memory_plan_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let session = Session::start(&pack, &tokenizer, &ACTIVE, SessionOptions::for_profile(&ACTIVE)).unwrap();
    assert_eq!(session.allocated(), *session.memory_plan());
    // 30 layers x 2048 positions x 3 KV heads x 64 x 2 (K, V) x 2 bytes.
    assert_eq!(session.memory_plan().kv_cache, 47_185_920);
}

/// Resident bytes of this process (`/proc/self/statm`, Linux).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn the_kv_cache_is_not_resident_until_positions_are_written() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let before = resident_bytes();
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, SessionOptions::for_profile(&ACTIVE)).unwrap();
    let started = resident_bytes();
    let kv = session.memory_plan().kv_cache;
    // The whole plan is allocated, but the 45 MiB cache is zeroed by the allocator, not written.
    assert!(started - before < kv / 4, "start made {} bytes resident; the KV cache is {kv}", started - before);
    // Positions become resident as they are written (the first request also
    // faults in the weights, so it is measured from after a warm-up).
    session.decoder().forward(&[100]).unwrap();
    let warm = resident_bytes();
    let ids: Vec<u32> = (0..256).map(|i| 100 + i).collect();
    session.decoder().forward(&ids).unwrap();
    let per_position = kv / session.decoder().capacity();
    assert!(resident_bytes() - warm >= 200 * per_position, "256 positions written, {} bytes became resident", resident_bytes() - warm);
}

#[test]
fn a_budget_too_small_for_the_kv_cache_refuses_to_start() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let mut profile = ACTIVE;
    profile.memory_budget_bytes = 40 << 20;
    let err = match Session::start(&pack, &tokenizer, &profile, SessionOptions::for_profile(&profile)) {
        Err(SessionError::Budget(e)) => e,
        Err(other) => panic!("expected a budget error, got {other}"),
        Ok(_) => panic!("a 40 MiB budget cannot hold a 45 MiB KV cache"),
    };
    let message = err.to_string();
    assert!(err.needed > 47_185_920, "{message}");
    for part in ["41943040", &err.needed.to_string(), "KV cache 47185920", "memory_budget_bytes"] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

#[test]
fn server_slots_are_planned_together_against_the_budget() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let options = SessionOptions { threads: 1, ..SessionOptions::for_profile(&ACTIVE) };
    let one = *Session::start(&pack, &tokenizer, &ACTIVE, options).unwrap().memory_plan();
    let mut profile = ACTIVE;
    // Room for one plan and a half: one slot starts, two do not.
    profile.memory_budget_bytes = (one.total() + one.total() / 2) as u64;
    let slots = Session::start_slots(&pack, &tokenizer, &profile, options, 1).unwrap();
    assert_eq!(slots[0].allocated(), one);
    let err = match Session::start_slots(&pack, &tokenizer, &profile, options, 2) {
        Err(SessionError::Budget(e)) => e,
        Err(other) => panic!("expected a budget error, got {other}"),
        Ok(_) => panic!("two plans of {} bytes do not fit in {}", one.total(), profile.memory_budget_bytes),
    };
    assert_eq!(err.needed, 2 * one.total());
    assert!(err.to_string().contains(&format!("KV cache {}", 2 * one.kv_cache)), "{err}");
}

#[test]
fn decoding_allocates_nothing_per_token() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    check_no_allocation_per_token(&pack, &tokenizer, None, SessionOptions::for_profile(&ACTIVE));
}

#[test]
fn int8_activations_are_planned_and_allocate_nothing_per_token() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let options = SessionOptions { int8_activations: true, ..SessionOptions::for_profile(&ACTIVE) };
    let session = Session::start(&pack, &tokenizer, &ACTIVE, options).unwrap();
    assert_eq!(session.allocated(), *session.memory_plan());
    let plain = Session::start(&pack, &tokenizer, &ACTIVE, SessionOptions::for_profile(&ACTIVE)).unwrap();
    // 32 tokens x 1536 (the widest product input) int8 values and 48 f32 scales each, row by
    // row, and again in four groups of 8 tokens with 48 f32 scales and 48 i32 offsets each.
    let row_by_row = 32 * 1536 + 32 * 48 * 4;
    let grouped = 32 * 1536 + 32 * 48 * (4 + 4);
    assert_eq!(session.memory_plan().activations - plain.memory_plan().activations, row_by_row + grouped);
    drop((session, plain));
    check_no_allocation_per_token(&pack, &tokenizer, None, options);
}

#[test]
fn decoding_with_an_adapter_allocates_nothing_per_token() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let tmp = tempfile::tempdir().unwrap();
    let trainer = nocturne::signing::generate().unwrap();
    let targets = [Target::Q, Target::K, Target::V, Target::O];
    let bundle = support::adapter::random_adapter(tmp.path(), &pack, &trainer, 8, &targets, 0.01, 11);
    let adapter = Arc::new(LoraAdapter::open(&bundle, &pack, &trainer.verifying_key()).unwrap());
    check_no_allocation_per_token(&pack, &tokenizer, Some(adapter), SessionOptions::for_profile(&ACTIVE));
}

fn check_no_allocation_per_token(pack: &ModelPack, tokenizer: &Tokenizer, adapter: Option<Arc<LoraAdapter>>, options: SessionOptions) {
    let mut session = Session::start(pack, tokenizer, &ACTIVE, options).unwrap();
    session.set_adapter(adapter);
    let ids = prompt(tokenizer, "Tell me a long story about a lighthouse.");
    // Decoder and sampler, 64 steps after the first.
    let mut sampler = Sampler::new(SamplerConfig { temperature: 0.8, top_k: 40, top_p: 0.9, repetition_penalty: 1.1, seed: 3 }, 49152);
    let mut history = ids.clone();
    history.reserve(128);
    let decoder = session.decoder();
    let mut next = sampler.sample(decoder.forward(&ids).unwrap(), &history);
    history.push(next);
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..64 {
        next = sampler.sample(decoder.forward(&[next]).unwrap(), &history);
        history.push(next);
    }
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst) - before, 0, "allocations in 64 decode steps");

    // A whole request: the count does not grow with the number of tokens.
    let mut count = |max_new_tokens| {
        session.reset();
        let options = RequestOptions {
            max_new_tokens,
            deadline: Duration::from_secs(600),
            stop: vec!["THE END".into()],
            sampler: SamplerConfig { temperature: 0.8, seed: 5, ..SamplerConfig::default() },
            cancel: None,
        };
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        let stats = session.generate(&ids, &options, &mut |_| {}).unwrap();
        (ALLOCATIONS.load(Ordering::SeqCst) - before, stats)
    };
    let (short, short_stats) = count(2);
    let (long, long_stats) = count(66);
    assert_eq!((short_stats.stop_reason, long_stats.stop_reason), (StopReason::MaxTokens, StopReason::MaxTokens));
    assert_eq!(long_stats.new_tokens, 66);
    assert_eq!(short, long, "a 66-token request allocated more than a 2-token one");
}

#[test]
fn every_stop_reason_is_reported() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, SessionOptions::for_profile(&ACTIVE)).unwrap();
    let ids = prompt(&tokenizer, "What is the capital of France?");
    let base = RequestOptions::for_profile(&ACTIVE);
    let mut text = String::new();
    let stats = session.generate(&ids, &base, &mut |t| text.push_str(t)).unwrap();
    assert_eq!(stats.stop_reason, StopReason::Eos);
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(text, session.reply_text());

    let stats = session.generate(&ids, &RequestOptions { max_new_tokens: 3, ..base.clone() }, &mut |_| {}).unwrap();
    assert_eq!((stats.stop_reason, stats.new_tokens), (StopReason::MaxTokens, 3));
    assert_eq!(stats.reused_tokens, ids.len() - 1, "the repeated prompt reuses its KV entries");

    let mut streamed = String::new();
    let stop = RequestOptions { stop: vec![" is".into()], ..base.clone() };
    let stats = session.generate(&ids, &stop, &mut |t| streamed.push_str(t)).unwrap();
    assert_eq!(stats.stop_reason, StopReason::StopString);
    assert_eq!(session.reply_text(), "The capital of France");
    assert_eq!(streamed, "The capital of France", "the stop string is never streamed");

    let stats = session.generate(&ids, &RequestOptions { deadline: Duration::ZERO, ..base.clone() }, &mut |_| {}).unwrap();
    assert_eq!(stats.stop_reason, StopReason::Deadline);
    assert!(stats.new_tokens <= 1, "{} tokens after the deadline", stats.new_tokens);

    // Cancelled from outside (a client that went away) after its second token.
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options = RequestOptions { max_new_tokens: 32, cancel: Some(cancel.clone()), ..base.clone() };
    let mut pieces = 0;
    let stats = session
        .generate(&ids, &options, &mut |_| {
            pieces += 1;
            if pieces == 2 {
                cancel.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
    assert_eq!(stats.stop_reason, StopReason::Deadline);
    assert_eq!(stats.new_tokens, 2, "a cancelled request stops within one token");
}

#[test]
fn bad_requests_are_refused_and_the_session_stays_usable() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (pack, tokenizer) = model();
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, SessionOptions::for_profile(&ACTIVE)).unwrap();
    let options = RequestOptions { max_new_tokens: 4, ..RequestOptions::for_profile(&ACTIVE) };
    assert!(matches!(session.generate(&[], &options, &mut |_| {}), Err(SessionError::EmptyPrompt)));
    let long = vec![28u32; ACTIVE.max_context_tokens as usize];
    match session.generate(&long, &options, &mut |_| {}) {
        Err(SessionError::PromptTooLong { tokens, capacity }) => assert_eq!((tokens, capacity), (2048, 2048)),
        other => panic!("expected PromptTooLong, got {:?}", other.map(|s| s.stop_reason)),
    }
    assert!(session.generate(&[1, 60_000], &options, &mut |_| {}).is_err());
    let ids = prompt(&tokenizer, "Say hello.");
    // Nonsense sampling and limits are refused before anything is decoded.
    let position = session.decoder_ref().position();
    for (t, p, r) in [(f32::NAN, 0.9, 1.0), (f32::INFINITY, 0.9, 1.0), (-1.0, 0.9, 1.0), (0.5, 2.0, 1.0), (0.5, f32::NAN, 1.0), (0.5, -1.0, 1.0), (0.5, 0.9, 0.0), (0.5, 0.9, -5.0)] {
        let mut bad = options.clone();
        (bad.sampler.temperature, bad.sampler.top_p, bad.sampler.repetition_penalty) = (t, p, r);
        assert!(matches!(session.generate(&ids, &bad, &mut |_| {}), Err(SessionError::Sampling(_))), "{t} {p} {r} accepted");
    }
    let none = RequestOptions { max_new_tokens: 0, ..options.clone() };
    assert!(matches!(session.generate(&ids, &none, &mut |_| {}), Err(SessionError::NoNewTokens)));
    assert_eq!(session.decoder_ref().position(), position);
    assert!(session.generate(&ids, &options, &mut |_| {}).unwrap().new_tokens > 0);
}
