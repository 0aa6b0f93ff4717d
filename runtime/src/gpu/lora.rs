//! The adapter slots on the device: for every layer and each of the seven projections a
//! [`DeviceLoraSlots`] store, filled from the same [`AdapterWeights`] the CPU stack takes.

use caduceus_kernels::gpu::copy_stream::Upload;
use caduceus_kernels::gpu::lora::{DeviceLoraSlots, LoraGpuError};
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::lora::{LoraShape, Segment};

use crate::adapters::AdapterWeights;
use crate::model::config::LlamaConfig;
use crate::model::lora::{projection_dims, LoraStack, LoraStackError};

/// Why a host-prepared adapter cannot go into the device slots.
#[derive(Debug, thiserror::Error)]
pub enum GpuLoraLoadError {
    #[error("the GPU engine reads adapters prepared as f16 or f32 (set adapters.dtype): {0}")]
    Prepared(#[from] LoraStackError),
    #[error("adapter has {actual} layers, the model {expected}")]
    Layers { expected: usize, actual: usize },
    #[error(transparent)]
    Device(#[from] LoraGpuError),
}

/// `max_loras` device slots for every projection of every layer.
pub struct GpuLoraStack {
    /// `[layer][Projection::index]`.
    layers: Vec<Vec<DeviceLoraSlots>>,
    num_slots: usize,
}

impl GpuLoraStack {
    /// Empty slots for adapters of rank up to `max_rank`.
    pub fn new(
        dev: &Device,
        dtype: DType,
        config: &LlamaConfig,
        num_slots: usize,
        max_rank: usize,
    ) -> Result<Self, LoraGpuError> {
        let dims = projection_dims(config);
        let layers = (0..config.num_layers)
            .map(|_| {
                dims.iter()
                    .map(|&(in_dim, out_dim)| {
                        let shape = LoraShape {
                            num_slots,
                            in_dim,
                            out_dim,
                            max_rank,
                        };
                        DeviceLoraSlots::new(dev, dtype, shape)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GpuLoraStack { layers, num_slots })
    }

    pub fn num_slots(&self) -> usize {
        self.num_slots
    }

    /// Device bytes of all slots.
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(DeviceLoraSlots::nbytes)
            .sum()
    }

    /// Puts `adapter` into `slot` (projections it does not target are cleared there).
    pub fn load(
        &mut self,
        dev: &Device,
        slot: usize,
        adapter: &AdapterWeights,
    ) -> Result<(), LoraGpuError> {
        for (layer, pairs) in self.layers.iter_mut().zip(&adapter.layers) {
            for (slots, pair) in layer.iter_mut().zip(pairs) {
                match pair {
                    Some(p) => {
                        slots.load_slot(dev, slot, &p.a, &p.b, adapter.rank, adapter.scale)?
                    }
                    None => slots.clear_slot(dev, slot)?,
                }
            }
        }
        Ok(())
    }

    /// Puts the adapter of a host-prepared one-slot stack (f32 or f16; see
    /// [`LoraStack::read_slot`]) into `slot`, converted to the device dtype.
    pub fn load_prepared(
        &mut self,
        dev: &Device,
        slot: usize,
        prepared: &LoraStack,
    ) -> Result<(), GpuLoraLoadError> {
        let mut up = dev;
        self.load_prepared_with(&mut up, slot, prepared)
    }

    /// [`Self::load_prepared`] through `up` (the adapter copy stream: see
    /// [`super::adapter_copies`]).
    pub fn load_prepared_with(
        &mut self,
        up: &mut impl Upload,
        slot: usize,
        prepared: &LoraStack,
    ) -> Result<(), GpuLoraLoadError> {
        let layers = prepared.read_slot(0)?;
        if layers.len() != self.layers.len() {
            return Err(GpuLoraLoadError::Layers {
                expected: self.layers.len(),
                actual: layers.len(),
            });
        }
        for (stores, pairs) in self.layers.iter_mut().zip(&layers) {
            for (store, pair) in stores.iter_mut().zip(pairs) {
                match pair {
                    Some(p) => store.load_slot_with(up, slot, &p.a, &p.b, p.rank, p.scale)?,
                    None => store.clear_slot_with(up, slot)?,
                }
            }
        }
        Ok(())
    }

    /// The stores of one layer, in `Projection::ALL` order.
    pub(crate) fn layer(&self, layer: usize) -> &[DeviceLoraSlots] {
        &self.layers[layer]
    }
}

/// Which tokens of a forward pass use which slot (the CPU's `LoraBatch` for the device).
#[derive(Clone, Copy)]
pub struct GpuLoraBatch<'a> {
    pub stack: &'a GpuLoraStack,
    /// Sorted, non-overlapping runs of tokens on one slot.
    pub segments: &'a [Segment],
}
