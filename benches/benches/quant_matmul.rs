//! Quantized matmul at the default model's shapes (SmolLM2-135M: hidden 576, FFN 1536, Q4_1 weights,
//! Q8_0 tied output 49152x576) for 1, 16 and 128 tokens. Thread count comes from RAYON_NUM_THREADS.
//!
//! `RAYON_NUM_THREADS=2 cargo bench -p caduceus-benches --bench quant_matmul`

use caduceus_kernels::quant::{matmul, matmul_with_path, KernelPath, Matrix};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

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

fn bench_matmul(c: &mut Criterion) {
    let shapes = [
        (
            "q4_1_576x576",
            Matrix::quantize_q4_1(576, 576, &values(576 * 576, 1)),
        ),
        (
            "q4_1_1536x576",
            Matrix::quantize_q4_1(1536, 576, &values(1536 * 576, 2)),
        ),
        (
            "q4_1_576x1536",
            Matrix::quantize_q4_1(576, 1536, &values(576 * 1536, 3)),
        ),
        (
            "q8_0_49152x576",
            Matrix::quantize_q8_0(49152, 576, &values(49152 * 576, 4)),
        ),
    ];
    let path = std::env::var("QUANT_PATH").ok();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".to_string());
    let mut group = c.benchmark_group(format!("quant_matmul_t{threads}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, w) in &shapes {
        for num_tokens in [1usize, 16, 128] {
            let x = values(num_tokens * w.cols(), 9);
            let mut out = vec![0f32; num_tokens * w.rows()];
            group.throughput(Throughput::Elements(num_tokens as u64));
            group.bench_with_input(BenchmarkId::new(*name, num_tokens), &num_tokens, |b, _| {
                b.iter(|| match path.as_deref() {
                    Some("scalar") => {
                        matmul_with_path(&x, w, &mut out, KernelPath::Scalar).unwrap()
                    }
                    _ => matmul(&x, w, &mut out),
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
