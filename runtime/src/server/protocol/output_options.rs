//! vLLM's text and token options ([`OutputOptions`]), checked into the settings the server and
//! the engine act on.

use super::validate::{invalid, out_of_range, ValidationError};

/// vLLM's request fields that shape the answer's text and tokens, as both endpoints read them
/// (each request type declares them, so a wrong type is a 400 naming the field).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct OutputOptions {
    pub include_stop_str_in_output: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub truncate_prompt_tokens: Option<i64>,
    pub allowed_token_ids: Option<Vec<u32>>,
    pub bad_words: Option<Vec<String>>,
    pub return_tokens_as_token_ids: Option<bool>,
}

/// How much of a prompt `truncate_prompt_tokens` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptTruncation {
    /// Its last `k` tokens.
    Last(usize),
    /// Its last `max_model_len` tokens (`-1`).
    ToContext,
}

impl PromptTruncation {
    /// Drops all but the kept tokens from the front of `ids`; true when any were dropped.
    pub fn apply(self, ids: &mut Vec<u32>, max_model_len: usize) -> bool {
        let keep = match self {
            PromptTruncation::Last(k) => k,
            PromptTruncation::ToContext => max_model_len,
        };
        let drop = ids.len().saturating_sub(keep);
        ids.drain(..drop);
        drop > 0
    }
}

/// The checked [`OutputOptions`] (`allowed_token_ids` goes to the sampling settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputSettings {
    /// The stop string or stop token that ended the answer ends its text.
    pub include_stop_str_in_output: bool,
    /// Special tokens are left out of the text.
    pub skip_special_tokens: bool,
    /// Prompt tokens dropped from the front, if any.
    pub truncate_prompt: Option<PromptTruncation>,
    /// Logprobs name tokens `token_id:{id}`.
    pub tokens_as_ids: bool,
}

impl Default for OutputSettings {
    fn default() -> Self {
        OutputSettings {
            include_stop_str_in_output: false,
            skip_special_tokens: true,
            truncate_prompt: None,
            tokens_as_ids: false,
        }
    }
}

/// Most `bad_words` one request may send (each becomes up to two token sequences).
pub const MAX_BAD_WORDS: usize = 64;
/// Longest `bad_words` entry in bytes.
pub const MAX_BAD_WORD_BYTES: usize = 256;

/// The token choices of [`OutputOptions`], for the sampling settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenChoices {
    /// `allowed_token_ids` (empty: all).
    pub allowed: Vec<u32>,
    /// `bad_words`, still text (the server tokenizes them).
    pub bad_words: Vec<String>,
}

/// Checks `o`; returns the settings and the token choices.
pub(super) fn output_settings(
    o: OutputOptions,
) -> Result<(OutputSettings, TokenChoices), ValidationError> {
    let truncate_prompt = match o.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(PromptTruncation::ToContext),
        Some(k) if k >= 1 => Some(PromptTruncation::Last(
            usize::try_from(k).unwrap_or(usize::MAX),
        )),
        Some(k) => {
            return Err(out_of_range(
                "truncate_prompt_tokens",
                k,
                "at least 1, or -1 (the model's context length)",
            ))
        }
    };
    let allowed = match o.allowed_token_ids {
        Some(ids) if ids.is_empty() => {
            return Err(invalid(
                "allowed_token_ids",
                "must list at least one token id (leave it out to allow all)",
            ))
        }
        ids => ids.unwrap_or_default(),
    };
    let bad_words = o.bad_words.unwrap_or_default();
    if bad_words.len() > MAX_BAD_WORDS {
        let allowed = format!("at most {MAX_BAD_WORDS} words");
        let value = format!("{} words", bad_words.len());
        return Err(out_of_range("bad_words", value, &allowed));
    }
    if let Some(w) =
        (bad_words.iter()).find(|w| w.trim().is_empty() || w.len() > MAX_BAD_WORD_BYTES)
    {
        let allowed = format!("words of 1 to {MAX_BAD_WORD_BYTES} bytes, not only spaces");
        return Err(out_of_range("bad_words", format!("{w:?}"), &allowed));
    }
    let settings = OutputSettings {
        include_stop_str_in_output: o.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: o.skip_special_tokens.unwrap_or(true),
        truncate_prompt,
        tokens_as_ids: o.return_tokens_as_token_ids.unwrap_or(false),
    };
    Ok((settings, TokenChoices { allowed, bad_words }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_the_last_tokens() {
        let mut ids = vec![1, 2, 3, 4, 5];
        assert!(PromptTruncation::Last(2).apply(&mut ids, 100));
        assert_eq!(ids, [4, 5]);
        assert!(!PromptTruncation::Last(9).apply(&mut ids, 100));
        assert_eq!(ids, [4, 5]);
        let mut ids = vec![1, 2, 3];
        assert!(PromptTruncation::ToContext.apply(&mut ids, 2));
        assert_eq!(ids, [2, 3]);
    }

    #[test]
    fn options_are_checked_and_default_as_vllm_does() {
        let (s, choices) = output_settings(OutputOptions::default()).unwrap();
        assert_eq!(s, OutputSettings::default());
        assert!(s.skip_special_tokens && choices == TokenChoices::default());
        let param = |o: OutputOptions| output_settings(o).unwrap_err().param().to_string();
        for k in [0, -2] {
            let o = OutputOptions {
                truncate_prompt_tokens: Some(k),
                ..Default::default()
            };
            assert_eq!(param(o), "truncate_prompt_tokens");
        }
        let o = OutputOptions {
            allowed_token_ids: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(param(o), "allowed_token_ids");
        for words in [
            vec![" ".to_string()],
            vec!["x".repeat(257)],
            vec!["w".into(); 65],
        ] {
            let o = OutputOptions {
                bad_words: Some(words),
                ..Default::default()
            };
            assert_eq!(param(o), "bad_words");
        }
        let o = OutputOptions {
            truncate_prompt_tokens: Some(-1),
            allowed_token_ids: Some(vec![7, 3]),
            skip_special_tokens: Some(false),
            ..Default::default()
        };
        let (s, choices) = output_settings(o).unwrap();
        assert_eq!(s.truncate_prompt, Some(PromptTruncation::ToContext));
        assert!(!s.skip_special_tokens);
        assert_eq!(choices.allowed, [7, 3]);
    }
}
