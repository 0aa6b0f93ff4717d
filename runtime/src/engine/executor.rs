//! The executor: turns a [`SchedulerOutput`] into one flattened [`ForwardBatch`], has the
//! [`Backend`] run the model over its paged KV pool and sample. It mirrors each running request's tokens and block table
//! from the scheduler's diffs (new requests arrive in full once, then only new blocks), as vLLM's
//! model runner does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::lora::{segments_from_token_slots, Segment};
use caduceus_scheduler::{RequestId, ScheduledData, SchedulerOutput, StepOutput};

use super::backend::{Backend, BackendError, SlotSpec};
use super::device_slots::{DeviceSlots, SlotFill};
use super::failure::RequestFailure;
use crate::adapters::LoadedAdapter;
use crate::model::ForwardBatch;
use crate::sampling::{PromptLogprob, SampledToken, Sampler, SamplingParams};
use crate::structured::{compute_masks, RequestMatcher, TokenMask};

/// What the executor keeps for a request from admission to finish.
struct SeqState {
    sampler: Sampler,
    /// Tokens masked while fewer than `min_tokens` outputs exist (EOS and stop ids).
    masked_ids: Vec<u32>,
    min_tokens: usize,
    /// The adapter the request runs with (held for its whole life, whatever the caches do).
    adapter: Option<Arc<LoadedAdapter>>,
    /// Present while the request holds KV blocks (dropped on preemption).
    kv: Option<SeqKv>,
    /// The grammar matcher of a constrained request (survives preemption, like the sampler).
    constraint: Option<RequestMatcher>,
    /// Prompt logprobs still being computed (survives preemption: positions already scored
    /// are not scored again when the prompt is recomputed).
    scoring: Option<PromptScoring>,
}

/// A request's prompt logprobs while its prompt is computed.
struct PromptScoring {
    /// Top logprobs per position.
    top: usize,
    /// The next prompt position to score (the first token has nothing before it).
    next: usize,
    scored: Vec<PromptLogprob>,
}

struct SeqKv {
    token_ids: Vec<u32>,
    num_prompt_tokens: usize,
    block_table: Vec<u32>,
}

/// The per-request sampling settings the executor needs.
pub struct SeqSampling {
    /// Sampler settings.
    pub params: SamplingParams,
    /// Minimum outputs before a masked id may be sampled.
    pub min_tokens: usize,
    /// Ids suppressed until `min_tokens` outputs exist.
    pub masked_ids: Vec<u32>,
    /// The request's adapter, if any.
    pub adapter: Option<Arc<LoadedAdapter>>,
    /// The grammar matcher of a constrained request.
    pub constraint: Option<RequestMatcher>,
    /// `Some(n)`: score every prompt token after the first, with its `n` most likely
    /// alternatives (the scheduler must know: `NewRequest::scores_prompt`).
    pub prompt_logprobs: Option<usize>,
}

/// One executed step: the scheduler's part and the sampled details the engine streams.
#[derive(Debug, Default)]
pub struct ExecuteResult {
    /// Sampled token per request that sampled, for [`caduceus_scheduler::Scheduler::update`].
    pub step: StepOutput,
    /// The same samples with their logprobs.
    pub samples: HashMap<RequestId, SampledToken>,
    /// How each newly scheduled adapter request found its slot.
    pub slot_fills: Vec<SlotFill>,
    /// Requests that failed this step (left out of the batch, or their sample dropped); the
    /// engine finishes each with its error and the others go on.
    pub failed: Vec<(RequestId, RequestFailure)>,
    /// The prompt logprobs of requests that sampled their first token this step.
    pub prompt_logprobs: HashMap<RequestId, Vec<PromptLogprob>>,
    /// Requests that sampled a stop token before `min_tokens` because their grammar or
    /// `allowed_token_ids` allowed nothing else: the engine ends them (the scheduler would
    /// not, below `min_tokens`).
    pub ended_by_mask: Vec<RequestId>,
}

/// The scheduler and executor disagree: a programming error, which stops the engine (one
/// request's own trouble is a [`RequestFailure`] instead).
#[derive(Debug, thiserror::Error)]
#[error("executor state out of sync with the scheduler: {0}")]
pub struct ExecutorError(String);

/// Prepares each scheduled step for the backend, which owns the model and the KV pool.
pub struct Executor<B> {
    backend: B,
    block_size: usize,
    seqs: HashMap<RequestId, SeqState>,
    /// Adapter slots; `None` serves the base model only.
    lora: Option<DeviceSlots>,
    #[cfg(feature = "fault-injection")]
    faults: super::fault::Faults,
}

impl<B: Backend> Executor<B> {
    /// An executor over `backend` (its KV pool's block size is the scheduler's).
    pub fn new(backend: B) -> Self {
        Executor {
            block_size: backend.block_size(),
            backend,
            seqs: HashMap::new(),
            lora: None,
            #[cfg(feature = "fault-injection")]
            faults: Default::default(),
        }
    }

    /// Gives the executor adapter slots (requests with adapters are refused without them);
    /// returns their bytes on the backend's device.
    pub fn set_lora(&mut self, spec: SlotSpec) -> Result<usize, BackendError> {
        let num_slots = spec.num_slots;
        let bytes = self.backend.init_adapter_slots(spec)?;
        self.lora = Some(DeviceSlots::new(num_slots));
        Ok(bytes)
    }

    /// Adapters resident in the slots.
    pub fn num_resident_adapters(&self) -> usize {
        self.lora.as_ref().map_or(0, DeviceSlots::num_resident)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Registers a request's sampler when it is admitted (before it is first scheduled). The
    /// sampler survives preemption, so a seeded request draws the same numbers either way.
    pub fn add_request(&mut self, id: RequestId, s: SeqSampling) {
        let state = SeqState {
            sampler: Sampler::new(s.params),
            masked_ids: s.masked_ids,
            min_tokens: s.min_tokens,
            adapter: s.adapter,
            kv: None,
            constraint: s.constraint,
            scoring: s.prompt_logprobs.map(|top| PromptScoring {
                top,
                next: 1,
                scored: Vec::new(),
            }),
        };
        self.seqs.insert(id, state);
    }

    /// Forgets a request (finished before it was ever scheduled, or rejected).
    pub fn remove_request(&mut self, id: RequestId) {
        self.seqs.remove(&id);
    }

    /// The fault-injection seam (tests only).
    #[cfg(feature = "fault-injection")]
    pub(super) fn faults_mut(&mut self) -> &mut super::fault::Faults {
        &mut self.faults
    }

    /// Runs one scheduled step.
    pub fn execute(&mut self, sched: &SchedulerOutput) -> Result<ExecuteResult, ExecutorError> {
        for id in &sched.finished_ids {
            self.seqs.remove(id);
        }
        for id in &sched.preempted_ids {
            if let Some(s) = self.seqs.get_mut(id) {
                s.kv = None;
            }
        }
        self.apply_diffs(sched)?;
        #[cfg(feature = "fault-injection")]
        self.faults.before_step(sched);
        if sched.scheduled.is_empty() {
            return Ok(ExecuteResult::default());
        }
        let (token_slots, slot_fills, mut failed) = self.assign_slots(sched)?;
        let batch = self.build_batch(sched, &token_slots, &failed)?;
        if batch.token_ids.is_empty() {
            return Ok(ExecuteResult {
                slot_fills,
                failed,
                ..ExecuteResult::default()
            });
        }
        let segments: Vec<Segment> = if batch.token_slots.iter().any(Option::is_some) {
            segments_from_token_slots(&batch.token_slots)
        } else {
            Vec::new()
        };
        let mut matchers = self.take_matchers(&batch.samplers);
        let seqs: Vec<SeqAttention<'_>> = batch
            .seqs
            .iter()
            .map(|s| SeqAttention {
                query_start: s.query_start,
                query_len: s.query_len,
                context_len: s.context_len,
                block_table: self.seqs[&s.id]
                    .kv
                    .as_ref()
                    .map_or(&[][..], |k| k.block_table.as_slice()),
            })
            .collect();
        let forward = ForwardBatch {
            token_ids: &batch.token_ids,
            positions: &batch.positions,
            slot_mapping: &batch.slot_mapping,
            seqs: &seqs,
            logits_indices: &batch.logits_indices,
        };
        forward.check().map_err(ExecutorError)?;
        // The grammar masks of this step's constrained rows are computed while the model runs
        // (a matcher only needs the tokens committed so far); unconstrained batches pay nothing.
        let backend = &mut self.backend;
        let (forwarded, masks) = rayon::join(
            || backend.forward(&forward, &segments),
            || {
                let items = matchers.iter_mut().map(|(id, m)| (*id, m)).collect();
                compute_masks(items).into_iter().collect::<HashMap<_, _>>()
            },
        );
        drop(seqs);
        self.put_back_matchers(matchers);
        forwarded.map_err(|e| ExecutorError(e.to_string()))?;
        #[cfg(feature = "fault-injection")]
        for row in self.faults.poisoned_rows(&batch.samplers) {
            self.backend
                .poison_logits_row(row)
                .map_err(|e| ExecutorError(e.to_string()))?;
        }
        self.score(&batch)?;
        let mut result = self.sample(&batch.samplers, masks)?;
        result.slot_fills = slot_fills;
        failed.append(&mut result.failed);
        result.failed = failed;
        Ok(result)
    }

    /// The slot of each scheduled request's adapter, filling slots for newly scheduled ones.
    /// Slots used by any request holding KV (i.e. running) are never reassigned; the scheduler's
    /// `max_loras` (equal to the slot count) guarantees one is free for every new adapter. A
    /// request whose adapter cannot be placed fails alone (its slot is left empty, the batch goes
    /// on without it).
    fn assign_slots(&mut self, sched: &SchedulerOutput) -> Result<SlotAssignment, ExecutorError> {
        let mut slots = HashMap::new();
        let mut fills = Vec::new();
        let mut failed = Vec::new();
        let scheduled_with_adapter = sched.scheduled.iter().filter_map(|r| {
            let a = self.seqs.get(&r.id)?.adapter.clone()?;
            Some((r.id, a, matches!(r.data, ScheduledData::New { .. })))
        });
        let wanted: Vec<_> = scheduled_with_adapter.collect();
        if wanted.is_empty() {
            return Ok((slots, fills, failed));
        }
        let pinned: HashSet<_> = self
            .seqs
            .values()
            .filter(|s| s.kv.is_some())
            .filter_map(|s| s.adapter.as_ref().map(|a| a.key))
            .collect();
        let device = self.lora.as_mut().ok_or_else(|| {
            ExecutorError("a request with an adapter reached an executor without slots".into())
        })?;
        let backend = &mut self.backend;
        for (id, adapter, is_new) in wanted {
            #[cfg(feature = "fault-injection")]
            if self.faults.fails_slot(id) {
                let injected = "injected fault".to_string();
                failed.push((id, RequestFailure::AdapterSlot(injected)));
                continue;
            }
            let load = |slot| backend.load_adapter(slot, &adapter);
            match device.acquire(&adapter, &pinned, load) {
                Ok((slot, fill)) => {
                    if is_new {
                        fills.push(fill);
                    }
                    slots.insert(id, slot);
                }
                Err(e) => failed.push((id, RequestFailure::AdapterSlot(e.to_string()))),
            }
        }
        Ok((slots, fills, failed))
    }

    fn apply_diffs(&mut self, sched: &SchedulerOutput) -> Result<(), ExecutorError> {
        for r in &sched.scheduled {
            let state = self
                .seqs
                .get_mut(&r.id)
                .ok_or_else(|| ExecutorError(format!("unknown request {:?}", r.id)))?;
            match &r.data {
                ScheduledData::New {
                    token_ids,
                    num_prompt_tokens,
                    block_ids,
                    ..
                } => {
                    state.kv = Some(SeqKv {
                        token_ids: token_ids.clone(),
                        num_prompt_tokens: *num_prompt_tokens,
                        block_table: block_ids.iter().map(|b| b.0).collect(),
                    });
                }
                ScheduledData::Cached { new_block_ids } => {
                    let kv = state.kv.as_mut().ok_or_else(|| {
                        ExecutorError(format!("request {:?} resumed without its data", r.id))
                    })?;
                    kv.block_table.extend(new_block_ids.iter().map(|b| b.0));
                }
            }
        }
        Ok(())
    }

    /// The flattened batch of every scheduled request except the `failed` ones.
    fn build_batch(
        &self,
        sched: &SchedulerOutput,
        token_slots: &HashMap<RequestId, u32>,
        failed: &[(RequestId, RequestFailure)],
    ) -> Result<BatchPlan, ExecutorError> {
        let bs = self.block_size;
        let mut plan = BatchPlan::with_capacity(sched.total_num_scheduled_tokens);
        // Requests on the same adapter sit next to each other, so their tokens form one segment
        // (one read of the adapter's weights); the order changes no sequence's result.
        let mut order: Vec<_> = sched
            .scheduled
            .iter()
            .filter(|r| failed.iter().all(|(id, _)| *id != r.id))
            .collect();
        order.sort_by_key(|r| token_slots.get(&r.id).copied());
        for r in order {
            let slot = token_slots.get(&r.id).copied();
            let state = &self.seqs[&r.id];
            let kv = state.kv.as_ref().ok_or_else(|| {
                ExecutorError(format!("request {:?} scheduled without data", r.id))
            })?;
            let (start, n) = (r.num_computed_tokens, r.num_scheduled_tokens);
            if n == 0
                || start + n > kv.token_ids.len()
                || (start + n).div_ceil(bs) > kv.block_table.len()
            {
                return Err(ExecutorError(format!(
                    "request {:?}: {n} tokens at {start} do not fit {} tokens in {} blocks",
                    r.id,
                    kv.token_ids.len(),
                    kv.block_table.len()
                )));
            }
            plan.seqs.push(PlannedSeq {
                id: r.id,
                query_start: plan.token_ids.len(),
                query_len: n,
                context_len: start + n,
            });
            for pos in start..start + n {
                plan.token_slots.push(slot);
                plan.token_ids.push(kv.token_ids[pos]);
                plan.positions.push(pos as u32);
                plan.slot_mapping
                    .push(kv.block_table[pos / bs] * bs as u32 + (pos % bs) as u32);
            }
            if start + n == kv.token_ids.len() {
                plan.logits_indices.push(plan.token_ids.len() - 1);
                plan.samplers.push(r.id);
            }
            if let Some(sc) = &state.scoring {
                // Position `pos`'s logits predict token `pos + 1`.
                let first = (start + 1).max(sc.next);
                let query_start = plan.token_ids.len() - n;
                for target in first..(start + n + 1).min(kv.num_prompt_tokens) {
                    plan.scored.push(ScoredRow {
                        id: r.id,
                        flat: query_start + target - 1 - start,
                        target,
                        token: kv.token_ids[target],
                        top: sc.top,
                    });
                }
            }
        }
        // Scored rows follow the sampled ones.
        plan.logits_indices
            .extend(plan.scored.iter().map(|row| row.flat));
        Ok(plan)
    }

    /// Scores this step's prompt positions (the logits rows after the sampled ones).
    fn score(&mut self, batch: &BatchPlan) -> Result<(), ExecutorError> {
        if batch.scored.is_empty() {
            return Ok(());
        }
        let targets: Vec<(u32, usize)> = batch.scored.iter().map(|r| (r.token, r.top)).collect();
        let scores = self
            .backend
            .score(batch.samplers.len(), &targets)
            .map_err(|e| ExecutorError(e.to_string()))?;
        for (row, score) in batch.scored.iter().zip(scores) {
            if let Some(sc) = self.seqs.get_mut(&row.id).and_then(|s| s.scoring.as_mut()) {
                sc.scored.push(score);
                sc.next = row.target + 1;
            }
        }
        Ok(())
    }

    /// Samples the rows of `ids` (in logits-row order) on the backend and appends the tokens.
    fn sample(
        &mut self,
        ids: &[RequestId],
        mut grammar_masks: HashMap<RequestId, TokenMask>,
    ) -> Result<ExecuteResult, ExecutorError> {
        let vocab = self.backend.config().vocab_size;
        let mut rows = Vec::with_capacity(ids.len());
        for id in ids {
            let state = self
                .seqs
                .get_mut(id)
                .ok_or_else(|| ExecutorError(format!("sampling unknown request {id:?}")))?;
            let kv = state
                .kv
                .as_ref()
                .ok_or_else(|| ExecutorError(format!("sampling request {id:?} without data")))?;
            let (prompt, output) = kv.token_ids.split_at(kv.num_prompt_tokens);
            let banned = if output.len() < state.min_tokens {
                &state.masked_ids[..]
            } else {
                &[]
            };
            let mut row = state.sampler.row_sample(prompt, output, vocab, banned);
            // A grammar's mask replaces `allowed_token_ids`' (the server refuses both at once).
            if let Some(mask) = grammar_masks.remove(id) {
                row.allowed = Some(mask);
            }
            // A mask outranks the bans (`min_tokens`, `bad_words`): were every token it allows
            // banned, the bans are lifted, so the answer keeps to its grammar (or ends).
            // (Only rows with bans: counting a mask's tokens reads all of its words.)
            if !row.banned.is_empty()
                && row
                    .allowed
                    .as_ref()
                    .is_some_and(|m| m.allows_only(&row.banned))
            {
                row.banned.clear();
            }
            rows.push(row);
        }
        let sampled = self
            .backend
            .sample(&rows)
            .map_err(|e| ExecutorError(e.to_string()))?;
        let mut result = ExecuteResult::default();
        for (id, sampled) in ids.iter().zip(sampled) {
            // A row the backend found NaN or inf in fails its request, not the batch.
            let sampled = match sampled {
                Ok(s) => s,
                Err(failure) => {
                    result.failed.push((*id, failure));
                    continue;
                }
            };
            if let Some(state) = self.seqs.get_mut(id) {
                if let Some(m) = state.constraint.as_mut() {
                    m.commit(sampled.token_id);
                }
                if let Some(kv) = state.kv.as_mut() {
                    // Only a lifted ban lets a masked id through before `min_tokens`.
                    let outputs = kv.token_ids.len() - kv.num_prompt_tokens;
                    if outputs < state.min_tokens && state.masked_ids.contains(&sampled.token_id) {
                        result.ended_by_mask.push(*id);
                    }
                    kv.token_ids.push(sampled.token_id);
                }
                // A request samples once its prompt is complete: its prompt logprobs go out.
                if let Some(sc) = state.scoring.take() {
                    result.prompt_logprobs.insert(*id, sc.scored);
                }
            }
            result.step.sampled.push((*id, sampled.token_id));
            result.samples.insert(*id, sampled);
        }
        Ok(result)
    }
}

impl<B> Executor<B> {
    /// Moves the matchers of the constrained requests among `ids` out of their states (none,
    /// at no cost, when no running request is constrained), so their masks can be computed
    /// while the forward pass reads the states' block tables.
    fn take_matchers(&mut self, ids: &[RequestId]) -> Vec<(RequestId, RequestMatcher)> {
        if !self.seqs.values().any(|s| s.constraint.is_some()) {
            return Vec::new();
        }
        ids.iter()
            .filter_map(|id| Some((*id, self.seqs.get_mut(id)?.constraint.take()?)))
            .collect()
    }

    /// Returns matchers taken by [`Self::take_matchers`] to their requests.
    fn put_back_matchers(&mut self, matchers: Vec<(RequestId, RequestMatcher)>) {
        for (id, m) in matchers {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.constraint = Some(m);
            }
        }
    }
}

/// Each scheduled adapter request's slot, how newly scheduled ones found theirs, and the
/// requests whose adapter could not be placed.
type SlotAssignment = (
    HashMap<RequestId, u32>,
    Vec<SlotFill>,
    Vec<(RequestId, RequestFailure)>,
);

/// The flattened batch before it borrows the block tables.
struct BatchPlan {
    token_ids: Vec<u32>,
    token_slots: Vec<Option<u32>>,
    positions: Vec<u32>,
    slot_mapping: Vec<u32>,
    seqs: Vec<PlannedSeq>,
    logits_indices: Vec<usize>,
    samplers: Vec<RequestId>,
    /// Prompt positions whose logits are scored, in logits-row order after `samplers`.
    scored: Vec<ScoredRow>,
}

/// One scored prompt position: the logits of flattened row `flat` against prompt token
/// `target` (`token`), with `top` alternatives.
struct ScoredRow {
    id: RequestId,
    flat: usize,
    target: usize,
    token: u32,
    top: usize,
}

struct PlannedSeq {
    id: RequestId,
    query_start: usize,
    query_len: usize,
    context_len: usize,
}

impl BatchPlan {
    fn with_capacity(n: usize) -> Self {
        BatchPlan {
            token_ids: Vec::with_capacity(n),
            token_slots: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            slot_mapping: Vec::with_capacity(n),
            seqs: Vec::new(),
            logits_indices: Vec::new(),
            samplers: Vec::new(),
            scored: Vec::new(),
        }
    }
}
