//! Sentence-encoder conversion: a BERT encoder in sentence-transformers'
//! layout (`config.json`, `model.safetensors`, `1_Pooling/config.json`) →
//! one ONNX graph, `encoder.onnx`, that the runtime's `graph` module runs with
//! tract-onnx.
//!
//! Principal items: [`BertConfig`], [`bert_to_onnx`].
//!
//! The graph (ONNX opset 17, IR version 8; operators as in the ONNX spec,
//! <https://onnx.ai/onnx/operators/>):
//! - inputs `input_ids` and `attention_mask`, both int64 `[batch, sequence]`;
//! - output `sentence_embedding`, float `[batch, hidden]`: the token states of
//!   the last layer averaged over the tokens whose mask is 1 (the mask sum
//!   clamped at 1e-9), then divided by their L2 norm (clamped at 1e-12), as
//!   sentence-transformers' `Pooling(mean)` and `Normalize` modules compute it.
//! - The encoder is BERT (Devlin et al., 2019) as Hugging Face's `BertModel`
//!   computes it: word + position + token-type-0 embeddings, LayerNorm, then
//!   per layer self-attention with an additive mask of −10000 on padded keys,
//!   residual + LayerNorm, a GELU feed-forward (the exact, erf form),
//!   residual + LayerNorm. The pooler layer is not used.
//!
//! Weights are written as float32 initializers, except the word-embedding
//! table, which is float16 and cast after its `Gather` (half the heap of the
//! largest tensor: only the gathered rows are widened); linear layers are
//! stored transposed (`[in, out]`) so each is one `MatMul` + `Add`. The protobuf
//! types are the ones tract-onnx generates from `onnx.proto` with prost
//! (`tract_onnx::pb`).

use anyhow::{bail, Context};
use prost::Message;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use tract_onnx::pb;

/// The fields of a BERT `config.json` the conversion uses.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Width of the token states (384 for all-MiniLM-L6-v2).
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads; `hidden_size` must be a multiple.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// Activation of the feed-forward layer; only `gelu` (erf form) is converted.
    pub hidden_act: String,
    /// Rows of the position-embedding table: the longest input the graph takes.
    pub max_position_embeddings: usize,
    /// Rows of the word-embedding table.
    pub vocab_size: usize,
}

/// sentence-transformers' `1_Pooling/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct PoolingConfig {
    /// Mean over the masked tokens: the only mode converted.
    pub pooling_mode_mean_tokens: bool,
    /// CLS pooling (refused).
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    /// Max pooling (refused).
    #[serde(default)]
    pub pooling_mode_max_tokens: bool,
}

/// Builds the ONNX model described in the module documentation and returns its
/// serialized protobuf.
///
/// # Errors
/// A pooling mode other than mean, an activation other than `gelu`, a hidden
/// size not divisible by the heads, or a tensor that is missing, not
/// f32/f16/bf16, or of the wrong shape (each named).
pub fn bert_to_onnx(config: &BertConfig, pooling: &PoolingConfig, weights: &SafeTensors) -> anyhow::Result<Vec<u8>> {
    if !pooling.pooling_mode_mean_tokens || pooling.pooling_mode_cls_token || pooling.pooling_mode_max_tokens {
        bail!("1_Pooling/config.json: only mean pooling (pooling_mode_mean_tokens alone) is supported");
    }
    if config.hidden_act != "gelu" {
        bail!("config.json: hidden_act is {:?}; only \"gelu\" is supported", config.hidden_act);
    }
    let (h, heads) = (config.hidden_size, config.num_attention_heads);
    if heads == 0 || h % heads != 0 {
        bail!("config.json: hidden_size {h} is not a multiple of num_attention_heads {heads}");
    }
    let mut g = GraphBuilder { weights, nodes: Vec::new(), initializers: Vec::new() };
    let word = g.weight_f16("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
    let position = g.weight("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h], false)?;
    let token_type = g.weight("embeddings.token_type_embeddings.weight", &[0, h], false)?;

    // Embeddings: word[ids] + position[0..S] + token_type[0].
    let words = g.node("Gather", &[&word, "input_ids"], vec![]);
    let words = g.node("Cast", &[&words], vec![int("to", pb::tensor_proto::DataType::Float as i64)]);
    let sequence = g.node("Shape", &["input_ids"], vec![int("start", 1), int("end", 2)]);
    let zero = g.constant_i64(&[0]);
    let positions = g.node("Slice", &[&position, &zero, &sequence, &zero], vec![]);
    let type0 = g.node("Gather", &[&token_type, &zero], vec![]);
    let summed = g.node("Add", &[&words, &positions], vec![]);
    let embedded = g.node("Add", &[&summed, &type0], vec![]);
    let mut x = g.layer_norm(&embedded, "embeddings.LayerNorm", h, config.layer_norm_eps)?;

    // Additive attention mask [batch, 1, 1, sequence]: 0 where the mask is 1, −10000 where it is 0.
    let mask = g.node("Cast", &["attention_mask"], vec![int("to", pb::tensor_proto::DataType::Float as i64)]);
    let one = g.constant_f32(1.0);
    let inverted = g.node("Sub", &[&one, &mask], vec![]);
    let big_negative = g.constant_f32(-10000.0);
    let bias = g.node("Mul", &[&inverted, &big_negative], vec![]);
    let axes12 = g.constant_i64(&[1, 2]);
    let mask_bias = g.node("Unsqueeze", &[&bias, &axes12], vec![]);

    let head_dim = h / heads;
    let split_heads = g.constant_i64(&[0, 0, heads as i64, head_dim as i64]);
    let merge_heads = g.constant_i64(&[0, 0, h as i64]);
    let scale = g.constant_f32(1.0 / (head_dim as f32).sqrt());
    for layer in 0..config.num_hidden_layers {
        let p = format!("encoder.layer.{layer}");
        let q = g.linear(&x, &format!("{p}.attention.self.query"), h, h)?;
        let k = g.linear(&x, &format!("{p}.attention.self.key"), h, h)?;
        let v = g.linear(&x, &format!("{p}.attention.self.value"), h, h)?;
        let q = g.node("Reshape", &[&q, &split_heads], vec![]);
        let q = g.node("Transpose", &[&q], vec![ints("perm", &[0, 2, 1, 3])]);
        let k = g.node("Reshape", &[&k, &split_heads], vec![]);
        let k = g.node("Transpose", &[&k], vec![ints("perm", &[0, 2, 3, 1])]);
        let v = g.node("Reshape", &[&v, &split_heads], vec![]);
        let v = g.node("Transpose", &[&v], vec![ints("perm", &[0, 2, 1, 3])]);
        let scores = g.node("MatMul", &[&q, &k], vec![]);
        let scores = g.node("Mul", &[&scores, &scale], vec![]);
        let scores = g.node("Add", &[&scores, &mask_bias], vec![]);
        let probs = g.node("Softmax", &[&scores], vec![int("axis", -1)]);
        let context = g.node("MatMul", &[&probs, &v], vec![]);
        let context = g.node("Transpose", &[&context], vec![ints("perm", &[0, 2, 1, 3])]);
        let context = g.node("Reshape", &[&context, &merge_heads], vec![]);
        let attended = g.linear(&context, &format!("{p}.attention.output.dense"), h, h)?;
        let residual = g.node("Add", &[&attended, &x], vec![]);
        x = g.layer_norm(&residual, &format!("{p}.attention.output.LayerNorm"), h, config.layer_norm_eps)?;

        let up = g.linear(&x, &format!("{p}.intermediate.dense"), h, config.intermediate_size)?;
        let activated = g.gelu(&up);
        let down = g.linear(&activated, &format!("{p}.output.dense"), config.intermediate_size, h)?;
        let residual = g.node("Add", &[&down, &x], vec![]);
        x = g.layer_norm(&residual, &format!("{p}.output.LayerNorm"), h, config.layer_norm_eps)?;
    }

    // Mean pooling over the masked tokens, then L2 normalisation.
    let axis2 = g.constant_i64(&[2]);
    let token_mask = g.node("Unsqueeze", &[&mask, &axis2], vec![]);
    let masked = g.node("Mul", &[&x, &token_mask], vec![]);
    let axis1 = g.constant_i64(&[1]);
    let total = g.node("ReduceSum", &[&masked, &axis1], vec![int("keepdims", 0)]);
    let count = g.node("ReduceSum", &[&token_mask, &axis1], vec![int("keepdims", 0)]);
    let min_count = g.constant_f32(1e-9);
    let count = g.node("Max", &[&count, &min_count], vec![]);
    let mean = g.node("Div", &[&total, &count], vec![]);
    let norm = g.node("ReduceL2", &[&mean], vec![ints("axes", &[1]), int("keepdims", 1)]);
    let min_norm = g.constant_f32(1e-12);
    let norm = g.node("Max", &[&norm, &min_norm], vec![]);
    let embedding = g.node("Div", &[&mean, &norm], vec![]);
    g.nodes.push(pb::NodeProto {
        input: vec![embedding],
        output: vec!["sentence_embedding".into()],
        op_type: "Identity".into(),
        name: "output".into(),
        ..Default::default()
    });

    let graph = pb::GraphProto {
        node: g.nodes,
        name: "sentence_encoder".into(),
        initializer: g.initializers,
        input: vec![
            value_info("input_ids", pb::tensor_proto::DataType::Int64, &["batch", "sequence"]),
            value_info("attention_mask", pb::tensor_proto::DataType::Int64, &["batch", "sequence"]),
        ],
        output: vec![pb::ValueInfoProto {
            name: "sentence_embedding".into(),
            r#type: Some(tensor_type(pb::tensor_proto::DataType::Float, &[Dim::Param("batch"), Dim::Value(h as i64)])),
            ..Default::default()
        }],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 17 }],
        producer_name: "nocturne-trainer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: "sentence encoder: mean-pooled, L2-normalised BERT".into(),
        graph: Some(graph),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// Nodes and initializers of the graph being built, with unique value names.
struct GraphBuilder<'a> {
    weights: &'a SafeTensors<'a>,
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
}

impl GraphBuilder<'_> {
    /// Appends a node with one output, named after its position, and returns that name.
    fn node(&mut self, op: &str, inputs: &[&str], attribute: Vec<pb::AttributeProto>) -> String {
        let output = format!("{}_{}", op.to_lowercase(), self.nodes.len());
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.clone()],
            name: output.clone(),
            op_type: op.into(),
            attribute,
            ..Default::default()
        });
        output
    }

    fn initializer(&mut self, name: String, dims: &[usize], data_type: pb::tensor_proto::DataType, raw_data: Vec<u8>) -> String {
        self.initializers.push(pb::TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            name: name.clone(),
            raw_data,
            ..Default::default()
        });
        name
    }

    fn constant_i64(&mut self, values: &[i64]) -> String {
        let name = format!("const_{}", self.initializers.len());
        self.initializer(name, &[values.len()], pb::tensor_proto::DataType::Int64, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn constant_f32(&mut self, value: f32) -> String {
        let name = format!("const_{}", self.initializers.len());
        self.initializer(name, &[], pb::tensor_proto::DataType::Float, value.to_le_bytes().to_vec())
    }

    /// The safetensors tensor `name` as a float16 initializer of shape `dims`.
    fn weight_f16(&mut self, name: &str, dims: &[usize]) -> anyhow::Result<String> {
        let (values, shape) = self.values(name, dims)?;
        let raw = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        Ok(self.initializer(name.to_owned(), &shape, pb::tensor_proto::DataType::Float16, raw))
    }

    /// The values and shape of the safetensors tensor `name`, checked against
    /// `dims` (`dims[0] == 0` takes any row count).
    fn values(&self, name: &str, dims: &[usize]) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
        let view = self.weights.tensor(name).with_context(|| format!("model.safetensors has no tensor {name}"))?;
        let shape = view.shape().to_vec();
        let fits = shape.len() == dims.len() && shape.iter().zip(dims).all(|(&s, &d)| d == 0 || s == d);
        if !fits {
            bail!("model.safetensors: {name} has shape {shape:?}, expected {dims:?}");
        }
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => view.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => view.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => bail!("model.safetensors: {name} is {other:?}; expected F32, F16 or BF16"),
        };
        Ok((values, shape))
    }

    /// The safetensors tensor `name` as a float32 initializer of shape `dims`
    /// (`dims[0] == 0` takes any row count), transposed when `transpose`.
    fn weight(&mut self, name: &str, dims: &[usize], transpose: bool) -> anyhow::Result<String> {
        let (values, shape) = self.values(name, dims)?;
        let (values, shape) = if transpose {
            let (rows, cols) = (shape[0], shape[1]);
            let mut t = vec![0f32; values.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = values[r * cols + c];
                }
            }
            (t, vec![cols, rows])
        } else {
            (values, shape)
        };
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(self.initializer(name.to_owned(), &shape, pb::tensor_proto::DataType::Float, raw))
    }

    /// `x · Wᵀ + b` for the torch `Linear` `prefix` (`weight` `[out, in]`, `bias` `[out]`).
    fn linear(&mut self, x: &str, prefix: &str, inputs: usize, outputs: usize) -> anyhow::Result<String> {
        let w = self.weight(&format!("{prefix}.weight"), &[outputs, inputs], true)?;
        let b = self.weight(&format!("{prefix}.bias"), &[outputs], false)?;
        let product = self.node("MatMul", &[x, &w], vec![]);
        Ok(self.node("Add", &[&product, &b], vec![]))
    }

    fn layer_norm(&mut self, x: &str, prefix: &str, width: usize, epsilon: f32) -> anyhow::Result<String> {
        let gamma = self.weight(&format!("{prefix}.weight"), &[width], false)?;
        let beta = self.weight(&format!("{prefix}.bias"), &[width], false)?;
        Ok(self.node("LayerNormalization", &[x, &gamma, &beta], vec![int("axis", -1), float("epsilon", epsilon)]))
    }

    /// GELU, erf form: `0.5 · x · (1 + erf(x / √2))`.
    fn gelu(&mut self, x: &str) -> String {
        let root2 = self.constant_f32(std::f32::consts::SQRT_2);
        let one = self.constant_f32(1.0);
        let half = self.constant_f32(0.5);
        let scaled = self.node("Div", &[x, &root2], vec![]);
        let erf = self.node("Erf", &[&scaled], vec![]);
        let shifted = self.node("Add", &[&erf, &one], vec![]);
        let product = self.node("Mul", &[x, &shifted], vec![]);
        self.node("Mul", &[&product, &half], vec![])
    }
}

fn int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: pb::attribute_proto::AttributeType::Int as i32, i, ..Default::default() }
}

fn ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: pb::attribute_proto::AttributeType::Ints as i32, ints: ints.to_vec(), ..Default::default() }
}

fn float(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto { name: name.into(), r#type: pb::attribute_proto::AttributeType::Float as i32, f, ..Default::default() }
}

enum Dim<'a> {
    Param(&'a str),
    Value(i64),
}

fn tensor_type(elem: pb::tensor_proto::DataType, dims: &[Dim]) -> pb::TypeProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Param(p) => Value::DimParam((*p).to_owned()),
                Dim::Value(v) => Value::DimValue(*v),
            }),
            ..Default::default()
        })
        .collect();
    pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor { elem_type: elem as i32, shape: Some(pb::TensorShapeProto { dim }) })),
        ..Default::default()
    }
}

fn value_info(name: &str, elem: pb::tensor_proto::DataType, dims: &[&str]) -> pb::ValueInfoProto {
    let dims: Vec<Dim> = dims.iter().map(|d| Dim::Param(d)).collect();
    pb::ValueInfoProto { name: name.into(), r#type: Some(tensor_type(elem, &dims)), ..Default::default() }
}
