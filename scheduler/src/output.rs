//! The data contracts between the scheduler and the executor: what one step computes
//! (`SchedulerOutput`) and what it sampled (`StepOutput`). New requests travel in full once;
//! after that only diffs (new block ids) cross the boundary.

use crate::ids::{AdapterKey, BlockId, RequestId};
use crate::request::FinishReason;

#[derive(Clone, Debug, Default)]
pub struct SchedulerOutput {
    pub step: u64,
    /// Batch order: running requests first, then newly admitted or resumed ones.
    pub scheduled: Vec<ScheduledRequest>,
    pub total_num_scheduled_tokens: usize,
    /// Preempted during this `schedule()`; the executor drops their state.
    pub preempted_ids: Vec<RequestId>,
    /// Finished since the previous `schedule()` (stops seen in `update`, `finish_request`);
    /// the executor drops their state.
    pub finished_ids: Vec<RequestId>,
}

#[derive(Clone, Debug)]
pub struct ScheduledRequest {
    pub id: RequestId,
    /// Tokens already in the KV cache before this step.
    pub num_computed_tokens: usize,
    /// This step computes positions `num_computed_tokens .. num_computed_tokens + num_scheduled_tokens`.
    pub num_scheduled_tokens: usize,
    pub data: ScheduledData,
}

impl ScheduledRequest {
    /// Shortens this step's chunk by up to `by` tokens, keeping at least one (the request keeps
    /// its blocks, so the tokens given up are computed in a later step); returns how many it
    /// gave up, for the step's token budget.
    pub(crate) fn shorten(&mut self, by: usize) -> usize {
        let give = by.min(self.num_scheduled_tokens.saturating_sub(1));
        self.num_scheduled_tokens -= give;
        give
    }
}

#[derive(Clone, Debug)]
pub enum ScheduledData {
    /// First schedule, or resumed after preemption: everything the executor needs
    /// (`token_ids` = prompt + outputs so far).
    New {
        token_ids: Vec<u32>,
        num_prompt_tokens: usize,
        block_ids: Vec<BlockId>,
        adapter: Option<AdapterKey>,
    },
    /// Already known to the executor: blocks to append to its block table.
    Cached { new_block_ids: Vec<BlockId> },
}

/// The executor's answer: one entry for every scheduled request whose
/// `num_computed_tokens + num_scheduled_tokens` reaches the end of its known tokens.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub sampled: Vec<(RequestId, u32)>,
}

/// One accepted sampled token, and whether it finished its request.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestUpdate {
    pub id: RequestId,
    pub new_token_id: u32,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerStats {
    pub num_waiting: usize,
    pub num_running: usize,
    /// Used / usable blocks, in `0..=1` (free cached blocks count as free).
    pub kv_usage: f32,
    pub num_free_blocks: usize,
    pub num_usable_blocks: usize,
    /// Tokens looked up in the prefix cache (prompt plus outputs of resumed requests).
    pub prefix_cache_queries: u64,
    /// Tokens found in the prefix cache.
    pub prefix_cache_hits: u64,
    /// Cumulative preemptions.
    pub num_preemptions: u64,
}
