//! The sentence encoder: text → a unit-length embedding, through a tokenizer
//! (`tokenizer.json`, Hugging Face `tokenizers` format, WordPiece for BERT)
//! and an ONNX graph run by [`crate::graph::Graph`].
//!
//! Principal items: [`SentenceEncoder`], [`EncoderError`], [`ENCODER_FILE`],
//! [`ENCODER_TOKENIZER_FILE`].
//!
//! A directory holding `encoder.onnx` and `tokenizer.json` is an encoder; any
//! sentence encoder exported to ONNX works without code changes:
//! - inputs are fed by name: `input_ids` (the token ids, with the tokenizer's
//!   special tokens such as `[CLS]`/`[SEP]`), `attention_mask` (all 1) and
//!   `token_type_ids` (all 0); any other input is refused at load, named;
//! - output 0 is either the sentence embedding `[1, D]` (as our converter
//!   writes it: mean-pooled, normalised) or the token states `[1, S, D]`, which
//!   are mean-pooled here (sentence-transformers' `Pooling(mean)`);
//! - the result is divided by its L2 norm, so inner product is cosine
//!   similarity. `D` is read from the graph.
//!
//! Text longer than the profile's maximum sequence is truncated to it (the
//! special tokens kept), as sentence-transformers truncates to its
//! `max_seq_length`.

use std::path::{Path, PathBuf};

use crate::graph::{Graph, GraphError};

/// File name of the encoder graph in an encoder directory.
pub const ENCODER_FILE: &str = "encoder.onnx";
/// File name of the encoder's tokenizer in an encoder directory.
pub const ENCODER_TOKENIZER_FILE: &str = "tokenizer.json";

/// The encoder cannot be loaded or cannot embed.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// The tokenizer is missing or malformed, or fails on the input.
    #[error("{path}: encoder tokenizer: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// The graph failed to load or run, or does not look like a sentence encoder.
    #[error(transparent)]
    Graph(#[from] GraphError),
}

/// A sentence encoder loaded from a directory (module docs).
pub struct SentenceEncoder {
    tokenizer: tokenizers::Tokenizer,
    tokenizer_path: PathBuf,
    graph: Graph,
    inputs: Vec<Feed>,
    dimension: usize,
}

/// What each graph input receives.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Feed {
    Ids,
    Ones,
    Zeros,
}

impl SentenceEncoder {
    /// Loads `dir/encoder.onnx` and `dir/tokenizer.json`, planning the graph for
    /// inputs of up to `max_sequence` tokens (its heap is measured then; see
    /// [`Graph::load`]).
    ///
    /// # Errors
    /// [`EncoderError::Tokenizer`] for a missing or malformed tokenizer;
    /// [`EncoderError::Graph`] for a missing or malformed graph, an input it
    /// does not know how to feed, or an output that is not `[1, D]` or `[1, S, D]`.
    pub fn load(dir: &Path, max_sequence: usize) -> Result<SentenceEncoder, EncoderError> {
        let tokenizer_path = dir.join(ENCODER_TOKENIZER_FILE);
        let tokenizer_error = |message: String| EncoderError::Tokenizer { path: tokenizer_path.clone(), message };
        let bytes = crate::file_read::read_bounded(&tokenizer_path, crate::file_read::limit::TOKENIZER)
            .map_err(|e| tokenizer_error(e.to_string()))?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tokenizer_error(e.to_string()))?;
        tokenizer.with_padding(None);
        let truncation = tokenizers::TruncationParams { max_length: max_sequence, ..Default::default() };
        tokenizer.with_truncation(Some(truncation)).map_err(|e| tokenizer_error(e.to_string()))?;
        tokenizer.set_encode_special_tokens(true);
        let warmup = tokenizer.get_vocab(true).values().copied().max().unwrap_or(0);

        let graph_path = dir.join(ENCODER_FILE);
        let graph = Graph::load(&graph_path, max_sequence, i64::from(warmup))?;
        let inputs = graph
            .inputs()
            .iter()
            .map(|name| match name.as_str() {
                "input_ids" => Ok(Feed::Ids),
                "attention_mask" => Ok(Feed::Ones),
                "token_type_ids" => Ok(Feed::Zeros),
                other => Err(GraphError::Shape {
                    path: graph_path.clone(),
                    message: format!("input `{other}` is not one a sentence encoder takes (input_ids, attention_mask, token_type_ids)"),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !inputs.contains(&Feed::Ids) {
            return Err(GraphError::Shape { path: graph_path, message: "the graph has no `input_ids` input".into() }.into());
        }
        let dimension = graph
            .output_width()
            .filter(|&d| d > 0)
            .ok_or_else(|| GraphError::Shape { path: graph_path.clone(), message: "output 0 has no fixed last axis (the embedding size)".into() })?;
        Ok(SentenceEncoder { tokenizer, tokenizer_path, graph, inputs, dimension })
    }

    /// The embedding size `D`, read from the graph.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The graph, for its heap figures.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Token ids of `text` as the graph receives them (special tokens added,
    /// truncated to the planned maximum).
    ///
    /// # Errors
    /// [`EncoderError::Tokenizer`].
    pub fn tokens(&self, text: &str) -> Result<Vec<i64>, EncoderError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EncoderError::Tokenizer { path: self.tokenizer_path.clone(), message: e.to_string() })?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// The unit-length embedding of `text`, `D` values.
    ///
    /// # Errors
    /// [`EncoderError::Tokenizer`]; [`EncoderError::Graph`] when the run fails,
    /// exceeds its planned heap, or returns an output of another shape.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EncoderError> {
        let ids = self.tokens(text)?;
        let (ones, zeros) = (vec![1i64; ids.len()], vec![0i64; ids.len()]);
        let feeds: Vec<&[i64]> = self
            .inputs
            .iter()
            .map(|feed| match feed {
                Feed::Ids => ids.as_slice(),
                Feed::Ones => ones.as_slice(),
                Feed::Zeros => zeros.as_slice(),
            })
            .collect();
        let mut outputs = self.graph.run(&feeds)?;
        let (shape, values) = outputs.swap_remove(0);
        let d = self.dimension;
        let mut embedding = match shape.as_slice() {
            [1, w] if *w == d => values,
            [1, s, w] if *w == d && *s > 0 => {
                let mut mean = vec![0f32; d];
                for token in values.chunks_exact(d) {
                    mean.iter_mut().zip(token).for_each(|(m, v)| *m += v);
                }
                mean.iter_mut().for_each(|m| *m /= *s as f32);
                mean
            }
            _ => {
                let message = format!("output 0 has shape {shape:?}; a sentence encoder gives [1, {d}] or [1, S, {d}]");
                return Err(GraphError::Shape { path: self.graph_path().to_owned(), message }.into());
            }
        };
        let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        embedding.iter_mut().for_each(|v| *v /= norm);
        Ok(embedding)
    }

    fn graph_path(&self) -> &Path {
        self.graph.path()
    }
}
