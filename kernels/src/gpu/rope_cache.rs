//! Launcher of `cuda/rope_cache.cu`: RoPE on q and k of the fused QKV output, fused with the
//! paged KV cache write (the device form of [`crate::Rope::apply`] + [`crate::write_kv`]).

use super::device::{DType, Device, DeviceBuffer, GpuError};
use super::kernel::{kernel_fn, kernel_params, KernelFn, LaunchDims};
use super::ops::{by_dtype, dim32, need};
use crate::attention::KvCacheShape;
use crate::RopeStyle;

/// `CadRopeCacheParams` in `cuda/params/rope_cache.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct RopeCacheParams {
    qkv: u64,
    q_out: u64,
    positions: u64,
    slot_mapping: u64,
    inv_freq: u64,
    k_cache: u64,
    v_cache: u64,
    num_tokens: u32,
    num_heads: u32,
    num_kv_heads: u32,
    head_dim: u32,
    num_slots: u32,
    neox: u32,
}

kernel_params!(RopeCacheParams);

const ROPE_CACHE: [KernelFn; 2] = [
    kernel_fn!(cad_rope_cache_bf16),
    kernel_fn!(cad_rope_cache_f16),
];

/// Largest head_dim the kernel's shared (cos, sin) table holds.
const MAX_HEAD_DIM: usize = 256;
/// Threads per block (the kernel is compiled with this launch bound).
const THREADS: u32 = 128;
/// Grid cap: the kernel strides over tokens beyond it.
const MAX_BLOCKS: usize = 1 << 16;

/// The buffers of one [`rope_cache`] call.
pub struct RopeCacheArgs<'a> {
    /// `[num_tokens, (num_heads + 2 * num_kv_heads) * head_dim]`, rows `q | k | v`; q is rotated
    /// in place unless `q_out` is given, k and v are only read.
    pub qkv: &'a DeviceBuffer,
    /// `[num_tokens, num_heads * head_dim]`: where rotated q goes, contiguous as the attention
    /// kernels read it (qkv is then left unchanged). `None` rotates q in place in `qkv`.
    pub q_out: Option<&'a DeviceBuffer>,
    /// Absolute position of each token (u32).
    pub positions: &'a DeviceBuffer,
    /// Cache slot of each token (u32); [`crate::attention::PAD_SLOT`] skips the write.
    pub slot_mapping: &'a DeviceBuffer,
    /// `head_dim / 2` f32 inverse frequencies: [`crate::Rope::inv_freq`] uploaded.
    pub inv_freq: &'a DeviceBuffer,
    pub style: RopeStyle,
    pub k_cache: &'a DeviceBuffer,
    pub v_cache: &'a DeviceBuffer,
    /// Geometry of the caches (its `num_kv_heads` and `head_dim` are the layer's).
    pub cache: KvCacheShape,
    pub num_tokens: usize,
    pub num_heads: usize,
}

/// Rotates q (in place, or into `q_out`) and k of every token, and stores rotated k and v into the paged cache at
/// the token's slot. A slot past the cache is skipped like a padding slot (the runtime validates
/// slot mappings; the kernel never writes out of bounds).
pub fn rope_cache(dev: &Device, dtype: DType, a: &RopeCacheArgs<'_>) -> Result<(), GpuError> {
    let c = &a.cache;
    let hd = c.head_dim;
    if hd == 0 || !hd.is_multiple_of(8) || hd > MAX_HEAD_DIM {
        return Err(GpuError::Shape(format!(
            "rope_cache: head_dim {hd} must be a multiple of 8 up to {MAX_HEAD_DIM}"
        )));
    }
    let es = dtype.size();
    let row = (a.num_heads + 2 * c.num_kv_heads) * hd;
    need("rope_cache qkv", a.qkv, a.num_tokens * row, es)?;
    if let Some(q_out) = a.q_out {
        need(
            "rope_cache q_out",
            q_out,
            a.num_tokens * a.num_heads * hd,
            es,
        )?;
    }
    need("rope_cache positions", a.positions, a.num_tokens, 4)?;
    need("rope_cache slot_mapping", a.slot_mapping, a.num_tokens, 4)?;
    need("rope_cache inv_freq", a.inv_freq, hd / 2, 4)?;
    need("rope_cache k_cache", a.k_cache, c.elems(), es)?;
    need("rope_cache v_cache", a.v_cache, c.elems(), es)?;
    let p = RopeCacheParams {
        qkv: a.qkv.ptr(),
        q_out: a.q_out.map_or(0, |b| b.ptr()),
        positions: a.positions.ptr(),
        slot_mapping: a.slot_mapping.ptr(),
        inv_freq: a.inv_freq.ptr(),
        k_cache: a.k_cache.ptr(),
        v_cache: a.v_cache.ptr(),
        num_tokens: dim32("num_tokens", a.num_tokens)?,
        num_heads: dim32("num_heads", a.num_heads)?,
        num_kv_heads: dim32("num_kv_heads", c.num_kv_heads)?,
        head_dim: dim32("head_dim", hd)?,
        num_slots: dim32("num_slots", c.num_slots())?,
        neox: u32::from(a.style == RopeStyle::Neox),
    };
    let blocks = a.num_tokens.min(MAX_BLOCKS) as u32;
    dev.launch(
        by_dtype(&ROPE_CACHE, dtype),
        LaunchDims::linear(blocks, THREADS),
        &p,
    )
}

#[cfg(all(test, feature = "cuda-emu"))]
mod launch_tests {
    use super::*;

    /// The emulation enforces `__launch_bounds__` as a GPU does: a bigger block is refused before
    /// anything runs (no tokens: the kernel would write nothing either way).
    #[test]
    fn a_block_past_the_kernels_launch_bounds_is_refused() {
        let dev = Device::emulated();
        let p = RopeCacheParams {
            qkv: 0,
            q_out: 0,
            positions: 0,
            slot_mapping: 0,
            inv_freq: 0,
            k_cache: 0,
            v_cache: 0,
            num_tokens: 0,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
            num_slots: 0,
            neox: 0,
        };
        let at = |threads| dev.launch(&ROPE_CACHE[0], LaunchDims::linear(1, threads), &p);
        assert!(at(THREADS).is_ok());
        let err = at(2 * THREADS).unwrap_err().to_string();
        assert!(
            err.contains("cad_rope_cache_bf16") && err.contains("__launch_bounds__"),
            "{err}"
        );
    }
}
