//! The CUDA backend in the kernels' host emulation: the whole engine (scheduler, executor batch
//! preparation, device sampling) against the CPU engine on the same weights; the sampling
//! plumbing (penalty ranges, bans, logprobs) against the CPU twin on the same logits; adapters
//! filled from the host tier's prepared stacks; the memory plan at start.

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::gemm_tune::GemmPolicy;
use caduceus_kernels::gpu::{devices_under_test, DType, Device};
use caduceus_kernels::lora::segments_from_token_slots;
use caduceus_scheduler::{RequestId, SchedulerConfig};
use tokio::sync::mpsc;

use super::{GpuBackend, GpuBackendConfig, KvBlocks, StepLimits};
use crate::adapters::SlotFormat;
use crate::engine::{
    Backend, EngineCore, EngineRequest, FaultPlan, RequestFailure, RowOutcome, SlotSpec,
};
use crate::gpu::lora::{GpuAdapterImage, GpuLoraBatch, GpuLoraStack};
use crate::gpu::memory_plan::{check_weights_fit, llama_weight_bytes};
use crate::gpu::model::tests::{adapter, store, CONFIG};
use crate::gpu::model::GpuModel;
use crate::model::config::LlamaConfig;
use crate::model::lora::{LoraDtype, LoraStack};
use crate::model::{ForwardBatch, LlamaModel};
use crate::sampling::{sample_row, RowScratch, SamplingParams};
use crate::structured::TokenMask;

pub(super) const DTYPE: DType = DType::F16;

pub(super) fn config() -> LlamaConfig {
    LlamaConfig::from_hf_json(CONFIG).unwrap()
}

fn gpu_model() -> GpuModel {
    model_on(Device::emulated())
}

pub(super) fn model_on(dev: Device) -> GpuModel {
    let c = config();
    GpuModel::from_tensors(c.clone(), &mut store(&c, DTYPE), dev, DTYPE).unwrap()
}

/// The step limits of [`sched`].
pub(super) const STEP: StepLimits = StepLimits {
    max_num_batched_tokens: 24,
    max_num_seqs: 4,
    max_scored_rows: 0,
    max_model_len: 128,
};

pub(super) fn backend(dev: Device, num_blocks: usize, slots: Option<SlotSpec>) -> GpuBackend {
    backend_with_graphs(dev, num_blocks, slots, 0)
}

/// A backend with decode graphs up to `graph_max_batch` sequences (0: off).
fn backend_with_graphs(
    dev: Device,
    num_blocks: usize,
    slots: Option<SlotSpec>,
    graph_max_batch: usize,
) -> GpuBackend {
    GpuBackend::new(
        model_on(dev),
        GpuBackendConfig {
            block_size: 16,
            kv_blocks: KvBlocks::Fixed(num_blocks),
            adapter_slots: slots,
            step: STEP,
            cuda_graph_max_batch: graph_max_batch,
        },
    )
    .unwrap()
}

/// Runs `reqs` to completion; each request's tokens.
fn run<B: Backend>(core: &mut EngineCore<B>, reqs: Vec<EngineRequest>) -> Vec<Vec<u32>> {
    core.run_to_end(reqs)
        .unwrap()
        .iter()
        .map(|outs| {
            outs.iter()
                .flat_map(|o| o.new_tokens.iter().map(|s| s.token_id))
                .collect()
        })
        .collect()
}

pub(super) fn requests() -> Vec<EngineRequest> {
    // Two prompts share a 32-token (two-block) prefix, so the second hits the prefix cache.
    let shared: Vec<u32> = (0..32).map(|i| (i * 29 + 3) % 300).collect();
    let prompts: Vec<Vec<u32>> = vec![
        shared.iter().copied().chain([7, 8, 9]).collect(),
        (0..5).map(|i| (i * 53 + 5) % 300).collect(),
        (0..41).map(|i| (i * 37 + 11) % 300).collect(),
        shared.iter().copied().chain([150, 151]).collect(),
    ];
    prompts
        .into_iter()
        .map(|p| {
            let mut r = EngineRequest::new(p, 12);
            r.ignore_eos = true;
            r.detokenize = false;
            r
        })
        .collect()
}

pub(super) fn sched(num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: STEP.max_num_seqs,
        // Chunked prefill: the 41-token prompt takes several steps next to decodes.
        max_num_batched_tokens: STEP.max_num_batched_tokens,
        block_size: 16,
        num_blocks,
        max_model_len: STEP.max_model_len,
        enable_prefix_caching: true,
        ..SchedulerConfig::default()
    }
}

#[test]
fn the_engine_on_the_gpu_backend_generates_what_the_cpu_engine_does() {
    let c = config();
    let cpu_model = LlamaModel::from_tensors(c.clone(), &mut store(&c, DTYPE)).unwrap();
    let mut cpu = EngineCore::new(&cpu_model, None, Vec::new(), sched(32)).unwrap();
    let want = run(&mut cpu, requests());
    for dev in devices_under_test().unwrap() {
        engine_matches(dev, &want, 0);
    }
    // With decode graphs up to 2 sequences: decode steps of 1 and 2 replay a graph, of 3 and 4
    // (above the cap) run eagerly.
    for dev in devices_under_test().unwrap() {
        engine_matches(dev, &want, 2);
    }
    // Every projection of up to 8 rows on the GEMV kernel (each decode step, replayed graphs
    // included; this model's k are multiples of 8), the library elsewhere.
    for dev in devices_under_test().unwrap() {
        dev.set_gemm_policy(GemmPolicy::Gemv).unwrap();
        engine_matches(dev, &want, 2);
    }
}

fn engine_matches(dev: Device, want: &[Vec<u32>], graph_max_batch: usize) {
    let what = format!("{} graphs<={graph_max_batch}", dev.describe());
    // A pool of 6 blocks cannot hold all four requests: the GPU run also preempts.
    let backend = backend_with_graphs(dev, 6, None, graph_max_batch);
    let mut gpu = EngineCore::with_backend(backend, None, Vec::new(), sched(999)).unwrap();
    assert_eq!(
        gpu.scheduler_config().num_blocks,
        6,
        "the backend's pool sizes the scheduler"
    );
    let got = run(&mut gpu, requests());
    assert!(gpu.stats().num_preemptions > 0, "the small pool preempted");
    assert!(
        gpu.stats().prefix_cache_hits > 0,
        "the shared prefix was reused"
    );
    assert_eq!(got, want, "{what}: greedy tokens of f16 vs f32 on the CPU");
    let graphs = gpu.backend().decode_graphs();
    match graph_max_batch {
        0 => assert!(graphs.is_none(), "{what}"),
        _ => {
            let g = graphs.expect("graphs captured");
            assert_eq!(g.sizes(), &[1, 2][..], "{what}");
            assert!(g.replays() > 0, "{what}: decode steps replayed a graph");
        }
    }
}

/// Three short greedy requests (the fault test keeps to a few emulated steps).
fn short_requests() -> Vec<EngineRequest> {
    (0..3u32)
        .map(|r| {
            let mut q = EngineRequest::new((0..5).map(|i| (i * 41 + r * 7 + 2) % 300).collect(), 4);
            q.ignore_eos = true;
            q.detokenize = false;
            q
        })
        .collect()
}

/// Runs `short_requests()` with the second poisoned (NaN logits from its first step): its
/// finish error, and every request's tokens.
fn run_poisoned<B: Backend>(core: EngineCore<B>) -> (Option<RequestFailure>, Vec<Vec<u32>>) {
    let mut core = core.with_faults(FaultPlan {
        nan_logits: Some(FaultPlan::seed(4242)),
        ..FaultPlan::default()
    });
    let mut reqs = short_requests();
    reqs[1].sampling.seed = Some(4242);
    let mut rxs = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        core.add_request(RequestId(i as u64), r, tx).unwrap();
        rxs.push(rx);
    }
    while core.has_unfinished() {
        core.step().unwrap();
    }
    let mut error = None;
    let tokens = rxs
        .iter_mut()
        .enumerate()
        .map(|(i, rx)| {
            let mut t = Vec::new();
            while let Ok(o) = rx.try_recv() {
                t.extend(o.new_tokens.iter().map(|s| s.token_id));
                if let Some(e) = o.finished.and_then(|f| f.error) {
                    assert_eq!(i, 1, "request {i} failed: {e}");
                    error = Some(e);
                }
            }
            t
        })
        .collect();
    (error, tokens)
}

#[test]
fn a_nan_logits_row_fails_its_request_alone_on_either_backend() {
    let c = config();
    let cpu_model = LlamaModel::from_tensors(c.clone(), &mut store(&c, DTYPE)).unwrap();
    let clean = run(
        &mut EngineCore::new(&cpu_model, None, Vec::new(), sched(32)).unwrap(),
        short_requests(),
    );
    let cpu = run_poisoned(EngineCore::new(&cpu_model, None, Vec::new(), sched(32)).unwrap());
    let mut runs = vec![("cpu".to_string(), cpu)];
    for dev in devices_under_test().unwrap() {
        let what = dev.describe();
        let core = EngineCore::with_backend(backend(dev, 32, None), None, Vec::new(), sched(32));
        runs.push((what, run_poisoned(core.unwrap())));
    }
    for (what, (error, tokens)) in runs {
        assert_eq!(error, Some(RequestFailure::NonFiniteLogits), "{what}");
        assert!(tokens[1].is_empty(), "{what}: the poisoned request sampled");
        for i in [0, 2] {
            assert_eq!(tokens[i], clean[i], "{what}: request {i} changed");
        }
    }
}

#[test]
fn device_sampling_matches_the_cpu_twin_on_the_same_logits() {
    for dev in devices_under_test().unwrap() {
        sampling_matches(dev);
    }
}

fn sampling_matches(dev: Device) {
    let mut b = backend(dev, 4, None);
    let ids: Vec<u32> = (0..7).map(|i| i * 31 % 300).collect();
    let pos: Vec<u32> = (0..7).collect();
    let table = [2u32];
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: 7,
        context_len: 7,
        block_table: &table,
    }];
    // Four rows (some repeated) so four differently sampled requests read real logits.
    let rows = [6, 3, 6, 5];
    let slots: Vec<u32> = pos.iter().map(|p| 32 + p).collect();
    let batch = ForwardBatch {
        token_ids: &ids,
        positions: &pos,
        slot_mapping: &slots,
        seqs: &seqs,
        logits_indices: &rows,
    };
    let kv = b.model.new_kv_cache(4, 16).unwrap();
    let logits = b.model.forward_with_lora(&batch, &kv, None).unwrap();
    let before = b.model.device().transfers();
    b.forward(&batch, &[]).unwrap();
    let after = b.model.device().transfers();
    if let (Some(before), Some(after)) = (before, after) {
        assert_eq!(after.writes, before.writes + 1, "a step is one upload");
        assert_eq!(
            after.host_waits, before.host_waits,
            "a forward waits for nothing"
        );
    }
    let prompt: Vec<u32> = (0..20).map(|i| i * 7 % 300).collect();
    let output = [5u32, 9, 5];
    let params = [
        SamplingParams {
            logprobs: Some(3),
            ..Default::default()
        },
        SamplingParams {
            seed: Some(1),
            temperature: 0.9,
            top_k: Some(40),
            top_p: 0.8,
            repetition_penalty: 1.4,
            frequency_penalty: 0.3,
            logprobs: Some(0),
            ..Default::default()
        },
        SamplingParams {
            seed: Some(2),
            temperature: 1.3,
            min_p: 0.05,
            presence_penalty: 0.7,
            ..Default::default()
        },
        SamplingParams {
            seed: Some(3),
            temperature: 0.7,
            logprobs: Some(20),
            ..Default::default()
        },
    ];
    let vocab = b.config().vocab_size;
    let cpu_argmax = |r: usize| {
        let row = &logits[r * vocab..(r + 1) * vocab];
        (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap() as u32
    };
    // The first row's greedy winner is banned (min_tokens), so the ban must take effect.
    let banned = [cpu_argmax(0), 299];
    // Rows 2 and 3 are grammar-constrained (structured outputs), row 3 to its raw argmax's
    // complement so the mask must change the answer.
    let grammar = [
        None,
        None,
        Some(TokenMask::from_ids(vocab, &[3, 17, 250, 299])),
        Some(TokenMask::from_ids(
            vocab,
            &(0..vocab as u32)
                .filter(|&t| t != cpu_argmax(3))
                .collect::<Vec<_>>(),
        )),
    ];
    let row_samples: Vec<_> = params
        .iter()
        .zip(grammar)
        .enumerate()
        .map(|(i, (p, allowed))| {
            let mut s = crate::sampling::Sampler::new(p.clone());
            let ban: &[u32] = if i == 0 { &banned } else { &[] };
            let mut r = s.row_sample(&prompt, &output, vocab, ban);
            r.allowed = allowed;
            // logit_bias: row 1's likeliest token pushed out, row 2 pushed to one token of its
            // grammar (the +100 outside it must not count), row 3 nudged (its top logprobs show
            // it).
            r.bias = match i {
                1 => vec![(cpu_argmax(1), -100.0), (5, 3.0)],
                2 => vec![(250, 40.0), (5, 100.0)],
                3 => vec![(17, 4.0)],
                _ => Vec::new(),
            };
            r
        })
        .collect();
    let got: Vec<_> = b
        .sample(&row_samples)
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Once its buffers have grown, sampling is one upload of every row's inputs (descriptors,
    // penalty entries, bitsets) and one read of every output, its only wait; the same rows
    // (each with its drawn uniform) give the same tokens again.
    let before = b.model.device().transfers();
    let again = b.sample(&row_samples).unwrap();
    if let (Some(before), Some(after)) = (before, b.model.device().transfers()) {
        assert_eq!(after.allocs, before.allocs, "sampling allocated again");
        assert_eq!(after.writes, before.writes + 1, "one upload");
        assert_eq!(after.reads, before.reads + 1, "one read");
        assert_eq!(after.host_waits, before.host_waits + 1, "one wait");
    }
    let ids = |v: &[RowOutcome]| {
        v.iter()
            .map(|r| r.as_ref().map(|t| t.token_id).ok())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&again),
        got.iter().map(|t| Some(t.token_id)).collect::<Vec<_>>()
    );
    let mut scratch = RowScratch::default();
    for (i, r) in row_samples.iter().enumerate() {
        let want = sample_row(&logits[i * vocab..(i + 1) * vocab], r, &mut scratch);
        assert_eq!(got[i].token_id, want.token_id, "row {i}");
        assert_eq!(got[i].logprob.is_some(), want.logprob.is_some(), "row {i}");
        if let (Some(g), Some(w)) = (got[i].logprob, want.logprob) {
            assert!((g - w).abs() < 1e-4, "row {i}: logprob {g} vs {w}");
        }
        let ids = |v: &[(u32, f32)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
        assert_eq!(
            ids(&got[i].top_logprobs),
            ids(&want.top_logprobs),
            "row {i}"
        );
    }
    assert_ne!(got[0].token_id, banned[0], "a banned id was sampled");
    assert_ne!(got[1].token_id, cpu_argmax(1), "a -100 bias was sampled");
    assert_eq!(
        got[2].token_id, 250,
        "row 2's bias toward 250 in its grammar"
    );
    assert_ne!(
        got[3].token_id,
        cpu_argmax(3),
        "row 3 sampled a disallowed token"
    );
}

#[test]
fn adapters_from_the_host_tier_fill_device_slots_like_direct_loads() {
    let c = config();
    let dev_model = gpu_model();
    let dev = dev_model.device();
    let w = adapter(&c, 8, &[0, 2, 3, 6], 11, DTYPE);
    let prepared = LoraStack::prepare(&c, &w, LoraDtype::F16).unwrap();
    let mut direct = GpuLoraStack::new(dev, DTYPE, &c, 2, 8).unwrap();
    let mut host = GpuLoraStack::new(dev, DTYPE, &c, 2, 8).unwrap();
    let mut imaged = GpuLoraStack::new(dev, DTYPE, &c, 2, 8).unwrap();
    direct.load(dev, 1, &w).unwrap();
    host.load_prepared(dev, 1, &prepared).unwrap();
    // What the loader thread keeps for a GPU engine, filled as a copy of its bits; slot 0 first
    // holds another adapter, which the image's untargeted projections must clear.
    let image = GpuAdapterImage::new(&c, &w.tensors(), DTYPE).unwrap();
    assert_eq!(image, direct.image_of(&w).unwrap());
    let other = adapter(&c, 8, &[0, 1, 2, 3, 4, 5, 6], 12, DTYPE);
    imaged.load(dev, 1, &other).unwrap();
    imaged.load_image_with(&mut &*dev, 1, &image).unwrap();
    let ids: Vec<u32> = (0..4).collect();
    let table = [0u32];
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: 4,
        context_len: 4,
        block_table: &table,
    }];
    let batch = ForwardBatch {
        token_ids: &ids,
        positions: &ids,
        slot_mapping: &ids,
        seqs: &seqs,
        logits_indices: &[3],
    };
    let segs = segments_from_token_slots(&[Some(1); 4]);
    let run = |stack: &GpuLoraStack| {
        let kv = dev_model.new_kv_cache(1, 16).unwrap();
        let lora = GpuLoraBatch {
            stack,
            segments: &segs,
        };
        dev_model
            .forward_with_lora(&batch, &kv, Some(&lora))
            .unwrap()
    };
    let base = dev_model
        .forward(&batch, &dev_model.new_kv_cache(1, 16).unwrap())
        .unwrap();
    let (a, b) = (run(&direct), run(&host));
    assert_eq!(a, b, "f16-prepared weights are the f16-rounded originals");
    assert_ne!(a, base, "the adapter changed the logits");
    assert_eq!(
        run(&imaged),
        a,
        "the image fills the slot as a direct load does"
    );
    // An image of another dtype or model is refused, naming what differs.
    let other_dtype = match DTYPE {
        DType::F16 => DType::Bf16,
        DType::Bf16 => DType::F16,
    };
    let e = imaged
        .load_image_with(
            &mut &*dev,
            0,
            &GpuAdapterImage::new(&c, &w.tensors(), other_dtype).unwrap(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
    let q8 = LoraStack::prepare(&c, &w, LoraDtype::Q8).unwrap();
    let e = host.load_prepared(dev_model.device(), 0, &q8).unwrap_err();
    assert!(e.to_string().contains("adapters.dtype"), "{e}");
}

#[test]
fn the_kv_pool_is_what_the_memory_plan_leaves() {
    let step = StepLimits {
        max_num_batched_tokens: 64,
        max_num_seqs: 8,
        max_scored_rows: 0,
        max_model_len: 128,
    };
    let cfg_with = |gpu_memory_utilization, step| GpuBackendConfig {
        block_size: 16,
        kv_blocks: KvBlocks::Plan {
            gpu_memory_utilization,
        },
        adapter_slots: Some(SlotSpec {
            num_slots: 2,
            max_rank: 8,
            format: SlotFormat::Host(LoraDtype::F16),
        }),
        step,
        cuda_graph_max_batch: 0,
    };
    let cfg = |gpu_memory_utilization| cfg_with(gpu_memory_utilization, step);
    let b = GpuBackend::new(gpu_model(), cfg(0.05)).unwrap();
    let plan = b.memory_plan().unwrap();
    let total = caduceus_kernels::gpu::EMULATED_MEMORY_BYTES as u64;
    assert_eq!(plan.budget_bytes, (total as f64 * 0.05) as u64);
    assert_eq!(b.num_kv_blocks() as u64, plan.num_gpu_blocks);
    let c = config();
    let per_block = (2 * c.num_layers * 16 * c.num_kv_heads * c.head_dim * 2) as u64;
    assert_eq!(plan.kv_bytes, plan.num_gpu_blocks * per_block);
    assert!(plan.fixed_bytes + plan.kv_bytes <= plan.budget_bytes);
    assert!(plan.budget_bytes - plan.fixed_bytes - plan.kv_bytes < per_block);
    // A budget below the weights says what to change.
    let e = GpuBackend::new(gpu_model(), cfg(0.0001)).err().unwrap();
    assert!(e.to_string().contains("gpu_memory_utilization"), "{e}");
    // A max_model_len the pool cannot hold says which one it can, and that one starts.
    let long = StepLimits {
        max_model_len: (plan.num_gpu_blocks as usize + 4) * 16,
        ..step
    };
    let e = GpuBackend::new(gpu_model(), cfg_with(0.05, long))
        .err()
        .unwrap()
        .to_string();
    let (_, tail) = e.split_once("model.max_model_len to at most ").expect(&e);
    let fits: usize = tail.split(',').next().unwrap().parse().unwrap();
    assert!(fits > 0 && fits < long.max_model_len, "{e}");
    let at_fits = StepLimits {
        max_model_len: fits,
        ..step
    };
    assert!(
        GpuBackend::new(gpu_model(), cfg_with(0.05, at_fits)).is_ok(),
        "{e}"
    );
}

#[test]
fn a_model_too_big_for_the_device_is_refused_with_both_sizes() {
    let c = config();
    let m = gpu_model();
    // The config-only size is what the upload holds (plus the RoPE frequency table).
    let estimate = llama_weight_bytes(&c, DTYPE.size());
    let rope_table = (c.head_dim / 2 * 4) as u64;
    assert_eq!(m.weight_bytes() as u64, estimate + rope_table);
    // Llama-3-8B in bf16 (16 GB) on the emulated device's 1 GiB.
    let mut big = c.clone();
    (big.hidden_size, big.intermediate_size, big.num_layers) = (4096, 14336, 32);
    (
        big.num_heads,
        big.num_kv_heads,
        big.head_dim,
        big.vocab_size,
    ) = (32, 8, 128, 128256);
    let dev = m.device();
    let (free, total) = dev.memory_info().unwrap();
    let e = check_weights_fit(
        &dev.describe(),
        "bf16",
        llama_weight_bytes(&big, 2),
        (free as u64, total as u64),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("15316.5 MiB in bf16") && e.contains("1024.0 MiB in total"),
        "{e}"
    );
}
