//! vLLM's chat-template fields ([`ChatTemplateOptions`]: `add_generation_prompt`,
//! `continue_final_message`, `chat_template_kwargs`, `chat_template`, `documents`,
//! `add_special_tokens`), checked into how the conversation is rendered ([`Rendering`]).

use crate::chat_template::{ChatMessage, RenderOptions, RESERVED_TEMPLATE_NAMES};
use crate::tokenizer::AddedTokens;

use super::validate::{invalid, out_of_range, ValidationError};

/// How the model's chat template renders the conversation (Hugging Face `apply_chat_template`'s
/// arguments, as vLLM takes them on `/v1/chat/completions` and `/tokenize`).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct ChatTemplateOptions {
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    pub chat_template: Option<String>,
    pub documents: Option<Vec<Document>>,
    pub add_special_tokens: Option<bool>,
}

/// One document for a retrieval-augmented template (vLLM's `documents`: string fields such as
/// `title` and `text`, in the order sent).
pub type Document = serde_json::Map<String, serde_json::Value>;

/// Longest chat template a request may send (real ones are a few KiB).
pub const MAX_REQUEST_CHAT_TEMPLATE_BYTES: usize = 64 * 1024;

/// How a conversation is rendered: the template's arguments, and the template when the request
/// sent its own.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendering {
    pub options: RenderOptions,
    /// The request's own chat template (vLLM's `chat_template`): used instead of the model's
    /// only where `server.trust_request_chat_template` is on, else a 400.
    pub template: Option<String>,
}

/// Checks `o` against the conversation it renders.
pub(super) fn render_options(
    o: ChatTemplateOptions,
    messages: &[ChatMessage],
) -> Result<Rendering, ValidationError> {
    if let Some(t) = &o.chat_template {
        if t.trim().is_empty() || t.len() > MAX_REQUEST_CHAT_TEMPLATE_BYTES {
            return Err(out_of_range(
                "chat_template",
                format!("{} bytes long", t.len()),
                &format!("a template of 1 to {MAX_REQUEST_CHAT_TEMPLATE_BYTES} bytes"),
            ));
        }
    }
    let continue_final_message = o.continue_final_message.unwrap_or(false);
    if continue_final_message {
        if o.add_generation_prompt == Some(true) {
            return Err(invalid(
                "continue_final_message",
                "cannot be combined with `add_generation_prompt: true` (the prompt ends inside \
                 the last message, not after it)",
            ));
        }
        if messages.last().is_none_or(|m| m.role != "assistant") {
            return Err(invalid(
                "continue_final_message",
                "needs the last message to be the assistant's: the text the answer continues",
            ));
        }
    }
    let mut kwargs = o.chat_template_kwargs.unwrap_or_default();
    if let Some(name) = kwargs
        .keys()
        .find(|k| RESERVED_TEMPLATE_NAMES.contains(&k.as_str()))
    {
        return Err(invalid(
            &format!("chat_template_kwargs.{name}"),
            "is set by the server; send it as its own request field, if any",
        ));
    }
    if let Some(documents) = o.documents {
        kwargs.insert("documents".into(), documents_value(documents)?);
    }
    Ok(Rendering {
        options: RenderOptions {
            add_generation_prompt: o.add_generation_prompt.unwrap_or(!continue_final_message),
            continue_final_message,
            kwargs,
            added_tokens: AddedTokens::from_request(o.add_special_tokens),
        },
        template: o.chat_template,
    })
}

/// `documents` as the template reads them, once every field is checked to be a string (as vLLM
/// types them).
fn documents_value(documents: Vec<Document>) -> Result<serde_json::Value, ValidationError> {
    for (i, document) in documents.iter().enumerate() {
        if let Some((key, _)) = document.iter().find(|(_, v)| !v.is_string()) {
            return Err(invalid(
                &format!("documents[{i}].{key}"),
                "must be a string (a document is an object of string fields, e.g. `title` and \
                 `text`)",
            ));
        }
    }
    Ok(serde_json::Value::Array(
        documents
            .into_iter()
            .map(serde_json::Value::Object)
            .collect(),
    ))
}

/// Every string inside `kwargs` (keys included), for the special-token check, each with the
/// request field it came from: `documents`, or `chat_template_kwargs` for the rest.
pub fn template_strings(
    kwargs: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(&'static str, &str)> {
    fn walk<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::String(s) => out.push(s),
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| {
                out.push(k);
                walk(v, out);
            }),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (name, value) in kwargs {
        let (field, mut strings) = match name.as_str() {
            // Set by the server from the request's own field (a name `kwargs` may not take).
            "documents" => ("documents", Vec::new()),
            _ => ("chat_template_kwargs", vec![name.as_str()]),
        };
        walk(value, &mut strings);
        out.extend(strings.into_iter().map(|s| (field, s)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(last_role: &str) -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("user", "Hi"),
            ChatMessage::new(last_role, "Dr. Lin here"),
        ]
    }

    #[test]
    fn continuing_needs_an_assistant_message_last_and_no_generation_prompt() {
        let cont = |agp: Option<bool>| ChatTemplateOptions {
            add_generation_prompt: agp,
            continue_final_message: Some(true),
            ..ChatTemplateOptions::default()
        };
        let ok = render_options(cont(None), &conversation("assistant"))
            .unwrap()
            .options;
        assert!(ok.continue_final_message && !ok.add_generation_prompt);
        assert!(render_options(cont(Some(false)), &conversation("assistant")).is_ok());
        for (o, last) in [(cont(Some(true)), "assistant"), (cont(None), "user")] {
            let err = render_options(o, &conversation(last)).unwrap_err();
            assert_eq!(err.param(), "continue_final_message");
        }
        let plain = render_options(ChatTemplateOptions::default(), &conversation("user")).unwrap();
        assert_eq!(plain.options, RenderOptions::generation());
        assert_eq!(plain.template, None);
        for bad in [
            String::new(),
            " \n".into(),
            "x".repeat(MAX_REQUEST_CHAT_TEMPLATE_BYTES + 1),
        ] {
            let o = ChatTemplateOptions {
                chat_template: Some(bad),
                ..ChatTemplateOptions::default()
            };
            let err = render_options(o, &conversation("user")).unwrap_err();
            assert_eq!(err.param(), "chat_template");
        }
    }

    #[test]
    fn kwargs_may_not_replace_what_the_server_sets_and_their_strings_are_all_found() {
        let with = |kwargs: serde_json::Value| ChatTemplateOptions {
            chat_template_kwargs: kwargs.as_object().cloned(),
            ..ChatTemplateOptions::default()
        };
        let err = render_options(with(serde_json::json!({"messages": []})), &[]).unwrap_err();
        assert_eq!(err.param(), "chat_template_kwargs.messages");
        let kwargs = serde_json::json!({"enable_thinking": false, "doc": {"k": ["a", 1, "b"]}});
        let o = render_options(with(kwargs), &conversation("user")).unwrap();
        let mut found = template_strings(&o.options.kwargs);
        found.sort_unstable();
        let kw = "chat_template_kwargs";
        assert_eq!(
            found,
            [
                (kw, "a"),
                (kw, "b"),
                (kw, "doc"),
                (kw, "enable_thinking"),
                (kw, "k")
            ]
        );
    }
}
