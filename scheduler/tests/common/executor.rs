//! A fake executor with a simulated paged KV cache. Every position it computes is written into
//! the slot its block table names, tagged with everything the KV depends on (adapter, salt,
//! position, token, digest of the history). Attention "reads" every earlier position through the
//! block table and fails on any mismatch, so a wrong prefix hit, a block shared by mistake or a
//! block reused while still needed is caught where it would corrupt a real model's output. The
//! sampled token is computed from what was read, so outputs can be compared with a solo run.

use super::{digest_step, next_token};
use caduceus_scheduler::{
    AdapterKey, BlockId, RequestId, ScheduledData, SchedulerOutput, StepOutput,
};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq)]
struct Slot {
    adapter: Option<AdapterKey>,
    salt: Option<u64>,
    pos: usize,
    token: u32,
    digest: u64,
}

struct ExecRequest {
    tokens: Vec<u32>,
    block_table: Vec<BlockId>,
    adapter: Option<AdapterKey>,
    salt: Option<u64>,
}

pub struct FakeExecutor {
    block_size: usize,
    slots: Vec<Vec<Option<Slot>>>,
    requests: HashMap<RequestId, ExecRequest>,
    salts: HashMap<RequestId, Option<u64>>,
}

impl FakeExecutor {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        FakeExecutor {
            block_size,
            slots: vec![vec![None; block_size]; num_blocks],
            requests: HashMap::new(),
            salts: HashMap::new(),
        }
    }

    /// The salt is not part of the executor contract; the harness tells the fake what it is so
    /// the slots can be tagged with it.
    pub fn register(&mut self, id: RequestId, salt: Option<u64>) {
        self.salts.insert(id, salt);
    }

    pub fn num_known_requests(&self) -> usize {
        self.requests.len()
    }

    pub fn execute(&mut self, out: &SchedulerOutput) -> Result<StepOutput, String> {
        for id in out.finished_ids.iter().chain(&out.preempted_ids) {
            self.requests.remove(id);
        }
        let mut writers: HashMap<BlockId, RequestId> = HashMap::new();
        let mut sampled = Vec::new();
        for s in &out.scheduled {
            match &s.data {
                ScheduledData::New {
                    token_ids,
                    block_ids,
                    adapter,
                    ..
                } => {
                    if self.requests.contains_key(&s.id) {
                        return Err(format!("{:?}: New for a request the executor holds", s.id));
                    }
                    let salt = self.salts.get(&s.id).copied().flatten();
                    let r = ExecRequest {
                        tokens: token_ids.clone(),
                        block_table: block_ids.clone(),
                        adapter: *adapter,
                        salt,
                    };
                    self.requests.insert(s.id, r);
                }
                ScheduledData::Cached { new_block_ids } => {
                    let r = self
                        .requests
                        .get_mut(&s.id)
                        .ok_or(format!("{:?}: Cached for an unknown request", s.id))?;
                    r.block_table.extend_from_slice(new_block_ids);
                }
            }
            let bs = self.block_size;
            let r = &self.requests[&s.id];
            let end = s.num_computed_tokens + s.num_scheduled_tokens;
            if s.num_scheduled_tokens == 0 || end > r.tokens.len() {
                return Err(format!(
                    "{:?}: bad range {}..{end}",
                    s.id, s.num_computed_tokens
                ));
            }
            // Attention reads every position before the new ones.
            let mut digest = 0;
            for pos in 0..s.num_computed_tokens {
                digest = digest_step(digest, r.tokens[pos]);
                let block = *r.block_table.get(pos / bs).ok_or("block table too short")?;
                let expect = Slot {
                    adapter: r.adapter,
                    salt: r.salt,
                    pos,
                    token: r.tokens[pos],
                    digest,
                };
                let got = self.slots[block.index()][pos % bs];
                if got != Some(expect) {
                    return Err(format!(
                        "{:?} reads {block:?}[{}]: {got:?}, expected {expect:?}",
                        s.id,
                        pos % bs
                    ));
                }
            }
            for pos in s.num_computed_tokens..end {
                digest = digest_step(digest, r.tokens[pos]);
                let block = *r.block_table.get(pos / bs).ok_or("block table too short")?;
                if block == BlockId::NULL {
                    return Err(format!("{:?} writes the null block", s.id));
                }
                if let Some(other) = writers.insert(block, s.id) {
                    if other != s.id {
                        return Err(format!("{block:?} written by {other:?} and {:?}", s.id));
                    }
                }
                self.slots[block.index()][pos % bs] = Some(Slot {
                    adapter: r.adapter,
                    salt: r.salt,
                    pos,
                    token: r.tokens[pos],
                    digest,
                });
            }
            if end == r.tokens.len() {
                let token = next_token(r.adapter, digest);
                sampled.push((s.id, token));
                if let Some(r) = self.requests.get_mut(&s.id) {
                    r.tokens.push(token);
                }
            }
        }
        Ok(StepOutput { sampled })
    }
}
