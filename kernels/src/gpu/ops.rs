//! Launchers of `cuda/ops.cu`: embedding gather, RMSNorm (with fused residual add), SiLU-and-mul,
//! row copies, widening to f32 and scattered adds.

use super::device::{DType, Device, DeviceBuffer, DeviceElem, GpuError};
use super::kernel::{kernel_fn, kernel_params, KernelFn, LaunchDims};

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct EmbeddingParams {
    table: u64,
    ids: u64,
    out: u64,
    num_tokens: u32,
    hidden: u32,
    vocab: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RmsNormParams {
    x: u64,
    residual: u64,
    residual_out: u64,
    weight: u64,
    out: u64,
    rows: u32,
    dim: u32,
    eps: f32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SiluMulParams {
    gate_up: u64,
    out: u64,
    rows: u32,
    ffn: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CopyRowsParams {
    src: u64,
    dst: u64,
    rows: u32,
    cols: u32,
    src_stride: u32,
    dst_stride: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ToF32Params {
    x: u64,
    out: u64,
    n: u64,
}

/// One addend of [`add_at`]: `x[index] += value` (the C twin is `AddAtEntry`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AddAtEntry {
    pub index: u32,
    pub value: f32,
}

// SAFETY: two 4-byte fields, `#[repr(C)]`: no padding.
unsafe impl DeviceElem for AddAtEntry {}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AddAtParams {
    x: u64,
    entries: u64,
    n: u32,
    len: u32,
}

kernel_params!(
    EmbeddingParams,
    RmsNormParams,
    SiluMulParams,
    CopyRowsParams,
    ToF32Params,
    AddAtParams
);

const EMBEDDING: [KernelFn; 2] = [
    kernel_fn!(cad_embedding_bf16),
    kernel_fn!(cad_embedding_f16),
];
const RMS_NORM: [KernelFn; 2] = [kernel_fn!(cad_rms_norm_bf16), kernel_fn!(cad_rms_norm_f16)];
const COPY_ROWS: [KernelFn; 2] = [
    kernel_fn!(cad_copy_rows_bf16),
    kernel_fn!(cad_copy_rows_f16),
];
const SILU_MUL: [KernelFn; 2] = [kernel_fn!(cad_silu_mul_bf16), kernel_fn!(cad_silu_mul_f16)];
const TO_F32: [KernelFn; 2] = [kernel_fn!(cad_to_f32_bf16), kernel_fn!(cad_to_f32_f16)];
const ADD_AT: KernelFn = kernel_fn!(cad_add_at_f32);

/// The variant of a kernel family for `dtype` (arrays are ordered bf16, f16).
pub(crate) fn by_dtype(family: &[KernelFn; 2], dtype: DType) -> &KernelFn {
    match dtype {
        DType::Bf16 => &family[0],
        DType::F16 => &family[1],
    }
}

/// Fails unless `buf` holds at least `elems` elements of `elem_bytes` bytes.
pub(crate) fn need(
    what: &str,
    buf: &DeviceBuffer,
    elems: usize,
    elem_bytes: usize,
) -> Result<(), GpuError> {
    let bytes = elems
        .checked_mul(elem_bytes)
        .ok_or_else(|| GpuError::Shape(format!("{what}: {elems} elements overflow")))?;
    if buf.len_bytes() < bytes {
        return Err(GpuError::Shape(format!(
            "{what}: needs {bytes} bytes, buffer has {}",
            buf.len_bytes()
        )));
    }
    Ok(())
}

/// Converts a dimension to the kernels' u32, refusing what does not fit.
pub(crate) fn dim32(what: &str, v: usize) -> Result<u32, GpuError> {
    u32::try_from(v).map_err(|_| GpuError::Shape(format!("{what} = {v} does not fit in u32")))
}

/// Threads per block for a row of `len` elements: a multiple of 32 up to `max`.
pub(crate) fn row_threads(len: usize, max: u32) -> u32 {
    (len.div_ceil(32) * 32).clamp(32, max as usize) as u32
}

/// `out[t] = table[ids[t]]` for `num_tokens` ids (u32); `table` is `[vocab, hidden]`. An id at or
/// past `vocab` gives a zero row (the runtime validates ids before they get here).
#[allow(clippy::too_many_arguments)]
pub fn embedding(
    dev: &Device,
    dtype: DType,
    table: &DeviceBuffer,
    vocab: usize,
    hidden: usize,
    ids: &DeviceBuffer,
    num_tokens: usize,
    out: &DeviceBuffer,
) -> Result<(), GpuError> {
    need("embedding table", table, vocab * hidden, dtype.size())?;
    need("embedding ids", ids, num_tokens, 4)?;
    need("embedding out", out, num_tokens * hidden, dtype.size())?;
    let p = EmbeddingParams {
        table: table.ptr(),
        ids: ids.ptr(),
        out: out.ptr(),
        num_tokens: dim32("num_tokens", num_tokens)?,
        hidden: dim32("hidden", hidden)?,
        vocab: dim32("vocab", vocab)?,
        _pad: 0,
    };
    let dims = LaunchDims::linear(p.num_tokens, row_threads(hidden, 256));
    dev.launch(by_dtype(&EMBEDDING, dtype), dims, &p)
}

/// Buffers of one [`rms_norm`] call, each `[rows, dim]` but `weight` (`[dim]`).
pub struct RmsNormArgs<'a> {
    pub x: &'a DeviceBuffer,
    /// Added to `x` before normalising (the residual stream), if any.
    pub residual: Option<&'a DeviceBuffer>,
    /// Receives `x + residual` rounded to the dtype (may be `residual` itself).
    pub residual_out: Option<&'a DeviceBuffer>,
    pub weight: &'a DeviceBuffer,
    pub out: &'a DeviceBuffer,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

/// RMSNorm of each row of `x (+ residual)` times `weight`; with `residual_out`, the sum is stored
/// there and the stored (rounded) sum is what gets normalised.
pub fn rms_norm(dev: &Device, dtype: DType, a: &RmsNormArgs<'_>) -> Result<(), GpuError> {
    let n = a.rows * a.dim;
    let es = dtype.size();
    need("rms_norm x", a.x, n, es)?;
    need("rms_norm out", a.out, n, es)?;
    need("rms_norm weight", a.weight, a.dim, es)?;
    if let Some(r) = a.residual {
        need("rms_norm residual", r, n, es)?;
    }
    if let Some(r) = a.residual_out {
        need("rms_norm residual_out", r, n, es)?;
    }
    if a.dim == 0 {
        return Err(GpuError::Shape("rms_norm: dim must be positive".into()));
    }
    let p = RmsNormParams {
        x: a.x.ptr(),
        residual: a.residual.map_or(0, DeviceBuffer::ptr),
        residual_out: a.residual_out.map_or(0, DeviceBuffer::ptr),
        weight: a.weight.ptr(),
        out: a.out.ptr(),
        rows: dim32("rows", a.rows)?,
        dim: dim32("dim", a.dim)?,
        eps: a.eps,
        _pad: 0,
    };
    let dims = LaunchDims::linear(p.rows, row_threads(a.dim, 512));
    dev.launch(by_dtype(&RMS_NORM, dtype), dims, &p)
}

/// `out[r, i] = silu(gate_up[r, i]) * gate_up[r, ffn + i]` over `rows` rows of `[gate | up]`.
pub fn silu_mul(
    dev: &Device,
    dtype: DType,
    gate_up: &DeviceBuffer,
    rows: usize,
    ffn: usize,
    out: &DeviceBuffer,
) -> Result<(), GpuError> {
    need("silu_mul gate_up", gate_up, rows * 2 * ffn, dtype.size())?;
    need("silu_mul out", out, rows * ffn, dtype.size())?;
    let p = SiluMulParams {
        gate_up: gate_up.ptr(),
        out: out.ptr(),
        rows: dim32("rows", rows)?,
        ffn: dim32("ffn", ffn)?,
    };
    // (column blocks, rows); the kernel strides over both past the grid's limits, 8 columns per
    // thread where rows are whole 16-byte vectors (`kSiluVec`), 1 otherwise.
    let per_thread = if ffn.is_multiple_of(8) { 8 } else { 1 };
    let dims = LaunchDims {
        grid: (
            ffn.div_ceil(256 * per_thread).clamp(1, 65_535) as u32,
            rows.clamp(1, 65_535) as u32,
            1,
        ),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    dev.launch(by_dtype(&SILU_MUL, dtype), dims, &p)
}

/// `out[i] = x[i]` widened to f32 for `n` elements (logits in the model dtype to the f32 the
/// sampling kernel reads, as vLLM casts them).
pub fn to_f32(
    dev: &Device,
    dtype: DType,
    x: &DeviceBuffer,
    n: usize,
    out: &DeviceBuffer,
) -> Result<(), GpuError> {
    need("to_f32 x", x, n, dtype.size())?;
    need("to_f32 out", out, n, 4)?;
    let p = ToF32Params {
        x: x.ptr(),
        out: out.ptr(),
        n: n as u64,
    };
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    dev.launch(
        by_dtype(&TO_F32, dtype),
        LaunchDims::linear(blocks, 256),
        &p,
    )
}

/// `x[e.index] += e.value` for the first `n` of `entries` (f32 `x` of `len` values; indices
/// distinct, an index past `len` skipped): requests' `logit_bias` on a step's logits.
pub fn add_at(
    dev: &Device,
    x: &DeviceBuffer,
    len: usize,
    entries: &DeviceBuffer,
    n: usize,
) -> Result<(), GpuError> {
    if n == 0 {
        return Ok(());
    }
    need("add_at x", x, len, 4)?;
    need(
        "add_at entries",
        entries,
        n,
        std::mem::size_of::<AddAtEntry>(),
    )?;
    let narrow = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| GpuError::Shape(format!("add_at: {v} {what} overflow u32")))
    };
    let p = AddAtParams {
        x: x.ptr(),
        entries: entries.ptr(),
        n: narrow(n, "entries")?,
        len: narrow(len, "values")?,
    };
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    dev.launch(&ADD_AT, LaunchDims::linear(blocks, 256), &p)
}

/// Where [`copy_rows`] reads or writes: `rows` rows of `cols` elements, row `r` starting at
/// element `r * stride` of `buf`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub buf: &'a DeviceBuffer,
    pub stride: usize,
}

/// Copies `rows x cols` elements between strided row layouts (a column range of a fused
/// projection output into a dense buffer, or back).
pub fn copy_rows(
    dev: &Device,
    dtype: DType,
    src: Strided<'_>,
    dst: Strided<'_>,
    rows: usize,
    cols: usize,
) -> Result<(), GpuError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if cols > src.stride || cols > dst.stride {
        return Err(GpuError::Shape(format!(
            "copy_rows: {cols} columns exceed a stride ({} / {})",
            src.stride, dst.stride
        )));
    }
    need(
        "copy_rows src",
        src.buf,
        (rows - 1) * src.stride + cols,
        dtype.size(),
    )?;
    need(
        "copy_rows dst",
        dst.buf,
        (rows - 1) * dst.stride + cols,
        dtype.size(),
    )?;
    let p = CopyRowsParams {
        src: src.buf.ptr(),
        dst: dst.buf.ptr(),
        rows: dim32("rows", rows)?,
        cols: dim32("cols", cols)?,
        src_stride: dim32("src_stride", src.stride)?,
        dst_stride: dim32("dst_stride", dst.stride)?,
    };
    dev.launch(
        by_dtype(&COPY_ROWS, dtype),
        LaunchDims::linear(p.rows, row_threads(cols, 256)),
        &p,
    )
}
