//! Offline batched generation: runs a fixed set of prompts to completion through the engine
//! ([`EngineCore`]) on the calling thread, so `caduceus generate` and the tests batch exactly as
//! the server does (continuous batching, chunked prefill, prefix caching).

use std::sync::Arc;

use caduceus_scheduler::{FinishReason as EngineFinish, SchedulerConfig};

use crate::adapters::AdapterService;
use crate::engine::{EngineCore, EngineRequest, RequestError, RequestOutput, RunError};
use crate::model::LlamaModel;
use crate::sampling::{SampledToken, SamplingError, SamplingParams};

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
    /// The adapter (registry name) to run with; needs [`generate_with_adapters`].
    pub adapter: Option<Arc<str>>,
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
    /// The engine refused the request.
    #[error("prompt {index}: {source}")]
    Request { index: usize, source: RequestError },
    /// The engine failed.
    #[error("engine failure: {0}")]
    Engine(String),
    /// A request failed in the engine (e.g. its adapter could not be loaded).
    #[error("prompt {index}: {message}")]
    Failed { index: usize, message: String },
}

/// Runs `requests` to completion as one continuously batched workload through the engine, with a
/// KV pool large enough that nothing is preempted.
pub fn generate(
    model: &LlamaModel,
    eos_ids: &[u32],
    requests: Vec<GenerateRequest>,
    opts: GenerateOptions,
) -> Result<Vec<GenerateOutput>, GenerateError> {
    let config = scheduler_config_for(
        &requests,
        opts.block_size,
        opts.max_batch_tokens,
        opts.max_model_len,
    );
    generate_with_config(model, eos_ids, requests, config)
}

/// A scheduler configuration that runs `requests` all at once with a KV pool large enough that
/// nothing is preempted.
pub fn scheduler_config_for(
    requests: &[GenerateRequest],
    block_size: usize,
    max_batch_tokens: usize,
    max_model_len: usize,
) -> SchedulerConfig {
    let bs = block_size.max(1);
    let num_blocks = 1 + requests
        .iter()
        .map(|r| (r.prompt_ids.len() + r.max_tokens).div_ceil(bs))
        .sum::<usize>();
    SchedulerConfig {
        max_num_seqs: requests.len().max(1),
        max_num_batched_tokens: max_batch_tokens.max(1),
        block_size: bs,
        num_blocks: num_blocks.max(2),
        max_model_len,
        ..SchedulerConfig::default()
    }
}

/// [`generate`] with an explicit scheduler configuration (pool size, budgets, prefix caching).
pub fn generate_with_config(
    model: &LlamaModel,
    eos_ids: &[u32],
    requests: Vec<GenerateRequest>,
    config: SchedulerConfig,
) -> Result<Vec<GenerateOutput>, GenerateError> {
    generate_with_adapters(model, eos_ids, requests, config, None)
}

/// [`generate_with_config`] serving the adapters of `adapters`.
pub fn generate_with_adapters(
    model: &LlamaModel,
    eos_ids: &[u32],
    requests: Vec<GenerateRequest>,
    config: SchedulerConfig,
    adapters: Option<Arc<AdapterService>>,
) -> Result<Vec<GenerateOutput>, GenerateError> {
    let vocab_size = model.config().vocab_size;
    for (index, r) in requests.iter().enumerate() {
        validate(index, r, vocab_size, config.max_model_len)?;
    }
    let engine_err = |e: crate::engine::EngineError| GenerateError::Engine(e.to_string());
    let mut core = EngineCore::new(model, None, eos_ids.to_vec(), config).map_err(engine_err)?;
    if let Some(service) = adapters {
        core = core.with_adapters(service).map_err(engine_err)?;
    }
    // Requests for no tokens are answered without the engine.
    let run: Vec<usize> = (0..requests.len())
        .filter(|&i| requests[i].max_tokens > 0)
        .collect();
    let mut outputs: Vec<Vec<RequestOutput>> = vec![Vec::new(); requests.len()];
    let reqs = requests
        .into_iter()
        .filter(|r| r.max_tokens > 0)
        .map(|r| {
            let mut req = EngineRequest::new(r.prompt_ids, r.max_tokens);
            req.sampling = r.params;
            req.ignore_eos = r.ignore_eos;
            req.detokenize = false;
            req.adapter = r.adapter;
            req
        })
        .collect();
    let ran = core.run_to_end(reqs).map_err(|e| match e {
        RunError::Request { index, source } => GenerateError::Request {
            index: run[index],
            source,
        },
        e => GenerateError::Engine(e.to_string()),
    })?;
    for (&index, out) in run.iter().zip(ran) {
        outputs[index] = out;
    }
    outputs
        .into_iter()
        .enumerate()
        .map(|(index, o)| collect(o).map_err(|message| GenerateError::Failed { index, message }))
        .collect()
}

/// Gathers one request's outputs.
fn collect(outputs: Vec<RequestOutput>) -> Result<GenerateOutput, String> {
    let mut out = GenerateOutput {
        token_ids: Vec::new(),
        samples: Vec::new(),
        finish_reason: FinishReason::Length,
    };
    for o in outputs {
        out.token_ids
            .extend(o.new_tokens.iter().map(|t| t.token_id));
        out.samples.extend(o.new_tokens);
        if let Some(f) = o.finished {
            if let Some(failure) = f.error {
                return Err(failure.to_string());
            }
            out.finish_reason = match f.reason {
                EngineFinish::Stop => FinishReason::Stop,
                _ => FinishReason::Length,
            };
        }
    }
    Ok(out)
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
