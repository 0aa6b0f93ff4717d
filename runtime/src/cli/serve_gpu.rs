//! `caduceus serve` on a CUDA device: weights converted to bf16/f16 and uploaded, adapter slots
//! and the KV pool sized by the memory plan, then the same serving half as the CPU.

use std::sync::Arc;

use anyhow::Context;
use caduceus_kernels::gpu::attention::AttentionKernel;
use caduceus_kernels::gpu::gemm_tune::GemmPolicy;
use caduceus_kernels::gpu::{DType, Device};

use super::serve::{root_name, serve, served_name, ServedModel};
use crate::adapters::SlotFormat;
use crate::config::{AdapterDtype, AttentionKernelSetting, CaduceusConfig, Dtype, GemmSetting};
use crate::engine::{scored_rows_per_step, EngineCore, SlotSpec};
use crate::gpu::lora::{adapter_pool, adapter_pool_bytes};
use crate::gpu::memory_plan::{check_weights_fit, llama_weight_bytes};
use crate::gpu::model::GpuModel;
use crate::gpu::{GpuBackend, GpuBackendConfig, KvBlocks, StepLimits};
use crate::model::loader::{LoadError, LoadedModel};

/// Loads the model onto `dev` and serves it.
pub(super) fn run(config: CaduceusConfig, dev: Device) -> anyhow::Result<()> {
    let dtype = match config.model.dtype {
        Dtype::Auto | Dtype::Bf16 => DType::Bf16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => anyhow::bail!(
            "model.dtype = \"f32\": the GPU engine computes in bf16 or f16; set model.dtype to \
             \"auto\", \"bf16\" or \"f16\" (or model.device to \"cpu\")"
        ),
    };
    // The host tier keeps adapters as the device slots hold them (in the model's dtype); the
    // CPU slots' storage types do not apply.
    if config.adapters.dtype == AdapterDtype::Q8 {
        anyhow::bail!(
            "adapters.dtype = \"q8\" is a CPU format; on a GPU set adapters.dtype to \"auto\" \
             (adapters are kept in the model dtype, as the device slots hold them)"
        );
    }
    if matches!(config.adapters.dtype, AdapterDtype::F16 | AdapterDtype::F32) {
        tracing::warn!(
            adapters_dtype = ?config.adapters.dtype,
            "adapters.dtype sets the CPU engine's adapter slots; on a GPU adapters are kept in \
             the model dtype, as the device slots hold them (leave it \"auto\")"
        );
    }
    // The host tier's adapter images live in pinned pages, so a slot fill is a DMA from them.
    let pinned = match config.adapters.dir {
        Some(_) => {
            let cache_bytes = config.adapters.max_cpu_lora_bytes.bytes() as usize;
            let pool = adapter_pool(&dev, cache_bytes).with_context(|| {
                format!(
                    "pinning {} MiB of host memory for adapter images (adapters.max_cpu_lora_bytes \
                     and a quarter more): lower adapters.max_cpu_lora_bytes",
                    adapter_pool_bytes(cache_bytes) >> 20
                )
            })?;
            tracing::info!(
                mib = pool.nbytes() >> 20,
                "pinned host memory for adapter images (adapters.max_cpu_lora_bytes and a \
                 quarter more)"
            );
            Some(pool)
        }
        None => None,
    };
    let adapter_format = SlotFormat::Device { dtype, pinned };
    let device_name = dev.describe();
    let loaded = LoadedModel::load_into(&config.model.path, |c, store| {
        let on_device = |message: String| LoadError::Device {
            device: device_name.clone(),
            message,
        };
        // Too big for the card: say so with both sizes before uploading anything.
        let (free, total) = dev.memory_info().map_err(|e| on_device(e.to_string()))?;
        let weights = llama_weight_bytes(&c, dtype.size());
        check_weights_fit(
            &device_name,
            dtype.suffix(),
            weights,
            (free as u64, total as u64),
        )
        .map_err(|e| on_device(e.to_string()))?;
        GpuModel::from_tensors(c, store, dev, dtype).map_err(|e| on_device(e.to_string()))
    })
    .with_context(|| format!("loading the model from {}", config.model.path.display()))?;
    tracing::info!(device = %device_name, ?dtype, "weights converted and resident on the GPU");
    let max_model_len = config
        .model
        .max_model_len
        .unwrap_or_else(|| loaded.max_model_len());
    let s = &config.scheduler;
    // The block count comes from the backend's pool; an unset step budget keeps the default
    // (a GPU step of 2048 tokens is milliseconds, not the CPU's seconds).
    let sched = s.scheduler_config(0, max_model_len, None);
    let adapter_slots = config.adapters.dir.is_some().then_some(SlotSpec {
        num_slots: config.adapters.max_loras,
        max_rank: config.adapters.max_lora_rank,
        format: adapter_format.clone(),
    });
    let kv_blocks = match config.model.num_gpu_blocks_override {
        Some(n) => KvBlocks::Fixed(n),
        None => KvBlocks::Plan {
            gpu_memory_utilization: config.model.gpu_memory_utilization,
        },
    };
    let cuda_graph_max_batch = match config.model.cuda_graphs {
        true => config
            .model
            .cuda_graph_max_batch
            .unwrap_or(sched.max_num_seqs),
        false => 0,
    };
    let ServedModelParts { mut model, served } = parts(&config, loaded, adapter_format);
    let (attention, gemm) = (
        attention_kernel_of(config.model.attention_kernel),
        gemm_policy(config.model.gemm),
    );
    model.set_attention_kernel(attention);
    // Before the backend captures its graphs: tuning runs in their warm-up steps, and the
    // graphs keep the launches they were captured with.
    model.device().set_gemm_policy(gemm)?;
    let asked = config.model.programmatic_launch;
    let programmatic = model.device().set_programmatic_launch(asked);
    if asked && !programmatic {
        tracing::warn!(
            "model.programmatic_launch: this GPU has no programmatic dependent launches (they \
             need sm_90 or later); kernels launch plainly"
        );
    }
    tracing::info!(
        attention = attention.name(),
        gemm = gemm.name(),
        programmatic_launch = programmatic,
        "GPU kernels (model.attention_kernel, model.gemm, model.programmatic_launch)"
    );
    // Prompt logprobs: as many rows per step as the CPU engine scores.
    let max_scored_rows =
        scored_rows_per_step(model.config().vocab_size).min(sched.max_num_batched_tokens);
    let backend = GpuBackend::new(
        model,
        GpuBackendConfig {
            block_size: s.block_size,
            kv_blocks,
            adapter_slots,
            step: StepLimits {
                max_num_batched_tokens: sched.max_num_batched_tokens,
                max_num_seqs: sched.max_num_seqs,
                max_scored_rows,
                max_model_len,
            },
            cuda_graph_max_batch,
        },
    )?;
    let plan = backend.memory_plan();
    let eos = served.tokenizer.eos_ids().to_vec();
    let core = EngineCore::with_backend(backend, Some(served.tokenizer.clone()), eos, sched)?;
    // `num_gpu_blocks` as `/metrics` reports it (`caduceus_cache_config_info`).
    let pool = core.scheduler_config();
    let (num_gpu_blocks, pool_blocks) = (pool.num_usable_blocks(), pool.num_blocks);
    match plan {
        Some(p) => tracing::info!(
            num_gpu_blocks,
            pool_blocks,
            budget_mib = p.budget_bytes >> 20,
            fixed_mib = p.fixed_bytes >> 20,
            kv_mib = p.kv_bytes >> 20,
            gpu_memory_utilization = config.model.gpu_memory_utilization,
            "KV cache pool (GPU memory plan)"
        ),
        None => tracing::info!(
            num_gpu_blocks,
            pool_blocks,
            "KV cache pool (model.num_gpu_blocks_override)"
        ),
    }
    serve(config, core, served)
}

/// The kernel a `model.attention_kernel` setting names.
fn attention_kernel_of(s: AttentionKernelSetting) -> AttentionKernel {
    match s {
        AttentionKernelSetting::CudaCores => AttentionKernel::CudaCores,
        AttentionKernelSetting::TensorCores => AttentionKernel::TensorCores,
    }
}

/// The kernels' policy for a `model.gemm` setting.
fn gemm_policy(s: GemmSetting) -> GemmPolicy {
    match s {
        GemmSetting::Tuned => GemmPolicy::Tuned,
        GemmSetting::Library => GemmPolicy::Library,
        GemmSetting::Gemv => GemmPolicy::Gemv,
    }
}

struct ServedModelParts {
    model: GpuModel,
    served: ServedModel,
}

fn parts(
    config: &CaduceusConfig,
    loaded: LoadedModel<GpuModel>,
    adapter_format: SlotFormat,
) -> ServedModelParts {
    let served = ServedModel {
        tokenizer: Arc::new(loaded.tokenizer),
        chat_template: loaded.chat_template,
        served_model_name: served_name(config, &loaded.name),
        model_root: root_name(&loaded.path, &loaded.name),
        base_config: loaded.model.config().clone(),
        medium: "GPU",
        adapter_format,
    };
    ServedModelParts {
        model: loaded.model,
        served,
    }
}
