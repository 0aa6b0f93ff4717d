//! `caduceus make-adapters`: writes deterministic synthetic PEFT LoRA adapters ("doctors") for a
//! base model, reading only the model's hyper-parameters (GGUF metadata or `config.json`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::ModelArg;
use crate::adapters::make::SyntheticAdapters;
use crate::adapters::Projection;
use crate::model::config::LlamaConfig;
use crate::model::gguf::GgufFile;

/// Arguments of `caduceus make-adapters`.
#[derive(Debug, clap::Args)]
pub struct MakeAdaptersArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Directory to write `doctor-0000`, `doctor-0001`, ... into (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// How many adapters.
    #[arg(long)]
    count: usize,
    /// LoRA rank `r`.
    #[arg(long)]
    rank: usize,
    /// Comma-separated projections (`q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj`),
    /// or `all`.
    #[arg(long, default_value = "all")]
    targets: String,
    /// `lora_alpha` (default: twice the rank, so the scale is 2).
    #[arg(long)]
    alpha: Option<f32>,
    /// Random seed: the same seed writes byte-identical files.
    #[arg(long)]
    seed: u64,
}

pub(super) fn run(args: MakeAdaptersArgs) -> anyhow::Result<()> {
    let base = read_base_config(&args.model.model)?;
    let spec = SyntheticAdapters {
        count: args.count,
        rank: args.rank,
        targets: parse_targets(&args.targets)?,
        seed: args.seed,
        alpha: args.alpha.unwrap_or(2.0 * args.rank as f32),
        base_model_name: model_name(&args.model.model),
    };
    let dirs = spec.write(&base, &args.out)?;
    let bytes_each = dirs
        .first()
        .map(|d| std::fs::metadata(d.join(crate::adapters::peft::WEIGHTS_FILE)))
        .transpose()
        .context("reading back the first adapter")?
        .map_or(0, |m| m.len());
    println!(
        "wrote {} adapters (rank {}, alpha {}, {} targets, {} bytes each) to {}",
        dirs.len(),
        spec.rank,
        spec.alpha,
        spec.targets.len(),
        bytes_each,
        args.out.display()
    );
    Ok(())
}

/// The base model's hyper-parameters without loading its weights: GGUF metadata (memory-mapped)
/// or a Hugging Face directory's `config.json`.
fn read_base_config(path: &Path) -> anyhow::Result<LlamaConfig> {
    if !path.exists() {
        bail!(
            "model not found at {}; pass a GGUF file or a Hugging Face model directory with --model{}",
            path.display(),
            if path.ends_with(crate::model::DEFAULT_MODEL_PATH) {
                " (or fetch the default one with `scripts/fetch-default-model`)"
            } else {
                ""
            }
        );
    }
    let config = if path.is_dir() {
        let file = path.join("config.json");
        let json = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        LlamaConfig::from_hf_json(&json)?
    } else {
        LlamaConfig::from_gguf(&GgufFile::open(path)?)?
    };
    Ok(config)
}

/// `all`, or a comma-separated list of PEFT module names.
fn parse_targets(list: &str) -> anyhow::Result<Vec<Projection>> {
    if list.trim() == "all" {
        return Ok(Projection::ALL.to_vec());
    }
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|name| {
            Projection::from_module_name(name).with_context(|| {
                format!(
                    "unknown target {name:?}: expected `all` or a comma-separated list of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                )
            })
        })
        .collect()
}

/// The file stem of a GGUF file or the directory name, recorded as `base_model_name_or_path`.
fn model_name(path: &Path) -> Option<String> {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
}
