//! The multi-LoRA part of `gpu-bench`: 256 decoding streams over 1 to 256 distinct adapters
//! against the base model at the same load (decode graphs, both LoRA mappings, with and without
//! programmatic launches), and a prefill whose tokens spread over the adapters against the base
//! prefill (eager, as the engine runs prefill steps).

use std::time::Instant;

use caduceus_kernels::gpu::lora::DecodeLoraMapping;
use caduceus_kernels::lora::Segment;

use super::{
    Bench, LoraFigure, LoraPart, LoraPrefillFigure, PrefillFigure, ProgrammaticLaunch, Timed,
};
use crate::gpu::decode_graph::DecodeGraphs;
use crate::gpu::lora::GpuLoraStack;
use crate::gpu::model::GpuModelError;
use crate::gpu::random_model::random_adapter;
use crate::gpu::workspace::Workspace;

impl Bench<'_> {
    /// Times the multi-LoRA part; `base_prefill`: the model part's prefill without adapters,
    /// which the prefill with adapters is compared with (none: no prefill with adapters either).
    pub(super) fn time_lora(
        &self,
        ws: &mut Workspace,
        base_prefill: Option<&PrefillFigure>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<LoraPart, GpuModelError> {
        let Bench { model, kv, o, .. } = *self;
        let n = o.lora_streams;
        let roof = self.decode_roofline(n);
        let mut base_graph = DecodeGraphs::capture(model, kv, ws, &[n], None)?;
        let base = self.time_decode(ws, Some(&mut base_graph), n, None)?;
        drop(base_graph);
        let base = Timed::new(base, roof);
        let base_tokens_per_s = n as f64 / (base.median_ms / 1e3);
        progress(&format!(
            "multi-LoRA base, {n} streams: {:.3} ms/step",
            base.median_ms
        ));
        let num_slots = o.lora_distinct.iter().copied().max().unwrap_or(1).max(1);
        let (dev, c) = (model.device(), model.config());
        let mut stack = GpuLoraStack::new(dev, model.dtype(), c, num_slots, o.lora_rank)?;
        let start = Instant::now();
        // Distinct slots hold distinct memory, which is what the kernels' cost depends on; a few
        // distinct random adapters cycled over the slots keep generation out of the budget.
        let adapters: Vec<_> = (0..num_slots.min(4))
            .map(|s| random_adapter(c, o.lora_rank, 100 + s as u64))
            .collect();
        for slot in 0..num_slots {
            stack.load(dev, slot, &adapters[slot % adapters.len()])?;
        }
        dev.synchronize()?;
        let slot_fill_s = start.elapsed().as_secs_f64();
        progress(&format!(
            "{num_slots} adapter slots filled in {slot_fill_s:.1} s"
        ));
        // The decode graphs carry the adapter launches, sized for the slots' largest rank: BGMV as
        // the engine's, and the tokens grouped by adapter beside them.
        let mut graphs = DecodeLoraMapping::ALL
            .into_iter()
            .map(|m| {
                Ok((
                    m,
                    DecodeGraphs::capture(model, kv, ws, &[n], Some((&stack, m)))?,
                ))
            })
            .collect::<Result<Vec<_>, GpuModelError>>()?;
        let mut runs = Vec::new();
        for &distinct in &o.lora_distinct {
            let distinct = distinct.clamp(1, num_slots);
            let slots = streams_by_adapter(n, distinct);
            let lora = Some((&stack, &slots[..]));
            for (mapping, graph) in &mut graphs {
                let step = self.time_decode(ws, Some(graph), n, lora)?;
                let profile = match mapping {
                    DecodeLoraMapping::Bgmv => Some(self.profile_decode(ws, n, lora)?),
                    DecodeLoraMapping::Grouped => None,
                };
                let step = Timed::new(step, roof);
                let tokens_per_s = n as f64 / (step.median_ms / 1e3);
                progress(&format!(
                    "multi-LoRA {distinct} distinct ({}): {:.3} ms/step ({:.2}x base)",
                    mapping.name(),
                    step.median_ms,
                    tokens_per_s / base_tokens_per_s
                ));
                runs.push(LoraFigure {
                    profile,
                    distinct,
                    mapping: mapping.name(),
                    over_base: tokens_per_s / base_tokens_per_s,
                    tokens_per_s,
                    step,
                    programmatic_launch: None,
                    programmatic_over_base: None,
                });
            }
        }
        drop(graphs);
        // The base and the engine's mapping again, every kernel a programmatic dependent.
        let mut base_programmatic_launch = None;
        if let Some(_on) = ProgrammaticLaunch::on(dev) {
            let mut base_graph = DecodeGraphs::capture(model, kv, ws, &[n], None)?;
            let base = Timed::new(self.time_decode(ws, Some(&mut base_graph), n, None)?, roof);
            drop(base_graph);
            let bgmv = Some((&stack, DecodeLoraMapping::Bgmv));
            let mut graph = DecodeGraphs::capture(model, kv, ws, &[n], bgmv)?;
            for run in runs.iter_mut().filter(|r| r.mapping == "bgmv") {
                let slots = streams_by_adapter(n, run.distinct);
                let lora = Some((&stack, &slots[..]));
                let step = Timed::new(self.time_decode(ws, Some(&mut graph), n, lora)?, roof);
                let over_base = base.median_ms / step.median_ms;
                progress(&format!(
                "multi-LoRA {} distinct (bgmv, programmatic dependent launches): {:.3} ms/step \
                 ({over_base:.2}x base {:.3} ms)",
                run.distinct, step.median_ms, base.median_ms
            ));
                run.programmatic_over_base = Some(over_base);
                run.programmatic_launch = Some(step);
            }
            base_programmatic_launch = Some(base);
        }
        let mut prefill = Vec::new();
        if let Some(base) = base_prefill {
            for &distinct in &o.lora_distinct {
                let distinct = distinct.clamp(1, num_slots).min(base.prompt_len);
                let runs = prefill_runs(base.prompt_len, distinct);
                let fig = self.time_prefill(ws, base.prompt_len, Some((&stack, &runs)))?;
                let over_base = fig.tokens_per_s / base.tokens_per_s;
                progress(&format!(
                    "prefill {} over {distinct} adapters: {:.0} tokens/s ({over_base:.2}x base)",
                    base.prompt_len, fig.tokens_per_s
                ));
                prefill.push(LoraPrefillFigure {
                    distinct,
                    over_base,
                    prefill: fig,
                });
            }
        }
        Ok(LoraPart {
            streams: n,
            rank: o.lora_rank,
            context: o.context,
            base,
            base_tokens_per_s,
            base_programmatic_launch,
            runs,
            prefill,
            slot_fill_s,
        })
    }
}

/// `len` prompt tokens in `distinct` runs of (nearly) equal length, run i on slot i: a prefill
/// step whose prompts each name their own adapter, as the engine's SGMV segments are.
fn prefill_runs(len: usize, distinct: usize) -> Vec<Segment> {
    let distinct = distinct.clamp(1, len.max(1));
    (0..distinct)
        .map(|i| {
            let (start, end) = (i * len / distinct, (i + 1) * len / distinct);
            Segment {
                start,
                len: end - start,
                slot: Some(i as u32),
            }
        })
        .collect()
}

/// The slots of `n` decoding streams spread evenly over `distinct` adapters, grouped by adapter
/// as a batch sorted by adapter is (S-LoRA, Punica).
pub(super) fn streams_by_adapter(n: usize, distinct: usize) -> Vec<Option<u32>> {
    (0..n).map(|i| Some((i * distinct / n) as u32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_runs_cover_the_prompt_in_order_one_slot_each() {
        for (len, distinct) in [(2048, 64), (17, 4), (5, 8), (1, 1), (10, 0)] {
            let runs = prefill_runs(len, distinct);
            assert_eq!(runs.len(), distinct.clamp(1, len), "{len} {distinct}");
            let mut next = 0;
            for (i, r) in runs.iter().enumerate() {
                assert_eq!((r.start, r.slot), (next, Some(i as u32)), "{runs:?}");
                assert!(r.len > 0, "{runs:?}");
                next += r.len;
            }
            assert_eq!(next, len);
        }
    }
}
