//! The llguidance token environment built from our tokenizer: each id's exact bytes (read from
//! the same `tokenizer.json` pipeline our detokenizer runs), padded to the model's vocabulary,
//! with every end-of-generation id as an EOS.

use std::sync::Arc;

use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::StructuredError;
use crate::tokenizer::Tokenizer;

/// Our tokenizer as llguidance sees it: the trie of token bytes, and BPE encoding for the
/// strings llguidance tokenizes itself (forced tokens).
struct CaduceusTokEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for CaduceusTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Text cut inside a character cannot be BPE-encoded exactly; llguidance then falls back
        // to the trie (it only uses this for forced tokens).
        match std::str::from_utf8(s) {
            Ok(text) => {
                // Special-token parsing is off, so a BOS/EOS here is the model's policy: drop it.
                let mut ids = self.tokenizer.encode_literal(text).unwrap_or_default();
                if ids
                    .first()
                    .is_some_and(|&t| Some(t) == self.tokenizer.bos_id())
                {
                    ids.remove(0);
                }
                if ids
                    .last()
                    .is_some_and(|t| self.tokenizer.eos_ids().contains(t))
                {
                    ids.pop();
                }
                ids
            }
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Builds the environment for a model whose logits rows have `model_vocab` entries (ids past the
/// tokenizer's vocabulary get no bytes and are never allowed).
pub fn build(tokenizer: Arc<Tokenizer>, model_vocab: usize) -> Result<TokEnv, StructuredError> {
    let unavailable = |e: &dyn std::fmt::Display| StructuredError::Unavailable(e.to_string());
    let json_text = tokenizer.to_json().map_err(|e| unavailable(&e))?;
    let json: serde_json::Value = serde_json::from_str(&json_text).map_err(|e| unavailable(&e))?;
    // Reading a vocabulary it does not expect may panic inside llguidance; that is a load-time
    // "not available", never a crash.
    let bytes = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
        .map_err(|_| unavailable(&"the vocabulary could not be read"))?
        .map_err(|e| unavailable(&e))?;
    let n_vocab = model_vocab.max(bytes.len());
    let mut words = bytes;
    words.resize(n_vocab, Vec::new());
    let eos_ids: Vec<u32> = tokenizer
        .eos_ids()
        .iter()
        .copied()
        .filter(|&t| (t as usize) < n_vocab)
        .collect();
    let Some(&first_eos) = eos_ids.first() else {
        return Err(unavailable(
            &"the tokenizer declares no end-of-sequence token",
        ));
    };
    let vocab_size = u32::try_from(n_vocab).map_err(|e| unavailable(&e))?;
    let mut info = TokRxInfo::new(vocab_size, first_eos);
    info.tok_bos = tokenizer.bos_id();
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos_ids);
    Ok(Arc::new(CaduceusTokEnv { trie, tokenizer }))
}
