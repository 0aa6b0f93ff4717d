//! `caduceus gpu-bench`: builds a random-weight model of a given shape on the GPU (Llama-3-8B in
//! bf16 by default; no weights can be downloaded on the GPU machine) and writes ONE JSON object:
//! the GPU, driver and datasheet figures, then decode step times, prefill throughput, multi-LoRA
//! decode and the whole engine's output tokens/s, each next to its roofline
//! (`gpu::roofline`). Every part's size is a flag; the defaults fit ~6 minutes on an H200.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use caduceus_kernels::gpu::attention::AttentionKernel;
use caduceus_kernels::gpu::{DType, Device};
use serde_json::json;

use crate::gpu::bench::{run_model_parts, ModelBenchOptions};
use crate::gpu::bench_engine::{run_engine_part, EngineBenchOptions};
use crate::gpu::random_model::random_gpu_model;
use crate::gpu::roofline::{spec_for, ModelShape, GPU_SPECS};

/// Arguments of `caduceus gpu-bench`.
#[derive(Debug, clap::Args)]
pub struct GpuBenchArgs {
    /// `cuda:N` (or `emu`, the kernels' host emulation, in builds with `gpu-emu`).
    #[arg(long, default_value = "cuda:0")]
    device: String,
    /// Compute dtype: bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = ModelShape::LLAMA3_8B.hidden)]
    hidden: usize,
    #[arg(long, default_value_t = ModelShape::LLAMA3_8B.layers)]
    layers: usize,
    #[arg(long, default_value_t = ModelShape::LLAMA3_8B.heads)]
    heads: usize,
    #[arg(long, default_value_t = ModelShape::LLAMA3_8B.kv_heads)]
    kv_heads: usize,
    #[arg(long, default_value_t = ModelShape::LLAMA3_8B.head_dim)]
    head_dim: usize,
    #[arg(long, default_value_t = ModelShape::LLAMA3_8B.ffn)]
    ffn: usize,
    #[arg(long, default_value_t = ModelShape::LLAMA3_8B.vocab)]
    vocab: usize,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    batches: Vec<usize>,
    /// Context of every decoding sequence (tokens).
    #[arg(long, default_value_t = 1024)]
    context: usize,
    /// Untimed steps before each timed configuration.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed decode steps per configuration (prefill runs a quarter as many).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Prompt length of the prefill part (0 skips it).
    #[arg(long, default_value_t = 2048)]
    prefill_len: usize,
    /// Decoding streams of the multi-LoRA part (0 skips it).
    #[arg(long, default_value_t = 256)]
    lora_streams: usize,
    /// Distinct adapters the streams are spread over, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    lora_distinct: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// Concurrent requests of the engine part (0 skips it).
    #[arg(long, default_value_t = 256)]
    engine_requests: usize,
    #[arg(long, default_value_t = 1024)]
    engine_input: usize,
    #[arg(long, default_value_t = 300)]
    engine_output: usize,
    /// Adapters in the engine's power-law mix (0: base model only).
    #[arg(long, default_value_t = 64)]
    engine_adapters: usize,
    /// Adapter files actually generated for the engine part (the rest hard-link them).
    #[arg(long, default_value_t = 4)]
    engine_distinct_files: usize,
    /// Tokens per step of the engine part.
    #[arg(long, default_value_t = 8192)]
    engine_max_batched_tokens: usize,
    /// Largest decode batch of the engine part replayed from a CUDA graph (0: graphs off;
    /// default: every batch up to the engine's max_num_seqs).
    #[arg(long)]
    engine_cuda_graph_max_batch: Option<usize>,
    /// Start the engine part's clock with its adapters on disk (default: warm every adapter
    /// into the host cache and a device slot first, untimed, and report that time apart).
    #[arg(long)]
    engine_cold: bool,
    /// Run the engine part with every kernel launched as a programmatic dependent
    /// (`model.programmatic_launch`; the decode and multi-LoRA parts time both either way).
    #[arg(long)]
    engine_programmatic_launch: bool,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// The cores attention runs on in every figure (`model.attention_kernel`: cuda_cores or
    /// tensor_cores); the `attention` and `prefill_kernels` sweeps time both either way.
    #[arg(long, default_value = "tensor_cores")]
    attention_kernel: String,
    /// The driver version to report (default: asked of nvidia-smi).
    #[arg(long)]
    driver: Option<String>,
    /// Where to write the JSON (default: stdout); progress goes to stderr.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl GpuBenchArgs {
    fn shape(&self, dtype: DType) -> ModelShape {
        ModelShape {
            hidden: self.hidden,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            ffn: self.ffn,
            vocab: self.vocab,
            dtype_bytes: dtype.size(),
        }
    }
}

fn open_device(name: &str) -> anyhow::Result<Device> {
    #[cfg(feature = "gpu-emu")]
    if name == "emu" {
        return Ok(Device::emulated());
    }
    #[cfg(feature = "cuda")]
    if let Some(n) = name
        .strip_prefix("cuda:")
        .or((name == "cuda").then_some("0"))
    {
        let ordinal: usize = n
            .parse()
            .with_context(|| format!("--device {name}: expected cuda:N"))?;
        return Device::cuda(ordinal).with_context(|| format!("opening GPU {name}"));
    }
    anyhow::bail!("--device {name}: this build has {}", available_devices())
}

fn available_devices() -> &'static str {
    if cfg!(all(feature = "cuda", feature = "gpu-emu")) {
        "cuda:N and emu"
    } else if cfg!(feature = "cuda") {
        "cuda:N"
    } else {
        "emu only (build with --features cuda for a GPU)"
    }
}

/// The driver version nvidia-smi reports, if it can be asked.
fn driver_version() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=driver_version", "--format=csv,noheader"])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// Runs the benchmark and returns its JSON (what `run` prints or writes).
pub fn bench_json(args: &GpuBenchArgs) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::Bf16,
        "f16" => DType::F16,
        other => anyhow::bail!("--dtype {other}: expected bf16 or f16"),
    };
    let attention_kernel =
        AttentionKernel::from_name(&args.attention_kernel).with_context(|| {
            format!(
                "--prefill-attention {}: expected cuda_cores or tensor_cores",
                args.attention_kernel
            )
        })?;
    let dev = open_device(&args.device)?;
    let device = dev.describe();
    let gpu = spec_for(&device);
    let shape = args.shape(dtype);
    let max_len = (args.context + 1)
        .max(args.prefill_len)
        .max(args.engine_input + args.engine_output);
    let say = |s: &str| eprintln!("gpu-bench [{:>6.1} s] {s}", started.elapsed().as_secs_f64());
    say(&format!("{device}: building a random {shape:?} model"));
    let load = Instant::now();
    let mut model = random_gpu_model(&shape, max_len, dev, dtype, args.seed)
        .context("building the random model on the device")?;
    model.set_attention_kernel(attention_kernel);
    model.device().synchronize()?;
    let load_s = load.elapsed().as_secs_f64();
    let weight_bytes = model.weight_bytes();
    say(&format!(
        "{:.2} GB of weights resident in {load_s:.1} s",
        weight_bytes as f64 / 1e9
    ));
    let model_opts = ModelBenchOptions {
        decode_batches: args.batches.clone(),
        context: args.context,
        warmup: args.warmup,
        steps: args.steps,
        prefill_len: args.prefill_len,
        lora_streams: args.lora_streams,
        lora_distinct: args.lora_distinct.clone(),
        lora_rank: args.lora_rank,
        block_size: args.block_size,
    };
    let parts = run_model_parts(&model, &shape, gpu.as_ref(), &model_opts, &mut |s| say(s))
        .context("model-level parts")?;
    let engine_opts = EngineBenchOptions {
        requests: args.engine_requests,
        input_len: args.engine_input,
        output_len: args.engine_output,
        adapters: args.engine_adapters,
        distinct_files: args.engine_distinct_files,
        rank: args.lora_rank,
        zipf_s: 1.0,
        max_num_seqs: args.engine_requests.max(1),
        cuda_graph_max_batch: args
            .engine_cuda_graph_max_batch
            .unwrap_or(args.engine_requests.max(1)),
        max_num_batched_tokens: args.engine_max_batched_tokens,
        block_size: args.block_size,
        num_blocks: None,
        scratch_dir: std::env::temp_dir(),
        seed: args.seed,
        cold: args.engine_cold,
        programmatic_launch: args.engine_programmatic_launch,
    };
    let engine = match args.engine_requests {
        0 => json!({"skipped": "--engine-requests 0"}),
        // A failure here keeps the figures above: the JSON says what went wrong instead.
        _ => match run_engine_part(model, &engine_opts, &mut |s| say(s)) {
            Ok(fig) => {
                say(&format!(
                    "engine: {:.0} output tokens/s (adapters {}), {} of {} steps empty",
                    fig.output_tokens_per_s,
                    if fig.adapters_warm { "warm" } else { "cold" },
                    fig.step_profile.empty.steps,
                    fig.num_steps
                ));
                for (kind, t) in [
                    ("with prefill", fig.step_profile.with_prefill),
                    ("decode-only", fig.step_profile.decode_only),
                ] {
                    let per = |s: f64| s * 1e3 / t.steps.max(1) as f64;
                    say(&format!(
                        "engine: {} steps {kind}, {:.2} ms each: {:.2} in forward, {:.2} in \
                         sample, {:.2} on the host",
                        t.steps,
                        per(t.wall_s),
                        per(t.forward_s),
                        per(t.sample_s),
                        per(t.wall_s - t.forward_s - t.sample_s)
                    ));
                }
                serde_json::to_value(fig)?
            }
            Err(e) => {
                say(&format!("engine part failed: {e}"));
                json!({ "error": e.to_string() })
            }
        },
    };
    Ok(json!({
        "bench": "caduceus gpu-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "gpu": {
            "device": device,
            "driver": args.driver.clone().or_else(driver_version),
            "spec": gpu,
            "spec_source": "datasheet figures, runtime/src/gpu/roofline.rs GPU_SPECS",
            "known_gpus": GPU_SPECS.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        },
        "dtype": dtype.suffix(),
        "shape": shape,
        "weight_bytes": weight_bytes,
        "random_model_load_s": load_s,
        "cuda_graphs": format!(
            "decode and multi-LoRA steps replayed from CUDA graphs (decode also eager: \
             `eager`, `graph_speedup`); prefill eager; engine decode steps of up to {} \
             sequences from CUDA graphs (0: off)",
            engine_opts.cuda_graph_max_batch
        ),
        "roofline": "max((weight + KV bytes read) / HBM bandwidth, FLOPs / dense bf16 peak)",
        "model_options": model_opts,
        "engine_options": engine_opts,
        "decode": parts.decode,
        "attention": parts.attention,
        "prefill": parts.prefill,
        "attention_kernel": parts.attention_kernel,
        "prefill_kernels": parts.prefill_kernels,
        "multi_lora": parts.multi_lora,
        "gemm_policy": parts.gemm_policy,
        "gemm_tuning": parts.gemm_tuning,
        "gemm_tuning_programmatic": parts.gemm_tuning_programmatic,
        "engine": engine,
        "total_s": started.elapsed().as_secs_f64(),
    }))
}

/// Runs `caduceus gpu-bench`.
pub fn run(args: GpuBenchArgs) -> anyhow::Result<()> {
    let report = bench_json(&args)?;
    let text = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(path) => std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    if let Some(e) = report["engine"].get("error") {
        anyhow::bail!("the engine part failed (the JSON has the other figures): {e}");
    }
    Ok(())
}

#[cfg(all(test, feature = "gpu-emu"))]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: GpuBenchArgs,
    }

    #[test]
    fn engine_part_defaults_are_the_issue_figure_and_warm() {
        // Issue 17's engine figure: 256 concurrent requests, 1k in / 300 out, 64 adapters in a
        // power-law mix, measured with the adapters resident unless --engine-cold.
        let args = Wrap::parse_from(["x"]).args;
        let shape = (
            args.engine_requests,
            args.engine_input,
            args.engine_output,
            args.engine_adapters,
        );
        assert_eq!(shape, (256, 1024, 300, 64));
        assert!(!args.engine_cold && !args.engine_programmatic_launch);
        assert!(Wrap::parse_from(["x", "--engine-cold"]).args.engine_cold);
    }

    #[test]
    fn gpu_bench_command_writes_one_json_on_the_emulated_device() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bench.json");
        let line = "x --device emu --hidden 64 --layers 1 --heads 2 --kv-heads 1 --head-dim 32 \
            --ffn 64 --vocab 128 --batches 1,2 --context 17 --warmup 0 --steps 1 --prefill-len 8 \
            --lora-streams 2 --lora-distinct 2 --lora-rank 4 --engine-requests 2 --engine-input 5 \
            --engine-output 2 --engine-adapters 2 --engine-distinct-files 1 --driver test \
            --engine-programmatic-launch";
        let mut args = Wrap::parse_from(line.split_whitespace()).args;
        args.out = Some(out.clone());
        run(args).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(v["gpu"]["driver"], "test");
        assert_eq!(v["dtype"], "bf16");
        assert_eq!(v["shape"]["hidden"], 64);
        assert_eq!(v["decode"].as_array().unwrap().len(), 2);
        // Every part of the model report reaches the JSON (the attention sweep and the GEMM
        // policy were once dropped here).
        assert!(v["attention"].as_array().is_some_and(|a| !a.is_empty()));
        assert_eq!(v["gemm_policy"], "tuned");
        assert!(v["gemm_tuning"].is_array() && v["gemm_tuning_programmatic"].is_array());
        assert_eq!(v["attention_kernel"], "tensor_cores");
        let kernels: Vec<&str> = v["prefill_kernels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kernel"].as_str().unwrap())
            .collect();
        assert_eq!(kernels, ["cuda_cores", "tensor_cores"]);
        assert!(v["decode"][0]["profile"]["ops"].is_array());
        assert_eq!(v["multi_lora"]["runs"][0]["distinct"], 2);
        // Every requested token, the scratch adapter folders gone.
        assert_eq!(v["engine"]["output_tokens"], 4);
        assert_eq!(v["engine"]["programmatic_launch"], true);
        assert_eq!(v["engine_options"]["programmatic_launch"], true);
        assert_eq!(
            v["engine"]["requests_per_adapter_top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .sum::<u64>(),
            2
        );
        let scratch =
            std::env::temp_dir().join(format!("caduceus-gpu-bench-{}", std::process::id()));
        assert!(!scratch.exists());
        assert!(v["gpu"]["spec"].is_null());
        assert!(v["gpu"]["known_gpus"]
            .as_array()
            .unwrap()
            .contains(&json!("h200")));
    }
}
