//! Multi-LoRA on the device (`cuda/lora.cu`): adapter slot stores per projection and the fused
//! shrink/expand launches, the GPU twin of [`crate::lora::add_lora_fused`].
//!
//! A batch is described once per step as a [`LoraBatch`] (uploaded once, read by every layer and
//! projection): per-token slots for decode (BGMV: one block per token) or SGMV tiles (one block
//! per tile of up to [`TILE_TOKENS`] tokens on one adapter, so A and B are read once per tile) of
//! prefill runs or of decode tokens grouped by adapter ([`LoraUnits::grouped`]; a decode graph
//! takes either, [`DecodeLoraMapping`]). [`add_lora_fused`] then makes two launches for all the
//! projections that read one input (q/k/v, gate/up; o and down as one-part calls): a shrink into
//! an f32 workspace, split over the input's columns, and an expand into the fused output. Both
//! mappings perform the same f32 operations per output, so a token's delta is bit-identical
//! under either and in any batch.

mod batch;
mod image;
mod slots;
mod table;

pub use batch::{LoraBatch, LoraUnits};
pub use image::{PeftProjection, PinnedParts, SlotImage};
pub use slots::DeviceLoraSlots;
pub use table::SlotTable;

use super::device::{DType, Device, DeviceBuffer, GpuError};
use super::kernel::{kernel_fn, kernel_params, KernelFn, LaunchDims};
use super::ops::{by_dtype, dim32, need};
use crate::lora::LoraError;
use batch::Mapping;

/// Most projections one fused call covers (q, k and v).
pub const MAX_FUSED_PARTS: usize = 3;
/// Tokens per SGMV tile (`kTileTokens` in lora.cu).
pub const TILE_TOKENS: usize = 16;
/// Rank rows of A per shrink block (8 warps of 4 rows, or of 2 rows beside a tile's 16 tokens)
/// and output columns per expand block (lora.cu).
const BGMV_SHRINK_ROWS: usize = 32;
const SGMV_SHRINK_ROWS: usize = 16;
const SHRINK_THREADS: u32 = 256;
/// Input columns per shrink split (`kSplitCols` in lora.cu): each split is reduced by its own
/// blocks (grid z) into its own workspace rows, which the expand sums in order.
const SPLIT_COLS: usize = 1024;
const OUT_TILE: usize = 512;
const BGMV_EXPAND_THREADS: u32 = 64;
const SGMV_EXPAND_THREADS: u32 = 128;

/// How a captured decode graph maps its tokens to LoRA blocks. The engine's graphs take BGMV;
/// `gpu-bench` times both. The grouped tiles read each adapter once per tile of up to
/// [`TILE_TOKENS`] of its tokens, where BGMV reads it once per token (through L2 when tokens
/// share it), yet measured slower on the H200 (0.73x of base against BGMV's 0.82x at 64
/// adapters) while their graphs had a unit per token, most of them empty blocks (192 of 256 at
/// 64 adapters, each holding 35 KB of shared memory while it is scheduled); they now have
/// [`LoraUnits::max_grouped_tiles`] (76 there), not yet measured. Both give the same bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeLoraMapping {
    /// One block per token ([`LoraUnits::bgmv`]).
    #[default]
    Bgmv,
    /// SGMV tiles of the tokens grouped by adapter, as many units as the stack's slots can make
    /// tiles ([`LoraUnits::grouped`]).
    Grouped,
}

impl DecodeLoraMapping {
    /// Every mapping, in the order of their names.
    pub const ALL: [DecodeLoraMapping; 2] = [DecodeLoraMapping::Bgmv, DecodeLoraMapping::Grouped];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            DecodeLoraMapping::Bgmv => "bgmv",
            DecodeLoraMapping::Grouped => "grouped",
        }
    }
}

/// Why a device slot could not be loaded or a fused call not run.
#[derive(Debug, thiserror::Error)]
pub enum LoraGpuError {
    /// The same validation the CPU path applies (shapes, ranks, slots, segments, output rows).
    #[error(transparent)]
    Lora(#[from] LoraError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("a fused LoRA call takes at most {MAX_FUSED_PARTS} parts, got {0}")]
    TooManyParts(usize),
    #[error("fused LoRA parts must share one dtype: {expected:?} and {actual:?}")]
    DtypeMismatch { expected: DType, actual: DType },
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LoraPartParams {
    a: u64,
    b: u64,
    ranks: u64,
    scales: u64,
    max_rank: u32,
    out_dim: u32,
    out_stride: u32,
    y_offset: u32,
    v_offset: u32,
    shrink_blocks: u32,
    expand_blocks: u32,
    table_stride: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct LoraParams {
    parts: [LoraPartParams; MAX_FUSED_PARTS],
    x: u64,
    v: u64,
    y: u64,
    token_slots: u64,
    tiles: u64,
    tile_rows: u64,
    num_parts: u32,
    num_slots: u32,
    num_units: u32,
    in_dim: u32,
    in_stride: u32,
    v_stride: u32,
    y_stride: u32,
    num_splits: u32,
    v_split_stride: u32,
    _pad: u32,
}

kernel_params!(LoraParams);

const SHRINK_BGMV: [KernelFn; 2] = [
    kernel_fn!(cad_lora_shrink_bgmv_bf16),
    kernel_fn!(cad_lora_shrink_bgmv_f16),
];
const SHRINK_SGMV: [KernelFn; 2] = [
    kernel_fn!(cad_lora_shrink_sgmv_bf16),
    kernel_fn!(cad_lora_shrink_sgmv_f16),
];
const EXPAND_BGMV: [KernelFn; 2] = [
    kernel_fn!(cad_lora_expand_bgmv_bf16),
    kernel_fn!(cad_lora_expand_bgmv_f16),
];
const EXPAND_SGMV: [KernelFn; 2] = [
    kernel_fn!(cad_lora_expand_sgmv_bf16),
    kernel_fn!(cad_lora_expand_sgmv_f16),
];

/// One projection of a fused call: its device slots and the column of the fused output row where
/// its `out_dim` deltas start.
#[derive(Clone, Copy)]
pub struct DeviceFusedPart<'a> {
    pub slots: &'a DeviceLoraSlots,
    pub offset: usize,
}

/// Buffers of one [`add_lora_fused`] call.
pub struct FusedLoraArgs<'a> {
    /// The projections reading `x`, each adding into its columns of `y`.
    pub parts: &'a [DeviceFusedPart<'a>],
    /// `[num_tokens, in_dim]` of the parts' dtype.
    pub x: &'a DeviceBuffer,
    pub batch: &'a LoraBatch<'a>,
    /// f32 scratch of at least [`workspace_bytes`]; its contents are not kept between calls.
    pub workspace: &'a DeviceBuffer,
    /// Rows of `y_stride` values of the dtype, `num_tokens` of them.
    pub y: &'a DeviceBuffer,
    pub y_stride: usize,
}

/// Bytes of f32 workspace a fused call over `parts` needs for `num_tokens` tokens: every split's
/// partial sums ([`shrink_splits`]).
pub fn workspace_bytes(parts: &[DeviceFusedPart<'_>], num_tokens: usize) -> usize {
    let v_stride: usize = parts.iter().map(|p| p.slots.shape.max_rank).sum();
    let in_dim = parts.first().map_or(0, |p| p.slots.shape.in_dim);
    num_tokens * v_stride * shrink_splits(in_dim) * 4
}

/// Splits of an `in_dim`-wide input the shrink reduces separately (at least 1), each adding a
/// set of partial sums to the workspace.
pub fn shrink_splits(in_dim: usize) -> usize {
    in_dim.div_ceil(SPLIT_COLS).max(1)
}

/// Adds every part's LoRA delta for the tokens `batch` gives an adapter to their columns of `y`
/// (the GPU [`crate::lora::add_lora_fused`]): one shrink launch and one expand launch for all
/// parts. A slot empty in some part adds nothing there; base-only tokens are not written, and a
/// batch with no adapter for any part launches nothing.
pub fn add_lora_fused(dev: &Device, args: &FusedLoraArgs<'_>) -> Result<(), LoraGpuError> {
    let Some(first) = args.parts.first() else {
        return Ok(());
    };
    if args.parts.len() > MAX_FUSED_PARTS {
        return Err(LoraGpuError::TooManyParts(args.parts.len()));
    }
    let (dtype, in_dim) = (first.slots.dtype, first.slots.shape.in_dim);
    let batch = args.batch;
    let (shrink_rows, tile) = match batch.mapping {
        Mapping::Bgmv => (BGMV_SHRINK_ROWS, 1),
        Mapping::Sgmv => (SGMV_SHRINK_ROWS, TILE_TOKENS),
    };
    let mut parts = [LoraPartParams::default(); MAX_FUSED_PARTS];
    let (mut v_stride, mut shrink_blocks, mut expand_blocks, mut widest_rank) = (0, 0, 0, 0);
    for (pp, part) in parts.iter_mut().zip(args.parts) {
        check_part(part, dtype, in_dim, args)?;
        let (s, shape) = (part.slots, part.slots.shape);
        // The largest rank this part holds for the batch's slots sizes its grid (the store's
        // largest for a fixed grid, which any later contents of the units fit).
        let rank = match batch.fixed_grid {
            true => shape.max_rank,
            false => batch
                .slots_used
                .iter()
                .filter_map(|&slot| s.rank(slot as usize))
                .max()
                .unwrap_or(0),
        };
        let blocks = (
            rank.div_ceil(shrink_rows),
            rank.min(1) * shape.out_dim.div_ceil(OUT_TILE),
        );
        *pp = LoraPartParams {
            a: s.a.ptr(),
            b: s.b.ptr(),
            ranks: s.table.ranks_ptr(),
            scales: s.table.scales_ptr(),
            max_rank: dim32("max_rank", shape.max_rank)?,
            out_dim: dim32("out_dim", shape.out_dim)?,
            out_stride: dim32("out_dim", s.out_stride)?,
            y_offset: dim32("offset", part.offset)?,
            v_offset: dim32("v_stride", v_stride)?,
            shrink_blocks: dim32("lora grid.y", blocks.0)?,
            expand_blocks: dim32("lora grid.y", blocks.1)?,
            table_stride: dim32("lora table stride", s.table.stride())?,
        };
        v_stride += shape.max_rank;
        shrink_blocks += blocks.0;
        expand_blocks += blocks.1;
        widest_rank = widest_rank.max(rank);
    }
    let (es, num_tokens) = (dtype.size(), batch.num_tokens);
    need("lora x", args.x, num_tokens * in_dim, es)?;
    need("lora y", args.y, num_tokens * args.y_stride, es)?;
    let splits = shrink_splits(in_dim);
    need(
        "lora workspace",
        args.workspace,
        splits * num_tokens * v_stride,
        4,
    )?;
    let (token_slots, tiles, tile_rows) = match batch.mapping {
        Mapping::Bgmv => (batch.units_ptr(), 0, 0),
        Mapping::Sgmv => (0, batch.units_ptr(), batch.rows_ptr()),
    };
    let num_slots = args.parts.iter().map(|p| p.slots.shape.num_slots).min();
    let p = LoraParams {
        parts,
        x: args.x.ptr(),
        v: args.workspace.ptr(),
        y: args.y.ptr(),
        token_slots,
        tiles,
        tile_rows,
        num_parts: args.parts.len() as u32,
        num_slots: dim32("num_slots", num_slots.unwrap_or(0))?,
        num_units: dim32("units", batch.num_units)?,
        in_dim: dim32("in_dim", in_dim)?,
        in_stride: dim32("in_dim", first.slots.in_stride)?,
        v_stride: dim32("v_stride", v_stride)?,
        y_stride: dim32("y_stride", args.y_stride)?,
        num_splits: dim32("lora splits", splits)?,
        v_split_stride: dim32("lora workspace", num_tokens * v_stride)?,
        _pad: 0,
    };
    let (shrink, expand, expand_threads) = match batch.mapping {
        Mapping::Bgmv => (&SHRINK_BGMV, &EXPAND_BGMV, BGMV_EXPAND_THREADS),
        Mapping::Sgmv => (&SHRINK_SGMV, &EXPAND_SGMV, SGMV_EXPAND_THREADS),
    };
    let grid = |blocks: usize, z: u32| -> Result<(u32, u32, u32), GpuError> {
        Ok((p.num_units, dim32("lora grid.y", blocks)?, z))
    };
    let shrink_dims = LaunchDims {
        grid: grid(shrink_blocks, p.num_splits)?,
        block: (SHRINK_THREADS, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(by_dtype(shrink, dtype), shrink_dims, &p)?;
    let expand_dims = LaunchDims {
        grid: grid(expand_blocks, 1)?,
        block: (expand_threads, 1, 1),
        // The unit's v values: tile tokens x the largest rank in use.
        shared_bytes: dim32("lora shared memory", tile * widest_rank * 4)?,
    };
    dev.launch(by_dtype(expand, dtype), expand_dims, &p)?;
    Ok(())
}

/// The checks the CPU path makes of each part (same errors), plus one dtype for all parts.
fn check_part(
    part: &DeviceFusedPart<'_>,
    dtype: DType,
    in_dim: usize,
    args: &FusedLoraArgs<'_>,
) -> Result<(), LoraGpuError> {
    let (s, shape) = (part.slots, part.slots.shape);
    if s.dtype != dtype {
        return Err(LoraGpuError::DtypeMismatch {
            expected: dtype,
            actual: s.dtype,
        });
    }
    if shape.in_dim != in_dim {
        return Err(LoraError::LengthMismatch {
            what: "fused part in_dim",
            expected: in_dim,
            actual: shape.in_dim,
        }
        .into());
    }
    if part.offset + shape.out_dim > args.y_stride {
        return Err(LoraError::BadOutputRows {
            stride: args.y_stride,
            offset: part.offset,
            out_dim: shape.out_dim,
        }
        .into());
    }
    match args.batch.slots_used.last() {
        Some(&slot) if slot as usize >= shape.num_slots => Err(LoraError::SlotOutOfRange {
            slot: slot as usize,
            num_slots: shape.num_slots,
        }
        .into()),
        _ => Ok(()),
    }
}
