//! The `max_loras` limit: requests whose adapter would exceed it are skipped, later ones are
//! still considered, and a request skipped `adapter_aging_steps` times stops admission until an
//! adapter slot drains, so a stream of hot-adapter requests cannot starve a cold one.

mod common;
#[path = "adapters/fairness.rs"]
mod fairness;

use caduceus_scheduler::{
    Fairness, RequestId, RequestStatus, ScheduledData, SchedulerConfig, SchedulerOutput,
};
use common::{adapter, req, solo_run, Driver};
use std::collections::HashSet;

/// FCFS, so these tests pin the `max_loras` and aging rules alone (`fairness` below covers VTC).
fn config(max_loras: usize, adapter_aging_steps: u32) -> SchedulerConfig {
    SchedulerConfig {
        fairness: Fairness::Fcfs,
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        block_size: 4,
        num_blocks: 256,
        max_model_len: 64,
        max_loras: Some(max_loras),
        adapter_aging_steps,
        ..SchedulerConfig::default()
    }
}

fn scheduled(out: &SchedulerOutput) -> Vec<u64> {
    out.scheduled.iter().map(|r| r.id.0).collect()
}

#[test]
fn a_blocked_adapter_is_skipped_and_later_requests_still_run() {
    let mut d = Driver::new(config(1, 8));
    let with_adapter = |id, a| {
        let mut r = req(id, &[1, 2, 3], 3);
        r.adapter = a;
        r
    };
    d.add(with_adapter(1, adapter(1))).unwrap();
    d.add(with_adapter(2, adapter(2))).unwrap();
    d.add(with_adapter(3, adapter(1))).unwrap();
    d.add(with_adapter(4, None)).unwrap();
    let (out, _) = d.step().unwrap();
    assert_eq!(scheduled(&out), [1, 3, 4]);
    assert_eq!(d.sched.status(RequestId(2)), Some(RequestStatus::Waiting));
    d.run_until_idle(20).unwrap();
    assert_eq!(d.reasons.len(), 4);
}

fn new_ids(out: &SchedulerOutput) -> Vec<u64> {
    out.scheduled
        .iter()
        .filter(|r| matches!(r.data, ScheduledData::New { .. }))
        .map(|r| r.id.0)
        .collect()
}

#[test]
fn an_aged_request_stops_admission_until_its_adapter_fits() {
    let mut d = Driver::new(config(1, 2));
    let mut hot = req(1, &[1, 2, 3], 6);
    hot.adapter = adapter(1);
    let mut cold = req(2, &[4, 5, 6], 2);
    cold.adapter = adapter(2);
    d.add(hot).unwrap();
    d.add(cold.clone()).unwrap();
    let mut cold_step = None;
    for step in 0..20u64 {
        // One more adapter-1 request every step (4 tokens each).
        let mut r = req(10 + step, &[7, 8], 4);
        r.adapter = adapter(1);
        d.add(r).unwrap();
        let (out, _) = d.step().unwrap();
        let admitted = new_ids(&out);
        match step {
            0 => assert_eq!(admitted, [1, 10], "request 2 skipped once"),
            1 => assert_eq!(admitted, [11], "request 2 skipped twice"),
            _ if admitted.contains(&2) => {
                // Admitted alone once requests 1, 10 and 11 drained; the later
                // adapter-1 requests are now the ones skipped.
                assert_eq!(admitted, [2]);
                cold_step = Some(step);
                break;
            }
            _ => assert!(
                admitted.is_empty(),
                "step {step}: aged request 2 holds the door"
            ),
        }
    }
    assert_eq!(cold_step, Some(6));
    d.run_until_idle(100).unwrap();
    assert_eq!(d.outputs[&cold.id], solo_run(&cold, 64).0);
}

/// Two hot-adapter requests arrive every step; a cold-adapter request arrives at step 1.
/// Returns the step at which the cold request was admitted, if it was within `steps`.
fn cold_admission_step(adapter_aging_steps: u32, steps: u64) -> Option<u64> {
    let mut d = Driver::new(config(1, adapter_aging_steps));
    for step in 0..steps {
        for k in 0..2 {
            let mut r = req(100 + 2 * step + k, &[1, 2, 3, 4, 5], 3);
            r.adapter = adapter(1);
            d.add(r).unwrap();
        }
        if step == 1 {
            let mut cold = req(1, &[9, 9, 9], 2);
            cold.adapter = adapter(2);
            d.add(cold).unwrap();
        }
        let (out, _) = d.step().unwrap();
        let adapters: HashSet<_> = out
            .scheduled
            .iter()
            .filter_map(|r| d.sched.request(r.id).and_then(|q| q.adapter()))
            .collect();
        assert!(adapters.len() <= 1, "max_loras exceeded");
        if new_ids(&out).contains(&1) {
            return Some(step);
        }
    }
    None
}

#[test]
fn a_hot_adapter_stream_cannot_starve_a_cold_request() {
    // Without aging the hot adapter always has running requests: the cold one starves.
    assert_eq!(cold_admission_step(u32::MAX, 200), None);
    // With aging it is skipped at steps 1..=4, holds the door from step 5, and runs once the hot
    // requests admitted at step 4 finish their 3 tokens (steps 4, 5, 6).
    assert_eq!(cold_admission_step(4, 200), Some(7));
}
