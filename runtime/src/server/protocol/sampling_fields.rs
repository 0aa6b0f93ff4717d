//! The sampling fields both request kinds share, checked into the engine's [`SamplingParams`]
//! (each range is the engine's own `SamplingParams::validate`, so the two never disagree).

use std::collections::BTreeMap;

use crate::sampling::{SamplingError, SamplingParams, MAX_LOGPROBS};

use super::validate::{invalid, out_of_range, ValidationError};

/// A request's sampling fields as sent (chat and completion requests declare the same ones).
#[derive(Default)]
pub(super) struct SamplingFields {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
}

/// The [`SamplingFields`] of a chat or completion request.
macro_rules! sampling_fields {
    ($req:ident) => {
        SamplingFields {
            temperature: $req.temperature,
            top_p: $req.top_p,
            top_k: $req.top_k,
            min_p: $req.min_p,
            seed: $req.seed,
            presence_penalty: $req.presence_penalty,
            frequency_penalty: $req.frequency_penalty,
            repetition_penalty: $req.repetition_penalty,
            logit_bias: $req.logit_bias,
        }
    };
}
pub(super) use sampling_fields;

/// A logprobs count field (`logprobs`, `top_logprobs`, `prompt_logprobs`).
pub(super) fn logprob_count(param: &str, k: i64) -> Result<usize, ValidationError> {
    let allowed = format!("in [0, {MAX_LOGPROBS}]");
    usize::try_from(k)
        .ok()
        .filter(|&k| k <= MAX_LOGPROBS)
        .ok_or_else(|| out_of_range(param, k, &allowed))
}

/// `logit_bias`'s token ids (JSON keys are strings) with their biases; the ranges are
/// [`SamplingParams::validate`]'s, the vocabulary's the handler's.
fn logit_bias(map: Option<&BTreeMap<String, f64>>) -> Result<Vec<(u32, f32)>, ValidationError> {
    let Some(map) = map else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(key, &bias)| match key.parse::<u32>() {
            Ok(id) => Ok((id, bias as f32)),
            Err(_) => Err(invalid(
                "logit_bias",
                format!("keys must be token ids (integers as strings); got {key:?}"),
            )),
        })
        .collect()
}

/// A float field: its default when absent, else checked against `ok`.
fn float(
    param: &str,
    value: Option<f64>,
    default: f32,
    ok: fn(f64) -> bool,
    allowed: &str,
) -> Result<f32, ValidationError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && ok(v) => Ok(v as f32),
        Some(v) => Err(out_of_range(param, v, allowed)),
    }
}

pub(super) fn sampling_params(
    c: &SamplingFields,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ValidationError> {
    let d = SamplingParams::default();
    let penalty = |v: f64| (-2.0..=2.0).contains(&v);
    let top_k = match c.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k >= 1 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
        Some(k) => return Err(out_of_range("top_k", k, "-1 or 0 (off), or at least 1")),
    };
    let sampling = SamplingParams {
        temperature: float(
            "temperature",
            c.temperature,
            d.temperature,
            |v| (0.0..=2.0).contains(&v),
            "in [0, 2]",
        )?,
        top_k,
        top_p: float(
            "top_p",
            c.top_p,
            d.top_p,
            |v| v > 0.0 && v <= 1.0,
            "in (0, 1]",
        )?,
        min_p: float(
            "min_p",
            c.min_p,
            d.min_p,
            |v| (0.0..=1.0).contains(&v),
            "in [0, 1]",
        )?,
        presence_penalty: float(
            "presence_penalty",
            c.presence_penalty,
            0.0,
            penalty,
            "in [-2, 2]",
        )?,
        frequency_penalty: float(
            "frequency_penalty",
            c.frequency_penalty,
            0.0,
            penalty,
            "in [-2, 2]",
        )?,
        repetition_penalty: float(
            "repetition_penalty",
            c.repetition_penalty,
            1.0,
            |v| v > 0.0 && v <= 2.0,
            "in (0, 2]",
        )?,
        // Negative seeds are accepted (vLLM does) and reinterpreted as their bit pattern.
        seed: c.seed.map(|s| s as u64),
        logprobs,
        logit_bias: logit_bias(c.logit_bias.as_ref())?,
        allowed_token_ids: Vec::new(),
        bad_words: Vec::new(),
    };
    // The engine's own check, so the two can never disagree about a value passed on.
    sampling.validate().map_err(
        |SamplingError::OutOfRange {
             field,
             value,
             allowed,
         }| { out_of_range(field, value, &format!("in {allowed}")) },
    )?;
    Ok(sampling)
}
