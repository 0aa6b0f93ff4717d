//! `gpu-bench`'s decode-attention sweep: the paged decode kernel alone on one layer's cache, for
//! each decode batch of the model part and each way of splitting the context, against the time
//! its K/V bytes take at the HBM bandwidth. What it is for: the decode step's attention share
//! (the op profile) says how much attention costs; this says whether the kernel streams the
//! cache at the bandwidth and which split does best, without rebuilding anything.

use caduceus_kernels::gpu::attention::{
    paged_attention_decode, DecodePlan, DecodeSplit, PagedAttnArgs, PagedBatchBuffers,
};
use serde::Serialize;

use super::{DecodeBatch, ModelBenchOptions};
use crate::gpu::model::{GpuKvCache, GpuModel, GpuModelError};
use crate::gpu::roofline::{GpuSpec, ModelShape};
use crate::gpu::workspace::attn_shape;

/// Launches timed per configuration on a GPU (after two untimed ones); one in the emulation,
/// where a launch is milliseconds of host threads and only the plumbing is under test.
const LAUNCHES: usize = 20;

/// The splits each batch is timed with (duplicates of one plan are timed once).
const SPLITS: [DecodeSplit; 5] = [
    DecodeSplit::Auto,
    DecodeSplit::Off,
    DecodeSplit::Tokens(64),
    DecodeSplit::Tokens(256),
    DecodeSplit::Tokens(1024),
];

/// One (batch, split) configuration.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionFigure {
    pub batch: usize,
    pub context: usize,
    /// `auto`, `off` or `tokens:N` as asked; the plan it gave follows.
    pub split: String,
    pub num_splits: usize,
    pub tokens_per_split: usize,
    /// One layer's decode attention (the split merge included), microseconds per launch.
    pub us_per_layer: f64,
    /// K and V bytes read per launch over the time.
    pub kv_gb_per_s: f64,
    /// That over the GPU's HBM bandwidth (`None` off the spec table).
    pub of_hbm: Option<f64>,
}

fn split_name(s: DecodeSplit) -> String {
    match s {
        DecodeSplit::Auto => "auto".into(),
        DecodeSplit::Off => "off".into(),
        DecodeSplit::Tokens(n) => format!("tokens:{n}"),
    }
}

/// Times the decode kernel on layer 0's pools of `kv` for every batch of `o.decode_batches`.
pub(super) fn sweep_attention(
    model: &GpuModel,
    kv: &GpuKvCache,
    model_shape: &ModelShape,
    gpu: Option<&GpuSpec>,
    o: &ModelBenchOptions,
) -> Result<Vec<AttentionFigure>, GpuModelError> {
    let (dev, dt, c) = (model.device(), model.dtype(), model.config());
    let Some((k_cache, v_cache)) = kv.layer(0) else {
        return Ok(Vec::new());
    };
    let cache = kv.shape();
    let shape = attn_shape(c, cache.block_size, cache.num_blocks);
    let mut figures = Vec::new();
    for &b in &o.decode_batches {
        let d = DecodeBatch::new(b, o.context, cache.block_size, c.vocab_size);
        let batch = PagedBatchBuffers::upload(dev, &d.seqs())?;
        let elems = b * c.num_heads * c.head_dim;
        let (q, out) = (
            dev.alloc_zeroed(elems * dt.size())?,
            dev.alloc_zeroed(elems * dt.size())?,
        );
        let args = PagedAttnArgs {
            q: &q,
            k_cache,
            v_cache,
            out: &out,
            batch: batch.batch(),
            shape,
        };
        let mut seen = Vec::new();
        for split in SPLITS {
            let plan = DecodePlan::new(&args.batch, &shape, split);
            if seen.contains(&plan) {
                continue;
            }
            seen.push(plan);
            let ws = dev.alloc_zeroed(plan.workspace_bytes(b, &shape).max(4))?;
            let launch = || paged_attention_decode(dev, dt, &args, &plan, Some(&ws));
            let (untimed, timed) = match dev.is_emulated() {
                true => (0, 1),
                false => (2, LAUNCHES),
            };
            for _ in 0..untimed {
                launch()?;
            }
            let start = dev.mark()?;
            for _ in 0..timed {
                launch()?;
            }
            let ms = dev.mark()?.ms_since(&start)?;
            let us = ms * 1e3 / timed as f64;
            let bytes = (b * o.context) as f64 * model_shape.kv_bytes_per_token_layer() as f64;
            let per_s = bytes / (us / 1e6);
            figures.push(AttentionFigure {
                batch: b,
                context: o.context,
                split: split_name(split),
                num_splits: plan.num_splits,
                tokens_per_split: plan.tokens_per_split,
                us_per_layer: us,
                kv_gb_per_s: per_s / 1e9,
                of_hbm: gpu.map(|g| per_s / g.hbm_bytes_per_s),
            });
        }
    }
    Ok(figures)
}
