//! The adapter copy stream (`gpu::copy_stream`): copies staged through a ring much smaller than
//! the data land in issue order once the compute stream waits for their event; in emulation
//! nothing past the ring's reuse has landed before that wait (the ordering is observable); and
//! a slot loaded through it feeds the fused LoRA kernels exactly like a direct load; copies
//! straight out of a pinned lease land the same way and keep the lease until they completed.
//! (The pinned copies' CUDA path has never run on a GPU.)

use std::sync::Arc;

use caduceus_kernels::gpu::copy_stream::{CopyStream, StreamKind, StreamOp};
use caduceus_kernels::gpu::lora::{
    DeviceFusedPart, DeviceLoraSlots, LoraBatch, PeftProjection, SlotImage,
};
use caduceus_kernels::gpu::pinned_pool::PinnedPool;
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::lora::LoraShape;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::gpu_support::*;

#[test]
fn staged_copies_land_in_order_through_a_small_ring() {
    for dev in devices() {
        let mut r = rng(7);
        let data: Vec<u8> = (0..1000).map(|_| r.random()).collect();
        let buf = dev.alloc_zeroed(1000).unwrap();
        // Two 64-byte chunks for 1000 bytes: the ring turns over eight times.
        let mut copies = CopyStream::new(&dev, 2, 64).unwrap();
        // The buffer's allocation and zeroing are compute-stream work: copies go after them.
        copies.after_compute(&dev).unwrap();
        copies.record_ops();
        copies.write(&buf, 0, &data.clone()).unwrap(); // the host copy is gone at once
        copies.write(&buf, 996, &[0xdead_beef_u32]).unwrap(); // a later copy wins
        let event = copies.record().unwrap();
        let mut want = data.clone();
        want[996..].copy_from_slice(&0xdead_beef_u32.to_ne_bytes());
        if dev.is_emulated() {
            // Chunks were reused (so their copies ran), the last ones wait for the event.
            assert!(!copies.is_complete(&event).unwrap());
            let early: Vec<u8> = dev.download(&buf).unwrap();
            assert_eq!(early[..64], want[..64]);
            assert_ne!(early, want, "everything landed before anyone waited");
        }
        copies.compute_waits(&dev, &event).unwrap();
        dev.synchronize().unwrap();
        assert!(copies.is_complete(&event).unwrap());
        assert_eq!(
            dev.download::<u8>(&buf).unwrap(),
            want,
            "{}",
            dev.describe()
        );

        let ops = copies.ops();
        let copied: Vec<usize> = ops
            .iter()
            .filter_map(|op| match op {
                StreamOp::Copy {
                    stream: StreamKind::Copy,
                    bytes,
                } => Some(*bytes),
                _ => None,
            })
            .collect();
        assert_eq!(copied, [1000, 4]);
        let records = ops
            .iter()
            .filter(|op| matches!(op, StreamOp::Record { .. }))
            .count();
        assert!(records >= 8, "each chunk left gets an event: {ops:?}");
        assert_eq!(
            ops.last(),
            Some(&StreamOp::Wait {
                stream: StreamKind::Compute,
                event: event.id()
            })
        );
        // Out of bounds is refused before anything is staged.
        let e = copies.write(&buf, 998, &[0u32]).unwrap_err().to_string();
        assert!(e.contains("998"), "{e}");
    }
    assert!(CopyStream::new(&devices()[0], 1, 64).is_err());
}

#[test]
fn a_slot_loaded_on_the_copy_stream_feeds_the_kernels_like_a_direct_load() {
    for dev in devices() {
        let shape = LoraShape {
            num_slots: 2,
            in_dim: 40,
            out_dim: 24,
            max_rank: 8,
        };
        let mut r = rng(9);
        let ad = super::adapter(&mut r, shape.in_dim, shape.out_dim, 6);
        let mut direct = DeviceLoraSlots::new(&dev, DType::Bf16, shape).unwrap();
        let mut queued = DeviceLoraSlots::new(&dev, DType::Bf16, shape).unwrap();
        direct
            .load_slot(&dev, 1, &ad.a, &ad.b, ad.rank, ad.scale)
            .unwrap();
        // A ring smaller than A (6 x 40 bf16 = 480 bytes): the slot streams through it.
        let mut copies = CopyStream::new(&dev, 3, 256).unwrap();
        queued
            .load_slot_with(&mut copies, 1, &ad.a, &ad.b, ad.rank, ad.scale)
            .unwrap();
        let event = copies.record().unwrap();
        copies.compute_waits(&dev, &event).unwrap();
        let run = slot_1_runner(&dev, &mut r, shape);
        let (want, got) = (run(&direct), run(&queued));
        assert_eq!(got, want, "{}", dev.describe());
        assert_ne!(
            want,
            run(&DeviceLoraSlots::new(&dev, DType::Bf16, shape).unwrap())
        );
    }
}

/// The fused kernel over three tokens (two on slot 1, one base-only) on random inputs, for
/// whatever stores it is given: equal outputs mean equal slot 1 contents.
fn slot_1_runner<'a>(
    dev: &'a Device,
    r: &mut ChaCha8Rng,
    shape: LoraShape,
) -> impl Fn(&DeviceLoraSlots) -> Vec<u16> + 'a {
    let batch = LoraBatch::bgmv(dev, &[Some(1), None, Some(1)]).unwrap();
    let x = random(r, 3 * shape.in_dim, 1.0);
    let y0 = random(r, 3 * shape.out_dim, 1.0);
    move |slots: &DeviceLoraSlots| {
        let part = [DeviceFusedPart { slots, offset: 0 }];
        super::run_fused(dev, &part, (&x, &batch), &y0, shape.out_dim)
    }
}

#[test]
fn pinned_copies_land_from_the_lease_and_keep_its_pages_until_they_complete() {
    for dev in devices() {
        let mut r = rng(11);
        let data: Vec<u8> = (0..1000).map(|_| r.random()).collect();
        // 64-byte pages: the second span starts inside a page and crosses 15 more.
        let pool = PinnedPool::new(&dev, 2048, 64).unwrap();
        let mut lease = pool.lease(1000).unwrap();
        let head = lease.append(&data[..40]).unwrap();
        let rest = lease.append(&data[40..]).unwrap();
        let lease = Arc::new(lease);
        let buf = dev.alloc_zeroed(1000).unwrap();
        let mut copies = CopyStream::new(&dev, 2, 64).unwrap();
        copies.after_compute(&dev).unwrap();
        copies.record_ops();
        copies.write_pinned(&buf, 960, &lease, head).unwrap();
        copies.write_pinned(&buf, 0, &lease, rest).unwrap();
        let mut want = data[40..].to_vec();
        want.extend_from_slice(&data[..40]);
        // The caller lets go of its lease at once: the stream keeps the pages.
        drop(lease);
        assert_eq!(copies.held_leases(), 1, "one lease, held once");
        assert_eq!(pool.free_pages(), 32 - 16);
        if dev.is_emulated() {
            assert!(dev.download::<u8>(&buf).unwrap().iter().all(|&b| b == 0));
        }
        let event = copies.record().unwrap();
        copies.compute_waits(&dev, &event).unwrap();
        dev.synchronize().unwrap();
        assert_eq!(
            dev.download::<u8>(&buf).unwrap(),
            want,
            "{}",
            dev.describe()
        );
        copies.synchronize().unwrap();
        assert_eq!((copies.held_leases(), pool.free_pages()), (0, 32));
        // Nothing went through the staging ring.
        let ops = copies.ops();
        assert!(
            ops.iter().all(|op| !matches!(op, StreamOp::Copy { .. })),
            "{ops:?}"
        );
        let pinned: Vec<usize> = ops
            .iter()
            .filter_map(|op| match op {
                StreamOp::CopyPinned { bytes, .. } => Some(*bytes),
                _ => None,
            })
            .collect();
        assert_eq!(pinned, [40, 960]);
        // A span past what the lease holds, or past the buffer, is refused.
        let mut small = pool.lease(8).unwrap();
        let s = small.append(&[1; 8]).unwrap();
        let small = Arc::new(small);
        let past = caduceus_kernels::gpu::pinned_pool::Span { start: 4, len: 8 };
        assert!(copies.write_pinned(&buf, 0, &small, past).is_err());
        assert!(copies.write_pinned(&buf, 996, &small, s).is_err());
    }
}

#[test]
fn a_pinned_image_fills_a_slot_like_its_heap_twin_and_a_full_pool_refuses_the_next() {
    for dev in devices() {
        let shape = LoraShape {
            num_slots: 2,
            in_dim: 40,
            out_dim: 24,
            max_rank: 8,
        };
        let mut r = rng(13);
        let ad = super::adapter(&mut r, shape.in_dim, shape.out_dim, 6);
        let p = PeftProjection {
            dtype: DType::Bf16,
            in_dim: shape.in_dim,
            out_dim: shape.out_dim,
            a: (&ad.a).into(),
            b: (&ad.b).into(),
            rank: ad.rank,
            scale: ad.scale,
        };
        let heap = SlotImage::of(&p).unwrap();
        // 6 x 40 + 6 x 24 values: 768 bytes; pages of 100 bytes, a pool too small for two.
        let pool = PinnedPool::new(&dev, 1200, 100).unwrap();
        let mut lease = pool.lease(p.image_bytes()).unwrap();
        let parts = SlotImage::write_pinned(&p, &mut lease).unwrap().unwrap();
        assert_eq!(lease.len(), heap.nbytes());
        let lease = Arc::new(lease);
        let pinned = parts.into_image(&lease);
        assert!(pinned.is_pinned() && !heap.is_pinned());
        assert_eq!(pinned, heap, "the same values, wherever they lie");
        assert!(
            pool.lease(p.image_bytes()).is_none(),
            "no room for a second"
        );
        assert_eq!(pool.refused(), 1);
        drop(lease);

        let mut direct = DeviceLoraSlots::new(&dev, DType::Bf16, shape).unwrap();
        let mut queued = DeviceLoraSlots::new(&dev, DType::Bf16, shape).unwrap();
        direct.load_image_with(&mut &dev, 1, &heap).unwrap();
        let mut copies = CopyStream::new(&dev, 2, 256).unwrap();
        copies.after_compute(&dev).unwrap();
        queued.load_image_with(&mut copies, 1, &pinned).unwrap();
        drop(pinned);
        let event = copies.record().unwrap();
        copies.compute_waits(&dev, &event).unwrap();
        let run = slot_1_runner(&dev, &mut r, shape);
        assert_eq!(run(&queued), run(&direct), "{}", dev.describe());
        copies.synchronize().unwrap();
        assert_eq!(pool.free_pages(), pool.num_pages());
    }
}
