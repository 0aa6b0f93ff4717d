//! Rendering a model's Jinja chat template the way Hugging Face's `apply_chat_template` does.
//!
//! Models ship their prompt format as a Jinja2 template written against Python's Jinja: HF
//! renders it with `trim_blocks` and `lstrip_blocks`, the loop-controls extension, and the globals
//! `raise_exception` and `strftime_now`, and its `tojson` is Python's `json.dumps` (no HTML
//! escaping, `", "`/`": "` separators). Templates also call Python string methods (`.strip()`,
//! `.startswith()`), which minijinja-contrib's `pycompat` supplies. A prompt that differs by one
//! space tokenizes differently, so each of these details matters.

use std::collections::BTreeMap;

use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

mod pyjson;
mod strftime;

use pyjson::tojson;

use crate::tokenizer::AddedTokens;

/// One chat turn as the OpenAI-style API and the templates see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// How a conversation is rendered: Hugging Face `apply_chat_template`'s arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderOptions {
    /// End with the header that opens the assistant's turn.
    pub add_generation_prompt: bool,
    /// End right after the last message's content, so the model continues it (HF's and
    /// vLLM's `continue_final_message`).
    pub continue_final_message: bool,
    /// Extra variables for the template: vLLM's `chat_template_kwargs` (never one of
    /// [`RESERVED_TEMPLATE_NAMES`]) and the request's `documents`.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
    /// Whether the tokenizer adds the model's BOS/EOS to the rendered text (a BOS the template
    /// wrote is never doubled).
    pub added_tokens: AddedTokens,
}

impl RenderOptions {
    /// What a chat completion renders by default: the conversation and the assistant's header.
    pub fn generation() -> Self {
        RenderOptions {
            add_generation_prompt: true,
            ..RenderOptions::default()
        }
    }
}

/// The template variables a request's `chat_template_kwargs` may not set: those the renderer
/// sets, and `documents`, which comes from a request field of its own.
pub const RESERVED_TEMPLATE_NAMES: &[&str] = &[
    "messages",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
    "documents",
];

/// Variables Hugging Face always passes (none unless given), which templates test with
/// `is none` / `is not none`: left undefined, `tools is not none` would hold.
const NONE_UNLESS_GIVEN: &[&str] = &["tools", "documents"];

/// Where `continue_final_message` ends `rendered`: right after the last occurrence of `content`
/// (the final message's), as Hugging Face cuts it: its stripped text is found from the end,
/// and its trailing whitespace is kept only where the template kept it. `None` when the
/// template did not render that text.
pub fn final_message_end(rendered: &str, content: &str) -> Option<usize> {
    let stripped = content.trim();
    if stripped.is_empty() {
        return None;
    }
    let at = rendered.rfind(stripped)?;
    let leading_trimmed = content.trim_start();
    Some(if rendered[at..].starts_with(leading_trimmed) {
        at + leading_trimmed.len()
    } else {
        at + stripped.len()
    })
}

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not parse: {0}")]
    Syntax(TemplateFailure),
    #[error("chat template failed to render: {0}")]
    Render(TemplateFailure),
    /// The template itself rejected the conversation (`raise_exception(...)`), e.g. roles that do
    /// not alternate; the message is the template's and is meant for the API caller.
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// A bounded template wrote more than its bound.
    #[error("chat template rendered more than {0} bytes")]
    TooLong(usize),
}

impl ChatTemplateError {
    /// What the log may hold of this error: no value the template read (see
    /// [`TemplateFailure::redacted`]; a raised message is the template's own text, which may quote
    /// the messages too).
    pub fn redacted(&self) -> String {
        match self {
            ChatTemplateError::Syntax(f) => format!("does not parse: {}", f.redacted()),
            ChatTemplateError::Render(f) => format!("failed to render: {}", f.redacted()),
            ChatTemplateError::Raised(_) => "raised an exception".into(),
            ChatTemplateError::TooLong(_) => self.to_string(),
        }
    }
}

/// What minijinja said of a template that failed. Its `detail` may quote values the template
/// read (an `include` of a message's text names it; an arithmetic overflow prints its operands),
/// so it goes back only to a caller who sent the template; the log takes [`Self::redacted`].
#[derive(Debug)]
pub struct TemplateFailure {
    /// minijinja's message, with its causes.
    pub detail: String,
    /// minijinja's class of error.
    pub kind: ErrorKind,
    /// The template line that failed, when minijinja knows it.
    pub line: Option<usize>,
}

impl TemplateFailure {
    fn of(e: &Error) -> TemplateFailure {
        TemplateFailure {
            detail: describe(e),
            kind: e.kind(),
            line: e.line(),
        }
    }

    /// The class of error and the template line, never a value the template read: what the log
    /// may hold of a failure of the model's own template on a patient's messages.
    pub fn redacted(&self) -> String {
        match self.line {
            Some(line) => format!("{:?} at template line {line}", self.kind),
            None => format!("{:?}", self.kind),
        }
    }
}

impl std::fmt::Display for TemplateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Bounds on a template the server did not choose (a request's own): how many template
/// instructions it may run (minijinja's fuel) and how many bytes it may write. They stop a
/// runaway loop or output; they are not a sandbox against a caller who means harm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RenderBounds {
    pub fuel: u64,
    pub max_output_bytes: usize,
}

const TEMPLATE_NAME: &str = "chat";

/// Standard ChatML, for models that ship no template.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template with the model's BOS/EOS strings; build once per model.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Set for a template the server did not choose.
    max_output_bytes: Option<usize>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are exposed to it as in HF (left undefined if `None`).
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatTemplateError::Syntax(TemplateFailure::of(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
            max_output_bytes: None,
        })
    }

    /// `source` compiled as a template of this model (its BOS/EOS strings), run within `bounds`.
    pub fn bounded(
        &self,
        source: &str,
        bounds: RenderBounds,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let mut t = ChatTemplate::new(source, self.bos_token.clone(), self.eos_token.clone())?;
        t.env.set_fuel(Some(bounds.fuel));
        t.max_output_bytes = Some(bounds.max_output_bytes);
        Ok(t)
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the header that
    /// opens the assistant's turn (HF's `apply_chat_template` semantics).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`Self::render`] with extra template variables (`kwargs`; names the renderer sets win;
    /// `tools` and `documents` are none unless `kwargs` gives them, as in HF).
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let mut ctx: BTreeMap<&str, Value> = kwargs
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from_serialize(v)))
            .collect();
        for name in NONE_UNLESS_GIVEN {
            ctx.entry(name).or_insert(Value::from(()));
        }
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        if let Some(bos) = &self.bos_token {
            ctx.insert("bos_token", Value::from(bos.as_str()));
        }
        if let Some(eos) = &self.eos_token {
            ctx.insert("eos_token", Value::from(eos.as_str()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(TemplateFailure::of(&e)))?;
        let Some(limit) = self.max_output_bytes else {
            return template.render(ctx).map_err(render_error);
        };
        let mut out = BoundedOutput {
            bytes: Vec::new(),
            limit,
        };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| {
                ChatTemplateError::Render(TemplateFailure {
                    detail: "wrote invalid UTF-8".into(),
                    kind: ErrorKind::WriteFailure,
                    line: None,
                })
            }),
            Err(_) if out.bytes.len() > limit => Err(ChatTemplateError::TooLong(limit)),
            Err(e) => Err(render_error(e)),
        }
    }

    /// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), the fallback for models without a template.
    pub fn chatml() -> ChatTemplate {
        // The source is a constant that the unit tests render, so compiling it cannot fail.
        ChatTemplate::new(CHATML, None, None).expect("the built-in ChatML template compiles")
    }
}

fn render_error(e: Error) -> ChatTemplateError {
    match raised_message(&e) {
        Some(msg) => ChatTemplateError::Raised(msg),
        None => ChatTemplateError::Render(TemplateFailure::of(&e)),
    }
}

/// A render target that refuses to grow past `limit` bytes (it keeps one byte more, so the
/// caller can tell the bound stopped it).
struct BoundedOutput {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = (self.limit + 1).saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&buf[..buf.len().min(room)]);
        if self.bytes.len() > self.limit {
            return Err(std::io::Error::other("rendered past the bound"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The error text plus the template line it points at, without minijinja's multi-line dump.
fn describe(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Marker attached to the error `raise_exception` returns, so `render` can tell it apart.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RaisedByTemplate(String);

fn raised_message(e: &Error) -> Option<String> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(raised) = s.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        source = s.source();
    }
    None
}

/// HF's `raise_exception(message)` global.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(
        Error::new(ErrorKind::InvalidOperation, "raise_exception called")
            .with_source(RaisedByTemplate(message)),
    )
}

/// HF's `strftime_now(format)` global: the current UTC time formatted like Python's strftime.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime::format_unix(&format, secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::chatml();
        let msgs = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(!t.render(&msgs, false).unwrap().ends_with("assistant\n"));
    }

    #[test]
    fn syntax_errors_are_reported_at_compile_time() {
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err}");
    }

    #[test]
    fn bounded_templates_stop_runaway_loops_and_output() {
        let model = ChatTemplate::new("{{ bos_token }}", Some("<s>".into()), None).unwrap();
        let bounds = RenderBounds {
            fuel: 10_000,
            max_output_bytes: 1000,
        };
        let msgs = [ChatMessage::new("user", "Hi")];
        let own = model
            .bounded(
                "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                bounds,
            )
            .unwrap();
        assert_eq!(own.render(&msgs, true).unwrap(), "<s>Hi", "the model's BOS");
        let long = model.bounded("{{ 'x' * 1001 }}", bounds).unwrap();
        assert!(matches!(
            long.render(&msgs, true),
            Err(ChatTemplateError::TooLong(1000))
        ));
        let exact = model.bounded("{{ 'x' * 1000 }}", bounds).unwrap();
        assert_eq!(exact.render(&msgs, true).unwrap().len(), 1000);
        let endless =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let err = model.bounded(endless, bounds).unwrap().render(&msgs, true);
        assert!(
            matches!(&err, Err(ChatTemplateError::Render(m)) if m.detail.contains("fuel")),
            "{err:?}"
        );
    }
}
