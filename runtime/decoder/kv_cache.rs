//! The preallocated KV cache.
//!
//! Principal types: [`KvCache`], [`KvElement`].
//!
//! Layout: for each layer, keys `[context × kv_heads × head_dim]` then values
//! of the same shape, contiguous; element type f16 (device default) or f32.
//! Invariants: allocated once at full context length, zeroed by the
//! allocator without being written; writing position `p` never touches
//! another position.

use half::f16;

use crate::budget::KvPrecision;
use crate::kernels::Kernels;

/// An element type the cache can hold, with the kernels attention needs.
pub trait KvElement: Copy + bytemuck::Zeroable + Send + Sync + 'static {
    /// `Σ a[i] × b[i]`.
    fn dot(k: &Kernels, a: &[Self], b: &[f32]) -> f32;
    /// `y += alpha × x`.
    fn axpy(k: &Kernels, alpha: f32, x: &[Self], y: &mut [f32]);
    /// `dst = src` converted.
    fn store(k: &Kernels, src: &[f32], dst: &mut [Self]);
}

impl KvElement for f16 {
    fn dot(k: &Kernels, a: &[f16], b: &[f32]) -> f32 {
        (k.dot_f16)(a, b)
    }
    fn axpy(k: &Kernels, alpha: f32, x: &[f16], y: &mut [f32]) {
        (k.axpy_f16)(alpha, x, y)
    }
    fn store(k: &Kernels, src: &[f32], dst: &mut [f16]) {
        (k.to_f16)(src, dst)
    }
}

impl KvElement for f32 {
    fn dot(k: &Kernels, a: &[f32], b: &[f32]) -> f32 {
        (k.dot_f32)(a, b)
    }
    fn axpy(k: &Kernels, alpha: f32, x: &[f32], y: &mut [f32]) {
        (k.axpy_f32)(alpha, x, y)
    }
    fn store(_: &Kernels, src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}

/// Keys and values of every layer for `context` positions.
pub struct Cache<E> {
    data: Vec<E>,
    context: usize,
    width: usize,
}

impl<E: KvElement> Cache<E> {
    fn new(layers: usize, context: usize, width: usize) -> Cache<E> {
        // Zeroed by the allocator (calloc, or fresh zero pages for a large
        // cache), never written here: the pages of positions a session does
        // not reach are not resident, so a short request does not pay for
        // the whole context in RSS or start-up time.
        Cache { data: bytemuck::zeroed_vec(2 * layers * context * width), context, width }
    }

    fn layer_span(&self) -> usize {
        2 * self.context * self.width
    }

    /// Keys of `layer` for positions `0..context`, `[context × width]`.
    pub fn keys(&self, layer: usize) -> &[E] {
        let start = layer * self.layer_span();
        &self.data[start..start + self.context * self.width]
    }

    /// Values of `layer`, `[context × width]`.
    pub fn values(&self, layer: usize) -> &[E] {
        let start = layer * self.layer_span() + self.context * self.width;
        &self.data[start..start + self.context * self.width]
    }

    /// Stores key `k` and value `v` (each `width` f32) of `layer` at `pos`.
    pub fn store(&mut self, kernels: &Kernels, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (w, base) = (self.width, layer * self.layer_span());
        E::store(kernels, k, &mut self.data[base + pos * w..base + (pos + 1) * w]);
        let vbase = base + self.context * w;
        E::store(kernels, v, &mut self.data[vbase + pos * w..vbase + (pos + 1) * w]);
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<E>()
    }
}

/// The cache in the precision the session chose.
pub enum KvCache {
    /// f16 elements.
    F16(Cache<f16>),
    /// f32 elements.
    F32(Cache<f32>),
}

impl KvCache {
    /// Allocates a zeroed cache.
    pub fn new(precision: KvPrecision, layers: usize, context: usize, width: usize) -> KvCache {
        match precision {
            KvPrecision::F16 => KvCache::F16(Cache::new(layers, context, width)),
            KvPrecision::F32 => KvCache::F32(Cache::new(layers, context, width)),
        }
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        match self {
            KvCache::F16(c) => c.bytes(),
            KvCache::F32(c) => c.bytes(),
        }
    }
}
