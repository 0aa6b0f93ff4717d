//! The engine loop (scheduler + executor) end to end on real models: preemption, prefix caching,
//! stop strings, min_tokens, aborts by dropped streams, the threaded handle and bad requests.

mod support;

use std::sync::Arc;

use caduceus_runtime::engine::{
    CpuBackend, EngineCore, EngineHandle, EngineRequest, FinishReason, Finished, RequestError,
    RequestId, SchedulerConfig, StepTimer,
};
use caduceus_runtime::model::loader::LoadedModel;
use caduceus_runtime::model::LlamaModel;
use caduceus_runtime::sampling::SamplingParams;
use caduceus_runtime::tokenizer::Tokenizer;
use tokio::sync::mpsc;

fn tiny() -> LoadedModel {
    LoadedModel::load(&support::shared("reference/tiny-llama/model")).unwrap()
}

fn config(num_blocks: usize, caching: bool) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 48,
        block_size: 4,
        num_blocks,
        max_model_len: 512,
        enable_prefix_caching: caching,
        ..SchedulerConfig::default()
    }
}

/// Everything one request streamed.
#[derive(Debug, Clone)]
struct Collected {
    tokens: Vec<u32>,
    text: String,
    finished: Option<Finished>,
}

fn drain(rx: &mut mpsc::UnboundedReceiver<caduceus_runtime::engine::RequestOutput>) -> Collected {
    collected(std::iter::from_fn(|| rx.try_recv().ok()))
}

fn collected(
    outputs: impl IntoIterator<Item = caduceus_runtime::engine::RequestOutput>,
) -> Collected {
    let mut c = Collected {
        tokens: Vec::new(),
        text: String::new(),
        finished: None,
    };
    for o in outputs {
        assert!(c.finished.is_none(), "output after the final one");
        c.tokens.extend(o.new_tokens.iter().map(|t| t.token_id));
        c.text.push_str(&o.text);
        c.finished = o.finished;
    }
    c
}

/// Runs `reqs` to completion on one engine; returns each request's stream and the engine.
fn run_all<'m>(
    model: &'m LlamaModel,
    tok: Option<&Tokenizer>,
    config: SchedulerConfig,
    reqs: Vec<EngineRequest>,
) -> (Vec<Collected>, EngineCore<CpuBackend<&'m LlamaModel>>) {
    let eos = tok.map(|t| t.eos_ids().to_vec()).unwrap_or_default();
    let mut core =
        EngineCore::new(model, tok.map(|t| Arc::new((*t).clone())), eos, config).unwrap();
    let outs = core.run_to_end(reqs).unwrap();
    (outs.into_iter().map(collected).collect(), core)
}

fn prompts(tok: &Tokenizer) -> Vec<Vec<u32>> {
    let system = "You are a careful doctor. Answer briefly. ";
    [
        "What should I do about a mild fever?",
        "Is it safe to take ibuprofen with food?",
        "My child has a rash",
        "How much water should I drink each day when it is hot outside?",
        "Why?",
        "Can stress raise blood pressure?",
    ]
    .iter()
    .map(|q| tok.encode(&format!("{system}{q}")).unwrap())
    .collect()
}

fn greedy_reqs(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<EngineRequest> {
    prompts
        .iter()
        .map(|p| {
            let mut r = EngineRequest::new(p.clone(), max_tokens);
            r.ignore_eos = true;
            r
        })
        .collect()
}

#[test]
fn a_pool_too_small_for_everyone_preempts_yet_outputs_are_unchanged() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let mut reqs = greedy_reqs(&p, 24);
    // Seeded random sampling too: the sampler survives preemption.
    for (i, r) in reqs.iter_mut().enumerate().skip(3) {
        r.sampling = SamplingParams {
            temperature: 0.9,
            top_p: 0.9,
            seed: Some(i as u64),
            ..SamplingParams::default()
        };
    }
    let (free, core) = run_all(
        &m.model,
        Some(&m.tokenizer),
        config(400, true),
        reqs.clone(),
    );
    assert_eq!(core.stats().num_preemptions, 0);
    // The longest request needs 32 blocks of 4 tokens; 40 blocks hold barely one at a time.
    let (tight, core) = run_all(&m.model, Some(&m.tokenizer), config(41, true), reqs);
    let stats = core.stats();
    assert!(stats.num_preemptions > 0, "the small pool never preempted");
    assert_eq!(
        stats.num_free_blocks, stats.num_usable_blocks,
        "blocks leaked"
    );
    for (a, b) in free.iter().zip(&tight) {
        assert_eq!(a.tokens.len(), 24);
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.text, b.text);
        assert_eq!(b.finished.as_ref().unwrap().reason, FinishReason::Length);
    }
}

#[test]
fn a_shared_prefix_is_served_from_the_cache_with_identical_outputs() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let run = |caching: bool| {
        let mut core = EngineCore::new(&m.model, None, Vec::new(), config(200, caching)).unwrap();
        let mut out = Vec::new();
        for (i, prompt) in p.iter().take(3).enumerate() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let mut r = EngineRequest::new(prompt.clone(), 8);
            r.detokenize = false;
            core.add_request(RequestId(i as u64), r, tx).unwrap();
            while core.has_unfinished() {
                core.step().unwrap();
            }
            out.push(drain(&mut rx));
        }
        (out, core.stats())
    };
    let (on, stats_on) = run(true);
    let (off, stats_off) = run(false);
    let shared = "You are a careful doctor. Answer briefly. ".len(); // byte-level tokenizer
    for (i, (a, b)) in on.iter().zip(&off).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}");
        let cached = a.finished.as_ref().unwrap().num_cached_tokens;
        if i == 0 {
            assert_eq!(cached, 0);
        } else {
            assert_eq!(cached, shared / 4 * 4, "request {i} cached {cached} tokens");
        }
        assert_eq!(b.finished.as_ref().unwrap().num_cached_tokens, 0);
    }
    assert!(stats_on.prefix_cache_hits > 0);
    assert_eq!(stats_off.prefix_cache_hits, 0);
}

#[test]
fn a_stop_string_ends_generation_and_is_never_emitted() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let (plain, _) = run_all(
        &m.model,
        Some(&m.tokenizer),
        config(200, true),
        greedy_reqs(&p[..1], 24),
    );
    let text = &plain[0].text;
    assert!(text.len() >= 12, "need some text to cut: {text:?}");
    // A stop string from the middle of the text, which spans several tokens.
    let chars: Vec<char> = text.chars().collect();
    let at = (4..chars.len() - 2)
        .find(|&i| !chars[i..i + 2].contains(&'\u{FFFD}'))
        .expect("two clean characters in a row");
    let stop: String = chars[at..at + 2].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    let mut req = greedy_reqs(&p[..1], 24).remove(0);
    req.stop = vec![stop.clone(), "never appears \u{1F600}".into()];
    let (stopped, core) = run_all(&m.model, Some(&m.tokenizer), config(200, true), vec![req]);
    let s = &stopped[0];
    assert_eq!(s.text, expected, "stop {stop:?} in {text:?}");
    assert_eq!(s.finished.as_ref().unwrap().reason, FinishReason::Stop);
    assert!(s.tokens.len() < 24);
    assert_eq!(core.stats().num_running, 0);
}

/// Forty requests in one batch, a third of them with a stop string: each streams exactly its
/// solo run's text, and one with a stop string stops where its solo text first holds it.
#[test]
fn many_requests_in_one_step_stream_their_solo_texts_and_stops() {
    let m = tiny();
    let base = prompts(&m.tokenizer);
    let p: Vec<Vec<u32>> = (0..40)
        .map(|i| {
            let mut v = base[i % base.len()].clone();
            v.extend(m.tokenizer.encode(&format!(" Case {i}.")).unwrap());
            v
        })
        .collect();
    let cfg = SchedulerConfig {
        max_num_seqs: 48,
        max_num_batched_tokens: 4096,
        num_blocks: 2000,
        ..config(2000, true)
    };
    let tok = Some(&m.tokenizer);
    let solo: Vec<Collected> = p
        .iter()
        .map(|q| {
            run_all(
                &m.model,
                tok,
                cfg.clone(),
                greedy_reqs(std::slice::from_ref(q), 12),
            )
            .0
            .remove(0)
        })
        .collect();
    let mut reqs = greedy_reqs(&p, 12);
    let mut stops = vec![None; reqs.len()];
    for (i, r) in reqs.iter_mut().enumerate().filter(|(i, _)| i % 3 == 0) {
        let chars: Vec<char> = solo[i].text.chars().collect();
        let clean =
            (4..chars.len().saturating_sub(2)).find(|&at| !chars[at..at + 2].contains(&'\u{FFFD}'));
        if let Some(at) = clean {
            let stop: String = chars[at..at + 2].iter().collect();
            r.stop = vec![stop.clone()];
            stops[i] = Some(stop);
        }
    }
    assert!(
        stops.iter().flatten().count() >= 5,
        "too few stop strings: {stops:?}"
    );
    let (all, core) = run_all(&m.model, tok, cfg, reqs);
    for (i, (got, want)) in all.iter().zip(&solo).enumerate() {
        let reason = got.finished.as_ref().map(|f| f.reason);
        match &stops[i] {
            Some(stop) => {
                let end = want.text.find(stop.as_str()).unwrap();
                assert_eq!(got.text, want.text[..end], "request {i}, stop {stop:?}");
                assert_eq!(reason, Some(FinishReason::Stop), "request {i}");
            }
            None => {
                assert_eq!(
                    (&got.text, &got.tokens),
                    (&want.text, &want.tokens),
                    "request {i}"
                );
                assert_eq!(reason, Some(FinishReason::Length), "request {i}");
            }
        }
    }
    assert_eq!(core.stats().num_running, 0);
}

#[test]
fn min_tokens_keeps_stop_tokens_from_ending_the_request_early() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let mut req = greedy_reqs(&p[..1], 12).remove(0);
    req.detokenize = false;
    let (plain, _) = run_all(&m.model, None, config(200, true), vec![req.clone()]);
    let first = plain[0].tokens[0];
    // Make the first greedy token a stop token: without min_tokens the request stops at once.
    req.stop_token_ids = vec![first];
    let (stopped, _) = run_all(&m.model, None, config(200, true), vec![req.clone()]);
    assert_eq!(stopped[0].tokens, vec![first]);
    assert_eq!(
        stopped[0].finished.as_ref().unwrap().reason,
        FinishReason::Stop
    );
    req.min_tokens = 4;
    let (held, _) = run_all(&m.model, None, config(200, true), vec![req]);
    let t = &held[0].tokens;
    assert!(t.len() >= 4, "{t:?}");
    assert!(
        !t[..4].contains(&first),
        "a stop token was sampled before min_tokens: {t:?}"
    );
    match held[0].finished.as_ref().unwrap().reason {
        FinishReason::Stop => assert!(t.len() > 4 && t.last() == Some(&first), "{t:?}"),
        FinishReason::Length => assert!(t.len() == 12 && !t.contains(&first), "{t:?}"),
        other => panic!("unexpected finish {other:?}"),
    }
}

/// When `allowed_token_ids` leave only a stop token, `min_tokens` yields: the request ends with
/// it in as many steps as without `min_tokens`, in the scheduler too (no steps run on for
/// nobody, no block kept).
#[test]
fn a_mask_of_stop_tokens_only_ends_the_request_before_min_tokens() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let run = |min_tokens: usize| {
        let mut core = EngineCore::new(&m.model, None, Vec::new(), config(200, true)).unwrap();
        let mut req = greedy_reqs(&p[..1], 12).remove(0);
        req.detokenize = false;
        req.stop_token_ids = vec![7];
        req.sampling.allowed_token_ids = vec![7];
        req.min_tokens = min_tokens;
        let (tx, mut rx) = mpsc::unbounded_channel();
        core.add_request(RequestId(0), req, tx).unwrap();
        let mut steps = 0;
        while core.has_unfinished() {
            core.step().unwrap();
            steps += 1;
        }
        let s = core.stats();
        assert_eq!(s.num_free_blocks, s.num_usable_blocks, "blocks leaked");
        let c = drain(&mut rx);
        assert_eq!(c.tokens, [7]);
        assert_eq!(c.finished.unwrap().reason, FinishReason::Stop);
        steps
    };
    assert_eq!(run(4), run(0), "steps to the end");
}

#[test]
fn a_dropped_stream_aborts_its_request_wherever_it_is() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let mut cfg = config(200, true);
    cfg.max_num_seqs = 2; // the rest wait
    let mut core = EngineCore::new(&m.model, None, Vec::new(), cfg).unwrap();
    let mut rxs = Vec::new();
    for (i, prompt) in p.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut r = EngineRequest::new(prompt.clone(), 40);
        r.detokenize = false;
        r.ignore_eos = true;
        core.add_request(RequestId(i as u64), r, tx).unwrap();
        rxs.push(Some(rx));
    }
    core.step().unwrap();
    core.step().unwrap();
    assert_eq!(core.stats().num_running, 2);
    // Drop one running (0) and one waiting (5) request's stream.
    rxs[0] = None;
    rxs[5] = None;
    core.step().unwrap();
    let s = core.stats();
    assert_eq!(s.num_running + s.num_waiting, 4, "{s:?}");
    while core.has_unfinished() {
        core.step().unwrap();
    }
    let s = core.stats();
    assert_eq!(s.num_free_blocks, s.num_usable_blocks, "blocks leaked");
    for (i, rx) in rxs.iter_mut().enumerate() {
        if let Some(rx) = rx {
            let c = drain(rx);
            assert_eq!(c.tokens.len(), 40, "request {i}");
        }
    }
}

#[test]
fn the_threaded_handle_serves_concurrent_requests_and_survives_disconnects() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let (expected, _) = run_all(
        &m.model,
        Some(&m.tokenizer),
        config(200, true),
        greedy_reqs(&p, 16),
    );
    let tok = Arc::new(m.tokenizer.clone());
    let eos = m.tokenizer.eos_ids().to_vec();
    let model = Arc::new(m.model);
    let core = EngineCore::new(model, Some(tok), eos, config(200, true)).unwrap();
    let (handle, thread) = EngineHandle::spawn(core).unwrap();
    let workers: Vec<_> = greedy_reqs(&p, 16)
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let h = handle.clone();
            std::thread::spawn(move || {
                let mut s = h.submit(r).unwrap();
                let mut c = Collected {
                    tokens: vec![],
                    text: String::new(),
                    finished: None,
                };
                while let Some(o) = s.blocking_next() {
                    c.tokens.extend(o.new_tokens.iter().map(|t| t.token_id));
                    c.text.push_str(&o.text);
                    if o.finished.is_some() {
                        c.finished = o.finished;
                        break;
                    }
                    if i == 0 && c.tokens.len() == 3 {
                        return None; // the client leaves mid-stream
                    }
                }
                Some(c)
            })
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        match w.join().unwrap() {
            None => assert_eq!(i, 0),
            Some(c) => {
                assert_eq!(c.tokens, expected[i].tokens, "request {i}");
                assert_eq!(c.text, expected[i].text);
                let f = c.finished.unwrap();
                assert_eq!((f.num_prompt_tokens, f.num_output_tokens), (p[i].len(), 16));
                assert!(f.times.first_token.is_some());
            }
        }
    }
    // The engine notices the dropped stream within a step or two; wait until idle.
    for _ in 0..200 {
        let s = handle.stats();
        if s.num_running + s.num_waiting == 0 && s.num_free_blocks == s.num_usable_blocks {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let s = handle.stats();
    assert_eq!((s.num_running, s.num_waiting), (0, 0));
    assert_eq!(s.num_free_blocks, s.num_usable_blocks);
    assert!(handle.is_alive());
    handle.shutdown();
    thread.join().unwrap().unwrap();
    assert!(!handle.is_alive());
    assert_eq!(
        handle
            .submit(greedy_reqs(&p[..1], 4).remove(0))
            .unwrap_err(),
        RequestError::EngineStopped
    );
}

#[test]
fn bad_requests_get_errors_naming_the_limit() {
    let m = tiny();
    let core = EngineCore::new(&m.model, None, Vec::new(), config(20, true)).unwrap();
    let limits = core.limits();
    let req = |p: Vec<u32>, n: usize| {
        let mut r = EngineRequest::new(p, n);
        r.detokenize = false;
        r
    };
    assert_eq!(
        limits.check(&req(vec![], 4)),
        Err(RequestError::EmptyPrompt)
    );
    assert_eq!(
        limits.check(&req(vec![1], 0)),
        Err(RequestError::ZeroMaxTokens)
    );
    assert!(matches!(
        limits.check(&req(vec![1; 500], 20)),
        Err(RequestError::TooLong {
            prompt_tokens: 500,
            max_tokens: 20,
            max_model_len: 512
        })
    ));
    assert_eq!(
        limits.check(&req(vec![1; 70], 10)),
        Err(RequestError::ExceedsKvPool {
            needed_blocks: 20,
            usable_blocks: 19
        })
    );
    assert_eq!(
        limits.check(&req(vec![1, 9999], 4)),
        Err(RequestError::BadToken {
            token_id: 9999,
            vocab_size: 258
        })
    );
    let mut r = req(vec![1], 4);
    r.min_tokens = 5;
    assert!(matches!(
        limits.check(&r),
        Err(RequestError::MinAboveMax { .. })
    ));
    let mut r = req(vec![1], 4);
    r.detokenize = true;
    assert_eq!(limits.check(&r), Err(RequestError::NoTokenizer));
    let mut r = req(vec![1], 4);
    r.sampling.temperature = -1.0;
    assert!(matches!(limits.check(&r), Err(RequestError::Sampling(_))));
    let msg = limits
        .check(&req(vec![1; 500], 20))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("512") && msg.contains("max_tokens"), "{msg}");
}

/// The acceptance check on the default model: a KV pool so small that preemption must
/// happen still completes every request with the greedy tokens of the unconstrained run.
#[test]
fn default_model_preemption_keeps_greedy_outputs() {
    let Some(path) = support::default_model() else {
        return;
    };
    let m = LoadedModel::load(&path).unwrap();
    let p = prompts(&m.tokenizer);
    let reqs = greedy_reqs(&p, 16);
    let cfg = |blocks| SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 256,
        block_size: 16,
        num_blocks: blocks,
        max_model_len: 2048,
        ..SchedulerConfig::default()
    };
    let (free, _) = run_all(&m.model, Some(&m.tokenizer), cfg(64), reqs.clone());
    let (tight, core) = run_all(&m.model, Some(&m.tokenizer), cfg(7), reqs);
    assert!(core.stats().num_preemptions > 0, "no preemption happened");
    for (a, b) in free.iter().zip(&tight) {
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.text, b.text);
    }
}

#[test]
fn a_step_timer_moves_the_budget_without_changing_outputs() {
    let m = tiny();
    let p = prompts(&m.tokenizer);
    let p16: Vec<Vec<u32>> = p.iter().cycle().take(16).cloned().collect();
    let reqs = greedy_reqs(&p16, 40);
    let (fixed, _) = run_all(
        &m.model,
        Some(&m.tokenizer),
        config(400, false),
        reqs.clone(),
    );
    // A 0 ms target: every step that fills half its budget is too slow, so the budget falls to
    // the floor, at most 10% a step.
    let tok = Arc::new(m.tokenizer.clone());
    let eos = tok.eos_ids().to_vec();
    let mut core = EngineCore::new(&m.model, Some(tok), eos, config(400, false))
        .unwrap()
        .with_step_timer(StepTimer::new(0, 8, 48));
    let mut rxs = Vec::new();
    for (i, r) in reqs.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        core.add_request(RequestId(i as u64), r, tx).unwrap();
        rxs.push(rx);
    }
    let mut budgets = vec![core.scheduler_config().max_num_batched_tokens];
    while core.has_unfinished() {
        core.step().unwrap();
        budgets.push(core.scheduler().config().max_num_batched_tokens);
        assert!(budgets.len() < 10_000, "the engine does not finish");
    }
    assert_eq!(budgets[0], 48);
    assert_eq!(*budgets.last().unwrap(), 8, "{budgets:?}");
    for w in budgets.windows(2) {
        assert!(w[1] <= w[0] && w[0] - w[1] <= 5, "{budgets:?}");
    }
    let timed: Vec<Collected> = rxs.iter_mut().map(drain).collect();
    for (a, b) in fixed.iter().zip(&timed) {
        assert_eq!(a.tokens, b.tokens);
    }
}
