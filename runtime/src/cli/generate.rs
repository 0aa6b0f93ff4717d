//! `caduceus generate`: completes one or more prompts as one batch and prints text or JSON.

use anyhow::Context;

use super::ModelArg;
use crate::chat_template::ChatMessage;
use crate::generate::{generate, FinishReason, GenerateOptions, GenerateRequest};
use crate::model::loader::LoadedModel;
use crate::model::WeightFormat;
use crate::sampling::SamplingParams;

/// Arguments of `caduceus generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt text; repeat the flag to run several prompts as one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Render each prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to generate per prompt.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature (0 = greedy, the default here for reproducible runs).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Top-k cut-off (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus cut-off (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object per prompt, one per line, in order.
    #[arg(long)]
    json: bool,
    /// Hold the weights as `native` (quantized stays quantized) or `f32` (all dequantized).
    #[arg(long, default_value = "native", value_parser = ["native", "f32"])]
    weights: String,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most tokens per forward pass (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
}

pub(super) fn run(args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.block_size >= 1, "--block-size must be at least 1");
    let weights = if args.weights == "f32" {
        WeightFormat::F32
    } else {
        WeightFormat::Native
    };
    let loaded = LoadedModel::load_with(&args.model.model, weights)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: args.top_p,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let mut requests = Vec::with_capacity(args.prompt.len());
    for text in &args.prompt {
        let rendered = if args.chat {
            let messages = [ChatMessage {
                role: "user".into(),
                content: text.clone(),
            }];
            loaded
                .chat_template
                .render(&messages, true)
                .context("rendering the chat template")?
        } else {
            text.clone()
        };
        let prompt_ids = loaded.tokenizer.encode(&rendered)?;
        requests.push(GenerateRequest {
            prompt_ids,
            params: params.clone(),
            max_tokens: args.max_tokens,
            ignore_eos: args.ignore_eos,
        });
    }
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt_ids.clone()).collect();
    let opts = GenerateOptions {
        block_size: args.block_size,
        max_batch_tokens: args.max_batch_tokens,
        max_model_len: loaded.max_model_len(),
    };
    let outputs = generate(&loaded.model, loaded.tokenizer.eos_ids(), requests, opts)?;
    for (prompt_ids, out) in prompts.iter().zip(&outputs) {
        let text_ids = match out.finish_reason {
            FinishReason::Stop => &out.token_ids[..out.token_ids.len().saturating_sub(1)],
            FinishReason::Length => &out.token_ids[..],
        };
        let text = loaded.tokenizer.decode(text_ids, true)?;
        if args.json {
            let obj = serde_json::json!({
                "prompt_token_ids": prompt_ids,
                "token_ids": out.token_ids,
                "text": text,
                "finish_reason": out.finish_reason,
            });
            println!("{obj}");
        } else {
            println!("{text}");
        }
    }
    Ok(())
}
