//! Model tensors under one naming scheme (GGUF's), whichever format they came from, so the
//! forward pass is built by one code path that checks every shape.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use caduceus_kernels::quant::{GgmlType, Matrix};

use super::error::ModelError;
use super::gguf::{ggml_type_name, GgufFile, GgufTensorInfo};
use super::safetensors_dir::{read_shard, shard_paths, HfTensor};

/// A 2-D weight (kept in its storage type) or a 1-D parameter (decoded to f32).
#[derive(Clone, Debug)]
enum Tensor {
    Matrix(Matrix),
    Vector(Vec<f32>),
}

impl Tensor {
    fn shape(&self) -> Vec<usize> {
        match self {
            Tensor::Matrix(m) => vec![m.rows(), m.cols()],
            Tensor::Vector(v) => vec![v.len()],
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    tensor: Tensor,
    /// On-disk type name ("Q4_1", "F32", "BF16"...), for the load log.
    source_type: String,
}

/// Canonical-named tensors; the model takes them out one by one, so leftovers are visible.
#[derive(Clone, Debug, Default)]
pub struct TensorStore {
    tensors: HashMap<String, Entry>,
}

impl TensorStore {
    /// Copies every tensor out of a GGUF file: 2-D and higher become a `Matrix` (rows = product
    /// of `dims[1..]`, cols = `dims[0]`) in the file's type; 1-D tensors are decoded to f32.
    pub fn from_gguf(f: &GgufFile) -> Result<TensorStore, ModelError> {
        let mut store = TensorStore::default();
        for info in &f.tensors {
            let ty = GgmlType::from_ggml_id(info.ggml_type).ok_or_else(|| {
                ModelError::UnsupportedType {
                    tensor: info.name.clone(),
                    ty: ggml_type_name(info.ggml_type),
                }
            })?;
            let bytes = f.tensor_data(info)?;
            let tensor = gguf_tensor(f, info, ty, bytes)?;
            store.insert(info.name.clone(), tensor, ty.name().to_owned());
        }
        Ok(store)
    }

    /// Reads an HF model directory's safetensors (single file or sharded), converting weights to
    /// F32 and renaming them to the GGUF scheme.
    pub fn from_hf_dir(dir: &Path) -> Result<TensorStore, ModelError> {
        let mut store = TensorStore::default();
        for shard in shard_paths(dir)? {
            read_shard(&shard, |t: HfTensor| {
                if store.tensors.contains_key(&t.name) {
                    return Err(ModelError::Corrupt {
                        path: shard.clone(),
                        what: format!("tensor {} appears twice in the model", t.name),
                    });
                }
                let tensor = match *t.shape.as_slice() {
                    [len] if len == t.values.len() => Tensor::Vector(t.values),
                    [rows, cols] if rows.checked_mul(cols) == Some(t.values.len()) => {
                        Tensor::Matrix(Matrix::from_f32(rows, cols, &t.values))
                    }
                    _ => {
                        return Err(ModelError::Corrupt {
                            path: shard.clone(),
                            what: format!(
                                "tensor {} has shape {:?}; only 1-D and 2-D tensors are used",
                                t.name, t.shape
                            ),
                        })
                    }
                };
                store.insert(t.name, tensor, t.source_type.to_owned());
                Ok(())
            })?;
        }
        Ok(store)
    }

    /// Adds a matrix (tests, adapters and merged weights build stores by hand).
    pub fn insert_matrix(&mut self, name: impl Into<String>, m: Matrix) {
        let ty = m.ty().name().to_owned();
        self.insert(name.into(), Tensor::Matrix(m), ty);
    }

    /// Adds a 1-D f32 parameter.
    pub fn insert_vector(&mut self, name: impl Into<String>, v: Vec<f32>) {
        self.insert(name.into(), Tensor::Vector(v), "F32".to_owned());
    }

    fn insert(&mut self, name: String, tensor: Tensor, source_type: String) {
        self.tensors.insert(
            name,
            Entry {
                tensor,
                source_type,
            },
        );
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes a `rows x cols` matrix.
    pub fn take_matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Matrix, ModelError> {
        self.take_optional_matrix(name, rows, cols)?
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))
    }

    /// Removes a `rows x cols` matrix if present; a present tensor of another shape is an error.
    pub fn take_optional_matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Option<Matrix>, ModelError> {
        match self.tensors.remove(name).map(|e| e.tensor) {
            None => Ok(None),
            Some(Tensor::Matrix(m)) if m.rows() == rows && m.cols() == cols => Ok(Some(m)),
            Some(other) => Err(shape_error(name, vec![rows, cols], &other)),
        }
    }

    /// Removes a 1-D parameter of `len` values.
    pub fn take_vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        self.take_optional_vector(name, len)?
            .ok_or_else(|| ModelError::MissingTensor(name.to_owned()))
    }

    /// Removes a 1-D parameter if present; a present tensor of another shape is an error.
    pub fn take_optional_vector(
        &mut self,
        name: &str,
        len: usize,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        match self.tensors.remove(name).map(|e| e.tensor) {
            None => Ok(None),
            Some(Tensor::Vector(v)) if v.len() == len => Ok(Some(v)),
            Some(other) => Err(shape_error(name, vec![len], &other)),
        }
    }

    /// Names still in the store, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    /// Summarises (on-disk type name -> tensor count) for the load log line.
    pub fn type_summary(&self) -> BTreeMap<String, usize> {
        let mut summary = BTreeMap::new();
        for e in self.tensors.values() {
            *summary.entry(e.source_type.clone()).or_insert(0) += 1;
        }
        summary
    }
}

fn shape_error(name: &str, expected: Vec<usize>, found: &Tensor) -> ModelError {
    ModelError::Shape {
        tensor: name.to_owned(),
        expected,
        actual: found.shape(),
    }
}

/// One GGUF tensor as a `Matrix` (rank >= 2) or an f32 vector (rank 1).
fn gguf_tensor(
    f: &GgufFile,
    info: &GgufTensorInfo,
    ty: GgmlType,
    bytes: &[u8],
) -> Result<Tensor, ModelError> {
    let corrupt = |what: String| ModelError::Corrupt {
        path: f.path().to_owned(),
        what: format!("tensor {}: {what}", info.name),
    };
    let to_usize =
        |d: u64| usize::try_from(d).map_err(|_| corrupt(format!("dimension {d} too large")));
    let cols = to_usize(info.dims.first().copied().unwrap_or(1))?;
    let rows = to_usize(info.dims.iter().skip(1).product())?;
    if info.dims.len() == 1 {
        let values = Matrix::new(ty, 1, cols, bytes.to_vec())
            .map_err(|e| corrupt(e.to_string()))?
            .to_f32();
        return Ok(Tensor::Vector(values));
    }
    let m = Matrix::new(ty, rows, cols, bytes.to_vec()).map_err(|e| corrupt(e.to_string()))?;
    Ok(Tensor::Matrix(m))
}
