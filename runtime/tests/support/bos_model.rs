//! The shared tiny Llama with Llama 3's BOS handling: its tokenizer's post-processor prepends
//! `<s>` and its chat template starts with `bos_token` (the shared copy adds no BOS at all).

use std::path::Path;

use serde_json::Value;

const TINY_LLAMA_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/reference/tiny-llama/model"
);

/// The BOS id of the tiny Llama's vocabulary.
pub const BOS: u32 = 256;

/// Where the chat template is written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TemplateIn {
    /// `tokenizer_config.json`'s `chat_template` (older transformers).
    Config,
    /// `chat_template.jinja`, and none in the config (what transformers 5 saves).
    File,
}

/// The chat template: `<s>[user]hi</s>[assistant]` for one message "hi".
pub const TEMPLATE: &str =
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>\
                            {% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";

/// Writes the model into `dir`: weights and config copied, tokenizer files changed.
pub fn write_tiny_llama_with_bos(dir: &Path, template: TemplateIn) {
    let model = Path::new(TINY_LLAMA_MODEL);
    let read = |name: &str| -> Value {
        let text = std::fs::read_to_string(model.join(name))
            .unwrap_or_else(|e| panic!("{name} of the shared tiny Llama is missing: {e}"));
        serde_json::from_str(&text).unwrap()
    };
    let mut tokenizer = read("tokenizer.json");
    tokenizer["post_processor"] = serde_json::json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<s>", "type_id": 1}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS], "tokens": ["<s>"]}}});
    let mut config = read("tokenizer_config.json");
    match template {
        TemplateIn::Config => config["chat_template"] = Value::from(TEMPLATE),
        TemplateIn::File => std::fs::write(dir.join("chat_template.jinja"), TEMPLATE).unwrap(),
    }
    for (name, json) in [
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", config),
    ] {
        std::fs::write(dir.join(name), json.to_string()).unwrap();
    }
    for name in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(model.join(name), dir.join(name)).unwrap();
    }
}

/// Transformers' ids (5.25, tokenizers 0.23, on these files) for `apply_chat_template` of one
/// user message "hi" with the generation prompt: `<s>[user]hi</s>[assistant]`, one BOS.
pub const HF_CHAT_HI: [u32; 21] = [
    256, 58, 84, 82, 68, 81, 60, 71, 72, 257, 58, 64, 82, 82, 72, 82, 83, 64, 77, 83, 60,
];

/// Transformers' ids for the raw text "hi there", with the post-processor's BOS.
pub const HF_HI_THERE: [u32; 9] = [256, 71, 72, 220, 83, 71, 68, 81, 68];
