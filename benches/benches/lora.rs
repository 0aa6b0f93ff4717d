//! Per-token LoRA deltas at SmolLM2-135M's shapes (hidden 576, q/o 576->576, k/v 576->192,
//! gate/up 576->1536, down 1536->576), against the base Q4_1 matmuls of the same layer (fused QKV
//! and gate/up as the model runs them). Each iteration is one layer: all seven projections.
//! - `decode16_r{8,16,64}`: 16 decode tokens, each with its own adapter of that rank (16 BGMV
//!   tokens per projection): the case is `decode16_r16`;
//! - `decode16_cached`: 16 one-token segments (BGMV) all on one rank-16 adapter: the per-token
//!   work of `decode16_r16` with its weights in cache, i.e. its cost without the weight reads;
//! - `decode16_shared`: the same 16 tokens all on one rank-16 adapter (one SGMV segment);
//! - `prefill128`: one 128-token prefill segment on one rank-16 adapter (SGMV).
//!
//! Adapters are stored as f32, f16, bf16 and Q8 (`lora_f32`, ...). Before the criterion runs, a
//! summary measures every case's LoRA time per kind against the base layer in interleaved rounds
//! (so a busy machine slows both sides alike) and prints the ratios; for a case with a distinct
//! adapter per token it adds a `read` row: the same calls only moving the bytes a Q8 store holds
//! for those tokens into L1 (the floor under any kernel of that format). `LORA_LAYERS=30` cycles
//! through 30 layers' weights so they come from L3/memory as in a whole model rather than from L2.
//! `LORA_WITH_BASE=1` runs each layer's base products before its LoRA calls, as a forward pass
//! does, and reports what the LoRA calls add (the base's weights then compete with the adapters'
//! for the caches). The LoRA calls are fused per input as the model makes them (q/k/v, o,
//! gate/up, down), and the summary runs on a pool thread as the engine's forward pass does.
//! Thread count comes from RAYON_NUM_THREADS; `LORA_SUMMARY=0` skips the summary;
//! `LORA_CASES=decode16_r16,...` and `LORA_KINDS=q8,...` limit it to those cases and kinds.
//!
//! `RAYON_NUM_THREADS=1 cargo bench -p caduceus-benches --bench lora`

use caduceus_kernels::lora::{
    add_lora_fused, bf16, f16, segments_from_token_slots, FusedPart, LoraShape, LoraSlots,
    LoraWeight, Segment, Q8,
};
use caduceus_kernels::quant::{matmul, Matrix};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::prelude::*;
use std::time::{Duration, Instant};

const HIDDEN: usize = 576;
const FFN: usize = 1536;
const NUM_SLOTS: usize = 16;
/// (in_dim, out_dim) of q, k, v, o, gate, up, down.
const PROJECTIONS: [(usize, usize); 7] = [
    (HIDDEN, HIDDEN),
    (HIDDEN, 192),
    (HIDDEN, 192),
    (HIDDEN, HIDDEN),
    (HIDDEN, FFN),
    (HIDDEN, FFN),
    (FFN, HIDDEN),
];

/// Deterministic pseudo-random values in [-1, 1) (an LCG: benches need no statistical quality).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// One layer's adapter slots: seven projections, `NUM_SLOTS` adapters of `rank` each.
fn lora_layer<W: LoraWeight>(seed: u64, rank: usize) -> Vec<LoraSlots<W>> {
    PROJECTIONS
        .iter()
        .enumerate()
        .map(|(p, &(in_dim, out_dim))| {
            let shape = LoraShape {
                num_slots: NUM_SLOTS,
                in_dim,
                out_dim,
                max_rank: rank,
            };
            let mut slots = LoraSlots::new(shape).unwrap();
            for s in 0..NUM_SLOTS {
                let seed = seed * 1000 + (p * NUM_SLOTS + s) as u64;
                let a = values(rank * in_dim, seed);
                let b = values(out_dim * rank, seed + 500);
                slots.load_slot(s, &a, &b, rank, 2.0).unwrap();
            }
            slots
        })
        .collect()
}

/// One layer's base weights as the model holds them: fused QKV, o, fused gate/up, down.
fn base_layer(seed: u64) -> Vec<Matrix> {
    [
        (960, HIDDEN),
        (HIDDEN, HIDDEN),
        (2 * FFN, HIDDEN),
        (HIDDEN, FFN),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(rows, cols))| {
        let w = values(rows * cols, seed * 10 + i as u64);
        Matrix::quantize_q4_1(rows, cols, &w).into_fast()
    })
    .collect()
}

fn num_layers() -> usize {
    std::env::var("LORA_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// A batch: its name, tokens, adapter rank and segments.
struct Case {
    name: &'static str,
    num_tokens: usize,
    rank: usize,
    segments: Vec<Segment>,
}

fn cases() -> Vec<Case> {
    let distinct: Vec<Option<u32>> = (0..16).map(Some).collect();
    let decode = |name, rank| Case {
        name,
        num_tokens: 16,
        rank,
        segments: segments_from_token_slots(&distinct),
    };
    vec![
        decode("decode16_r16", 16),
        decode("decode16_r8", 8),
        decode("decode16_r64", 64),
        Case {
            name: "decode16_cached",
            num_tokens: 16,
            rank: 16,
            segments: (0..16)
                .map(|start| Segment {
                    start,
                    len: 1,
                    slot: Some(3),
                })
                .collect(),
        },
        Case {
            name: "decode16_shared",
            num_tokens: 16,
            rank: 16,
            segments: segments_from_token_slots(&[Some(3); 16]),
        },
        Case {
            name: "prefill128",
            num_tokens: 128,
            rank: 16,
            segments: segments_from_token_slots(&[Some(3); 128]),
        },
    ]
}

/// One layer of work per call, cycling through the layers.
type Runner = Box<dyn FnMut() + Send>;

/// The base layer for `num_tokens` tokens.
fn base_runner(layers: usize, num_tokens: usize) -> Runner {
    let base: Vec<Vec<Matrix>> = (0..layers).map(|l| base_layer(l as u64)).collect();
    let xs: Vec<Vec<f32>> = base[0]
        .iter()
        .map(|w| values(num_tokens * w.cols(), 8))
        .collect();
    let mut ys: Vec<Vec<f32>> = base[0]
        .iter()
        .map(|w| vec![0.0; num_tokens * w.rows()])
        .collect();
    let mut next = 0;
    Box::new(move || {
        for ((w, x), y) in base[next].iter().zip(&xs).zip(&mut ys) {
            matmul(x, w, y);
        }
        next = (next + 1) % base.len();
    })
}

/// Projections sharing an input, as the model fuses them (indices into [`PROJECTIONS`]).
const GROUPS: [&[usize]; 4] = [&[0, 1, 2], &[3], &[4, 5], &[6]];

/// The fused output width of a group: its projections' outputs side by side.
fn group_width(members: &[usize]) -> usize {
    members.iter().map(|&p| PROJECTIONS[p].1).sum()
}

/// The LoRA part of one layer for `case`, adapters stored as `W`, one fused call per input as the
/// model makes them (q/k/v, o, gate/up, down). With `base`, each call first runs that layer's
/// base products, as a forward pass interleaves them (the base's weights then compete with the
/// adapters' for the caches).
fn lora_runner<W: LoraWeight>(layers: usize, case: &Case, base: bool) -> Runner {
    let lora: Vec<Vec<LoraSlots<W>>> = (0..layers)
        .map(|l| lora_layer(l as u64, case.rank))
        .collect();
    let mut base = base.then(|| base_runner(layers, case.num_tokens));
    let n = case.num_tokens;
    let xs: Vec<Vec<f32>> = GROUPS
        .iter()
        .map(|p| values(n * PROJECTIONS[p[0]].0, 7))
        .collect();
    let mut ys: Vec<Vec<f32>> = GROUPS
        .iter()
        .map(|p| vec![0.0; n * group_width(p)])
        .collect();
    let segments = case.segments.clone();
    let mut next = 0;
    Box::new(move || {
        if let Some(base) = base.as_mut() {
            base();
        }
        for ((members, x), y) in GROUPS.iter().zip(&xs).zip(&mut ys) {
            let mut offset = 0;
            let parts: Vec<FusedPart<'_, W>> = members
                .iter()
                .map(|&p| {
                    let slots = &lora[next][p];
                    let part = FusedPart { slots, offset };
                    offset += slots.out_dim();
                    part
                })
                .collect();
            add_lora_fused(&parts, x, &segments, y, group_width(members)).unwrap();
        }
        next = (next + 1) % lora.len();
    })
}

/// How far ahead [`read_floor_runner`] hints its reads, as the kernels do (the hardware streamer
/// stops at every 4 KiB page).
const READ_AHEAD: usize = 1024;

/// Hints the line at `region[at]` into L1 (nothing past the region's end).
fn hint_ahead(region: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = region.get(at) {
        // SAFETY: a prefetch has no architectural effect; the address is inside `region`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (p as *const u8).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (region, at);
}

/// The floor under any kernel for `case` with 8-bit weights: the same calls (one per input, each
/// unit of tokens in parallel) reading the bytes a Q8 store holds for each token's slot (A rows and
/// B panels of every part, at their places in per-projection arrays) and doing nothing else.
fn read_floor_runner(layers: usize, case: &Case) -> Runner {
    // [layer][projection] = (A bytes of every slot, B bytes of every slot); written, so that the
    // pages are real memory rather than the shared zero page.
    let weights: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (0..layers)
        .map(|_| {
            PROJECTIONS
                .iter()
                .map(|&(in_dim, out_dim)| {
                    (
                        vec![1; NUM_SLOTS * case.rank * in_dim],
                        vec![1; NUM_SLOTS * case.rank * out_dim],
                    )
                })
                .collect()
        })
        .collect();
    // One unit per token (BGMV, as decode runs), naming its slot.
    let units: Vec<usize> = case
        .segments
        .iter()
        .filter_map(|s| s.slot.map(|slot| (s.len, slot as usize)))
        .flat_map(|(len, slot)| std::iter::repeat_n(slot, len))
        .collect();
    let rank = case.rank;
    let mut next = 0;
    Box::new(move || {
        let layer = &weights[next];
        for members in GROUPS {
            let read = |&slot: &usize| -> u64 {
                let mut sum = 0u64;
                for &p in members {
                    let (in_dim, out_dim) = PROJECTIONS[p];
                    let (a, b) = &layer[p];
                    let a = &a[slot * rank * in_dim..][..rank * in_dim];
                    let b = &b[slot * rank * out_dim..][..rank * out_dim];
                    for region in [a, b] {
                        for (i, line) in region.chunks_exact(64).enumerate() {
                            hint_ahead(region, i * 64 + READ_AHEAD);
                            // One word per line moves the whole line: the traffic without the work.
                            let word: [u8; 8] = line[..8].try_into().unwrap_or_default();
                            sum = sum.wrapping_add(u64::from_le_bytes(word));
                        }
                    }
                }
                sum
            };
            let total: u64 = if rayon::current_num_threads() > 1 {
                units.par_iter().with_max_len(1).map(read).sum()
            } else {
                units.iter().map(read).sum()
            };
            std::hint::black_box(total);
        }
        next = (next + 1) % weights.len();
    })
}

/// The weight kinds, each with the constructor of its runner (built one at a time: 30 layers of
/// rank-64 f32 adapters take over a gigabyte).
type MakeRunner = fn(usize, &Case, bool) -> Runner;
const KINDS: [(&str, MakeRunner); 4] = [
    ("f32", lora_runner::<f32>),
    ("f16", lora_runner::<f16>),
    ("bf16", lora_runner::<bf16>),
    ("q8", lora_runner::<Q8>),
];

/// Median over rounds of the per-call time of each runner, the runners taking turns in every round.
fn interleaved_us(runners: &mut [&mut Runner]) -> Vec<f64> {
    const ROUNDS: usize = 15;
    const ROUND: Duration = Duration::from_millis(40);
    for r in runners.iter_mut() {
        for _ in 0..20 {
            r();
        }
    }
    let mut samples = vec![Vec::with_capacity(ROUNDS); runners.len()];
    for _ in 0..ROUNDS {
        for (r, s) in runners.iter_mut().zip(&mut samples) {
            let (start, mut calls) = (Instant::now(), 0u32);
            while start.elapsed() < ROUND {
                r();
                calls += 1;
            }
            s.push(start.elapsed().as_secs_f64() * 1e6 / calls as f64);
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect()
}

/// One row of the summary: a case, what ran it, its time and the base layer's.
fn print_row(case: &str, kind: &str, lora_us: f64, base_us: f64) {
    println!(
        "{case:<16} {kind:>5} {lora_us:>12.1} {base_us:>12.1} {:>7.3}",
        lora_us / base_us
    );
}

/// Prints, per case and weight kind, the LoRA time of one layer, the base layer's and their ratio.
fn summary(layers: usize, threads: &str) {
    println!("\nLoRA vs base Q4_1 layer (SmolLM2-135M shapes), threads {threads}, layers {layers}");
    println!(
        "{:<16} {:>5} {:>12} {:>12} {:>7}",
        "case", "kind", "lora (us)", "base (us)", "ratio"
    );
    let only = |var: &str, name: &str| {
        std::env::var(var).map_or(true, |v| v.split(',').any(|x| x == name))
    };
    let with_base = std::env::var("LORA_WITH_BASE").is_ok_and(|v| v == "1");
    for case in cases().into_iter().filter(|c| only("LORA_CASES", c.name)) {
        let mut base = base_runner(layers, case.num_tokens);
        for (kind, make) in KINDS.iter().filter(|(k, _)| only("LORA_KINDS", k)) {
            let mut lora = make(layers, &case, with_base);
            // On a pool thread, as the engine's forward pass runs: its kernels fork and join
            // inside the pool instead of paying two cross-thread wake-ups per call.
            let t = rayon::scope(|_| interleaved_us(&mut [&mut base, &mut lora]));
            // With the base inside the LoRA runner, LoRA's cost is what it adds.
            let lora_us = if with_base { t[1] - t[0] } else { t[1] };
            print_row(case.name, kind, lora_us, t[0]);
        }
        // Distinct adapters per token: how close the Q8 kernel comes to only reading its bytes.
        let slots: std::collections::BTreeSet<_> = case.segments.iter().map(|s| s.slot).collect();
        let distinct = slots.len() == case.num_tokens && case.num_tokens > 1;
        if distinct && only("LORA_KINDS", "q8") && !with_base {
            let mut floor = read_floor_runner(layers, &case);
            let t = rayon::scope(|_| interleaved_us(&mut [&mut base, &mut floor]));
            print_row(case.name, "read", t[1], t[0]);
        }
    }
    println!();
}

fn bench(c: &mut Criterion) {
    let layers = num_layers();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".to_string());
    if std::env::var("LORA_SUMMARY").map_or(true, |v| v != "0") {
        summary(layers, &threads);
    }
    let mut group = c.benchmark_group(format!("lora_t{threads}_layers{layers}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for n in [16, 128] {
        let mut base = base_runner(layers, n);
        group.throughput(Throughput::Elements(n as u64));
        let name = if n == 16 { "decode16" } else { "prefill128" };
        group.bench_function(BenchmarkId::new("base_q4_1", name), |b| b.iter(&mut base));
    }
    for case in cases() {
        group.throughput(Throughput::Elements(case.num_tokens as u64));
        for (kind, make) in KINDS {
            let mut lora = make(layers, &case, false);
            let id = BenchmarkId::new(format!("lora_{kind}"), case.name);
            group.bench_function(id, |b| b.iter(&mut lora));
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
