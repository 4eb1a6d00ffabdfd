//! nocturne-trainer: the host-side companion of the nocturne runtime.
//!
//! Modules: [`gguf`] (GGUF reader), [`gguf_tokenizer`] (tokenizer.json from
//! GGUF metadata), [`quant`] (int8 block quantization), [`convert`] (GGUF →
//! model packs), [`fetch`] (model manifests, download, verification),
//! [`store`] (the host store: enrolled devices, ingested journal segments,
//! acknowledgements), [`replay`] (training examples from journaled feedback),
//! [`model`] (the candle Llama forward with LoRA), [`consolidate`] (LoRA
//! training with the MAS penalty), [`eval`] (match rate, retention, the gate),
//! [`export`] (device bundle and PEFT layout), [`night`] (one consolidation
//! run end to end), [`report`] (report.html), [`datasets`] (the scenario's
//! pinned chatterbot and chitchat data).

pub mod consolidate;
pub mod convert;
pub mod datasets;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod model;
pub mod night;
pub mod quant;
pub mod replay;
pub mod report;
pub mod store;
