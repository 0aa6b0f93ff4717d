//! Prefix caching through the scheduler: hits on shared prefixes (prompt and output blocks),
//! isolation by adapter generation and cache salt, and the statistics.

mod common;
#[path = "prefix_cache/kv_events.rs"]
mod kv_events;

use caduceus_scheduler::{AdapterKey, ScheduledData, SchedulerConfig, SchedulerOutput};
use common::{req, solo_run, Driver};

fn config(enable_prefix_caching: bool) -> SchedulerConfig {
    SchedulerConfig {
        block_size: 4,
        num_blocks: 64,
        max_model_len: 64,
        enable_prefix_caching,
        ..SchedulerConfig::default()
    }
}

fn system_prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 3 + 1) % 29).collect()
}

/// (num_computed_tokens, block_ids) of the New entry for `id` in `out`.
fn new_entry(out: &SchedulerOutput, id: u64) -> (usize, Vec<caduceus_scheduler::BlockId>) {
    out.scheduled
        .iter()
        .find_map(|r| match &r.data {
            ScheduledData::New { block_ids, .. } if r.id.0 == id => {
                Some((r.num_computed_tokens, block_ids.clone()))
            }
            _ => None,
        })
        .expect("a New entry")
}

#[test]
fn shared_prompt_prefix_hits_whole_blocks() {
    let mut d = Driver::new(config(true));
    let mut p1 = system_prompt(10);
    p1.push(30);
    let mut p2 = system_prompt(10);
    p2.extend([31, 32]);
    let (r1, r2) = (req(1, &p1, 3), req(2, &p2, 3));
    d.add(r1.clone()).unwrap();
    let (out, _) = d.step().unwrap();
    let (_, blocks1) = new_entry(&out, 1);
    d.add(r2.clone()).unwrap();
    let (out, _) = d.step().unwrap();
    let (computed, blocks2) = new_entry(&out, 2);
    assert_eq!(computed, 8, "two full shared blocks; the third differs");
    assert_eq!(blocks2[..2], blocks1[..2]);
    assert_ne!(blocks2[2], blocks1[2]);
    let stats = d.sched.stats();
    assert_eq!(
        (stats.prefix_cache_queries, stats.prefix_cache_hits),
        (11 + 12, 8)
    );
    d.run_until_idle(20).unwrap();
    assert_eq!(d.outputs[&r2.id], solo_run(&r2, 64).0);
}

#[test]
fn output_blocks_are_cached_too() {
    let mut d = Driver::new(config(true));
    let r1 = req(1, &system_prompt(4), 9);
    d.add(r1.clone()).unwrap();
    d.run_until_idle(20).unwrap();
    // A follow-up turn: the whole first conversation plus a new question.
    let mut turn2 = system_prompt(4);
    turn2.extend(&d.outputs[&r1.id]);
    turn2.extend([5, 6]);
    d.add(req(2, &turn2, 2)).unwrap();
    let (out, _) = d.step().unwrap();
    // 13 tokens were computed by request 1 (the last output never was): 3 full blocks.
    assert_eq!(new_entry(&out, 2).0, 12);
    d.run_until_idle(20).unwrap();
}

#[test]
fn adapter_generation_and_salt_isolate_the_cache() {
    let mut d = Driver::new(config(true));
    let prompt = system_prompt(9);
    let with = |id: u64, generation: Option<u64>, salt: Option<u64>| {
        let mut r = req(id, &prompt, 2);
        r.adapter = generation.map(|generation| AdapterKey { id: 3, generation });
        r.cache_salt = salt;
        r
    };
    // (request, expected hit tokens): each runs after the previous ones finished.
    let cases = [
        (with(1, Some(0), None), 0),
        (with(2, Some(0), None), 8),
        (with(3, Some(1), None), 0), // reloaded adapter: stale KV must not be reused
        (with(4, None, None), 0),    // base model
        (with(5, Some(0), Some(7)), 0),
        (with(6, Some(0), Some(7)), 8),
        (with(7, Some(0), Some(8)), 0),
    ];
    for (r, hit) in cases {
        let id = r.id.0;
        d.add(r.clone()).unwrap();
        let (out, _) = d.step().unwrap();
        assert_eq!(new_entry(&out, id).0, hit, "request {id}");
        d.run_until_idle(20).unwrap();
        assert_eq!(d.outputs[&r.id], solo_run(&r, 64).0);
    }
}

#[test]
fn caching_disabled_never_hits() {
    let mut d = Driver::new(config(false));
    for id in 1..=2 {
        d.add(req(id, &system_prompt(9), 2)).unwrap();
        let (out, _) = d.step().unwrap();
        assert_eq!(new_entry(&out, id).0, 0);
        d.run_until_idle(20).unwrap();
    }
    let stats = d.sched.stats();
    assert_eq!(
        (stats.prefix_cache_queries, stats.prefix_cache_hits),
        (0, 0)
    );
}
