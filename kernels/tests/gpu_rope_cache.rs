//! GPU RoPE fused with the KV cache write (`cuda/rope_cache.cu`) against its CPU twin,
//! `Rope::apply` on q and k followed by `write_kv`, on every device (see gpu_support).

mod gpu_support;

use caduceus_kernels::attention::{KvCacheShape, LayerKvCache, PAD_SLOT};
use caduceus_kernels::gpu::rope_cache::{rope_cache, RopeCacheArgs};
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::{write_kv, Rope, RopeStyle};
use gpu_support::*;

struct Case {
    style: RopeStyle,
    head_dim: usize,
    num_heads: usize,
    num_kv_heads: usize,
    /// Llama-3 rope scaling (frequency factors) instead of plain inverse frequencies.
    llama3: bool,
}

const CASES: [Case; 4] = [
    Case {
        style: RopeStyle::Interleaved,
        head_dim: 64,
        num_heads: 9,
        num_kv_heads: 3,
        llama3: false,
    },
    Case {
        style: RopeStyle::Neox,
        head_dim: 64,
        num_heads: 4,
        num_kv_heads: 4,
        llama3: false,
    },
    Case {
        style: RopeStyle::Interleaved,
        head_dim: 128,
        num_heads: 8,
        num_kv_heads: 1,
        llama3: true,
    },
    Case {
        style: RopeStyle::Neox,
        head_dim: 128,
        num_heads: 8,
        num_kv_heads: 2,
        llama3: true,
    },
];

/// Positions from 0 to far past the largest low-frequency wavelength, a padding token, and two
/// tokens whose slots fall in the same block out of order.
const POSITIONS: [u32; 7] = [0, 1, 17, 255, 4095, 70_000, 131_071];

fn rope_for(c: &Case) -> Rope {
    let factors = c
        .llama3
        .then(|| Rope::llama3_freq_factors(c.head_dim, 500_000.0, 8.0, 1.0, 4.0, 8192));
    Rope::new(c.style, c.head_dim, 500_000.0, factors.as_deref())
}

/// Where rotated q goes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum QDest {
    /// Back into the fused qkv rows.
    InPlace,
    /// A separate contiguous `[tokens, heads * head_dim]` buffer; qkv stays unchanged.
    Out,
}

fn run_case(dev: &Device, dtype: DType, c: &Case, seed: u64) {
    run_case_to(dev, dtype, c, seed, QDest::InPlace)
}

fn run_case_to(dev: &Device, dtype: DType, c: &Case, seed: u64, q_dest: QDest) {
    let what = format!(
        "{} {dtype:?} {:?} hd {} heads {}/{} q {q_dest:?}",
        dev.describe(),
        c.style,
        c.head_dim,
        c.num_heads,
        c.num_kv_heads
    );
    let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
    let shape = KvCacheShape {
        num_blocks: 5,
        block_size: 4,
        num_kv_heads: nkv,
        head_dim: hd,
    };
    let n = POSITIONS.len();
    let (q_len, kv_len) = (nh * hd, nkv * hd);
    let row = q_len + 2 * kv_len;
    let mut r = rng(seed);
    let qkv = round(dtype, &random(&mut r, n * row, 2.0));
    // The cache already holds other tokens: untouched slots must keep them.
    let old_k = round(dtype, &random(&mut r, shape.elems(), 1.0));
    let old_v = round(dtype, &random(&mut r, shape.elems(), 1.0));
    let slots: Vec<u32> = vec![19, 0, 7, PAD_SLOT, 5, 4, 12];

    // CPU twin: split the fused rows, rotate q and k, write k and v.
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for t in qkv.chunks_exact(row) {
        q.extend_from_slice(&t[..q_len]);
        k.extend_from_slice(&t[q_len..q_len + kv_len]);
        v.extend_from_slice(&t[q_len + kv_len..]);
    }
    let rope = rope_for(c);
    rope.apply(&mut q, nh, &POSITIONS);
    rope.apply(&mut k, nkv, &POSITIONS);
    let mut cache = LayerKvCache::new(shape);
    cache.k.copy_from_slice(&old_k);
    cache.v.copy_from_slice(&old_v);
    write_kv(&mut cache, &k, &v, &slots);

    let d_qkv = upload(dev, dtype, &qkv);
    let d_pos = dev.upload(&POSITIONS).unwrap();
    let d_slots = dev.upload(&slots).unwrap();
    let d_freq = dev.upload(rope.inv_freq()).unwrap();
    let (d_k, d_v) = (upload(dev, dtype, &old_k), upload(dev, dtype, &old_v));
    // Poisoned, so a q_out element left unwritten shows.
    let d_q_out = upload(dev, dtype, &vec![f32::NAN; n * q_len]);
    let args = RopeCacheArgs {
        qkv: &d_qkv,
        q_out: (q_dest == QDest::Out).then_some(&d_q_out),
        positions: &d_pos,
        slot_mapping: &d_slots,
        inv_freq: &d_freq,
        style: rope.style(),
        k_cache: &d_k,
        v_cache: &d_v,
        cache: shape,
        num_tokens: n,
        num_heads: nh,
    };
    rope_cache(dev, dtype, &args).unwrap();

    // One rounding to the dtype of an f32 rotation: within half an ulp of the CPU's f32 value,
    // plus the few f32 ulps by which sinf/cosf and FMA contraction may differ.
    let (atol, rtol) = (2e-6, eps(dtype) * 1.001);
    let got_qkv = download(dev, dtype, &d_qkv);
    let got_q_out = download(dev, dtype, &d_q_out);
    for (t, got_row) in got_qkv.chunks_exact(row).enumerate() {
        let got_q = match q_dest {
            QDest::InPlace => &got_row[..q_len],
            QDest::Out => {
                // The fused rows are only read.
                assert_eq!(
                    &got_row[..q_len],
                    &qkv[t * row..t * row + q_len],
                    "{what}: token {t}: q of qkv changed"
                );
                &got_q_out[t * q_len..(t + 1) * q_len]
            }
        };
        assert_close(
            &format!("{what}: q of token {t}"),
            got_q,
            &q[t * q_len..(t + 1) * q_len],
            atol,
            rtol,
        );
        // k and v are read, not rotated in place.
        assert_eq!(
            &got_row[q_len..],
            &qkv[t * row + q_len..(t + 1) * row],
            "{what}: token {t}: k|v of qkv changed"
        );
    }
    if q_dest == QDest::InPlace {
        assert!(
            got_q_out.iter().all(|x| x.is_nan()),
            "{what}: q_out written"
        );
    }
    assert_close(
        &format!("{what}: k cache"),
        &download(dev, dtype, &d_k),
        &cache.k,
        atol,
        rtol,
    );
    // v is copied: bit-exact, and the padding token's row went nowhere.
    assert_eq!(download(dev, dtype, &d_v), cache.v, "{what}: v cache");
}

#[test]
fn rope_cache_matches_rope_apply_then_write_kv() {
    for dev in devices() {
        for dtype in DTYPES {
            for (i, c) in CASES.iter().enumerate() {
                run_case(&dev, dtype, c, 100 + i as u64);
            }
        }
    }
}

/// With `q_out`, rotated q lands contiguous in its own buffer (what the attention kernels read)
/// and the fused qkv rows stay as they were; both pair layouts, GQA and MHA.
#[test]
fn rope_cache_writes_q_out_and_leaves_qkv_alone() {
    for dev in devices() {
        for (i, c) in [&CASES[0], &CASES[3]].into_iter().enumerate() {
            for dtype in DTYPES {
                run_case_to(&dev, dtype, c, 300 + i as u64, QDest::Out);
            }
        }
    }
}

/// Every head dim the attention kernels take besides 64/128 (and the kernel's 256 maximum),
/// both pair layouts: the (cos, sin) table and the 4-pair units at their smallest and largest.
#[test]
fn rope_cache_covers_head_dims_16_to_256() {
    for dev in devices() {
        for (i, head_dim) in [16, 32, 80, 96, 256].into_iter().enumerate() {
            let c = Case {
                style: [RopeStyle::Interleaved, RopeStyle::Neox][i % 2],
                head_dim,
                num_heads: 4,
                num_kv_heads: 2,
                llama3: i == 4,
            };
            for dtype in DTYPES {
                run_case(&dev, dtype, &c, 200 + i as u64);
            }
        }
    }
}

#[test]
fn rope_cache_rejects_bad_shapes() {
    let dev = Device::emulated();
    let dtype = DType::Bf16;
    let buf = zeros(&dev, dtype, 4096);
    // Separate caches: the one call that runs must not write k and v into the same memory.
    let (k_cache, v_cache) = (zeros(&dev, dtype, 4096), zeros(&dev, dtype, 4096));
    let small = dev.alloc_zeroed(4).unwrap();
    let shape = KvCacheShape {
        num_blocks: 2,
        block_size: 2,
        num_kv_heads: 1,
        head_dim: 64,
    };
    let args = |cache, qkv| RopeCacheArgs {
        qkv,
        q_out: None,
        positions: &small,
        slot_mapping: &small,
        inv_freq: &buf,
        style: RopeStyle::Neox,
        k_cache: &k_cache,
        v_cache: &v_cache,
        cache,
        num_tokens: 1,
        num_heads: 2,
    };
    assert!(rope_cache(&dev, dtype, &args(shape, &buf)).is_ok());
    // qkv shorter than one fused row.
    assert!(rope_cache(&dev, dtype, &args(shape, &small)).is_err());
    let odd = KvCacheShape {
        head_dim: 60,
        ..shape
    };
    assert!(rope_cache(&dev, dtype, &args(odd, &buf)).is_err());
    // A q_out shorter than num_tokens x num_heads x head_dim.
    let q_out = zeros(&dev, dtype, 2 * 64 - 1);
    let short_q_out = RopeCacheArgs {
        q_out: Some(&q_out),
        ..args(shape, &buf)
    };
    let err = rope_cache(&dev, dtype, &short_q_out).unwrap_err();
    assert!(err.to_string().contains("q_out"), "{err}");
}
