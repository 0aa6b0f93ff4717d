//! Offline batched generation: runs a fixed set of prompts to completion through the paged,
//! batched forward pass. Each step carries every unfinished sequence: decode tokens first, then
//! prefill chunks under a token budget, so prefill and decode mix in one batch.
//!
//! The server's engine loop (scheduler + `EngineCore`) supersedes this for online serving; this
//! driver keeps `caduceus generate` and the model benchmarks free of any scheduling policy.

use caduceus_kernels::attention::SeqAttention;

use crate::kv_cache::KvCache;
use crate::model::{ForwardBatch, LlamaModel};
use crate::sampling::{SampledToken, Sampler, SamplingError, SamplingParams};

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token was sampled.
    Stop,
    /// `max_tokens` (or the model length) was reached.
    Length,
}

/// One prompt to complete.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// Prompt token ids (already templated and tokenized).
    pub prompt_ids: Vec<u32>,
    /// Sampling settings.
    pub params: SamplingParams,
    /// Maximum number of tokens to generate.
    pub max_tokens: usize,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// The result for one prompt.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    /// Generated token ids (including the EOS token when `finish_reason` is `Stop`).
    pub token_ids: Vec<u32>,
    /// Per-token sampling details (logprobs when asked for).
    pub samples: Vec<SampledToken>,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// Limits of one generation run.
#[derive(Clone, Copy, Debug)]
pub struct GenerateOptions {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most tokens in one forward pass (prefill is chunked to fit).
    pub max_batch_tokens: usize,
    /// Longest prompt plus output accepted.
    pub max_model_len: usize,
}

/// A request the driver refuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GenerateError {
    /// The prompt has no tokens.
    #[error("prompt {index} is empty")]
    EmptyPrompt { index: usize },
    /// Prompt plus `max_tokens` exceeds the model's context.
    #[error(
        "prompt {index} has {prompt_tokens} tokens and asks for {max_tokens} more, \
         over the model's context length of {max_model_len}"
    )]
    TooLong {
        index: usize,
        prompt_tokens: usize,
        max_tokens: usize,
        max_model_len: usize,
    },
    /// A token id is outside the vocabulary.
    #[error("prompt {index} contains token id {token_id}, outside the vocabulary of {vocab_size}")]
    BadToken {
        index: usize,
        token_id: u32,
        vocab_size: usize,
    },
    /// Sampling settings out of range.
    #[error("prompt {index}: {source}")]
    Sampling { index: usize, source: SamplingError },
}

struct Sequence {
    prompt: Vec<u32>,
    output: Vec<u32>,
    samples: Vec<SampledToken>,
    sampler: Sampler,
    max_tokens: usize,
    ignore_eos: bool,
    num_computed: usize,
    block_table: Vec<u32>,
    finish: Option<FinishReason>,
}

impl Sequence {
    fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }
    /// Token at absolute position `pos` (prompt then output).
    fn token(&self, pos: usize) -> u32 {
        if pos < self.prompt.len() {
            self.prompt[pos]
        } else {
            self.output[pos - self.prompt.len()]
        }
    }
}

/// Runs `requests` to completion as one continuously batched workload.
pub fn generate(
    model: &LlamaModel,
    eos_ids: &[u32],
    requests: Vec<GenerateRequest>,
    opts: GenerateOptions,
) -> Result<Vec<GenerateOutput>, GenerateError> {
    let vocab_size = model.config().vocab_size;
    for (index, r) in requests.iter().enumerate() {
        validate(index, r, vocab_size, opts.max_model_len)?;
    }
    let bs = opts.block_size;
    let mut next_block = 0u32;
    let mut seqs: Vec<Sequence> = requests
        .into_iter()
        .map(|r| {
            let blocks = (r.prompt_ids.len() + r.max_tokens).div_ceil(bs) as u32;
            let block_table = (next_block..next_block + blocks).collect();
            next_block += blocks;
            Sequence {
                sampler: Sampler::new(r.params),
                max_tokens: r.max_tokens,
                ignore_eos: r.ignore_eos,
                prompt: r.prompt_ids,
                output: Vec::new(),
                samples: Vec::new(),
                num_computed: 0,
                block_table,
                finish: None,
            }
        })
        .collect();
    for s in seqs.iter_mut().filter(|s| s.max_tokens == 0) {
        s.finish = Some(FinishReason::Length);
    }
    let mut kv = KvCache::new(
        model.config().num_layers,
        model.kv_cache_shape(next_block as usize, bs),
    );
    while seqs.iter().any(|s| s.finish.is_none()) {
        step(model, &mut kv, &mut seqs, eos_ids, opts);
    }
    Ok(seqs
        .into_iter()
        .map(|s| GenerateOutput {
            token_ids: s.output,
            samples: s.samples,
            finish_reason: s.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}

fn validate(
    index: usize,
    r: &GenerateRequest,
    vocab_size: usize,
    max_model_len: usize,
) -> Result<(), GenerateError> {
    if r.prompt_ids.is_empty() {
        return Err(GenerateError::EmptyPrompt { index });
    }
    if r.prompt_ids.len() + r.max_tokens > max_model_len {
        return Err(GenerateError::TooLong {
            index,
            prompt_tokens: r.prompt_ids.len(),
            max_tokens: r.max_tokens,
            max_model_len,
        });
    }
    if let Some(&token_id) = r.prompt_ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(GenerateError::BadToken {
            index,
            token_id,
            vocab_size,
        });
    }
    r.params
        .validate()
        .map_err(|source| GenerateError::Sampling { index, source })
}

/// One iteration: schedule tokens for every unfinished sequence, run the model, sample.
fn step(
    model: &LlamaModel,
    kv: &mut KvCache,
    seqs: &mut [Sequence],
    eos_ids: &[u32],
    opts: GenerateOptions,
) {
    // Decodes first (one token each), then prefill chunks while the budget lasts.
    let mut order: Vec<usize> = (0..seqs.len())
        .filter(|&i| seqs[i].finish.is_none())
        .collect();
    order.sort_by_key(|&i| seqs[i].num_computed < seqs[i].prompt.len());
    let mut budget = opts.max_batch_tokens.max(1);
    let mut scheduled: Vec<(usize, usize)> = Vec::new();
    for i in order {
        let s = &seqs[i];
        let n = (s.len() - s.num_computed).min(budget);
        if n == 0 {
            break;
        }
        budget -= n;
        scheduled.push((i, n));
    }

    let (mut token_ids, mut positions, mut slots) = (Vec::new(), Vec::new(), Vec::new());
    let mut logits_indices = Vec::new();
    let mut samplers = Vec::new();
    for &(i, n) in &scheduled {
        let s = &seqs[i];
        for pos in s.num_computed..s.num_computed + n {
            token_ids.push(s.token(pos));
            positions.push(pos as u32);
            slots.push(
                s.block_table[pos / opts.block_size] * opts.block_size as u32
                    + (pos % opts.block_size) as u32,
            );
        }
        if s.num_computed + n == s.len() {
            logits_indices.push(token_ids.len() - 1);
            samplers.push(i);
        }
    }
    let mut start = 0;
    let attn: Vec<SeqAttention<'_>> = scheduled
        .iter()
        .map(|&(i, n)| {
            let s = &seqs[i];
            let a = SeqAttention {
                query_start: start,
                query_len: n,
                context_len: s.num_computed + n,
                block_table: &s.block_table,
            };
            start += n;
            a
        })
        .collect();
    let batch = ForwardBatch {
        token_ids: &token_ids,
        positions: &positions,
        slot_mapping: &slots,
        seqs: &attn,
        logits_indices: &logits_indices,
    };
    let logits = model.forward(&batch, kv);
    drop(attn);

    for &(i, n) in &scheduled {
        seqs[i].num_computed += n;
    }
    let vocab = model.config().vocab_size;
    for (row, &i) in logits.chunks_exact(vocab).zip(&samplers) {
        let s = &mut seqs[i];
        let sampled = s.sampler.sample(row, &s.prompt, &s.output);
        let tok = sampled.token_id;
        s.output.push(tok);
        s.samples.push(sampled);
        if !s.ignore_eos && eos_ids.contains(&tok) {
            s.finish = Some(FinishReason::Stop);
        } else if s.output.len() >= s.max_tokens {
            s.finish = Some(FinishReason::Length);
        }
    }
}
