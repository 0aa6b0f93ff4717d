//! Synthetic doctor avatars: deterministic random PEFT LoRA adapters for benchmarks, load tests
//! and demos, written exactly as PEFT writes real ones (`adapter_config.json` +
//! `adapter_model.safetensors`, f32, Hugging Face row order), so they exercise the real loader.
//!
//! Scaling: `A ~ N(0, 1/in)` (standard deviation `1/sqrt(in)`), so each of the `r` components
//! of `A·x` has the RMS of `x`; `B ~ N(0, sigma^2)` with `sigma = DELTA_RMS / (scale * sqrt(r))`,
//! so the adapter's output `scale * B·A·x` has an RMS of `DELTA_RMS` times the RMS of `x`
//! whatever the rank and alpha. Projections have roughly unit gain (RMS of `W·x` near that of
//! `x`, which their initialisation aims for), so the delta is a sizable fraction of the base
//! projection's output (0.4x on tiny-llama's q_proj, tested): generations visibly differ from the
//! base and between doctors without drowning the base model. The config cannot see the base
//! weights, hence a ratio to the input rather than to the base output.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use super::peft::{module_path, CONFIG_FILE, WEIGHTS_FILE};
use super::weights::Projection;
use crate::model::config::LlamaConfig;
use crate::model::lora::projection_dims;

/// RMS of a synthetic adapter's output relative to the RMS of its input (see the module doc).
pub const DELTA_RMS: f32 = 0.5;

/// Why synthetic adapters could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MakeError {
    /// An argument out of range.
    #[error("make-adapters: {0}")]
    Invalid(String),
    /// Writing failed.
    #[error("make-adapters: cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What to generate; [`SyntheticAdapters::write`] does the work.
#[derive(Clone, Debug)]
pub struct SyntheticAdapters {
    /// How many doctors (`doctor-0000`, `doctor-0001`, ...).
    pub count: usize,
    /// LoRA rank `r`.
    pub rank: usize,
    /// The projections targeted in every layer.
    pub targets: Vec<Projection>,
    /// Same seed, same bytes; doctor `i` draws from stream `i` of this seed.
    pub seed: u64,
    /// `lora_alpha` (scale `alpha / r`).
    pub alpha: f32,
    /// Recorded as `base_model_name_or_path`.
    pub base_model_name: Option<String>,
}

/// Writes `count` synthetic adapters for `base` under `out` (see [`SyntheticAdapters`]) and
/// returns their directories.
pub fn write_synthetic_adapters(
    base: &LlamaConfig,
    out: &Path,
    count: usize,
    rank: usize,
    targets: &[Projection],
    seed: u64,
    alpha: f32,
) -> Result<Vec<PathBuf>, MakeError> {
    SyntheticAdapters {
        count,
        rank,
        targets: targets.to_vec(),
        seed,
        alpha,
        base_model_name: None,
    }
    .write(base, out)
}

impl SyntheticAdapters {
    /// Writes the adapters under `out` (created if needed; existing doctors are overwritten).
    pub fn write(&self, base: &LlamaConfig, out: &Path) -> Result<Vec<PathBuf>, MakeError> {
        self.check()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MakeError::Io { path, source }
        };
        let config = self.config_json();
        let mut dirs = Vec::with_capacity(self.count);
        for i in 0..self.count {
            let dir = out.join(format!("doctor-{i:04}"));
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let config_path = dir.join(CONFIG_FILE);
            std::fs::write(&config_path, &config).map_err(io(&config_path))?;
            let weights_path = dir.join(WEIGHTS_FILE);
            let weights = self.weights(base, i as u64)?;
            std::fs::write(&weights_path, weights).map_err(io(&weights_path))?;
            dirs.push(dir);
        }
        Ok(dirs)
    }

    fn check(&self) -> Result<(), MakeError> {
        let invalid = |m: &str| Err(MakeError::Invalid(m.into()));
        if self.count == 0 {
            return invalid("count must be at least 1");
        }
        if self.rank == 0 {
            return invalid("rank must be at least 1");
        }
        if self.targets.is_empty() {
            return invalid("at least one target projection is needed");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return invalid("alpha must be a positive number");
        }
        Ok(())
    }

    /// The projections, deduplicated, in [`Projection::ALL`] order.
    fn projections(&self) -> Vec<Projection> {
        Projection::ALL
            .into_iter()
            .filter(|p| self.targets.contains(p))
            .collect()
    }

    /// `adapter_config.json` as PEFT writes it (the fields that matter, PEFT's names and values).
    fn config_json(&self) -> Vec<u8> {
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e9 {
            json!(self.alpha as i64)
        } else {
            json!(self.alpha)
        };
        let targets: Vec<&str> = self
            .projections()
            .into_iter()
            .map(Projection::module_name)
            .collect();
        let config = json!({
            "alpha_pattern": {},
            "base_model_name_or_path": self.base_model_name,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": false,
            "layers_to_transform": null,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.rank,
            "rank_pattern": {},
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": false,
        });
        let mut bytes = serde_json::to_vec_pretty(&config).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// The safetensors image of doctor `doctor`.
    fn weights(&self, base: &LlamaConfig, doctor: u64) -> Result<Vec<u8>, MakeError> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(doctor);
        let scale = caduceus_kernels::lora::lora_scale(self.alpha, self.rank, false);
        let sigma_b = DELTA_RMS / (scale * (self.rank as f32).sqrt());
        let dims = projection_dims(base);
        let r = self.rank;
        let mut tensors: Vec<(String, [usize; 2], Vec<u8>)> = Vec::new();
        for layer in 0..base.num_layers {
            for p in self.projections() {
                let (in_dim, out_dim) = dims[p.index()];
                let name = format!("base_model.model.{}", module_path(layer, p));
                let a = normal_bytes(&mut rng, r * in_dim, 1.0 / (in_dim as f32).sqrt());
                let b = normal_bytes(&mut rng, out_dim * r, sigma_b);
                tensors.push((format!("{name}.lora_A.weight"), [r, in_dim], a));
                tensors.push((format!("{name}.lora_B.weight"), [out_dim, r], b));
            }
        }
        let views = tensors
            .iter()
            .map(|(name, shape, data)| {
                TensorView::new(Dtype::F32, shape.to_vec(), data).map(|v| (name.as_str(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MakeError::Invalid(format!("building a tensor: {e}")))?;
        let metadata = [("format".to_string(), "pt".to_string())].into();
        safetensors::serialize(views, Some(metadata))
            .map_err(|e| MakeError::Invalid(format!("serializing safetensors: {e}")))
    }
}

/// `n` samples of `N(0, std^2)` as little-endian f32 bytes (Box-Muller, two samples per draw).
fn normal_bytes(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 4);
    let mut remaining = n;
    while remaining > 0 {
        // 1 - u is in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        for z in [radius * angle.cos(), radius * angle.sin()]
            .into_iter()
            .take(remaining)
        {
            out.extend_from_slice(&((z as f32) * std).to_le_bytes());
            remaining -= 1;
        }
    }
    out
}
