//! nocturne: an on-device language-model runtime that learns while it sleeps.
//!
//! By day the device answers prompts from memory-mapped weights inside the
//! budget of the firmware profile it was built with, and journals every
//! interaction and piece of feedback; see `ARCHITECTURE.md` for the
//! day/night flow and the code map.
//!
//! The modules, from the bottom up: each imports only modules listed above
//! it (formats and files first, then the engines of the day's data flow,
//! then the device's state and sync).

pub mod heap; // the counting global allocator: allocations, bytes, per-thread live and peak heap
pub mod file_error; // FileError, the error of every on-disk format reader
pub mod file_read; // regular files only, read with a size limit per kind
pub mod digest; // SHA-256 of files, hex, the sha256sum line format
pub mod ids; // DeviceId, ModelId, AdapterId: the ids every format stores
pub mod durable_file; // atomic replacement of files and directories (fsync, rename, fsync)
pub mod profile; // the firmware profile baked in at build time
pub mod signing; // ed25519 key files and signed envelopes
pub mod journal; // the append-only journal: record schema, segments, reader, writer
pub mod config; // config.json of a model directory
pub mod quant; // the int8 block format: reference quantizer and dequantizer
pub mod weights; // the memory-mapped model pack
pub mod budget; // the memory plan and its sizing constants
pub mod adapter; // LoRA adapter bundles, validated and mapped
pub mod tokenizer; // tokenizer.json, the token table, the chat template
pub mod kernels; // vector primitives (scalar reference, SIMD), RMSNorm, RoPE, softmax, SiLU
pub mod pool; // the decoder's persistent worker threads
pub mod decoder; // the Llama forward pass over the pack, with the KV cache and LoRA
#[cfg(feature = "recall")]
pub mod graph; // ONNX graphs run by tract-onnx, their heap measured into the memory plan
pub mod sampler; // greedy, temperature, top-k, top-p, repetition penalty
pub mod session; // a planned, allocated session answering requests to their stop reason
#[cfg(feature = "recall")]
pub mod recall; // recall memory: the sentence encoder, the index of taught answers
pub mod device; // the state directory: identity, journal, recorder, installed adapters
pub mod sync; // offline sync: segment bundles out, acknowledgements back
