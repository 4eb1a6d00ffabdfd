//! The converted SmolLM2-135M-Instruct packs against their GGUF source.
//! Needs the converted model: run `models/fetch` first.

use std::path::PathBuf;

use half::f16;
use nocturne::tokenizer::Tokenizer;
use nocturne::weights::{Matrix, ModelPack};
use nocturne_trainer::convert::{gguf_name, unpermute_rows};
use nocturne_trainer::gguf::{GgufFile, MetaValue};

fn cache() -> PathBuf {
    let dir: PathBuf = [env!("CARGO_MANIFEST_DIR"), "../models/cache/smollm2-135m-instruct"].iter().collect();
    assert!(dir.join(".complete").is_file(), "{} is not converted: run `models/fetch` first", dir.display());
    dir
}

#[test]
fn tokenizer_reproduces_the_gguf_vocabulary() {
    let dir = cache();
    let gguf = GgufFile::open(&dir.join("source.gguf")).unwrap();
    let tokenizer = Tokenizer::from_file(&dir.join("int8/tokenizer.json")).unwrap();
    let tokens = gguf.array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokenizer.vocab_size(), tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        let MetaValue::Str(token) = token else { panic!("token {id} is not a string") };
        assert_eq!(tokenizer.id_to_token(id as u32).as_deref(), Some(token.as_str()), "id {id}");
        assert_eq!(tokenizer.token_to_id(token), Some(id as u32), "token {token:?}");
    }
}

#[test]
fn packs_reproduce_the_source_weights() {
    let dir = cache();
    let gguf = GgufFile::open(&dir.join("source.gguf")).unwrap();
    let int8 = ModelPack::open(&dir.join("int8")).unwrap();
    let fp16 = ModelPack::open(&dir.join("fp16")).unwrap();
    let c = int8.config().clone();
    assert_eq!((c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.vocab_size), (30, 576, 3, 49152));
    let last = c.num_hidden_layers - 1;
    let cases = [
        ("model.embed_tokens.weight", int8.embed_tokens(), fp16.embed_tokens(), 0),
        ("model.layers.0.self_attn.q_proj.weight", int8.layer(0).q_proj, fp16.layer(0).q_proj, c.num_attention_heads),
        ("model.layers.0.self_attn.k_proj.weight", int8.layer(0).k_proj, fp16.layer(0).k_proj, c.num_key_value_heads),
        (&format!("model.layers.{last}.self_attn.q_proj.weight"), int8.layer(last).q_proj, fp16.layer(last).q_proj, c.num_attention_heads),
        (&format!("model.layers.{last}.mlp.down_proj.weight"), int8.layer(last).down_proj, fp16.layer(last).down_proj, 0),
    ];
    for (name, q, h, heads) in cases {
        let (rows, cols) = q.shape();
        let mut source = gguf.dequantize(&gguf_name(name).unwrap()).unwrap();
        if heads > 0 {
            source = unpermute_rows(&source, rows, cols, heads);
        }
        let (Matrix::Int8 { values, scales, .. }, Matrix::F16 { values: halves, .. }) = (q, h) else {
            panic!("unexpected pack precisions")
        };
        let mut worst = 0.0f32;
        for (i, s) in source.iter().enumerate() {
            assert_eq!(halves[i], f16::from_f32(*s), "{name}[{i}] fp16");
            let step = scales[i / 32].to_f32();
            let err = (f32::from(values[i]) * step - s).abs();
            assert!(err <= step * 0.5 + 1e-7, "{name}[{i}]: int8 error {err} exceeds half of step {step}");
            worst = worst.max(err / step.max(f32::MIN_POSITIVE));
        }
        // The Q8_0 embedding lands exactly on the int8 grid; Q4_1 matrices do not.
        assert!(worst <= 0.5 + 1e-3, "{name}: worst error {worst} steps");
    }
}
