//! Segment files: the header, the block framing of records, and the scan
//! that reads them back and finds damage.
//!
//! Principal items: [`SegmentHeader`], [`Framer`], [`scan`], [`FrameScan`],
//! [`Damage`], [`Tail`], [`segment_file_name`].
//!
//! The framing follows LevelDB's log format
//! (<https://github.com/google/leveldb/blob/main/doc/log_format.md>): the file
//! is cut into 32 KiB blocks, a record is written as one or more chunks that
//! never cross a block boundary, and a chunk's checksum covers its type and
//! data. A reader that meets a bad chunk gives up only on the rest of that
//! block and resynchronises at the next one. The byte layout is in the
//! [`super`] module documentation.
//!
//! Invariants: [`scan`] never panics, whatever the bytes; every byte after
//! the header is either part of a complete record, chunk padding, reported
//! [`Damage`], or the [`Tail`].

use std::ops::Range;

use crate::ids::DeviceId;

/// Magic bytes at offset 0 of every segment.
pub const MAGIC: [u8; 8] = *b"NOCTJRNL";
/// Version of the segment format (header and framing).
pub const FORMAT_VERSION: u16 = 1;
/// Length of the segment header, bytes.
pub const HEADER_LEN: usize = 64;
/// Block size of the framing, bytes (LevelDB's `kBlockSize`).
pub const BLOCK: usize = 32 * 1024;
/// Chunk header: masked CRC32C (4), length (2), type (1).
pub const CHUNK_HEADER: usize = 7;

// The relations the framing relies on (TigerBeetle's compile-time assertions):
// the header fits the first block with room for a chunk, a chunk's length fits
// its 16-bit field, and the largest record can be framed.
const _: () = assert!(HEADER_LEN + CHUNK_HEADER < BLOCK);
const _: () = assert!(BLOCK - CHUNK_HEADER <= u16::MAX as usize);
const _: () = assert!(HEADER_LEN == 8 + 2 + 2 + 16 + 8 + 8 + 8 + 8 + 4);
const _: () = assert!(super::record::RECORD_MAX > super::record::RECORD_PREFIX);

/// Chunk types (LevelDB's `RecordType`).
mod chunk {
    pub const FULL: u8 = 1;
    pub const FIRST: u8 = 2;
    pub const MIDDLE: u8 = 3;
    pub const LAST: u8 = 4;
}

/// LevelDB's CRC mask: rotate right by 15 bits and add a constant, so that a
/// checksum over data that itself holds checksums stays strong.
const MASK_DELTA: u32 = 0xa282_ead8;

/// Masked CRC32C (Castagnoli) of `data`.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// File name of segment `seq`: 20 decimal digits and `.seg`, so names sort
/// in sequence order.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

/// The sequence number in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The first [`HEADER_LEN`] bytes of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The device that wrote it.
    pub device: DeviceId,
    /// Segment sequence number, from 1, one more for every new segment of the device.
    pub seq: u64,
    /// LSN the segment's first record has (or will have).
    pub first_lsn: u64,
    /// When the segment was created, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

impl SegmentHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        out[12..28].copy_from_slice(&self.device.0);
        out[28..36].copy_from_slice(&self.seq.to_le_bytes());
        out[36..44].copy_from_slice(&self.first_lsn.to_le_bytes());
        out[44..52].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = masked_crc(&out[..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and checks a header.
    ///
    /// # Errors
    /// [`HeaderError`] naming what is wrong: too short, bad magic, checksum
    /// mismatch, unsupported version or length.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, HeaderError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(HeaderError::Short(bytes.len()));
        };
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
        if h[0..8] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let crc = u32::from_le_bytes(h[60..64].try_into().expect("4 bytes"));
        if crc != masked_crc(&h[..60]) {
            return Err(HeaderError::Checksum);
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        let len = u16::from_le_bytes([h[10], h[11]]);
        if usize::from(len) != HEADER_LEN {
            return Err(HeaderError::Length(len));
        }
        Ok(SegmentHeader {
            device: DeviceId(h[12..28].try_into().expect("16 bytes")),
            seq: u64_at(28),
            first_lsn: u64_at(36),
            created_ms: u64_at(44),
        })
    }
}

/// Upper bound of the bytes a `payload_len`-byte record adds to a segment,
/// chunk headers and block padding included.
pub fn max_framed_len(payload_len: usize) -> usize {
    payload_len + CHUNK_HEADER * (payload_len / (BLOCK - CHUNK_HEADER) + 2) + CHUNK_HEADER - 1
}

/// Frames records as chunks at a running file offset.
#[derive(Clone, Copy, Debug)]
pub struct Framer {
    /// File offset where the next byte goes.
    pub offset: u64,
}

impl Framer {
    /// Appends the chunks (and any block padding) of `payload` to `out` and
    /// advances the offset by the bytes appended.
    pub fn frame(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let mut left = payload;
        let mut first = true;
        loop {
            let room = BLOCK - (self.offset % BLOCK as u64) as usize;
            if room < CHUNK_HEADER {
                out.extend(std::iter::repeat_n(0u8, room));
                self.offset += room as u64;
                continue;
            }
            let n = left.len().min(room - CHUNK_HEADER);
            let last = n == left.len();
            let kind = match (first, last) {
                (true, true) => chunk::FULL,
                (true, false) => chunk::FIRST,
                (false, false) => chunk::MIDDLE,
                (false, true) => chunk::LAST,
            };
            let start = out.len();
            out.extend([0, 0, 0, 0]);
            out.extend((n as u16).to_le_bytes());
            out.push(kind);
            out.extend(&left[..n]);
            let crc = masked_crc(&out[start + 6..]);
            out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
            self.offset += (CHUNK_HEADER + n) as u64;
            left = &left[n..];
            first = false;
            if last {
                return;
            }
        }
    }
}

/// Why a segment header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("{0} bytes, shorter than the {HEADER_LEN}-byte segment header")]
    Short(usize),
    /// The magic at offset 0 is not `NOCTJRNL`.
    #[error("not a journal segment (bad magic at offset 0)")]
    Magic,
    /// The header's CRC does not match bytes 0–59.
    #[error("segment header checksum mismatch (bytes 0-63)")]
    Checksum,
    /// A format version this build does not read.
    #[error("segment format version {0}; this build reads version {FORMAT_VERSION}")]
    Version(u16),
    /// A header length other than [`HEADER_LEN`].
    #[error("segment header length {0}; expected {HEADER_LEN}")]
    Length(u16),
}

/// What was found first in a damaged region.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DamageReason {
    /// The file ends inside a chunk header (an interrupted append).
    #[error("chunk header cut short")]
    HeaderCut,
    /// The file ends inside a chunk's data (an interrupted append).
    #[error("chunk cut short")]
    ChunkCut,
    /// Only zeros up to the end (space allocated but never written).
    #[error("zero-filled to the end")]
    ZeroFilled,
    /// Zeros where a chunk should start, with data after them.
    #[error("zero bytes where a chunk should start")]
    ZeroChunk,
    /// A chunk length that runs past its block.
    #[error("chunk length runs past its block")]
    LengthPastBlock,
    /// A chunk whose CRC does not match.
    #[error("chunk checksum mismatch")]
    Checksum,
    /// A FIRST or MIDDLE fragment whose record never ended.
    #[error("record missing its last fragment")]
    MissingLastFragment,
    /// A MIDDLE or LAST fragment whose FIRST was lost.
    #[error("fragment without its first chunk")]
    FragmentWithoutFirst,
    /// A chunk type other than FULL, FIRST, MIDDLE, LAST.
    #[error("unknown chunk type")]
    UnknownChunkType,
    /// A complete record whose LSN does not follow the one before.
    #[error("LSN {lsn} does not follow LSN {after}")]
    LsnOrder {
        /// The record's LSN.
        lsn: u64,
        /// The LSN before it.
        after: u64,
    },
    /// A complete record that does not decode.
    #[error(transparent)]
    Record(#[from] super::record::RecordError),
}

impl DamageReason {
    /// Damage an interrupted append explains (see [`Tail`]) when it reaches
    /// the end of the newest segment.
    pub fn is_interrupted_append(&self) -> bool {
        matches!(self, DamageReason::HeaderCut | DamageReason::ChunkCut | DamageReason::ZeroFilled)
    }
}

/// A damaged region of a segment: skipped, counted, reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// File offsets of the bytes skipped.
    pub range: Range<u64>,
    /// What was found first.
    pub reason: DamageReason,
}

/// Bytes after the last complete record that an interrupted append
/// explains: a record cut short by a crash (pending fragments included), or
/// a zero-filled end. Other damage at the end of a file is [`Damage`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tail {
    /// File offsets.
    pub range: Range<u64>,
    /// True when every byte is zero (space a file system allocated but never wrote).
    pub zero_filled: bool,
}

/// What [`scan`] found after the header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrameScan {
    /// End of the last complete record (the header's end when there is none).
    pub valid_end: u64,
    /// Damaged regions, in file order; the last may reach the end of the file.
    pub damage: Vec<Damage>,
    /// Incomplete bytes after the last complete record.
    pub tail: Option<Tail>,
}

/// Walks the chunks of a whole segment file (`bytes` includes the header,
/// which is not checked here) and calls `visit(offset, payload)` for every
/// complete record in order.
pub fn scan(bytes: &[u8], visit: &mut dyn FnMut(u64, &[u8])) -> FrameScan {
    let mut out = FrameScan { valid_end: HEADER_LEN.min(bytes.len()) as u64, ..FrameScan::default() };
    let mut records = Assembler::default();
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        match next_chunk(bytes, pos) {
            Step::Padding { next } => pos = next,
            Step::Damage { reason, resume } => {
                records.mark(pos, reason);
                match resume {
                    Some(next) => pos = next,
                    None => break,
                }
            }
            Step::Chunk { kind, data, end } => {
                if let Some((start, assembled)) = records.push(kind, pos, data) {
                    if let Some((from, reason)) = records.open.take() {
                        out.damage.push(Damage { range: from as u64..start as u64, reason });
                    }
                    visit(start as u64, assembled.as_deref().unwrap_or(data));
                    out.valid_end = end as u64;
                }
                pos = end;
            }
        }
    }
    let len = bytes.len() as u64;
    // Damage that reaches the end of the file is a tail only when it is what
    // an interrupted append leaves: a cut chunk or zeros. Anything else
    // (a checksum mismatch, say) is corruption, even at the end.
    if let Some((from, reason)) = records.open.filter(|(_, r)| !r.is_interrupted_append()) {
        out.damage.push(Damage { range: from as u64..len, reason });
        return out;
    }
    if out.valid_end < len {
        let rest = &bytes[out.valid_end as usize..];
        out.tail = Some(Tail { range: out.valid_end..len, zero_filled: rest.iter().all(|&b| b == 0) });
    }
    out
}

/// What [`next_chunk`] found at a position.
enum Step<'a> {
    /// Fewer than a chunk header's bytes left in the block: zero padding.
    Padding {
        /// The next block's start.
        next: usize,
    },
    /// A chunk with a valid checksum.
    Chunk {
        /// Its type byte (FULL, FIRST, MIDDLE, LAST or unknown).
        kind: u8,
        /// Its data.
        data: &'a [u8],
        /// The offset after it.
        end: usize,
    },
    /// Damage; reading resumes at `resume` (the next block), or stops (the
    /// file ends inside it).
    Damage {
        /// What was found.
        reason: DamageReason,
        /// Where reading goes on, if anywhere.
        resume: Option<usize>,
    },
}

/// Reads the chunk at `pos` (`pos < bytes.len()`), checking its header,
/// length and checksum (LevelDB's `log::Reader::ReadPhysicalRecord`).
fn next_chunk(bytes: &[u8], pos: usize) -> Step<'_> {
    let room = BLOCK - pos % BLOCK;
    let next_block = pos + room;
    if room < CHUNK_HEADER {
        return Step::Padding { next: next_block };
    }
    let Some(h) = bytes.get(pos..pos + CHUNK_HEADER) else {
        return Step::Damage { reason: DamageReason::HeaderCut, resume: None };
    };
    let crc = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let n = usize::from(u16::from_le_bytes([h[4], h[5]]));
    let kind = h[6];
    if crc == 0 && n == 0 && kind == 0 {
        if bytes[pos..].iter().all(|&b| b == 0) {
            return Step::Damage { reason: DamageReason::ZeroFilled, resume: None };
        }
        return Step::Damage { reason: DamageReason::ZeroChunk, resume: Some(next_block) };
    }
    if CHUNK_HEADER + n > room {
        return Step::Damage { reason: DamageReason::LengthPastBlock, resume: Some(next_block) };
    }
    let end = pos + CHUNK_HEADER + n;
    if end > bytes.len() {
        return Step::Damage { reason: DamageReason::ChunkCut, resume: None };
    }
    if masked_crc(&bytes[pos + 6..end]) != crc {
        return Step::Damage { reason: DamageReason::Checksum, resume: Some(next_block) };
    }
    if !matches!(kind, chunk::FULL | chunk::FIRST | chunk::MIDDLE | chunk::LAST) {
        return Step::Damage { reason: DamageReason::UnknownChunkType, resume: Some(next_block) };
    }
    Step::Chunk { kind, data: &bytes[pos + CHUNK_HEADER..end], end }
}

/// Joins fragments into records and keeps the damaged region being read.
#[derive(Default)]
struct Assembler {
    /// A record's FIRST (and MIDDLE) fragments: its start and bytes so far.
    pending: Option<(usize, Vec<u8>)>,
    /// Where the damaged region being read started, and why.
    open: Option<(usize, DamageReason)>,
}

impl Assembler {
    /// Starts a damaged region at `at` (or extends it back to an abandoned
    /// fragment); a region already open keeps its first reason.
    fn mark(&mut self, at: usize, reason: DamageReason) {
        let at = self.pending.take().map_or(at, |(start, _)| start.min(at));
        if self.open.is_none() {
            self.open = Some((at, reason));
        }
    }

    /// Takes a valid chunk at `pos`; returns a completed record's start and,
    /// for a fragmented one, its assembled bytes (`None`: the chunk is it).
    fn push(&mut self, kind: u8, pos: usize, data: &[u8]) -> Option<(usize, Option<Vec<u8>>)> {
        match kind {
            chunk::FULL | chunk::FIRST => {
                if let Some((start, _)) = self.pending {
                    self.mark(start, DamageReason::MissingLastFragment);
                }
                if kind == chunk::FULL {
                    return Some((pos, None));
                }
                self.pending = Some((pos, data.to_vec()));
                None
            }
            _ => match self.pending.as_mut() {
                Some((start, buf)) => {
                    buf.extend_from_slice(data);
                    if kind != chunk::LAST {
                        return None;
                    }
                    let (start, buf) = (*start, std::mem::take(buf));
                    self.pending = None;
                    Some((start, Some(buf)))
                }
                None => {
                    self.mark(pos, DamageReason::FragmentWithoutFirst);
                    None
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
        let header = SegmentHeader { device: DeviceId([1; 16]), seq: 1, first_lsn: 1, created_ms: 0 };
        let mut bytes = header.encode().to_vec();
        let mut framer = Framer { offset: HEADER_LEN as u64 };
        let mut offsets = Vec::new();
        for r in records {
            offsets.push(framer.offset);
            framer.frame(r, &mut bytes);
        }
        assert_eq!(framer.offset, bytes.len() as u64);
        (bytes, offsets)
    }

    fn read(bytes: &[u8]) -> (Vec<Vec<u8>>, FrameScan) {
        let mut got = Vec::new();
        let scan = scan(bytes, &mut |_, p| got.push(p.to_vec()));
        (got, scan)
    }

    #[test]
    fn records_spanning_blocks_round_trip() {
        let records: Vec<Vec<u8>> = (0..40).map(|i| vec![i as u8; 1 + i * 3000]).collect();
        let (bytes, _) = segment(&records);
        assert!(bytes.len() > 20 * BLOCK);
        let (got, scan) = read(&bytes);
        assert_eq!(got, records);
        assert_eq!(scan, FrameScan { valid_end: bytes.len() as u64, damage: vec![], tail: None });
    }

    #[test]
    fn header_round_trips_and_rejects_flips() {
        let header = SegmentHeader { device: DeviceId([9; 16]), seq: 42, first_lsn: 1000, created_ms: 7 };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(header));
        for i in 0..HEADER_LEN {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(SegmentHeader::decode(&bad).is_err(), "flip at byte {i} accepted");
        }
        assert_eq!(SegmentHeader::decode(&bytes[..10]), Err(HeaderError::Short(10)));
    }

    #[test]
    fn a_bad_chunk_loses_only_the_rest_of_its_block() {
        let records: Vec<Vec<u8>> = (0..200).map(|i| vec![i as u8; 1000]).collect();
        let (mut bytes, offsets) = segment(&records);
        // Flip a payload byte of record 10 (block 0).
        bytes[offsets[10] as usize + CHUNK_HEADER + 5] ^= 1;
        let (got, scan) = read(&bytes);
        let lost = records.len() - got.len();
        assert!((1..=BLOCK / 1000 + 1).contains(&lost), "lost {lost}");
        assert_eq!(got.last(), records.last());
        assert_eq!(scan.damage.len(), 1);
        assert_eq!(scan.damage[0].range.start, offsets[10]);
        assert_eq!(scan.damage[0].reason, DamageReason::Checksum);
        assert_eq!(scan.tail, None);
    }

    #[test]
    fn file_names_sort_by_sequence() {
        assert_eq!(segment_file_name(12), "00000000000000000012.seg");
        assert_eq!(parse_segment_file_name(&segment_file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_segment_file_name("12.seg"), None);
        assert_eq!(parse_segment_file_name("00000000000000000012.seg.tmp"), None);
    }
}
