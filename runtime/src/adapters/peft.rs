//! Reads a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`) into
//! validated f32 [`AdapterWeights`] for a given base model, or hands its validated tensors, still
//! in the file's bytes, to what builds a slot form from them ([`with_adapter`]).
//!
//! Every check happens here, once, at load time, so the engine never sees a malformed adapter:
//! unsupported PEFT features, ranks over the limit, targets outside the seven decoder-layer
//! projections, tensors of the wrong shape, type or layer, truncated files. Errors name the
//! directory, the tensor and what was expected; no input makes this panic.
//!
//! The weights file is read once into memory and converted directly (a 10 MB adapter loads in a
//! few milliseconds); its size is checked against the limit before reading.

use std::io::Read;
use std::path::Path;

use caduceus_kernels::quant::Floats;
use safetensors::SafeTensors;

use super::peft_config::{read_config, PeftConfig};
use super::weights::{AdapterTensors, AdapterWeights, PairTensors, Projection};
use crate::model::config::LlamaConfig;
use crate::model::lora::projection_dims;
use crate::model::safetensors_dir::floats;

pub use super::error::{AdapterError, TensorProblem};
pub use super::peft_config::{module_path, probe, AdapterInfo, TargetModules};

/// The config file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Limits an adapter must respect to be loaded (from the `[adapters]` config section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterLimits {
    /// Largest LoRA rank accepted (`max_lora_rank`).
    pub max_rank: usize,
    /// Largest `adapter_model.safetensors` accepted, checked before reading it.
    pub max_file_bytes: u64,
}

/// Reads, validates and converts the adapter in `dir` for the base model `base`.
///
/// For GGUF llama/mistral bases (`!base.rope_neox`) the rows of q_proj's and k_proj's `lora_B` are
/// permuted the way llama.cpp's converter permuted the base weights, so `B·A` lands on the base's
/// own row order (see [`permute_qk_rows`]).
pub fn load_adapter(
    dir: &Path,
    base: &LlamaConfig,
    limits: &AdapterLimits,
) -> Result<AdapterWeights, AdapterError> {
    with_adapter(dir, base, limits, |t| Ok(t.to_weights()))
}

/// Reads and validates the adapter in `dir` for `base` as [`load_adapter`] does, and hands its
/// tensors to `f` where they lie, in this thread's file buffer: what `f` builds from them skips
/// a widened f32 copy of every value. `f` must not load an adapter itself (the buffer is busy).
pub fn with_adapter<T, E: From<AdapterError>>(
    dir: &Path,
    base: &LlamaConfig,
    limits: &AdapterLimits,
    f: impl FnOnce(&AdapterTensors<'_>) -> Result<T, E>,
) -> Result<T, E> {
    let config_bytes = read_config(dir)?;
    let config = PeftConfig::parse(dir, &config_bytes)?;
    if config.rank > limits.max_rank {
        return Err(AdapterError::RankTooLarge {
            dir: dir.to_path_buf(),
            rank: config.rank,
            max_rank: limits.max_rank,
        }
        .into());
    }
    let wanted = config.resolve(dir, base.num_layers)?;
    FILE_BUFFER.with_borrow_mut(|buf| {
        let result = read_limited_into(dir, WEIGHTS_FILE, limits.max_file_bytes, buf)
            .and_then(|()| read_tensors(dir, buf, base, config.rank, &wanted))
            .map_err(E::from)
            .and_then(|layers| {
                f(&AdapterTensors {
                    rank: config.rank,
                    scale: config.scale(),
                    layers,
                    generation: generation(&config_bytes, buf),
                    source: dir,
                })
            });
        if buf.capacity() > KEEP_FILE_BUFFER_BYTES {
            *buf = Vec::new();
        } else {
            buf.clear();
        }
        result
    })
}

thread_local! {
    /// The weights file of the adapter this thread loads, in a buffer kept between loads: a
    /// fresh buffer is new memory the kernel zeroes and maps page by page, which was about a
    /// third of a cold Llama-3-8B adapter's read and validation (`adapter_load` bench).
    static FILE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest file buffer a thread keeps between loads (bigger adapters get a fresh one).
const KEEP_FILE_BUFFER_BYTES: usize = 512 << 20;

/// The adapter's generation: a content hash of its config and weights, so a changed adapter
/// reloaded under the same name never shares prefix-cache entries with its old self.
pub fn generation(config_bytes: &[u8], weights_bytes: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(&(config_bytes.len() as u64).to_le_bytes());
    h.update(config_bytes);
    for piece in weights_bytes.chunks(PIECE_BYTES) {
        super::gate::checkpoint();
        h.update(piece);
    }
    h.digest()
}

/// Applies llama.cpp's q/k row permutation (`convert_hf_to_gguf.py`, `LlamaModel.permute`) to a
/// row-major `[n_head * head_dim, cols]` matrix: `w.reshape(n_head, 2, head_dim / 2, cols)
/// .swapaxes(1, 2).reshape(n_head * head_dim, cols)`. Row `h*d + 2j + s` of the result is row
/// `h*d + s*d/2 + j` of the input. `None` when the shape does not split into `n_head` heads of
/// even size.
pub fn permute_qk_rows(w: &[f32], n_head: usize, cols: usize) -> Option<Vec<f32>> {
    let rows = w.len().checked_div(cols)?;
    let head_dim = rows.checked_div(n_head)?;
    if rows * cols != w.len() || head_dim * n_head != rows || head_dim % 2 != 0 {
        return None;
    }
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for j in 0..half {
            for s in 0..2 {
                let src = h * head_dim + s * half + j;
                out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// Bytes read or hashed between two loader checkpoints (a fraction of a millisecond).
const PIECE_BYTES: usize = 1 << 20;

/// Reads `dir/file` whole, refusing it (before reading) when larger than `limit` bytes.
pub(crate) fn read_limited(
    dir: &Path,
    file: &'static str,
    limit: u64,
) -> Result<Vec<u8>, AdapterError> {
    let mut bytes = Vec::new();
    read_limited_into(dir, file, limit, &mut bytes)?;
    Ok(bytes)
}

/// [`read_limited`] into `bytes` (cleared first; its memory reused).
fn read_limited_into(
    dir: &Path,
    file: &'static str,
    limit: u64,
    bytes: &mut Vec<u8>,
) -> Result<(), AdapterError> {
    bytes.clear();
    let path = dir.join(file);
    let io = |source: std::io::Error| AdapterError::Io {
        dir: dir.to_path_buf(),
        file,
        source,
    };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AdapterError::MissingFile {
                dir: dir.to_path_buf(),
                file,
            })
        }
        Err(e) => return Err(io(e)),
    };
    if !meta.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    let too_large = |size| AdapterError::TooLarge {
        dir: dir.to_path_buf(),
        file,
        size,
        limit,
    };
    if meta.len() > limit {
        return Err(too_large(meta.len()));
    }
    // The file may grow between the check and the read: never read past the limit.
    bytes.reserve(meta.len() as usize);
    let mut f = std::fs::File::open(&path)
        .map_err(io)?
        .take(limit.saturating_add(1));
    loop {
        super::gate::checkpoint();
        let n = (&mut f)
            .take(PIECE_BYTES as u64)
            .read_to_end(bytes)
            .map_err(io)?;
        if n == 0 {
            break;
        }
    }
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(())
}

/// Which half of a LoRA pair a tensor is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    A,
    B,
}

/// Parses `[base_model.model.]model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.weight]`.
fn parse_name(name: &str) -> Result<(usize, Projection, Half), String> {
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let rest = rest.strip_suffix(".weight").unwrap_or(rest);
    let (module, half) = if let Some(m) = rest.strip_suffix(".lora_A") {
        (m, Half::A)
    } else if let Some(m) = rest.strip_suffix(".lora_B") {
        (m, Half::B)
    } else {
        return Err(
            "only lora_A/lora_B weights are read (no embeddings, modules_to_save, biases or DoRA magnitudes)"
                .into(),
        );
    };
    let not_projection = || "not a q/k/v/o/gate/up/down projection of a decoder layer".to_string();
    let after = module
        .strip_prefix("model.layers.")
        .ok_or_else(not_projection)?;
    let (index, path) = after.split_once('.').ok_or_else(not_projection)?;
    let layer = index
        .parse::<usize>()
        .ok()
        .filter(|_| index.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(not_projection)?;
    let (block, proj_name) = path.split_once('.').ok_or_else(not_projection)?;
    let proj = Projection::from_module_name(proj_name).ok_or_else(not_projection)?;
    let attention = matches!(
        proj,
        Projection::Q | Projection::K | Projection::V | Projection::O
    );
    let expected_block = if attention { "self_attn" } else { "mlp" };
    if block != expected_block {
        return Err(not_projection());
    }
    Ok((layer, proj, half))
}

/// Per layer and projection: the A and B halves read so far.
type Halves<'a> = [(Option<Floats<'a>>, Option<Floats<'a>>); 7];

/// Reads every tensor, checking it against the base and the wanted (layer, projection) set, then
/// checks that every wanted pair is complete.
fn read_tensors<'a>(
    dir: &Path,
    bytes: &'a [u8],
    base: &LlamaConfig,
    rank: usize,
    wanted: &[[bool; 7]],
) -> Result<Vec<[Option<PairTensors<'a>>; 7]>, AdapterError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Safetensors {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    let tensor_err = |tensor: &str, problem| AdapterError::Tensor {
        dir: dir.to_path_buf(),
        tensor: tensor.to_owned(),
        problem,
    };
    let dims = projection_dims(base);
    let mut halves: Vec<Halves> = (0..base.num_layers).map(|_| Default::default()).collect();
    // By name, so the first problem reported does not depend on hash order.
    let mut tensors: Vec<_> = file.iter().collect();
    tensors.sort_unstable_by(|x, y| x.0.cmp(y.0));
    for (name, view) in tensors {
        super::gate::checkpoint();
        let (layer, proj, half) =
            parse_name(name).map_err(|why| tensor_err(name, TensorProblem::Unexpected(why)))?;
        if layer >= base.num_layers {
            let problem = TensorProblem::LayerOutOfRange {
                layer,
                num_layers: base.num_layers,
            };
            return Err(tensor_err(name, problem));
        }
        if !wanted[layer][proj.index()] {
            return Err(tensor_err(name, TensorProblem::NotTargeted));
        }
        let Some((_, values)) = floats(&view) else {
            let problem = TensorProblem::Dtype(format!("{:?}", view.dtype()));
            return Err(tensor_err(name, problem));
        };
        let (in_dim, out_dim) = dims[proj.index()];
        let expected = match half {
            Half::A => [rank, in_dim],
            Half::B => [out_dim, rank],
        };
        if view.shape() != expected {
            let got = view.shape().to_vec();
            return Err(tensor_err(name, TensorProblem::Shape { expected, got }));
        }
        let slot = &mut halves[layer][proj.index()];
        let dest = match half {
            Half::A => &mut slot.0,
            Half::B => &mut slot.1,
        };
        if dest.replace(values).is_some() {
            return Err(tensor_err(name, TensorProblem::Duplicate));
        }
    }
    assemble(dir, base, rank, wanted, halves)
}

/// Turns complete pairs into [`PairTensors`] (q/k rows permuted for GGUF llama bases), or names
/// the first missing tensor.
fn assemble<'a>(
    dir: &Path,
    base: &LlamaConfig,
    rank: usize,
    wanted: &[[bool; 7]],
    halves: Vec<Halves<'a>>,
) -> Result<Vec<[Option<PairTensors<'a>>; 7]>, AdapterError> {
    for p in Projection::ALL {
        let targeted = wanted.iter().any(|w| w[p.index()]);
        let present = halves
            .iter()
            .any(|h| h[p.index()].0.is_some() || h[p.index()].1.is_some());
        if targeted && !present {
            return Err(AdapterError::TargetWithoutTensors {
                dir: dir.to_path_buf(),
                module: p.module_name(),
            });
        }
    }
    let mut layers = Vec::with_capacity(halves.len());
    for (layer, layer_halves) in halves.into_iter().enumerate() {
        let mut pairs: [Option<PairTensors<'a>>; 7] = Default::default();
        for (p, (a, b)) in Projection::ALL.into_iter().zip(layer_halves) {
            if !wanted[layer][p.index()] {
                continue;
            }
            let missing = |half: &str| AdapterError::Tensor {
                dir: dir.to_path_buf(),
                tensor: format!(
                    "base_model.model.{}.lora_{half}.weight",
                    module_path(layer, p)
                ),
                problem: TensorProblem::Missing,
            };
            let a = a.ok_or_else(|| missing("A"))?;
            let b = b.ok_or_else(|| missing("B"))?;
            let n_head = match p {
                Projection::Q if !base.rope_neox => Some(base.num_heads),
                Projection::K if !base.rope_neox => Some(base.num_kv_heads),
                _ => None,
            };
            pairs[p.index()] = Some(match n_head {
                // The shape was checked against the same config, so this always fits.
                Some(n_head) => match permute_qk_rows(&b.to_vec(), n_head, rank) {
                    Some(permuted) => PairTensors::with_owned_b(a, permuted),
                    None => PairTensors::new(a, b),
                },
                None => PairTensors::new(a, b),
            });
        }
        layers.push(pairs);
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peft_tensor_names() {
        let (l, p, h) =
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.weight").unwrap();
        assert_eq!((l, p), (12, Projection::Down));
        assert!(h == Half::B);
        assert!(parse_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A").is_ok());
        for bad in [
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.lm_head.lora_A.weight",
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
            "base_model.model.model.layers.+1.mlp.up_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
        ] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn permutation_rejects_shapes_that_do_not_split() {
        assert!(permute_qk_rows(&[0.0; 12], 2, 2).is_none()); // head_dim 3 is odd
        assert!(permute_qk_rows(&[0.0; 12], 2, 0).is_none());
        assert!(permute_qk_rows(&[0.0; 12], 0, 3).is_none());
        assert_eq!(
            permute_qk_rows(&[0., 1., 2., 3.], 1, 1).unwrap(),
            vec![0., 2., 1., 3.]
        );
    }
}
