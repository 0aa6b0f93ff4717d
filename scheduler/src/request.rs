//! Request state: what the engine submits (`NewRequest`) and what the scheduler tracks
//! (`Request`: tokens so far, progress, block table, block hashes).

use crate::block_hash::{extend_block_hashes, BlockHash, ExtraKeys};
use crate::ids::{AdapterKey, BlockId, RequestId};
use thiserror::Error;

/// A request as the engine hands it over, already tokenized and validated for sampling.
#[derive(Clone, Debug)]
pub struct NewRequest {
    pub id: RequestId,
    pub prompt_token_ids: Vec<u32>,
    pub max_tokens: usize,
    /// Stop tokens sampled before this many outputs do not finish the request.
    pub min_tokens: usize,
    /// EOS ids plus extra stop ids; the engine passes `[]` for `ignore_eos`.
    pub stop_token_ids: Vec<u32>,
    /// Lower value is served first (vLLM convention).
    pub priority: i32,
    /// Arrival order; ties in priority go to the earlier arrival.
    pub arrival_seq: u64,
    pub adapter: Option<AdapterKey>,
    /// Extra prefix-cache key: requests with different salts never share KV (tenant isolation).
    pub cache_salt: Option<u64>,
    /// The backend keeps the logits of every prompt position (prompt logprobs): the prompt is
    /// computed in full, never taken from the prefix cache, in chunks within
    /// [`Scheduler::set_max_scored_tokens`](crate::Scheduler::set_max_scored_tokens).
    pub scores_prompt: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// A stop token (once `min_tokens` outputs exist), or a stop string the engine matched.
    Stop,
    /// `max_tokens` outputs, or prompt + outputs reached `max_model_len`.
    Length,
    /// The client went away.
    Abort,
    /// The engine failed the request.
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Waiting,
    Running,
    /// Waiting again after its blocks were taken back; resumes by recomputing (or re-hitting) its KV.
    Preempted,
    Finished(FinishReason),
}

/// Why `add_request` refused a request; each variant carries the limit it broke.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AddRequestError {
    #[error("request {} is already known to the scheduler", .0.0)]
    DuplicateId(RequestId),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error(
        "the model's maximum context length is {max_model_len} tokens, but {prompt_tokens} prompt \
         tokens plus max_tokens {max_tokens} were requested"
    )]
    TooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    #[error(
        "the request needs {needed_blocks} KV blocks at full length but the pool has only \
         {usable_blocks} usable blocks"
    )]
    ExceedsKvPool {
        needed_blocks: usize,
        usable_blocks: usize,
    },
    #[error("this backend does not keep the logits of prompt positions (prompt logprobs)")]
    ScoringUnavailable,
}

/// The scheduler's record of one live request. Read-only outside the crate: the scheduler and
/// the KV cache manager keep its token count, progress and block table consistent.
#[derive(Clone, Debug)]
pub struct Request {
    pub(crate) id: RequestId,
    /// Prompt followed by the outputs sampled so far.
    pub(crate) token_ids: Vec<u32>,
    pub(crate) num_prompt_tokens: usize,
    pub(crate) max_tokens: usize,
    pub(crate) min_tokens: usize,
    stop_token_ids: StopTokenIds,
    pub(crate) priority: i32,
    pub(crate) arrival_seq: u64,
    pub(crate) extra: ExtraKeys,
    pub(crate) status: RequestStatus,
    /// Tokens whose KV is in the cache.
    pub(crate) num_computed_tokens: usize,
    pub(crate) block_table: Vec<BlockId>,
    /// Leading blocks of `block_table` already registered in the prefix cache.
    pub(crate) num_cached_blocks: usize,
    /// Chain hashes of every full block of `token_ids` (empty when caching is off).
    pub(crate) block_hashes: Vec<BlockHash>,
    block_size: usize,
    /// `Some(seed)` when prefix caching is on.
    hash_seed: Option<u64>,
    /// Steps this request was passed over because of `max_loras`.
    pub(crate) num_adapter_skips: u32,
    /// Its prompt positions' logits are kept (see `NewRequest::scores_prompt`).
    pub(crate) scores_prompt: bool,
}

impl Request {
    /// Builds the record and hashes the prompt's full blocks when `hash_seed` is given.
    pub fn new(req: NewRequest, block_size: usize, hash_seed: Option<u64>) -> Self {
        let mut request = Request {
            id: req.id,
            num_prompt_tokens: req.prompt_token_ids.len(),
            token_ids: req.prompt_token_ids,
            max_tokens: req.max_tokens,
            min_tokens: req.min_tokens,
            stop_token_ids: StopTokenIds::new(req.stop_token_ids),
            priority: req.priority,
            arrival_seq: req.arrival_seq,
            extra: ExtraKeys {
                adapter: req.adapter,
                cache_salt: req.cache_salt,
            },
            status: RequestStatus::Waiting,
            num_computed_tokens: 0,
            block_table: Vec::new(),
            num_cached_blocks: 0,
            block_hashes: Vec::new(),
            block_size: block_size.max(1),
            hash_seed,
            num_adapter_skips: 0,
            scores_prompt: req.scores_prompt,
        };
        request.update_block_hashes();
        request
    }

    /// Appends a sampled token (hashing the block it completes).
    pub(crate) fn append_output_token(&mut self, token: u32) {
        self.token_ids.push(token);
        if self.hash_seed.is_some()
            && self.token_ids.len() >= (self.block_hashes.len() + 1) * self.block_size
        {
            self.update_block_hashes();
        }
    }

    fn update_block_hashes(&mut self) {
        if let Some(seed) = self.hash_seed {
            let tokens = &self.token_ids;
            extend_block_hashes(
                seed,
                self.block_size,
                tokens,
                &self.extra,
                &mut self.block_hashes,
            );
        }
    }

    /// Why the request is done after its latest token, if it is. A stop token wins over a length
    /// limit reached by the same token (the model did choose to stop).
    pub(crate) fn check_stop(&self, max_model_len: usize) -> Option<FinishReason> {
        let &last = self.token_ids.last()?;
        let num_outputs = self.num_output_tokens();
        if num_outputs >= self.min_tokens && self.stop_token_ids.contains(last) {
            return Some(FinishReason::Stop);
        }
        if num_outputs >= self.max_tokens || self.num_tokens() >= max_model_len {
            return Some(FinishReason::Length);
        }
        None
    }

    pub fn id(&self) -> RequestId {
        self.id
    }
    pub fn status(&self) -> RequestStatus {
        self.status
    }
    /// Prompt followed by the outputs so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
    pub fn num_prompt_tokens(&self) -> usize {
        self.num_prompt_tokens
    }
    pub fn output_token_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }
    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }
    pub fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }
    pub fn block_table(&self) -> &[BlockId] {
        &self.block_table
    }
    pub fn block_hashes(&self) -> &[BlockHash] {
        &self.block_hashes
    }
    pub fn priority(&self) -> i32 {
        self.priority
    }
    pub fn arrival_seq(&self) -> u64 {
        self.arrival_seq
    }
    pub fn adapter(&self) -> Option<AdapterKey> {
        self.extra.adapter
    }
    pub fn cache_salt(&self) -> Option<u64> {
        self.extra.cache_salt
    }
    /// The non-token part of this request's block keys.
    pub fn extra_keys(&self) -> ExtraKeys {
        self.extra
    }
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
    /// Whether the backend keeps its prompt positions' logits.
    pub fn scores_prompt(&self) -> bool {
        self.scores_prompt
    }
    pub fn stop_token_ids(&self) -> &[u32] {
        self.stop_token_ids.as_slice()
    }
}

/// Stop ids, inline when there are few (EOS plus a couple of extras is the norm) so the
/// per-token stop check does not chase a pointer for every request in every step.
#[derive(Clone, Debug)]
enum StopTokenIds {
    Inline { len: u8, ids: [u32; 4] },
    Heap(Box<[u32]>),
}

impl StopTokenIds {
    fn new(ids: Vec<u32>) -> Self {
        if ids.len() <= 4 {
            let mut inline = [0u32; 4];
            inline[..ids.len()].copy_from_slice(&ids);
            StopTokenIds::Inline {
                len: ids.len() as u8,
                ids: inline,
            }
        } else {
            StopTokenIds::Heap(ids.into_boxed_slice())
        }
    }

    fn as_slice(&self) -> &[u32] {
        match self {
            StopTokenIds::Inline { len, ids } => &ids[..usize::from(*len)],
            StopTokenIds::Heap(ids) => ids,
        }
    }

    fn contains(&self, token: u32) -> bool {
        self.as_slice().contains(&token)
    }
}
