//! The sentence-encoder converter on a tiny synthetic BERT: the graph it
//! writes loads in the runtime's tract `Graph` and gives unit embeddings;
//! malformed inputs are refused with the tensor or setting named.

use nocturne::graph::Graph;
use nocturne_trainer::encoder_onnx::{bert_to_onnx, BertConfig, PoolingConfig};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn config() -> BertConfig {
    BertConfig {
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        layer_norm_eps: 1e-12,
        hidden_act: "gelu".into(),
        max_position_embeddings: 16,
        vocab_size: 10,
    }
}

const MEAN: PoolingConfig = PoolingConfig { pooling_mode_mean_tokens: true, pooling_mode_cls_token: false, pooling_mode_max_tokens: false };

/// The tensors of a BERT for `config` (deterministic values), minus `skip`.
fn tensors(config: &BertConfig, skip: &str) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let (h, f) = (config.hidden_size, config.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![config.vocab_size, h]),
        ("embeddings.position_embeddings.weight".into(), vec![config.max_position_embeddings, h]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
        ("embeddings.LayerNorm.weight".into(), vec![h]),
        ("embeddings.LayerNorm.bias".into(), vec![h]),
    ];
    for l in 0..config.num_hidden_layers {
        for (name, shape) in [
            ("attention.self.query", vec![h, h]),
            ("attention.self.key", vec![h, h]),
            ("attention.self.value", vec![h, h]),
            ("attention.output.dense", vec![h, h]),
            ("intermediate.dense", vec![f, h]),
            ("output.dense", vec![h, f]),
        ] {
            shapes.push((format!("encoder.layer.{l}.{name}.bias"), vec![shape[0]]));
            shapes.push((format!("encoder.layer.{l}.{name}.weight"), shape));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("encoder.layer.{l}.{norm}.weight"), vec![h]));
            shapes.push((format!("encoder.layer.{l}.{norm}.bias"), vec![h]));
        }
    }
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    shapes
        .into_iter()
        .filter(|(name, _)| name != skip)
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.8
                })
                .collect();
            (name, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
        })
        .collect()
}

fn serialized(tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<_> = tensors.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn the_converted_graph_runs_in_tract_and_gives_unit_embeddings() {
    let bytes = serialized(&tensors(&config(), ""));
    let graph_bytes = bert_to_onnx(&config(), &MEAN, &SafeTensors::deserialize(&bytes).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("encoder.onnx");
    std::fs::write(&path, graph_bytes).unwrap();
    let graph = Graph::load(&path, 16, 9).unwrap();
    assert_eq!(graph.inputs(), ["input_ids", "attention_mask"]);
    assert_eq!(graph.output_width(), Some(8));
    let ids = [1i64, 4, 7, 2];
    let run = |mask: &[i64]| graph.run(&[&ids, mask]).unwrap().remove(0);
    let (shape, full) = run(&[1, 1, 1, 1]);
    assert_eq!(shape, [1, 8]);
    let norm: f32 = full.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    // Masking the last token changes the embedding; it equals running without that token.
    let (_, masked) = run(&[1, 1, 1, 0]);
    let (_, shorter) = graph.run(&[&ids[..3], &[1, 1, 1]]).unwrap().remove(0);
    assert!(full.iter().zip(&masked).any(|(a, b)| (a - b).abs() > 1e-4));
    for (a, b) in masked.iter().zip(&shorter) {
        assert!((a - b).abs() < 1e-5, "a masked token must not count: {masked:?} vs {shorter:?}");
    }
    let e = graph.run(&[&[1i64; 17], &[1i64; 17]]).unwrap_err().to_string();
    assert!(e.contains("17") && e.contains("16"), "{e}");
}

#[test]
fn malformed_encoders_are_refused_naming_the_problem() {
    let missing = "encoder.layer.1.attention.self.key.weight";
    let bytes = serialized(&tensors(&config(), missing));
    let e = bert_to_onnx(&config(), &MEAN, &SafeTensors::deserialize(&bytes).unwrap()).unwrap_err().to_string();
    assert!(e.contains(missing), "{e}");

    let bytes = serialized(&tensors(&config(), ""));
    let weights = SafeTensors::deserialize(&bytes).unwrap();
    let wide = BertConfig { intermediate_size: 32, ..config() };
    let e = bert_to_onnx(&wide, &MEAN, &weights).unwrap_err().to_string();
    assert!(e.contains("encoder.layer.0.intermediate.dense") && e.contains("[32, 8]"), "{e}");
    let relu = BertConfig { hidden_act: "relu".into(), ..config() };
    assert!(bert_to_onnx(&relu, &MEAN, &weights).unwrap_err().to_string().contains("hidden_act"));
    let heads = BertConfig { num_attention_heads: 3, ..config() };
    assert!(bert_to_onnx(&heads, &MEAN, &weights).unwrap_err().to_string().contains("num_attention_heads"));
    let cls = PoolingConfig { pooling_mode_cls_token: true, ..MEAN };
    assert!(bert_to_onnx(&config(), &cls, &weights).unwrap_err().to_string().contains("mean pooling"));
}
