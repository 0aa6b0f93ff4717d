//! The step token budget when `scheduler.max_num_batched_tokens` is not set: sized from this
//! machine's measured prefill rate so one engine step takes about `scheduler.max_step_ms`.
//! Every running stream waits for the whole step, newcomers' prompt chunks included, so on a CPU
//! a fixed 2048-token budget (about 2 s of prefill on two cores) stalls every stream for seconds.
//! The probe only starts the budget: the engine's `StepTimer` then follows real step times.

use std::time::Instant;

use caduceus_scheduler::SchedulerConfig;

use crate::config::SchedulerSection;
use crate::engine::StepTimer;
use crate::generate::{generate, GenerateOptions, GenerateRequest};
use crate::model::LlamaModel;
use crate::sampling::SamplingParams;

/// Tokens of the probe prompt: enough that the per-step overhead is amortized as in a real
/// prefill chunk, few enough that the probe costs a fraction of a second.
const PROBE_TOKENS: usize = 256;
/// Never below this: tiny steps spend their time on per-step overhead.
pub const MIN_BUDGET: usize = 32;
/// Never above the GPU-era default.
pub const MAX_BUDGET: usize = 2048;

/// The budget that fits `max_step_ms` at `tokens_per_sec`, within [`MIN_BUDGET`, `MAX_BUDGET`].
pub fn budget_for(tokens_per_sec: f64, max_step_ms: u64) -> usize {
    let tokens = tokens_per_sec * max_step_ms as f64 / 1000.0;
    if !tokens.is_finite() {
        return MAX_BUDGET;
    }
    (tokens as usize).clamp(MIN_BUDGET, MAX_BUDGET)
}

/// Prefill tokens per second of `model` on this machine: the second of two single-chunk
/// prefills of [`PROBE_TOKENS`] tokens, fewer if the context is shorter (the first warms the
/// thread pool and caches).
pub fn measure_prefill_rate(model: &LlamaModel) -> Result<f64, crate::generate::GenerateError> {
    let vocab = model.config().vocab_size.max(1);
    // Within the model's positions (small test models have short contexts).
    let tokens = PROBE_TOKENS
        .min(model.config().max_position_embeddings.saturating_sub(1))
        .max(1);
    let prompt: Vec<u32> = (0..tokens).map(|i| ((i * 31 + 7) % vocab) as u32).collect();
    let opts = GenerateOptions {
        block_size: 16,
        max_batch_tokens: tokens,
        max_model_len: tokens + 1,
    };
    let request = GenerateRequest {
        prompt_ids: prompt,
        params: SamplingParams::greedy(),
        max_tokens: 1,
        ignore_eos: true,
        adapter: None,
    };
    generate(model, &[], vec![request.clone()], opts)?;
    let start = Instant::now();
    generate(model, &[], vec![request], opts)?;
    Ok(tokens as f64 / start.elapsed().as_secs_f64().max(1e-6))
}

/// Sets `config`'s step budget: `max_num_batched_tokens` when the file sets it, else measured
/// for `max_step_ms` (the running sequences are then capped at the budget so each still decodes
/// every step). Returns the timer that keeps a measured budget on target as the real load's
/// step times come in (`None` for a configured budget, which stays as set).
pub fn resolve(
    section: &SchedulerSection,
    model: &LlamaModel,
    config: &mut SchedulerConfig,
) -> anyhow::Result<Option<StepTimer>> {
    if let Some(budget) = section.max_num_batched_tokens {
        config.max_num_batched_tokens = budget;
        return Ok(None);
    }
    let rate = measure_prefill_rate(model)?;
    let budget = budget_for(rate, section.max_step_ms);
    config.max_num_batched_tokens = budget;
    if config.max_num_seqs > budget {
        config.max_num_seqs = budget;
    }
    tracing::info!(
        prefill_tokens_per_s = rate.round(),
        max_step_ms = section.max_step_ms,
        max_num_batched_tokens = budget,
        max_num_seqs = config.max_num_seqs,
        "step budget sized from the measured prefill rate (set scheduler.max_num_batched_tokens \
         to fix it); it follows the measured step time from now on"
    );
    Ok(Some(StepTimer::new(
        section.max_step_ms,
        MIN_BUDGET,
        MAX_BUDGET,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_the_rate_times_the_step_time_within_bounds() {
        // Two cores on the default model: ~1000 prefill tokens/s -> 250 tokens in 250 ms.
        assert_eq!(budget_for(1000.0, 250), 250);
        assert_eq!(budget_for(100.0, 250), MIN_BUDGET);
        assert_eq!(budget_for(1e6, 250), MAX_BUDGET);
        assert_eq!(budget_for(f64::INFINITY, 250), MAX_BUDGET);
        assert_eq!(budget_for(f64::NAN, 250), MAX_BUDGET);
    }
}
