//! How many tokens a request computes in one step: what it still wants, within the step's token
//! budget and two per-step allowances:
//! - under VTC, a backlogged adapter's prefill shares `backlog_prefill_percent` of the budget
//!   (see `backlog.rs`);
//! - a request that asked for its prompt's logprobs (`NewRequest::scores_prompt`) keeps the
//!   logits of every prompt position it computes, a vocabulary-sized row each, so its prefill
//!   chunks share the backend's rows for them ([`Scheduler::set_max_scored_tokens`]).

use crate::backlog::backlog_besides;
use crate::fairness::VirtualCounters;
use crate::request::Request;
use crate::scheduler::Scheduler;

/// What is left of one step's allowances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Allowances {
    /// Prefill tokens backlogged adapters may still take (`usize::MAX`: unlimited).
    pub backlog_prefill: usize,
    /// Prompt tokens whose logits may still be kept.
    pub scored_prompt: usize,
}

impl Allowances {
    /// Nothing limited (before the first step).
    pub const UNLIMITED: Allowances = Allowances {
        backlog_prefill: usize::MAX,
        scored_prompt: usize::MAX,
    };
}

/// A chunk a request may compute this step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// Tokens, 0 when none may be computed this step.
    pub len: usize,
    /// It is a backlogged adapter's prefill: it spends the backlog's allowance.
    pub backlog: bool,
    /// It computes prompt positions whose logits are kept: it spends the scoring allowance.
    pub scored: bool,
}

/// The chunk of `wanted` tokens `r` may compute within `token_budget` and `left`.
pub(crate) fn chunk_for(
    vtc: Option<&VirtualCounters>,
    left: Allowances,
    r: &Request,
    wanted: usize,
    token_budget: usize,
) -> Chunk {
    let mut len = wanted.min(token_budget);
    let backlog = wanted > 1 && vtc.is_some_and(|v| backlog_besides(v, r));
    if backlog {
        len = len.min(left.backlog_prefill);
    }
    // The positions before the prompt's last one are scored; the last is sampled as usual.
    let scored = r.scores_prompt && r.num_computed_tokens + 1 < r.num_prompt_tokens;
    if scored {
        len = len.min(left.scored_prompt);
    }
    Chunk {
        len,
        backlog,
        scored,
    }
}

impl Scheduler {
    /// Records that `chunk` was scheduled: it leaves the step's token budget and the allowances
    /// it draws on.
    pub(crate) fn spend(&mut self, chunk: Chunk, token_budget: &mut usize) {
        *token_budget -= chunk.len;
        let left = &mut self.allowances;
        if chunk.backlog {
            left.backlog_prefill = left.backlog_prefill.saturating_sub(chunk.len);
        }
        if chunk.scored {
            left.scored_prompt = left.scored_prompt.saturating_sub(chunk.len);
        }
    }
}
