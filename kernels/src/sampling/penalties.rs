//! Logit penalties for repeated tokens (vLLM order: repetition first, then frequency/presence),
//! applied from a per-request list of distinct [`PenaltyEntry`]s that the host builds once per
//! step, so the cost scales with the sequence length, not the vocabulary, on the CPU and on
//! the GPU alike (`cuda/sampling.cu` reads the same list).
//!
//! Token ids come from the request (prompt) and from generation; ids outside the vocabulary are
//! ignored rather than trusted.

/// One distinct token seen in the prompt or the output (so the repetition penalty applies to it),
/// with how often it was generated (frequency/presence apply when > 0). Layout shared with the
/// GPU kernel (`PenaltyEntry` in `cuda/params/sampling.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PenaltyEntry {
    pub token: u32,
    pub output_count: u32,
}

/// The three penalties of one request; 1 / 0 / 0 is "off".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Penalties {
    /// HF/vLLM repetition penalty: a positive logit is divided by it, a negative one multiplied.
    pub repetition: f32,
    /// OpenAI frequency penalty, subtracted once per previous generation of a token.
    pub frequency: f32,
    /// OpenAI presence penalty, subtracted once from every token already generated.
    pub presence: f32,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties {
            repetition: 1.0,
            frequency: 0.0,
            presence: 0.0,
        }
    }
}

impl Penalties {
    /// Whether any penalty changes a logit.
    pub fn is_active(&self) -> bool {
        self.repetition != 1.0 || self.frequency != 0.0 || self.presence != 0.0
    }

    /// The penalised logit of a token with entry `e` (`l` already NaN-free). The GPU kernel
    /// performs exactly these f32 operations, unfused, so both give the same bits.
    #[inline]
    pub fn apply(&self, l: f32, output_count: u32) -> f32 {
        let mut l = l;
        if self.repetition != 1.0 {
            l = repetition(l, self.repetition);
        }
        if output_count > 0 && (self.frequency != 0.0 || self.presence != 0.0) {
            l -= output_count as f32 * self.frequency + self.presence;
        }
        l
    }
}

#[inline]
fn repetition(l: f32, penalty: f32) -> f32 {
    if l > 0.0 {
        l / penalty
    } else {
        l * penalty
    }
}

/// Builds the distinct entries of `prompt_ids` and `output_ids` below `vocab`, sorted by token.
/// Prompt-only tokens are left out when `with_prompt` is false (no repetition penalty: they
/// would change nothing). `scratch` and `out` are reused storage.
pub fn penalty_entries(
    prompt_ids: &[u32],
    output_ids: &[u32],
    vocab: usize,
    with_prompt: bool,
    scratch: &mut Vec<u32>,
    out: &mut Vec<PenaltyEntry>,
) {
    out.clear();
    scratch.clear();
    scratch.extend(output_ids.iter().filter(|&&t| (t as usize) < vocab));
    scratch.sort_unstable();
    out.extend(scratch.chunk_by(|a, b| a == b).map(|run| PenaltyEntry {
        token: run[0],
        output_count: run.len() as u32,
    }));
    if !with_prompt {
        return;
    }
    scratch.clear();
    scratch.extend(prompt_ids.iter().filter(|&&t| (t as usize) < vocab));
    scratch.sort_unstable();
    scratch.dedup();
    let generated = out.len();
    for &t in scratch.iter() {
        if out[..generated]
            .binary_search_by_key(&t, |e| e.token)
            .is_err()
        {
            out.push(PenaltyEntry {
                token: t,
                output_count: 0,
            });
        }
    }
    out.sort_unstable_by_key(|e| e.token);
}

/// Applies `penalties` in place to the row for every entry (ids past the row are ignored).
pub fn apply_penalties(logits: &mut [f32], entries: &[PenaltyEntry], penalties: &Penalties) {
    if !penalties.is_active() {
        return;
    }
    for e in entries {
        if let Some(l) = logits.get_mut(e.token as usize) {
            *l = penalties.apply(*l, e.output_count);
        }
    }
}

/// HF/vLLM repetition penalty alone: every distinct token of `prompt_ids` or `output_ids` has its
/// logit divided by `penalty` when positive and multiplied by it otherwise.
pub fn apply_repetition_penalty(
    logits: &mut [f32],
    prompt_ids: &[u32],
    output_ids: &[u32],
    penalty: f32,
    scratch: &mut Vec<u32>,
) {
    let mut entries = Vec::new();
    penalty_entries(
        prompt_ids,
        output_ids,
        logits.len(),
        true,
        scratch,
        &mut entries,
    );
    let p = Penalties {
        repetition: penalty,
        ..Penalties::default()
    };
    apply_penalties(logits, &entries, &p);
}

/// OpenAI frequency/presence penalties alone, over the generated tokens:
/// `l - count * frequency - (count > 0) * presence`.
pub fn apply_frequency_presence_penalties(
    logits: &mut [f32],
    output_ids: &[u32],
    frequency: f32,
    presence: f32,
    scratch: &mut Vec<u32>,
) {
    let mut entries = Vec::new();
    penalty_entries(&[], output_ids, logits.len(), false, scratch, &mut entries);
    let p = Penalties {
        frequency,
        presence,
        ..Penalties::default()
    };
    apply_penalties(logits, &entries, &p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_vocab_ids_are_ignored() {
        let mut logits = vec![1.0, -1.0];
        let mut scratch = Vec::new();
        apply_repetition_penalty(&mut logits, &[5, 0], &[u32::MAX], 2.0, &mut scratch);
        apply_frequency_presence_penalties(&mut logits, &[7, 1, 1], 0.5, 0.25, &mut scratch);
        assert_eq!(logits, vec![0.5, -2.25]);
    }

    #[test]
    fn repeated_ids_are_penalised_once_by_repetition() {
        let mut logits = vec![4.0];
        let mut scratch = Vec::new();
        apply_repetition_penalty(&mut logits, &[0, 0], &[0, 0, 0], 2.0, &mut scratch);
        assert_eq!(logits, vec![2.0]);
    }

    #[test]
    fn entries_are_distinct_sorted_and_count_outputs_only() {
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        penalty_entries(&[9, 3, 3, 50], &[3, 7, 3], 10, true, &mut scratch, &mut out);
        let got: Vec<(u32, u32)> = out.iter().map(|e| (e.token, e.output_count)).collect();
        assert_eq!(got, vec![(3, 2), (7, 1), (9, 0)]);
        penalty_entries(&[9, 3], &[3, 7, 3], 10, false, &mut scratch, &mut out);
        assert_eq!(out.len(), 2);
    }
}
