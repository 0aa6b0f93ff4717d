//! The adapter slots the forward pass reads (vLLM's `max_loras` "device" slots): for every layer
//! and each of the seven projections, a stacked [`LoraSlots`] store, plus the per-batch map of
//! which tokens use which slot.

use caduceus_kernels::lora::{
    add_lora_fused, f16, FusedPart, LoraError, LoraKernel, LoraShape, LoraSlots, LoraWeight,
    PeftSlot, Segment, Q8,
};

use super::config::LlamaConfig;
use crate::adapters::{AdapterWeights, LoraPair, Projection};

/// Element type of the adapter slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraDtype {
    /// Exact f32 (what PEFT computes; twice the bytes of f16).
    F32,
    /// Half precision storage, f32 arithmetic: half the bytes to stream per decode step.
    #[default]
    F16,
    /// 8-bit weights with per-rank scales and 8-bit activations (VNNI dot products): a quarter
    /// of f32's bytes, ~1% RMS error on the delta. Needs AVX-512 VNNI to be fast.
    Q8,
}

impl LoraDtype {
    /// `Q8` where this CPU has the AVX-512 VNNI kernels, else `F16`: the fastest storage that
    /// keeps deltas close to PEFT's.
    pub fn fastest() -> LoraDtype {
        if LoraKernel::Avx512.is_available() {
            LoraDtype::Q8
        } else {
            LoraDtype::F16
        }
    }
}

/// One projection's slots in the chosen storage type.
enum ProjectionSlots {
    F32(LoraSlots<f32>),
    F16(LoraSlots<f16>),
    Q8(LoraSlots<Q8>),
}

impl ProjectionSlots {
    fn new(dtype: LoraDtype, shape: LoraShape) -> Result<Self, LoraError> {
        Ok(match dtype {
            LoraDtype::F32 => ProjectionSlots::F32(LoraSlots::new(shape)?),
            LoraDtype::F16 => ProjectionSlots::F16(LoraSlots::new(shape)?),
            LoraDtype::Q8 => ProjectionSlots::Q8(LoraSlots::new(shape)?),
        })
    }

    fn load(
        &mut self,
        slot: usize,
        pair: &LoraPair,
        rank: usize,
        scale: f32,
    ) -> Result<(), LoraError> {
        match self {
            ProjectionSlots::F32(s) => s.load_slot(slot, &pair.a, &pair.b, rank, scale),
            ProjectionSlots::F16(s) => s.load_slot(slot, &pair.a, &pair.b, rank, scale),
            ProjectionSlots::Q8(s) => s.load_slot(slot, &pair.a, &pair.b, rank, scale),
        }
    }

    fn copy_from(&mut self, slot: usize, src: &ProjectionSlots) -> Result<(), LoraError> {
        match (self, src) {
            (ProjectionSlots::F32(d), ProjectionSlots::F32(s)) => d.copy_slot_from(slot, s, 0),
            (ProjectionSlots::F16(d), ProjectionSlots::F16(s)) => d.copy_slot_from(slot, s, 0),
            (ProjectionSlots::Q8(d), ProjectionSlots::Q8(s)) => d.copy_slot_from(slot, s, 0),
            // Stacks of different dtypes are refused before they get here.
            (_, s) => Err(LoraError::BadShape(s.shape())),
        }
    }

    fn shape(&self) -> LoraShape {
        match self {
            ProjectionSlots::F32(s) => s.shape(),
            ProjectionSlots::F16(s) => s.shape(),
            ProjectionSlots::Q8(s) => s.shape(),
        }
    }

    fn clear(&mut self, slot: usize) -> Result<(), LoraError> {
        match self {
            ProjectionSlots::F32(s) => s.clear_slot(slot),
            ProjectionSlots::F16(s) => s.clear_slot(slot),
            ProjectionSlots::Q8(s) => s.clear_slot(slot),
        }
    }

    fn read(&self, slot: usize) -> Option<PeftSlot> {
        match self {
            ProjectionSlots::F32(s) => s.read_slot(slot),
            ProjectionSlots::F16(s) => s.read_slot(slot),
            ProjectionSlots::Q8(s) => s.read_slot(slot),
        }
    }

    fn is_loaded(&self, slot: usize) -> bool {
        match self {
            ProjectionSlots::F32(s) => s.rank(slot).is_some(),
            ProjectionSlots::F16(s) => s.rank(slot).is_some(),
            ProjectionSlots::Q8(s) => s.rank(slot).is_some(),
        }
    }

    fn nbytes(&self) -> usize {
        match self {
            ProjectionSlots::F32(s) => s.nbytes(),
            ProjectionSlots::F16(s) => s.nbytes(),
            ProjectionSlots::Q8(s) => s.nbytes(),
        }
    }
}

/// The weight kinds a [`ProjectionSlots`] holds, for calls generic over the kind.
trait SlotKind: LoraWeight {
    fn pick(slots: &ProjectionSlots) -> Option<&LoraSlots<Self>>;
}

impl SlotKind for f32 {
    fn pick(slots: &ProjectionSlots) -> Option<&LoraSlots<f32>> {
        match slots {
            ProjectionSlots::F32(s) => Some(s),
            _ => None,
        }
    }
}

impl SlotKind for f16 {
    fn pick(slots: &ProjectionSlots) -> Option<&LoraSlots<f16>> {
        match slots {
            ProjectionSlots::F16(s) => Some(s),
            _ => None,
        }
    }
}

impl SlotKind for Q8 {
    fn pick(slots: &ProjectionSlots) -> Option<&LoraSlots<Q8>> {
        match slots {
            ProjectionSlots::Q8(s) => Some(s),
            _ => None,
        }
    }
}

/// `num_slots` adapter slots for every layer and projection of one model.
pub struct LoraStack {
    layers: Vec<[ProjectionSlots; 7]>,
    num_slots: usize,
    max_rank: usize,
    dtype: LoraDtype,
}

/// Why an adapter cannot go into a slot.
#[derive(Debug, thiserror::Error)]
pub enum LoraStackError {
    #[error("adapter has {actual} layers, the model {expected}")]
    LayerCount { expected: usize, actual: usize },
    #[error("layer {layer} {projection}: {source}")]
    Slot {
        layer: usize,
        projection: &'static str,
        source: LoraError,
    },
    #[error("adapter prepared as {prepared:?}, the slots hold {slots:?}")]
    Dtype {
        prepared: LoraDtype,
        slots: LoraDtype,
    },
    #[error(transparent)]
    Kernel(#[from] LoraError),
}

impl LoraStack {
    /// Empty slots sized for adapters of rank up to `max_rank` on `config`'s shapes.
    pub fn new(
        config: &LlamaConfig,
        num_slots: usize,
        max_rank: usize,
        dtype: LoraDtype,
    ) -> Result<Self, LoraError> {
        let dims = projection_dims(config);
        let layers = (0..config.num_layers)
            .map(|_| {
                let mut out = Vec::with_capacity(7);
                for (in_dim, out_dim) in dims {
                    let shape = LoraShape {
                        num_slots,
                        in_dim,
                        out_dim,
                        max_rank,
                    };
                    out.push(ProjectionSlots::new(dtype, shape)?);
                }
                Ok(out
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("seven projections")))
            })
            .collect::<Result<Vec<_>, LoraError>>()?;
        Ok(LoraStack {
            layers,
            num_slots,
            max_rank,
            dtype,
        })
    }

    /// `adapter` alone in a one-slot stack of its own rank, converted to `dtype`: what the
    /// loader thread builds so that [`Self::copy_from`] can fill a slot with plain copies.
    pub fn prepare(
        config: &LlamaConfig,
        adapter: &AdapterWeights,
        dtype: LoraDtype,
    ) -> Result<Self, LoraStackError> {
        let mut stack = LoraStack::new(config, 1, adapter.rank, dtype)?;
        stack.load(0, adapter)?;
        Ok(stack)
    }

    /// Fills `slot` with the adapter of a [`Self::prepare`]d stack (same model and dtype, rank
    /// within this stack's `max_rank`).
    pub fn copy_from(&mut self, slot: usize, prepared: &LoraStack) -> Result<(), LoraStackError> {
        if prepared.dtype != self.dtype {
            return Err(LoraStackError::Dtype {
                prepared: prepared.dtype,
                slots: self.dtype,
            });
        }
        self.fill_each(prepared.layers.len(), |layer, p, d| {
            let s = &prepared.layers[layer][p];
            if s.is_loaded(0) {
                d.copy_from(slot, s)
            } else {
                d.clear(slot)
            }
        })
    }

    /// The adapter in `slot` back in PEFT's f32 layouts, per layer and projection (`None`: not
    /// targeted): what a device backend fills its own slots from. Q8 stacks cannot be read back.
    pub fn read_slot(&self, slot: usize) -> Result<Vec<[Option<PeftSlot>; 7]>, LoraStackError> {
        if self.dtype == LoraDtype::Q8 {
            return Err(LoraStackError::Dtype {
                prepared: LoraDtype::Q8,
                slots: LoraDtype::F16,
            });
        }
        Ok(self
            .layers
            .iter()
            .map(|projections| std::array::from_fn(|p| projections[p].read(slot)))
            .collect())
    }

    /// The storage type of the slots.
    pub fn dtype(&self) -> LoraDtype {
        self.dtype
    }

    /// Number of slots.
    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// Largest rank a slot holds.
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// Bytes held by all slots.
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(ProjectionSlots::nbytes)
            .sum()
    }

    /// Copies `adapter` into `slot`; projections it does not target are cleared there.
    pub fn load(&mut self, slot: usize, adapter: &AdapterWeights) -> Result<(), LoraStackError> {
        self.fill_each(adapter.layers.len(), |layer, p, s| {
            // On the loader thread, the engine may hold the conversion here during a step.
            crate::adapters::gate::checkpoint();
            match &adapter.layers[layer][p] {
                Some(pair) => s.load(slot, pair, adapter.rank, adapter.scale),
                None => s.clear(slot),
            }
        })
    }

    /// Runs `f(layer, projection index, slots)` over every projection of every layer, after
    /// checking the source has `source_layers` layers like this stack; errors name the place.
    fn fill_each(
        &mut self,
        source_layers: usize,
        mut f: impl FnMut(usize, usize, &mut ProjectionSlots) -> Result<(), LoraError>,
    ) -> Result<(), LoraStackError> {
        if source_layers != self.layers.len() {
            return Err(LoraStackError::LayerCount {
                expected: self.layers.len(),
                actual: source_layers,
            });
        }
        for (layer, slots) in self.layers.iter_mut().enumerate() {
            for (p, s) in slots.iter_mut().enumerate() {
                f(layer, p, s).map_err(|source| LoraStackError::Slot {
                    layer,
                    projection: Projection::ALL[p].module_name(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// Empties `slot` in every layer.
    pub fn clear(&mut self, slot: usize) -> Result<(), LoraError> {
        for s in self.layers.iter_mut().flatten() {
            s.clear(slot)?;
        }
        Ok(())
    }

    /// Adds layer `layer`'s deltas of `batch` for projections that share the input `x` (q, k and
    /// v; gate and up; or one alone) in one pass, into one output: `y`'s rows are `stride` wide
    /// and each projection's columns start at its offset. Tokens whose adapter does not target a
    /// projection get no delta there.
    pub(crate) fn apply(
        &self,
        batch: &LoraBatch<'_>,
        layer: usize,
        projections: &[(Projection, usize)],
        x: &[f32],
        (y, stride): (&mut [f32], usize),
    ) -> Result<(), LoraError> {
        let slots = &self.layers[layer];
        match self.dtype {
            LoraDtype::F32 => fused::<f32>(slots, projections, batch.segments, x, (y, stride)),
            LoraDtype::F16 => fused::<f16>(slots, projections, batch.segments, x, (y, stride)),
            LoraDtype::Q8 => fused::<Q8>(slots, projections, batch.segments, x, (y, stride)),
        }
    }
}

/// [`add_lora_fused`] over `projections` of one layer's slots (which all hold `W`).
fn fused<W: SlotKind>(
    slots: &[ProjectionSlots; 7],
    projections: &[(Projection, usize)],
    segments: &[Segment],
    x: &[f32],
    (y, stride): (&mut [f32], usize),
) -> Result<(), LoraError> {
    let mut parts = Vec::with_capacity(projections.len());
    for &(p, offset) in projections {
        let s = &slots[p.index()];
        // A stack holds one kind throughout.
        let slots = W::pick(s).ok_or(LoraError::BadShape(s.shape()))?;
        parts.push(FusedPart { slots, offset });
    }
    add_lora_fused(&parts, x, segments, y, stride)
}

/// `(in_dim, out_dim)` of each projection, in [`Projection::ALL`] order.
pub fn projection_dims(c: &LlamaConfig) -> [(usize, usize); 7] {
    let (hidden, ffn) = (c.hidden_size, c.intermediate_size);
    let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    [
        (hidden, q_dim),
        (hidden, kv_dim),
        (hidden, kv_dim),
        (q_dim, hidden),
        (hidden, ffn),
        (hidden, ffn),
        (ffn, hidden),
    ]
}

/// Which slot each token of a forward batch uses: runs of consecutive tokens on one slot.
#[derive(Clone, Copy)]
pub struct LoraBatch<'a> {
    /// The slots.
    pub stack: &'a LoraStack,
    /// Sorted, non-overlapping; tokens outside every segment, or on a `None` slot, use the base.
    pub segments: &'a [Segment],
}
