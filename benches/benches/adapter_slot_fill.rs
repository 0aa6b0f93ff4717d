//! Filling one GPU adapter slot with a Llama-3-8B rank-16 adapter on all seven projections
//! (bf16, ~84 MB), on the emulated device (a fill is then host work only, the part that stalls
//! the engine thread; the device copy itself runs on the copy stream):
//! - `image`: building the slot image from the PEFT weights (the adapter loader's thread);
//! - `fill_from_image`: the engine thread's share when the host tier holds the image (a copy
//!   of its bits), what `caduceus serve` on a GPU does;
//! - `fill_from_host_stack`: the engine thread's share when the host tier holds the CPU slots'
//!   f16 stack, which it must read back, transpose and round first (the GPU engine's path
//!   before the image; tools and tests still take it).
//!
//! `cargo bench -p caduceus-benches --features gpu-emu --bench adapter_slot_fill`

use caduceus_kernels::gpu::{DType, Device};
use caduceus_runtime::gpu::lora::{GpuAdapterImage, GpuLoraStack};
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
    let image = GpuAdapterImage::new(&config, &weights, dtype).expect("valid adapter");
    let host = LoraStack::prepare(&config, &weights, LoraDtype::F16).expect("valid adapter");
    let mut g = c.benchmark_group("adapter_slot_fill_8b_r16");
    g.sample_size(10);
    g.bench_function("image", |b| {
        b.iter(|| GpuAdapterImage::new(&config, &weights, dtype).expect("valid adapter"))
    });
    g.bench_function("fill_from_image", |b| {
        b.iter(|| {
            stack
                .load_image_with(&mut &dev, 0, &image)
                .expect("fits the slot")
        })
    });
    g.bench_function("fill_from_host_stack", |b| {
        b.iter(|| stack.load_prepared(&dev, 0, &host).expect("fits the slot"))
    });
    g.finish();
}

criterion_group!(benches, slot_fill);
criterion_main!(benches);
