//! Scheduler cost per engine step: `schedule()` + `update()` with 1,024 running requests all
//! decoding and 4,096 waiting (`max_num_seqs` is full, as under sustained load), block 16, prefix
//! caching on. Prompts share a 64-token system prompt and vary in length, so block allocations and
//! block hashing are spread over steps as in real traffic. A model step is ~10-50 ms; this must
//! stay well under 1% of it.
//!
//! `cargo bench -p caduceus-benches --bench schedule`

use caduceus_scheduler::{NewRequest, RequestId, Scheduler, SchedulerConfig, StepOutput};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::{Duration, Instant};

const NUM_RUNNING: usize = 1024;
const NUM_WAITING: usize = 4096;
const SYSTEM_PROMPT: u32 = 64;
/// Steps measured from one snapshot before it is restored (requests never finish in between).
const STEPS_PER_SNAPSHOT: u64 = 256;
const EOS: u32 = 2;

fn request(i: usize) -> NewRequest {
    // 64 shared tokens plus 32..63 of the request's own.
    let own = 32 + (i * 7) % 32;
    let prompt = (0..SYSTEM_PROMPT)
        .chain((0..own as u32).map(|t| 1000 + (i as u32 * 31 + t) % 30_000))
        .collect();
    NewRequest {
        id: RequestId(i as u64),
        prompt_token_ids: prompt,
        max_tokens: 1024,
        min_tokens: 0,
        stop_token_ids: vec![EOS],
        priority: 0,
        arrival_seq: i as u64,
        adapter: None,
        cache_salt: None,
        scores_prompt: false,
    }
}

/// One engine step with a fake executor that samples a non-stop token for every request whose
/// scheduled tokens reach the end of its known tokens.
fn step(s: &mut Scheduler) -> usize {
    let out = s.schedule();
    let sampled = out
        .scheduled
        .iter()
        .filter(|r| {
            s.request(r.id)
                .is_some_and(|q| r.num_computed_tokens + r.num_scheduled_tokens == q.num_tokens())
        })
        .map(|r| (r.id, 1))
        .collect();
    s.update(&out, &StepOutput { sampled }).len()
}

/// The measured step: every scheduled request is decoding, so every one samples (the fake
/// executor needs no lookups of its own).
fn decode_step(s: &mut Scheduler) -> usize {
    let out = s.schedule();
    let sampled = out.scheduled.iter().map(|r| (r.id, 1)).collect();
    s.update(&out, &StepOutput { sampled }).len()
}

/// 1,024 requests past their prefill and decoding, 4,096 more waiting.
fn snapshot() -> Scheduler {
    let config = SchedulerConfig {
        max_num_seqs: NUM_RUNNING,
        max_num_batched_tokens: 8192,
        block_size: 16,
        num_blocks: 48 * 1024,
        max_model_len: 2048,
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(config).expect("valid bench config");
    for i in 0..NUM_RUNNING {
        s.add_request(request(i)).expect("bench request fits");
    }
    while s
        .running_ids()
        .filter_map(|id| s.request(id))
        .any(|r| r.num_output_tokens() == 0)
        || s.num_waiting() > 0
    {
        step(&mut s);
    }
    for i in NUM_RUNNING..NUM_RUNNING + NUM_WAITING {
        s.add_request(request(i)).expect("bench request fits");
    }
    assert_eq!(
        (s.num_running(), s.num_waiting()),
        (NUM_RUNNING, NUM_WAITING)
    );
    s
}

fn bench(c: &mut Criterion) {
    let base = snapshot();
    let mut group = c.benchmark_group("schedule");
    group.throughput(Throughput::Elements(NUM_RUNNING as u64));
    group.bench_function(
        BenchmarkId::new("decode_step", format!("{NUM_RUNNING}run_{NUM_WAITING}wait")),
        |b| {
            b.iter_custom(|iters| {
                // Time each step alone; restoring the snapshot (a clone) is not timed.
                let mut s = base.clone();
                let mut since_restore = 0;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if since_restore == STEPS_PER_SNAPSHOT {
                        s = base.clone();
                        since_restore = 0;
                    }
                    let start = Instant::now();
                    black_box(decode_step(&mut s));
                    total += start.elapsed();
                    since_restore += 1;
                }
                total
            })
        },
    );
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
