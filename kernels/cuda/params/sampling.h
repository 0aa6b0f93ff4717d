// Parameter structs of sampling.cu. Mirrored field for field by kernels/src/gpu/sampling.rs
// (`#[repr(C)]`); the emulated entry points report their size so the Rust side checks the two
// agree. The CPU twin of every rule is kernels/src/sampling/.
#pragma once
#include <stdint.h>

/// One distinct token seen in the prompt or the output of a request (so the repetition penalty
/// applies), with how often it was generated (frequency/presence apply when > 0). Built by the
/// host (kernels::sampling::penalty_entries), ids below the vocabulary.
struct PenaltyEntry {
  uint32_t token;
  uint32_t output_count;
};

/// Row flags.
#define CAD_SAMPLE_GREEDY 1u
#define CAD_SAMPLE_LOGPROBS 2u
/// The row has an allowed-token bitset (structured outputs): see SampleParams::allowed.
#define CAD_SAMPLE_ALLOWED 4u
/// Output stride of the top logprobs (OpenAI's limit).
#define CAD_SAMPLE_MAX_LOGPROBS 20u

/// How one row (request) is sampled. `u` is the request's uniform number in [0, 1) for this
/// step, drawn on the host from its seeded RNG. `penalty_start`/`penalty_count` select the row's
/// entries in `SampleParams::penalties` (count 0: no penalty changes a logit).
struct SampleRow {
  double u;
  float temperature;
  float top_p;
  float min_p;
  float repetition_penalty;
  float frequency_penalty;
  float presence_penalty;
  uint32_t top_k;
  uint32_t num_top_logprobs;
  uint32_t penalty_start;
  uint32_t penalty_count;
  uint32_t flags;
  uint32_t _pad;
};
// Rows and entries are arrays the Rust side fills (kernels/src/gpu/sampling.rs asserts the same).
static_assert(sizeof(SampleRow) == 56, "SampleRow layout changed: update gpu/sampling.rs");
static_assert(sizeof(PenaltyEntry) == 8, "PenaltyEntry layout changed: update sampling/penalties.rs");

/// One CTA per row of `logits` ([num_rows, vocab] f32). `work` ([num_rows, vocab] f32) receives
/// the penalised row of every row with penalty entries (may be null if none has). Writes
/// `out_ids[row]`, and for rows with CAD_SAMPLE_LOGPROBS `out_logprobs[row]` (the sampled
/// token's raw logprob) and the first min(num_top_logprobs, 20, vocab) entries of
/// `out_top_ids`/`out_top_logprobs` at `row * 20`.
///
/// Rows flagged CAD_SAMPLE_ALLOWED have a bitset at `allowed + row * allowed_words` (bit t % 32
/// of word t / 32 set = token t allowed): their logits are first copied to `masked` ([num_rows,
/// vocab] f32) with every other token at -inf, and that masked row is what everything after
/// sees (penalties, greedy, the draw, the fallback argmax and the logprobs), as if the model had
/// produced it. `allowed`/`masked` may be null if no row is flagged.
///
/// `out_nonfinite` (may be null): `[num_rows]` u32, 1 where the row's input logits hold a NaN or
/// an infinity (before any mask), else 0; the engine fails that request alone, as the CPU
/// backend does (RequestFailure::NonFiniteLogits).
struct SampleParams {
  const float* logits;
  float* work;
  const SampleRow* rows;
  const PenaltyEntry* penalties;
  uint32_t* out_ids;
  float* out_logprobs;
  uint32_t* out_top_ids;
  float* out_top_logprobs;
  const uint32_t* allowed;
  float* masked;
  uint32_t* out_nonfinite;
  uint32_t num_rows;
  uint32_t vocab;
  uint32_t allowed_words;
  uint32_t _pad;
};
