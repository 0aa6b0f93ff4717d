//! A [`SlotTable`]: the fused q/k/v stores with their ranks and scales as columns of one
//! slot-major table (the GPU engine's layout: a fill uploads a slot's row, two copies for every
//! store) give the kernels exactly what stores with their own arrays give, under BGMV and SGMV,
//! against the CPU; a row upload is two copies; and a store that is not the table's column in
//! order is refused. (Never run on a GPU.)

use caduceus_kernels::gpu::copy_stream::{CopyStream, StreamOp};
use caduceus_kernels::gpu::lora::{DeviceLoraSlots, LoraBatch, SlotTable};
use caduceus_kernels::lora::LoraShape;

use super::gpu_support::*;
use super::{prefill_segments, token_segments, Qkv, DECODE_SLOTS, DTYPES, SLOT_RANKS};

#[test]
fn stores_in_a_shared_table_give_the_kernels_what_stores_with_their_own_arrays_give() {
    for dev in devices() {
        for dtype in DTYPES {
            let own = Qkv::new(&dev, dtype, 300, 1);
            let shared = Qkv::in_table(&dev, dtype, 300, 1);
            let n = DECODE_SLOTS.len();
            let (x, y0) = shared.inputs(2, n);
            let batch = LoraBatch::bgmv(&dev, &DECODE_SLOTS).unwrap();
            let got = shared.gpu(&dev, &x, &batch, &y0);
            let what = format!("{} {dtype:?} bgmv, shared table", dev.describe());
            shared.check(&what, &got, &x, &token_segments(&DECODE_SLOTS), &y0);
            assert_eq!(got, own.gpu(&dev, &x, &batch, &y0), "{what}");

            let segs = prefill_segments();
            let n = segs.iter().map(|s| s.len).sum::<usize>();
            let (x, y0) = shared.inputs(4, n);
            let batch = LoraBatch::sgmv(&dev, &segs, n).unwrap();
            let got = shared.gpu(&dev, &x, &batch, &y0);
            let what = format!("{} {dtype:?} sgmv, shared table", dev.describe());
            shared.check(&what, &got, &x, &segs, &y0);
            assert_eq!(got, own.gpu(&dev, &x, &batch, &y0), "{what}");
        }
    }
}

#[test]
fn a_row_upload_is_two_copies_and_takes_only_the_tables_columns_in_order() {
    for dev in devices() {
        let qkv = Qkv::in_table(&dev, DTYPES[0], 64, 5);
        let table = qkv.table.as_ref().unwrap();
        assert_eq!(table.nbytes(), SLOT_RANKS.len() * 3 * 8);
        let mut copies = CopyStream::new(&dev, 2, 64).unwrap();
        copies.record_ops();
        table.upload_row(&mut copies, 2, &qkv.gpu).unwrap();
        let ops = copies.ops();
        assert_eq!(
            ops.iter()
                .filter(|op| matches!(op, StreamOp::Copy { bytes: 12, .. }))
                .count(),
            2,
            "{ops:?}"
        );
        // Columns out of order, too few, a slot out of range, or a store of its own.
        let reversed: Vec<&DeviceLoraSlots> = qkv.gpu.iter().rev().collect();
        assert!(table.upload_row(&mut &dev, 0, reversed).is_err());
        assert!(table.upload_row(&mut &dev, 0, &qkv.gpu[..2]).is_err());
        assert!(table
            .upload_row(&mut &dev, SLOT_RANKS.len(), &qkv.gpu)
            .is_err());
        let shape = LoraShape {
            num_slots: SLOT_RANKS.len(),
            in_dim: 64,
            out_dim: 8,
            max_rank: 8,
        };
        let alone = DeviceLoraSlots::new(&dev, DTYPES[0], shape).unwrap();
        let mixed = [&qkv.gpu[0], &qkv.gpu[1], &alone];
        assert!(table.upload_row(&mut &dev, 0, mixed).is_err());
        // A column past the table, or a store of another slot count, is refused at creation.
        assert!(DeviceLoraSlots::new_in_table(&dev, DTYPES[0], shape, table, 3).is_err());
        let other = LoraShape {
            num_slots: 2,
            ..shape
        };
        assert!(DeviceLoraSlots::new_in_table(&dev, DTYPES[0], other, table, 0).is_err());
        assert!(SlotTable::new(&dev, 0, 3).is_err());
    }
}
