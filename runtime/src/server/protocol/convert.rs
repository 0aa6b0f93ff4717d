//! From wire shapes to engine inputs: chat messages for the template, prompts for the
//! tokenizer; each refusal names the exact element (`messages[2].role`).

use crate::chat_template::ChatMessage;

use super::chat::{ChatMessageParam, ContentPart, MessageContent};
use super::completion::Prompt;
use super::structured::tool_calls_text;
use super::validate::{invalid, out_of_range, PromptInput, ValidationError, MAX_PROMPTS};

pub(super) fn convert_messages(
    messages: Vec<ChatMessageParam>,
) -> Result<Vec<ChatMessage>, ValidationError> {
    if messages.is_empty() {
        return Err(invalid("messages", "must contain at least one message"));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
                return Err(out_of_range(
                    &format!("messages[{i}].role"),
                    format!("\"{}\"", m.role),
                    "one of \"system\", \"user\", \"assistant\", \"tool\"",
                ));
            }
            let mut content = match m.content {
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => join_parts(i, parts)?,
                None if m.role == "assistant" => String::new(),
                None => return Err(invalid(&format!("messages[{i}].content"), "is required")),
            };
            // An earlier answer's calls go back into the conversation as the model wrote them.
            if let Some(calls) = m
                .tool_calls
                .filter(|c| !c.is_empty() && m.role == "assistant")
            {
                content.push_str(&tool_calls_text(&calls));
            }
            Ok(ChatMessage::new(m.role, content))
        })
        .collect()
}

/// Text parts joined with newlines, as vLLM does.
fn join_parts(i: usize, parts: Vec<ContentPart>) -> Result<String, ValidationError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.into_iter().enumerate() {
        if part.kind != "text" {
            let param = format!("messages[{i}].content[{j}].type");
            return Err(out_of_range(
                &param,
                format!("\"{}\"", part.kind),
                "\"text\" (only text parts are supported)",
            ));
        }
        let text = part
            .text
            .ok_or_else(|| invalid(&format!("messages[{i}].content[{j}].text"), "is required"))?;
        texts.push(text);
    }
    Ok(texts.join("\n"))
}

pub(super) fn convert_prompt(prompt: Prompt) -> Result<Vec<PromptInput>, ValidationError> {
    let prompts: Vec<PromptInput> = match prompt {
        Prompt::Text(text) => vec![PromptInput::Text(text)],
        Prompt::Texts(texts) => texts.into_iter().map(PromptInput::Text).collect(),
        Prompt::Tokens(ids) => vec![PromptInput::Tokens(ids)],
        Prompt::TokenLists(lists) => lists.into_iter().map(PromptInput::Tokens).collect(),
    };
    if prompts.is_empty() {
        return Err(invalid("prompt", "must not be empty"));
    }
    if prompts.len() > MAX_PROMPTS {
        return Err(out_of_range(
            "prompt",
            format!("{} prompts", prompts.len()),
            &format!("at most {MAX_PROMPTS} prompts"),
        ));
    }
    if prompts
        .iter()
        .any(|p| matches!(p, PromptInput::Tokens(ids) if ids.is_empty()))
    {
        return Err(invalid("prompt", "must not contain an empty token list"));
    }
    Ok(prompts)
}
