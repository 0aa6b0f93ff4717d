//! Filling one GPU adapter slot with a Llama-3-8B rank-16 adapter on all seven projections
//! (bf16, ~84 MB), on the emulated device (a fill is then host work only, the part that stalls
//! the engine thread; the device copy itself runs on the copy stream, untimed here). What the
//! loader's thread does before, building the image, is the `adapter_load` bench.
//! - `fill_pinned`: the engine thread's share when the host tier holds the image in pinned
//!   pages, what `caduceus serve` on a GPU does: queueing a DMA per piece, no copy of its own;
//! - `fill_staged`: the same for an image in ordinary memory (a full pool): its bits are copied
//!   into the copy stream's pinned staging ring first;
//! - `fill_from_host_stack`: the engine thread's share when the host tier holds the CPU slots'
//!   f16 stack, which it must read back, transpose and round first (the GPU engine's path
//!   before the image; tools and tests still take it).
//!
//! `cargo bench -p caduceus-benches --features gpu-emu --bench adapter_slot_fill`

use std::time::{Duration, Instant};

use caduceus_kernels::gpu::{DType, Device};
use caduceus_runtime::gpu::adapter_copies::AdapterCopies;
use caduceus_runtime::gpu::lora::{adapter_pool, image_bytes, GpuAdapterImage, GpuLoraStack};
use caduceus_runtime::gpu::random_model::{config_for, random_adapter};
use caduceus_runtime::gpu::roofline::ModelShape;
use caduceus_runtime::model::lora::{LoraDtype, LoraStack};
use criterion::{criterion_group, criterion_main, Criterion};

fn slot_fill(c: &mut Criterion) {
    let config = config_for(&ModelShape::LLAMA3_8B, 8192).expect("the 8B shape is valid");
    let weights = random_adapter(&config, 16, 7);
    let dtype = DType::Bf16;
    let dev = Device::emulated();
    let mut stack = GpuLoraStack::new(&dev, dtype, &config, 1, 16).expect("one 8B slot fits");
    let slot_bytes = stack.nbytes();
    let mut copies = AdapterCopies::new(&dev, 1, slot_bytes).expect("a copy stream");
    let image = GpuAdapterImage::new(&config, &weights.tensors(), dtype).expect("valid adapter");
    let pool = adapter_pool(&dev, image_bytes(&config, 16)).expect("a pinned pool");
    let pinned = GpuAdapterImage::new_pinned(&config, &weights.tensors(), dtype, &pool)
        .expect("valid adapter")
        .expect("the pool holds the image");
    let host = LoraStack::prepare(&config, &weights, LoraDtype::F16).expect("valid adapter");
    let mut g = c.benchmark_group("adapter_slot_fill_8b_r16");
    g.sample_size(10);
    // Each fill is timed up to its return (what the engine thread spends); the copy stream then
    // runs its queue, untimed, as the device would meanwhile.
    let mut fill = |b: &mut criterion::Bencher, image: &GpuAdapterImage| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                copies
                    .load(&dev, &mut stack, 0, image)
                    .expect("fits the slot");
                total += start.elapsed();
                copies.stream_mut().synchronize().expect("the copies run");
            }
            total
        })
    };
    g.bench_function("fill_pinned", |b| fill(b, &pinned));
    g.bench_function("fill_staged", |b| fill(b, &image));
    g.bench_function("fill_from_host_stack", |b| {
        b.iter(|| stack.load_prepared(&dev, 0, &host).expect("fits the slot"))
    });
    g.finish();
}

criterion_group!(benches, slot_fill);
criterion_main!(benches);
