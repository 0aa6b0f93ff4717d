//! How a GPU's memory is divided at start: weights, adapter slots, activation workspace and
//! graph memory first, the rest (up to `model.gpu_memory_utilization` of the card) KV blocks.
//!
//! The numbers come from the model config and the server limits, so a server that would not fit
//! fails at start with what to change, never with an out-of-memory error mid-request. A model
//! whose weights exceed the device's free memory is refused before anything is uploaded
//! ([`check_weights_fit`]), naming its size against the device's.
//!
//! Device memory only: the adapter copy stream's pinned staging ring (32 to 128 MiB of host
//! memory, `super::adapter_copies`) is not part of this plan.

use crate::model::config::LlamaConfig;

/// What the plan is computed from (bytes unless said).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryInputs {
    /// The card's total memory.
    pub total_bytes: u64,
    /// Share of `total_bytes` Caduceus may use (`model.gpu_memory_utilization`, 0 < u <= 1).
    pub gpu_memory_utilization: f64,
    /// Memory already in use by others when we start (total - free).
    pub used_by_others: u64,
    pub weight_bytes: u64,
    /// All device adapter slots of all layers and projections (`adapters.max_loras`).
    pub adapter_slot_bytes: u64,
    /// Per-step activation buffers and the logits workspace.
    pub activation_bytes: u64,
    /// Captured CUDA graphs (0 when graphs are off).
    pub graph_bytes: u64,
    /// K and V of one block across all layers.
    pub kv_bytes_per_block: u64,
    /// Blocks one request of `max_model_len` tokens needs; fewer cannot serve it.
    pub min_blocks: u64,
    /// Tokens per KV block (to say which `max_model_len` would fit).
    pub block_size: u64,
}

/// The division that came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// `total * utilization` less what others use.
    pub budget_bytes: u64,
    pub fixed_bytes: u64,
    pub kv_bytes: u64,
    pub num_gpu_blocks: u64,
}

/// Why the model cannot be served on this device with these settings (each says what to change).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum MemoryPlanError {
    #[error("model.gpu_memory_utilization = {0}: must be greater than 0 and at most 1 (e.g. 0.9)")]
    BadUtilization(f64),
    #[error(
        "the model does not fit on the GPU: weights {weights} + adapter slots {adapters} + \
         activations {activations} + graphs {graphs} need {need}, but the budget is {budget} \
         ({util} of {total}, {others} used by other processes); use a larger GPU, lower \
         adapters.max_loras or scheduler.max_num_batched_tokens, turn off model.cuda_graphs, or raise \
         model.gpu_memory_utilization",
        weights = mib(*weight_bytes), adapters = mib(*adapter_bytes),
        activations = mib(*activation_bytes), graphs = mib(*graph_bytes), need = mib(*need),
        budget = mib(*budget), util = utilization, total = mib(*total), others = mib(*others)
    )]
    FixedDoesNotFit {
        weight_bytes: u64,
        adapter_bytes: u64,
        activation_bytes: u64,
        graph_bytes: u64,
        need: u64,
        budget: u64,
        utilization: f64,
        total: u64,
        others: u64,
    },
    #[error(
        "only {have} KV blocks ({kv}) fit after the weights, adapter slots and activations \
         ({fixed} of a {budget} budget), but one request of model.max_model_len tokens needs \
         {need}: set model.max_model_len to at most {fits_len}, lower adapters.max_loras \
         (the slots take {adapters}), or raise model.gpu_memory_utilization",
        kv = mib(*kv_bytes), fixed = mib(*fixed), budget = mib(*budget),
        adapters = mib(*adapter_bytes)
    )]
    TooFewBlocks {
        have: u64,
        need: u64,
        /// The largest `model.max_model_len` these blocks serve (0: none).
        fits_len: u64,
        kv_bytes: u64,
        fixed: u64,
        budget: u64,
        adapter_bytes: u64,
    },
    #[error(
        "the model is too big for {device}: its weights need {weights} in {dtype}, but the \
         device has {total} in total, {free} of it free; use a GPU with more memory (or free \
         this one), a smaller model, or model.device = \"cpu\"",
        weights = mib(*weight_bytes), total = mib(*total), free = mib(*free)
    )]
    ModelTooBig {
        device: String,
        dtype: &'static str,
        weight_bytes: u64,
        total: u64,
        free: u64,
    },
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Divides the device's memory (see the module docs).
pub fn plan_memory(i: &MemoryInputs) -> Result<MemoryPlan, MemoryPlanError> {
    let u = i.gpu_memory_utilization;
    if !(u > 0.0 && u <= 1.0) {
        return Err(MemoryPlanError::BadUtilization(u));
    }
    let budget = ((i.total_bytes as f64 * u) as u64).saturating_sub(i.used_by_others);
    let fixed = i
        .weight_bytes
        .saturating_add(i.adapter_slot_bytes)
        .saturating_add(i.activation_bytes)
        .saturating_add(i.graph_bytes);
    if fixed > budget {
        return Err(MemoryPlanError::FixedDoesNotFit {
            weight_bytes: i.weight_bytes,
            adapter_bytes: i.adapter_slot_bytes,
            activation_bytes: i.activation_bytes,
            graph_bytes: i.graph_bytes,
            need: fixed,
            budget,
            utilization: u,
            total: i.total_bytes,
            others: i.used_by_others,
        });
    }
    let num_gpu_blocks = (budget - fixed) / i.kv_bytes_per_block.max(1);
    if num_gpu_blocks < i.min_blocks {
        // min_blocks is ceil(len / block_size) + 1: the inverse, for the blocks there are.
        return Err(MemoryPlanError::TooFewBlocks {
            have: num_gpu_blocks,
            need: i.min_blocks,
            fits_len: num_gpu_blocks.saturating_sub(1) * i.block_size,
            kv_bytes: num_gpu_blocks * i.kv_bytes_per_block,
            fixed,
            budget,
            adapter_bytes: i.adapter_slot_bytes,
        });
    }
    Ok(MemoryPlan {
        budget_bytes: budget,
        fixed_bytes: fixed,
        kv_bytes: num_gpu_blocks * i.kv_bytes_per_block,
        num_gpu_blocks,
    })
}

/// Bytes of a Llama-family model's weights at `dtype_bytes` per element (projections, biases,
/// norms, embeddings and an untied LM head), from its config alone, so the size is known before
/// any upload.
pub fn llama_weight_bytes(c: &LlamaConfig, dtype_bytes: usize) -> u64 {
    let (h, f) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let bias = if c.attention_bias { q + 2 * kv } else { 0 };
    let layer = 2 * h + h * (q + 2 * kv) + bias + q * h + 3 * h * f;
    let head = if c.tie_word_embeddings { 0 } else { 1 };
    let elems = c.num_layers * layer + (1 + head) * c.vocab_size * h + h;
    (elems * dtype_bytes) as u64
}

/// Refuses, before the upload, weights of `weight_bytes` that exceed the `free` bytes of
/// `device` (of `total`); whether everything else fits is [`plan_memory`]'s question.
pub fn check_weights_fit(
    device: &str,
    dtype: &'static str,
    weight_bytes: u64,
    (free, total): (u64, u64),
) -> Result<(), MemoryPlanError> {
    if weight_bytes > free {
        return Err(MemoryPlanError::ModelTooBig {
            device: device.to_string(),
            dtype,
            weight_bytes,
            total,
            free,
        });
    }
    Ok(())
}

/// Bytes of K and V for one block of `block_size` tokens over all layers.
pub fn kv_bytes_per_block(
    num_layers: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype_bytes: usize,
) -> u64 {
    2 * (num_layers * block_size * num_kv_heads * head_dim * dtype_bytes) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Llama-3-8B in bf16 on an H200: 32 layers, 8 KV heads of 128, block 16.
    fn h200_llama8b() -> MemoryInputs {
        MemoryInputs {
            total_bytes: 141 * GIB,
            gpu_memory_utilization: 0.9,
            used_by_others: GIB / 2,
            weight_bytes: 16 * GIB,
            adapter_slot_bytes: 2 * GIB,
            activation_bytes: GIB,
            graph_bytes: GIB / 4,
            kv_bytes_per_block: kv_bytes_per_block(32, 16, 8, 128, 2),
            min_blocks: 8192 / 16 + 1,
            block_size: 16,
        }
    }

    #[test]
    fn kv_blocks_fill_the_budget_left_after_fixed_memory() {
        let i = h200_llama8b();
        assert_eq!(i.kv_bytes_per_block, 2 * 32 * 16 * 8 * 128 * 2); // 2 MiB per block
        let p = plan_memory(&i).unwrap();
        let budget = (141.0 * 0.9 * GIB as f64) as u64 - GIB / 2;
        assert_eq!(p.budget_bytes, budget);
        assert_eq!(p.fixed_bytes, 16 * GIB + 2 * GIB + GIB + GIB / 4);
        assert_eq!(
            p.num_gpu_blocks,
            (budget - p.fixed_bytes) / i.kv_bytes_per_block
        );
        // Invariants: the blocks fit, and one more would not.
        assert!(p.fixed_bytes + p.kv_bytes <= p.budget_bytes);
        assert!(p.fixed_bytes + p.kv_bytes + i.kv_bytes_per_block > p.budget_bytes);
    }

    #[test]
    fn errors_name_what_to_change() {
        let mut i = h200_llama8b();
        i.weight_bytes = 140 * GIB;
        let e = plan_memory(&i).unwrap_err();
        assert!(matches!(e, MemoryPlanError::FixedDoesNotFit { .. }));
        assert!(
            e.to_string().contains("model.gpu_memory_utilization"),
            "{e}"
        );

        let mut i = h200_llama8b();
        i.min_blocks = u64::MAX / 2;
        let e = plan_memory(&i).unwrap_err();
        assert!(e.to_string().contains("model.max_model_len"), "{e}");

        // What fits: the longest max_model_len whose min_blocks the pool still has.
        let mut i = h200_llama8b();
        i.gpu_memory_utilization = 0.2; // ~28 GiB: ~8 GiB of KV after 19.25 GiB fixed
        let have = plan_memory(&MemoryInputs { min_blocks: 1, ..i })
            .unwrap()
            .num_gpu_blocks;
        i.min_blocks = have + 1;
        let Err(MemoryPlanError::TooFewBlocks { fits_len, .. }) = plan_memory(&i) else {
            panic!("a pool one block short was accepted");
        };
        let min_blocks = |len: u64| len.div_ceil(i.block_size) + 1;
        assert!(min_blocks(fits_len) <= have && min_blocks(fits_len + 1) > have);
        let e = plan_memory(&i).unwrap_err().to_string();
        assert!(
            e.contains(&format!("model.max_model_len to at most {fits_len}")),
            "{e}"
        );

        // Weights larger than the free memory: refused before the upload, sizes named.
        let weights = 150 * GIB;
        let e = check_weights_fit("cuda:0 H200", "bf16", weights, (140 * GIB, 141 * GIB))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("153600.0 MiB in bf16") && e.contains("144384.0 MiB in total"),
            "{e}"
        );
        assert!(check_weights_fit("cuda:0", "bf16", 16 * GIB, (140 * GIB, 141 * GIB)).is_ok());

        for bad in [0.0, -0.5, 1.01, f64::NAN] {
            let mut i = h200_llama8b();
            i.gpu_memory_utilization = bad;
            assert!(matches!(
                plan_memory(&i),
                Err(MemoryPlanError::BadUtilization(_))
            ));
        }
    }

    #[test]
    fn llama_3_8b_weighs_what_its_parameter_count_says() {
        let json = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 8192,
            "tie_word_embeddings": false}"#;
        let c = LlamaConfig::from_hf_json(json).unwrap();
        // Meta's published count for Llama-3-8B: 8,030,261,248 parameters.
        assert_eq!(llama_weight_bytes(&c, 2), 2 * 8_030_261_248);
    }

    #[test]
    fn others_using_the_card_shrink_the_pool_not_the_fixed_part() {
        let a = plan_memory(&h200_llama8b()).unwrap();
        let mut i = h200_llama8b();
        i.used_by_others += 10 * GIB;
        let b = plan_memory(&i).unwrap();
        assert_eq!(a.fixed_bytes, b.fixed_bytes);
        assert_eq!(a.budget_bytes - b.budget_bytes, 10 * GIB);
        assert!(b.num_gpu_blocks < a.num_gpu_blocks);
    }
}
