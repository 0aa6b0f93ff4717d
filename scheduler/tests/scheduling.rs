//! Deterministic scheduling behaviour: admission errors, chunked prefill, preemption order,
//! limits, stop conditions and finishing requests at awkward moments.

mod common;

use caduceus_scheduler::{
    AddRequestError, BlockId, FinishReason, RequestId, RequestStatus, ScheduledData, Scheduler,
    SchedulerConfig, StepOutput,
};
use common::{req, solo_run, Driver};

fn config(block_size: usize, num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        block_size,
        num_blocks,
        max_model_len: 64,
        ..SchedulerConfig::default()
    }
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 5 + salt) % 31).collect()
}

#[test]
fn add_request_refuses_requests_that_cannot_finish() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 20,
        ..config(4, 5) // 4 usable blocks = 16 token slots
    })
    .unwrap();
    assert_eq!(s.add_request(req(1, &[1, 2], 3)), Ok(()));
    assert_eq!(
        s.add_request(req(1, &[1], 1)),
        Err(AddRequestError::DuplicateId(RequestId(1)))
    );
    assert_eq!(
        s.add_request(req(2, &[], 3)),
        Err(AddRequestError::EmptyPrompt)
    );
    assert_eq!(
        s.add_request(req(2, &[1], 0)),
        Err(AddRequestError::ZeroMaxTokens)
    );
    let err = s.add_request(req(2, &prompt(10, 0), 11)).unwrap_err();
    assert_eq!(
        err,
        AddRequestError::TooLong {
            prompt_tokens: 10,
            max_tokens: 11,
            max_model_len: 20
        }
    );
    assert!(err.to_string().contains("20 tokens"), "{err}");
    // 10 + 10 - 1 = 19 slots = 5 blocks > 4; 10 + 7 - 1 = 16 slots fit exactly.
    assert_eq!(
        s.add_request(req(2, &prompt(10, 0), 10)),
        Err(AddRequestError::ExceedsKvPool {
            needed_blocks: 5,
            usable_blocks: 4
        })
    );
    assert_eq!(s.add_request(req(2, &prompt(10, 0), 7)), Ok(()));
    assert_eq!(s.num_waiting(), 2);
    assert_eq!(s.status(RequestId(2)), Some(RequestStatus::Waiting));
}

#[test]
fn chunked_prefill_shares_the_token_budget_with_decodes() {
    let mut d = Driver::new(SchedulerConfig {
        max_num_batched_tokens: 8,
        ..config(4, 32)
    });
    let short = req(1, &prompt(3, 1), 5);
    let long = req(2, &prompt(20, 2), 2);
    d.add(short.clone()).unwrap();
    d.add(long.clone()).unwrap();
    // (request, num_computed_tokens, num_scheduled_tokens, is_new) per step.
    let expected: [&[(u64, usize, usize, bool)]; 4] = [
        &[(1, 0, 3, true), (2, 0, 5, true)],
        &[(1, 3, 1, false), (2, 5, 7, false)],
        &[(1, 4, 1, false), (2, 12, 7, false)],
        &[(1, 5, 1, false), (2, 19, 1, false)],
    ];
    for (n, want) in expected.iter().enumerate() {
        let (out, updates) = d.step().unwrap();
        let got: Vec<_> = out
            .scheduled
            .iter()
            .map(|r| {
                let is_new = matches!(r.data, ScheduledData::New { .. });
                (
                    r.id.0,
                    r.num_computed_tokens,
                    r.num_scheduled_tokens,
                    is_new,
                )
            })
            .collect();
        assert_eq!(got, *want, "step {n}");
        // Only the request whose chunk reached the end of its tokens sampled.
        let sampled: Vec<u64> = updates.iter().map(|u| u.id.0).collect();
        assert_eq!(
            sampled,
            if n < 3 { vec![1] } else { vec![1, 2] },
            "step {n}"
        );
    }
    d.run_until_idle(20).unwrap();
    for r in [short, long] {
        assert_eq!(d.outputs[&r.id], solo_run(&r, 64).0);
    }
}

#[test]
fn preemption_takes_the_lowest_priority_latest_arrival_first() {
    // Six usable blocks of two tokens; each request holds two after its prefill of three tokens.
    let mut d = Driver::new(config(2, 7));
    let mut a = req(1, &prompt(3, 1), 6);
    a.priority = 0;
    a.arrival_seq = 2;
    let mut b = req(2, &prompt(3, 2), 6);
    b.priority = 1;
    b.arrival_seq = 0;
    let mut c = req(3, &prompt(3, 3), 6);
    c.priority = 1;
    c.arrival_seq = 1;
    for r in [&a, &b, &c] {
        d.add(r.clone()).unwrap();
    }
    let (out, _) = d.step().unwrap();
    let order: Vec<u64> = out.scheduled.iter().map(|r| r.id.0).collect();
    assert_eq!(order, [1, 2, 3], "served by (priority, arrival)");
    let (out, _) = d.step().unwrap(); // position 3 fits in the second block
    assert!(out.preempted_ids.is_empty());
    // Position 4 needs a third block for everyone: c (priority 1, later arrival) goes first.
    let (out, _) = d.step().unwrap();
    assert_eq!(out.preempted_ids, [RequestId(3)]);
    let order: Vec<u64> = out.scheduled.iter().map(|r| r.id.0).collect();
    assert_eq!(order, [1, 2]);
    assert_eq!(d.sched.status(RequestId(3)), Some(RequestStatus::Preempted));
    assert_eq!(
        d.sched.request(RequestId(3)).unwrap().num_computed_tokens(),
        0
    );
    assert_eq!(d.sched.stats().num_preemptions, 1);
    // A request that arrives now still queues behind the preempted one.
    let mut e = req(4, &prompt(2, 4), 1);
    e.priority = -5;
    d.add(e.clone()).unwrap();
    let waiting: Vec<u64> = d.sched.waiting_ids().map(|id| id.0).collect();
    assert_eq!(waiting, [3, 4]);
    // c resumes first, with the prompt and the two outputs it had.
    let mut resumed = None;
    for _ in 0..40 {
        let (out, _) = d.step().unwrap();
        for r in &out.scheduled {
            if let (RequestId(3), ScheduledData::New { token_ids, .. }) = (r.id, &r.data) {
                resumed.get_or_insert(token_ids.len());
            }
        }
    }
    assert_eq!(resumed, Some(5));
    assert_eq!(d.reasons[&e.id], FinishReason::Length);
    d.run_until_idle(40).unwrap();
    for r in [a, b, c, e] {
        assert_eq!(d.outputs[&r.id], solo_run(&r, 64).0, "{:?}", r.id);
    }
}

#[test]
fn a_preempted_request_resumes_from_its_cached_blocks() {
    let mut d = Driver::new(config(2, 6)); // 5 usable blocks
    let mut a = req(1, &prompt(3, 1), 3); // 3 blocks at full length
    a.priority = 0;
    let mut b = req(2, &prompt(5, 2), 4);
    b.priority = 1;
    d.add(a.clone()).unwrap();
    d.add(b.clone()).unwrap();
    d.step().unwrap(); // a: 2 blocks, b: 3 blocks
    d.step().unwrap(); // b fills its third block
    let (out, _) = d.step().unwrap(); // a needs a third block: b is preempted, a finishes
    assert_eq!(out.preempted_ids, [RequestId(2)]);
    assert_eq!(d.reasons[&a.id], FinishReason::Length);
    let hits_before = d.sched.stats().prefix_cache_hits;
    let (out, _) = d.step().unwrap();
    let r = &out.scheduled[0];
    assert_eq!(r.id, RequestId(2));
    // Its third block went to a (tail blocks are evicted first); the first two are still cached.
    assert_eq!(r.num_computed_tokens, 4);
    assert!(matches!(&r.data, ScheduledData::New { token_ids, .. } if token_ids.len() == 7));
    assert_eq!(d.sched.stats().prefix_cache_hits, hits_before + 4);
    d.run_until_idle(20).unwrap();
    assert_eq!(d.outputs[&b.id], solo_run(&b, 64).0);
}

#[test]
fn a_request_that_is_the_lowest_priority_preempts_itself() {
    let mut d = Driver::new(config(2, 5)); // 4 usable blocks
    let mut a = req(1, &prompt(3, 1), 2); // 2 blocks, never needs a third
    a.priority = 0;
    let mut b = req(2, &prompt(4, 2), 4);
    b.priority = 1;
    d.add(a.clone()).unwrap();
    d.add(b.clone()).unwrap();
    d.step().unwrap(); // both prefill: 2 + 2 blocks
    let (out, _) = d.step().unwrap(); // b needs a third block: none free
    assert_eq!(out.preempted_ids, [RequestId(2)]);
    assert_eq!(out.scheduled.len(), 1);
    assert_eq!(out.scheduled[0].id, RequestId(1));
    d.run_until_idle(20).unwrap();
    assert_eq!(d.outputs[&b.id], solo_run(&b, 64).0);
}

#[test]
fn waiting_requests_wait_for_blocks_without_preempting() {
    let mut d = Driver::new(config(4, 5)); // 4 usable blocks
    d.add(req(1, &prompt(10, 1), 3)).unwrap(); // 3 blocks
    d.step().unwrap();
    d.add(req(2, &prompt(6, 2), 2)).unwrap(); // needs 2 blocks, 1 free
    d.add(req(3, &prompt(2, 3), 1)).unwrap(); // would fit, but queues behind 2
    let (out, _) = d.step().unwrap();
    assert!(out.preempted_ids.is_empty());
    assert_eq!(out.scheduled.len(), 1);
    assert_eq!(d.sched.num_waiting(), 2);
    d.run_until_idle(20).unwrap();
    assert_eq!(d.reasons.len(), 3);
}

#[test]
fn max_num_seqs_caps_the_batch() {
    let mut d = Driver::new(SchedulerConfig {
        max_num_seqs: 2,
        ..config(4, 32)
    });
    for id in 1..=4 {
        d.add(req(id, &prompt(3, id as u32), 4)).unwrap();
    }
    let (out, _) = d.step().unwrap();
    assert_eq!(out.scheduled.len(), 2);
    assert_eq!((d.sched.num_running(), d.sched.num_waiting()), (2, 2));
    d.run_until_idle(40).unwrap();
}

/// Drives one request by hand, feeding chosen tokens instead of a model's.
fn feed(s: &mut Scheduler, tokens: &[u32]) -> Vec<Option<FinishReason>> {
    let mut reasons = Vec::new();
    for &t in tokens {
        let out = s.schedule();
        let id = out.scheduled[0].id;
        let updates = s.update(
            &out,
            &StepOutput {
                sampled: vec![(id, t)],
            },
        );
        reasons.push(updates[0].finish_reason);
    }
    reasons
}

#[test]
fn stop_tokens_count_only_after_min_tokens() {
    let mut s = Scheduler::new(config(4, 16)).unwrap();
    let mut r = req(1, &[1, 2, 3], 10);
    r.stop_token_ids = vec![7, 9];
    r.min_tokens = 3;
    s.add_request(r).unwrap();
    let got = feed(&mut s, &[7, 9, 5, 9]);
    assert_eq!(got, [None, None, None, Some(FinishReason::Stop)]);
    assert_eq!(
        s.status(RequestId(1)),
        Some(RequestStatus::Finished(FinishReason::Stop))
    );
    assert_eq!(s.schedule().finished_ids, [RequestId(1)]);
    assert_eq!(s.status(RequestId(1)), None, "forgotten once reported");
}

#[test]
fn length_limits_finish_requests() {
    let mut s = Scheduler::new(config(4, 16)).unwrap();
    s.add_request(req(1, &[1, 2, 3], 2)).unwrap();
    assert_eq!(feed(&mut s, &[4, 5]), [None, Some(FinishReason::Length)]);
    // prompt + max_tokens == max_model_len is accepted and ends exactly at the limit.
    let mut s = Scheduler::new(SchedulerConfig {
        max_model_len: 6,
        ..config(4, 16)
    })
    .unwrap();
    s.add_request(req(1, &[1, 2, 3, 4], 2)).unwrap();
    assert_eq!(feed(&mut s, &[4, 5]), [None, Some(FinishReason::Length)]);
    assert!(s.add_request(req(2, &[1, 2, 3, 4, 5], 2)).is_err());
    // A stop token that is also the last allowed token reports Stop.
    let mut s = Scheduler::new(config(4, 16)).unwrap();
    let mut r = req(1, &[1], 2);
    r.stop_token_ids = vec![9];
    s.add_request(r).unwrap();
    assert_eq!(feed(&mut s, &[4, 9]), [None, Some(FinishReason::Stop)]);
}

#[test]
fn finishing_between_schedule_and_update_ignores_the_sample() {
    let mut s = Scheduler::new(config(4, 16)).unwrap();
    s.add_request(req(1, &prompt(5, 1), 4)).unwrap();
    s.add_request(req(2, &prompt(5, 2), 4)).unwrap();
    s.add_request(req(3, &prompt(5, 3), 4)).unwrap();
    let out = s.schedule();
    assert!(s.finish_request(RequestId(1), FinishReason::Abort));
    assert!(!s.finish_request(RequestId(1), FinishReason::Abort));
    assert!(!s.finish_request(RequestId(9), FinishReason::Abort));
    assert_eq!(
        s.status(RequestId(1)),
        Some(RequestStatus::Finished(FinishReason::Abort))
    );
    assert_eq!(
        s.stats().num_free_blocks,
        15 - 4,
        "its blocks are free at once"
    );
    let sampled = vec![(RequestId(1), 3), (RequestId(2), 4), (RequestId(3), 5)];
    let updates = s.update(&out, &StepOutput { sampled });
    let ids: Vec<_> = updates.iter().map(|u| u.id.0).collect();
    assert_eq!(ids, [2, 3]);
    // Applying the same step twice changes nothing.
    assert!(s.update(&out, &StepOutput::default()).is_empty());
    assert_eq!(s.request(RequestId(2)).unwrap().num_computed_tokens(), 5);
    assert_eq!(
        s.add_request(req(1, &[1], 1)),
        Err(AddRequestError::DuplicateId(RequestId(1))),
        "the id is reserved until the executor hears it finished"
    );
    assert!(s.finish_request(RequestId(3), FinishReason::Stop));
    let out = s.schedule();
    assert_eq!(out.finished_ids, [RequestId(1), RequestId(3)]);
    assert_eq!(s.status(RequestId(1)), None);
    assert_eq!(s.add_request(req(1, &[1], 1)), Ok(()));
}

#[test]
fn finishing_a_waiting_request_removes_it_from_the_queue() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 1,
        ..config(4, 16)
    })
    .unwrap();
    s.add_request(req(1, &[1, 2], 3)).unwrap();
    s.add_request(req(2, &[1, 2], 3)).unwrap();
    s.schedule();
    assert!(s.finish_request(RequestId(2), FinishReason::Abort));
    assert_eq!((s.num_running(), s.num_waiting()), (1, 0));
    assert!(s.has_unfinished());
}

#[test]
fn a_missing_sample_is_recomputed_next_step() {
    let mut s = Scheduler::new(config(4, 16)).unwrap();
    s.add_request(req(1, &prompt(6, 1), 3)).unwrap();
    let out = s.schedule();
    assert!(s.update(&out, &StepOutput::default()).is_empty());
    let out = s.schedule();
    let r = &out.scheduled[0];
    assert_eq!((r.num_computed_tokens, r.num_scheduled_tokens), (5, 1));
    match &r.data {
        ScheduledData::Cached { new_block_ids } => assert!(new_block_ids.is_empty()),
        other => panic!("expected a cached entry, got {other:?}"),
    }
    assert_ne!(
        s.request(RequestId(1)).unwrap().block_table()[0],
        BlockId::NULL
    );
}
