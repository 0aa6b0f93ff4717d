//! The GPU forward pass in the kernels' host emulation against the CPU model on the same
//! weights: chunked prefill of two sequences, a mixed prefill + decode step, then decode steps
//! (split-K and not), over shuffled block tables.

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::quant::Matrix;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::GpuModel;
use crate::kv_cache::KvCache;
use crate::model::batch::ForwardBatch;
use crate::model::config::LlamaConfig;
use crate::model::llama::LlamaModel;
use crate::model::weights::TensorStore;

/// A random Llama with GQA (4 query heads of 64 on 2 KV heads), 2 layers.
const CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "vocab_size": 300, "hidden_size": 256, "intermediate_size": 320, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false}"#;

/// Weights already rounded to `dtype`, so both models multiply the same numbers.
fn store(c: &LlamaConfig, dtype: DType) -> TensorStore {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let round = |v: f32| match dtype {
        DType::Bf16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
    };
    let mut s = TensorStore::default();
    let mut mat = |s: &mut TensorStore, name: String, rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols).map(|_| round(rng.random_range(-scale..scale))).collect();
        s.insert_matrix(name, Matrix::from_f32(rows, cols, &v));
    };
    let (h, q, kv, f) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
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
        let v = (0..h).map(|_| round(norm_rng.random_range(0.8..1.2))).collect();
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

#[test]
fn emulated_gpu_forward_matches_the_cpu_model() {
    let config = LlamaConfig::from_hf_json(CONFIG).unwrap();
    let block_size = 16;
    let num_blocks = 12;
    // Shuffled, interleaved block tables.
    let tables: [Vec<u32>; 2] = [vec![5, 2, 9, 0], vec![7, 11, 3]];
    let prompts: [Vec<u32>; 2] = [
        (0..40).map(|i| (i * 37 + 11) % 300).collect(),
        (0..6).map(|i| (i * 53 + 5) % 300).collect(),
    ];
    for dtype in [DType::Bf16, DType::F16] {
        let cpu = LlamaModel::from_tensors(config.clone(), &mut store(&config, dtype)).unwrap();
        let gpu = GpuModel::from_tensors(config.clone(), &mut store(&config, dtype), Device::emulated(), dtype)
            .unwrap();
        let mut cpu_kv = KvCache::new(config.num_layers, cpu.kv_cache_shape(num_blocks, block_size));
        let gpu_kv = gpu.new_kv_cache(num_blocks, block_size).unwrap();
        let mut tokens = prompts.clone();
        let steps: Vec<Vec<Piece>> = vec![
            // Chunked prefill of both.
            vec![Piece { seq: 0, start: 0, len: 21 }, Piece { seq: 1, start: 0, len: 6 }],
            // The rest of the first prompt next to the second's first decode (prefill kernel).
            vec![Piece { seq: 0, start: 21, len: 19 }, Piece { seq: 1, start: 6, len: 1 }],
            // Decode steps (decode kernel) crossing a block edge.
            vec![Piece { seq: 0, start: 40, len: 1 }, Piece { seq: 1, start: 7, len: 1 }],
            vec![Piece { seq: 0, start: 41, len: 1 }, Piece { seq: 1, start: 8, len: 1 }],
            vec![Piece { seq: 1, start: 9, len: 1 }],
        ];
        let mut worst = 0f32;
        for (step, pieces) in steps.iter().enumerate() {
            let (mut ids, mut pos, mut slots, mut logits_rows) = (vec![], vec![], vec![], vec![]);
            let mut seqs = Vec::new();
            for p in pieces {
                let q_start = ids.len();
                for i in p.start..p.start + p.len {
                    ids.push(tokens[p.seq][i]);
                    pos.push(i as u32);
                    slots.push(tables[p.seq][i / block_size] * block_size as u32 + (i % block_size) as u32);
                }
                logits_rows.push(ids.len() - 1);
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
                logits_indices: &logits_rows,
            };
            let want = cpu.forward(&batch, &mut cpu_kv);
            let got = gpu.forward(&batch, &gpu_kv).unwrap();
            assert_eq!(got.len(), want.len());
            let vocab = config.vocab_size;
            for (r, p) in pieces.iter().enumerate() {
                let (g, w) = (&got[r * vocab..(r + 1) * vocab], &want[r * vocab..(r + 1) * vocab]);
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                worst = worst.max(err / scale);
                // Activations rounded to the dtype at every op: a few of its ulps of the logit scale.
                let bound = match dtype {
                    DType::Bf16 => 0.06,
                    DType::F16 => 0.01,
                };
                assert!(err <= bound * scale, "{dtype:?} step {step} seq {}: max |gpu - cpu| {err} vs scale {scale}", p.seq);
                // Greedy agrees wherever the CPU's top two are apart by more than the error.
                let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap();
                let (ga, wa) = (argmax(g), argmax(w));
                let mut sorted = w.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] > 2.0 * err {
                    assert_eq!(ga, wa, "{dtype:?} step {step} seq {}: greedy token differs", p.seq);
                }
                // The next step feeds the CPU's greedy token to both.
                if p.start + p.len == tokens[p.seq].len() {
                    tokens[p.seq].push(wa as u32);
                }
            }
        }
        eprintln!("{dtype:?}: worst logit error {worst:.4} of the logit scale");
    }
}
