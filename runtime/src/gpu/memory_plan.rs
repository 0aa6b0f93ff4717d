//! How a GPU's memory is divided at start: weights, adapter slots, activation workspace and
//! graph memory first, the rest (up to `model.gpu_memory_utilization` of the card) KV blocks.
//!
//! The numbers come from the model config and the server limits, so a server that would not fit
//! fails at start with what to change, never with an out-of-memory error mid-request.

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
        "only {have} KV blocks fit after the weights, but one request of model.max_model_len \
         tokens needs {need}: lower model.max_model_len or adapters.max_loras, or raise \
         model.gpu_memory_utilization"
    )]
    TooFewBlocks { have: u64, need: u64 },
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
        return Err(MemoryPlanError::TooFewBlocks {
            have: num_gpu_blocks,
            need: i.min_blocks,
        });
    }
    Ok(MemoryPlan {
        budget_bytes: budget,
        fixed_bytes: fixed,
        kv_bytes: num_gpu_blocks * i.kv_bytes_per_block,
        num_gpu_blocks,
    })
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
            min_blocks: 8192 / 16,
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
