//! The preallocated workspace against a workspace made for each step alone (the previous
//! per-step allocation), in the kernels' host emulation: same logits bit for bit over prefill,
//! mixed and decode steps with adapters; no allocation and one upload per step.

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::lora::segments_from_token_slots;
use half::f16;

use super::{workspace_bytes, StepLimits, Workspace};
use crate::gpu::lora::{GpuLoraBatch, GpuLoraStack};
use crate::gpu::model::tests::{adapter, store, CONFIG};
use crate::gpu::model::GpuModel;
use crate::model::batch::ForwardBatch;
use crate::model::config::LlamaConfig;

const DTYPE: DType = DType::F16;
const BLOCK: usize = 16;
const LIMITS: StepLimits = StepLimits {
    max_num_batched_tokens: 32,
    max_num_seqs: 4,
    max_scored_rows: 0,
    max_model_len: 64,
};

/// `(sequence, first position, tokens)` of each piece of each step: chunked prefill, a mixed
/// step, decode steps (the workspace keeps larger steps' data in its buffers).
const STEPS: &[&[(usize, usize, usize)]] = &[
    &[(0, 0, 21), (1, 0, 6), (2, 0, 3)],
    &[(0, 21, 9), (1, 6, 1), (2, 3, 1)],
    &[(0, 30, 1), (1, 7, 1), (2, 4, 1)],
    &[(1, 8, 1)],
    &[(0, 31, 1), (2, 5, 1)],
];

pub(crate) fn model() -> GpuModel {
    let c = LlamaConfig::from_hf_json(CONFIG).unwrap();
    GpuModel::from_tensors(c.clone(), &mut store(&c, DTYPE), Device::emulated(), DTYPE).unwrap()
}

/// The host arrays of one step of `pieces` over block tables `tables`.
pub(crate) struct HostBatch {
    ids: Vec<u32>,
    pos: Vec<u32>,
    slots: Vec<u32>,
    rows: Vec<usize>,
    seqs: Vec<(usize, usize, usize, usize)>,
    pub token_seq: Vec<usize>,
}

impl HostBatch {
    pub fn new(pieces: &[(usize, usize, usize)], tables: &[Vec<u32>]) -> HostBatch {
        let mut b = HostBatch {
            ids: vec![],
            pos: vec![],
            slots: vec![],
            rows: vec![],
            seqs: vec![],
            token_seq: vec![],
        };
        for &(seq, start, len) in pieces {
            let q_start = b.ids.len();
            for i in start..start + len {
                b.ids.push(((i * 37 + seq * 11 + 5) % 300) as u32);
                b.pos.push(i as u32);
                b.slots
                    .push(tables[seq][i / BLOCK] * BLOCK as u32 + (i % BLOCK) as u32);
                b.token_seq.push(seq);
            }
            b.rows.push(b.ids.len() - 1);
            b.seqs.push((seq, q_start, len, start + len));
        }
        b
    }

    pub fn with<R>(&self, tables: &[Vec<u32>], f: impl FnOnce(&ForwardBatch<'_>) -> R) -> R {
        let seqs: Vec<SeqAttention<'_>> = self
            .seqs
            .iter()
            .map(|&(seq, query_start, query_len, context_len)| SeqAttention {
                query_start,
                query_len,
                context_len,
                block_table: &tables[seq],
            })
            .collect();
        f(&ForwardBatch {
            token_ids: &self.ids,
            positions: &self.pos,
            slot_mapping: &self.slots,
            seqs: &seqs,
            logits_indices: &self.rows,
        })
    }
}

/// The first `rows` rows of the workspace's logits, as f32.
pub(crate) fn logits_of(dev: &Device, ws: &Workspace, rows: usize, vocab: usize) -> Vec<f32> {
    let all: Vec<f16> = dev.download(ws.logits()).unwrap();
    all[..rows * vocab].iter().map(|v| v.to_f32()).collect()
}

#[test]
fn steps_in_one_workspace_match_fresh_ones_without_allocating_and_upload_once() {
    let gpu = model();
    let (dev, c) = (gpu.device(), gpu.config().clone());
    let tables = vec![vec![5, 2], vec![7, 11], vec![14, 1]];
    let (kv_reused, kv_fresh) = (
        gpu.new_kv_cache(16, BLOCK).unwrap(),
        gpu.new_kv_cache(16, BLOCK).unwrap(),
    );
    let mut lora = GpuLoraStack::new(dev, DTYPE, &c, 2, 16).unwrap();
    lora.load(dev, 0, &adapter(&c, 8, &[0, 1, 2, 3, 4, 5, 6], 1, DTYPE))
        .unwrap();
    lora.load(dev, 1, &adapter(&c, 16, &[0, 2], 2, DTYPE))
        .unwrap();
    let adapters = [Some(0), None, Some(1)];
    let mut ws = Workspace::new(dev, &c, DTYPE, BLOCK, LIMITS, 16).unwrap();
    assert_eq!(
        workspace_bytes(&c, DTYPE, BLOCK, &LIMITS, 16),
        ws.nbytes() as u64,
        "the memory plan reserves exactly what the workspace holds"
    );
    for (step, pieces) in STEPS.iter().enumerate() {
        let host = HostBatch::new(pieces, &tables);
        let token_slots: Vec<Option<u32>> = host.token_seq.iter().map(|&s| adapters[s]).collect();
        let segments = segments_from_token_slots(&token_slots);
        let lb = GpuLoraBatch {
            stack: &lora,
            segments: &segments,
        };
        let fresh = host.with(&tables, |b| {
            gpu.forward_with_lora(b, &kv_fresh, Some(&lb)).unwrap()
        });
        let before = dev.transfers().unwrap();
        let rows = host.with(&tables, |b| {
            gpu.forward_in(b, &kv_reused, Some(&lb), &mut ws).unwrap()
        });
        let after = dev.transfers().unwrap();
        assert_eq!(after.allocs, before.allocs, "step {step} allocated");
        assert_eq!(after.writes, before.writes + 1, "step {step}: one upload");
        assert_eq!(rows, pieces.len());
        let got = logits_of(dev, &ws, rows, c.vocab_size);
        assert!(
            got.iter()
                .zip(&fresh)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "step {step}: logits differ from a fresh workspace's"
        );
    }
}

#[test]
fn a_step_beyond_the_limits_is_refused() {
    let gpu = model();
    let dev = gpu.device();
    let kv = gpu.new_kv_cache(16, BLOCK).unwrap();
    let mut ws = Workspace::new(dev, gpu.config(), DTYPE, BLOCK, LIMITS, 0).unwrap();
    let tables = vec![vec![0, 1, 2], vec![3], vec![4], vec![5], vec![6]];
    // 33 tokens > 32.
    let host = HostBatch::new(&[(0, 0, 33)], &tables);
    let e = host.with(&tables, |b| {
        gpu.forward_in(b, &kv, None, &mut ws).unwrap_err()
    });
    assert!(e.to_string().contains("exceeds the workspace"), "{e}");
    // 5 sequences > 4.
    let five: Vec<_> = (0..5).map(|s| (s, 0, 1)).collect();
    let host = HostBatch::new(&five, &tables);
    let e = host.with(&tables, |b| {
        gpu.forward_in(b, &kv, None, &mut ws).unwrap_err()
    });
    assert!(e.to_string().contains("exceeds the workspace"), "{e}");
    // A block table longer than max_model_len allows (4 blocks of 16).
    let long = vec![vec![0, 1, 2, 3, 4]];
    let host = HostBatch::new(&[(0, 64, 1)], &long);
    let e = host.with(&long, |b| {
        gpu.forward_in(b, &kv, None, &mut ws).unwrap_err()
    });
    assert!(e.to_string().contains("max_model_len"), "{e}");
}
