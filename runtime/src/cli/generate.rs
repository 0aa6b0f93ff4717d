//! `caduceus generate`: completes one or more prompts as one batch and prints text or JSON.

use anyhow::Context;

use super::ModelArg;
use crate::chat_template::ChatMessage;
use std::path::PathBuf;
use std::sync::Arc;

use crate::adapters::peft::AdapterLimits;
use crate::adapters::{AdapterRegistry, AdapterService, AdapterSettings, SlotFormat};
use crate::generate::scheduler_config_for;
use crate::generate::{generate_with_adapters, FinishReason, GenerateRequest};
use crate::model::loader::LoadedModel;
use crate::model::{LoraDtype, WeightFormat};
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
    /// PEFT LoRA adapter folder. Once: every prompt uses it. Once per prompt (in order): each
    /// prompt its own, `none` for the base model, all in one batch.
    #[arg(long, value_name = "PATH")]
    adapter: Vec<String>,
    /// Storage of the adapter slots (`f32` computes exactly what PEFT computes).
    #[arg(long, default_value = "f32", value_parser = ["f16", "f32", "q8"])]
    adapter_dtype: String,
}

/// The adapters of a run and each prompt's adapter name (`None`: the base model).
type PromptAdapters = (Option<Arc<AdapterService>>, Vec<Option<Arc<str>>>);

/// Registers the `--adapter` folders (named by position) and returns each prompt's adapter.
fn adapters_for(args: &GenerateArgs, loaded: &LoadedModel) -> anyhow::Result<PromptAdapters> {
    let n = args.prompt.len();
    if args.adapter.is_empty() {
        return Ok((None, vec![None; n]));
    }
    anyhow::ensure!(
        args.adapter.len() == 1 || args.adapter.len() == n,
        "--adapter is given {} times for {n} prompts: give it once (all prompts) or once per prompt",
        args.adapter.len()
    );
    let registry = AdapterRegistry::empty();
    let mut names = Vec::with_capacity(args.adapter.len());
    let mut max_rank = 1;
    for (i, path) in args.adapter.iter().enumerate() {
        if path == "none" {
            names.push(None);
            continue;
        }
        let info = crate::adapters::peft::probe(PathBuf::from(path).as_path())
            .with_context(|| format!("reading the adapter {path}"))?;
        max_rank = max_rank.max(info.rank);
        let name = format!("adapter-{i}");
        let dir = std::fs::canonicalize(path).with_context(|| format!("adapter {path}"))?;
        registry.register(&name, dir, false)?;
        names.push(Some(Arc::<str>::from(name)));
    }
    let dtype = match args.adapter_dtype.as_str() {
        "f16" => LoraDtype::F16,
        "q8" => LoraDtype::Q8,
        _ => LoraDtype::F32,
    };
    let settings = AdapterSettings {
        max_loras: names.iter().flatten().count().max(1),
        max_cpu_loras: names.len().max(1),
        max_cpu_lora_bytes: usize::MAX,
        limits: AdapterLimits {
            max_rank,
            max_file_bytes: u64::MAX,
        },
        format: SlotFormat::Host(dtype),
        loader_share_percent: 5,
        loader_threads: None,
    };
    let base = loaded.model.config().clone();
    let service = Arc::new(AdapterService::new(registry, base, settings));
    let per_prompt = if names.len() == 1 {
        vec![names[0].clone(); n]
    } else {
        names
    };
    Ok((Some(service), per_prompt))
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
    let (adapters, per_prompt) = adapters_for(&args, &loaded)?;
    let mut requests = Vec::with_capacity(args.prompt.len());
    for (text, adapter) in args.prompt.iter().zip(per_prompt) {
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
            adapter,
        });
    }
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt_ids.clone()).collect();
    let config = scheduler_config_for(
        &requests,
        args.block_size,
        args.max_batch_tokens,
        loaded.max_model_len(),
    );
    let eos = loaded.tokenizer.eos_ids();
    let outputs = generate_with_adapters(&loaded.model, eos, requests, config, adapters)?;
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
