//! A reader for GGUF model files (llama.cpp's format).
//!
//! Principal types: [`GgufFile`] (a mapped, parsed file), [`MetaValue`],
//! [`GgmlType`], [`GgufTensor`]. Errors are [`FileError`]s, aliased [`GgufError`].
//!
//! Format (GGUF v2/v3, little-endian, as specified in ggml's `docs/gguf.md`):
//! magic `GGUF`, u32 version, u64 tensor count, u64 metadata count; metadata
//! entries (string key, u32 value type, value); tensor infos (string name,
//! u32 dimension count, u64 dimensions innermost first, u32 ggml type, u64
//! offset into the data section); padding to `general.alignment` (default 32);
//! the data section. Strings are a u64 length and UTF-8 bytes.
//!
//! Supported tensor types: F32, F16, Q4_0, Q4_1, Q8_0 (block layouts from
//! ggml's `ggml-common.h`: 32 values per block). Any other type is rejected
//! when the file is opened, naming the tensor and the type.
//!
//! Invariants: every length, count and offset is bounds-checked against the
//! file before use, so a malformed file yields an error, never a panic or an
//! allocation larger than the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
pub use nocturne::file_error::FileError as GgufError;

/// The ggml tensor types this reader dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// Blocks of 32: f16 scale `d`, 16 bytes of 4-bit `q`; `x = (q - 8) × d`.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit `q`; `x = q × d + m`.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 32 int8 `q`; `x = q × d`.
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> Result<GgmlType, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            other => {
                const NAMES: [&str; 31] = [
                    "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
                    "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
                    "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16",
                ];
                let name = NAMES.get(other as usize).copied().unwrap_or("unknown");
                return Err(format!(
                    "ggml type {name} ({other}) is not supported (supported: F32, F16, Q4_0, Q4_1, Q8_0)"
                ));
            }
        })
    }

    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    /// Any unsigned or signed integer type, widened.
    Int(i128),
    /// f32 or f64, widened.
    Float(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<MetaValue>),
}

/// One tensor's description.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<usize>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Absolute byte range of the data in the file.
    pub range: std::ops::Range<usize>,
}

impl GgufTensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// GGUF format version.
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensors in file order.
    pub tensors: Vec<GgufTensor>,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            format!("truncated: {what} at byte {} needs {n} bytes, file has {}", self.pos, self.bytes.len())
        })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("take returns N bytes"))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A count of items that each take at least `min_item_bytes`; rejects
    /// counts the rest of the file cannot hold before anything is allocated.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, String> {
        let at = self.pos;
        let n = self.u64(what)?;
        let room = (self.bytes.len() - self.pos) / min_item_bytes.max(1);
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= room)
            .ok_or_else(|| format!("{what} at byte {at} is {n}, more than the file can hold"))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(what, 1)?;
        let at = self.pos;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }
    fn value(&mut self, value_type: u32, key: &str, depth: u32) -> Result<MetaValue, String> {
        let what = format!("value of `{key}`");
        Ok(match value_type {
            0 => MetaValue::Int(self.array::<1>(&what)?[0].into()),
            1 => MetaValue::Int((self.array::<1>(&what)?[0] as i8).into()),
            2 => MetaValue::Int(u16::from_le_bytes(self.array(&what)?).into()),
            3 => MetaValue::Int(i16::from_le_bytes(self.array(&what)?).into()),
            4 => MetaValue::Int(self.u32(&what)?.into()),
            5 => MetaValue::Int(i32::from_le_bytes(self.array(&what)?).into()),
            6 => MetaValue::Float(f32::from_le_bytes(self.array(&what)?).into()),
            7 => MetaValue::Bool(self.array::<1>(&what)?[0] != 0),
            8 => MetaValue::Str(self.string(&what)?),
            9 if depth == 0 => {
                let item_type = self.u32(&what)?;
                let min_item_bytes = match item_type {
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    _ => 1,
                };
                let n = self.count(&what, min_item_bytes)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, key, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Int(self.u64(&what)?.into()),
            11 => MetaValue::Int(i64::from_le_bytes(self.array(&what)?).into()),
            12 => MetaValue::Float(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(format!("metadata `{key}` has unsupported value type {other}")),
        })
    }
}

impl GgufFile {
    /// Maps and parses `path`.
    ///
    /// # Errors
    /// [`GgufError`] naming the file: unreadable, bad magic or version,
    /// truncated header, a tensor of an unsupported type, a tensor whose data
    /// lies outside the file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let file = nocturne::file_read::open_regular(path)?;
        // SAFETY: read-only mapping of a file the converter does not modify;
        // all reads are bounds-checked by the parser.
        let map = unsafe { Mmap::map(&file) }.map_err(GgufError::io(path))?;
        let (version, metadata, tensors) = parse(&map).map_err(|problem| GgufError::invalid(path, problem))?;
        Ok(GgufFile { path: path.into(), map, version, metadata, tensors })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn invalid(&self, problem: String) -> GgufError {
        GgufError::invalid(&self.path, problem)
    }

    /// The integer metadata value `key`.
    ///
    /// # Errors
    /// When the key is missing or not a non-negative integer.
    pub fn usize(&self, key: &str) -> Result<usize, GgufError> {
        match self.metadata.get(key) {
            Some(MetaValue::Int(v)) => usize::try_from(*v).map_err(|_| self.invalid(format!("`{key}` = {v} is out of range"))),
            Some(other) => Err(self.invalid(format!("`{key}` is {other:?}, expected an integer"))),
            None => Err(self.invalid(format!("metadata `{key}` is missing"))),
        }
    }

    /// The float metadata value `key`.
    ///
    /// # Errors
    /// When the key is missing or not a number.
    pub fn f64(&self, key: &str) -> Result<f64, GgufError> {
        match self.metadata.get(key) {
            Some(MetaValue::Float(v)) => Ok(*v),
            Some(MetaValue::Int(v)) => Ok(*v as f64),
            Some(other) => Err(self.invalid(format!("`{key}` is {other:?}, expected a number"))),
            None => Err(self.invalid(format!("metadata `{key}` is missing"))),
        }
    }

    /// The string metadata value `key`.
    ///
    /// # Errors
    /// When the key is missing or not a string.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        match self.metadata.get(key) {
            Some(MetaValue::Str(s)) => Ok(s),
            Some(other) => Err(self.invalid(format!("`{key}` is {other:?}, expected a string"))),
            None => Err(self.invalid(format!("metadata `{key}` is missing"))),
        }
    }

    /// The array metadata value `key`.
    ///
    /// # Errors
    /// When the key is missing or not an array.
    pub fn array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        match self.metadata.get(key) {
            Some(MetaValue::Array(items)) => Ok(items),
            Some(_) => Err(self.invalid(format!("`{key}` is not an array"))),
            None => Err(self.invalid(format!("metadata `{key}` is missing"))),
        }
    }

    /// The tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantizes tensor `name` to f32, in ggml element order (row-major with
    /// `dims[0]` innermost).
    ///
    /// # Errors
    /// When the tensor is missing.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let tensor = self.tensor(name).ok_or_else(|| self.invalid(format!("tensor `{name}` is missing")))?;
        Ok(dequantize(tensor.ggml_type, &self.map[tensor.range.clone()], tensor.len()))
    }
}

type Parsed = (u32, BTreeMap<String, MetaValue>, Vec<GgufTensor>);

fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(format!("not a GGUF file: magic is {magic:?}, expected \"GGUF\""));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    // A tensor info is at least 8 (name) + 4 + 4 + 8 bytes; a metadata entry at least 8 + 4 + 1.
    let tensor_count = c.count("tensor count", 24)?;
    let kv_count = c.count("metadata count", 13)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = c.string("metadata key")?;
        let value_type = c.u32("metadata value type")?;
        let value = c.value(value_type, &key, 0)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(MetaValue::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() && *a <= 1 << 20 => *a as usize,
        Some(other) => return Err(format!("general.alignment is {other:?}, expected a power of two")),
    };
    let mut infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = c.string("tensor name")?;
        let n_dims = c.u32("dimension count")? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!("tensor `{name}` has {n_dims} dimensions, expected 1 to 4"));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64("dimension")?;
            dims.push(usize::try_from(d).map_err(|_| format!("tensor `{name}` dimension {d} is too large"))?);
        }
        let ggml_type = GgmlType::from_id(c.u32("tensor type")?).map_err(|e| format!("tensor `{name}`: {e}"))?;
        let offset = c.u64("tensor offset")?;
        infos.push((name, dims, ggml_type, offset));
    }
    let data_start = c.pos.div_ceil(alignment) * alignment;
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, dims, ggml_type, offset) in infos {
        let (block_len, block_bytes) = ggml_type.block();
        let elements = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let bytes_len = elements
            .filter(|n| n % block_len == 0)
            .and_then(|n| (n / block_len).checked_mul(block_bytes))
            .ok_or_else(|| format!("tensor `{name}` has dimensions {dims:?} that do not fit {ggml_type:?} blocks"))?;
        let range = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start))
            .and_then(|start| Some(start..start.checked_add(bytes_len)?))
            .filter(|r| r.end <= bytes.len())
            .ok_or_else(|| {
                format!("tensor `{name}` data (offset {offset}, {bytes_len} bytes) lies past the end of the file ({} bytes)", bytes.len())
            })?;
        tensors.push(GgufTensor { name, dims, ggml_type, range });
    }
    Ok((version, metadata, tensors))
}

/// Dequantizes `n` elements of `ggml_type` stored in `data` (whose length the
/// parser has checked) to f32.
pub fn dequantize(ggml_type: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ggml_type {
        GgmlType::F32 => out.extend(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(data.chunks_exact(2).map(|b| f16_at(b, 0))),
        GgmlType::Q8_0 => {
            for block in data.chunks_exact(34) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (min_bytes, q_at) = if ggml_type == GgmlType::Q4_0 { (0, 2) } else { (2, 4) };
            for block in data.chunks_exact(q_at + 16) {
                let d = f16_at(block, 0);
                let (offset, m) = if min_bytes == 0 { (-8.0, 0.0) } else { (0.0, f16_at(block, 2)) };
                let qs = &block[q_at..];
                // Low nibbles hold elements 0..16, high nibbles 16..32.
                out.extend(qs.iter().map(|&q| (f32::from(q & 0x0f) + offset) * d + m));
                out.extend(qs.iter().map(|&q| (f32::from(q >> 4) + offset) * d + m));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_dequantizes_nibbles_in_ggml_order() {
        let mut block = Vec::new();
        block.extend(f16::from_f32(0.5).to_le_bytes());
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let x = dequantize(GgmlType::Q4_1, &block, 32);
        assert_eq!(x[0], -1.0);
        assert_eq!(x[3], 3.0 * 0.5 - 1.0);
        assert_eq!(x[16], 15.0 * 0.5 - 1.0);
        assert_eq!(x[31], -1.0);
    }

    #[test]
    fn q4_0_and_q8_0_blocks_dequantize() {
        let mut q4 = f16::from_f32(2.0).to_le_bytes().to_vec();
        q4.extend([0x8f_u8; 16]);
        let x = dequantize(GgmlType::Q4_0, &q4, 32);
        assert_eq!((x[0], x[16]), ((15.0 - 8.0) * 2.0, 0.0));
        let mut q8 = f16::from_f32(0.25).to_le_bytes().to_vec();
        q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let x = dequantize(GgmlType::Q8_0, &q8, 32);
        assert_eq!((x[0], x[31]), (-4.0, 3.75));
    }
}
