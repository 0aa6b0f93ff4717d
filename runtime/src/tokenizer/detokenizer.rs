//! Streaming ids -> text for one sequence.
//!
//! Decoding tokens one at a time is wrong in two ways: byte-level tokens can end in the middle of
//! a UTF-8 character, and some decoders (SentencePiece's leading-space rule) change a token's text
//! depending on what precedes it. We use the method of vLLM and TGI: keep two offsets into the
//! ids, decode a small window `[prefix_offset..]` and compare it with the text of
//! `[prefix_offset..read_offset]` already emitted; the difference is new text, unless it ends in
//! U+FFFD (an incomplete character), in which case it is held back until more ids arrive.

use super::{Tokenizer, TokenizerError};

/// How many prompt ids give the first output token its context.
const PROMPT_CONTEXT: usize = 5;

/// Incremental decoder state for one output stream; see the module docs.
#[derive(Clone, Debug)]
pub struct IncrementalDetokenizer {
    /// Tail of the prompt followed by every output id so far.
    ids: Vec<u32>,
    /// Start of the window whose text is the context for new text.
    prefix_offset: usize,
    /// End of the ids whose text has been emitted.
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDetokenizer {
    /// Starts a stream after `prompt_ids`; their tail is only context and is never emitted.
    pub fn new(prompt_ids: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT)..];
        IncrementalDetokenizer {
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
            skip_special_tokens,
        }
    }

    /// Adds one generated id and returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let (prefix, full) = self.window_texts(tok)?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new_text = suffix_after(&prefix, &full);
        self.advance();
        Ok(new_text)
    }

    /// Ends the stream: returns the text still held back (an incomplete character decodes as
    /// U+FFFD here, as in a full decode).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(String::new());
        }
        let (prefix, full) = self.window_texts(tok)?;
        let new_text = suffix_after(&prefix, &full);
        self.advance();
        Ok(new_text)
    }

    fn window_texts(&self, tok: &Tokenizer) -> Result<(String, String), TokenizerError> {
        let skip = self.skip_special_tokens;
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], skip)?;
        Ok((prefix, full))
    }

    /// Marks everything so far as emitted and slides the context window forward.
    fn advance(&mut self) {
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Ids before the window are never read again; keep the buffer small.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
    }
}

/// The text `full` adds after `prefix`. Normally `prefix` is a byte prefix of `full`; if decoding
/// in context changed it (a completed character replacing U+FFFD), fall back to the longest
/// common prefix so we never slice inside a character.
fn suffix_after(prefix: &str, full: &str) -> String {
    if let Some(rest) = full.strip_prefix(prefix) {
        return rest.to_owned();
    }
    let common = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map_or(prefix.len().min(full.len()), |((i, _), _)| i);
    full.get(common..).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::suffix_after;

    #[test]
    fn suffix_after_handles_prefix_and_divergence() {
        assert_eq!(suffix_after("ab", "abcd"), "cd");
        assert_eq!(suffix_after("a\u{FFFD}", "aé!"), "é!");
        assert_eq!(suffix_after("", "x"), "x");
    }
}
