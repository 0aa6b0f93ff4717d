//! A chat prompt's token ids in which only the chat template's own markup can become control
//! tokens. A patient who types `<|im_start|>system` into a message must get those characters, not
//! a forged system turn, so message contents are tokenized with special-token parsing off.

use rand::distr::{Alphanumeric, SampleString};

use super::{AddedTokens, Tokenizer, TokenizerError};
use crate::chat_template::{
    final_message_end, ChatMessage, ChatTemplate, ChatTemplateError, RenderOptions,
};

/// A rendered chat prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatPrompt {
    /// The template's output for the messages as sent.
    pub text: String,
    pub token_ids: Vec<u32>,
}

/// Why a conversation could not become a prompt.
#[derive(Debug, thiserror::Error)]
pub enum ChatPromptError {
    #[error(transparent)]
    Template(#[from] ChatTemplateError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A message spells a special token and the template cuts or rearranges message text, so
    /// the server cannot tell its markup from the message's; refused rather than guessed.
    #[error(
        "a message contains the text of one of the model's special tokens, which this model's \
         chat template does not let the server keep apart from its own markup"
    )]
    Unseparable,
    /// `continue_final_message`, but the template did not render the last message's text (or
    /// it has none) so there is no place to end the prompt.
    #[error(
        "`continue_final_message` needs the last message's text in the rendered conversation, \
         and this model's chat template did not render it"
    )]
    FinalMessageNotRendered,
}

/// Renders `messages` as `how` says and tokenizes the result. When no message spells a special
/// token (the usual case) the whole text is tokenized at once, exactly as Hugging Face does.
/// Otherwise the template is rendered a second time with each content wrapped in random
/// markers: the text between markers is tokenized as plain text, the rest (the template's
/// markup) with special tokens. That second rendering keeps the contents' outer whitespace,
/// which a template's `trim` would otherwise remove. With `continue_final_message` the prompt
/// ends where the last message's content does ([`final_message_end`]; in the marked rendering,
/// at its closing marker).
pub fn encode_chat(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    how: &RenderOptions,
) -> Result<ChatPrompt, ChatPromptError> {
    let add = how.add_generation_prompt;
    let mut text = template.render_with(messages, add, &how.kwargs)?;
    if how.continue_final_message {
        let content = messages.last().map_or("", |m| m.content.as_str());
        let end =
            final_message_end(&text, content).ok_or(ChatPromptError::FinalMessageNotRendered)?;
        text.truncate(end);
    }
    if !messages
        .iter()
        .any(|m| tokenizer.spells_special_token(&m.content))
    {
        let token_ids = match how.added_tokens {
            AddedTokens::Model => tokenizer.encode(&text)?,
            AddedTokens::None => tokenizer.encode_segments(&[(&text, true)], AddedTokens::None)?,
        };
        return Ok(ChatPrompt { text, token_ids });
    }
    let (open, close) = markers(messages);
    let marked: Vec<ChatMessage> = messages
        .iter()
        .map(|m| ChatMessage::new(m.role.clone(), format!("{open}{}{close}", m.content)))
        .collect();
    let mut rendered = template.render_with(&marked, add, &how.kwargs)?;
    if how.continue_final_message {
        let end = rendered.rfind(&close).ok_or(ChatPromptError::Unseparable)?;
        rendered.truncate(end + close.len());
    }
    let segments = split_marked(&rendered, &open, &close).ok_or(ChatPromptError::Unseparable)?;
    let token_ids = tokenizer.encode_segments(&segments, how.added_tokens)?;
    Ok(ChatPrompt { text, token_ids })
}

/// An opening and a closing marker that no message contains (random, so a client cannot plant
/// them).
fn markers(messages: &[ChatMessage]) -> (String, String) {
    loop {
        let nonce = Alphanumeric.sample_string(&mut rand::rng(), 24);
        let open = format!("\u{E000}{nonce}\u{E001}");
        let close = format!("\u{E001}{nonce}\u{E000}");
        if !messages.iter().any(|m| m.content.contains(&nonce)) {
            return (open, close);
        }
    }
}

/// `(text, parse_special)` segments: markup outside markers, contents inside. `None` when the
/// markers do not pair up (the template cut a content).
fn split_marked<'a>(rendered: &'a str, open: &str, close: &str) -> Option<Vec<(&'a str, bool)>> {
    let mut segments = Vec::new();
    let mut rest = rendered;
    while let Some(start) = rest.find(open) {
        let markup = &rest[..start];
        if markup.contains(close) {
            return None;
        }
        segments.push((markup, true));
        let inner = &rest[start + open.len()..];
        let end = inner.find(close)?;
        let content = &inner[..end];
        if content.contains(open) {
            return None;
        }
        segments.push((content, false));
        rest = &inner[end + close.len()..];
    }
    if rest.contains(close) {
        return None;
    }
    segments.push((rest, true));
    segments.retain(|(s, _)| !s.is_empty());
    Some(segments)
}

#[cfg(test)]
mod tests {
    use super::split_marked;

    #[test]
    fn markers_split_markup_from_contents_and_refuse_broken_pairs() {
        let s = split_marked("<a>[x]<b>[y]", "[", "]").unwrap();
        assert_eq!(
            s,
            vec![("<a>", true), ("x", false), ("<b>", true), ("y", false)]
        );
        assert_eq!(
            split_marked("plain", "[", "]").unwrap(),
            vec![("plain", true)]
        );
        assert_eq!(split_marked("<a>[x", "[", "]"), None);
        assert_eq!(split_marked("<a>x]", "[", "]"), None);
        assert_eq!(split_marked("[a[b]]", "[", "]"), None);
    }
}
