//! Decode steps replayed from graphs captured at start, one per padded batch size of
//! [`super::graph_ladder`] (up to `model.cuda_graph_max_batch`).
//!
//! A pure-decode step is staged padded to the next captured size (its one upload fills the
//! fixed addresses the graph reads) and the graph is replayed; mixed prefill/decode steps and
//! batches above the largest size run eagerly. With adapter slots, every graph carries the
//! LoRA launches with grids sized for the slots' largest rank and a unit per token (a token
//! without adapter adds nothing), so decode steps mixing adapters replay too: BGMV in the
//! engine; `gpu-bench` also times graphs on the tokens grouped by adapter
//! ([`DecodeLoraMapping`]). Each graph is captured after one
//! eager run of its size, so the GEMM algorithm cache is warm (no cuBLASLt heuristic query
//! while capturing).
//!
//! On a GPU this is `cuStreamBeginCapture` / `cuGraphLaunch` (run on the H200 by
//! `scripts/gpu-check`). In CI the emulation records and replays the launches, which checks the
//! index arithmetic and that a graph reads only fixed addresses.

use caduceus_kernels::gpu::{DeviceGraph, GpuError};

use super::graph_ladder::{graph_batch_sizes, padded_batch_size};
use super::lora::{GpuLoraBatch, GpuLoraStack};
use super::model::{GpuKvCache, GpuModel, GpuModelError};
use super::workspace::{GraphLayout, Workspace};
use crate::model::ForwardBatch;
use caduceus_kernels::gpu::lora::DecodeLoraMapping;

/// Device memory reserved in the memory plan per captured graph: a stated bound, not a
/// measurement (a decode graph of a 32-layer model has ~400 nodes; the driver keeps their
/// parameters and launch state). On a GPU the memory actually taken is measured after capture
/// and logged.
pub const GRAPH_RESERVE_BYTES: u64 = 4 << 20;

/// The batch sizes that get a graph when at most `max_num_seqs` sequences run and graphs are
/// capped at `max_batch` (0: graphs off).
pub fn graph_sizes(max_num_seqs: usize, max_tokens: usize, max_batch: usize) -> Vec<usize> {
    graph_batch_sizes(max_batch.min(max_num_seqs).min(max_tokens))
}

/// The captured decode graphs.
pub struct DecodeGraphs {
    sizes: Vec<usize>,
    /// The graphs carry the LoRA launches, mapping tokens to blocks this way, for slots below
    /// the count they were captured with.
    lora: Option<(DecodeLoraMapping, usize)>,
    graphs: Vec<DeviceGraph>,
    replays: u64,
}

impl DecodeGraphs {
    /// Captures one graph per size in `sizes` (ascending), each on an all-padding batch of
    /// that size, after one eager run of it; with a stack, including its LoRA launches under the
    /// given mapping (the engine's: [`DecodeLoraMapping::Bgmv`]).
    pub fn capture(
        model: &GpuModel,
        kv: &GpuKvCache,
        ws: &mut Workspace,
        sizes: &[usize],
        lora: Option<(&GpuLoraStack, DecodeLoraMapping)>,
    ) -> Result<DecodeGraphs, GpuModelError> {
        let stack = lora.map(|(s, _)| s);
        let mapping = lora.map(|(_, m)| m).unwrap_or_default();
        let lora_slots = stack.map_or(0, GpuLoraStack::num_slots);
        let dev = model.device();
        let empty = ForwardBatch {
            token_ids: &[],
            positions: &[],
            slot_mapping: &[],
            seqs: &[],
            logits_indices: &[],
        };
        let mut graphs = Vec::with_capacity(sizes.len());
        for &size in sizes {
            let layout = GraphLayout {
                size,
                mapping,
                lora_slots,
            };
            let step = ws.stage(dev, &empty, stack.map(|_| &[][..]), Some(layout))?;
            model.launch(kv, ws, &step, stack, None)?;
            let ws: &Workspace = ws;
            graphs.push(dev.capture(|| model.launch(kv, ws, &step, stack, None))?);
        }
        Ok(DecodeGraphs {
            sizes: sizes.to_vec(),
            lora: lora.map(|(_, m)| (m, lora_slots)),
            graphs,
            replays: 0,
        })
    }

    /// The captured sizes, ascending.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// Launches and GEMMs per graph (emulation; 0 on a GPU).
    pub fn nodes(&self) -> Vec<usize> {
        self.graphs.iter().map(DeviceGraph::num_nodes).collect()
    }

    /// Steps replayed so far.
    pub fn replays(&self) -> u64 {
        self.replays
    }

    /// Runs `batch` by replaying the graph of its padded size: `Ok(Some(rows))` with the logits
    /// in the workspace, or `Ok(None)` (nothing done) when the step must run eagerly.
    pub fn replay(
        &mut self,
        model: &GpuModel,
        batch: &ForwardBatch<'_>,
        lora: Option<&GpuLoraBatch<'_>>,
        ws: &mut Workspace,
    ) -> Result<Option<usize>, GpuModelError> {
        let n = batch.seqs.len();
        let segments = lora.map_or(&[][..], |l| l.segments);
        // The launches were captured for slots below the stack's count then; the eager path
        // reports a bad one.
        let slots_ok = match (self.lora, lora) {
            (_, None) => true,
            (Some((_, captured)), Some(l)) => segments
                .iter()
                .filter_map(|s| s.slot)
                .all(|s| (s as usize) < l.stack.num_slots().min(captured)),
            (None, Some(_)) => segments.iter().all(|s| s.slot.is_none()),
        };
        let eligible = slots_ok
            && n > 0
            && batch.num_tokens() == n
            && batch.seqs.iter().all(|s| s.query_len == 1)
            && batch.logits_indices.iter().copied().eq(0..n);
        let Some(size) = padded_batch_size(&self.sizes, n).filter(|_| eligible) else {
            return Ok(None);
        };
        let index = self
            .sizes
            .iter()
            .position(|&s| s == size)
            .ok_or_else(|| GpuError::Capture(format!("no graph of size {size}")))?;
        let dev = model.device();
        let segments = self.lora.is_some().then_some(segments);
        let (mapping, lora_slots) = self.lora.unwrap_or_default();
        let layout = GraphLayout {
            size,
            mapping,
            lora_slots,
        };
        ws.stage(dev, batch, segments, Some(layout))?;
        dev.replay(&self.graphs[index])?;
        self.replays += 1;
        Ok(Some(n))
    }
}

#[cfg(all(test, feature = "gpu-emu"))]
mod tests;
