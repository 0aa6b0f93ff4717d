//! The model engine against independent implementations: Hugging Face transformers' numbers for the
//! tiny reference Llama, llama.cpp's and transformers' greedy continuations of the default model,
//! and a naive f64 reference forward for tiny random models (bias, GQA ratios, tied embeddings),
//! which also checks the prompt logprobs the engine computes.

mod support;

use caduceus_runtime::generate::{generate, FinishReason, GenerateOptions, GenerateRequest};
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::model::{LlamaModel, WeightFormat};
use caduceus_runtime::sampling::SamplingParams;
use serde_json::Value;
use support::random_model::{write_random_model, RandomSpec};
use support::reference_llama::RefModel;

fn opts(max_batch_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        block_size: 4,
        max_batch_tokens,
        max_model_len: 8192,
    }
}

fn greedy(prompt: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: prompt.to_vec(),
        params: SamplingParams::greedy(),
        max_tokens,
        ignore_eos: true,
        adapter: None,
    }
}

/// Logits of every position of one prompt, computed in one forward pass.
fn all_logits(model: &LlamaModel, prompt: &[u32]) -> Vec<Vec<f32>> {
    let idx: Vec<usize> = (0..prompt.len()).collect();
    let v = model.config().vocab_size;
    support::forward_prompt(model, prompt, 4, &idx, None)
        .chunks_exact(v)
        .map(<[f32]>::to_vec)
        .collect()
}

#[test]
fn tiny_llama_matches_transformers() {
    let dir = support::shared("reference/tiny-llama");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let loaded = LoadedModel::load(&dir.join("model")).unwrap();
    let prompts = expected["prompts"].as_array().unwrap();
    let base = expected["base"].as_array().unwrap();
    let mut requests = Vec::new();
    for (p, want) in prompts.iter().zip(base) {
        let ids: Vec<u32> = serde_json::from_value(p["token_ids"].clone()).unwrap();
        assert_eq!(
            loaded
                .tokenizer
                .encode(p["text"].as_str().unwrap())
                .unwrap(),
            ids
        );
        let logits = all_logits(&loaded.model, &ids);
        let last = logits.last().unwrap();
        let want16: Vec<f32> = serde_json::from_value(want["last_logits_first16"].clone()).unwrap();
        for (i, (a, b)) in last.iter().zip(&want16).enumerate() {
            assert!(
                (a - b).abs() < 1e-4,
                "prompt {:?} logit {i}: {a} vs transformers {b}",
                p["text"]
            );
        }
        let argmax = support::argmax(last);
        assert_eq!(argmax as u64, want["last_logits_argmax"].as_u64().unwrap());
        requests.push(greedy(&ids, 16));
    }
    // All prompts in one batch, with prefill chunks mixed with decodes.
    let outs = generate(&loaded.model, loaded.tokenizer.eos_ids(), requests, opts(9)).unwrap();
    for (out, want) in outs.iter().zip(base) {
        let want: Vec<u32> = serde_json::from_value(want["greedy_16"].clone()).unwrap();
        assert_eq!(out.token_ids, want);
        assert_eq!(out.finish_reason, FinishReason::Length);
    }
}

/// A random model as Caduceus loads it from its files, and the same weights as the f64 reference.
fn random_model(spec: RandomSpec) -> (LlamaModel, RefModel) {
    let tmp = tempfile::tempdir().unwrap();
    let reference = write_random_model(tmp.path(), spec);
    let config = caduceus_runtime::model::config::LlamaConfig::from_hf_json(
        &std::fs::read_to_string(tmp.path().join("config.json")).unwrap(),
    )
    .unwrap();
    let mut store = caduceus_runtime::model::weights::TensorStore::from_hf_dir(tmp.path()).unwrap();
    (
        LlamaModel::from_tensors(config, &mut store).unwrap(),
        reference,
    )
}

fn check_random_model(spec: RandomSpec) {
    let (model, reference) = random_model(spec);
    let prompt: Vec<u32> = (0..13).map(|i| (i * 37 + 5) % spec.vocab as u32).collect();
    let ours = all_logits(&model, &prompt);
    let theirs = reference.forward(&prompt);
    for (pos, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (*x as f64 - y).abs() < 2e-4 * (1.0 + y.abs()),
                "{spec:?} pos {pos} logit {i}: {x} vs {y}"
            );
        }
    }
    // Greedy continuation through the batched driver equals the reference's argmax chain.
    let mut seq = prompt.clone();
    for _ in 0..8 {
        let logits = reference.forward(&seq);
        let last = logits.last().unwrap();
        seq.push(
            last.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32,
        );
    }
    let outs = generate(&model, &[], vec![greedy(&prompt, 8)], opts(5)).unwrap();
    assert_eq!(outs[0].token_ids, seq[prompt.len()..]);
}

/// Attention bias and 4 query heads per KV head.
const BIAS_GQA_4: RandomSpec = RandomSpec {
    hidden: 64,
    ffn: 96,
    layers: 2,
    heads: 8,
    kv_heads: 2,
    vocab: 61,
    bias: true,
    tied: false,
    seed: 1,
};

#[test]
fn random_model_with_attention_bias_and_gqa_4_matches_reference() {
    check_random_model(BIAS_GQA_4);
}

#[test]
fn random_model_with_tied_embeddings_and_mha_matches_reference() {
    check_random_model(RandomSpec {
        hidden: 48,
        ffn: 80,
        layers: 3,
        heads: 3,
        kv_heads: 3,
        vocab: 70,
        bias: false,
        tied: true,
        seed: 2,
    });
}

#[test]
fn random_model_with_gqa_3_matches_reference() {
    check_random_model(RandomSpec {
        hidden: 96,
        ffn: 64,
        layers: 2,
        heads: 6,
        kv_heads: 2,
        vocab: 50,
        bias: false,
        tied: false,
        seed: 3,
    });
}

/// Length of the common prefix of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How one prompt's greedy continuation compares with the two references.
struct Track {
    /// Tokens matching llama.cpp's continuation from the start.
    llama_cpp: usize,
    /// Tokens matching transformers' float32 continuation from the start.
    transformers: usize,
    /// Tokens generated, and in the float32 reference.
    len: usize,
    f32_len: usize,
}

/// Greedy generation of `max_tokens` (no EOS stop, as the references) for every reference prompt,
/// all in one batch with the engine's default configuration, against both references.
fn track_references(weights: WeightFormat, max_tokens: usize) -> Option<Vec<Track>> {
    let path = support::default_model()?;
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(support::shared("reference/smollm2-greedy.json")).unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let loaded = LoadedModel::load_with(&path, weights).unwrap();
    let requests: Vec<_> = cases
        .iter()
        .map(|c| {
            let ids: Vec<u32> = serde_json::from_value(c["prompt_token_ids"].clone()).unwrap();
            greedy(&ids, max_tokens)
        })
        .collect();
    // The engine's default configuration (block size 16, 512-token step budget), all prompts in one batch.
    let defaults = GenerateOptions {
        block_size: 16,
        max_batch_tokens: 512,
        max_model_len: loaded.max_model_len(),
    };
    let outs = generate(
        &loaded.model,
        loaded.tokenizer.eos_ids(),
        requests,
        defaults,
    )
    .unwrap();
    let mut tracks = Vec::new();
    for (c, out) in cases.iter().zip(&outs) {
        let q8: Vec<u32> = serde_json::from_value(c["greedy_token_ids"].clone()).unwrap();
        let f32: Vec<u32> = serde_json::from_value(c["greedy_token_ids_f32"].clone()).unwrap();
        let (a, b) = (
            common_prefix(&out.token_ids, &q8),
            common_prefix(&out.token_ids, &f32),
        );
        eprintln!(
            "{weights:?} {:>4} {:<45} matched prefix: llama.cpp {a:>2}, transformers {b:>2}",
            c["kind"].as_str().unwrap(),
            c["message"]
                .as_str()
                .unwrap()
                .chars()
                .take(45)
                .collect::<String>()
        );
        tracks.push(Track {
            llama_cpp: a,
            transformers: b,
            len: out.token_ids.len(),
            f32_len: f32.len(),
        });
    }
    Some(tracks)
}

/// How many prompts track a reference for 16 tokens, and the shortest match of any.
fn good_and_worst(tracks: &[Track]) -> (usize, usize) {
    let best = |t: &Track| t.llama_cpp.max(t.transformers);
    let good = tracks.iter().filter(|t| best(t) >= 16).count();
    let worst = tracks.iter().map(best).min().unwrap_or(0);
    eprintln!(
        "{good} of {} prompts match a reference for >= 16 tokens; shortest match {worst}",
        tracks.len()
    );
    (good, worst)
}

/// f32 weights follow transformers' float32 arithmetic: since the reference was corrected
/// (2026-12-03, see shared/README.md) every prompt must match it for all 64 tokens.
#[test]
fn default_model_f32_weights_track_the_references() {
    let Some(tracks) = track_references(WeightFormat::F32, 64) else {
        return;
    };
    assert_eq!(tracks.len(), 7, "the reference has 7 prompts");
    for (i, t) in tracks.iter().enumerate() {
        assert_eq!(
            t.f32_len, 64,
            "prompt {i}: the f32 reference holds 64 tokens"
        );
        assert_eq!(t.len, t.f32_len, "prompt {i}: generated length differs");
        assert_eq!(
            t.transformers, t.f32_len,
            "prompt {i} matches the f32 reference for only {} of {} tokens",
            t.transformers, t.f32_len
        );
    }
}

/// The quantized path multiplies Q4_1 weights by Q8_1-quantized activations like llama.cpp, but
/// not in llama.cpp's exact float order; at this model's near-ties (top-2 gaps of 0.01-0.4) any
/// rounding difference flips tokens, so it tracks fewer prompts (see the issue-2 note).
#[test]
fn default_model_greedy_tracks_the_references() {
    let Some(tracks) = track_references(WeightFormat::Native, 32) else {
        return;
    };
    let (good, worst) = good_and_worst(&tracks);
    assert!(
        good >= 4,
        "only {good} of 7 prompts track a reference for 16 tokens"
    );
    assert!(
        worst >= 2,
        "a prompt tracks neither reference beyond {worst} tokens"
    );
}

/// Runs each prompt alone, then all together with tiny prefill chunks mixed with decodes, and checks
/// every sequence produced identical tokens.
fn check_batch_independence(model: &LlamaModel, prompts: &[Vec<u32>], max_tokens: usize) {
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(model, &[], vec![greedy(p, max_tokens)], opts(4096))
                .unwrap()
                .remove(0)
                .token_ids
        })
        .collect();
    for chunk in [3, 7, 64] {
        let reqs = prompts.iter().map(|p| greedy(p, max_tokens)).collect();
        let together = generate(model, &[], reqs, opts(chunk)).unwrap();
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(
                a, &b.token_ids,
                "prompt {i} differs when batched (prefill chunk budget {chunk})"
            );
        }
    }
}

#[test]
fn default_model_sequences_are_independent_of_their_batch() {
    let Some(path) = support::default_model() else {
        return;
    };
    let loaded = LoadedModel::load(&path).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The heart pumps",
        "Symptoms of flu include",
        "Drink water because it",
        "A healthy diet",
    ]
    .iter()
    .map(|t| loaded.tokenizer.encode(t).unwrap())
    .collect();
    check_batch_independence(&loaded.model, &prompts, 12);
}

#[test]
fn random_model_sequences_are_independent_of_their_batch() {
    let (model, _) = random_model(RandomSpec {
        hidden: 64,
        ffn: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        vocab: 97,
        bias: true,
        tied: true,
        seed: 9,
    });
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|s| {
            (0..(3 + 5 * s))
                .map(|i| ((i * 31 + s * 7) % 97) as u32)
                .collect()
        })
        .collect();
    check_batch_independence(&model, &prompts, 10);
}

/// Runs `reqs` on one CPU engine over `model` to the end; returns each request's outputs and how
/// many preemptions it took.
fn run_engine(
    model: &LlamaModel,
    config: caduceus_runtime::engine::SchedulerConfig,
    reqs: Vec<caduceus_runtime::engine::EngineRequest>,
) -> (Vec<Vec<caduceus_runtime::engine::RequestOutput>>, u64) {
    let mut core =
        caduceus_runtime::engine::EngineCore::new(model, None, Vec::new(), config).unwrap();
    let outs = core.run_to_end(reqs).unwrap();
    (outs, core.stats().num_preemptions)
}

/// Prompt logprobs through the engine, with the prompt computed in chunks beside other requests,
/// preempted and recomputed, after a twin filled the prefix cache: every prompt token's logprob,
/// rank and top alternatives equal the f64 reference's log-softmax, they arrive once (on the
/// first output), and asking for them changes no output token.
#[test]
fn prompt_logprobs_match_the_reference_however_the_prompt_is_computed() {
    use caduceus_runtime::engine::{EngineRequest, SchedulerConfig};
    let (model, reference) = random_model(RandomSpec {
        seed: 4,
        ..BIAS_GQA_4
    });
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|s| {
            (0..(9 + 4 * s))
                .map(|i| ((i * 17 + s * 5 + 3) % 61) as u32)
                .collect()
        })
        .collect();
    let top = 4;
    let request = |p: &Vec<u32>, scored: bool| {
        let mut r = EngineRequest::new(p.clone(), 6);
        r.detokenize = false;
        r.prompt_logprobs = scored.then_some(top);
        r
    };
    // Every prompt twice: unscored first (it fills the prefix cache), then scored.
    let reqs: Vec<EngineRequest> = [false, true]
        .iter()
        .flat_map(|&scored| prompts.iter().map(move |p| request(p, scored)))
        .collect();
    for (budget, num_blocks, preempts) in [(64, 200, false), (5, 200, false), (7, 12, true)] {
        let config = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            block_size: 4,
            num_blocks,
            max_model_len: 64,
            enable_prefix_caching: true,
            ..SchedulerConfig::default()
        };
        let (outs, preemptions) = run_engine(&model, config, reqs.clone());
        assert_eq!(
            preemptions > 0,
            preempts,
            "budget {budget}, {num_blocks} blocks"
        );
        let n = prompts.len();
        for (i, prompt) in prompts.iter().enumerate() {
            let tokens = |o: &Vec<caduceus_runtime::engine::RequestOutput>| -> Vec<u32> {
                o.iter()
                    .flat_map(|o| o.new_tokens.iter().map(|t| t.token_id))
                    .collect()
            };
            assert_eq!(
                tokens(&outs[i]),
                tokens(&outs[n + i]),
                "prompt {i}: outputs differ"
            );
            assert!(outs[i].iter().all(|o| o.prompt_logprobs.is_none()));
            let with: Vec<_> = outs[n + i]
                .iter()
                .filter_map(|o| o.prompt_logprobs.as_ref())
                .collect();
            assert_eq!(
                with.len(),
                1,
                "prompt {i}: prompt logprobs sent {} times",
                with.len()
            );
            assert!(
                !outs[n + i][0].new_tokens.is_empty(),
                "sent without the first token"
            );
            let scored = with[0];
            assert_eq!(scored.len(), prompt.len() - 1, "prompt {i}");
            let logits = reference.forward(prompt);
            for (pos, s) in scored.iter().enumerate() {
                let row = &logits[pos];
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let log_z = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
                let target = prompt[pos + 1];
                let want = row[target as usize] - log_z;
                let at = format!("budget {budget}, prompt {i}, token {}", pos + 1);
                assert_eq!(s.token_id, target, "{at}");
                assert!(
                    (s.logprob as f64 - want).abs() < 1e-3,
                    "{at}: {} vs {want}",
                    s.logprob
                );
                let ahead = row.iter().filter(|&&l| l > row[target as usize]).count();
                assert_eq!(s.rank as usize, ahead + 1, "{at}: rank");
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                let ids: Vec<u32> = s.top_logprobs.iter().map(|t| t.0).collect();
                let want_ids: Vec<u32> = order[..top].iter().map(|&t| t as u32).collect();
                assert_eq!(ids, want_ids, "{at}: top alternatives");
                for &(id, lp) in &s.top_logprobs {
                    assert!(
                        (lp as f64 - (row[id as usize] - log_z)).abs() < 1e-3,
                        "{at}"
                    );
                }
            }
        }
    }
}
