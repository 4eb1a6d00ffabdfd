//! nocturne-trainer: the host-side companion of the nocturne runtime.
//!
//! Modules: [`gguf`] (GGUF reader), [`gguf_tokenizer`] (tokenizer.json from
//! GGUF metadata), [`convert`] (GGUF → model packs, int8 through
//! `nocturne::quant`), [`encoder_onnx`] (a BERT sentence encoder →
//! `encoder.onnx`), [`fetch`] (model manifests, download, verification),
//! [`store`] (the host store: enrolled devices, ingested journal segments,
//! acknowledgements), [`replay`] (training examples from journaled feedback),
//! [`llama`] (the candle Llama forward with LoRA over the frozen pack),
//! [`train`] (LoRA training: AdamW, the MAS penalty, rehearsal), [`eval`]
//! (efficacy, generalisation, locality, retention, the gate), [`paraphrase`] (the night's
//! paraphrases of corrected questions), [`export`] (device bundle and PEFT
//! layout), [`consolidate`] (one night, the `consolidate` command, end to
//! end), [`report`] (report.html). The scenario's datasets live with the
//! scenario (`examples/scenario/`).

pub mod consolidate;
pub mod convert;
pub mod encoder_onnx;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod fused_ops;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod llama;
pub mod paraphrase;
pub mod replay;
pub mod report;
pub mod store;
pub mod train;
