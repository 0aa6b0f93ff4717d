//! On the default model (weights dequantized to f32): a request on an adapter produces what the
//! same model produces with the adapter merged into its weights, `W + scale * B A`.

use caduceus_kernels::quant::Matrix;
use caduceus_runtime::adapters::peft::load_adapter;
use caduceus_runtime::adapters::Projection;
use caduceus_runtime::generate::{generate_with_config, scheduler_config_for};
use caduceus_runtime::model::config::LlamaConfig;
use caduceus_runtime::model::gguf::GgufFile;
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::model::weights::TensorStore;
use caduceus_runtime::model::{LlamaModel, LoraDtype, LoraStack, WeightFormat};

use super::{greedy, ids, json, last_logits, run, support, LIMITS};

/// GGUF tensor name of each projection, in [`Projection::ALL`] order.
const GGUF_NAMES: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

#[test]
fn adapter_equals_its_merged_weights_on_the_default_model() {
    let Some(path) = support::default_model() else {
        return;
    };
    let avatar_root = support::shared("reference/avatars");
    let expected = json(&avatar_root.join("expected.json"));
    let gguf = GgufFile::open(&path).unwrap();
    let config = LlamaConfig::from_gguf(&gguf).unwrap();
    let adapter = load_adapter(&avatar_root.join("dr-lin"), &config, &LIMITS).unwrap();

    // The merged model: W + scale * B A for every targeted projection, on dequantized weights.
    let mut store = TensorStore::from_gguf(&gguf).unwrap();
    let dims = caduceus_runtime::model::lora::projection_dims(&config);
    for (layer, pairs) in adapter.layers.iter().enumerate() {
        for p in Projection::ALL {
            let Some(pair) = &pairs[p.index()] else {
                continue;
            };
            let (in_dim, out_dim) = dims[p.index()];
            let name = format!("blk.{layer}.{}.weight", GGUF_NAMES[p.index()]);
            let mut w = store.take_matrix(&name, out_dim, in_dim).unwrap().to_f32();
            let r = adapter.rank;
            for o in 0..out_dim {
                for k in 0..r {
                    let b = adapter.scale * pair.b[o * r + k];
                    let a = &pair.a[k * in_dim..(k + 1) * in_dim];
                    for (wi, ai) in w[o * in_dim..(o + 1) * in_dim].iter_mut().zip(a) {
                        *wi += b * ai;
                    }
                }
            }
            store.insert_matrix(name, Matrix::from_f32(out_dim, in_dim, &w));
        }
    }
    let merged =
        LlamaModel::from_tensors_with(config.clone(), &mut store, WeightFormat::F32).unwrap();
    let base = LoadedModel::load_with(&path, WeightFormat::F32).unwrap();
    let mut stack = LoraStack::new(&config, 1, adapter.rank, LoraDtype::F32).unwrap();
    stack.load(0, &adapter).unwrap();

    let cases = expected["dr-lin"]["cases"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_token_ids"])).collect();
    for (i, prompt) in prompts.iter().enumerate() {
        let with_adapter = last_logits(&base.model, prompt, Some(&stack));
        let with_merged = last_logits(&merged, prompt, None);
        let worst = with_adapter
            .iter()
            .zip(&with_merged)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-3, "question {i}: logits differ by up to {worst}");
    }

    // Greedy tokens: adapter (in one batch of all questions) vs merged weights, and against
    // transformers + peft in f32 (the avatars' reference answers).
    let n = 24;
    let requests: Vec<_> = prompts
        .iter()
        .map(|p| greedy(p, n, Some("dr-lin")))
        .collect();
    let with_adapter = run(&base.model, &avatar_root, requests, 2, LoraDtype::F32, 512);
    let requests: Vec<_> = prompts.iter().map(|p| greedy(p, n, None)).collect();
    let cfg = scheduler_config_for(&requests, 16, 512, 4096);
    let with_merged = generate_with_config(&merged, &[], requests, cfg).unwrap();
    let mut tracks_peft = 0;
    for (i, ((a, m), case)) in with_adapter.iter().zip(&with_merged).zip(cases).enumerate() {
        assert_eq!(
            a.token_ids, m.token_ids,
            "question {i}: adapter vs merged weights"
        );
        let peft = ids(&case["greedy_token_ids_f32"]);
        let same = a
            .token_ids
            .iter()
            .zip(&peft)
            .take_while(|(x, y)| x == y)
            .count();
        eprintln!("question {i}: {same} of {n} tokens equal transformers+peft");
        tracks_peft += usize::from(same >= 16);
    }
    assert!(
        tracks_peft >= 3,
        "only {tracks_peft}/4 answers track transformers+peft for 16 tokens"
    );
}
