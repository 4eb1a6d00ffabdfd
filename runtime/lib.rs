//! nocturne: an on-device language-model runtime that learns while it sleeps.
//!
//! By day the device answers prompts from memory-mapped weights inside the
//! budget of the firmware profile it was built with; see `ARCHITECTURE.md`
//! for the day/night flow and the code map.
//!
//! Modules: [`profile`] (the build-time firmware profile), [`config`]
//! (`config.json`), [`weights`] (the memory-mapped pack), [`tokenizer`],
//! [`file_error`] (the error of every on-disk format reader), [`journal`]
//! (the append-only feedback journal), [`durable_file`] (atomic replacement
//! of small state files).

pub mod adapter;
pub mod budget;
pub mod config;
pub mod decoder;
pub mod device;
pub mod digest;
pub mod durable_file;
pub mod file_error;
pub mod journal;
pub mod kernels;
pub mod pool;
pub mod profile;
pub mod sampler;
pub mod session;
pub mod sync;
pub mod tokenizer;
pub mod weights;
