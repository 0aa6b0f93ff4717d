//! Tools on the default model's chat format: the tool list goes into the system prompt, the
//! model answers `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>` (forced by a
//! grammar for `required` / a named function, allowed as the first character's choice for
//! `auto`), and the answer is parsed back into OpenAI's `tool_calls`, whole or streamed.

use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value};

use super::protocol::{
    FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta, ToolMode, ToolPlan, TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
};
use crate::chat_template::ChatMessage;
use crate::structured::{with_json_layout, ConstraintSpec};

/// Most calls in one answer with `parallel_tool_calls`.
const MAX_PARALLEL_CALLS: usize = 8;

/// Adds the tool list and the call format to the system prompt (appended to the first system
/// message, or a system message of its own in front).
pub fn add_tools_prompt(messages: &mut Vec<ChatMessage>, plan: &ToolPlan) {
    let tools: Vec<String> = plan
        .tools
        .iter()
        .map(|f| json!({"type": "function", "function": f}).to_string())
        .collect();
    let text = format!(
        "You can call functions. Their JSON schemas:\n<tools>\n{}\n</tools>\nTo call functions, \
         answer only {TOOL_CALL_OPEN}[{{\"name\": <function name>, \"arguments\": <arguments \
         object>}}]{TOOL_CALL_CLOSE}",
        tools.join("\n")
    );
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{text}", first.content);
        }
        _ => messages.insert(0, ChatMessage::new("system", text)),
    }
}

/// The grammar of the answer: calls only (`required`, named), or calls or text not starting
/// with `<` (`auto`).
pub fn tool_constraint(plan: &ToolPlan) -> ConstraintSpec {
    let tools = plan.tools.iter().filter(|f| match &plan.mode {
        ToolMode::Named(name) => &f.name == name,
        _ => true,
    });
    let calls: Vec<Value> = tools
        .map(|f| {
            let params = f
                .parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object"}));
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        })
        .collect();
    let max_items = if plan.parallel { MAX_PARALLEL_CALLS } else { 1 };
    let schema = with_json_layout(json!({
        "type": "array",
        "items": {"anyOf": calls},
        "minItems": 1,
        "maxItems": max_items
    }));
    let open = Value::from(TOOL_CALL_OPEN);
    let close = Value::from(TOOL_CALL_CLOSE);
    let calls_rule = format!("calls: {open} %json {schema} {close}\n");
    let start = match plan.mode {
        ToolMode::Auto => "start: calls | TEXT\nTEXT: /[^<][\\s\\S]*/\n",
        ToolMode::Required | ToolMode::Named(_) => "start: calls\n",
    };
    ConstraintSpec::Lark(format!("{start}{calls_rule}"))
}

/// The calls an answer makes, if it is a complete tool-call answer.
pub fn parse_tool_calls(text: &str) -> Option<Vec<ToolCall>> {
    let body = text
        .trim()
        .strip_prefix(TOOL_CALL_OPEN)?
        .strip_suffix(TOOL_CALL_CLOSE)?;
    let items: Vec<Value> = serde_json::from_str(body).ok()?;
    // The arguments as the model wrote them (what streaming sends), when the layout is ours.
    let raw = partial_calls(body);
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let name = item.get("name")?.as_str()?.to_owned();
            let parsed = item.get("arguments")?;
            let arguments = match raw.get(i) {
                Some((Some(n), a))
                    if *n == name
                        && serde_json::from_str::<Value>(a).ok().as_ref() == Some(parsed) =>
                {
                    (*a).to_owned()
                }
                _ => parsed.to_string(),
            };
            Some(ToolCall {
                id: call_id(),
                kind: "function".into(),
                function: FunctionCall { name, arguments },
            })
        })
        .collect()
}

/// A fresh tool-call id (`call_` and 24 random alphanumerics).
fn call_id() -> String {
    format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24))
}

/// What one streamed piece of an answer becomes.
#[derive(Debug, Default, PartialEq)]
pub struct StreamPiece {
    /// Plain text (an `auto` answer that is not a call).
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCallDelta>,
}

/// Turns an answer's text, as it streams, into `delta.tool_calls`: each call's id and name
/// once its name is complete, then its arguments as they grow.
#[derive(Debug, Default)]
pub struct ToolCallStream {
    text: String,
    /// Decided: a call answer (`Some(true)`) or text (`Some(false)`).
    is_calls: Option<bool>,
    /// Per call: its id once the name was sent, and the argument bytes sent.
    sent: Vec<(String, usize)>,
}

impl ToolCallStream {
    /// Feeds new text.
    pub fn push(&mut self, piece: &str) -> StreamPiece {
        self.text.push_str(piece);
        let trimmed = self.text.trim_start();
        if self.is_calls.is_none() && !trimmed.is_empty() {
            self.is_calls = Some(trimmed.starts_with('<'));
            if self.is_calls == Some(false) {
                return StreamPiece {
                    content: Some(self.text.clone()),
                    tool_calls: Vec::new(),
                };
            }
        }
        match self.is_calls {
            Some(false) => StreamPiece {
                content: Some(piece.to_owned()),
                tool_calls: Vec::new(),
            },
            Some(true) => StreamPiece {
                content: None,
                tool_calls: self.new_deltas(),
            },
            None => StreamPiece::default(),
        }
    }

    /// Whether any call was streamed (the finish reason is then `tool_calls`).
    pub fn has_calls(&self) -> bool {
        !self.sent.is_empty()
    }

    fn new_deltas(&mut self) -> Vec<ToolCallDelta> {
        let body = self.text.trim_start();
        let body = body.strip_prefix(TOOL_CALL_OPEN).unwrap_or("");
        let mut out = Vec::new();
        for (i, (name, args)) in partial_calls(body).into_iter().enumerate() {
            let Some(name) = name else { break };
            if i == self.sent.len() {
                let id = call_id();
                out.push(ToolCallDelta {
                    index: i as u32,
                    id: Some(id.clone()),
                    kind: Some("function".into()),
                    function: FunctionCallDelta {
                        name: Some(name),
                        arguments: Some(String::new()),
                    },
                });
                self.sent.push((id, 0));
            }
            let Some((_, sent)) = self.sent.get_mut(i) else {
                break;
            };
            if args.len() > *sent {
                out.push(ToolCallDelta {
                    index: i as u32,
                    id: None,
                    kind: None,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: Some(args[*sent..].to_owned()),
                    },
                });
                *sent = args.len();
            }
        }
        out
    }
}

/// The calls of a partial `[{"name": "...", "arguments": {...}}, ...]`: each call's name once
/// its closing quote arrived, and the arguments text so far. Relies on the grammar's layout
/// (`name` before `arguments`, compact separators); anything else yields fewer calls.
fn partial_calls(body: &str) -> Vec<(Option<String>, &str)> {
    let mut calls = Vec::new();
    let bytes = body.as_bytes();
    let mut pos = 0;
    while let Some(rel) = body[pos..].find("{\"name\": \"") {
        let name_start = pos + rel + "{\"name\": \"".len();
        let Some(name_len) = body[name_start..].find('"') else {
            calls.push((None, ""));
            break;
        };
        let name = body[name_start..name_start + name_len].to_owned();
        let after_name = name_start + name_len + 1;
        let key = ", \"arguments\": ";
        if !body[after_name..].starts_with(key) {
            calls.push((Some(name), ""));
            break;
        }
        let args_start = after_name + key.len();
        let args_end = json_value_end(&bytes[args_start..]).map(|n| args_start + n);
        let end = args_end.unwrap_or(body.len());
        calls.push((Some(name), &body[args_start..end]));
        match args_end {
            Some(e) => pos = e,
            None => break,
        }
    }
    calls
}

/// Length of the JSON object or array at the start of `b`, if it is complete.
fn json_value_end(b: &[u8]) -> Option<usize> {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris \"}", "days": [1, 2]}}, {"name": "book", "arguments": {}}]</tool_call>"#;

    #[test]
    fn streamed_pieces_rebuild_the_whole_parse() {
        let whole = parse_tool_calls(ANSWER).unwrap();
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].function.name, "get_weather");
        let args: Value = serde_json::from_str(&whole[0].function.arguments).unwrap();
        assert_eq!(args["city"], "Paris \"}");
        // Every split into 3-byte pieces (at char boundaries: the answer is ASCII).
        let mut s = ToolCallStream::default();
        let mut names = Vec::new();
        let mut args_text = vec![String::new(); 2];
        for chunk in ANSWER.as_bytes().chunks(3) {
            let piece = s.push(std::str::from_utf8(chunk).unwrap());
            assert_eq!(piece.content, None);
            for d in piece.tool_calls {
                if let Some(n) = d.function.name {
                    assert!(d.id.unwrap().starts_with("call_"));
                    names.push(n);
                }
                args_text[d.index as usize].push_str(&d.function.arguments.unwrap_or_default());
            }
        }
        assert_eq!(names, ["get_weather", "book"]);
        for (got, want) in args_text.iter().zip(&whole) {
            assert_eq!(got, &want.function.arguments);
        }
        assert!(s.has_calls());
    }

    #[test]
    fn text_answers_stream_as_content() {
        let mut s = ToolCallStream::default();
        assert_eq!(s.push("  ").content, None);
        assert_eq!(s.push("Hi").content.as_deref(), Some("  Hi"));
        assert_eq!(s.push(" there").content.as_deref(), Some(" there"));
        assert!(!s.has_calls());
        assert_eq!(parse_tool_calls("Hi there"), None);
    }
}
