//! The GPU forward pass in the kernels' host emulation against the CPU model on the same
//! weights: chunked prefill of two sequences, a mixed prefill + decode step, then decode steps
//! (split-K and not), over shuffled block tables.

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::attention::AttentionKernel;
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::lora::segments_from_token_slots;
use caduceus_kernels::quant::Matrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::GpuModel;
use crate::adapters::{AdapterWeights, LoraPair};
use crate::gpu::lora::{GpuLoraBatch, GpuLoraStack};
use crate::kv_cache::KvCache;
use crate::model::batch::ForwardBatch;
use crate::model::config::LlamaConfig;
use crate::model::llama::LlamaModel;
use crate::model::lora::{projection_dims, LoraBatch, LoraDtype, LoraStack};
use crate::model::weights::TensorStore;

/// A random Llama with GQA (2 query heads of 64 on 1 KV head), 2 layers: small, since the
/// emulation runs a thread per CUDA thread.
pub(crate) const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "vocab_size": 300, "hidden_size": 128, "intermediate_size": 192, "num_hidden_layers": 2,
  "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

/// Weights already rounded to `dtype`, so both models multiply the same numbers.
pub(crate) fn store(c: &LlamaConfig, dtype: DType) -> TensorStore {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let round = |v: f32| match dtype {
        DType::Bf16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
    };
    let mut s = TensorStore::default();
    let mut mat = |s: &mut TensorStore, name: String, rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| round(rng.random_range(-scale..scale)))
            .collect();
        s.insert_matrix(name, Matrix::from_f32(rows, cols, &v));
    };
    let (h, q, kv, f) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    mat(&mut s, "token_embd.weight".into(), c.vocab_size, h, 1.0);
    mat(&mut s, "output.weight".into(), c.vocab_size, h, 0.15);
    for i in 0..c.num_layers {
        let n = |t: &str| format!("blk.{i}.{t}");
        mat(&mut s, n("attn_q.weight"), q, h, 0.12);
        mat(&mut s, n("attn_k.weight"), kv, h, 0.12);
        mat(&mut s, n("attn_v.weight"), kv, h, 0.12);
        mat(&mut s, n("attn_output.weight"), h, q, 0.1);
        mat(&mut s, n("ffn_gate.weight"), f, h, 0.1);
        mat(&mut s, n("ffn_up.weight"), f, h, 0.1);
        mat(&mut s, n("ffn_down.weight"), h, f, 0.1);
    }
    let mut norm_rng = ChaCha8Rng::seed_from_u64(8);
    let mut norm = |s: &mut TensorStore, name: String| {
        let v = (0..h)
            .map(|_| round(norm_rng.random_range(0.8..1.2)))
            .collect();
        s.insert_vector(name, v);
    };
    norm(&mut s, "output_norm.weight".into());
    for i in 0..c.num_layers {
        norm(&mut s, format!("blk.{i}.attn_norm.weight"));
        norm(&mut s, format!("blk.{i}.ffn_norm.weight"));
    }
    s
}

/// One scheduled piece of a step: `len` tokens of sequence `seq` starting at position `start`.
struct Piece {
    seq: usize,
    start: usize,
    len: usize,
}

/// A random adapter of `rank` on the projections `targets` (indices into `Projection::ALL`),
/// weights rounded to `dtype` so both sides hold the same numbers.
pub(crate) fn adapter(
    c: &LlamaConfig,
    rank: usize,
    targets: &[usize],
    seed: u64,
    dtype: DType,
) -> AdapterWeights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let round = |v: f32| match dtype {
        DType::Bf16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
    };
    let dims = projection_dims(c);
    let layers = (0..c.num_layers)
        .map(|_| {
            std::array::from_fn(|p| {
                targets.contains(&p).then(|| {
                    let (i, o) = dims[p];
                    let mut v = |n: usize| {
                        (0..n)
                            .map(|_| round(rng.random_range(-0.1..0.1f32)))
                            .collect()
                    };
                    LoraPair {
                        a: v(rank * i),
                        b: v(o * rank),
                    }
                })
            })
        })
        .collect();
    AdapterWeights {
        rank,
        scale: 2.0,
        layers,
        generation: seed,
        source: "random".into(),
    }
}

/// The steps every case runs: chunked prefill of three sequences, the rest of the first prompt
/// next to decodes of the others (prefill kernel, SGMV), then decode-only steps (decode kernel,
/// BGMV) crossing a block edge.
fn steps() -> Vec<Vec<Piece>> {
    let p = |seq, start, len| Piece { seq, start, len };
    vec![
        vec![p(0, 0, 21), p(1, 0, 6), p(2, 0, 3)],
        vec![p(0, 21, 19), p(1, 6, 1), p(2, 3, 1)],
        vec![p(0, 40, 1), p(1, 7, 1), p(2, 4, 1)],
        vec![p(0, 41, 1), p(1, 8, 1)],
        vec![p(1, 9, 1), p(2, 5, 1)],
    ]
}

/// Runs [`steps`] on the CPU model and the emulated GPU model, feeding both the CPU's greedy
/// tokens, and checks every logits row. `adapters[s]` is sequence s's slot (None: base model).
fn compare(dtype: DType, adapters: [Option<u32>; 3]) {
    compare_with(dtype, adapters, false, AttentionKernel::CudaCores)
}

/// `store` plus Qwen2-style q/k/v biases in every layer (k's missing in layer 0: zeros).
fn biased_store(c: &LlamaConfig, dtype: DType) -> TensorStore {
    let mut s = store(c, dtype);
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let round = |v: f32| match dtype {
        DType::Bf16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
    };
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    for i in 0..c.num_layers {
        for (part, n) in [("q", q), ("k", kv), ("v", kv)] {
            if i == 0 && part == "k" {
                continue;
            }
            let v = (0..n).map(|_| round(rng.random_range(-0.5..0.5))).collect();
            s.insert_vector(format!("blk.{i}.attn_{part}.bias"), v);
        }
    }
    s
}

fn compare_with(
    dtype: DType,
    adapters: [Option<u32>; 3],
    bias: bool,
    attention_kernel: AttentionKernel,
) {
    let store = |c: &LlamaConfig, d: DType| {
        if bias {
            biased_store(c, d)
        } else {
            store(c, d)
        }
    };
    let config = LlamaConfig::from_hf_json(CONFIG).unwrap();
    let (block_size, num_blocks) = (16, 16);
    // Shuffled, interleaved block tables.
    let tables: [Vec<u32>; 3] = [vec![5, 2, 9, 0], vec![7, 11, 3], vec![14, 1]];
    let mut tokens: [Vec<u32>; 3] = [
        (0..40).map(|i| (i * 37 + 11) % 300).collect(),
        (0..6).map(|i| (i * 53 + 5) % 300).collect(),
        (0..3).map(|i| (i * 91 + 2) % 300).collect(),
    ];
    let cpu = LlamaModel::from_tensors(config.clone(), &mut store(&config, dtype)).unwrap();
    let mut gpu = GpuModel::from_tensors(
        config.clone(),
        &mut store(&config, dtype),
        Device::emulated(),
        dtype,
    )
    .unwrap();
    gpu.set_attention_kernel(attention_kernel);
    let mut cpu_kv = KvCache::new(
        config.num_layers,
        cpu.kv_cache_shape(num_blocks, block_size),
    );
    let gpu_kv = gpu.new_kv_cache(num_blocks, block_size).unwrap();
    // Slot 0: rank 8 on all seven projections; slot 1: rank 16 on q and v only.
    let weights = [
        adapter(&config, 8, &[0, 1, 2, 3, 4, 5, 6], 1, dtype),
        adapter(&config, 16, &[0, 2], 2, dtype),
    ];
    let mut cpu_lora = LoraStack::new(&config, 2, 16, LoraDtype::F32).unwrap();
    let mut gpu_lora = GpuLoraStack::new(gpu.device(), dtype, &config, 2, 16).unwrap();
    for (slot, w) in weights.iter().enumerate() {
        cpu_lora.load(slot, w).unwrap();
        gpu_lora.load(gpu.device(), slot, w).unwrap();
    }
    let vocab = config.vocab_size;
    for (step, pieces) in steps().iter().enumerate() {
        let (mut ids, mut pos, mut slots, mut rows, mut token_slots) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut seqs = Vec::new();
        for p in pieces {
            let q_start = ids.len();
            for i in p.start..p.start + p.len {
                ids.push(tokens[p.seq][i]);
                pos.push(i as u32);
                slots.push(
                    tables[p.seq][i / block_size] * block_size as u32 + (i % block_size) as u32,
                );
                token_slots.push(adapters[p.seq]);
            }
            rows.push(ids.len() - 1);
            seqs.push(SeqAttention {
                query_start: q_start,
                query_len: p.len,
                context_len: p.start + p.len,
                block_table: &tables[p.seq],
            });
        }
        let batch = ForwardBatch {
            token_ids: &ids,
            positions: &pos,
            slot_mapping: &slots,
            seqs: &seqs,
            logits_indices: &rows,
        };
        let segments = segments_from_token_slots(&token_slots);
        let want = cpu
            .forward_with_lora(
                &batch,
                &mut cpu_kv,
                Some(&LoraBatch {
                    stack: &cpu_lora,
                    segments: &segments,
                }),
            )
            .unwrap();
        let got = gpu
            .forward_with_lora(
                &batch,
                &gpu_kv,
                Some(&GpuLoraBatch {
                    stack: &gpu_lora,
                    segments: &segments,
                }),
            )
            .unwrap();
        assert_eq!(got.len(), want.len());
        for (r, p) in pieces.iter().enumerate() {
            let (g, w) = (
                &got[r * vocab..(r + 1) * vocab],
                &want[r * vocab..(r + 1) * vocab],
            );
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Activations are rounded to the dtype after every op (the CPU keeps f32): a few of
            // the dtype's ulps of the logit scale.
            let bound = match dtype {
                DType::Bf16 => 0.06,
                DType::F16 => 0.01,
            };
            let what = format!("{dtype:?} adapters {adapters:?} step {step} seq {}", p.seq);
            assert!(
                err <= bound * scale,
                "{what}: max |gpu - cpu| {err}, logit scale {scale}"
            );
            // Greedy agrees wherever the CPU's top two are further apart than the error.
            let argmax = |v: &[f32]| {
                (0..v.len())
                    .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
                    .unwrap()
            };
            let mut sorted = w.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            if sorted[0] - sorted[1] > 2.0 * err {
                assert_eq!(argmax(g), argmax(w), "{what}: greedy token differs");
            }
            if p.start + p.len == tokens[p.seq].len() {
                tokens[p.seq].push(argmax(w) as u32);
            }
        }
    }
}

#[test]
fn emulated_gpu_forward_matches_the_cpu_model() {
    // The base model alone in f16 (the mixed test below covers bf16 with a base sequence).
    compare(DType::F16, [None, None, None]);
}

#[test]
fn emulated_gpu_forward_with_mixed_adapters_matches_the_cpu_model() {
    // Two adapters and the base model in one batch.
    compare(DType::Bf16, [Some(0), None, Some(1)]);
}

#[test]
fn emulated_gpu_forward_with_attention_bias_matches_the_cpu_model() {
    compare_with(
        DType::Bf16,
        [None, Some(1), None],
        true,
        AttentionKernel::CudaCores,
    );
}

#[test]
fn emulated_gpu_forward_on_tensor_cores_matches_the_cpu_model() {
    // Prefill, mixed and split decode steps on the tensor-core attention kernel: its own bound
    // (softmax weights rounded to the dtype) is checked in the kernels' tests; through the model
    // it stays inside the dtype's bound, adapters mixed.
    compare_with(
        DType::Bf16,
        [Some(0), None, Some(1)],
        false,
        AttentionKernel::TensorCores,
    );
}

#[test]
fn adapters_change_the_logits() {
    // Guard against a LoRA path that adds nothing: the same batch with and without adapters.
    let config = LlamaConfig::from_hf_json(CONFIG).unwrap();
    let dtype = DType::F16;
    let gpu = GpuModel::from_tensors(
        config.clone(),
        &mut store(&config, dtype),
        Device::emulated(),
        dtype,
    )
    .unwrap();
    let mut stack = GpuLoraStack::new(gpu.device(), dtype, &config, 1, 8).unwrap();
    stack
        .load(
            gpu.device(),
            0,
            &adapter(&config, 8, &[0, 1, 2, 3, 4, 5, 6], 3, dtype),
        )
        .unwrap();
    let ids: Vec<u32> = (0..5).collect();
    let pos: Vec<u32> = (0..5).collect();
    let table = [0u32];
    let seqs = [SeqAttention {
        query_start: 0,
        query_len: 5,
        context_len: 5,
        block_table: &table,
    }];
    let batch = ForwardBatch {
        token_ids: &ids,
        positions: &pos,
        slot_mapping: &pos,
        seqs: &seqs,
        logits_indices: &[4],
    };
    let kv = gpu.new_kv_cache(1, 16).unwrap();
    let base = gpu.forward(&batch, &kv).unwrap();
    let segs = segments_from_token_slots(&[Some(0); 5]);
    let with = gpu
        .forward_with_lora(
            &batch,
            &kv,
            Some(&GpuLoraBatch {
                stack: &stack,
                segments: &segs,
            }),
        )
        .unwrap();
    let diff = base
        .iter()
        .zip(&with)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff > 1e-2,
        "the adapter moved no logit (max change {diff})"
    );
}
