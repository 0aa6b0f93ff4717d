//! The head dims the attention kernels are instantiated for: one table that both launchers
//! (decode and prefill) pick their kernels from, and the one error naming the supported set.
//!
//! Each `.cu` instantiates its template per head dim (`CAD_DECODE(HD)`, `CAD_PREFILL(D)`, and up
//! to 128 `CAD_PREFILL_TC(D)` and `CAD_DECODE_TC(D)`); adding a head dim means one line in each
//! file and one row here.

use crate::gpu::device::{DType, GpuError};
use crate::gpu::kernel::{kernel_fn, KernelFn};

/// Head dims with attention kernels: the shared tiny Llama (16), Llama 3.2 and SmolLM2 (64),
/// Llama 3 8B (128), and the 32/80/96/256 of other Llama-family models.
pub const SUPPORTED_HEAD_DIMS: [usize; 7] = [16, 32, 64, 80, 96, 128, 256];

/// The kernels of one head dim, each `[bf16, f16]` (the order of [`crate::gpu::ops::by_dtype`]).
pub(crate) struct HeadDimKernels {
    pub head_dim: usize,
    pub decode: [KernelFn; 2],
    pub prefill: [KernelFn; 2],
    /// (token, query head) rows per prefill CTA: `Tile<D>::kRows` in `attention_prefill.cu`.
    pub prefill_rows: usize,
    /// The tensor-core prefill kernels (`attention_prefill_tc.cu`, 64 rows per CTA like the
    /// CUDA-core ones at these head dims); `None` past head_dim 128.
    pub prefill_tc: Option<[KernelFn; 2]>,
    /// The tensor-core decode kernels (`attention_decode_tc.cu`, keys split across warps), at
    /// the head dims of `prefill_tc`.
    pub decode_tc: Option<[KernelFn; 2]>,
}

/// Rows per CTA of the tensor-core prefill kernel: `kRows` in `attention_prefill_tc.cu`.
pub(crate) const PREFILL_TC_ROWS: usize = 64;
/// Bytes of a ring of `stages` K/V tile pairs of `keys` rows each (`cad::KvTile` in
/// `attention_tc.cuh`): rows padded by 8 elements, or with `swizzle` unpadded.
fn kv_ring_bytes(stages: usize, keys: usize, head_dim: usize, swizzle: bool, dtype: DType) -> u32 {
    let stride = if swizzle { head_dim } else { head_dim + 8 };
    (stages * 2 * keys * stride * dtype.size()) as u32
}

/// Dynamic shared memory of the tensor-core prefill kernel at `head_dim`: its K/V ring of 4
/// padded tiles of 32 keys (`kStages`, `kKeys` in `attention_prefill_tc.cu`, which traps when
/// launched with less).
pub(crate) fn prefill_tc_shared_bytes(head_dim: usize, dtype: DType) -> u32 {
    kv_ring_bytes(4, 32, head_dim, false, dtype)
}

/// Query heads per KV head the tensor-core decode kernel takes (`kRows`, one m16 tile).
pub(crate) const DECODE_TC_MAX_GROUP: usize = 16;

/// Dynamic shared memory of the tensor-core decode kernel at `head_dim`: its K/V ring of 3 tiles
/// of 64 keys (`kStages`, `kKeys` in `attention_decode_tc.cu`), rows of a multiple of 64 dims
/// swizzled, others padded: 96 KB at head_dim 128 in 16-bit types, two CTAs per SM.
pub(crate) fn decode_tc_shared_bytes(head_dim: usize, dtype: DType) -> u32 {
    let swizzle = (head_dim / 8).is_multiple_of(8);
    kv_ring_bytes(3, 64, head_dim, swizzle, dtype)
}

macro_rules! head_dim {
    ($hd:expr, $rows:expr, $d_bf16:ident, $d_f16:ident, $p_bf16:ident, $p_f16:ident) => {
        HeadDimKernels {
            head_dim: $hd,
            decode: [kernel_fn!($d_bf16), kernel_fn!($d_f16)],
            prefill: [kernel_fn!($p_bf16), kernel_fn!($p_f16)],
            prefill_rows: $rows,
            prefill_tc: None,
            decode_tc: None,
        }
    };
    ($hd:expr, $rows:expr, $d_bf16:ident, $d_f16:ident, $p_bf16:ident, $p_f16:ident,
     $t_bf16:ident, $t_f16:ident, $dt_bf16:ident, $dt_f16:ident) => {
        HeadDimKernels {
            prefill_tc: Some([kernel_fn!($t_bf16), kernel_fn!($t_f16)]),
            decode_tc: Some([kernel_fn!($dt_bf16), kernel_fn!($dt_f16)]),
            ..head_dim!($hd, $rows, $d_bf16, $d_f16, $p_bf16, $p_f16)
        }
    };
}

#[rustfmt::skip]
const TABLE: [HeadDimKernels; 7] = [
    head_dim!(16, 64, cad_paged_decode_hd16_bf16, cad_paged_decode_hd16_f16,
        cad_paged_attention_prefill_d16_bf16, cad_paged_attention_prefill_d16_f16,
        cad_paged_attention_prefill_tc_d16_bf16, cad_paged_attention_prefill_tc_d16_f16,
        cad_paged_decode_tc_d16_bf16, cad_paged_decode_tc_d16_f16),
    head_dim!(32, 64, cad_paged_decode_hd32_bf16, cad_paged_decode_hd32_f16,
        cad_paged_attention_prefill_d32_bf16, cad_paged_attention_prefill_d32_f16,
        cad_paged_attention_prefill_tc_d32_bf16, cad_paged_attention_prefill_tc_d32_f16,
        cad_paged_decode_tc_d32_bf16, cad_paged_decode_tc_d32_f16),
    head_dim!(64, 64, cad_paged_decode_hd64_bf16, cad_paged_decode_hd64_f16,
        cad_paged_attention_prefill_d64_bf16, cad_paged_attention_prefill_d64_f16,
        cad_paged_attention_prefill_tc_d64_bf16, cad_paged_attention_prefill_tc_d64_f16,
        cad_paged_decode_tc_d64_bf16, cad_paged_decode_tc_d64_f16),
    head_dim!(80, 64, cad_paged_decode_hd80_bf16, cad_paged_decode_hd80_f16,
        cad_paged_attention_prefill_d80_bf16, cad_paged_attention_prefill_d80_f16,
        cad_paged_attention_prefill_tc_d80_bf16, cad_paged_attention_prefill_tc_d80_f16,
        cad_paged_decode_tc_d80_bf16, cad_paged_decode_tc_d80_f16),
    head_dim!(96, 64, cad_paged_decode_hd96_bf16, cad_paged_decode_hd96_f16,
        cad_paged_attention_prefill_d96_bf16, cad_paged_attention_prefill_d96_f16,
        cad_paged_attention_prefill_tc_d96_bf16, cad_paged_attention_prefill_tc_d96_f16,
        cad_paged_decode_tc_d96_bf16, cad_paged_decode_tc_d96_f16),
    head_dim!(128, 64, cad_paged_decode_hd128_bf16, cad_paged_decode_hd128_f16,
        cad_paged_attention_prefill_d128_bf16, cad_paged_attention_prefill_d128_f16,
        cad_paged_attention_prefill_tc_d128_bf16, cad_paged_attention_prefill_tc_d128_f16,
        cad_paged_decode_tc_d128_bf16, cad_paged_decode_tc_d128_f16),
    head_dim!(256, 32, cad_paged_decode_hd256_bf16, cad_paged_decode_hd256_f16,
        cad_paged_attention_prefill_d256_bf16, cad_paged_attention_prefill_d256_f16),
];

/// The kernels for `head_dim`, or an error naming the supported set.
pub(crate) fn kernels_for(head_dim: usize) -> Result<&'static HeadDimKernels, GpuError> {
    TABLE
        .iter()
        .find(|k| k.head_dim == head_dim)
        .ok_or_else(|| {
            GpuError::Shape(format!(
                "head_dim {head_dim} is not supported: the attention kernels are built for \
                 head_dim {SUPPORTED_HEAD_DIMS:?}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_exactly_the_supported_head_dims() {
        let dims: Vec<usize> = TABLE.iter().map(|k| k.head_dim).collect();
        assert_eq!(dims, SUPPORTED_HEAD_DIMS);
        for k in &TABLE {
            let hd = k.head_dim.to_string();
            // Tensor-core prefill and decode kernels exactly up to head_dim 128.
            assert_eq!(k.prefill_tc.is_some(), k.head_dim <= 128, "row {hd}");
            assert_eq!(k.decode_tc.is_some(), k.head_dim <= 128, "row {hd}");
            let tc = k.prefill_tc.iter().chain(&k.decode_tc).flatten();
            for f in k.decode.iter().chain(&k.prefill).chain(tc) {
                assert!(
                    f.name.contains(&format!("d{hd}_")),
                    "{} in row {hd}",
                    f.name
                );
            }
        }
        let err = kernels_for(48)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("head_dim 48") && err.contains("256"), "{err}");
    }

    #[test]
    fn the_decode_ring_fits_the_portable_opt_in_limit() {
        // 3 tiles x (K, V) x 64 keys: swizzled rows (64, 128 dims) unpadded, others padded by 8.
        assert_eq!(
            decode_tc_shared_bytes(128, DType::Bf16),
            3 * 2 * 64 * 128 * 2
        );
        assert_eq!(decode_tc_shared_bytes(64, DType::F16), 3 * 2 * 64 * 64 * 2);
        assert_eq!(decode_tc_shared_bytes(80, DType::Bf16), 3 * 2 * 64 * 88 * 2);
        for k in TABLE.iter().filter(|k| k.decode_tc.is_some()) {
            let bytes = decode_tc_shared_bytes(k.head_dim, DType::Bf16);
            assert!(bytes <= 99 * 1024, "head_dim {}: {bytes}", k.head_dim);
        }
    }
}
