//! Launcher of `cuda/sampling.cu`: one CTA per request row samples a token from f32 logits
//! (an allowed-token mask for structured outputs, penalties, greedy, temperature, top-k, top-p,
//! min-p, the draw with the request's uniform)
//! and writes the raw logprobs asked for, so only ids and logprobs (and a per-row non-finite
//! flag) leave the device. The math
//! is [`crate::sampling`]'s; the tests hold the kernel to it.
//!
//! Logits are f32 (the LM head's output, as vLLM samples in f32), not the activation dtype.

use super::device::{Device, DeviceBuffer, DeviceElem, GpuError};
use super::kernel::{kernel_fn, kernel_params, KernelFn, LaunchDims};
use super::ops::{dim32, need};
use crate::sampling::{PenaltyEntry, RowSampling, MAX_LOGPROBS};

/// Row flag: take the argmax (no draw).
const GREEDY: u32 = 1;
/// Row flag: write the sampled token's logprob and the top logprobs.
const LOGPROBS: u32 = 2;
/// Row flag: the row has an allowed-token bitset ([`AllowedTokens`]).
const ALLOWED: u32 = 4;
/// Threads per row: 16 warps stream the row; the kernel is bounded to this.
pub const GPU_THREADS: u32 = 512;
/// Largest vocabulary: fixed-point weights (2^40 each) must sum below 2^63.
pub const MAX_VOCAB: usize = 1 << 23;

/// How one row is sampled, as the kernel reads it (`SampleRow` in `cuda/params/sampling.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SampleRow {
    u: f64,
    temperature: f32,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    top_k: u32,
    num_top_logprobs: u32,
    penalty_start: u32,
    penalty_count: u32,
    flags: u32,
    _pad: u32,
}

// SAFETY: `#[repr(C)]` plain numbers, 56 bytes without padding; the size is asserted here and
// in `cuda/params/sampling.h`, so the two field lists cannot drift apart unnoticed.
unsafe impl DeviceElem for SampleRow {}
// SAFETY: `#[repr(C)]` pair of u32, no padding.
unsafe impl DeviceElem for PenaltyEntry {}

// Rows and entries reach the kernel as arrays, not through the checked parameter struct.
const _: () = assert!(std::mem::size_of::<SampleRow>() == 56);
const _: () = assert!(std::mem::size_of::<PenaltyEntry>() == 8);

impl SampleRow {
    /// The row of a request sampled as `s` with uniform `u` (drawn on the host from the
    /// request's RNG); its penalty entries are `penalties[penalty_start..][..penalty_count]`
    /// (pass count 0 when `s.penalties` is inactive); `top_logprobs`: `Some(n)` writes the
    /// sampled token's logprob and the `n` (at most 20) most likely raw tokens.
    pub fn new(
        s: &RowSampling,
        u: f64,
        penalty_start: u32,
        penalty_count: u32,
        top_logprobs: Option<usize>,
    ) -> SampleRow {
        let t = s.truncation;
        let mut flags = if t.is_none() { GREEDY } else { 0 };
        if top_logprobs.is_some() {
            flags |= LOGPROBS;
        }
        SampleRow {
            u,
            temperature: t.map_or(1.0, |t| t.temperature),
            top_p: t.map_or(1.0, |t| t.top_p),
            min_p: t.map_or(0.0, |t| t.min_p),
            repetition_penalty: s.penalties.repetition,
            frequency_penalty: s.penalties.frequency,
            presence_penalty: s.penalties.presence,
            top_k: t.map_or(0, |t| t.top_k),
            num_top_logprobs: top_logprobs.map_or(0, |n| n.min(MAX_LOGPROBS) as u32),
            penalty_start,
            penalty_count: if s.penalties.is_active() {
                penalty_count
            } else {
                0
            },
            flags,
            _pad: 0,
        }
    }

    /// The same row restricted to the tokens its bitset in [`SampleArgs::allowed`] allows
    /// (structured outputs): every other token's logit is -inf before anything reads the row.
    pub fn with_allowed_tokens(mut self) -> SampleRow {
        self.flags |= ALLOWED;
        self
    }
}

/// Words of an allowed-token bitset row for `vocab` tokens: bit `t % 32` of word `t / 32` set
/// means token `t` is allowed (the CPU sampler's representation, uploaded as is).
pub fn allowed_words(vocab: usize) -> usize {
    vocab.div_ceil(32)
}

/// Per-row allowed-token bitsets of one [`sample`] call, for rows made with
/// [`SampleRow::with_allowed_tokens`] (other rows' bitsets are not read).
pub struct AllowedTokens<'a> {
    /// `[num_rows, allowed_words(vocab)]` u32.
    pub bits: &'a DeviceBuffer,
    /// `[num_rows, vocab]` f32 scratch: the masked rows are written here.
    pub masked: &'a DeviceBuffer,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SampleParams {
    logits: u64,
    work: u64,
    rows: u64,
    penalties: u64,
    out_ids: u64,
    out_logprobs: u64,
    out_top_ids: u64,
    out_top_logprobs: u64,
    allowed: u64,
    masked: u64,
    out_nonfinite: u64,
    num_rows: u32,
    vocab: u32,
    allowed_words: u32,
    _pad: u32,
}

kernel_params!(SampleParams);

const SAMPLE: KernelFn = kernel_fn!(cad_sample_f32);

/// Buffers of one [`sample`] call.
pub struct SampleArgs<'a> {
    /// `[num_rows, vocab]` f32 raw logits (left unchanged).
    pub logits: &'a DeviceBuffer,
    /// One [`SampleRow`] per row, checked here against the buffers given.
    pub rows: &'a [SampleRow],
    /// The same rows on the device, uploaded by the caller (with the penalty entries and
    /// bitsets in one copy, say); this launch copies nothing.
    pub rows_buf: &'a DeviceBuffer,
    /// Every row's [`PenaltyEntry`]s, back to back; `None` if no row has any.
    pub penalties: Option<&'a DeviceBuffer>,
    /// `[num_rows, vocab]` f32 scratch for penalised rows; needed iff `penalties` is given.
    pub work: Option<&'a DeviceBuffer>,
    /// `[num_rows]` u32: the sampled ids.
    pub out_ids: &'a DeviceBuffer,
    /// `[num_rows]` f32 and `[num_rows, 20]` u32 / f32: logprobs of rows that asked for them.
    pub out_logprobs: Option<LogprobOutputs<'a>>,
    /// Allowed-token bitsets; needed iff a row is [`SampleRow::with_allowed_tokens`].
    pub allowed: Option<AllowedTokens<'a>>,
    /// `[num_rows]` u32: 1 where the row's input logits hold a NaN or an infinity (before
    /// any mask), else 0, so the caller can fail that request as the CPU backend does.
    pub out_nonfinite: Option<&'a DeviceBuffer>,
    pub vocab: usize,
    /// Threads per row; 0 picks [`GPU_THREADS`].
    pub threads: u32,
}

/// Where rows with logprobs write them.
pub struct LogprobOutputs<'a> {
    pub logprob: &'a DeviceBuffer,
    pub top_ids: &'a DeviceBuffer,
    pub top_logprobs: &'a DeviceBuffer,
}

/// Samples one token per row of `a.rows`. A row asking for logprobs needs `out_logprobs`, a row
/// with penalty entries needs `penalties` (holding its range) and `work`.
pub fn sample(dev: &Device, a: &SampleArgs<'_>) -> Result<(), GpuError> {
    let num_rows = a.rows.len();
    if a.vocab == 0 || a.vocab > MAX_VOCAB {
        return Err(GpuError::Shape(format!(
            "sample: vocab {} outside 1..={MAX_VOCAB}",
            a.vocab
        )));
    }
    let cells = num_rows * a.vocab;
    need("sample logits", a.logits, cells, 4)?;
    need(
        "sample rows",
        a.rows_buf,
        num_rows,
        std::mem::size_of::<SampleRow>(),
    )?;
    check_rows(a)?;
    need("sample out_ids", a.out_ids, num_rows, 4)?;
    if a.penalties.is_some() != a.work.is_some() {
        return Err(GpuError::Shape(
            "sample: penalty entries need a work buffer and vice versa".into(),
        ));
    }
    if let Some(w) = a.work {
        need("sample work", w, cells, 4)?;
    }
    let words = allowed_words(a.vocab);
    if let Some(m) = &a.allowed {
        need("sample allowed bits", m.bits, num_rows * words, 4)?;
        need("sample masked", m.masked, cells, 4)?;
    }
    if let Some(f) = a.out_nonfinite {
        need("sample out_nonfinite", f, num_rows, 4)?;
    }
    if let Some(o) = &a.out_logprobs {
        need("sample logprob", o.logprob, num_rows, 4)?;
        need("sample top_ids", o.top_ids, num_rows * MAX_LOGPROBS, 4)?;
        need(
            "sample top_logprobs",
            o.top_logprobs,
            num_rows * MAX_LOGPROBS,
            4,
        )?;
    }
    let threads = match a.threads {
        0 => GPU_THREADS,
        t if t % 32 == 0 && t <= GPU_THREADS => t,
        t => {
            return Err(GpuError::Shape(format!(
                "sample: {t} threads per row is not a multiple of 32 up to {GPU_THREADS}"
            )))
        }
    };
    let ptr = |b: Option<&DeviceBuffer>| b.map_or(0, DeviceBuffer::ptr);
    let p = SampleParams {
        logits: a.logits.ptr(),
        work: ptr(a.work),
        rows: a.rows_buf.ptr(),
        penalties: ptr(a.penalties),
        out_ids: a.out_ids.ptr(),
        out_logprobs: ptr(a.out_logprobs.as_ref().map(|o| o.logprob)),
        out_top_ids: ptr(a.out_logprobs.as_ref().map(|o| o.top_ids)),
        out_top_logprobs: ptr(a.out_logprobs.as_ref().map(|o| o.top_logprobs)),
        allowed: ptr(a.allowed.as_ref().map(|m| m.bits)),
        masked: ptr(a.allowed.as_ref().map(|m| m.masked)),
        out_nonfinite: ptr(a.out_nonfinite),
        num_rows: dim32("num_rows", num_rows)?,
        vocab: dim32("vocab", a.vocab)?,
        allowed_words: dim32("allowed words", words)?,
        _pad: 0,
    };
    dev.launch(&SAMPLE, LaunchDims::linear(p.num_rows, threads), &p)
}

/// Each row's flags and penalty range against the buffers given, so the kernel never follows a
/// null pointer or reads past the entries.
fn check_rows(a: &SampleArgs<'_>) -> Result<(), GpuError> {
    let entries = a.penalties.map_or(0, |b| b.len_of::<PenaltyEntry>());
    for (i, r) in a.rows.iter().enumerate() {
        if r.flags & LOGPROBS != 0 && a.out_logprobs.is_none() {
            return Err(GpuError::Shape(format!(
                "sample: row {i} asks for logprobs but no logprob outputs were given"
            )));
        }
        if r.flags & ALLOWED != 0 && a.allowed.is_none() {
            return Err(GpuError::Shape(format!(
                "sample: row {i} has an allowed-token mask but no bitsets were given"
            )));
        }
        let end = r.penalty_start as usize + r.penalty_count as usize;
        if r.penalty_count > 0 && (a.work.is_none() || end > entries) {
            return Err(GpuError::Shape(format!(
                "sample: row {i}'s penalty entries {}..{end} are not in the buffer given ({entries})",
                r.penalty_start
            )));
        }
    }
    Ok(())
}
