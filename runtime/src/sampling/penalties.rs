//! Logit penalties for repeated tokens, applied in place before temperature (vLLM order:
//! repetition first, then frequency/presence).
//!
//! Token ids come from the request (prompt) and from generation; ids outside the vocabulary are
//! ignored rather than trusted. Counting sorts a small scratch copy of the ids instead of keeping
//! a vocab-sized table, so the cost scales with the sequence length, not the vocabulary.

/// HF/vLLM repetition penalty: every distinct token of `prompt_ids` or `output_ids` has its logit
/// divided by `penalty` when positive and multiplied by it otherwise. `scratch` is reused storage.
pub fn apply_repetition_penalty(
    logits: &mut [f32],
    prompt_ids: &[u32],
    output_ids: &[u32],
    penalty: f32,
    scratch: &mut Vec<u32>,
) {
    if penalty == 1.0 {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(prompt_ids);
    scratch.extend_from_slice(output_ids);
    scratch.sort_unstable();
    scratch.dedup();
    for &id in scratch.iter() {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// OpenAI frequency/presence penalties over the generated tokens:
/// `l - count * frequency - (count > 0) * presence`. `scratch` is reused storage.
pub fn apply_frequency_presence_penalties(
    logits: &mut [f32],
    output_ids: &[u32],
    frequency: f32,
    presence: f32,
    scratch: &mut Vec<u32>,
) {
    if frequency == 0.0 && presence == 0.0 {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(output_ids);
    scratch.sort_unstable();
    for run in scratch.chunk_by(|a, b| a == b) {
        if let Some(l) = logits.get_mut(run[0] as usize) {
            *l -= run.len() as f32 * frequency + presence;
        }
    }
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
}
