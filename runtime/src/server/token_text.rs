//! Token ids to the strings and bytes OpenAI's logprobs carry.

use super::protocol::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};
use crate::sampling::SampledToken;
use crate::tokenizer::Tokenizer;

/// The text of one token alone (special tokens included), as bytes.
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    tok.decode(&[id], false).unwrap_or_default().into_bytes()
}

/// Chat logprobs of `tokens`; `None` when the request did not ask for them.
pub fn chat_logprobs(tok: &Tokenizer, tokens: &[SampledToken]) -> Option<ChatLogprobs> {
    if tokens.is_empty() || tokens.iter().all(|t| t.logprob.is_none()) {
        return None;
    }
    let content = tokens
        .iter()
        .map(|t| {
            let top = t
                .top_logprobs
                .iter()
                .map(|&(id, lp)| TopLogprob::new(&token_bytes(tok, id), lp))
                .collect();
            ChatTokenLogprob::new(
                &token_bytes(tok, t.token_id),
                t.logprob.unwrap_or(f32::NEG_INFINITY),
                top,
            )
        })
        .collect();
    Some(ChatLogprobs {
        content: Some(content),
    })
}

/// Legacy-completion logprobs of `tokens`, whose text starts at byte `offset` of the choice.
pub fn completion_logprobs(
    tok: &Tokenizer,
    tokens: &[SampledToken],
    mut offset: usize,
) -> Option<CompletionLogprobs> {
    if tokens.is_empty() || tokens.iter().all(|t| t.logprob.is_none()) {
        return None;
    }
    let mut lp = CompletionLogprobs::default();
    for t in tokens {
        let text = String::from_utf8_lossy(&token_bytes(tok, t.token_id)).into_owned();
        let top: Vec<(String, f32)> = t
            .top_logprobs
            .iter()
            .map(|&(id, l)| {
                (
                    String::from_utf8_lossy(&token_bytes(tok, id)).into_owned(),
                    l,
                )
            })
            .collect();
        let len = text.len();
        lp.push(text, t.logprob.unwrap_or(f32::NEG_INFINITY), &top, offset);
        offset += len;
    }
    Some(lp)
}
