//! vLLM's `POST /tokenize` and `POST /detokenize`: the ids the server would feed the model for a
//! prompt or a conversation (so a client can fit a conversation into `max_model_len` before it
//! asks), and the text of ids.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::chat_template::ChatMessage;
use crate::tokenizer::AddedTokens;

use super::chat::ChatMessageParam;
use super::chat_options::{render_options, ChatTemplateOptions, Rendering};
use super::convert::convert_messages;
use super::validate::{invalid, ValidationError};

/// Exactly one of `prompt` (as `/v1/completions` tokenizes it) or `messages` (as
/// `/v1/chat/completions` renders and tokenizes them). Fields the server would not honour are
/// refused, not ignored.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<ChatMessageParam>>,
    /// With `messages`, as in chat: end with the template's assistant header (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// With `messages`, as in chat: end inside the last (assistant) message.
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    /// With `messages`, as in chat: extra variables for the chat template.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// With `messages`, as in chat: the caller's own chat template (where trusted).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// With `messages`, as in chat: documents for the chat template.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub documents: Option<Vec<super::chat_options::Document>>,
    /// Also return each id's vocabulary entry (`token_strs`).
    #[serde(default)]
    pub return_token_strs: Option<bool>,
    /// As in the endpoint tokenized for: `false` leaves out the model's BOS/EOS.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
}

/// The ids of a tokenized prompt or conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each id's vocabulary entry, when `return_token_strs` was true.
    pub token_strs: Option<Vec<String>>,
}

/// Ids to turn back into text.
#[derive(Clone, Debug, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// The text of the ids (special tokens included).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// What a tokenize request asks to tokenize.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizeInput {
    Prompt {
        text: String,
        added: AddedTokens,
    },
    Chat {
        messages: Vec<ChatMessage>,
        rendering: Rendering,
    },
}

/// Checks a tokenize request: one input, and the chat-template options only with `messages`.
pub fn validate_tokenize(req: TokenizeRequest) -> Result<TokenizeInput, ValidationError> {
    let template = ChatTemplateOptions {
        add_generation_prompt: req.add_generation_prompt,
        continue_final_message: req.continue_final_message,
        chat_template_kwargs: req.chat_template_kwargs,
        chat_template: req.chat_template,
        documents: req.documents,
        add_special_tokens: req.add_special_tokens,
    };
    match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            let chat_only = [
                (
                    "add_generation_prompt",
                    template.add_generation_prompt.is_some(),
                ),
                (
                    "continue_final_message",
                    template.continue_final_message.is_some(),
                ),
                (
                    "chat_template_kwargs",
                    template.chat_template_kwargs.is_some(),
                ),
                ("chat_template", template.chat_template.is_some()),
                ("documents", template.documents.is_some()),
            ];
            if let Some((field, _)) = chat_only.iter().find(|(_, sent)| *sent) {
                return Err(invalid(field, "applies to `messages` only"));
            }
            Ok(TokenizeInput::Prompt {
                text: prompt,
                added: AddedTokens::from_request(template.add_special_tokens),
            })
        }
        (None, Some(messages)) => {
            let messages = convert_messages(messages)?;
            let rendering = render_options(template, &messages)?;
            Ok(TokenizeInput::Chat {
                messages,
                rendering,
            })
        }
        _ => Err(invalid(
            "prompt",
            "send exactly one of `prompt` or `messages`",
        )),
    }
}
