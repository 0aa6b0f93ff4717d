//! `gpu-bench`'s attention sweeps, each kernel alone on one layer's cache:
//! - decode: the CUDA-core decode kernel and the tensor-core ones (both layouts,
//!   [`TensorCoreDecode`]) for each decode batch of the model part and each way of splitting the
//!   context, against the time its K/V bytes take at the HBM bandwidth;
//! - prefill: both prefill kernels (CUDA cores, tensor cores) on the prefill part's prompt,
//!   against the dense bf16 peak.
//!
//! What they are for: the op profiles say how much attention costs in a step; these say how
//! close each kernel runs to the hardware and which configuration does best, without
//! rebuilding anything.

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::attention::{
    paged_attention_decode, paged_attention_decode_tc, AttentionKernel, AttnShape, DecodePlan,
    DecodeSplit, PagedAttnArgs, PagedBatchBuffers, TensorCoreDecode,
};
use caduceus_kernels::gpu::attention_prefill::paged_attention_prefill;
use caduceus_kernels::gpu::{Device, DeviceBuffer};
use serde::Serialize;

use super::{Bench, DecodeBatch};
use crate::gpu::model::{GpuModel, GpuModelError};
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

/// One (batch, kernel, split) configuration.
#[derive(Clone, Debug, Serialize)]
pub struct AttentionFigure {
    pub batch: usize,
    /// [`AttentionKernel::name`]: the cores it ran on.
    pub kernel: &'static str,
    /// On tensor cores, [`TensorCoreDecode::name`]: the kernel's layout (`None` on CUDA cores).
    /// The engine runs the one [`TensorCoreDecode::for_shape`] picks.
    pub layout: Option<&'static str>,
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

/// Microseconds per call of `launch` on `dev`: two untimed calls, then [`LAUNCHES`] timed (one
/// timed call in the emulation).
fn us_per_launch(
    dev: &Device,
    mut launch: impl FnMut() -> Result<(), GpuModelError>,
) -> Result<f64, GpuModelError> {
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
    Ok(ms * 1e3 / timed as f64)
}

/// Zeroed q and output rows of `tokens` query tokens for one of `model`'s attention layers.
struct QueryRows {
    q: DeviceBuffer,
    out: DeviceBuffer,
}

impl QueryRows {
    fn new(model: &GpuModel, tokens: usize) -> Result<QueryRows, GpuModelError> {
        let (dev, c) = (model.device(), model.config());
        let bytes = tokens * c.num_heads * c.head_dim * model.dtype().size();
        Ok(QueryRows {
            q: dev.alloc_zeroed(bytes)?,
            out: dev.alloc_zeroed(bytes)?,
        })
    }

    /// The kernels' arguments over a layer's pools and `batch`.
    fn args<'a>(
        &'a self,
        k_cache: &'a DeviceBuffer,
        v_cache: &'a DeviceBuffer,
        batch: &'a PagedBatchBuffers,
        shape: AttnShape,
    ) -> PagedAttnArgs<'a> {
        PagedAttnArgs {
            q: &self.q,
            k_cache,
            v_cache,
            out: &self.out,
            batch: batch.batch(),
            shape,
        }
    }
}

/// One prefill kernel on one fresh prompt.
#[derive(Clone, Debug, Serialize)]
pub struct PrefillKernelFigure {
    /// [`AttentionKernel::name`].
    pub kernel: &'static str,
    pub prompt_len: usize,
    /// One layer's causal attention over the prompt, microseconds per launch.
    pub us_per_layer: f64,
    /// QK^T and PV FLOPs (causal: token i against i + 1 keys) over the time.
    pub tflops: f64,
    /// That over the GPU's dense bf16 peak (`None` off the spec table).
    pub of_peak: Option<f64>,
}

impl Bench<'_> {
    /// Layer 0's K and V pools and the attention shape over the pool (`None`: no layers).
    fn layer0(&self) -> Option<(&DeviceBuffer, &DeviceBuffer, AttnShape)> {
        let (k_cache, v_cache) = self.kv.layer(0)?;
        let cache = self.kv.shape();
        let c = self.model.config();
        Some((
            k_cache,
            v_cache,
            attn_shape(c, cache.block_size, cache.num_blocks),
        ))
    }

    /// Times each prefill kernel on layer 0's pools of the KV pool: one sequence prefilling
    /// `o.prefill_len` tokens from an empty cache (what the prefill part's forward pass does per
    /// layer).
    pub(super) fn sweep_prefill_kernels(&self) -> Result<Vec<PrefillKernelFigure>, GpuModelError> {
        let (model, model_shape, len) = (self.model, self.shape, self.o.prefill_len);
        let (dev, dt) = (model.device(), model.dtype());
        let Some((k_cache, v_cache, shape)) = self.layer0().filter(|_| len > 0) else {
            return Ok(Vec::new());
        };
        let block_size = self.kv.shape().block_size;
        let table: Vec<u32> = (0..len.div_ceil(block_size) as u32).collect();
        let seqs = [SeqAttention {
            query_start: 0,
            query_len: len,
            context_len: len,
            block_table: &table,
        }];
        let batch = PagedBatchBuffers::upload(dev, &seqs)?;
        let rows = QueryRows::new(model, len)?;
        let args = rows.args(k_cache, v_cache, &batch, shape);
        let flops = model_shape.attention_flops((len * (len + 1) / 2) as u64) as f64
            / model_shape.layers.max(1) as f64;
        let mut figures = Vec::new();
        for kernel in AttentionKernel::ALL {
            let us = us_per_launch(dev, || Ok(paged_attention_prefill(dev, dt, &args, kernel)?))?;
            let per_s = flops / (us / 1e6);
            figures.push(PrefillKernelFigure {
                kernel: kernel.name(),
                prompt_len: len,
                us_per_layer: us,
                tflops: per_s / 1e12,
                of_peak: self.gpu.map(|g| per_s / g.bf16_flops_per_s),
            });
        }
        Ok(figures)
    }

    /// Times the decode kernels on layer 0's pools of the KV pool for every batch of
    /// `o.decode_batches`.
    pub(super) fn sweep_attention(&self) -> Result<Vec<AttentionFigure>, GpuModelError> {
        let (model, model_shape, o, gpu) = (self.model, self.shape, self.o, self.gpu);
        let (dev, dt, c) = (model.device(), model.dtype(), model.config());
        let Some((k_cache, v_cache, shape)) = self.layer0() else {
            return Ok(Vec::new());
        };
        let cache = self.kv.shape();
        let mut figures = Vec::new();
        for &b in &o.decode_batches {
            let d = DecodeBatch::new(b, o.context, cache.block_size, c.vocab_size);
            let batch = PagedBatchBuffers::upload(dev, &d.seqs())?;
            let rows = QueryRows::new(model, b)?;
            let args = rows.args(k_cache, v_cache, &batch, shape);
            let mut seen = Vec::new();
            let kernels = [None]
                .into_iter()
                .chain(TensorCoreDecode::ALL.map(Some))
                .filter(|l| l.is_none_or(|l| l.takes(&shape)));
            let configs = kernels.flat_map(|k| SPLITS.map(|s| (k, s)));
            for (layout, split) in configs {
                let plan = DecodePlan::new(&args.batch, &shape, split);
                if seen.contains(&(layout, plan)) {
                    continue;
                }
                seen.push((layout, plan));
                let ws = dev.alloc_zeroed(plan.workspace_bytes(b, &shape).max(4))?;
                let us = us_per_launch(dev, || {
                    let ws = Some(&ws);
                    match layout {
                        None => paged_attention_decode(dev, dt, &args, &plan, ws)?,
                        Some(l) => paged_attention_decode_tc(dev, dt, &args, &plan, ws, l)?,
                    }
                    Ok(())
                })?;
                let bytes = (b * o.context) as f64 * model_shape.kv_bytes_per_token_layer() as f64;
                let per_s = bytes / (us / 1e6);
                figures.push(AttentionFigure {
                    batch: b,
                    kernel: match layout {
                        None => AttentionKernel::CudaCores.name(),
                        Some(_) => AttentionKernel::TensorCores.name(),
                    },
                    layout: layout.map(TensorCoreDecode::name),
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
}
