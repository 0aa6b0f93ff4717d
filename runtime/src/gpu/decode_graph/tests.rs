//! Decode graphs in the kernels' host emulation: for every ladder size, replaying the captured
//! graph after the step's upload gives the eager step's logits bit for bit; steps a graph cannot
//! serve (above the cap, prefill, adapters) are left to the eager path.

use super::{graph_sizes, DecodeGraphs};
use crate::gpu::workspace::tests::{logits_of, model, HostBatch};
use crate::gpu::workspace::{StepLimits, Workspace};

#[test]
fn every_ladder_size_replays_the_eager_decode_step_bit_exactly() {
    let gpu = model();
    let (dev, vocab) = (gpu.device(), gpu.config().vocab_size);
    let limits = StepLimits {
        max_num_batched_tokens: 40,
        max_num_seqs: 5,
        max_model_len: 64,
    };
    let mut ws = Workspace::new(dev, gpu.config(), gpu.dtype(), 16, limits, 0).unwrap();
    let kv = gpu.new_kv_cache(16, 16).unwrap();
    // Graphs up to 4 of the 5 sequences: sizes 1, 2, 4.
    let sizes = graph_sizes(limits.max_num_seqs, limits.max_num_batched_tokens, 4);
    assert_eq!(sizes, [1, 2, 4]);
    let mut graphs = DecodeGraphs::capture(&gpu, &kv, &mut ws, &sizes).unwrap();
    assert!(graphs.nodes().iter().all(|&n| n > 0));
    // Five prompts of 3, 5, ..., 11 tokens over interleaved block tables, prefilled eagerly.
    let tables: Vec<Vec<u32>> = (0..5u32).map(|s| vec![s + 5, 10 - s, s]).collect();
    let lens: Vec<usize> = (0..5).map(|s| 3 + 2 * s).collect();
    let prefill: Vec<_> = (0..5).map(|s| (s, 0, lens[s])).collect();
    let host = HostBatch::new(&prefill, &tables);
    host.with(&tables, |b| {
        assert_eq!(graphs.replay(&gpu, b, false, &mut ws).unwrap(), None);
        gpu.forward_in(b, &kv, None, &mut ws).unwrap()
    });
    for n in 1..=5 {
        let pieces: Vec<_> = (0..n).map(|s| (s, lens[s], 1)).collect();
        let host = HostBatch::new(&pieces, &tables);
        let eager = host.with(&tables, |b| gpu.forward_in(b, &kv, None, &mut ws).unwrap());
        let want = logits_of(dev, &ws, eager, vocab);
        let before = dev.transfers().unwrap();
        let replayed = host.with(&tables, |b| graphs.replay(&gpu, b, false, &mut ws).unwrap());
        if n > 4 {
            assert_eq!(replayed, None, "{n} sequences: above the cap, eager");
            continue;
        }
        let after = dev.transfers().unwrap();
        assert_eq!(replayed, Some(n));
        assert_eq!(
            after.allocs, before.allocs,
            "{n}: a replay allocates nothing"
        );
        assert_eq!(after.writes, before.writes + 1, "{n}: one upload");
        let got = logits_of(dev, &ws, n, vocab);
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{n} sequences: the graph's logits differ from the eager step's"
        );
        // With adapters the step runs eagerly.
        let with_adapters = host.with(&tables, |b| graphs.replay(&gpu, b, true, &mut ws).unwrap());
        assert_eq!(with_adapters, None);
    }
    assert_eq!(graphs.replays(), 4);
}
