//! What `gpu-bench`'s model-level parts report (serialised into its JSON).

use caduceus_kernels::gpu::gemm_tune::TuneRecord;
use serde::Serialize;

use crate::gpu::model::profile::OpProfile;
use crate::gpu::roofline::Roofline;

/// Median and best of a part's timed repetitions, and its roofline.
#[derive(Clone, Debug, Serialize)]
pub struct Timed {
    pub median_ms: f64,
    pub min_ms: f64,
    pub reps: usize,
    /// `None` when the GPU is not in the spec table (or emulated).
    pub roofline: Option<Roofline>,
    /// median / roofline bound (1.0 = at the roofline).
    pub over_roofline: Option<f64>,
}

impl Timed {
    pub(super) fn new(mut ms: Vec<f64>, roofline: Option<Roofline>) -> Timed {
        ms.sort_by(f64::total_cmp);
        let median_ms = ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN);
        Timed {
            median_ms,
            min_ms: ms.first().copied().unwrap_or(f64::NAN),
            reps: ms.len(),
            over_roofline: roofline.map(|r| median_ms / 1e3 / r.bound_s),
            roofline,
        }
    }
}

/// One decode batch size.
#[derive(Clone, Debug, Serialize)]
pub struct DecodeFigure {
    pub batch: usize,
    pub context: usize,
    /// Replayed from a captured CUDA graph, as the engine runs decode steps.
    pub step: Timed,
    /// The same step launched kernel by kernel (`model.cuda_graphs = false`).
    pub eager: Timed,
    /// Eager over graph median step time: what the graph saves.
    pub graph_speedup: f64,
    pub tokens_per_s: f64,
    /// The target (batch 1 <= 1.25x, batch 256 <= 1.5x the roofline), when it sets one.
    pub target_over_roofline: Option<f64>,
    pub meets_target: Option<bool>,
    /// The same graph replays with cuBLASLt's heuristic choices only ([`GemmPolicy::Library`](caduceus_kernels::gpu::gemm_tune::GemmPolicy::Library)):
    /// what tuning the projections saved.
    pub library_gemm: Timed,
    /// The same graph replays with every kernel launched as a programmatic dependent of the one
    /// before ([`Device::set_programmatic_launch`](caduceus_kernels::gpu::Device::set_programmatic_launch));
    /// `None` where the GPU has no such launches (before sm_90).
    pub programmatic_launch: Option<Timed>,
    /// Device time by op of the eager step.
    pub profile: OpProfile,
}

/// Prefill of one prompt.
#[derive(Clone, Debug, Serialize)]
pub struct PrefillFigure {
    pub prompt_len: usize,
    pub pass: Timed,
    pub tokens_per_s: f64,
    /// Achieved FLOP/s over the GPU's dense bf16 peak.
    pub flops_utilization: Option<f64>,
    pub profile: OpProfile,
}

/// `streams` decoding sequences spread over `distinct` adapters (graph replays, as the base).
#[derive(Clone, Debug, Serialize)]
pub struct LoraFigure {
    pub distinct: usize,
    /// How the decode graph mapped tokens to LoRA blocks
    /// ([`DecodeLoraMapping::name`](caduceus_kernels::gpu::lora::DecodeLoraMapping::name):
    /// `bgmv`, the engine's, or `grouped`).
    pub mapping: &'static str,
    pub step: Timed,
    pub tokens_per_s: f64,
    /// Throughput over the base model's at the same load (target >= 0.9 at 64 distinct, for
    /// the engine's mapping).
    pub over_base: f64,
    /// Device time by op of the eager step (adapter deltas under `lora`), which is the same
    /// for both mappings: given with the `bgmv` row only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<OpProfile>,
    /// The `bgmv` row's step with programmatic dependent launches, and its throughput over the
    /// base model's under them too ([`LoraPart::base_programmatic_launch`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programmatic_launch: Option<Timed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programmatic_over_base: Option<f64>,
}

/// The multi-LoRA part.
#[derive(Clone, Debug, Serialize)]
pub struct LoraPart {
    pub streams: usize,
    pub rank: usize,
    pub context: usize,
    pub base: Timed,
    pub base_tokens_per_s: f64,
    /// The base step with programmatic dependent launches (`None` where the GPU has none).
    pub base_programmatic_launch: Option<Timed>,
    pub runs: Vec<LoraFigure>,
    /// The model part's prefill again with its tokens spread over the adapters, per distinct
    /// count (empty without a prefill part).
    pub prefill: Vec<LoraPrefillFigure>,
    pub slot_fill_s: f64,
}

/// A prefill whose tokens run on `distinct` adapters in equal runs (the SGMV segments of a
/// prefill step whose prompts name different adapters), eager as the engine runs prefill steps.
#[derive(Clone, Debug, Serialize)]
pub struct LoraPrefillFigure {
    pub distinct: usize,
    /// Its tokens/s over the base prefill's (the report's `prefill`).
    pub over_base: f64,
    pub prefill: PrefillFigure,
}

/// What the model-level parts measured.
#[derive(Clone, Debug, Serialize)]
pub struct ModelBenchReport {
    pub decode: Vec<DecodeFigure>,
    /// The decode attention kernel alone, per batch and split ([`super::AttentionFigure`]).
    pub attention: Vec<super::AttentionFigure>,
    pub prefill: Option<PrefillFigure>,
    /// The cores attention ran on in every figure
    /// ([`AttentionKernel::name`](caduceus_kernels::gpu::attention::AttentionKernel::name)).
    pub attention_kernel: &'static str,
    /// Each prefill attention kernel alone on the prefill prompt ([`super::PrefillKernelFigure`]).
    pub prefill_kernels: Vec<super::PrefillKernelFigure>,
    pub multi_lora: Option<LoraPart>,
    /// The projections' policy the figures ran under ([`GemmPolicy::name`](caduceus_kernels::gpu::gemm_tune::GemmPolicy::name)).
    pub gemm_policy: &'static str,
    /// What the GEMM tuner measured for the decode figures, one row per shape bucket (empty in
    /// emulation).
    pub gemm_tuning: Vec<TunedGemm>,
    /// The same, tuned afresh with programmatic dependent launches for the decode figures'
    /// `programmatic_launch` (as serve tunes under `model.programmatic_launch`); empty where the
    /// GPU has none.
    pub gemm_tuning_programmatic: Vec<TunedGemm>,
}

/// One shape bucket's tuning ([`TuneRecord`]) as the JSON reports it.
#[derive(Clone, Debug, Serialize)]
pub struct TunedGemm {
    pub m: usize,
    pub m_bucket: usize,
    pub n: usize,
    pub k: usize,
    pub accumulate: bool,
    pub bias: bool,
    pub chosen: String,
    /// (candidate, best microseconds per launch; `None`: it could not run the shape).
    pub candidates: Vec<(String, Option<f64>)>,
    pub fallback: Option<String>,
}

impl From<TuneRecord> for TunedGemm {
    fn from(r: TuneRecord) -> Self {
        TunedGemm {
            m: r.m,
            m_bucket: r.key.m_bucket,
            n: r.key.n,
            k: r.key.k,
            accumulate: r.key.accumulate,
            bias: r.key.bias,
            chosen: r.chosen,
            candidates: r.candidates.into_iter().map(|c| (c.name, c.us)).collect(),
            fallback: r.fallback,
        }
    }
}

/// The roofline targets for a decode batch size.
pub fn decode_target(batch: usize) -> Option<f64> {
    match batch {
        1 => Some(1.25),
        256 => Some(1.5),
        _ => None,
    }
}
