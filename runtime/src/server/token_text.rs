//! Token ids to the strings and bytes OpenAI's logprobs carry.

use std::collections::BTreeMap;

use super::protocol::{
    ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, PromptLogprobs, PromptTokenLogprob,
    TopLogprob,
};
use crate::sampling::{PromptLogprob, SampledToken};
use crate::tokenizer::Tokenizer;

/// The text of one token alone (special tokens included), as bytes.
pub fn token_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    tok.decode(&[id], false).unwrap_or_default().into_bytes()
}

/// How logprobs name tokens: by their text, or (vLLM's `return_tokens_as_token_ids`) as
/// `token_id:{id}`, which tells apart tokens whose bytes are not text of their own. Offsets and
/// chat's `bytes` stay the tokens' own.
#[derive(Clone, Copy)]
pub struct TokenNames<'a> {
    pub tok: &'a Tokenizer,
    pub as_ids: bool,
}

impl TokenNames<'_> {
    /// Token `id`'s name: `text` (computed only when it is the name), or its id.
    fn name(&self, id: u32, text: impl FnOnce() -> String) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            text()
        }
    }

    /// Chat's entry of token `id`: its name, logprob and bytes.
    fn chat_entry(&self, id: u32, logprob: f32) -> TopLogprob {
        let mut entry = TopLogprob::new(&token_bytes(self.tok, id), logprob);
        let text = std::mem::take(&mut entry.token);
        entry.token = self.name(id, || text);
        entry
    }

    /// `(name, logprob)` of each alternative.
    fn alternatives(&self, top: &[(u32, f32)]) -> Vec<(String, f32)> {
        top.iter()
            .map(|&(id, l)| (self.name(id, || token_text(self.tok, id)), l))
            .collect()
    }
}

/// Chat logprobs of `tokens`; `None` when the request did not ask for them.
pub fn chat_logprobs(names: TokenNames, tokens: &[SampledToken]) -> Option<ChatLogprobs> {
    if tokens.is_empty() || tokens.iter().all(|t| t.logprob.is_none()) {
        return None;
    }
    let content = tokens
        .iter()
        .map(|t| {
            let top = (t.top_logprobs.iter())
                .map(|&(id, lp)| names.chat_entry(id, lp))
                .collect();
            let raw = token_bytes(names.tok, t.token_id);
            let logprob = t.logprob.unwrap_or(f32::NEG_INFINITY);
            let mut own = ChatTokenLogprob::new(&raw, logprob, top);
            let text = std::mem::take(&mut own.token);
            own.token = names.name(t.token_id, || text);
            own
        })
        .collect();
    Some(ChatLogprobs {
        content: Some(content),
    })
}

/// The text of one token alone, lossily as UTF-8 (logprobs' `token` strings).
fn token_text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(&token_bytes(tok, id)).into_owned()
}

/// Legacy-completion logprobs of `tokens`, whose text starts at byte `offset` of the choice.
pub fn completion_logprobs(
    names: TokenNames,
    tokens: &[SampledToken],
    mut offset: usize,
) -> Option<CompletionLogprobs> {
    if tokens.is_empty() || tokens.iter().all(|t| t.logprob.is_none()) {
        return None;
    }
    let mut lp = CompletionLogprobs::default();
    for t in tokens {
        let text = token_text(names.tok, t.token_id);
        let top = names.alternatives(&t.top_logprobs);
        let len = text.len();
        let logprob = t.logprob.unwrap_or(f32::NEG_INFINITY);
        lp.push(
            names.name(t.token_id, || text),
            Some((logprob, &top)),
            offset,
        );
        offset += len;
    }
    Some(lp)
}

/// Legacy-completion logprobs of an echoed prompt (`echo` with `logprobs`): the first token
/// has none (nothing precedes it), `scored[i]` is token `i + 1`'s, with its first `top`
/// alternatives.
pub fn echo_logprobs(
    names: TokenNames,
    prompt: &[u32],
    scored: &[PromptLogprob],
    top: usize,
) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offset = 0;
    for (i, &id) in prompt.iter().enumerate() {
        let text = token_text(names.tok, id);
        let len = text.len();
        let name = names.name(id, || text);
        match i.checked_sub(1).and_then(|j| scored.get(j)) {
            Some(s) => {
                let alts = names.alternatives(&s.top_logprobs[..top.min(s.top_logprobs.len())]);
                lp.push(name, Some((s.logprob, &alts)), offset);
            }
            None => lp.push(name, None, offset),
        }
        offset += len;
    }
    lp
}

/// vLLM's `prompt_logprobs` of `prompt`: `null` first, then per token the token itself and
/// its first `top` alternatives, each with its logprob, rank and text.
pub fn listed_prompt_logprobs(
    tok: &Tokenizer,
    prompt: &[u32],
    scored: &[PromptLogprob],
    top: usize,
) -> PromptLogprobs {
    let mut out: PromptLogprobs = Vec::with_capacity(prompt.len());
    if !prompt.is_empty() {
        out.push(None);
    }
    for s in scored {
        let mut position = BTreeMap::new();
        for (rank, &(id, logprob)) in s.top_logprobs.iter().take(top).enumerate() {
            let entry = PromptTokenLogprob::new(logprob, rank as u32 + 1, token_text(tok, id));
            position.insert(id.to_string(), entry);
        }
        let own = PromptTokenLogprob::new(s.logprob, s.rank, token_text(tok, s.token_id));
        position.insert(s.token_id.to_string(), own);
        out.push(Some(position));
    }
    out
}
