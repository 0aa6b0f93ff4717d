//! Host cost of one engine step around the device: `EngineCore::step` with 256 requests decoding
//! (1,024-token prompts, as the engine load) on a backend whose forward and sampling cost
//! nothing, so what is timed is what the GPU engine's device waits for between steps:
//! scheduling, batch preparation (positions, slot mapping, block tables), per-row sampling
//! settings, output processing and streaming. A decode step of the 8B model at batch 256 takes
//! ~17 ms on an H200; this must stay a small fraction of it.
//!
//! `cargo bench -p caduceus-benches --bench engine_step`

use caduceus_kernels::lora::Segment;
use caduceus_runtime::adapters::LoadedAdapter;
use caduceus_runtime::engine::{
    Backend, BackendError, EngineCore, EngineRequest, RequestId, RowOutcome, SchedulerConfig,
    SlotSpec,
};
use caduceus_runtime::model::config::{LlamaConfig, WeightSource};
use caduceus_runtime::model::ForwardBatch;
use caduceus_runtime::sampling::{RowSample, SampledToken};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::time::{Duration, Instant};

const STREAMS: usize = 256;
const PROMPT: usize = 1024;
const BLOCK: usize = 16;

/// A device that computes nothing: every row samples a token that never stops a request.
struct NullBackend {
    config: LlamaConfig,
    num_blocks: usize,
    step: u32,
}

impl Backend for NullBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }
    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }
    fn block_size(&self) -> usize {
        BLOCK
    }
    fn describe(&self) -> String {
        "null".into()
    }
    fn init_adapter_slots(&mut self, _spec: SlotSpec) -> Result<usize, BackendError> {
        Ok(0)
    }
    fn load_adapter(&mut self, _slot: u32, _a: &LoadedAdapter) -> Result<(), BackendError> {
        Ok(())
    }
    fn forward(
        &mut self,
        _batch: &ForwardBatch<'_>,
        _lora: &[Segment],
    ) -> Result<(), BackendError> {
        Ok(())
    }
    fn sample(&mut self, rows: &[RowSample]) -> Result<Vec<RowOutcome>, BackendError> {
        self.step = self.step.wrapping_add(1);
        Ok((0..rows.len())
            .map(|i| {
                Ok(SampledToken {
                    token_id: 1000 + (self.step + i as u32) % 20_000,
                    logprob: None,
                    top_logprobs: Vec::new(),
                })
            })
            .collect())
    }
}

fn config() -> LlamaConfig {
    LlamaConfig {
        architecture: "llama".into(),
        vocab_size: 128_256,
        hidden_size: 4096,
        intermediate_size: 14_336,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: false,
        attention_bias: false,
        rope_neox: true,
        source: WeightSource::HuggingFace,
    }
}

/// An engine with `STREAMS` requests past their prefill, all decoding.
fn decoding_engine() -> EngineCore<NullBackend> {
    let max_tokens = 1 << 20;
    let blocks_per_seq = (PROMPT + 4096).div_ceil(BLOCK);
    let backend = NullBackend {
        config: config(),
        num_blocks: STREAMS * blocks_per_seq + 1,
        step: 0,
    };
    let sched = SchedulerConfig {
        max_num_seqs: STREAMS,
        max_num_batched_tokens: 8192,
        max_model_len: PROMPT + max_tokens,
        ..SchedulerConfig::default()
    };
    let mut engine = EngineCore::with_backend(backend, None, vec![2], sched).unwrap();
    for i in 0..STREAMS {
        let prompt = (0..PROMPT as u32)
            .map(|t| 3 + (i as u32 * 7919 + t) % 100_000)
            .collect();
        let mut req = EngineRequest::new(prompt, max_tokens);
        req.detokenize = false;
        let (out, rx) = tokio::sync::mpsc::unbounded_channel();
        std::mem::forget(rx); // the stream stays open, unread (outputs queue)
        engine.add_request(RequestId(i as u64), req, out).unwrap();
    }
    // Prefill (free here) until every request decodes.
    while engine.step().unwrap().num_scheduled_tokens > STREAMS {}
    engine
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_step");
    g.throughput(Throughput::Elements(STREAMS as u64));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("decode_256x1k", |b| {
        let mut engine = decoding_engine();
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let s = engine.step().unwrap();
                assert_eq!(s.num_scheduled_reqs, STREAMS);
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
