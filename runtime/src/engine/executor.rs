//! The executor: turns a [`SchedulerOutput`] into one flattened [`ForwardBatch`], runs the model
//! over the paged KV cache and samples. It mirrors each running request's tokens and block table
//! from the scheduler's diffs (new requests arrive in full once, then only new blocks), as vLLM's
//! model runner does.

use std::collections::{HashMap, HashSet};
use std::ops::Deref;
use std::sync::Arc;

use caduceus_kernels::attention::SeqAttention;
use caduceus_kernels::lora::{segments_from_token_slots, Segment};
use caduceus_scheduler::{RequestId, ScheduledData, SchedulerOutput, StepOutput};

use super::device_slots::{DeviceSlots, SlotFill};
use crate::adapters::LoadedAdapter;
use crate::kv_cache::KvCache;
use crate::model::{ForwardBatch, LlamaModel, LoraBatch, LoraStack};
use crate::sampling::{SampledToken, Sampler, SamplingParams};
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
}

/// The scheduler and executor disagree: a programming error, which stops the engine.
#[derive(Debug, thiserror::Error)]
#[error("executor state out of sync with the scheduler: {0}")]
pub struct ExecutorError(String);

/// Owns the KV cache pool and runs the model for each scheduled step.
pub struct Executor<M> {
    model: M,
    kv: KvCache,
    block_size: usize,
    seqs: HashMap<RequestId, SeqState>,
    /// Adapter slots; `None` serves the base model only.
    lora: Option<DeviceSlots>,
}

impl<M: Deref<Target = LlamaModel>> Executor<M> {
    /// An executor with a pool of `num_blocks` blocks of `block_size` tokens.
    pub fn new(model: M, num_blocks: usize, block_size: usize) -> Self {
        let kv = KvCache::new(
            model.config().num_layers,
            model.kv_cache_shape(num_blocks, block_size),
        );
        Executor {
            model,
            kv,
            block_size,
            seqs: HashMap::new(),
            lora: None,
        }
    }

    /// Gives the executor adapter slots (requests with adapters are refused without them).
    pub fn set_lora(&mut self, stack: LoraStack) {
        self.lora = Some(DeviceSlots::new(stack));
    }

    /// Adapters resident in the slots.
    pub fn num_resident_adapters(&self) -> usize {
        self.lora.as_ref().map_or(0, DeviceSlots::num_resident)
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel {
        &self.model
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
        };
        self.seqs.insert(id, state);
    }

    /// Forgets a request (finished before it was ever scheduled, or rejected).
    pub fn remove_request(&mut self, id: RequestId) {
        self.seqs.remove(&id);
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
        if sched.scheduled.is_empty() {
            return Ok(ExecuteResult::default());
        }
        let (token_slots, slot_fills) = self.assign_slots(sched)?;
        let batch = self.build_batch(sched, &token_slots)?;
        let segments: Vec<Segment> = if batch.token_slots.iter().any(Option::is_some) {
            segments_from_token_slots(&batch.token_slots)
        } else {
            Vec::new()
        };
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
        let lora = match &self.lora {
            Some(slots) if !segments.is_empty() => Some(LoraBatch {
                stack: slots.stack(),
                segments: &segments,
            }),
            _ => None,
        };
        let logits = self
            .model
            .forward_with_lora(&forward, &mut self.kv, lora.as_ref())
            .map_err(|e| ExecutorError(format!("LoRA: {e}")))?;
        drop(seqs);
        let mut result = self.sample(&batch.samplers, &logits);
        result.slot_fills = slot_fills;
        Ok(result)
    }

    /// The slot of each scheduled request's adapter, filling slots for newly scheduled ones.
    /// Slots used by any request holding KV (i.e. running) are never reassigned; the scheduler's
    /// `max_loras` (equal to the slot count) guarantees one is free for every new adapter.
    fn assign_slots(&mut self, sched: &SchedulerOutput) -> Result<SlotAssignment, ExecutorError> {
        let mut slots = HashMap::new();
        let mut fills = Vec::new();
        let scheduled_with_adapter = sched.scheduled.iter().filter_map(|r| {
            let a = self.seqs.get(&r.id)?.adapter.clone()?;
            Some((r.id, a, matches!(r.data, ScheduledData::New { .. })))
        });
        let wanted: Vec<_> = scheduled_with_adapter.collect();
        if wanted.is_empty() {
            return Ok((slots, fills));
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
        for (id, adapter, is_new) in wanted {
            let (slot, fill) = device
                .acquire(&adapter, &pinned)
                .map_err(|e| ExecutorError(e.to_string()))?;
            if is_new {
                fills.push(fill);
            }
            slots.insert(id, slot);
        }
        Ok((slots, fills))
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

    fn build_batch(
        &self,
        sched: &SchedulerOutput,
        token_slots: &HashMap<RequestId, u32>,
    ) -> Result<BatchPlan, ExecutorError> {
        let bs = self.block_size;
        let mut plan = BatchPlan::with_capacity(sched.total_num_scheduled_tokens);
        // Requests on the same adapter sit next to each other, so their tokens form one segment
        // (one read of the adapter's weights); the order changes no sequence's result.
        let mut order: Vec<_> = sched.scheduled.iter().collect();
        order.sort_by_key(|r| token_slots.get(&r.id).copied());
        for r in order {
            let slot = token_slots.get(&r.id).copied();
            let kv = self.seqs[&r.id].kv.as_ref().ok_or_else(|| {
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
        }
        Ok(plan)
    }

    fn sample(&mut self, ids: &[RequestId], logits: &[f32]) -> ExecuteResult {
        let vocab = self.model.config().vocab_size;
        let mut result = ExecuteResult::default();
        let mut masked_row = Vec::new();
        let mut grammar_masks = self.grammar_masks(ids);
        for (row, id) in logits.chunks_exact(vocab).zip(ids) {
            let Some(state) = self.seqs.get_mut(id) else {
                continue;
            };
            let Some(kv) = state.kv.as_mut() else {
                continue;
            };
            let (prompt, output) = kv.token_ids.split_at(kv.num_prompt_tokens);
            let min_tokens_mask = output.len() < state.min_tokens && !state.masked_ids.is_empty();
            let grammar_mask = grammar_masks.remove(id);
            let row = if min_tokens_mask || grammar_mask.is_some() {
                masked_row.clear();
                masked_row.extend_from_slice(row);
                if let Some(mask) = &grammar_mask {
                    mask.apply(&mut masked_row);
                }
                if min_tokens_mask {
                    for &t in &state.masked_ids {
                        if let Some(l) = masked_row.get_mut(t as usize) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
                &masked_row[..]
            } else {
                row
            };
            let sampled = state.sampler.sample(row, prompt, output);
            if let Some(m) = state.constraint.as_mut() {
                m.commit(sampled.token_id);
            }
            kv.token_ids.push(sampled.token_id);
            result.step.sampled.push((*id, sampled.token_id));
            result.samples.insert(*id, sampled);
        }
        result
    }
}

impl<M> Executor<M> {
    /// The grammar masks of the constrained requests among `ids` (none, at no cost, when no
    /// running request is constrained), computed in parallel.
    fn grammar_masks(&mut self, ids: &[RequestId]) -> HashMap<RequestId, TokenMask> {
        if !self.seqs.values().any(|s| s.constraint.is_some()) {
            return HashMap::new();
        }
        let wanted: HashSet<&RequestId> = ids.iter().collect();
        let matchers = self
            .seqs
            .iter_mut()
            .filter(|(id, _)| wanted.contains(id))
            .filter_map(|(id, s)| Some((*id, s.constraint.as_mut()?)))
            .collect();
        compute_masks(matchers).into_iter().collect()
    }
}

/// Each scheduled adapter request's slot, and how newly scheduled ones found theirs.
type SlotAssignment = (HashMap<RequestId, u32>, Vec<SlotFill>);

/// The flattened batch before it borrows the block tables.
struct BatchPlan {
    token_ids: Vec<u32>,
    token_slots: Vec<Option<u32>>,
    positions: Vec<u32>,
    slot_mapping: Vec<u32>,
    seqs: Vec<PlannedSeq>,
    logits_indices: Vec<usize>,
    samplers: Vec<RequestId>,
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
        }
    }
}
