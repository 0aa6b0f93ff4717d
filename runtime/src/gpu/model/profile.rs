//! Where a forward pass spends its device time, op by op: [`OpClock`] marks the device's stream
//! after each op of [`GpuModel::launch`](super::GpuModel) and [`OpProfile`] sums the stretches by
//! [`Op`]. For `gpu-bench` (eager steps only: a captured graph has no marks), never on the
//! serving path.

use std::cell::RefCell;

use caduceus_kernels::gpu::timing::DeviceMark;
use caduceus_kernels::gpu::{Device, GpuError};
use serde::Serialize;

/// The ops of a forward pass, as the profile groups them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Token embedding gather.
    Embed,
    /// RMSNorms (with the fused residual add), the final one included.
    Norm,
    QkvProj,
    /// RoPE on q/k and the K/V cache write.
    RopeCache,
    /// Paged attention (decode, with its split merge, or prefill).
    Attention,
    OProj,
    GateUpProj,
    SiluMul,
    DownProj,
    /// Every adapter delta (shrink and expand of the four fused calls).
    Lora,
    /// The gather of the rows that need logits and the LM head.
    LmHead,
}

/// Marks taken during one or more forward passes.
pub struct OpClock<'d> {
    dev: &'d Device,
    start: DeviceMark,
    laps: RefCell<Vec<(Op, DeviceMark)>>,
}

impl<'d> OpClock<'d> {
    /// Starts the clock at the current end of `dev`'s queued work.
    pub fn start(dev: &'d Device) -> Result<Self, GpuError> {
        Ok(OpClock {
            dev,
            start: dev.mark()?,
            laps: RefCell::new(Vec::new()),
        })
    }

    /// Marks the end of `op`: the device time since the previous mark is its.
    pub fn lap(&self, op: Op) -> Result<(), GpuError> {
        let mark = self.dev.mark()?;
        self.laps.borrow_mut().push((op, mark));
        Ok(())
    }

    /// Sums the laps by op (waits for the device to reach the last mark), over `passes`
    /// forward passes.
    pub fn finish(self, passes: usize) -> Result<OpProfile, GpuError> {
        let laps = self.laps.into_inner();
        let mut ops: Vec<OpTime> = Vec::new();
        let mut prev = &self.start;
        let mut total = 0.0;
        for (op, mark) in &laps {
            let ms = mark.ms_since(prev)?;
            prev = mark;
            total += ms;
            match ops.iter_mut().find(|t| t.op == *op) {
                Some(t) => {
                    t.ms += ms;
                    t.calls += 1;
                }
                None => ops.push(OpTime {
                    op: *op,
                    ms,
                    calls: 1,
                    share: 0.0,
                }),
            }
        }
        let passes = passes.max(1) as f64;
        for t in &mut ops {
            t.share = if total > 0.0 { t.ms / total } else { 0.0 };
            t.ms /= passes;
            t.calls = (t.calls as f64 / passes).round() as usize;
        }
        ops.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        Ok(OpProfile {
            ms_per_pass: total / passes,
            ops,
        })
    }
}

/// One op's device time per forward pass.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    pub op: Op,
    pub ms: f64,
    /// Launch groups of this op per pass (one per layer for most).
    pub calls: usize,
    /// Of the pass's profiled time.
    pub share: f64,
}

/// A forward pass's device time by op, largest first.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpProfile {
    /// Sum over the ops (each mark adds an event, so a little above an unmarked pass).
    pub ms_per_pass: f64,
    pub ops: Vec<OpTime>,
}
