//! Adapter loads on the copy stream: the copies go on the copy stream behind an event, the
//! compute stream waits for that event before the first forward reading the slot and never for
//! a batch that does not, and the forward then sees exactly the adapter a synchronous load gives;
//! an image in pinned pages is copied straight from them, its pages held until the copies ran.

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::copy_stream::{StreamKind, StreamOp};
use caduceus_kernels::gpu::pinned_pool::PinnedPool;
use caduceus_kernels::gpu::{devices_under_test, Device};
use caduceus_kernels::lora::segments_from_token_slots;
use caduceus_scheduler::AdapterKey;

use super::tests::{backend, DTYPE};
use super::GpuBackend;
use crate::adapters::{LoadedAdapter, PreparedAdapter, SlotFormat};
use crate::engine::{Backend, SlotSpec};
use crate::gpu::lora::{GpuAdapterImage, GpuLoraBatch, GpuLoraStack};
use crate::gpu::model::tests::adapter;
use crate::model::ForwardBatch;

/// The backend's kept logits of the last forward, widened to f32.
fn kept_logits(b: &GpuBackend) -> Vec<f32> {
    assert!(b.logit_rows > 0, "no logits kept");
    let bits: Vec<u16> = b.model.device().download(b.ws.logits()).unwrap();
    let n = b.logit_rows * b.model.config().vocab_size;
    bits[..n]
        .iter()
        .map(|&x| half::f16::from_bits(x).to_f32())
        .collect()
}

/// Ops logged since `from`.
fn new_ops(b: &mut GpuBackend, from: usize) -> Vec<StreamOp> {
    let ops = b.adapter_copies().unwrap().stream_mut().ops();
    ops[from..].to_vec()
}

fn num_ops(b: &mut GpuBackend) -> usize {
    b.adapter_copies().unwrap().stream_mut().ops().len()
}

#[test]
fn adapter_copies_go_on_the_copy_stream_and_only_batches_using_the_slot_wait() {
    for dev in devices_under_test().unwrap() {
        copies_are_ordered(dev, false);
    }
}

#[test]
fn a_pinned_image_is_copied_from_its_pages_which_stay_leased_until_the_copies_ran() {
    for dev in devices_under_test().unwrap() {
        copies_are_ordered(dev, true);
    }
}

fn copies_are_ordered(dev: Device, pinned: bool) {
    let emulated = dev.is_emulated();
    let spec = SlotSpec {
        num_slots: 2,
        max_rank: 8,
        format: SlotFormat::device(DTYPE),
    };
    let mut b = backend(dev, 4, Some(spec));
    let c = b.config().clone();
    let w = adapter(&c, 8, &[0, 2, 3, 6], 11, DTYPE);
    // As the loader thread prepares it for a GPU engine: the slots' bits (in pinned pages when
    // the host tier has a pool, as `caduceus serve` on a GPU does).
    let heap = GpuAdapterImage::new(&c, &w.tensors(), DTYPE).unwrap();
    let pool = PinnedPool::new(b.model.device(), 2 * heap.nbytes(), 4096).unwrap();
    let image = match pinned {
        true => GpuAdapterImage::new_pinned(&c, &w.tensors(), DTYPE, &pool)
            .unwrap()
            .expect("the pool has room"),
        false => heap,
    };
    assert_eq!(image.is_pinned(), pinned);
    let loaded = LoadedAdapter {
        name: "doctor-a".into(),
        version: 1,
        key: AdapterKey {
            id: 1,
            generation: 1,
        },
        rank: 8,
        prepared: PreparedAdapter::Device(image),
    };
    b.adapter_copies().unwrap().stream_mut().record_ops();
    b.load_adapter(1, &loaded).unwrap();
    // The host cache may evict the image at once: the copy stream keeps its pages.
    drop(loaded);
    let leased = pool.num_pages() - pool.free_pages();
    assert_eq!(leased > 0, pinned, "{leased} pages leased");

    // The load: ordered after compute so far, every byte on the copy stream, then one event.
    let load = new_ops(&mut b, 0);
    assert_eq!(
        load.first(),
        Some(&StreamOp::WaitCompute {
            stream: StreamKind::Copy
        })
    );
    let Some(&StreamOp::Record {
        stream: StreamKind::Copy,
        event,
    }) = load.last()
    else {
        panic!("the load did not end with an event on the copy stream: {load:?}");
    };
    let copies = &load[1..load.len() - 1];
    assert!(
        copies.len() > 4
            && copies.iter().all(|op| matches!(
                op,
                StreamOp::Copy {
                    stream: StreamKind::Copy,
                    ..
                } | StreamOp::CopyPinned {
                    stream: StreamKind::Copy,
                    ..
                } | StreamOp::Record {
                    stream: StreamKind::Copy,
                    ..
                }
            )),
        "{copies:?}"
    );
    // Pinned, the weights go straight from the pages: only the slot's row of ranks and of
    // scales (4 bytes for each of the 7 projections of each layer) is staged, two copies.
    let staged: Vec<usize> = copies
        .iter()
        .filter_map(|op| match op {
            StreamOp::Copy { bytes, .. } => Some(*bytes),
            _ => None,
        })
        .collect();
    let row = 7 * c.num_layers * 4;
    assert_eq!(staged == [row, row], pinned, "staged: {staged:?}");
    assert!(staged.ends_with(&[row, row]), "the row last: {staged:?}");

    let ids: Vec<u32> = (0..4).map(|i| i * 17 % 300).collect();
    let table = [0u32];
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: 4,
        context_len: 4,
        block_table: &table,
    }];
    let batch = ForwardBatch {
        token_ids: &ids,
        positions: &[0, 1, 2, 3],
        slot_mapping: &[0, 1, 2, 3],
        seqs: &seqs,
        logits_indices: &[3],
    };
    let dev = b.model.device();
    let base = b
        .model
        .forward(&batch, &b.model.new_kv_cache(1, 16).unwrap())
        .unwrap();
    let mut direct = GpuLoraStack::new(dev, DTYPE, &c, 2, 8).unwrap();
    direct.load(dev, 1, &w).unwrap();
    let on_slot_1 = segments_from_token_slots(&[Some(1); 4]);
    let want = b
        .model
        .forward_with_lora(
            &batch,
            &b.model.new_kv_cache(1, 16).unwrap(),
            Some(&GpuLoraBatch {
                stack: &direct,
                segments: &on_slot_1,
            }),
        )
        .unwrap();
    assert_ne!(want, base, "the adapter changes the logits");

    if emulated {
        // The emulated copy stream runs when waited for: nothing has landed yet, so a forward
        // that skipped the wait would read the empty slot (as a race would on a GPU).
        let copies = b.adapter_copies().unwrap().stream_mut();
        let ev = copies.record().unwrap();
        assert!(!copies.is_complete(&ev).unwrap());
        let stack = b.lora.as_ref().unwrap();
        let unwaited = b
            .model
            .forward_with_lora(
                &batch,
                &b.model.new_kv_cache(1, 16).unwrap(),
                Some(&GpuLoraBatch {
                    stack,
                    segments: &on_slot_1,
                }),
            )
            .unwrap();
        assert_eq!(
            unwaited, base,
            "the copy landed before anyone waited for it"
        );
    }

    // Batches that do not read slot 1 (base only, or slot 0) add no wait.
    let before = num_ops(&mut b);
    b.forward(&batch, &[]).unwrap();
    b.forward(&batch, &segments_from_token_slots(&[Some(0); 4]))
        .unwrap();
    assert_eq!(new_ops(&mut b, before), vec![]);
    assert_eq!(kept_logits(&b), base);

    // The first forward reading slot 1 waits for its event on the compute stream, once.
    b.forward(&batch, &on_slot_1).unwrap();
    let waited = new_ops(&mut b, before);
    assert_eq!(
        waited,
        vec![StreamOp::Wait {
            stream: StreamKind::Compute,
            event
        }]
    );
    assert_eq!(
        kept_logits(&b),
        want,
        "the waited-for slot holds the adapter"
    );
    b.forward(&batch, &on_slot_1).unwrap();
    assert_eq!(
        new_ops(&mut b, before).len(),
        1,
        "a second wait for one load"
    );
    assert_eq!(kept_logits(&b), want);
    assert_eq!(
        pool.free_pages(),
        pool.num_pages(),
        "the copies ran: pages back"
    );
}
