//! Log-probability shapes: chat's per-token objects and legacy completions' parallel arrays.
//!
//! JSON has no infinity, and serde_json writes `-inf` as `null`, which breaks clients expecting
//! numbers; like vLLM, every logprob is clamped to [`MIN_LOGPROB`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The floor for reported logprobs (vLLM's choice), standing in for `-inf`.
pub const MIN_LOGPROB: f32 = -9999.0;

fn finite(logprob: f32) -> f32 {
    if logprob.is_nan() {
        MIN_LOGPROB
    } else {
        logprob.max(MIN_LOGPROB)
    }
}

/// Chat `choices[].logprobs`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Option<Vec<ChatTokenLogprob>>,
}

/// One sampled token of a chat choice with its most likely alternatives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes (a token may hold part of a character).
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative in `top_logprobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

impl TopLogprob {
    /// From a token's raw bytes; `token` is their lossy UTF-8 text.
    pub fn new(raw: &[u8], logprob: f32) -> TopLogprob {
        TopLogprob {
            token: String::from_utf8_lossy(raw).into_owned(),
            logprob: finite(logprob),
            bytes: Some(raw.to_vec()),
        }
    }
}

impl ChatTokenLogprob {
    /// The sampled token (raw bytes) and its alternatives, most likely first.
    pub fn new(raw: &[u8], logprob: f32, top_logprobs: Vec<TopLogprob>) -> ChatTokenLogprob {
        let top = TopLogprob::new(raw, logprob);
        ChatTokenLogprob {
            token: top.token,
            logprob: top.logprob,
            bytes: top.bytes,
            top_logprobs,
        }
    }
}

/// Legacy completions `choices[].logprobs`: parallel arrays, one entry per token of the choice's
/// text (with `echo`, the prompt's tokens first: the very first has `null` logprobs, nothing
/// came before it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    /// Alternatives per position as `{token: logprob}`.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Byte offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends one token: its text, logprob and alternatives (`None`: not scored) and its
    /// offset in the text.
    pub fn push(
        &mut self,
        token: String,
        scored: Option<(f32, &[(String, f32)])>,
        text_offset: usize,
    ) {
        self.tokens.push(token);
        self.token_logprobs.push(scored.map(|(lp, _)| finite(lp)));
        let top =
            scored.map(|(_, top)| top.iter().map(|(t, lp)| (t.clone(), finite(*lp))).collect());
        self.top_logprobs.push(top);
        self.text_offset.push(text_offset);
    }

    /// Appends `other`, whose offsets were counted from the same text.
    pub fn extend(&mut self, other: CompletionLogprobs) {
        self.tokens.extend(other.tokens);
        self.token_logprobs.extend(other.token_logprobs);
        self.top_logprobs.extend(other.top_logprobs);
        self.text_offset.extend(other.text_offset);
    }
}

/// vLLM's `prompt_logprobs`: per prompt position, `null` for the first (nothing precedes it),
/// then the prompt's token and its most likely alternatives, keyed by token id.
pub type PromptLogprobs = Vec<Option<BTreeMap<String, PromptTokenLogprob>>>;

/// One token of a `prompt_logprobs` position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PromptTokenLogprob {
    pub logprob: f32,
    /// 1-based place in the vocabulary's ranking at that position.
    pub rank: u32,
    /// The token's text.
    pub decoded_token: String,
}

impl PromptTokenLogprob {
    pub fn new(logprob: f32, rank: u32, decoded_token: String) -> Self {
        PromptTokenLogprob {
            logprob: finite(logprob),
            rank,
            decoded_token,
        }
    }
}
