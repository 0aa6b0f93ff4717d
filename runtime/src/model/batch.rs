//! The flattened batch one forward pass consumes: tokens of many sequences, some in (chunked)
//! prefill and some decoding, with their positions, KV slots and block tables.

use caduceus_kernels::attention::SeqAttention;

/// Input of [`super::LlamaModel::forward`]. Row `t` of every per-token array is one token.
#[derive(Clone, Copy, Debug)]
pub struct ForwardBatch<'a> {
    /// Token ids, `[num_tokens]`.
    pub token_ids: &'a [u32],
    /// Absolute position of each token in its sequence.
    pub positions: &'a [u32],
    /// KV slot (`block_id * block_size + offset`) each token's K/V is written to.
    pub slot_mapping: &'a [u32],
    /// Per-sequence query ranges, context lengths and block tables.
    pub seqs: &'a [SeqAttention<'a>],
    /// Rows whose logits are wanted (usually the last token of each sequence that samples).
    pub logits_indices: &'a [usize],
}

impl ForwardBatch<'_> {
    /// Number of tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Checks the per-token arrays agree and every sequence's query range lies inside the batch.
    /// The executor builds batches from scheduler output, so a failure here is a programming error.
    pub fn check(&self) -> Result<(), String> {
        let n = self.token_ids.len();
        if self.positions.len() != n || self.slot_mapping.len() != n {
            return Err(format!(
                "batch arrays disagree: {n} tokens, {} positions, {} slots",
                self.positions.len(),
                self.slot_mapping.len()
            ));
        }
        let mut covered = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            if s.query_start != covered || s.query_len == 0 || s.query_len > s.context_len {
                return Err(format!("sequence {i} has an invalid query range"));
            }
            covered += s.query_len;
        }
        if covered != n {
            return Err(format!("sequences cover {covered} of {n} tokens"));
        }
        if let Some(&bad) = self.logits_indices.iter().find(|&&i| i >= n) {
            return Err(format!("logits index {bad} is outside the batch of {n}"));
        }
        Ok(())
    }
}
