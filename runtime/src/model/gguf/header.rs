//! Parsing of the GGUF header (metadata and tensor directory) with every count, length and
//! offset checked against the bytes actually present.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::{ggml_type_layout, tensor_range, GgufTensorInfo, GgufValue, ModelError};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Real files nest arrays at most one level deep; the cap keeps recursion (and the stack) bounded.
const MAX_ARRAY_DEPTH: usize = 8;

pub(super) struct Header {
    pub(super) version: u32,
    pub(super) metadata: BTreeMap<String, GgufValue>,
    pub(super) tensors: Vec<GgufTensorInfo>,
    pub(super) data_start: usize,
}

pub(super) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header, ModelError> {
    let mut r = Reader {
        bytes,
        pos: 0,
        path,
    };
    if r.take(4, "magic")? != MAGIC {
        return Err(r.corrupt("bad magic: not a GGUF file".into()));
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(ModelError::UnsupportedGgufVersion(version));
    }
    let num_tensors = r.count("tensor count", 8 + 4 + 4 + 8)?;
    let num_kv = r.count("metadata count", 8 + 4 + 1)?;

    let mut metadata = BTreeMap::new();
    for _ in 0..num_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32("metadata value type")?;
        let value = r.value(ty, 0, &key)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.corrupt(format!("duplicate metadata key {key}")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => {
            return Err(r.corrupt(format!(
                "general.alignment must be a power-of-two u32, found {other:?}"
            )))
        }
    };

    let mut tensors = Vec::with_capacity(num_tensors);
    let mut names = HashSet::with_capacity(num_tensors);
    for _ in 0..num_tensors {
        let info = r.tensor_info()?;
        if !names.insert(info.name.clone()) {
            return Err(r.corrupt(format!("duplicate tensor name {}", info.name)));
        }
        tensors.push(info);
    }

    let data_start = align_up(r.pos as u64, alignment);
    let data_start = usize::try_from(data_start)
        .ok()
        .filter(|&s| s <= bytes.len() || num_tensors == 0)
        .ok_or_else(|| r.corrupt("file ends before its tensor data section".into()))?;
    for t in &tensors {
        check_tensor(&r, t, alignment, data_start)?;
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        data_start,
    })
}

/// Checks a directory entry's shape, alignment and extent against the file.
fn check_tensor(
    r: &Reader<'_>,
    t: &GgufTensorInfo,
    alignment: u64,
    data_start: usize,
) -> Result<(), ModelError> {
    if t.dims.contains(&0) {
        return Err(r.corrupt(format!(
            "tensor {} has a zero dimension {:?}",
            t.name, t.dims
        )));
    }
    if !t.offset.is_multiple_of(alignment) {
        return Err(r.corrupt(format!(
            "tensor {} offset {} is not a multiple of the alignment {alignment}",
            t.name, t.offset
        )));
    }
    let Some((ty, block_len, _)) = ggml_type_layout(t.ggml_type) else {
        // Unknown types cannot be sized; `tensor_data` reports them as unsupported on use.
        return Ok(());
    };
    if !t.dims[0].is_multiple_of(block_len) {
        return Err(r.corrupt(format!(
            "tensor {} of type {ty} has dims {:?}: the first must be a multiple of {block_len}",
            t.name, t.dims
        )));
    }
    let len = t
        .byte_len()
        .ok_or_else(|| r.corrupt(format!("tensor {} dims {:?} overflow", t.name, t.dims)))?;
    if tensor_range(data_start, t.offset, len, r.bytes.len()).is_none() {
        return Err(r.corrupt(format!(
            "tensor {} ({ty}, dims {:?}, {len} bytes at data offset {}) extends past the end of the {}-byte file",
            t.name, t.dims, t.offset, r.bytes.len()
        )));
    }
    Ok(())
}

fn align_up(pos: u64, alignment: u64) -> u64 {
    pos.div_ceil(alignment) * alignment
}

/// Bounds-checked little-endian cursor over the header.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, what: String) -> ModelError {
        ModelError::Corrupt {
            path: self.path.to_owned(),
            what,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelError> {
        if n > self.remaining() {
            return Err(self.corrupt(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.bytes.len()
            )));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Reads a u64 count of items that each take at least `min_item_bytes`, rejecting counts the
    /// rest of the file could not possibly hold (this caps every allocation by the file size).
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, ModelError> {
        let n = self.u64(what)?;
        let max = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > max {
            return Err(self.corrupt(format!(
                "{what} {n} at offset {} is impossible: only {} bytes remain",
                self.pos - 8,
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let len = self.count(what, 1)?;
        let start = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| self.corrupt(format!("{what} at offset {start} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<GgufValue, ModelError> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => GgufValue::Bool(self.array::<1>(key)?[0] != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!("{key}: arrays nested too deeply")));
                }
                let elem_ty = self.u32(key)?;
                let min = value_min_bytes(elem_ty)
                    .ok_or_else(|| self.corrupt(format!("{key}: unknown value type {elem_ty}")))?;
                let n = self.count(key, min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, depth + 1, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => return Err(self.corrupt(format!("{key}: unknown value type {other}"))),
        })
    }

    fn tensor_info(&mut self) -> Result<GgufTensorInfo, ModelError> {
        let name = self.string("tensor name")?;
        let n_dims = self.u32("tensor rank")?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.corrupt(format!("tensor {name} has rank {n_dims} (1 to 4 allowed)")));
        }
        let dims = (0..n_dims)
            .map(|_| self.u64("tensor dimension"))
            .collect::<Result<Vec<_>, _>>()?;
        let ggml_type = self.u32("tensor type")?;
        let offset = self.u64("tensor offset")?;
        Ok(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }
}

/// Smallest encoding of one value of type `ty` (strings: the length; arrays: type + count).
fn value_min_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}
