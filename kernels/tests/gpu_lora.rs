//! GPU multi-LoRA (`cuda/lora.cu`) against the CPU `add_lora_fused` on `LoraSlots<f32>` holding
//! the same dtype-rounded weights, on every device (see gpu_support).
//!
//! Tolerance, per dtype: `|got - want| <= 1e-5 + eps(dtype) * |want|`: the GPU rounds its f32
//! result to the dtype once (half an ulp, `eps`), and its f32 sums (at most 300 terms of size
//! ~0.05) run in another order than the CPU's, which moves them by ~1e-6.

/// Slot loads on the adapter copy stream.
mod copy_stream;
mod gpu_support;
/// Ranks and scales of many stores in one shared table.
mod slot_table;

use caduceus_kernels::gpu::lora::{
    add_lora_fused, workspace_bytes, DeviceFusedPart, DeviceLoraSlots, FusedLoraArgs, LoraBatch,
    LoraGpuError, LoraUnits, SlotTable,
};
use caduceus_kernels::gpu::{DType, Device, DeviceBuffer};
use caduceus_kernels::lora::{
    self, segments_from_token_slots, FusedPart, LoraError, LoraShape, LoraSlots, Segment,
};
use gpu_support::*;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// One adapter for one projection, in PEFT layouts (`a` `[rank, in_dim]`, `b` `[out_dim, rank]`).
struct Adapter {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

fn adapter(r: &mut ChaCha8Rng, in_dim: usize, out_dim: usize, rank: usize) -> Adapter {
    Adapter {
        a: random(r, rank * in_dim, 0.1),
        b: random(r, out_dim * rank, 0.1),
        rank,
        scale: lora::lora_scale(r.random_range(8.0..32.0), rank, r.random()),
    }
}

/// Slots of the fused q/k/v test: ranks 8, 16, 64 and 128 mixed; slot 1 does not target k,
/// slot 5 targets only k, slot 4 is loaded then cleared.
const SLOT_RANKS: [[usize; 3]; 6] = [
    [8, 8, 8],
    [16, 0, 16],
    [64, 64, 32],
    [128, 128, 128],
    [16, 16, 16],
    [0, 16, 0],
];
const CLEARED_SLOT: usize = 4;
const MAX_RANK: usize = 128;

/// A fused q/k/v projection set: out_dims crossing the 512-output tile, an odd row stride with
/// columns no part owns (the expand's element-by-element path); [`Qkv::aligned`] has whole,
/// aligned output vectors (its vector path) and a tail of part 0 past the last whole one.
struct Qkv {
    dtype: DType,
    in_dim: usize,
    out_dims: [usize; 3],
    offsets: [usize; 3],
    stride: usize,
    cpu: Vec<LoraSlots<f32>>,
    gpu: Vec<DeviceLoraSlots>,
    /// The ranks and scales of `gpu`, when they are its columns (`Qkv::in_table`).
    table: Option<SlotTable>,
}

impl Qkv {
    fn new(dev: &Device, dtype: DType, in_dim: usize, seed: u64) -> Qkv {
        Qkv::with_layout(
            dev,
            dtype,
            in_dim,
            seed,
            ([530, 72, 72], [0, 530, 602], 677),
        )
    }

    fn aligned(dev: &Device, dtype: DType, in_dim: usize, seed: u64) -> Qkv {
        Qkv::with_layout(
            dev,
            dtype,
            in_dim,
            seed,
            ([530, 72, 72], [0, 536, 608], 688),
        )
    }

    /// Parts of `out_dims` at `offsets` in rows of `stride`.
    fn with_layout(
        dev: &Device,
        dtype: DType,
        in_dim: usize,
        seed: u64,
        layout: ([usize; 3], [usize; 3], usize),
    ) -> Qkv {
        Qkv::build(dev, dtype, in_dim, seed, layout, false)
    }

    /// [`Qkv::new`] with the stores' ranks and scales in one [`SlotTable`] (columns q, k, v),
    /// as the GPU engine keeps them.
    fn in_table(dev: &Device, dtype: DType, in_dim: usize, seed: u64) -> Qkv {
        let layout = ([530, 72, 72], [0, 530, 602], 677);
        Qkv::build(dev, dtype, in_dim, seed, layout, true)
    }

    fn build(
        dev: &Device,
        dtype: DType,
        in_dim: usize,
        seed: u64,
        (out_dims, offsets, stride): ([usize; 3], [usize; 3], usize),
        shared: bool,
    ) -> Qkv {
        let table = shared.then(|| SlotTable::new(dev, SLOT_RANKS.len(), 3).unwrap());
        let mut r = rng(seed);
        let (mut cpu, mut gpu) = (Vec::new(), Vec::new());
        for (p, &out_dim) in out_dims.iter().enumerate() {
            let shape = LoraShape {
                num_slots: SLOT_RANKS.len(),
                in_dim,
                out_dim,
                max_rank: MAX_RANK,
            };
            let mut c = LoraSlots::<f32>::new(shape).unwrap();
            let mut g = match &table {
                Some(t) => DeviceLoraSlots::new_in_table(dev, dtype, shape, t, p).unwrap(),
                None => DeviceLoraSlots::new(dev, dtype, shape).unwrap(),
            };
            for (slot, ranks) in SLOT_RANKS.iter().enumerate() {
                if ranks[p] == 0 {
                    continue;
                }
                let ad = adapter(&mut r, in_dim, out_dim, ranks[p]);
                g.load_slot(dev, slot, &ad.a, &ad.b, ad.rank, ad.scale)
                    .unwrap();
                // The reference holds what the device holds: the weights rounded to the dtype.
                let (a, b) = (round(dtype, &ad.a), round(dtype, &ad.b));
                c.load_slot(slot, &a, &b, ad.rank, ad.scale).unwrap();
            }
            g.clear_slot(dev, CLEARED_SLOT).unwrap();
            c.clear_slot(CLEARED_SLOT).unwrap();
            cpu.push(c);
            gpu.push(g);
        }
        if let Some(t) = &table {
            for slot in 0..SLOT_RANKS.len() {
                t.upload_row(&mut &*dev, slot, &gpu).unwrap();
            }
        }
        Qkv {
            dtype,
            in_dim,
            out_dims,
            offsets,
            stride,
            cpu,
            gpu,
            table,
        }
    }

    /// The CPU result for `segments` over `x` and starting output `y0` (both dtype-rounded).
    fn cpu(&self, x: &[f32], segments: &[Segment], y0: &[f32]) -> Vec<f32> {
        let parts: Vec<_> = self
            .cpu
            .iter()
            .zip(self.offsets)
            .map(|(slots, offset)| FusedPart { slots, offset })
            .collect();
        let mut y = y0.to_vec();
        lora::add_lora_fused(&parts, x, segments, &mut y, self.stride).unwrap();
        y
    }

    fn parts(&self) -> Vec<DeviceFusedPart<'_>> {
        self.gpu
            .iter()
            .zip(self.offsets)
            .map(|(slots, offset)| DeviceFusedPart { slots, offset })
            .collect()
    }

    /// The device's output bits after one fused call over `batch`.
    fn gpu(&self, dev: &Device, x: &[f32], batch: &LoraBatch, y0: &[f32]) -> Vec<u16> {
        run_fused(dev, &self.parts(), (x, batch), y0, self.stride)
    }

    /// Random dtype-rounded inputs and starting outputs for `num_tokens` tokens. Every fifth
    /// output starts as -0.0, which any write turns to +0.0 or a delta: a stray write of a zero
    /// delta (a padding column, a missing token of a tile) still changes its bits.
    fn inputs(&self, seed: u64, num_tokens: usize) -> (Vec<f32>, Vec<f32>) {
        let mut r = rng(seed);
        let x = round(self.dtype, &random(&mut r, num_tokens * self.in_dim, 1.0));
        let mut y0 = round(self.dtype, &random(&mut r, num_tokens * self.stride, 1.0));
        y0.iter_mut().step_by(5).for_each(|v| *v = -0.0);
        (x, y0)
    }

    /// Checks the device result against the CPU and that every value no adapter covers (base-only
    /// tokens, cleared slots, projections a slot does not target, columns of no part) kept its bits.
    fn check(&self, what: &str, got: &[u16], x: &[f32], segments: &[Segment], y0: &[f32]) {
        let want = self.cpu(x, segments, y0);
        let got_f32 = bits_to_f32(self.dtype, got);
        assert_close(what, &got_f32, &want, 1e-5, eps(self.dtype));
        let y0_bits = to_bits(self.dtype, y0);
        let mut touched = 0;
        for s in segments {
            for t in s.start..s.start + s.len {
                for col in 0..self.stride {
                    let i = t * self.stride + col;
                    if self.has_delta(s.slot, col) {
                        touched += 1;
                    } else {
                        assert_eq!(got[i], y0_bits[i], "{what}: token {t} column {col} changed");
                    }
                }
            }
        }
        assert!(touched > 0, "{what}: the batch adds some delta");
    }

    /// Whether a token on `slot` gets a delta in output column `col`.
    fn has_delta(&self, slot: Option<u32>, col: usize) -> bool {
        let Some(slot) = slot else { return false };
        (0..3).any(|p| {
            let owns = (self.offsets[p]..self.offsets[p] + self.out_dims[p]).contains(&col);
            owns && self.gpu[p].rank(slot as usize).is_some()
        })
    }
}

/// Uploads `x` and `y0` in the parts' dtype, runs one fused call, returns `y`'s bits.
fn run_fused(
    dev: &Device,
    parts: &[DeviceFusedPart<'_>],
    (x, batch): (&[f32], &LoraBatch),
    y0: &[f32],
    y_stride: usize,
) -> Vec<u16> {
    let dtype = parts.first().map_or(DType::Bf16, |p| p.slots.dtype());
    let (dx, dy) = (upload(dev, dtype, x), upload(dev, dtype, y0));
    let ws_bytes = workspace_bytes(parts, batch.num_tokens());
    let ws = dev.alloc_zeroed(ws_bytes).unwrap();
    let args = FusedLoraArgs {
        parts,
        x: &dx,
        batch,
        workspace: &ws,
        y: &dy,
        y_stride,
    };
    add_lora_fused(dev, &args).unwrap();
    dev.download::<u16>(&dy).unwrap()
}

fn to_bits(dtype: DType, v: &[f32]) -> Vec<u16> {
    match dtype {
        DType::Bf16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_bits())
            .collect(),
        DType::F16 => v
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect(),
    }
}

fn bits_to_f32(dtype: DType, v: &[u16]) -> Vec<f32> {
    match dtype {
        DType::Bf16 => v
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect(),
        DType::F16 => v
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect(),
    }
}

/// Decode tokens on every slot kind, base-only ones among them.
const DECODE_SLOTS: [Option<u32>; 12] = [
    Some(3),
    None,
    Some(0),
    Some(1),
    Some(4),
    Some(2),
    Some(5),
    Some(3),
    None,
    Some(0),
    Some(2),
    Some(1),
];

/// Every token as its own segment: what the CPU path computes for a BGMV batch.
fn token_segments(slots: &[Option<u32>]) -> Vec<Segment> {
    (0..slots.len())
        .map(|t| Segment {
            start: t,
            len: 1,
            slot: slots[t],
        })
        .collect()
}

#[test]
fn bgmv_fused_qkv_matches_the_cpu_with_mixed_ranks() {
    for dev in devices() {
        for dtype in DTYPES {
            // in_dim 300: rows not a multiple of 8 (padded A rows, unaligned x rows).
            let qkv = Qkv::new(&dev, dtype, 300, 1);
            let n = DECODE_SLOTS.len();
            let (x, y0) = qkv.inputs(2, n);
            let batch = LoraBatch::bgmv(&dev, &DECODE_SLOTS).unwrap();
            let got = qkv.gpu(&dev, &x, &batch, &y0);
            let what = format!("{} {dtype:?} bgmv", dev.describe());
            qkv.check(&what, &got, &x, &token_segments(&DECODE_SLOTS), &y0);
        }
    }
}

/// Prefill-like runs: a segment longer than a tile (16), one exactly a tile, short ones, a
/// base-only run, a cleared slot and a slot that targets k alone.
fn prefill_segments() -> Vec<Segment> {
    let runs: [(usize, Option<u32>); 7] = [
        (17, Some(2)),
        (2, None),
        (1, Some(0)),
        (5, Some(3)),
        (16, Some(1)),
        (2, Some(4)),
        (3, Some(5)),
    ];
    let mut start = 0;
    runs.iter()
        .map(|&(len, slot)| {
            let s = Segment { start, len, slot };
            start += len;
            s
        })
        .collect()
}

#[test]
fn sgmv_fused_qkv_matches_the_cpu_across_tile_edges() {
    for dev in devices() {
        for dtype in DTYPES {
            // in_dim 1032: rows of whole 16-byte vectors, crossing SGMV's 1024-column chunk.
            let qkv = Qkv::new(&dev, dtype, 1032, 3);
            let segs = prefill_segments();
            let n = segs.iter().map(|s| s.len).sum::<usize>() + 1; // an uncovered last token
            let (x, y0) = qkv.inputs(4, n);
            let batch = LoraBatch::sgmv(&dev, &segs, n).unwrap();
            let got = qkv.gpu(&dev, &x, &batch, &y0);
            let what = format!("{} {dtype:?} sgmv", dev.describe());
            qkv.check(&what, &got, &x, &segs, &y0);
            let last = (n - 1) * qkv.stride..n * qkv.stride;
            assert_eq!(got[last.clone()], to_bits(dtype, &y0[last])[..]);
        }
    }
}

#[test]
fn bgmv_and_sgmv_give_the_same_bits() {
    // A token's delta is the same f32 operations under either mapping (lora.cu), so runs of a
    // shared adapter computed as SGMV tiles equal the same tokens computed one by one. Tiles of
    // 1, 2, 3, 4, 5, 9 and 16 tokens: every token count the kernels round a tile up to. Grouped
    // by adapter (as a decode graph may map them), slots 2 and 3 gather tokens of runs apart,
    // and slot 3's 25 tokens make a full tile and a partial one; the fixed form (a graph's) has
    // as many units as its slots allow tiles, the ones past the real tiles empty.
    let runs = [
        (2, Some(2)),
        (1, None),
        (9, Some(3)),
        (2, Some(1)),
        (4, Some(0)),
        (5, Some(2)),
        (1, Some(4)),
        (3, Some(5)),
        (16, Some(3)),
    ];
    let slots: Vec<Option<u32>> = runs
        .iter()
        .flat_map(|&(len, s)| std::iter::repeat_n(s, len))
        .collect();
    for dev in devices() {
        let dtype = DType::Bf16;
        // in_dim 2100: three splits of 1024 columns cut the rows (which are not whole 16-byte
        // vectors), so the lanes' column order must survive the splits under either mapping;
        // outputs element by element, then as aligned vectors (both expands' paths).
        for qkv in [
            Qkv::new(&dev, dtype, 2100, 5),
            Qkv::aligned(&dev, dtype, 2100, 5),
        ] {
            let (x, y0) = qkv.inputs(6, slots.len());
            let bgmv = qkv.gpu(&dev, &x, &LoraBatch::bgmv(&dev, &slots).unwrap(), &y0);
            let segs = segments_from_token_slots(&slots);
            let sgmv_batch = LoraBatch::sgmv(&dev, &segs, slots.len()).unwrap();
            let sgmv = qkv.gpu(&dev, &x, &sgmv_batch, &y0);
            let what = format!("{} stride {}", dev.describe(), qkv.stride);
            assert!(bgmv == sgmv, "{what}: BGMV and SGMV differ");
            let grouped = qkv.gpu(&dev, &x, &LoraBatch::grouped(&dev, &slots).unwrap(), &y0);
            assert!(bgmv == grouped, "{what}: BGMV and grouped SGMV differ");
            // A graph's form for the stack's slots: more units than tiles, the last empty.
            let fixed = LoraUnits::grouped(&slots, Some(SLOT_RANKS.len())).unwrap();
            assert_eq!(fixed.num_units(), 8, "7 tiles and one empty unit");
            let words = dev.upload(fixed.words()).unwrap();
            let fixed = qkv.gpu(&dev, &x, &fixed.placed_fixed(&words).unwrap(), &y0);
            assert!(bgmv == fixed, "{what}: BGMV and fixed grouped SGMV differ");
            qkv.check(&what, &sgmv, &x, &segs, &y0);
        }
    }
}

#[test]
fn a_single_part_call_adds_into_its_columns_only() {
    // o or down: one part, written at an offset of a wider row.
    for dev in devices() {
        let dtype = DType::F16;
        let qkv = Qkv::new(&dev, dtype, 300, 7);
        let part = [DeviceFusedPart {
            slots: &qkv.gpu[1],
            offset: 530,
        }];
        let tokens = [Some(5), Some(1), Some(3), None];
        let batch = LoraBatch::bgmv(&dev, &tokens).unwrap();
        let (x, y0) = qkv.inputs(8, tokens.len());
        let bits = run_fused(&dev, &part, (&x, &batch), &y0, qkv.stride);
        let mut want = y0.clone();
        let cpu = [FusedPart {
            slots: &qkv.cpu[1],
            offset: 530,
        }];
        lora::add_lora_fused(&cpu, &x, &token_segments(&tokens), &mut want, qkv.stride).unwrap();
        let got = bits_to_f32(dtype, &bits);
        assert_close(&dev.describe(), &got, &want, 1e-5, eps(dtype));
        // Slot 1 has no k adapter: token 1's row keeps its bits.
        let row = qkv.stride..2 * qkv.stride;
        assert_eq!(bits[row.clone()], to_bits(dtype, &y0[row])[..]);
    }
}

fn expect_lora_err(r: Result<(), LoraGpuError>, want: LoraError) {
    match r {
        Err(LoraGpuError::Lora(e)) => assert_eq!(e, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

#[test]
fn bad_slots_segments_and_output_rows_are_refused() {
    let dev = &devices()[0];
    let dtype = DType::Bf16;
    let shape = LoraShape {
        num_slots: 2,
        in_dim: 16,
        out_dim: 8,
        max_rank: 8,
    };
    let mut slots = DeviceLoraSlots::new(dev, dtype, shape).unwrap();
    let (a, b) = (vec![0.5; 4 * 16], vec![0.5; 8 * 4]);
    expect_lora_err(
        slots.load_slot(dev, 2, &a, &b, 4, 1.0),
        LoraError::SlotOutOfRange {
            slot: 2,
            num_slots: 2,
        },
    );
    expect_lora_err(
        slots.load_slot(dev, 0, &a, &b, 9, 1.0),
        LoraError::BadRank {
            rank: 9,
            max_rank: 8,
        },
    );
    expect_lora_err(
        slots.load_slot(dev, 0, &a[1..], &b, 4, 1.0),
        LoraError::LengthMismatch {
            what: "lora_A",
            expected: 64,
            actual: 63,
        },
    );
    slots.load_slot(dev, 0, &a, &b, 4, 1.0).unwrap();
    let bad_seg = [
        Segment {
            start: 0,
            len: 2,
            slot: Some(0),
        },
        Segment {
            start: 1,
            len: 1,
            slot: None,
        },
    ];
    match LoraBatch::sgmv(dev, &bad_seg, 3) {
        Err(LoraGpuError::Lora(LoraError::BadSegment { index: 1, .. })) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("overlapping segments accepted"),
    }
    let (x, y) = (zeros(dev, dtype, 2 * 16), zeros(dev, dtype, 2 * 8));
    let ws = dev.alloc_zeroed(2 * 8 * 4).unwrap();
    let part = [DeviceFusedPart {
        slots: &slots,
        offset: 0,
    }];
    let call = |batch: &LoraBatch, y_stride: usize, y: &DeviceBuffer| {
        let args = FusedLoraArgs {
            parts: &part,
            x: &x,
            batch,
            workspace: &ws,
            y,
            y_stride,
        };
        add_lora_fused(dev, &args)
    };
    let far = LoraBatch::bgmv(dev, &[Some(0), Some(2)]).unwrap();
    let err = LoraError::SlotOutOfRange {
        slot: 2,
        num_slots: 2,
    };
    expect_lora_err(call(&far, 8, &y), err);
    let ok = LoraBatch::bgmv(dev, &[Some(0), None]).unwrap();
    let err = LoraError::BadOutputRows {
        stride: 7,
        offset: 0,
        out_dim: 8,
    };
    expect_lora_err(call(&ok, 7, &y), err);
    match call(&ok, 9, &y) {
        Err(LoraGpuError::Gpu(e)) => assert!(e.to_string().contains("lora y"), "{e}"),
        other => panic!("a short y accepted: {other:?}"),
    }
    call(&ok, 8, &y).unwrap();
}

#[test]
fn batches_without_adapters_for_a_call_leave_y_alone() {
    for dev in devices() {
        let dtype = DType::Bf16;
        let qkv = Qkv::new(&dev, dtype, 16, 9);
        let (x, y0) = qkv.inputs(10, 3);
        let want = to_bits(dtype, &y0);
        // Base-only tokens, and a slot that holds nothing for k (slot 1) on a k-only call.
        for tokens in [[None, None, None], [Some(1), None, Some(1)]] {
            let batch = LoraBatch::bgmv(&dev, &tokens).unwrap();
            let k_only = [DeviceFusedPart {
                slots: &qkv.gpu[1],
                offset: 530,
            }];
            for parts in [&k_only[..], &[]] {
                let got = run_fused(&dev, parts, (&x, &batch), &y0, qkv.stride);
                assert_eq!(got, want);
            }
        }
    }
}

#[test]
fn reloading_a_slot_with_a_smaller_rank_replaces_the_adapter() {
    for dev in devices() {
        let dtype = DType::F16;
        let shape = LoraShape {
            num_slots: 2,
            in_dim: 40,
            out_dim: 24,
            max_rank: 32,
        };
        let mut gpu = DeviceLoraSlots::new(&dev, dtype, shape).unwrap();
        let mut cpu = LoraSlots::<f32>::new(shape).unwrap();
        let mut r = rng(11);
        for rank in [32, 8] {
            let ad = adapter(&mut r, shape.in_dim, shape.out_dim, rank);
            gpu.load_slot(&dev, 1, &ad.a, &ad.b, rank, ad.scale)
                .unwrap();
            let (a, b) = (round(dtype, &ad.a), round(dtype, &ad.b));
            cpu.load_slot(1, &a, &b, rank, ad.scale).unwrap();
        }
        assert_eq!(gpu.rank(1), Some(8));
        let tokens = [Some(1), Some(1)];
        let x = round(dtype, &random(&mut r, 2 * shape.in_dim, 1.0));
        let y0 = round(dtype, &random(&mut r, 2 * shape.out_dim, 1.0));
        let part = [DeviceFusedPart {
            slots: &gpu,
            offset: 0,
        }];
        let batch = LoraBatch::bgmv(&dev, &tokens).unwrap();
        let bits = run_fused(&dev, &part, (&x, &batch), &y0, shape.out_dim);
        let mut want = y0.clone();
        let cpu_part = [FusedPart {
            slots: &cpu,
            offset: 0,
        }];
        let segs = token_segments(&tokens);
        lora::add_lora_fused(&cpu_part, &x, &segs, &mut want, shape.out_dim).unwrap();
        let got = bits_to_f32(dtype, &bits);
        assert_close(&dev.describe(), &got, &want, 1e-5, eps(dtype));
    }
}
