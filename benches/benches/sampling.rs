//! One row's token choice on the CPU (`kernels::sampling::choose_token`): greedy and the usual
//! truncations over a 49,152-token vocabulary (SmolLM2's), rows shaped like a real model's
//! logits (SmolLM2's rows: a bulk with a spread of ~3.5, a few dozen leaders 10-18 above it),
//! no penalties. The CPU engine samples each row of a step on the compute pool, so this cost
//! is paid per request per step, beside a forward of a few milliseconds per token.
//!
//! `cargo bench -p caduceus-benches --bench sampling`

use caduceus_kernels::sampling::{choose_token, Penalties, RowSampling, SampleScratch, Truncation};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

const VOCAB: usize = 49152;
const ROWS: usize = 16;
const LEADERS: usize = 30;

/// A row like a real model's: a roughly normal bulk (sum of four uniforms) and a few leaders.
fn row(r: &mut ChaCha8Rng) -> Vec<f32> {
    let mut row: Vec<f32> = (0..VOCAB)
        .map(|_| (0..4).map(|_| r.random_range(-3.0f32..3.0)).sum())
        .collect();
    for _ in 0..LEADERS {
        row[r.random_range(0..VOCAB)] = r.random_range(10.0..18.0);
    }
    row
}

fn truncation(temperature: f32, top_k: u32, top_p: f32, min_p: f32) -> Option<Truncation> {
    Some(Truncation {
        temperature,
        top_k,
        top_p,
        min_p,
    })
}

fn bench(c: &mut Criterion) {
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let rows: Vec<Vec<f32>> = (0..ROWS).map(|_| row(&mut r)).collect();
    let configs = [
        ("greedy", None),
        ("t1.0", truncation(1.0, 0, 1.0, 0.0)),
        ("t0.8_p0.9", truncation(0.8, 0, 0.9, 0.0)),
        ("t1.0_p0.95", truncation(1.0, 0, 0.95, 0.0)),
        ("t0.7_k50_p0.95", truncation(0.7, 50, 0.95, 0.0)),
        ("t1.0_minp0.05", truncation(1.0, 0, 1.0, 0.05)),
    ];
    let mut g = c.benchmark_group("choose_token");
    g.throughput(Throughput::Elements(ROWS as u64));
    for (name, truncation) in configs {
        let s = RowSampling {
            penalties: Penalties::default(),
            truncation,
        };
        let mut scratch = SampleScratch::default();
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut u = 0.0f64;
            b.iter(|| {
                for row in &rows {
                    u = (u + 0.618_034) % 1.0;
                    black_box(choose_token(row, &[], &s, u, &mut scratch));
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
