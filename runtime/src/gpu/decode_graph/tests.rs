//! Decode graphs in the kernels' host emulation: for every ladder size, replaying the captured
//! graph after the step's upload gives the eager step's logits bit for bit, with and without
//! adapters mixed in the batch; steps a graph cannot serve (above the cap, prefill, adapters
//! when the graphs were captured without slots) are left to the eager path.

use caduceus_kernels::gpu::lora::DecodeLoraMapping;
use caduceus_kernels::lora::segments_from_token_slots;

use super::{graph_sizes, DecodeGraphs};
use crate::gpu::lora::{GpuLoraBatch, GpuLoraStack};
use crate::gpu::model::tests::adapter;
use crate::gpu::workspace::tests::{logits_of, model, HostBatch};
use crate::gpu::workspace::{StepLimits, Workspace};

/// Sequence s's adapter slot when adapters are on.
/// Each sequence's adapter: a base-only token among adapter tokens, then two sequences on one
/// adapter.
const MIXED: [Option<u32>; 3] = [Some(0), None, Some(1)];
const SHARED: [Option<u32>; 3] = [Some(1), Some(1), Some(0)];

/// Decode steps of 1 to 3 sequences replayed from graphs match the eager steps bit for bit;
/// with `adapters`, sequence s decodes on adapter `adapters[s]`, the graphs mapping tokens to
/// LoRA blocks by `mapping`.
fn graphs_replay_the_eager_steps(adapters: Option<[Option<u32>; 3]>, mapping: DecodeLoraMapping) {
    let with_adapters = adapters.is_some();
    let gpu = model();
    let (dev, c) = (gpu.device(), gpu.config().clone());
    let limits = StepLimits {
        max_num_batched_tokens: 16,
        max_num_seqs: 3,
        max_scored_rows: 0,
        max_model_len: 64,
    };
    let stack = with_adapters.then(|| {
        let mut s = GpuLoraStack::new(dev, gpu.dtype(), &c, 2, 16).unwrap();
        s.load(
            dev,
            0,
            &adapter(&c, 8, &[0, 1, 2, 3, 4, 5, 6], 1, gpu.dtype()),
        )
        .unwrap();
        s.load(dev, 1, &adapter(&c, 16, &[0, 2, 6], 2, gpu.dtype()))
            .unwrap();
        s
    });
    let rank = if with_adapters { 16 } else { 0 };
    let mut ws = Workspace::new(dev, &c, gpu.dtype(), 16, limits, rank).unwrap();
    let kv = gpu.new_kv_cache(16, 16).unwrap();
    // Graphs up to 2 of the 3 sequences: sizes 1, 2.
    let sizes = graph_sizes(limits.max_num_seqs, limits.max_num_batched_tokens, 2);
    assert_eq!(sizes, [1, 2]);
    let graph_lora = stack.as_ref().map(|s| (s, mapping));
    let mut graphs = DecodeGraphs::capture(&gpu, &kv, &mut ws, &sizes, graph_lora).unwrap();
    assert!(graphs.nodes().iter().all(|&n| n > 0));
    // Prompts of 3, 5 and 7 tokens over interleaved block tables, prefilled eagerly.
    let tables: Vec<Vec<u32>> = (0..3u32).map(|s| vec![s + 5, 10 - s, s]).collect();
    let lens: Vec<usize> = (0..3).map(|s| 3 + 2 * s).collect();
    let run = |pieces: &[(usize, usize, usize)],
               f: &mut dyn FnMut(&HostBatch, Option<&GpuLoraBatch<'_>>)| {
        let host = HostBatch::new(pieces, &tables);
        let slots: Vec<Option<u32>> = host
            .token_seq
            .iter()
            .map(|&s| adapters.and_then(|a| a[s]))
            .collect();
        let segments = segments_from_token_slots(&slots);
        let lora = stack.as_ref().map(|stack| GpuLoraBatch {
            stack,
            segments: &segments,
        });
        f(&host, lora.as_ref());
    };
    let prefill: Vec<_> = (0..3).map(|s| (s, 0, lens[s])).collect();
    run(&prefill, &mut |host, lora| {
        host.with(&tables, |b| {
            assert_eq!(
                graphs.replay(&gpu, b, lora, &mut ws).unwrap(),
                None,
                "prefill"
            );
            gpu.forward_in(b, &kv, lora, &mut ws).unwrap();
        })
    });
    for n in 1..=3 {
        let pieces: Vec<_> = (0..n).map(|s| (s, lens[s], 1)).collect();
        run(&pieces, &mut |host, lora| {
            host.with(&tables, |b| {
                let eager = gpu.forward_in(b, &kv, lora, &mut ws).unwrap();
                let want = logits_of(dev, &ws, eager, c.vocab_size);
                let before = dev.transfers().unwrap();
                let replayed = graphs.replay(&gpu, b, lora, &mut ws).unwrap();
                if n > 2 {
                    assert_eq!(replayed, None, "{n} sequences: above the cap, eager");
                    return;
                }
                let after = dev.transfers().unwrap();
                assert_eq!(replayed, Some(n));
                assert_eq!(
                    after.allocs, before.allocs,
                    "{n}: a replay allocates nothing"
                );
                assert_eq!(after.writes, before.writes + 1, "{n}: one upload");
                let got = logits_of(dev, &ws, n, c.vocab_size);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{n} sequences, adapters {with_adapters}: the graph's logits differ from \
                     the eager step's"
                );
            })
        });
    }
    assert_eq!(graphs.replays(), 2);
}

#[test]
fn every_ladder_size_replays_the_eager_decode_step_bit_exactly() {
    graphs_replay_the_eager_steps(None, DecodeLoraMapping::Bgmv);
}

#[test]
fn decode_steps_mixing_adapters_replay_bit_exactly() {
    // Eager decode steps run BGMV; a graph's tiles of tokens grouped by adapter give the same
    // bits (SHARED puts two tokens in one tile).
    for mapping in DecodeLoraMapping::ALL {
        graphs_replay_the_eager_steps(Some(MIXED), mapping);
        graphs_replay_the_eager_steps(Some(SHARED), mapping);
    }
}

#[test]
fn graphs_without_adapter_slots_leave_adapter_steps_eager() {
    let gpu = model();
    let (dev, c) = (gpu.device(), gpu.config().clone());
    let limits = StepLimits {
        max_num_batched_tokens: 8,
        max_num_seqs: 2,
        max_scored_rows: 0,
        max_model_len: 32,
    };
    let mut ws = Workspace::new(dev, &c, gpu.dtype(), 16, limits, 16).unwrap();
    let kv = gpu.new_kv_cache(4, 16).unwrap();
    let mut graphs = DecodeGraphs::capture(&gpu, &kv, &mut ws, &[1], None).unwrap();
    let stack = GpuLoraStack::new(dev, gpu.dtype(), &c, 1, 16).unwrap();
    let tables = vec![vec![0u32]];
    let host = HostBatch::new(&[(0, 3, 1)], &tables);
    let segments = segments_from_token_slots(&[Some(0)]);
    let lora = GpuLoraBatch {
        stack: &stack,
        segments: &segments,
    };
    host.with(&tables, |b| {
        assert_eq!(graphs.replay(&gpu, b, Some(&lora), &mut ws).unwrap(), None);
        assert_eq!(graphs.replay(&gpu, b, None, &mut ws).unwrap(), Some(1));
    });
}
