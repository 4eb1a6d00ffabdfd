//! The converted SmolLM2 packs as Hugging Face transformers 5.24 reads them
//! (its Python package and the tokenizers one, installed by
//! `scripts/python-venv`; `hf_transformers.py` does the reading):
//! - the tokenizer it builds from `tokenizer_config.json` gives exactly our
//!   ids on the model's licence text (named `GPT2Tokenizer`, transformers 5
//!   rebuilt one without the Digits pre-tokenizer and disagreed);
//! - the fp16 pack is a plain Llama, while the int8 pack is refused loudly
//!   instead of having its int8 codes read as weights;
//! - the configs name the upstream model the manifest gives, which PEFT
//!   exports name as their base (checked in `consolidate.rs`).

use std::path::Path;
use std::process::Command;

use nocturne::tokenizer::Tokenizer;
use nocturne::weights::{ModelPack, TOKENIZER_FILE};
use serde_json::Value;

const UPSTREAM: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

fn python() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/python-venv")).args(["transformers", "transformers==5.24.0", "tokenizers==0.23.3"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn transformers_tokenizes_as_we_do_loads_fp16_and_refuses_int8() {
    let packs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/cache/smollm2-135m-instruct");
    assert!(packs.join("int8").is_dir(), "{} is missing: run `models/fetch` first", packs.display());
    let licence = packs.join("LICENSE");
    let out = Command::new(python()).arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hf_transformers.py")).arg(&packs).arg(&licence).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();

    let text = std::fs::read_to_string(&licence).unwrap();
    for name in ["int8", "fp16"] {
        let ours: Vec<u64> = Tokenizer::from_file(&packs.join(name).join(TOKENIZER_FILE)).unwrap().encode(&text).unwrap().into_iter().map(u64::from).collect();
        let ids = |key: &str| -> Vec<u64> { seen[name][key].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect() };
        assert!(ours.len() > 1000, "the licence text is long: {} ids", ours.len());
        for (key, tool) in [("ids_tokenizers", "the tokenizers library".to_string()), ("ids_transformers", format!("transformers' {}", seen[name]["tokenizer_class"]))] {
            let theirs = ids(key);
            let first_difference = theirs.iter().zip(&ours).position(|(a, b)| a != b);
            assert!(theirs == ours, "{name}: {tool} gives {} ids, ours {}; first difference at {first_difference:?}", theirs.len(), ours.len());
        }
        assert_eq!(ModelPack::open(&packs.join(name)).unwrap().config().name_or_path.as_deref(), Some(UPSTREAM));
    }
    assert_eq!(seen["fp16"]["config"]["model_type"], "llama", "{seen}");
    let refused = seen["int8"]["config"]["error"].as_str().unwrap_or_else(|| panic!("transformers took the int8 pack: {}", seen["int8"]["config"]));
    assert!(refused.contains("llama-nocturne-int8"), "{refused}");
}
