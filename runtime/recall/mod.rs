//! Recall memory: taught answers and document passages retrieved into the
//! prompt by embedding similarity (DESIGN.md, "Recall memory").
//!
//! Principal items: [`encoder::SentenceEncoder`] (text → unit embedding
//! through a tract-onnx graph), [`index::RecallIndex`] (the fixed-capacity
//! table of taught answers and passages, exact top-k search, its durable
//! file), [`prompt::with_recalled`] (recalled entries into the prompt, in the
//! documented form).
//!
//! Compiled in with the `recall` cargo feature (on by default).

pub mod encoder;
pub mod index;
pub mod prompt;
