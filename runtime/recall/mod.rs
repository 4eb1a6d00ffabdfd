//! Recall memory: taught answers and document passages retrieved into the
//! prompt by embedding similarity (DESIGN.md, "Recall memory").
//!
//! Principal items: [`encoder::SentenceEncoder`] (text → unit embedding
//! through a tract-onnx graph), [`index::RecallIndex`] (the fixed-capacity
//! table of taught answers and passages, exact top-k search, its durable
//! file), [`prompt::with_recalled`] (recalled entries into the prompt, in the
//! documented form), [`passages::split`] (documents cut into passages),
//! [`scope::in_adapter_scope`] (whether a request falls to a scoped adapter).
//!
//! Compiled in with the `recall` cargo feature (on by default).

pub mod encoder;
pub mod index;
pub mod passages;
pub mod prompt;
pub mod scope;

/// Bytes recall memory adds to the memory plan: the higher of the encoder
/// graph's load peak (reading and optimising it, transient) and what stays
/// (the graph's kept heap, the peak of one run at the longest input, and
/// the index's embedding table of `index_bytes`). Heap figures are the ones
/// [`crate::graph::Graph::load`] measured.
pub fn plan_bytes(graph: &crate::graph::Graph, index_bytes: usize) -> usize {
    graph.load_peak_bytes().max(graph.weight_bytes() + graph.run_peak_bytes() + index_bytes)
}
