//! The recall encoder converted from all-MiniLM-L6-v2 (`models/fetch`) and run
//! by tract: parity with sentence-transformers, its heap in the plan, and
//! malformed encoder directories.

use std::path::{Path, PathBuf};

use nocturne::heap::Counting;
use nocturne::recall::encoder::{SentenceEncoder, ENCODER_FILE, ENCODER_TOKENIZER_FILE};

#[global_allocator]
static GLOBAL: Counting = Counting;

fn encoder_dir() -> PathBuf {
    [env!("CARGO_MANIFEST_DIR"), "models/cache/all-minilm-l6-v2"].iter().collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `tests/fixtures/encoder_reference.json` holds sentence-transformers 6.2.0's
/// embeddings of 20 sentences (made by `scripts/encoder-reference`).
#[test]
fn embeddings_match_sentence_transformers_on_20_sentences() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/encoder_reference.json")).unwrap())
            .unwrap();
    let references = fixture["embeddings"].as_array().unwrap();
    assert_eq!(references.len(), 20);
    let encoder = SentenceEncoder::load(&encoder_dir(), 128).unwrap();
    assert_eq!(encoder.dimension(), 384, "the embedding size is read from the graph");
    let mut worst = 1.0f64;
    for reference in references {
        let text = reference["text"].as_str().unwrap();
        let expected: Vec<f32> = reference["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let ours = encoder.embed(text).unwrap();
        let norm: f32 = ours.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{text:?}: norm {norm}");
        let c = cosine(&ours, &expected);
        assert!(c >= 0.999, "{text:?}: cosine {c} with sentence-transformers' embedding");
        worst = worst.min(c);
    }
    println!("lowest cosine over 20 sentences: {worst:.6}");
}

#[test]
fn the_graph_heap_is_measured_at_load_and_runs_stay_within_it() {
    let encoder = SentenceEncoder::load(&encoder_dir(), 64).unwrap();
    let graph = encoder.graph();
    assert!(graph.is_measured());
    // all-MiniLM-L6-v2's weights as converted (f32, the 30522 × 384 word table
    // in f16) are 67.5 MB; the loaded graph keeps at least those.
    assert!(graph.weight_bytes() > 67_000_000, "kept {}", graph.weight_bytes());
    assert!(graph.run_peak_bytes() > 0);
    // A short and a maximal (truncated) text both run within the plan measured at 64 tokens.
    encoder.embed("hi").unwrap();
    let long = "word ".repeat(500);
    assert_eq!(encoder.tokens(&long).unwrap().len(), 64, "truncated to the planned maximum");
    encoder.embed(&long).unwrap();
}

#[test]
fn similar_questions_are_closer_than_unrelated_ones() {
    let encoder = SentenceEncoder::load(&encoder_dir(), 128).unwrap();
    let a = encoder.embed("What is the capital of France?").unwrap();
    let b = encoder.embed("Which city is France's capital?").unwrap();
    let c = encoder.embed("How many legs does a spider have?").unwrap();
    assert!(cosine(&a, &b) > cosine(&a, &c) + 0.3, "{} vs {}", cosine(&a, &b), cosine(&a, &c));
}

fn copy_encoder(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in [ENCODER_FILE, ENCODER_TOKENIZER_FILE] {
        std::fs::copy(encoder_dir().join(file), to.join(file)).unwrap();
    }
}

fn load_error(dir: &Path) -> String {
    match SentenceEncoder::load(dir, 32) {
        Ok(_) => panic!("{} loaded but is malformed", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn malformed_encoder_directories_are_refused_with_the_file_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("encoder");

    copy_encoder(&dir);
    std::fs::remove_file(dir.join(ENCODER_FILE)).unwrap();
    let e = load_error(&dir);
    assert!(e.contains(ENCODER_FILE) && e.contains("cannot load"), "{e}");

    copy_encoder(&dir);
    let graph = std::fs::read(dir.join(ENCODER_FILE)).unwrap();
    std::fs::write(dir.join(ENCODER_FILE), &graph[..graph.len() / 3]).unwrap();
    let e = load_error(&dir);
    assert!(e.contains(ENCODER_FILE), "truncated graph: {e}");

    std::fs::write(dir.join(ENCODER_FILE), b"this is not protobuf at all").unwrap();
    let e = load_error(&dir);
    assert!(e.contains(ENCODER_FILE), "garbage graph: {e}");

    copy_encoder(&dir);
    std::fs::write(dir.join(ENCODER_TOKENIZER_FILE), b"{\"model\": 3").unwrap();
    let e = load_error(&dir);
    assert!(e.contains(ENCODER_TOKENIZER_FILE) && e.contains("tokenizer"), "{e}");

    std::fs::remove_file(dir.join(ENCODER_TOKENIZER_FILE)).unwrap();
    let e = load_error(&dir);
    assert!(e.contains(ENCODER_TOKENIZER_FILE), "{e}");
}
