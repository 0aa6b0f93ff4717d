//! PEFT adapter files: loading the reference adapters, every validation error, fuzzed files,
//! synthetic adapters (`make-adapters`) and the GGUF q/k row permutation.

#[path = "adapter_files/fixtures.rs"]
mod fixtures;
#[path = "adapter_files/fuzz.rs"]
mod fuzz;
mod support;
#[path = "adapter_files/synthetic.rs"]
mod synthetic;
#[path = "adapter_files/validation.rs"]
mod validation;

use std::time::Instant;

use caduceus_runtime::adapters::peft::{load_adapter, permute_qk_rows, probe, TargetModules};
use caduceus_runtime::adapters::Projection;
use caduceus_runtime::model::config::LlamaConfig;
use caduceus_runtime::model::gguf::GgufFile;
use fixtures::*;

#[test]
fn doctor_a_loads_all_seven_projections_with_the_raw_values() {
    let base = tiny_llama();
    let dir = shared("reference/tiny-llama/adapters/doctor-a");
    let w = load_adapter(&dir, &base, &LIMITS).unwrap();
    assert_eq!(w.rank, 8);
    assert_eq!(w.scale, 2.0);
    assert_eq!(w.targets(), Projection::ALL.to_vec());
    assert_eq!(w.layers.len(), base.num_layers);
    assert_eq!(w.source, dir);
    let dims = caduceus_runtime::model::lora::projection_dims(&base);
    let file = dir.join("adapter_model.safetensors");
    for (layer, pairs) in w.layers.iter().enumerate() {
        for p in Projection::ALL {
            let pair = pairs[p.index()].as_ref().unwrap();
            let (i, o) = dims[p.index()];
            assert_eq!((pair.a.len(), pair.b.len()), (8 * i, o * 8), "{p:?}");
            // An HF base keeps PEFT's row order: the values are the file's, bit for bit.
            let (shape, a) = raw_f32(&file, &tensor_name(layer, p, "A"));
            assert_eq!(shape, vec![8, i]);
            assert_eq!(pair.a, a);
            let (_, b) = raw_f32(&file, &tensor_name(layer, p, "B"));
            assert_eq!(pair.b, b);
        }
    }
    assert_eq!(
        w.nbytes(),
        std::fs::metadata(&file).unwrap().len() as usize - header_len(&file)
    );
}

/// Bytes of a safetensors file before its data.
fn header_len(file: &std::path::Path) -> usize {
    let bytes = std::fs::read(file).unwrap();
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

#[test]
fn doctor_b_is_rslora_on_q_and_v() {
    let base = tiny_llama();
    let dir = shared("reference/tiny-llama/adapters/doctor-b");
    let w = load_adapter(&dir, &base, &LIMITS).unwrap();
    assert_eq!(w.rank, 4);
    assert_eq!(w.scale, 4.0, "rsLoRA: 8 / sqrt(4)");
    assert_eq!(w.targets(), vec![Projection::Q, Projection::V]);
    for pairs in &w.layers {
        for p in Projection::ALL {
            assert_eq!(
                pairs[p.index()].is_some(),
                matches!(p, Projection::Q | Projection::V)
            );
        }
    }
    let v = w.layers[1][Projection::V.index()].as_ref().unwrap();
    assert_eq!((v.a.len(), v.b.len()), (4 * 64, 32 * 4));
    let (_, raw_b) = raw_f32(
        &dir.join("adapter_model.safetensors"),
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    );
    assert_eq!(v.b[0], raw_b[0]);
    assert_eq!(v.b[127], raw_b[127]);

    let info = probe(&dir).unwrap();
    assert_eq!(
        (info.rank, info.lora_alpha, info.use_rslora, info.scale),
        (4, 8.0, true, 4.0)
    );
    assert_eq!(info.targets, vec![Projection::Q, Projection::V]);
    assert_eq!(
        info.target_modules,
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    );
    assert_eq!(info.base_model_name_or_path.as_deref(), Some("../../model"));
}

#[test]
fn dr_lin_loads_against_the_default_gguf_model_in_milliseconds() {
    let Some(model) = default_model() else { return };
    let base = LlamaConfig::from_gguf(&GgufFile::open(&model).unwrap()).unwrap();
    assert!(
        !base.rope_neox,
        "a GGUF llama base has llama.cpp's q/k row order"
    );
    let dir = shared("reference/avatars/dr-lin");
    let mut best = f64::INFINITY;
    let mut w = None;
    for _ in 0..5 {
        let start = Instant::now();
        w = Some(load_adapter(&dir, &base, &LIMITS).unwrap());
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    let w = w.unwrap();
    eprintln!(
        "dr-lin: {} layers, {} bytes of f32, loaded in {best:.2} ms (best of 5)",
        w.layers.len(),
        w.nbytes()
    );
    assert_eq!((w.rank, w.scale, w.layers.len()), (8, 2.0, 30));
    assert_eq!(w.targets(), Projection::ALL.to_vec());

    // q and k rows of B follow the GGUF base's permuted order; everything else is the file's.
    let file = dir.join("adapter_model.safetensors");
    let (_, q_b) = raw_f32(&file, &tensor_name(3, Projection::Q, "B"));
    let q = w.layers[3][Projection::Q.index()].as_ref().unwrap();
    assert_eq!(q.b, permute_qk_rows(&q_b, base.num_heads, 8).unwrap());
    let (_, k_b) = raw_f32(&file, &tensor_name(3, Projection::K, "B"));
    let k = w.layers[3][Projection::K.index()].as_ref().unwrap();
    assert_eq!(k.b, permute_qk_rows(&k_b, base.num_kv_heads, 8).unwrap());
    let (_, v_b) = raw_f32(&file, &tensor_name(3, Projection::V, "B"));
    assert_eq!(w.layers[3][Projection::V.index()].as_ref().unwrap().b, v_b);

    // The same files against an HF-ordered base: same generation, unpermuted rows.
    let hf = LlamaConfig {
        rope_neox: true,
        ..base.clone()
    };
    let w_hf = load_adapter(&dir, &hf, &LIMITS).unwrap();
    assert_eq!(w_hf.generation, w.generation);
    assert_eq!(
        w_hf.layers[3][Projection::Q.index()].as_ref().unwrap().b,
        q_b
    );
}

/// numpy's `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2).reshape(n_head*d, cols)`, written
/// out as 4-d indexing.
fn llama_cpp_permute(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let d = w.len() / cols / n_head;
    let half = d / 2;
    let src = |h: usize, s: usize, j: usize, c: usize| w[((h * 2 + s) * half + j) * cols + c];
    let mut out = Vec::new();
    for h in 0..n_head {
        for j in 0..half {
            for s in 0..2 {
                for c in 0..cols {
                    out.push(src(h, s, j, c));
                }
            }
        }
    }
    out
}

fn matmul(x: &[f32], y: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for t in 0..k {
            for j in 0..m {
                out[i * m + j] += x[i * k + t] * y[t * m + j];
            }
        }
    }
    out
}

#[test]
fn permuted_b_times_a_is_the_permuted_delta() {
    // 2 heads of dim 4, rank 3, in 5: B [8, 3], A [3, 5].
    let b: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let a: Vec<f32> = (0..15).map(|i| (i as f32).sin()).collect();
    let permuted_b = permute_qk_rows(&b, 2, 3).unwrap();
    assert_eq!(permuted_b, llama_cpp_permute(&b, 2, 3));
    let delta = matmul(&b, &a, 8, 3, 5);
    assert_eq!(
        matmul(&permuted_b, &a, 8, 3, 5),
        llama_cpp_permute(&delta, 2, 5)
    );
    // Head 0's rows 0..4 become 0, 2, 1, 3 (pairs (i, i + d/2) made adjacent).
    let rows: Vec<f32> = (0..8).map(|r| r as f32).collect();
    assert_eq!(
        permute_qk_rows(&rows, 2, 1).unwrap(),
        vec![0., 2., 1., 3., 4., 6., 5., 7.]
    );
}

#[test]
fn a_gguf_llama_base_gets_q_and_k_rows_permuted() {
    let tmp = tempfile::tempdir().unwrap();
    let targets = [Projection::Q, Projection::K, Projection::V];
    let dir = write_adapter(
        tmp.path(),
        "qkv",
        &peft_config(2, 4.0, &["q_proj", "k_proj", "v_proj"]),
        &small_tensors(2, &targets),
    );
    let hf = load_small(&dir, true);
    let gguf = load_small(&dir, false);
    assert_eq!(hf.generation, gguf.generation);
    for layer in 0..2 {
        let pair = |w: &caduceus_runtime::adapters::AdapterWeights, p: Projection| {
            w.layers[layer][p.index()].clone().unwrap()
        };
        let q = pair(&hf, Projection::Q);
        assert_eq!(pair(&gguf, Projection::Q).b, llama_cpp_permute(&q.b, 2, 2));
        assert_eq!(pair(&gguf, Projection::Q).a, q.a);
        let k = pair(&hf, Projection::K);
        assert_eq!(pair(&gguf, Projection::K).b, llama_cpp_permute(&k.b, 1, 2));
        assert_eq!(pair(&gguf, Projection::V), pair(&hf, Projection::V));
    }
}
