//! The adapter loader's work for one cold Llama-3-8B rank-16 adapter on all seven projections
//! (PEFT f32 safetensors, ~168 MB, read from the page cache), phase by phase, as one loader
//! thread does it for a GPU engine:
//! - `read_validate`: `with_adapter` with nothing to build (read the file, hash it for the
//!   generation, parse and check every tensor);
//! - `widen`: `load_adapter` (that, then every value widened into f32 weights: what the CPU
//!   slots are built from);
//! - `image`: the device slots' image from f32 weights (rounded to bf16, B transposed), in
//!   ordinary memory (what the loader keeps when the pinned pool is full);
//! - `image_pinned`: the same written straight into pool pages;
//! - `all`: what the loader does for a GPU engine: `with_adapter`, the image built from the
//!   file's bytes as `PreparedAdapter::prepare` keeps it (pinned);
//! - `all_via_f32`: the same through f32 weights (`load_adapter`, then the image), the path
//!   before the loader built images from the file's bytes.
//!
//! `cargo bench -p caduceus-benches --features gpu-emu --bench adapter_load`

use caduceus_kernels::gpu::{DType, Device};
use caduceus_runtime::adapters::make::write_synthetic_adapters;
use caduceus_runtime::adapters::{
    load_adapter, with_adapter, AdapterError, AdapterLimits, Projection,
};
use caduceus_runtime::gpu::lora::{adapter_pool, image_bytes, GpuAdapterImage};
use caduceus_runtime::gpu::random_model::config_for;
use caduceus_runtime::gpu::roofline::ModelShape;
use criterion::{criterion_group, criterion_main, Criterion};

fn adapter_load(c: &mut Criterion) {
    let config = config_for(&ModelShape::LLAMA3_8B, 8192).expect("the 8B shape is valid");
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let dirs = write_synthetic_adapters(&config, scratch.path(), 1, 16, &Projection::ALL, 3, 32.0)
        .expect("the adapter is written");
    let dir = &dirs[0];
    let limits = AdapterLimits {
        max_rank: 16,
        max_file_bytes: u64::MAX,
    };
    let dtype = DType::Bf16;
    let pool =
        adapter_pool(&Device::emulated(), 2 * image_bytes(&config, 16)).expect("a pinned pool");
    let weights = load_adapter(dir, &config, &limits).expect("a valid adapter");
    let mut g = c.benchmark_group("adapter_load_8b_r16");
    g.sample_size(10);
    g.bench_function("read_validate", |b| {
        b.iter(|| {
            with_adapter(dir, &config, &limits, |t| {
                Ok::<_, AdapterError>(t.generation)
            })
            .expect("a valid adapter")
        })
    });
    g.bench_function("widen", |b| {
        b.iter(|| load_adapter(dir, &config, &limits).expect("a valid adapter"))
    });
    g.bench_function("image", |b| {
        b.iter(|| {
            GpuAdapterImage::new(&config, &weights.tensors(), dtype).expect("a valid adapter")
        })
    });
    g.bench_function("image_pinned", |b| {
        b.iter(|| {
            GpuAdapterImage::new_pinned(&config, &weights.tensors(), dtype, &pool)
                .expect("a valid adapter")
                .expect("the pool has room")
        })
    });
    let pinned = |i: Result<GpuAdapterImage, _>| {
        let i = i.expect("a valid adapter");
        assert!(i.is_pinned(), "the pool has room");
        i
    };
    g.bench_function("all", |b| {
        b.iter(|| {
            with_adapter(dir, &config, &limits, |t| {
                Ok::<_, AdapterError>(pinned(GpuAdapterImage::prepare(
                    &config,
                    t,
                    dtype,
                    Some(&pool),
                )))
            })
            .expect("a valid adapter")
        })
    });
    g.bench_function("all_via_f32", |b| {
        b.iter(|| {
            let w = load_adapter(dir, &config, &limits).expect("a valid adapter");
            pinned(GpuAdapterImage::prepare(
                &config,
                &w.tensors(),
                dtype,
                Some(&pool),
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, adapter_load);
criterion_main!(benches);
