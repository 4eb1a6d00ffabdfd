//! The recall index: a fixed-capacity table of entries (taught answers and
//! document passages) with their embeddings, exact top-k search by inner
//! product, and its durable file.
//!
//! Principal items: [`RecallIndex`], [`Entry`], [`Origin`], [`Hit`],
//! [`IndexFileError`], [`INDEX_FILE_VERSION`].
//!
//! Capacity and storage precision come from the profile; the embeddings are
//! one allocation of `capacity × dimension` values made at creation
//! ([`RecallIndex::embedding_bytes`] is the memory-plan line). When the index
//! is full, adding evicts the oldest entry that an installed adapter has
//! learned, else the oldest entry.
//!
//! File format (`recall.idx`, little-endian), written whole and atomically
//! (temp file, fsync, rename, directory fsync):
//! - 8 bytes magic `NOCRECAL`, u32 version ([`INDEX_FILE_VERSION`]), u32
//!   entry count (outside the checksum, so a damaged file still says how
//!   many entries it held), u32 CRC32C (Castagnoli) of the payload, u64
//!   payload length;
//! - the payload, postcard: the encoder fingerprint (32 bytes), dimension,
//!   precision, the last journal LSN read, and the entries with their texts
//!   and stored embeddings.
//!
//! Invariants: entries keep their journal LSNs (taught) or source and passage
//! number (documents); the texts are kept, so a stale index (another encoder)
//! is re-embedded from the file itself and loses nothing; search never
//! returns an entry marked learned by the active adapter.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::ids::AdapterId;
use crate::kernels::Kernels;
use crate::profile::EmbeddingPrecision;

/// Version of the index file format.
pub const INDEX_FILE_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"NOCRECAL";
const HEADER: usize = 28;

/// Where an entry came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// A correction: the interaction it corrected and the feedback record
    /// that carried it (journal LSNs).
    Taught {
        /// LSN of the interaction (its question is the entry's text).
        interaction: u64,
        /// LSN of the feedback record with the correction.
        feedback: u64,
    },
    /// A passage of a document added with `nocturne recall add`.
    Passage {
        /// The file as given (its provenance).
        source: String,
        /// Passage number within the source, from 0.
        number: u32,
    },
}

/// One recallable entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where it came from.
    pub origin: Origin,
    /// The embedded text: the user's question, or the passage.
    pub text: String,
    /// The taught answer (empty for a passage).
    pub answer: String,
    /// The installed adapter whose manifest says it learned this correction;
    /// such entries are kept but not recalled while that adapter is active.
    pub learned_by: Option<AdapterId>,
}

/// A search result: the entry's position in the index and its cosine similarity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    /// Position in [`RecallIndex::entries`].
    pub slot: usize,
    /// Inner product of unit vectors, −1..=1.
    pub score: f32,
}

/// Stored embeddings, allocated once for the capacity.
#[derive(Clone, Debug)]
enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// The in-memory index (module docs).
#[derive(Clone, Debug)]
pub struct RecallIndex {
    encoder: [u8; 32],
    dimension: usize,
    capacity: usize,
    rows: Rows,
    entries: Vec<Entry>,
    last_lsn: u64,
}

/// The index file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexFileError {
    /// Not an index file, a version this build does not read, a checksum
    /// mismatch or an undecodable payload: the file is damaged.
    #[error("damaged recall index: {0}")]
    Damaged(String),
    /// Intact, but written for another encoder, dimension or precision: its
    /// entries (texts intact) must be embedded again.
    #[error("the recall index was built with another encoder, dimension or precision")]
    Stale {
        /// The file's entries, oldest first.
        entries: Vec<Entry>,
        /// The last journal LSN the file had seen.
        last_lsn: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct FileBody {
    encoder: [u8; 32],
    dimension: u32,
    precision: u8,
    last_lsn: u64,
    entries: Vec<Entry>,
    embeddings: Vec<u8>,
}

fn precision_code(p: EmbeddingPrecision) -> u8 {
    match p {
        EmbeddingPrecision::F32 => 0,
        EmbeddingPrecision::F16 => 1,
    }
}

impl RecallIndex {
    /// An empty index for `capacity` entries of `dimension` values, stored at
    /// `precision`, for the encoder whose fingerprint is `encoder`.
    pub fn new(encoder: [u8; 32], dimension: usize, capacity: usize, precision: EmbeddingPrecision) -> RecallIndex {
        let rows = match precision {
            EmbeddingPrecision::F32 => Rows::F32(vec![0.0; capacity * dimension]),
            EmbeddingPrecision::F16 => Rows::F16(vec![f16::ZERO; capacity * dimension]),
        };
        RecallIndex { encoder, dimension, capacity, rows, entries: Vec::with_capacity(capacity), last_lsn: 0 }
    }

    /// Bytes of the embedding table (`capacity × dimension × precision`), the
    /// index's memory-plan line.
    pub fn embedding_bytes(&self) -> usize {
        self.capacity * self.dimension * self.precision().bytes()
    }

    /// Storage precision.
    pub fn precision(&self) -> EmbeddingPrecision {
        match self.rows {
            Rows::F32(_) => EmbeddingPrecision::F32,
            Rows::F16(_) => EmbeddingPrecision::F16,
        }
    }

    /// Embedding size.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Most entries the index holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The last journal LSN whose records the index has seen.
    pub fn last_lsn(&self) -> u64 {
        self.last_lsn
    }

    /// Records that the journal has been read up to `lsn`.
    pub fn set_last_lsn(&mut self, lsn: u64) {
        self.last_lsn = self.last_lsn.max(lsn);
    }

    /// Adds `entry` with its unit `embedding` (`dimension` values). When full,
    /// first evicts the oldest learned entry, else the oldest; returns the
    /// evicted entry.
    ///
    /// # Panics
    /// When `embedding` is not `dimension` long (a caller bug: embeddings come
    /// from the encoder this index was made for).
    pub fn add(&mut self, entry: Entry, embedding: &[f32]) -> Option<Entry> {
        assert_eq!(embedding.len(), self.dimension, "embedding size");
        let evicted = (self.entries.len() == self.capacity && self.capacity > 0).then(|| {
            let victim = self.entries.iter().position(|e| e.learned_by.is_some()).unwrap_or(0);
            self.remove(victim)
        });
        if self.capacity == 0 {
            return Some(entry);
        }
        let slot = self.entries.len();
        let d = self.dimension;
        match &mut self.rows {
            Rows::F32(rows) => rows[slot * d..(slot + 1) * d].copy_from_slice(embedding),
            Rows::F16(rows) => {
                for (o, v) in rows[slot * d..(slot + 1) * d].iter_mut().zip(embedding) {
                    *o = f16::from_f32(*v);
                }
            }
        }
        self.entries.push(entry);
        evicted
    }

    /// Removes the entry at `slot` (shifting later ones down) and returns it.
    ///
    /// # Panics
    /// When `slot` is not below the entry count.
    pub fn remove(&mut self, slot: usize) -> Entry {
        let d = self.dimension;
        let n = self.entries.len();
        match &mut self.rows {
            Rows::F32(rows) => rows.copy_within((slot + 1) * d..n * d, slot * d),
            Rows::F16(rows) => rows.copy_within((slot + 1) * d..n * d, slot * d),
        }
        self.entries.remove(slot)
    }

    /// Removes every entry `keep` rejects; returns how many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) -> usize {
        let mut removed = 0;
        let mut slot = 0;
        while slot < self.entries.len() {
            if keep(&self.entries[slot]) {
                slot += 1;
            } else {
                self.remove(slot);
                removed += 1;
            }
        }
        removed
    }

    /// Marks the entries `learned` says an adapter learned (and clears the
    /// mark of those it does not); returns how many are marked.
    pub fn mark_learned(&mut self, mut learned: impl FnMut(&Entry) -> Option<AdapterId>) -> usize {
        self.entries.iter_mut().for_each(|e| e.learned_by = learned(e));
        self.entries.iter().filter(|e| e.learned_by.is_some()).count()
    }

    /// The stored embedding of `slot`, widened to f32.
    pub fn embedding(&self, slot: usize) -> Vec<f32> {
        let d = self.dimension;
        match &self.rows {
            Rows::F32(rows) => rows[slot * d..(slot + 1) * d].to_vec(),
            Rows::F16(rows) => rows[slot * d..(slot + 1) * d].iter().map(|v| v.to_f32()).collect(),
        }
    }

    /// The `k` entries most similar to the unit vector `query` with a score of
    /// at least `threshold`, best first, learned entries included (what to do
    /// with them is the caller's choice); written to `out` (cleared first).
    /// Exact: every entry is scored with the SIMD dot products of `kernels`.
    ///
    /// # Panics
    /// When `query` is not `dimension` long.
    pub fn search(&self, kernels: &Kernels, query: &[f32], k: usize, threshold: f32, out: &mut Vec<Hit>) {
        assert_eq!(query.len(), self.dimension, "query size");
        out.clear();
        let d = self.dimension;
        for slot in 0..self.entries.len() {
            let score = match &self.rows {
                Rows::F32(rows) => (kernels.dot_f32)(&rows[slot * d..(slot + 1) * d], query),
                Rows::F16(rows) => (kernels.dot_f16)(&rows[slot * d..(slot + 1) * d], query),
            };
            if score < threshold || k == 0 {
                continue;
            }
            if out.len() == k {
                if out[k - 1].score >= score {
                    continue;
                }
                out.pop();
            }
            let at = out.iter().position(|h| h.score < score).unwrap_or(out.len());
            out.insert(at, Hit { slot, score });
        }
    }

    /// The entry count a file's header states, if it has a recall index
    /// header: what a damaged file held.
    pub fn entry_count_of(bytes: &[u8]) -> Option<usize> {
        (bytes.len() >= HEADER && &bytes[..8] == MAGIC).then(|| u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize)
    }

    /// The index as its file's bytes (module docs).
    pub fn encode(&self) -> Vec<u8> {
        let n = self.entries.len() * self.dimension;
        let embeddings = match &self.rows {
            Rows::F32(rows) => rows[..n].iter().flat_map(|v| v.to_le_bytes()).collect(),
            Rows::F16(rows) => rows[..n].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let body = FileBody {
            encoder: self.encoder,
            dimension: self.dimension as u32,
            precision: precision_code(self.precision()),
            last_lsn: self.last_lsn,
            entries: self.entries.clone(),
            embeddings,
        };
        let payload = postcard::to_stdvec(&body).expect("postcard serializes plain data");
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&INDEX_FILE_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Reads an index file's bytes into an index for `capacity` entries at
    /// `precision`, for the encoder `encoder` of `dimension`. A file with more
    /// entries than `capacity` loses them as [`RecallIndex::add`] evicts.
    ///
    /// # Errors
    /// [`IndexFileError::Damaged`] naming what is wrong;
    /// [`IndexFileError::Stale`] with the file's entries when it was built
    /// with another encoder, dimension or precision (the caller embeds them
    /// again).
    pub fn decode(
        bytes: &[u8],
        encoder: [u8; 32],
        dimension: usize,
        capacity: usize,
        precision: EmbeddingPrecision,
    ) -> Result<RecallIndex, IndexFileError> {
        let damaged = IndexFileError::Damaged;
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(damaged("not a recall index (no NOCRECAL header)".into()));
        }
        let field = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let version = field(8);
        if version != INDEX_FILE_VERSION {
            return Err(damaged(format!("format version {version}; this build reads {INDEX_FILE_VERSION}")));
        }
        let count = field(12) as usize;
        let crc = field(16);
        let len = u64::from_le_bytes(bytes[20..28].try_into().expect("8 bytes"));
        let payload = &bytes[HEADER..];
        if payload.len() as u64 != len {
            return Err(damaged(format!("payload is {} bytes, the header says {len} (truncated or extended)", payload.len())));
        }
        if crc32c::crc32c(payload) != crc {
            return Err(damaged("checksum mismatch".into()));
        }
        let body: FileBody = postcard::from_bytes(payload).map_err(|e| damaged(format!("payload: {e}")))?;
        let width = match body.precision {
            0 => 4,
            1 => 2,
            other => return Err(damaged(format!("unknown precision code {other}"))),
        };
        if body.entries.len() != count || body.embeddings.len() != count * body.dimension as usize * width {
            return Err(damaged("embedding table does not match the entry count".into()));
        }
        if body.encoder != encoder || body.dimension as usize != dimension || body.precision != precision_code(precision) {
            return Err(IndexFileError::Stale { entries: body.entries, last_lsn: body.last_lsn });
        }
        let mut index = RecallIndex::new(encoder, dimension, capacity, precision);
        index.last_lsn = body.last_lsn;
        let values: Vec<f32> = match width {
            4 => body.embeddings.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            _ => body.embeddings.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        for (entry, embedding) in body.entries.into_iter().zip(values.chunks_exact(dimension.max(1))) {
            index.add(entry, embedding);
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(seed: u32, d: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..d).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 1000) as f32 - 500.0).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn taught(i: u64) -> Entry {
        Entry { origin: Origin::Taught { interaction: i, feedback: i + 1 }, text: format!("q{i}"), answer: format!("a{i}"), learned_by: None }
    }

    #[test]
    fn search_is_exact_top_k_above_the_threshold_learned_entries_included() {
        let kernels = Kernels::detect();
        for precision in [EmbeddingPrecision::F32, EmbeddingPrecision::F16] {
            let mut index = RecallIndex::new([7; 32], 48, 64, precision);
            let vectors: Vec<Vec<f32>> = (0..40).map(|s| unit(s, 48)).collect();
            for (i, v) in vectors.iter().enumerate() {
                assert!(index.add(taught(i as u64), v).is_none());
            }
            let query = &vectors[13];
            let mut exact: Vec<(usize, f32)> =
                vectors.iter().enumerate().map(|(i, v)| (i, v.iter().zip(query).map(|(a, b)| a * b).sum::<f32>())).collect();
            exact.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut hits = Vec::new();
            index.search(&kernels, query, 3, -1.0, &mut hits);
            assert_eq!(hits.iter().map(|h| h.slot).collect::<Vec<_>>(), exact[..3].iter().map(|e| e.0).collect::<Vec<_>>());
            assert_eq!(hits[0].slot, 13);
            assert!((hits[0].score - 1.0).abs() < 2e-3, "{precision:?}: {}", hits[0].score);
            index.search(&kernels, query, 3, 0.999, &mut hits);
            assert_eq!(hits.len(), 1, "only the query itself clears 0.999");
            index.mark_learned(|e| (e.origin == taught(13).origin).then_some(AdapterId([1; 16])));
            index.search(&kernels, query, 1, -1.0, &mut hits);
            assert_eq!(hits[0].slot, 13, "a learned entry is found: recall decides what to do with it");
        }
    }

    #[test]
    fn a_full_index_evicts_the_oldest_learned_entry_first_then_the_oldest() {
        let mut index = RecallIndex::new([0; 32], 8, 3, EmbeddingPrecision::F16);
        for i in 0..3 {
            index.add(taught(i), &unit(i as u32, 8));
        }
        index.mark_learned(|e| (e.text == "q1").then_some(AdapterId([2; 16])));
        assert_eq!(index.add(taught(3), &unit(3, 8)).unwrap().text, "q1");
        assert_eq!(index.add(taught(4), &unit(4, 8)).unwrap().text, "q0");
        let texts: Vec<_> = index.entries().iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts, ["q2", "q3", "q4"]);
        // Embeddings moved with their entries.
        let e = index.embedding(1);
        let expected = unit(3, 8);
        assert!(e.iter().zip(&expected).all(|(a, b)| (a - b).abs() < 1e-3));
    }

    #[test]
    fn the_file_round_trips_and_damage_or_another_encoder_is_detected() {
        let mut index = RecallIndex::new([9; 32], 16, 8, EmbeddingPrecision::F16);
        for i in 0..5 {
            index.add(taught(i), &unit(i as u32, 16));
        }
        index.add(Entry { origin: Origin::Passage { source: "manual.txt".into(), number: 2 }, text: "p".into(), answer: String::new(), learned_by: None }, &unit(99, 16));
        index.set_last_lsn(42);
        let bytes = index.encode();
        let back = RecallIndex::decode(&bytes, [9; 32], 16, 8, EmbeddingPrecision::F16).unwrap();
        assert_eq!(back.entries(), index.entries());
        assert_eq!(back.last_lsn(), 42);
        assert_eq!(back.embedding(5), index.embedding(5));
        // Every single-bit flip and every truncation is caught.
        for at in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(matches!(RecallIndex::decode(&bad, [9; 32], 16, 8, EmbeddingPrecision::F16), Err(IndexFileError::Damaged(_))), "flip at {at}");
            assert!(RecallIndex::decode(&bytes[..at], [9; 32], 16, 8, EmbeddingPrecision::F16).is_err(), "cut at {at}");
        }
        // Another encoder: stale, with the texts to embed again.
        match RecallIndex::decode(&bytes, [8; 32], 16, 8, EmbeddingPrecision::F16) {
            Err(IndexFileError::Stale { entries, last_lsn }) => {
                assert_eq!(entries, index.entries());
                assert_eq!(last_lsn, 42);
            }
            other => panic!("expected stale, got {:?}", other.map(|_| ())),
        }
        // A smaller capacity keeps the newest entries.
        let small = RecallIndex::decode(&bytes, [9; 32], 16, 2, EmbeddingPrecision::F16).unwrap();
        assert_eq!(small.entries(), &index.entries()[4..]);
    }
}
