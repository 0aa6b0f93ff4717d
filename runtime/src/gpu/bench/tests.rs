//! `gpu-bench` on a tiny shape in the kernels' host emulation: the random model is the model its
//! store describes (the CPU model on the same store gives the same logits), every model-level
//! part runs and reports what it was asked for, and the adapter mix follows its power law. The
//! engine part runs warm and cold below (and in `cli::gpu_bench`'s test of the whole command).

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::{DType, Device};

use super::{run_model_parts, ModelBenchOptions};
use crate::gpu::bench_engine::{
    power_law_mix, run_engine_part, EngineBenchOptions, EngineFigure, StepProfile,
};
use crate::gpu::model::profile::{Op, OpProfile};
use crate::gpu::random_model::{config_for, random_gpu_model, random_store};
use crate::gpu::roofline::{spec_for, ModelShape};
use crate::kv_cache::KvCache;
use crate::model::{ForwardBatch, LlamaModel};

const TINY: ModelShape = ModelShape {
    hidden: 64,
    layers: 1,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    ffn: 96,
    vocab: 256,
    dtype_bytes: 2,
};

#[test]
fn random_gpu_model_matches_the_cpu_model_of_its_store() {
    let config = config_for(&TINY, 64).unwrap();
    let cpu = LlamaModel::from_tensors(config.clone(), &mut random_store(&config, 5)).unwrap();
    let gpu = random_gpu_model(&TINY, 64, Device::emulated(), DType::Bf16, 5).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 3) % 256).collect();
    let pos: Vec<u32> = (0..12).collect();
    let table = [0u32];
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: 12,
        context_len: 12,
        block_table: &table,
    }];
    let batch = ForwardBatch {
        token_ids: &ids,
        positions: &pos,
        slot_mapping: &pos,
        seqs: &seqs,
        logits_indices: &[11],
    };
    let want = cpu.forward(&batch, &mut KvCache::new(1, cpu.kv_cache_shape(1, 16)));
    let got = gpu
        .forward(&batch, &gpu.new_kv_cache(1, 16).unwrap())
        .unwrap();
    assert_eq!(got.len(), 256);
    let spread = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(spread > 0.1, "random logits should not all be ~0: {spread}");
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        // bf16 activations between layers: within 3% of the largest logit.
        assert!((g - w).abs() <= 0.03 * spread, "logit {t}: {g} vs cpu {w}");
    }
}

#[test]
fn an_unrunnable_shape_is_an_error_not_a_panic() {
    let no_heads = ModelShape { heads: 0, ..TINY };
    assert!(config_for(&no_heads, 64).is_err());
    // Builds (the loader does not know the kernels), but the first step says which head dims
    // the attention kernels have.
    let bad = ModelShape {
        head_dim: 24,
        ..TINY
    };
    let model = random_gpu_model(&bad, 64, Device::emulated(), DType::Bf16, 1).unwrap();
    let opts = ModelBenchOptions {
        decode_batches: vec![1],
        context: 4,
        warmup: 0,
        steps: 1,
        prefill_len: 0,
        lora_streams: 0,
        lora_distinct: vec![],
        lora_rank: 4,
        block_size: 16,
    };
    let err = run_model_parts(&model, &bad, None, &opts, &mut |_| {}).err();
    assert!(err.is_some_and(|e| e.to_string().contains("24")));
}

#[test]
fn model_parts_run_on_a_tiny_shape_and_report_each_configuration() {
    let model = random_gpu_model(&TINY, 64, Device::emulated(), DType::Bf16, 1).unwrap();
    let gpu = spec_for(&model.device().describe());
    assert!(gpu.is_none(), "the emulation has no datasheet row");
    let opts = ModelBenchOptions {
        decode_batches: vec![1, 3],
        context: 20,
        warmup: 0,
        steps: 1,
        prefill_len: 17,
        lora_streams: 2,
        lora_distinct: vec![1, 2],
        lora_rank: 4,
        block_size: 16,
    };
    let mut lines = Vec::new();
    let r = run_model_parts(&model, &TINY, gpu.as_ref(), &opts, &mut |s| {
        lines.push(s.to_string())
    })
    .unwrap();
    let batches: Vec<usize> = r.decode.iter().map(|d| d.batch).collect();
    assert_eq!(batches, [1, 3]);
    for d in &r.decode {
        assert_eq!((d.step.reps, d.eager.reps), (1, 1));
        assert!(d.step.min_ms > 0.0 && d.step.min_ms <= d.step.median_ms);
        assert!(d.eager.min_ms > 0.0);
        assert!((d.graph_speedup - d.eager.median_ms / d.step.median_ms).abs() < 1e-9);
        assert!((d.tokens_per_s - d.batch as f64 / (d.step.median_ms / 1e3)).abs() < 1e-6);
        assert!(d.step.roofline.is_none() && d.meets_target.is_none());
        // The graphs again with programmatic dependent launches, which the emulation accepts
        // (and runs as plain launches).
        assert!(d.programmatic_launch.as_ref().is_some_and(|t| t.reps == 1));
    }
    assert!(
        !model.device().programmatic_launch(),
        "left on after the bench"
    );
    let p = r.prefill.as_ref().unwrap();
    assert_eq!(p.prompt_len, 17);
    assert!(p.tokens_per_s > 0.0 && p.flops_utilization.is_none());
    let l = r.multi_lora.as_ref().unwrap();
    // Each adapter count under both graph mappings, the engine's first.
    let runs: Vec<(usize, &str)> = l.runs.iter().map(|x| (x.distinct, x.mapping)).collect();
    assert_eq!(
        (l.streams, runs),
        (
            2,
            vec![(1, "bgmv"), (1, "grouped"), (2, "bgmv"), (2, "grouped")]
        )
    );
    assert!(l
        .runs
        .iter()
        .all(|x| x.over_base.is_finite() && x.over_base > 0.0));
    // The prefill again over each adapter count, its adapter deltas in the profile.
    let counts: Vec<usize> = l.prefill.iter().map(|x| x.distinct).collect();
    assert_eq!(counts, [1, 2]);
    for x in &l.prefill {
        assert_eq!(x.prefill.prompt_len, 17);
        assert!(x.over_base.is_finite() && x.over_base > 0.0);
        let lora = x.prefill.profile.ops.iter().find(|o| o.op == Op::Lora);
        assert!(
            lora.is_some_and(|o| o.calls == 4 * TINY.layers),
            "{:?}",
            x.prefill.profile
        );
    }
    // The engine's mapping and the base again with programmatic dependent launches.
    assert!(l.base_programmatic_launch.is_some());
    for x in &l.runs {
        let bgmv = x.mapping == "bgmv";
        assert_eq!(x.programmatic_launch.is_some(), bgmv, "{}", x.mapping);
        assert_eq!(
            x.programmatic_over_base
                .is_some_and(|r| r > 0.0 && r.is_finite()),
            bgmv
        );
    }
    // Profiles: every op of the pass, each layer op once per layer, the norms twice per layer
    // plus the final one, adapter deltas (four fused calls per layer) only where adapters ran.
    let per_layer = [
        Op::QkvProj,
        Op::RopeCache,
        Op::Attention,
        Op::OProj,
        Op::GateUpProj,
        Op::SiluMul,
        Op::DownProj,
    ];
    let check = |what: &str, p: &OpProfile, lora: bool| {
        let calls = |op| p.ops.iter().find(|t| t.op == op).map(|t| t.calls);
        for op in per_layer {
            assert_eq!(calls(op), Some(TINY.layers), "{what}: {op:?}");
        }
        assert_eq!(calls(Op::Norm), Some(2 * TINY.layers + 1), "{what}");
        assert_eq!((calls(Op::Embed), calls(Op::LmHead)), (Some(1), Some(1)));
        assert_eq!(calls(Op::Lora), lora.then_some(4 * TINY.layers), "{what}");
        let share: f64 = p.ops.iter().map(|t| t.share).sum();
        let ms: f64 = p.ops.iter().map(|t| t.ms).sum();
        assert!((share - 1.0).abs() < 1e-9, "{what}: shares sum to {share}");
        assert!((ms - p.ms_per_pass).abs() < 1e-9 && ms > 0.0, "{what}");
        assert!(
            p.ops.windows(2).all(|w| w[0].ms >= w[1].ms),
            "{what}: largest first"
        );
    };
    for d in &r.decode {
        check(&format!("decode {}", d.batch), &d.profile, false);
        assert_eq!(d.library_gemm.reps, 1);
    }
    check("prefill", &p.profile, false);
    for x in &l.runs {
        // The eager step's profile, the same for both mappings, once per adapter count.
        match (x.mapping, &x.profile) {
            ("bgmv", Some(p)) => check(&format!("lora {}", x.distinct), p, true),
            ("grouped", None) => {}
            (m, p) => panic!("lora {} {m}: profile {}", x.distinct, p.is_some()),
        }
    }
    // The attention sweep: every batch, each kernel (CUDA cores first, then tensor cores in
    // both layouts), Auto first, each distinct (kernel, layout, plan) once (context 20: Off and
    // every forced size give the one-split plan, Auto splits a batch this small).
    for b in [1, 3] {
        let runs: Vec<_> = r.attention.iter().filter(|a| a.batch == b).collect();
        assert_eq!(
            (runs[0].kernel, runs[0].layout, runs[0].split.as_str()),
            ("cuda_cores", None, "auto")
        );
        let cuda = runs.iter().filter(|a| a.kernel == "cuda_cores").count();
        for layout in ["keys_across_warps", "query_tile"] {
            let tc = runs.iter().filter(|a| a.layout == Some(layout));
            assert!(tc.clone().all(|a| a.kernel == "tensor_cores"));
            assert_eq!(tc.count(), cuda, "batch {b}: each plan in {layout}");
        }
        let mut plans: Vec<_> = runs
            .iter()
            .map(|a| (a.kernel, a.layout, a.num_splits, a.tokens_per_split))
            .collect();
        let n = plans.len();
        plans.sort_unstable();
        plans.dedup();
        assert_eq!(plans.len(), n, "batch {b}: a plan timed twice");
        for kernel in ["cuda_cores", "tensor_cores"] {
            assert!(
                plans.iter().any(|p| (p.0, p.2, p.3) == (kernel, 1, 32)),
                "batch {b}: the unsplit plan: {plans:?}"
            );
        }
        for a in &runs {
            assert!(a.us_per_layer > 0.0 && a.kv_gb_per_s > 0.0 && a.of_hbm.is_none());
            assert!(a.num_splits * a.tokens_per_split >= a.context);
        }
    }
    // Both prefill kernels alone on the prefill prompt; the figures ran on the default's.
    let kernels: Vec<_> = r.prefill_kernels.iter().map(|k| k.kernel).collect();
    assert_eq!(kernels, ["cuda_cores", "tensor_cores"]);
    assert!(r
        .prefill_kernels
        .iter()
        .all(|k| k.prompt_len == 17 && k.us_per_layer > 0.0 && k.of_peak.is_none()));
    assert_eq!(r.attention_kernel, "tensor_cores");
    // The emulation runs the host loop under every policy and tunes nothing.
    assert_eq!(r.gemm_policy, "tuned");
    assert!(r.gemm_tuning.is_empty() && r.gemm_tuning_programmatic.is_empty());
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["decode"][1]["step"]["median_ms"].is_f64());
    // Ten ops without adapters, named in snake_case.
    let ops = json["decode"][0]["profile"]["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 10);
    assert!(ops.iter().any(|o| o["op"] == "gate_up_proj"));
    assert!(lines.iter().any(|l| l.starts_with("decode batch 3")));
    assert!(lines
        .iter()
        .any(|l| l == "decode graphs captured for batches [1, 3] (GEMM policy tuned)"));
}

#[test]
fn power_law_mix_favours_low_ranks_and_is_seeded() {
    let mix = power_law_mix(20_000, 64, 1.0, 9);
    assert_eq!(mix, power_law_mix(20_000, 64, 1.0, 9));
    let mut counts = [0usize; 64];
    for &k in &mix {
        counts[k] += 1;
    }
    // Zipf(1) over 64: P(0) = 1 / H_64 = 0.2108, P(1) = half of it, P(63) = 1/64 of it.
    let h64: f64 = (1..=64).map(|k| 1.0 / k as f64).sum();
    let p0 = counts[0] as f64 / 20_000.0;
    assert!((p0 - 1.0 / h64).abs() < 0.015, "{p0}");
    let ratio = counts[0] as f64 / counts[1] as f64;
    assert!((ratio - 2.0).abs() < 0.25, "{ratio}");
    assert!(counts[63] > 0 && counts[63] < counts[0] / 20);
    assert!(power_law_mix(5, 0, 1.0, 1).is_empty());
}

/// The engine part on the tiny shape: `requests` x (5 in, 3 out) over `adapters` adapters,
/// every request fitting the first step (30-odd prompt tokens of a 64-token budget).
fn tiny_engine_run(requests: usize, adapters: usize, cold: bool) -> EngineFigure {
    let scratch = tempfile::tempdir().unwrap();
    let opts = EngineBenchOptions {
        requests,
        input_len: 5,
        output_len: 3,
        adapters,
        distinct_files: 2,
        rank: 4,
        zipf_s: 1.0,
        max_num_seqs: requests,
        cuda_graph_max_batch: requests,
        max_num_batched_tokens: 64,
        block_size: 16,
        num_blocks: Some(64),
        scratch_dir: scratch.path().to_path_buf(),
        seed: 3,
        cold,
        // The warm runs with programmatic dependent launches (which the emulation accepts).
        programmatic_launch: !cold,
    };
    let model = random_gpu_model(&TINY, 64, Device::emulated(), DType::Bf16, 2).unwrap();
    let fig = run_engine_part(model, &opts, &mut |_| {}).unwrap();
    assert_eq!(fig.programmatic_launch, !cold);
    let leftovers = std::fs::read_dir(scratch.path()).unwrap().count();
    assert_eq!(leftovers, 0, "the adapter folders are removed");
    fig
}

/// The invariants of any run's step profile: every step has one kind, each kind that ran took
/// time, and every request got all of its tokens.
fn check_run(fig: &EngineFigure) {
    let p: &StepProfile = &fig.step_profile;
    assert_eq!(fig.num_steps, p.num_steps);
    assert_eq!(
        p.empty.steps + p.with_prefill.steps + p.decode_only.steps,
        p.num_steps,
        "{p:?}"
    );
    for kind in [&p.with_prefill, &p.decode_only] {
        assert!(kind.steps > 0 && kind.wall_s > 0.0, "{p:?}");
        // Each step that ran something called the backend's forward and sample, inside it.
        assert!(kind.forward_s > 0.0 && kind.sample_s > 0.0, "{p:?}");
        assert!(kind.forward_s + kind.sample_s <= kind.wall_s, "{p:?}");
    }
    // An empty step runs no forward.
    assert_eq!(p.empty.forward_s, 0.0, "{p:?}");
    assert_eq!(fig.failed_requests, 0);
    assert_eq!(fig.output_tokens, fig.requests * fig.output_len);
    assert!(fig.output_tokens_per_s > 0.0 && fig.elapsed_s > 0.0);
}

#[test]
fn warm_engine_run_starts_with_every_adapter_resident_and_never_idles() {
    let fig = tiny_engine_run(6, 3, false);
    check_run(&fig);
    // Warmed before the clock: in the host cache and a device slot, so no request parks on a
    // load, no step is empty and no slot is filled while the clock runs.
    assert!(fig.adapters_warm);
    assert_eq!(fig.adapters_in_host_cache_at_start, 3);
    assert_eq!(fig.adapters_in_device_slots_at_start, 3);
    assert_eq!(fig.device_slot_fills, 0);
    let p = fig.step_profile;
    assert_eq!((p.empty.steps, p.waits), (0, 0), "{p:?}");
    // All six prompts fit the first step, then two decode-only steps give tokens 2 and 3.
    assert_eq!((p.with_prefill.steps, p.decode_only.steps), (1, 2), "{p:?}");
    // The warm-up loaded the three adapters from disk, blocking (not spinning) on the loads.
    let w = fig.warmup_step_profile.expect("a warm run has a warm-up");
    assert!(fig.adapter_warmup_s.is_some_and(|s| s > 0.0));
    // The warm-up filled the slots, each a timed copy on the engine thread.
    assert!(fig.slot_fill_ms.is_some_and(|ms| ms > 0.0), "{fig:?}");
    // From images in pinned pages, as serve fills them: the pool held all three.
    assert!(
        fig.adapter_pinned_pool_mib.is_some_and(|m| m > 0),
        "{fig:?}"
    );
    assert_eq!(fig.adapter_images_not_pinned, 0, "{fig:?}");
    assert!(w.empty.steps <= 3 + 1, "{w:?}");
    assert_eq!(
        w.waits, w.empty.steps,
        "every empty step blocks once: {w:?}"
    );
    let json = serde_json::to_value(&fig).unwrap();
    assert_eq!(json["step_profile"]["with_prefill"]["steps"], 1);
    assert!(json["adapter_warmup_s"].is_f64());
}

#[test]
fn cold_engine_run_loads_adapters_in_the_clock_without_spinning() {
    let (requests, adapters) = (8, 4);
    let fig = tiny_engine_run(requests, adapters, true);
    check_run(&fig);
    assert!(!fig.adapters_warm);
    assert!(fig.adapter_warmup_s.is_none() && fig.warmup_step_profile.is_none());
    assert_eq!(fig.adapters_in_host_cache_at_start, 0);
    assert_eq!(fig.adapters_in_device_slots_at_start, 0);
    // One slot fill per adapter the mix used, each on its first schedule (one slot each).
    let mut used = power_law_mix(requests, adapters, 1.0, 3);
    used.sort_unstable();
    used.dedup();
    assert_eq!(fig.device_slot_fills, used.len() as u64);
    // Requests park until their adapter lands; each empty step then blocks until a load lands,
    // so there are at most one per load and the first (the old loop spun through thousands).
    let p = fig.step_profile;
    assert!(p.empty.steps <= used.len() as u64 + 1, "{p:?}");
    assert_eq!(
        p.waits, p.empty.steps,
        "every empty step blocks once: {p:?}"
    );
    let json = serde_json::to_value(&fig).unwrap();
    assert!(json["adapter_warmup_s"].is_null());
    assert_eq!(json["adapters_warm"], false);
}
