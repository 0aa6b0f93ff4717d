//! Chat templates rendered as Hugging Face's `apply_chat_template` renders them. Expected strings
//! come from independent implementations: llama.cpp's rendered prompts for the default model
//! (shared/reference/smollm2-greedy.json) and Python Jinja2 3.1 configured as transformers does
//! (sandboxed, trim_blocks, lstrip_blocks, loopcontrols, `json.dumps` as `tojson`).

#[path = "support/fetched.rs"]
mod fetched;

use caduceus_runtime::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use caduceus_runtime::model::gguf::GgufFile;

const SMOLLM2_REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/smollm2-greedy.json"
);

/// Meta's Llama 3 Instruct template.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Exercises what real templates lean on: namespace(), loop controls, Python string methods,
/// tojson, and HF's whitespace control (trim_blocks + lstrip_blocks on an indented template).
const FEATURES: &str = r#"{{ bos_token }}
{% set ns = namespace(system='', turns=0) %}
{% if messages[0].role == 'system' %}
    {% set ns.system = messages[0].content.strip() %}
{% endif %}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    {% if message.content.startswith('skip:') %}
        {% continue %}
    {% endif %}
    {% if ns.turns >= 3 %}
        {% break %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
[{{ loop.index }}] {{ message.role.upper() }}: {{ message.content.split(',') | join(' /') }}
    {% if message.role == 'assistant' %}
{{ eos_token }}
    {% endif %}
{% endfor %}
meta={{ {"system": ns.system, "turns": ns.turns, "tags": ["a<b", "é"]} | tojson }}
{% if add_generation_prompt %}
ASSISTANT:
{%- endif %}
"#;

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "  You are terse.  "),
        ChatMessage::new("user", "Hello, doctor"),
        ChatMessage::new("assistant", "Hi! How can I help?"),
        ChatMessage::new("user", "skip: this one"),
        ChatMessage::new("user", "What is a normal pulse?"),
    ]
}

#[test]
fn default_model_template_reproduces_reference_prompts() {
    let Some(path) = fetched::default_model() else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let source = gguf
        .get_str("tokenizer.chat_template")
        .expect("the default model has a chat template");
    let template = ChatTemplate::new(
        source,
        Some("<|im_start|>".into()),
        Some("<|im_end|>".into()),
    )
    .unwrap();
    let text = std::fs::read_to_string(SMOLLM2_REFERENCE).unwrap_or_else(|e| {
        panic!("{SMOLLM2_REFERENCE} is missing ({e}); it lives in shared/reference")
    });
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut chat_cases = 0;
    for case in reference["cases"].as_array().unwrap() {
        if case["kind"] != "chat" {
            continue;
        }
        chat_cases += 1;
        let message = case["message"].as_str().unwrap();
        let rendered = template
            .render(&[ChatMessage::new("user", message)], true)
            .unwrap();
        assert_eq!(rendered, case["prompt_text"].as_str().unwrap());
    }
    assert!(chat_cases > 0);

    // With its own system message the default one is left out, and turns follow in order.
    let rendered = template.render(&conversation()[..3], false).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\n  You are terse.  <|im_end|>\n<|im_start|>user\nHello, doctor<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n"
    );
}

#[test]
fn system_user_assistant_turns_in_chatml() {
    let rendered = ChatTemplate::chatml()
        .render(&conversation()[..3], true)
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\n  You are terse.  <|im_end|>\n<|im_start|>user\nHello, doctor<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn llama3_template_with_bos_token() {
    let template = ChatTemplate::new(
        LLAMA3,
        Some("<|begin_of_text|>".into()),
        Some("<|eot_id|>".into()),
    )
    .unwrap();
    let rendered = template.render(&conversation(), true).unwrap();
    assert_eq!(
        rendered,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello, doctor<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nskip: this one<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is a normal pulse?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn python_features_render_as_jinja2() {
    let template = ChatTemplate::new(FEATURES, Some("<s>".into()), Some("</s>".into())).unwrap();
    let mut messages = conversation();
    messages.push(ChatMessage::new("user", "after break"));
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<s>\n[2] USER: Hello / doctor\n[3] ASSISTANT: Hi! How can I help?\n</s>\n[5] USER: What is a normal pulse?\nmeta={\"system\": \"You are terse.\", \"turns\": 3, \"tags\": [\"a<b\", \"é\"]}\nASSISTANT:"
    );
    assert_eq!(
        template.render(&messages[1..3], false).unwrap(),
        "<s>\n[1] USER: Hello / doctor\n[2] ASSISTANT: Hi! How can I help?\n</s>\nmeta={\"system\": \"\", \"turns\": 2, \"tags\": [\"a<b\", \"é\"]}\n"
    );
}

#[test]
fn raise_exception_is_a_clean_error() {
    let source = "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ m.content }}{% endfor %}";
    let template = ChatTemplate::new(source, None, None).unwrap();
    let ok = [
        ChatMessage::new("user", "a"),
        ChatMessage::new("assistant", "b"),
    ];
    assert_eq!(template.render(&ok, false).unwrap(), "ab");
    let bad = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    match template.render(&bad, false) {
        Err(ChatTemplateError::Raised(msg)) => {
            assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            )
        }
        other => panic!("expected Raised, got {other:?}"),
    }
}

#[test]
fn missing_bos_token_is_undefined_not_none() {
    let template = ChatTemplate::new(
        "[{{ bos_token }}]{% if eos_token is defined %}eos{% endif %}",
        None,
        None,
    )
    .unwrap();
    assert_eq!(template.render(&[], false).unwrap(), "[]");
}

#[test]
fn strftime_now_formats_the_current_date() {
    let template = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", None, None).unwrap();
    let date = template.render(&[], false).unwrap();
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date}");
    assert!(
        parts[0].len() == 2 && parts[0].chars().all(|c| c.is_ascii_digit()),
        "{date}"
    );
    assert!(
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
            .contains(&parts[1]),
        "{date}"
    );
    assert!(parts[2].parse::<u32>().unwrap() >= 2024, "{date}");
}

#[test]
fn render_errors_are_reported() {
    let template =
        ChatTemplate::new("{{ messages[0].content.no_such_method() }}", None, None).unwrap();
    let err = template
        .render(&[ChatMessage::new("user", "x")], false)
        .unwrap_err();
    assert!(matches!(err, ChatTemplateError::Render(_)), "{err}");
}

#[test]
fn continue_final_message_cuts_where_hugging_face_does() {
    use caduceus_runtime::chat_template::final_message_end;
    let end = |rendered: &str, content: &str| final_message_end(rendered, content);
    // The template kept the message's trailing space: so does the cut.
    let kept = "<u>Hi</u><a>Dr. Lin, </a>";
    assert_eq!(end(kept, "Dr. Lin, "), Some("<u>Hi</u><a>Dr. Lin, ".len()));
    // The template trimmed it: the cut ends at the text it rendered.
    assert_eq!(
        end("<a>Dr. Lin,</a>", "Dr. Lin, "),
        Some("<a>Dr. Lin,".len())
    );
    assert_eq!(
        end("<a>Dr. Lin,</a>", "  Dr. Lin,"),
        Some("<a>Dr. Lin,".len())
    );
    // The last occurrence is the final message's.
    assert_eq!(
        end("<u>ok</u><a>ok</a>", "ok"),
        Some("<u>ok</u><a>ok".len())
    );
    // Nothing to continue, or not rendered.
    assert_eq!(end("<a></a>", "  "), None);
    assert_eq!(end("<a>x</a>", "y"), None);
}

/// Hugging Face always passes `tools` and `documents` (none unless given), so a template's
/// `is none` / `is not none` tests see none, not undefined; `kwargs` may give `tools`.
#[test]
fn tools_and_documents_are_none_unless_given() {
    let template = ChatTemplate::new(
        "{{ tools is none }}/{{ documents is none }}/{{ tools is defined }}",
        None,
        None,
    )
    .unwrap();
    let msgs = [ChatMessage::new("user", "x")];
    assert_eq!(template.render(&msgs, false).unwrap(), "True/True/True");
    let kwargs = serde_json::json!({"tools": [{"type": "function"}], "documents": []});
    let given = template
        .render_with(&msgs, false, kwargs.as_object().unwrap())
        .unwrap();
    assert_eq!(given, "False/False/True");
}
