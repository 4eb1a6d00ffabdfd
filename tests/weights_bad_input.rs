//! Malformed model directories: each is rejected with an error that names the
//! file and the problem, and never panics.

mod support;

use std::path::Path;

use nocturne::profile::Precision;
use nocturne::weights::{ModelPack, DIGEST_FILE, WEIGHTS_FILE};
use support::{edit_header, pack_tensors, tiny_config, write_dir, write_pack};

fn valid(dir: &Path, precision: Precision) {
    write_pack(dir, &tiny_config(64, 2, precision));
}

fn error_of(dir: &Path) -> String {
    match ModelPack::open(dir) {
        Ok(_) => panic!("{} opened but is malformed", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "error {message:?} does not mention {part:?}");
    }
}

#[test]
fn valid_packs_open_in_both_precisions() {
    let tmp = tempfile::tempdir().unwrap();
    for precision in [Precision::Int8, Precision::Fp16] {
        let dir = tmp.path().join(precision.name());
        valid(&dir, precision);
        let pack = ModelPack::open(&dir).unwrap();
        assert_eq!(pack.precision(), precision);
        assert_eq!(pack.layer(1).q_proj.shape(), (64, 64));
        assert_eq!(pack.layer(1).k_proj.shape(), (32, 64));
        assert_eq!(pack.lm_head().shape(), (96, 64));
    }
}

#[test]
fn truncated_weights_file() {
    let tmp = tempfile::tempdir().unwrap();
    valid(tmp.path(), Precision::Int8);
    let path = tmp.path().join(WEIGHTS_FILE);
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len - 1, len / 2, 100, 7, 0] {
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(cut).unwrap();
        assert_names(&error_of(tmp.path()), &[WEIGHTS_FILE, "not a valid safetensors file"]);
    }
}

#[test]
fn offsets_past_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    valid(tmp.path(), Precision::Fp16);
    edit_header(tmp.path(), |h| {
        let t = &mut h["model.norm.weight"]["data_offsets"];
        let end = t[1].as_u64().unwrap();
        *t = serde_json::json!([end + 1_000_000, end + 1_000_256]);
    });
    assert_names(&error_of(tmp.path()), &[WEIGHTS_FILE, "tensor `model.norm.weight` spans bytes"]);
}

#[test]
fn overlapping_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    valid(tmp.path(), Precision::Fp16);
    edit_header(tmp.path(), |h| {
        // Point the final norm at the bytes of the first layer's input norm.
        let other = h["model.layers.0.input_layernorm.weight"]["data_offsets"].clone();
        h["model.norm.weight"]["data_offsets"] = other;
    });
    assert_names(&error_of(tmp.path()), &[WEIGHTS_FILE, "model.norm.weight", "model.layers.0.input_layernorm.weight", "overlap"]);
}

#[test]
fn wrong_dtype_and_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(64, 2, Precision::Int8);
    let mut tensors = pack_tensors(&config);
    let q = tensors.iter_mut().find(|t| t.0 == "model.layers.1.self_attn.q_proj.weight").unwrap();
    q.1 = safetensors::Dtype::U8;
    write_dir(tmp.path(), &config, &tensors);
    assert_names(&error_of(tmp.path()), &[WEIGHTS_FILE, "model.layers.1.self_attn.q_proj.weight", "dtype U8"]);

    let mut tensors = pack_tensors(&config);
    let k = tensors.iter_mut().find(|t| t.0 == "model.layers.0.self_attn.k_proj.weight").unwrap();
    k.2 = vec![64, 32];
    write_dir(tmp.path(), &config, &tensors);
    assert_names(&error_of(tmp.path()), &[WEIGHTS_FILE, "model.layers.0.self_attn.k_proj.weight", "shape [64, 32]"]);
}

#[test]
fn fp16_pack_with_int8_tensors_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let tensors = pack_tensors(&tiny_config(64, 2, Precision::Int8));
    write_dir(tmp.path(), &tiny_config(64, 2, Precision::Fp16), &tensors);
    assert_names(&error_of(tmp.path()), &[WEIGHTS_FILE, "dtype I8, expected F16"]);
}

#[test]
fn missing_and_unexpected_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(64, 2, Precision::Fp16);
    let mut tensors = pack_tensors(&config);
    tensors.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
    write_dir(tmp.path(), &config, &tensors);
    assert_names(&error_of(tmp.path()), &["model.layers.1.mlp.up_proj.weight", "missing"]);

    let mut tensors = pack_tensors(&config);
    tensors.push(("model.layers.0.rotary_emb.inv_freq".into(), safetensors::Dtype::F32, vec![2], vec![0; 8]));
    write_dir(tmp.path(), &config, &tensors);
    assert_names(&error_of(tmp.path()), &["unexpected tensor `model.layers.0.rotary_emb.inv_freq`"]);
}

#[test]
fn missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    assert_names(&error_of(&tmp.path().join("nowhere")), &["config.json", "cannot read"]);
    valid(tmp.path(), Precision::Int8);
    std::fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    assert_names(&error_of(tmp.path()), &["tokenizer.json", "missing"]);
    valid(tmp.path(), Precision::Int8);
    std::fs::remove_file(tmp.path().join(WEIGHTS_FILE)).unwrap();
    assert_names(&error_of(tmp.path()), &[WEIGHTS_FILE, "cannot read"]);
    valid(tmp.path(), Precision::Int8);
    std::fs::remove_file(tmp.path().join(DIGEST_FILE)).unwrap();
    assert_names(&error_of(tmp.path()), &[DIGEST_FILE, "missing", "models/fetch"]);
    std::fs::write(tmp.path().join(DIGEST_FILE), "1234  model.safetensors\n").unwrap();
    assert_names(&error_of(tmp.path()), &[DIGEST_FILE, "not 64 hex digits"]);
    std::fs::write(tmp.path().join(DIGEST_FILE), format!("{}  other.bin\n", "0".repeat(64))).unwrap();
    assert_names(&error_of(tmp.path()), &[DIGEST_FILE, "not of `model.safetensors`"]);
}

#[test]
fn invalid_config() {
    let tmp = tempfile::tempdir().unwrap();
    valid(tmp.path(), Precision::Int8);
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3")).unwrap();
    assert_names(&error_of(tmp.path()), &["config.json", "num_key_value_heads"]);
    std::fs::write(&path, "{\"model_type\": \"llama\"}").unwrap();
    assert_names(&error_of(tmp.path()), &["config.json", "missing field"]);
}

#[test]
fn garbage_headers_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    valid(tmp.path(), Precision::Fp16);
    let path = tmp.path().join(WEIGHTS_FILE);
    let original = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    // Flip each byte of the length prefix and a spread of header bytes.
    for at in (0..8).chain((8..8 + n).step_by(97)) {
        let mut bytes = original.clone();
        bytes[at] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = ModelPack::open(tmp.path()) {
            assert!(e.to_string().contains(WEIGHTS_FILE), "{e}");
        }
    }
}

#[test]
fn sizes_in_config_json_are_bounded_before_anything_is_sized_from_them() {
    use nocturne::weights::{pack_data_bytes, pack_layout, TensorKind};
    // The closed form agrees with the layout, in both precisions.
    for precision in [Precision::Int8, Precision::Fp16] {
        let config = tiny_config(64, 3, precision);
        let per_value = if precision == Precision::Int8 { 1 } else { 2 };
        let listed: u64 = pack_layout(&config)
            .iter()
            .map(|s| match s.kind {
                TensorKind::Norm { len } => 4 * len as u64,
                TensorKind::Matrix { rows, cols } => {
                    let n = (rows * cols) as u64;
                    n * per_value + if precision == Precision::Int8 { n / 32 * 2 } else { 0 }
                }
            })
            .sum();
        assert_eq!(pack_data_bytes(&config), Some(listed));
    }
    let tmp = tempfile::tempdir().unwrap();
    valid(tmp.path(), Precision::Fp16);
    let config_path = tmp.path().join("config.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let with = |field: &str, value: u64| {
        let mut c = original.clone();
        c[field] = value.into();
        std::fs::write(&config_path, c.to_string()).unwrap();
        error_of(tmp.path())
    };
    // More layers than the file holds: refused by size, before the layout of a million layers is built.
    assert_names(&with("num_hidden_layers", 1_000_000), &[WEIGHTS_FILE, "missing tensor `model.layers.2.", "1000000 layers", "but the file holds"]);
    assert_names(&with("vocab_size", 10_000_000), &[WEIGHTS_FILE, "shape", "vocabulary of 10000000", "but the file holds"]);
    // Beyond any model: refused by the config's own check.
    assert_names(&with("num_hidden_layers", 1_000_000_000), &["config.json", "num_hidden_layers is 1000000000"]);
    assert_names(&with("hidden_size", u64::MAX), &["config.json", "hidden_size"]);
}

#[test]
fn files_of_a_model_directory_must_be_regular_and_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    valid(tmp.path(), Precision::Fp16);
    let config_path = tmp.path().join("config.json");
    std::fs::remove_file(&config_path).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &config_path).unwrap();
    assert_names(&error_of(tmp.path()), &["config.json", "not a regular file"]);
    std::fs::remove_file(&config_path).unwrap();
    std::fs::write(&config_path, vec![b' '; 5 << 20]).unwrap();
    assert_names(&error_of(tmp.path()), &["config.json", "limit"]);
}
