//! VTC fairness end to end through the scheduler: a flooded adapter cannot starve ten others
//! under `vtc`, and `fcfs` keeps the old arrival order (which lets it).

use super::common::{adapter, req, solo_run, Driver};
use caduceus_scheduler::{Fairness, RequestId, ScheduledData, SchedulerConfig, SchedulerOutput};
use std::collections::HashMap;

const FLOOD: u64 = 200;
const QUIET: u64 = 10;

/// Adapter 0 queues `FLOOD` requests at step 0; adapters 1..=10 each queue one after two
/// steps. Returns, for each quiet request, how many flood requests were admitted after the quiet
/// ones arrived and before it was.
fn flood_then_ten(fairness: Fairness) -> Vec<usize> {
    let config = SchedulerConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        block_size: 4,
        num_blocks: 256,
        max_model_len: 64,
        fairness,
        ..SchedulerConfig::default()
    };
    let mut d = Driver::new(config);
    let prompt = |i: u64| -> Vec<u32> { (0..8).map(|t| ((i * 7 + t) % 31) as u32).collect() };
    for i in 0..FLOOD {
        let mut r = req(i, &prompt(i), 8);
        r.adapter = adapter(0);
        d.add(r).unwrap();
    }
    d.step().unwrap();
    d.step().unwrap();
    let mut quiet = Vec::new();
    for k in 1..=QUIET {
        let mut r = req(1000 + k, &prompt(k), 8);
        r.adapter = adapter(k as u32);
        d.add(r.clone()).unwrap();
        quiet.push(r);
    }
    let mut flood_admitted = 0;
    let mut ahead: HashMap<RequestId, usize> = HashMap::new();
    while ahead.len() < quiet.len() {
        let (out, _) = d.step().unwrap();
        for s in &out.scheduled {
            if matches!(s.data, ScheduledData::New { .. }) {
                if s.id.0 < FLOOD {
                    flood_admitted += 1;
                } else {
                    ahead.insert(s.id, flood_admitted);
                }
            }
        }
    }
    d.run_until_idle(2_000).unwrap();
    for r in &quiet {
        assert_eq!(d.outputs[&r.id], solo_run(r, 64).0, "{:?}", r.id);
    }
    quiet.iter().map(|r| ahead[&r.id]).collect()
}

#[test]
fn a_flooded_adapter_cannot_starve_ten_others() {
    // Each quiet adapter starts at the flood's counter (lifted, no credit for idling) and, once
    // one flood request has been charged its 8 prompt tokens, is below it: all ten go next.
    let ahead = flood_then_ten(Fairness::Vtc);
    assert!(
        ahead.iter().all(|&n| n <= 1),
        "flood requests admitted first: {ahead:?}"
    );
    // FCFS serves the 198 earlier flood requests still waiting first.
    let ahead = flood_then_ten(Fairness::Fcfs);
    assert!(ahead.iter().all(|&n| n >= 190), "{ahead:?}");
}

/// A flood yields step time to a quiet adapter (`backlog.rs`): while the quiet request runs, the
/// flood's prefill takes at most half of each step's budget, and in the step where the quiet
/// prompt finishes none at all (its chunks are cut to one token); before and after, the flood
/// has the whole budget.
#[test]
fn a_flood_yields_step_time_to_a_quiet_adapter() {
    const BUDGET: usize = 64;
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: BUDGET,
        block_size: 16,
        num_blocks: 512,
        max_model_len: 512,
        fairness: Fairness::Vtc,
        ..SchedulerConfig::default()
    };
    let mut d = Driver::new(config);
    let prompt =
        |i: u64, len: u64| -> Vec<u32> { (0..len).map(|t| ((i * 13 + t) % 97) as u32).collect() };
    for i in 0..20 {
        let mut r = req(i, &prompt(i, 150), 8);
        r.adapter = adapter(0);
        d.add(r).unwrap();
    }
    for _ in 0..4 {
        let (out, _) = d.step().unwrap();
        assert_eq!(
            out.total_num_scheduled_tokens, BUDGET,
            "the flood alone fills its steps"
        );
    }
    // 100 tokens: more than one step's budget, so the prompt finishes in its second step.
    let mut quiet = req(1000, &prompt(1000, 100), 8);
    quiet.adapter = adapter(1);
    d.add(quiet.clone()).unwrap();
    let steps: Vec<SchedulerOutput> = (0..20).map(|_| d.step().unwrap().0).collect();
    let quiet_chunk =
        |out: &SchedulerOutput| out.scheduled.iter().find(|s| s.id == quiet.id).cloned();
    let last = steps
        .iter()
        .position(|out| {
            quiet_chunk(out).is_some_and(|s| s.num_computed_tokens + s.num_scheduled_tokens == 100)
        })
        .expect("the quiet prompt never finished");
    // (tokens the flood computed, how many of its requests were scheduled)
    let flood = |out: &SchedulerOutput| -> (usize, usize) {
        let chunks = out.scheduled.iter().filter(|s| s.id != quiet.id);
        (
            chunks.clone().map(|s| s.num_scheduled_tokens).sum(),
            chunks.count(),
        )
    };
    let (tokens, n) = flood(&steps[last]);
    assert!(
        n > 0 && tokens == n,
        "the flood kept prefill ({tokens} tokens over {n} requests) in the quiet prompt's last step"
    );
    let decoding: Vec<usize> = (last + 1..steps.len())
        .filter(|&i| quiet_chunk(&steps[i]).is_some())
        .collect();
    assert_eq!(
        decoding.len(),
        7,
        "the quiet request decodes its other 7 tokens"
    );
    for &i in &decoding {
        // Beyond one token per scheduled request (a decode or a cut chunk), at most half.
        let (tokens, n) = flood(&steps[i]);
        assert!(
            tokens > n && tokens <= BUDGET / 2 + n,
            "step {i}: the flood computed {tokens} tokens over {n} requests beside the quiet one"
        );
    }
    let after = decoding[decoding.len() - 1] + 1;
    assert_eq!(
        steps[after].total_num_scheduled_tokens, BUDGET,
        "the flood has its budget back"
    );
    d.run_until_idle(2_000).unwrap();
    assert_eq!(d.outputs[&quiet.id], solo_run(&quiet, 512).0);
}

/// What the quiet requests of [`quiet_run`] saw.
struct QuietRun {
    /// Each quiet request's time to first token in steps from its arrival, sorted.
    ttft: Vec<usize>,
    /// The same in simulated time, where a step costs `STEP_OVERHEAD` plus one per token.
    ttft_time: Vec<usize>,
    /// How many of them found their adapter's whole system prompt in the prefix cache.
    prefix_hits: usize,
}

/// A steady stream of quiet requests (one every `QUIET_EVERY` steps over adapters 1..=10),
/// first alone for `WARMUP` steps, then beside adapter 0 flooding `flood_per_step` requests every
/// step (if any), with a pool the flood alone fills: shaped like `scripts/loadtest-fairness` on
/// the CPU server (which runs the quiet traffic alone, then flooded, on one server), in steps
/// instead of milliseconds: its pool (364 blocks of 16) and step budget (236 tokens), chat
/// prompts of 352 tokens that share a 192-token system prompt per adapter (so a prompt without a
/// prefix hit needs two steps), 32 outputs. Reports the quiet requests that arrived after the
/// warm-up.
fn quiet_run(flood_per_step: usize, fairness: Fairness) -> QuietRun {
    const WARMUP: usize = 80;
    const STEPS: usize = 240;
    const QUIET_EVERY: usize = 4;
    const SYSTEM: usize = 192;
    // A CPU step costs about its tokens (1.1 to 1.3 ms each on 2 cores) plus a few ms.
    const STEP_OVERHEAD: usize = 10;
    let config = SchedulerConfig {
        max_num_seqs: 236,
        max_num_batched_tokens: 236,
        block_size: 16,
        num_blocks: 364,
        max_model_len: 512,
        fairness,
        ..SchedulerConfig::default()
    };
    let mut d = Driver::new(config);
    // Each adapter's chats share a 192-token system prompt; 160 tokens are the request's own
    // question, different for every request (as patients' questions are).
    let prompt = |adapter_index: u64, i: u64| -> Vec<u32> {
        let system = (0..SYSTEM as u64).map(|t| ((adapter_index * 17 + t * 5) % 29) as u32);
        let question = (0..160u64)
            .map(|t| (i.wrapping_mul(0x9e37_79b9).wrapping_add(t * 7919) >> 4) as u32 % 40_000);
        system.chain(question).collect()
    };
    let mut arrival: HashMap<RequestId, (usize, usize)> = HashMap::new();
    let mut ttft: HashMap<RequestId, (usize, usize)> = HashMap::new();
    let mut clock = 0;
    let mut prefix_hits = 0;
    let mut next_id = 0u64;
    let mut step = 0;
    let end = WARMUP + STEPS;
    while step < end || ttft.len() < arrival.len() {
        assert!(
            step < 20 * end,
            "quiet requests still waiting after {step} steps"
        );
        if step < end {
            for _ in 0..if step < WARMUP { 0 } else { flood_per_step } {
                let mut r = req(next_id, &prompt(0, next_id), 32);
                r.adapter = adapter(0);
                r.arrival_seq = next_id;
                d.add(r).unwrap();
                next_id += 1;
            }
            if step % QUIET_EVERY == 0 {
                let quiet_index = 1 + (step / QUIET_EVERY % 10) as u64;
                let mut r = req(next_id, &prompt(quiet_index, next_id), 32);
                r.adapter = adapter(quiet_index as u32);
                if step >= WARMUP {
                    arrival.insert(r.id, (step, clock));
                }
                d.add(r).unwrap();
                next_id += 1;
            }
        } else if flood_per_step > 0 {
            // The flood's backlog is not needed any more: drop it so the test stays short.
            let waiting: Vec<RequestId> = d.sched.waiting_ids().collect();
            for id in waiting.into_iter().filter(|id| !arrival.contains_key(id)) {
                d.abort(id);
            }
        }
        let (out, updates) = d.step().unwrap();
        clock += STEP_OVERHEAD + out.total_num_scheduled_tokens;
        for s in &out.scheduled {
            if let ScheduledData::New { .. } = s.data {
                if arrival.contains_key(&s.id) && s.num_computed_tokens >= SYSTEM {
                    prefix_hits += 1;
                }
            }
        }
        for u in &updates {
            if let Some(&(at_step, at_time)) = arrival.get(&u.id) {
                ttft.entry(u.id)
                    .or_insert((step + 1 - at_step, clock - at_time));
            }
        }
        step += 1;
    }
    let (mut ttft, mut ttft_time): (Vec<usize>, Vec<usize>) = ttft.into_values().unzip();
    ttft.sort_unstable();
    ttft_time.sort_unstable();
    QuietRun {
        ttft,
        ttft_time,
        prefix_hits,
    }
}

#[test]
fn a_flood_that_fills_the_pool_keeps_quiet_ttft_within_twice_its_own() {
    let median = |v: &[usize]| v[v.len() / 2];
    let alone = quiet_run(0, Fairness::Vtc);
    let flooded = quiet_run(5, Fairness::Vtc);
    let fcfs = quiet_run(5, Fairness::Fcfs);
    for (name, run) in [
        ("alone", &alone),
        ("flooded (vtc)", &flooded),
        ("flooded (fcfs)", &fcfs),
    ] {
        eprintln!(
            "{name}: quiet TTFT in steps median {} max {}, in time median {} max {}, \
             system prompt cached for {} of {}",
            median(&run.ttft),
            run.ttft[run.ttft.len() - 1],
            median(&run.ttft_time),
            run.ttft_time[run.ttft_time.len() - 1],
            run.prefix_hits,
            run.ttft.len()
        );
    }
    assert!(
        median(&flooded.ttft) <= 2 * median(&alone.ttft),
        "{:?} vs {:?}",
        flooded.ttft,
        alone.ttft
    );
    // In time too: a step that finishes a quiet prompt carries none of the flood's prefill.
    assert!(
        median(&flooded.ttft_time) <= 2 * median(&alone.ttft_time),
        "{:?} vs {:?}",
        flooded.ttft_time,
        alone.ttft_time
    );
    assert!(
        median(&fcfs.ttft) > 2 * median(&alone.ttft),
        "the flood does not hurt FCFS: {:?}",
        fcfs.ttft
    );
    // The flood's one-off prompt tails turn the pool over every few steps, far faster than a
    // quiet adapter comes back; its system prompt, reused during the warm-up, survives anyway
    // (segmented LRU). Under plain LRU none of them would.
    assert_eq!(alone.prefix_hits, alone.ttft.len());
    assert!(
        flooded.prefix_hits * 10 >= flooded.ttft.len() * 9,
        "only {} of {} quiet requests found their system prompt cached",
        flooded.prefix_hits,
        flooded.ttft.len()
    );
}
