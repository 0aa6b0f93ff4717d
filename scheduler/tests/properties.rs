//! Property tests: random arrivals, shared prefixes, priorities, adapters, salts, requests
//! scoring their prompt, aborts and tiny pools, driven through `schedule()` / `update()` with the fake executor. After every step the
//! invariants in `common::invariants` hold and the simulated KV reads are exact; at the end every
//! request finished within the step bound, no block leaked, and every request that was not
//! aborted produced exactly what it produces running alone.

mod common;

use caduceus_scheduler::{
    AdapterKey, AddRequestError, Fairness, FinishReason, NewRequest, RequestId,
};
use common::{solo_run, Driver, VOCAB};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Spec {
    arrival_step: usize,
    base: usize,
    prefix_len: usize,
    suffix: Vec<u32>,
    max_tokens: usize,
    min_tokens: usize,
    stop: Vec<u32>,
    priority: i32,
    adapter: Option<(u32, u64)>,
    salt: Option<u64>,
    /// Asks for its prompt's logprobs (`NewRequest::scores_prompt`).
    scores: bool,
}

#[derive(Clone, Debug)]
struct Scenario {
    block_size: usize,
    max_num_seqs: usize,
    max_num_batched_tokens: usize,
    caching: bool,
    max_loras: Option<usize>,
    aging: u32,
    hash_seed: u64,
    spare_blocks: usize,
    max_model_len: usize,
    reverse_samples: bool,
    fairness: Fairness,
    backlog_prefill_percent: usize,
    /// `Scheduler::set_max_scored_tokens` (0 refuses requests that score their prompt).
    max_scored: usize,
    specs: Vec<Spec>,
    /// (step, request index, before schedule rather than between schedule and update)
    aborts: Vec<(usize, usize, bool)>,
}

const STEP_BOUND: usize = 5_000;

fn spec() -> impl Strategy<Value = Spec> {
    (
        // Block-aligned prefixes and empty suffixes make whole-prompt and cross-request hits common.
        (
            0..12usize,
            0..3usize,
            prop_oneof![prop::sample::select(vec![4usize, 8, 16]), 0..=20usize],
        ),
        prop_oneof![Just(vec![]), prop::collection::vec(0..VOCAB, 1..7)],
        (1..10usize, 0..4usize, prop::collection::vec(0..VOCAB, 0..3)),
        -1..=1i32,
        prop::option::weighted(0.4, (0..3u32, 0..2u64)),
        (
            prop::option::weighted(0.2, 0..2u64),
            prop::bool::weighted(0.2),
        ),
    )
        .prop_map(
            |((arrival_step, base, prefix_len), suffix, limits, priority, adapter, extra)| {
                let (salt, scores) = extra;
                let (max_tokens, min_tokens, stop) = limits;
                Spec {
                    arrival_step,
                    base,
                    prefix_len,
                    suffix,
                    max_tokens,
                    min_tokens,
                    stop,
                    priority,
                    adapter,
                    salt,
                    scores,
                }
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (
            prop::sample::select(vec![1usize, 2, 4, 8]),
            1..6usize,
            1..40usize,
            prop_oneof![Just(50usize), Just(100), 1..=100usize],
        ),
        (
            prop::bool::weighted(0.8),
            prop::option::of(1..3usize),
            0..4u32,
            any::<u64>(),
        ),
        (
            0..6usize,
            16..48usize,
            any::<bool>(),
            any::<bool>(),
            0..6usize,
        ),
        prop::collection::vec(spec(), 1..12),
        prop::collection::vec((0..30usize, 0..12usize, any::<bool>()), 0..4),
    )
        .prop_map(|(sizes, policy, pool, specs, aborts)| Scenario {
            block_size: sizes.0,
            max_num_seqs: sizes.1,
            max_num_batched_tokens: sizes.2,
            caching: policy.0,
            max_loras: policy.1,
            aging: policy.2,
            hash_seed: policy.3,
            spare_blocks: pool.0,
            max_model_len: pool.1,
            reverse_samples: pool.2,
            fairness: if pool.3 {
                Fairness::Vtc
            } else {
                Fairness::Fcfs
            },
            backlog_prefill_percent: sizes.3,
            max_scored: pool.4,
            specs,
            aborts,
        })
}

/// Three fixed "system prompts" that requests share prefixes of.
fn base_prompt(base: usize) -> Vec<u32> {
    (0..20u32)
        .map(|i| (i * 7 + base as u32 * 13 + 1) % VOCAB)
        .collect()
}

fn new_request(index: usize, s: &Spec) -> NewRequest {
    let mut prompt = base_prompt(s.base)[..s.prefix_len].to_vec();
    prompt.extend(&s.suffix);
    NewRequest {
        id: RequestId(index as u64),
        prompt_token_ids: prompt,
        max_tokens: s.max_tokens,
        min_tokens: s.min_tokens,
        stop_token_ids: s.stop.clone(),
        priority: s.priority,
        arrival_seq: (s.arrival_step * 100 + index) as u64,
        adapter: s
            .adapter
            .map(|(id, generation)| AdapterKey { id, generation }),
        cache_salt: s.salt,
        scores_prompt: s.scores,
    }
}

/// What `add_request` must answer, derived from the documented rules.
fn expected_admission(
    r: &NewRequest,
    bs: usize,
    num_blocks: usize,
    max_model_len: usize,
    max_scored: usize,
) -> Result<(), &'static str> {
    let n = r.prompt_token_ids.len();
    if n == 0 {
        return Err("empty");
    }
    if n + r.max_tokens > max_model_len {
        return Err("too long");
    }
    if (n + r.max_tokens - 1).div_ceil(bs) > num_blocks - 1 {
        return Err("pool");
    }
    if r.scores_prompt && max_scored == 0 {
        return Err("scoring");
    }
    Ok(())
}

fn run(sc: &Scenario) -> Result<(), TestCaseError> {
    let requests: Vec<NewRequest> = sc
        .specs
        .iter()
        .enumerate()
        .map(|(i, s)| new_request(i, s))
        .collect();
    let bs = sc.block_size;
    let max_needed = requests
        .iter()
        .filter(|r| r.prompt_token_ids.len() + r.max_tokens <= sc.max_model_len)
        .map(|r| (r.prompt_token_ids.len() + r.max_tokens - 1).div_ceil(bs))
        .max()
        .unwrap_or(1);
    // spare_blocks == 0 leaves the largest request one block short: it must be refused.
    let num_blocks = 1 + max_needed.saturating_sub(1).max(1) + sc.spare_blocks;
    let config = caduceus_scheduler::SchedulerConfig {
        max_num_seqs: sc.max_num_seqs,
        max_num_batched_tokens: sc.max_num_batched_tokens,
        block_size: bs,
        num_blocks,
        max_model_len: sc.max_model_len,
        enable_prefix_caching: sc.caching,
        max_loras: sc.max_loras,
        adapter_aging_steps: sc.aging,
        hash_seed: sc.hash_seed,
        fairness: sc.fairness,
        backlog_prefill_percent: sc.backlog_prefill_percent,
    };
    let mut d = Driver::new(config);
    d.sched.set_max_scored_tokens(sc.max_scored);
    d.reverse_samples = sc.reverse_samples;
    let mut accepted = Vec::new();
    let last_arrival = sc.specs.iter().map(|s| s.arrival_step).max().unwrap_or(0);
    let mut step = 0;
    loop {
        for (i, r) in requests.iter().enumerate() {
            if sc.specs[i].arrival_step != step {
                continue;
            }
            let got = d.add(r.clone());
            let expected = expected_admission(r, bs, num_blocks, sc.max_model_len, sc.max_scored);
            match (&got, expected) {
                (Ok(()), Ok(())) => accepted.push(r.clone()),
                (Err(AddRequestError::EmptyPrompt), Err("empty"))
                | (Err(AddRequestError::TooLong { .. }), Err("too long"))
                | (Err(AddRequestError::ExceedsKvPool { .. }), Err("pool"))
                | (Err(AddRequestError::ScoringUnavailable), Err("scoring")) => {}
                _ => prop_assert!(
                    false,
                    "{:?}: add_request {got:?}, expected {expected:?}",
                    r.id
                ),
            }
        }
        let aborts_now = |before: bool| {
            sc.aborts
                .iter()
                .filter(move |a| a.0 == step && a.2 == before)
                .map(|a| RequestId(a.1 as u64))
        };
        for id in aborts_now(true) {
            d.abort(id);
        }
        if step > last_arrival && !d.sched.has_unfinished() {
            break;
        }
        prop_assert!(
            step < STEP_BOUND,
            "requests still unfinished after {STEP_BOUND} steps"
        );
        let between: Vec<RequestId> = aborts_now(false).collect();
        d.step_with(|d| {
            for id in between {
                d.abort(id);
            }
        })
        .map_err(TestCaseError::fail)?;
        step += 1;
    }
    d.run_until_idle(2).map_err(TestCaseError::fail)?;

    for r in &accepted {
        let (solo, solo_reason) = solo_run(r, sc.max_model_len);
        let got = d.outputs.get(&r.id).cloned().unwrap_or_default();
        let reason = d.reasons.get(&r.id).copied();
        if reason == Some(FinishReason::Abort) {
            prop_assert!(
                solo.starts_with(&got),
                "{:?}: {got:?} not a prefix of {solo:?}",
                r.id
            );
        } else {
            prop_assert_eq!(&got, &solo, "{:?} outputs differ from its solo run", r.id);
            prop_assert_eq!(reason, Some(solo_reason));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn scheduling_matches_solo_runs_and_keeps_invariants(sc in scenario()) {
        run(&sc)?;
    }
}

/// One adapter floods (`flood_per_step` requests of the largest size every step for
/// `flood_steps` steps) while the others send a few requests at random steps.
#[derive(Clone, Debug)]
struct Backlog {
    num_tenants: u32,
    budget: usize,
    caching: bool,
    flood_per_step: usize,
    flood_steps: usize,
    /// (tenant 1.., arrival step, prompt length 1..=P_MAX, max_tokens 1..=M_MAX)
    others: Vec<(u32, usize, usize, usize)>,
}

const P_MAX: usize = 6;
const M_MAX: usize = 4;

fn backlog() -> impl Strategy<Value = Backlog> {
    (2..6u32, 1..8usize, any::<bool>(), 1..5usize, 5..20usize).prop_flat_map(
        |(num_tenants, budget, caching, flood_per_step, flood_steps)| {
            let other = (1..num_tenants, 0..30usize, 1..=P_MAX, 1..=M_MAX);
            prop::collection::vec(other, 1..16).prop_map(move |others| Backlog {
                num_tenants,
                budget,
                caching,
                flood_per_step,
                flood_steps,
                others,
            })
        },
    )
}

/// No starvation under VTC. With one request running at a time (`max_num_seqs = 1`, a pool
/// that always fits it, one priority, no `max_loras`), write R = ceil(P_MAX / budget) + M_MAX - 1
/// for the most steps one request holds the seat, and U = w_p * P_MAX + w_q * M_MAX for the most
/// service one request is charged. Every counter stays within U above the backlog's minimum V
/// (a tenant is admitted only at V, then charged at most U; arrivals are lifted to V; V never
/// falls). While adapter B waits, its counter C is at most V + U, and another adapter is
/// admitted only while its counter is <= C, each time then gaining at least w_p + w_q: so at
/// most floor(U / (w_p + w_q)) + 1 times. Hence B goes at most
/// (1 + (T - 1) * (floor(U / (w_p + w_q)) + 1)) * R + 1 consecutive steps backlogged without
/// an admission (the request running when it started waiting, then the others'). Under FCFS
/// the wait grows with the flood instead, and this fails.
fn check_no_starvation(b: &Backlog, fairness: Fairness) -> Result<(), TestCaseError> {
    use caduceus_scheduler::{
        ScheduledData, SchedulerConfig, VTC_OUTPUT_WEIGHT, VTC_PROMPT_WEIGHT,
    };
    let block_size = 4;
    let config = SchedulerConfig {
        max_num_seqs: 1,
        max_num_batched_tokens: b.budget,
        block_size,
        num_blocks: 1 + (P_MAX + M_MAX).div_ceil(block_size),
        max_model_len: P_MAX + M_MAX,
        enable_prefix_caching: b.caching,
        fairness,
        ..SchedulerConfig::default()
    };
    let r = P_MAX.div_ceil(b.budget) + M_MAX - 1;
    let u = VTC_PROMPT_WEIGHT as usize * P_MAX + VTC_OUTPUT_WEIGHT as usize * M_MAX;
    let per_tenant = u / (VTC_PROMPT_WEIGHT + VTC_OUTPUT_WEIGHT) as usize + 1;
    let bound = (1 + (b.num_tenants as usize - 1) * per_tenant) * r + 1;

    let mut arrivals: Vec<(usize, NewRequest)> = Vec::new();
    let mut next_id = 0u64;
    let mut push = |step: usize, tenant: u32, len: usize, max_tokens: usize| {
        let mut r = common::req(next_id, &base_prompt(tenant as usize)[..len], max_tokens);
        r.arrival_seq = (step * 1000) as u64 + next_id;
        r.adapter = Some(AdapterKey {
            id: tenant,
            generation: 0,
        });
        arrivals.push((step, r));
        next_id += 1;
    };
    for step in 0..b.flood_steps {
        for _ in 0..b.flood_per_step {
            push(step, 0, P_MAX, M_MAX);
        }
    }
    for &(tenant, step, len, max_tokens) in &b.others {
        push(step, tenant, len, max_tokens);
    }
    let tenant_of: std::collections::HashMap<RequestId, u32> = arrivals
        .iter()
        .map(|(_, r)| (r.id, r.adapter.map_or(0, |a| a.id)))
        .collect();
    let last_arrival = arrivals.iter().map(|(s, _)| *s).max().unwrap_or(0);
    let mut d = Driver::new(config);
    let mut waited = vec![0usize; b.num_tenants as usize];
    let mut step = 0;
    while step <= last_arrival || d.sched.has_unfinished() {
        for (_, r) in arrivals.iter().filter(|(s, _)| *s == step) {
            d.add(r.clone())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let mut backlogged = vec![false; b.num_tenants as usize];
        for id in d.sched.waiting_ids() {
            backlogged[tenant_of[&id] as usize] = true;
        }
        let (out, _) = d.step().map_err(TestCaseError::fail)?;
        let mut admitted = vec![false; b.num_tenants as usize];
        for s in &out.scheduled {
            if matches!(s.data, ScheduledData::New { .. }) {
                admitted[tenant_of[&s.id] as usize] = true;
            }
        }
        for t in 0..waited.len() {
            waited[t] = if backlogged[t] && !admitted[t] {
                waited[t] + 1
            } else {
                0
            };
            prop_assert!(
                waited[t] <= bound,
                "adapter {t} backlogged {} steps without an admission (bound {bound})",
                waited[t]
            );
        }
        step += 1;
        prop_assert!(step < STEP_BOUND, "not done after {STEP_BOUND} steps");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn vtc_admits_every_backlogged_adapter_within_the_bound(b in backlog()) {
        check_no_starvation(&b, Fairness::Vtc)?;
    }
}

/// The bound is not vacuous: FCFS breaks it on a heavy flood.
#[test]
fn fcfs_lets_a_flood_exceed_the_starvation_bound() {
    let b = Backlog {
        num_tenants: 2,
        budget: 8,
        caching: false,
        flood_per_step: 4,
        flood_steps: 10,
        others: vec![(1, 2, 3, 2)],
    };
    assert!(check_no_starvation(&b, Fairness::Fcfs).is_err());
    assert!(check_no_starvation(&b, Fairness::Vtc).is_ok());
}
