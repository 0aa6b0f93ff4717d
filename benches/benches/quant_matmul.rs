//! Quantized matmul at the default model's shapes (SmolLM2-135M: hidden 576, FFN 1536, Q4_1 weights,
//! Q8_0 tied output 49152x576) for 1, 16 and 64 tokens (`QUANT_TOKENS=1,4` overrides). Thread count
//! comes from RAYON_NUM_THREADS; `QUANT_PATH=scalar|avx2` forces a kernel path.
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
    // The default model's products as it runs them: fused qkv and gate/up, o, down, and the tied
    // Q8_0 output head, repacked by `into_fast` exactly as the model loader does.
    let shapes = [
        (
            "qkv_q4_1_960x576",
            Matrix::quantize_q4_1(960, 576, &values(960 * 576, 1)),
        ),
        (
            "o_q4_1_576x576",
            Matrix::quantize_q4_1(576, 576, &values(576 * 576, 2)),
        ),
        (
            "gate_up_q4_1_3072x576",
            Matrix::quantize_q4_1(3072, 576, &values(3072 * 576, 3)),
        ),
        (
            "down_q4_1_576x1536",
            Matrix::quantize_q4_1(576, 1536, &values(576 * 1536, 4)),
        ),
        (
            "head_q8_0_49152x576",
            Matrix::quantize_q8_0(49152, 576, &values(49152 * 576, 5)),
        ),
    ]
    .map(|(name, w)| (name, w.into_fast()));
    let token_counts: Vec<usize> = std::env::var("QUANT_TOKENS")
        .ok()
        .map(|s| s.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64]);
    let path = std::env::var("QUANT_PATH").ok();
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".to_string());
    let mut group = c.benchmark_group(format!("quant_matmul_t{threads}"));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (name, w) in &shapes {
        for &num_tokens in &token_counts {
            let x = values(num_tokens * w.cols(), 9);
            let mut out = vec![0f32; num_tokens * w.rows()];
            group.throughput(Throughput::Elements(num_tokens as u64));
            group.bench_with_input(BenchmarkId::new(*name, num_tokens), &num_tokens, |b, _| {
                b.iter(|| match path.as_deref() {
                    Some("scalar") => {
                        matmul_with_path(&x, w, &mut out, KernelPath::Scalar).unwrap()
                    }
                    Some("avx2") => matmul_with_path(&x, w, &mut out, KernelPath::Avx2).unwrap(),
                    _ => matmul(&x, w, &mut out),
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
