//! Prompt logprobs on the GPU backend: the scored rows come back from the device and are scored
//! as the CPU engine scores its f32 rows, so the two engines agree within the model dtype's
//! rounding, however the prompts are chunked, cached or preempted.

use caduceus_kernels::gpu::devices_under_test;
use caduceus_scheduler::RequestId;

use super::tests::{config, model_on, requests, sched, DTYPE};
use super::{GpuBackend, GpuBackendConfig, KvBlocks, StepLimits};
use crate::engine::{Backend, EngineCore, EngineRequest, RequestError, RequestOutput};
use crate::gpu::model::tests::store;
use crate::model::LlamaModel;
use crate::sampling::PromptLogprob;

/// |f16 engine - f32 engine| on a logprob of this random model (measured worst 0.0016 in the
/// emulation; the test prints it).
const TOLERANCE: f32 = 0.02;
const TOP: usize = 3;

/// The backend tests' requests, each scoring its prompt with [`TOP`] alternatives, after an
/// unscored twin of the first (which fills the prefix cache the scored ones must not read).
fn scored_requests() -> Vec<EngineRequest> {
    let plain = requests();
    let mut reqs = vec![plain[0].clone()];
    reqs.extend(plain.into_iter().map(|mut r| {
        r.prompt_logprobs = Some(TOP);
        r
    }));
    reqs
}

/// Each request's prompt logprobs (checked to arrive once, on the first output) and tokens.
fn scores_and_tokens(outs: &[Vec<RequestOutput>]) -> Vec<(Vec<PromptLogprob>, Vec<u32>)> {
    outs.iter()
        .map(|o| {
            let sent: Vec<_> = o.iter().filter_map(|x| x.prompt_logprobs.clone()).collect();
            assert!(sent.len() <= 1, "prompt logprobs sent {} times", sent.len());
            let tokens = o
                .iter()
                .flat_map(|x| x.new_tokens.iter().map(|t| t.token_id))
                .collect();
            (sent.into_iter().next().unwrap_or_default(), tokens)
        })
        .collect()
}

#[test]
fn the_gpu_engine_scores_prompts_as_the_cpu_engine_does() {
    let c = config();
    let cpu_model = LlamaModel::from_tensors(c.clone(), &mut store(&c, DTYPE)).unwrap();
    let mut cpu = EngineCore::new(&cpu_model, None, Vec::new(), sched(32)).unwrap();
    let want = scores_and_tokens(&cpu.run_to_end(scored_requests()).unwrap());
    for dev in devices_under_test().unwrap() {
        // 5 scored rows a step: the 41-token prompt is scored over many chunks; 6 blocks
        // preempt; decode graphs up to 2 sequences replay beside the scored prefills.
        let what = dev.describe();
        let backend = GpuBackend::new(
            model_on(dev),
            GpuBackendConfig {
                block_size: 16,
                kv_blocks: KvBlocks::Fixed(6),
                adapter_slots: None,
                step: StepLimits {
                    max_scored_rows: 5,
                    ..super::tests::STEP
                },
                cuda_graph_max_batch: 2,
            },
        )
        .unwrap();
        assert_eq!(backend.max_scored_rows(), 5, "{what}");
        let mut gpu = EngineCore::with_backend(backend, None, Vec::new(), sched(999)).unwrap();
        let got = scores_and_tokens(&gpu.run_to_end(scored_requests()).unwrap());
        assert!(
            gpu.stats().num_preemptions > 0,
            "{what}: the small pool preempted"
        );
        let mut worst = 0f32;
        for (i, ((g, g_tokens), (w, w_tokens))) in got.iter().zip(&want).enumerate() {
            assert_eq!(g_tokens, w_tokens, "{what} request {i}: greedy tokens");
            assert_eq!(g.len(), w.len(), "{what} request {i}: scored positions");
            for (pos, (g, w)) in g.iter().zip(w).enumerate() {
                let at = format!("{what} request {i} position {}", pos + 1);
                assert_eq!(g.token_id, w.token_id, "{at}");
                worst = worst.max((g.logprob - w.logprob).abs());
                assert!(
                    (g.logprob - w.logprob).abs() <= TOLERANCE,
                    "{at}: {} vs the CPU's {}",
                    g.logprob,
                    w.logprob
                );
                assert_eq!(g.top_logprobs.len(), TOP, "{at}");
                // The sorted top values move by at most the rounding; their ids agree where
                // no neighbour is within it.
                for (k, (gt, wt)) in g.top_logprobs.iter().zip(&w.top_logprobs).enumerate() {
                    assert!((gt.1 - wt.1).abs() <= TOLERANCE, "{at} top {k}");
                    let clear = w
                        .top_logprobs
                        .iter()
                        .enumerate()
                        .all(|(j, o)| j == k || (o.1 - wt.1).abs() > 2.0 * TOLERANCE);
                    if clear {
                        assert_eq!(gt.0, wt.0, "{at} top {k}");
                    }
                }
                // The rank is the GPU logits' own: the token sits at its place in their top.
                if let Some(t) = g.top_logprobs.get(g.rank as usize - 1) {
                    assert_eq!(t.0, g.token_id, "{at}: rank {}", g.rank);
                }
            }
        }
        assert!(got[0].0.is_empty(), "the unscored request has none");
        eprintln!("{what}: worst |logprob - CPU| {worst:.4} (tolerance {TOLERANCE})");
    }
}

#[test]
fn without_scored_rows_the_gpu_engine_refuses_scoring_requests() {
    for dev in devices_under_test().unwrap() {
        let mut b = super::tests::backend(dev, 8, None);
        assert_eq!(b.max_scored_rows(), 0);
        assert!(
            b.score(0, &[(1, 0)]).is_err(),
            "no forward, no rows to score"
        );
        let mut core = EngineCore::with_backend(b, None, Vec::new(), sched(999)).unwrap();
        let mut r = EngineRequest::new(vec![1, 2, 3], 2);
        r.prompt_logprobs = Some(0);
        r.detokenize = false;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        assert_eq!(
            core.add_request(RequestId(0), r, tx),
            Err(RequestError::PromptLogprobsUnavailable)
        );
    }
}
