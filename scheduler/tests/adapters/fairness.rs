//! VTC fairness end to end through the scheduler: a flooded adapter cannot starve ten others
//! under `vtc`, and `fcfs` keeps the old arrival order (which lets it).

use super::common::{adapter, req, solo_run, Driver};
use caduceus_scheduler::{Fairness, RequestId, ScheduledData, SchedulerConfig};
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
