//! GGUF v2/v3 reader: metadata, tensor directory and zero-copy access to tensor bytes.
//!
//! The file is memory-mapped so that loading copies each tensor once (into its `Matrix`) instead
//! of reading the whole file into a buffer first. Every count and length in the header is checked
//! against the bytes that remain before anything is allocated, so a truncated or hostile file
//! yields `ModelError::Corrupt` rather than a panic or a huge allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::error::ModelError;

mod header;
use header::parse_header;

/// A metadata value, as typed in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The GGUF value-type id, used by the writer and for element-type checks.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// Any integer value, widened; `None` for non-integers.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (column) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Byte offset from the start of the (aligned) data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements; `None` on overflow.
    pub fn num_elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Bytes the tensor occupies; `None` for an unknown type, a first dimension that is not a
    /// whole number of blocks, or overflow.
    pub fn byte_len(&self) -> Option<u64> {
        let (_, block_len, block_bytes) = ggml_type_layout(self.ggml_type)?;
        let cols = self.dims.first().copied().unwrap_or(1);
        if !cols.is_multiple_of(block_len) {
            return None;
        }
        let rows = self
            .dims
            .iter()
            .skip(1)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        (cols / block_len)
            .checked_mul(block_bytes)?
            .checked_mul(rows)
    }
}

/// (name, elements per block, bytes per block) of every ggml tensor type, so the file layout can
/// be validated even for types the kernels cannot compute with.
pub fn ggml_type_layout(id: u32) -> Option<(&'static str, u64, u64)> {
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        _ => return None,
    })
}

/// A readable name for a ggml type id, for errors and logs.
pub fn ggml_type_name(id: u32) -> String {
    ggml_type_layout(id).map_or_else(|| format!("ggml type id {id}"), |(n, _, _)| n.to_owned())
}

enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file; tensor bytes stay in the mapping until asked for.
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    path: PathBuf,
    backing: Backing,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, ModelError> {
        let map = map_read_only(
            path,
            "expected a .gguf model file (scripts/fetch-default-model fetches the default one)",
        )?;
        Self::parse(path.to_owned(), Backing::Mapped(map))
    }

    /// Parses an in-memory GGUF image; `name` is used in error messages. Handy for tests and
    /// for files that arrive over the network.
    pub fn from_bytes(bytes: Vec<u8>, name: impl Into<PathBuf>) -> Result<GgufFile, ModelError> {
        Self::parse(name.into(), Backing::Owned(bytes))
    }

    fn parse(path: PathBuf, backing: Backing) -> Result<GgufFile, ModelError> {
        let header = parse_header(&path, backing.bytes())?;
        Ok(GgufFile {
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            path,
            backing,
            data_start: header.data_start,
        })
    }

    /// The file this was read from (or the name given to `from_bytes`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`, which prefixes the model's hyper-parameter keys.
    pub fn architecture(&self) -> Result<&str, ModelError> {
        self.get_str("general.architecture")
            .ok_or_else(|| ModelError::MissingMetadata("general.architecture".into()))
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type whose value fits in a `u64`.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// F32/F64 or any integer, converted.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        match *self.get(key)? {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            ref other => other.as_i128().map(|v| v as f32),
        }
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// An array whose elements are all strings.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        match self.get(key)? {
            GgufValue::Array(items) => items
                .iter()
                .map(|v| match v {
                    GgufValue::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    /// An array whose elements are all integers that fit in an `i64`.
    pub fn get_i64_array(&self, key: &str) -> Option<Vec<i64>> {
        match self.get(key)? {
            GgufValue::Array(items) => items
                .iter()
                .map(|v| v.as_i128().and_then(|x| i64::try_from(x).ok()))
                .collect(),
            _ => None,
        }
    }

    /// The directory entry for `name`, if the file has that tensor.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, in its ggml encoding.
    pub fn tensor_data(&self, info: &GgufTensorInfo) -> Result<&[u8], ModelError> {
        let len = info.byte_len().ok_or_else(|| ModelError::UnsupportedType {
            tensor: info.name.clone(),
            ty: ggml_type_name(info.ggml_type),
        })?;
        let bytes = self.backing.bytes();
        let range = tensor_range(self.data_start, info.offset, len, bytes.len());
        range.map(|r| &bytes[r]).ok_or_else(|| ModelError::Corrupt {
            path: self.path.clone(),
            what: format!(
                "tensor {} ({len} bytes at data offset {}) extends past the end of the file",
                info.name, info.offset
            ),
        })
    }
}

/// Memory-maps a model file read-only; `hint` goes into the not-found error.
pub(crate) fn map_read_only(path: &Path, hint: &str) -> Result<memmap2::Mmap, ModelError> {
    let file = std::fs::File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::NotFound {
                path: path.to_owned(),
                hint: hint.to_owned(),
            }
        } else {
            ModelError::Io {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    // SAFETY: the mapping is read-only and private to this process. Like every mmap-based model
    // loader (llama.cpp, candle, safetensors) we rely on model files not being truncated or
    // rewritten while they are loaded; every header is validated before tensor bytes are used.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Absolute byte range of a tensor, if it lies inside a file of `file_len` bytes.
fn tensor_range(
    data_start: usize,
    offset: u64,
    len: u64,
    file_len: usize,
) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?.checked_add(data_start)?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= file_len).then_some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use caduceus_kernels::quant::GgmlType;

    #[test]
    fn layout_table_agrees_with_the_kernels_types() {
        for id in 0..64 {
            if let Some(ty) = GgmlType::from_ggml_id(id) {
                let layout = ggml_type_layout(id).map(|(n, l, b)| (n, l as usize, b as usize));
                assert_eq!(
                    layout,
                    Some((ty.name(), ty.block_len(), ty.block_bytes())),
                    "id {id}"
                );
            }
        }
    }

    #[test]
    fn byte_len_counts_whole_blocks_and_rejects_partial_ones() {
        let info = |dims: Vec<u64>, ggml_type| GgufTensorInfo {
            name: "t".into(),
            dims,
            ggml_type,
            offset: 0,
        };
        assert_eq!(info(vec![64, 3], 3).byte_len(), Some(2 * 20 * 3));
        assert_eq!(info(vec![256, 2, 2], 14).byte_len(), Some(210 * 4));
        assert_eq!(info(vec![7], 0).byte_len(), Some(28));
        assert_eq!(info(vec![48], 8).byte_len(), None);
        assert_eq!(info(vec![1 << 40, 1 << 40], 0).byte_len(), None);
        assert_eq!(info(vec![4], 99).byte_len(), None);
    }
}
