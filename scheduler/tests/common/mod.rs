//! Test support shared by the integration tests: request builders, a fake executor that keeps a
//! real (simulated) paged KV cache, the "model" that samples tokens, a solo reference run, and
//! the scheduler invariants checked after every step.
#![allow(dead_code)]

pub mod executor;
pub mod invariants;

use caduceus_scheduler::{
    AdapterKey, AddRequestError, FinishReason, NewRequest, RequestId, RequestUpdate, Scheduler,
    SchedulerConfig, SchedulerOutput,
};
use executor::FakeExecutor;
use std::collections::HashMap;

/// Vocabulary of the fake model (small, so stop tokens are actually sampled).
pub const VOCAB: u32 = 32;

pub fn req(id: u64, prompt: &[u32], max_tokens: usize) -> NewRequest {
    NewRequest {
        id: RequestId(id),
        prompt_token_ids: prompt.to_vec(),
        max_tokens,
        min_tokens: 0,
        stop_token_ids: vec![],
        priority: 0,
        arrival_seq: id,
        adapter: None,
        cache_salt: None,
        scores_prompt: false,
    }
}

pub fn adapter(id: u32) -> Option<AdapterKey> {
    Some(AdapterKey { id, generation: 0 })
}

/// Running digest of a token history: what the KV at one position "depends on".
pub fn digest_step(prev: u64, token: u32) -> u64 {
    splitmix(prev ^ (u64::from(token) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

pub fn digest_of(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0, |d, &t| digest_step(d, t))
}

/// The fake model: the next token is a pure function of the adapter and the token history.
pub fn next_token(adapter: Option<AdapterKey>, digest: u64) -> u32 {
    let a = adapter.map_or(0, |a| (u64::from(a.id) << 32 ^ a.generation) + 1);
    (splitmix(digest ^ a.wrapping_mul(0xbf58_476d_1ce4_e5b9)) % u64::from(VOCAB)) as u32
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What the request produces when it runs alone: outputs and finish reason, from the stop rules
/// written out independently of the scheduler.
pub fn solo_run(r: &NewRequest, max_model_len: usize) -> (Vec<u32>, FinishReason) {
    let mut tokens = r.prompt_token_ids.clone();
    let mut outputs = Vec::new();
    loop {
        let t = next_token(r.adapter, digest_of(&tokens));
        tokens.push(t);
        outputs.push(t);
        if outputs.len() >= r.min_tokens && r.stop_token_ids.contains(&t) {
            return (outputs, FinishReason::Stop);
        }
        if outputs.len() >= r.max_tokens || tokens.len() >= max_model_len {
            return (outputs, FinishReason::Length);
        }
    }
}

/// Scheduler + fake executor + the outputs seen so far, checking invariants at every step.
pub struct Driver {
    pub sched: Scheduler,
    pub exec: FakeExecutor,
    pub outputs: HashMap<RequestId, Vec<u32>>,
    pub reasons: HashMap<RequestId, FinishReason>,
    /// Hand sampled tokens back in reverse batch order (executors need not keep the order).
    pub reverse_samples: bool,
}

impl Driver {
    pub fn new(config: SchedulerConfig) -> Self {
        Driver {
            exec: FakeExecutor::new(config.num_blocks, config.block_size),
            sched: Scheduler::new(config).unwrap(),
            outputs: HashMap::new(),
            reasons: HashMap::new(),
            reverse_samples: false,
        }
    }

    pub fn add(&mut self, r: NewRequest) -> Result<(), AddRequestError> {
        self.exec.register(r.id, r.cache_salt);
        self.sched.add_request(r)
    }

    pub fn abort(&mut self, id: RequestId) -> bool {
        let done = self.sched.finish_request(id, FinishReason::Abort);
        if done {
            self.reasons.insert(id, FinishReason::Abort);
        }
        done
    }

    pub fn step(&mut self) -> Result<(SchedulerOutput, Vec<RequestUpdate>), String> {
        self.step_with(|_| {})
    }

    /// One engine step; `between` runs after execution and before `update` (aborts land there).
    pub fn step_with(
        &mut self,
        between: impl FnOnce(&mut Self),
    ) -> Result<(SchedulerOutput, Vec<RequestUpdate>), String> {
        let out = self.sched.schedule();
        invariants::check_output(&self.sched, &out)?;
        invariants::check_blocks(&self.sched)?;
        let mut step = self.exec.execute(&out)?;
        if self.reverse_samples {
            step.sampled.reverse();
        }
        between(self);
        let updates = self.sched.update(&out, &step);
        for u in &updates {
            if self.reasons.contains_key(&u.id) {
                return Err(format!("{:?}: token after finishing", u.id));
            }
            self.outputs.entry(u.id).or_default().push(u.new_token_id);
            if let Some(reason) = u.finish_reason {
                self.reasons.insert(u.id, reason);
            }
        }
        invariants::check_blocks(&self.sched)?;
        Ok((out, updates))
    }

    /// Steps until nothing is left, then reports the last finished ids; fails past `max_steps`.
    pub fn run_until_idle(&mut self, max_steps: usize) -> Result<usize, String> {
        for n in 0..max_steps {
            if !self.sched.has_unfinished() {
                self.step()?; // hands the last finished ids to the executor
                self.check_idle()?;
                return Ok(n);
            }
            self.step()?;
        }
        Err(format!("not idle after {max_steps} steps"))
    }

    pub fn check_idle(&self) -> Result<(), String> {
        let stats = self.sched.stats();
        if stats.num_free_blocks != stats.num_usable_blocks || stats.kv_usage != 0.0 {
            return Err(format!("blocks leaked: {stats:?}"));
        }
        if self.exec.num_known_requests() != 0 || self.sched.has_finished_to_report() {
            return Err("executor state not dropped".into());
        }
        Ok(())
    }
}
