//! Per-token LoRA deltas at SmolLM2-135M's shapes (hidden 576, q/o 576->576, k/v 576->192,
//! gate/up 576->1536, down 1536->576), rank 16, against the base Q4_1 matmuls of the same layer
//! (fused QKV and gate/up as the model runs them):
//! - `decode16`: 16 decode tokens, each with its own adapter (16 BGMV tokens per projection);
//! - `decode16_shared`: the same 16 tokens all on one adapter (one SGMV segment);
//! - `prefill128`: one 128-token prefill segment on one adapter.
//!
//! Adapters are stored as f32, f16 and bf16 (`lora_f32`, ...). Each iteration is one layer (all seven
//! projections). `LORA_LAYERS=30` cycles through 30 layers' weights (~330 MB of f32 adapters for 16
//! slots) so they come from memory as in a whole model rather than from cache. Thread count comes
//! from RAYON_NUM_THREADS.
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p caduceus-benches --bench lora`

use caduceus_kernels::lora::{
    add_lora, bf16, f16, segments_from_token_slots, LoraShape, LoraSlots, LoraWeight, OutputRows,
    Segment,
};
use caduceus_kernels::quant::{matmul, Matrix};
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use std::cell::Cell;
use std::time::Duration;

const HIDDEN: usize = 576;
const FFN: usize = 1536;
const RANK: usize = 16;
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

/// One layer's adapter slots: seven projections, `NUM_SLOTS` rank-16 adapters each.
fn lora_layer<W: LoraWeight>(seed: u64) -> Vec<LoraSlots<W>> {
    PROJECTIONS
        .iter()
        .enumerate()
        .map(|(p, &(in_dim, out_dim))| {
            let shape = LoraShape {
                num_slots: NUM_SLOTS,
                in_dim,
                out_dim,
                max_rank: RANK,
            };
            let mut slots = LoraSlots::new(shape).unwrap();
            for s in 0..NUM_SLOTS {
                let seed = seed * 1000 + (p * NUM_SLOTS + s) as u64;
                let a = values(RANK * in_dim, seed);
                let b = values(out_dim * RANK, seed + 500);
                slots.load_slot(s, &a, &b, RANK, 2.0).unwrap();
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

/// Calls `f` with the next layer's index on every call (round robin).
fn cycle(layers: usize) -> impl FnMut() -> usize {
    let next = Cell::new(0);
    move || {
        let i = next.get();
        next.set((i + 1) % layers);
        i
    }
}

/// The batches: (name, tokens, segments).
fn cases() -> Vec<(&'static str, usize, Vec<Segment>)> {
    let distinct: Vec<Option<u32>> = (0..16).map(Some).collect();
    vec![
        ("decode16", 16, segments_from_token_slots(&distinct)),
        (
            "decode16_shared",
            16,
            segments_from_token_slots(&[Some(3); 16]),
        ),
        (
            "prefill128",
            128,
            segments_from_token_slots(&[Some(3); 128]),
        ),
    ]
}

/// The LoRA part of one layer for every case, adapters stored as `W`.
fn bench_lora<W: LoraWeight>(group: &mut BenchmarkGroup<'_, WallTime>, layers: usize) {
    let lora: Vec<Vec<LoraSlots<W>>> = (0..layers).map(|l| lora_layer(l as u64)).collect();
    let dtype = format!("{:?}", W::KIND).to_lowercase();
    for (name, n, segments) in cases() {
        let xs: Vec<Vec<f32>> = PROJECTIONS.iter().map(|&(i, _)| values(n * i, 7)).collect();
        let mut ys: Vec<Vec<f32>> = PROJECTIONS.iter().map(|&(_, o)| vec![0.0; n * o]).collect();
        group.throughput(Throughput::Elements(n as u64));
        let mut next = cycle(layers);
        group.bench_function(BenchmarkId::new(format!("lora_{dtype}"), name), |b| {
            b.iter(|| {
                let layer = &lora[next()];
                for ((slots, x), y) in layer.iter().zip(&xs).zip(&mut ys) {
                    let rows = OutputRows::dense(y, slots.out_dim());
                    add_lora(slots, x, &segments, rows).unwrap();
                }
            })
        });
    }
}

fn bench(c: &mut Criterion) {
    let layers = num_layers();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".to_string());
    let mut group = c.benchmark_group(format!("lora_t{threads}_layers{layers}"));
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let base: Vec<Vec<Matrix>> = (0..layers).map(|l| base_layer(l as u64)).collect();
    for (name, n, _) in cases() {
        if name == "decode16_shared" {
            continue; // the same base work as decode16
        }
        let bx: Vec<Vec<f32>> = base[0].iter().map(|w| values(n * w.cols(), 8)).collect();
        let mut by: Vec<Vec<f32>> = base[0].iter().map(|w| vec![0.0; n * w.rows()]).collect();
        group.throughput(Throughput::Elements(n as u64));
        let mut next = cycle(layers);
        group.bench_function(BenchmarkId::new("base_q4_1", name), |b| {
            b.iter(|| {
                for ((w, x), y) in base[next()].iter().zip(&bx).zip(&mut by) {
                    matmul(x, w, y);
                }
            })
        });
    }
    drop(base);
    bench_lora::<f32>(&mut group, layers);
    bench_lora::<f16>(&mut group, layers);
    bench_lora::<bf16>(&mut group, layers);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
