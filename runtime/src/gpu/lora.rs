//! The adapter slots on the device: for every layer and each of the seven projections a
//! [`DeviceLoraSlots`] store, filled from a [`GpuAdapterImage`] of the same [`AdapterWeights`]
//! the CPU stack takes. The image is what the host tier keeps for a GPU engine: the adapter
//! loader's thread builds it, so filling a slot on the engine's thread is a copy of its bits.

use caduceus_kernels::gpu::copy_stream::Upload;
use caduceus_kernels::gpu::lora::{DeviceLoraSlots, LoraGpuError, SlotImage};
use caduceus_kernels::gpu::{DType, Device};
use caduceus_kernels::lora::{LoraError, LoraShape, PeftSlot, Segment};

use crate::adapters::AdapterWeights;
use crate::model::config::LlamaConfig;
use crate::model::lora::{projection_dims, LoraStack, LoraStackError};

/// Why a host-prepared adapter cannot go into the device slots.
#[derive(Debug, thiserror::Error)]
pub enum GpuLoraLoadError {
    #[error("the GPU engine reads adapters prepared as f16 or f32 (set adapters.dtype): {0}")]
    Prepared(#[from] LoraStackError),
    #[error(transparent)]
    Device(#[from] LoraGpuError),
}

/// An adapter as the device slots of one dtype hold it: per layer and projection (`None`: not
/// targeted) the [`SlotImage`] of its A and B.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuAdapterImage {
    /// `[layer][Projection::index]`.
    layers: Vec<[Option<SlotImage>; 7]>,
}

impl GpuAdapterImage {
    /// The image of `adapter` (validated for `config`'s model) for slots of `dtype`: rounded
    /// once, from the f32 PEFT weights.
    pub fn new(
        config: &LlamaConfig,
        adapter: &AdapterWeights,
        dtype: DType,
    ) -> Result<Self, LoraGpuError> {
        Self::build(&projection_dims(config), dtype, adapter_pairs(adapter))
    }

    /// The images of each layer's (a, b, rank, scale) per projection, whose (in, out) dims are
    /// `dims`.
    fn build<'a>(
        dims: &[(usize, usize); 7],
        dtype: DType,
        layers: impl Iterator<Item = [Option<PeftPair<'a>>; 7]>,
    ) -> Result<Self, LoraGpuError> {
        let layers = layers
            .map(|pairs| {
                let mut images: [Option<SlotImage>; 7] = Default::default();
                for ((image, pair), &(in_dim, out_dim)) in images.iter_mut().zip(pairs).zip(dims) {
                    if let Some((a, b, rank, scale)) = pair {
                        *image = Some(SlotImage::new(dtype, in_dim, out_dim, a, b, rank, scale)?);
                    }
                }
                Ok(images)
            })
            .collect::<Result<Vec<_>, LoraGpuError>>()?;
        Ok(GpuAdapterImage { layers })
    }

    /// Host bytes held.
    pub fn nbytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(SlotImage::nbytes)
            .sum()
    }
}

/// One projection's (a, b, rank, scale) in PEFT's layouts.
type PeftPair<'a> = (&'a [f32], &'a [f32], usize, f32);

/// Each layer's projections of `adapter`.
fn adapter_pairs(adapter: &AdapterWeights) -> impl Iterator<Item = [Option<PeftPair<'_>>; 7]> {
    let (rank, scale) = (adapter.rank, adapter.scale);
    adapter.layers.iter().map(move |layer| {
        layer
            .each_ref()
            .map(|p| p.as_ref().map(|p| (&p.a[..], &p.b[..], rank, scale)))
    })
}

/// A layer's projections read back from a host stack.
fn peft_slots(layer: &[Option<PeftSlot>; 7]) -> [Option<PeftPair<'_>>; 7] {
    layer
        .each_ref()
        .map(|p| p.as_ref().map(|p| (&p.a[..], &p.b[..], p.rank, p.scale)))
}

/// `max_loras` device slots for every projection of every layer.
pub struct GpuLoraStack {
    /// `[layer][Projection::index]`.
    layers: Vec<Vec<DeviceLoraSlots>>,
    num_slots: usize,
    dtype: DType,
    /// (in, out) dims of each projection.
    dims: [(usize, usize); 7],
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
        Ok(GpuLoraStack {
            layers,
            num_slots,
            dtype,
            dims,
        })
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
        let image = self.image_of(adapter)?;
        let mut up = dev;
        self.load_image_with(&mut up, slot, &image)
    }

    /// Puts the adapter of a host-prepared one-slot stack (f32 or f16; see
    /// [`LoraStack::read_slot`]) into `slot`, converted to the device dtype.
    pub fn load_prepared(
        &mut self,
        dev: &Device,
        slot: usize,
        prepared: &LoraStack,
    ) -> Result<(), GpuLoraLoadError> {
        let image = self.image_of_prepared(prepared)?;
        let mut up = dev;
        Ok(self.load_image_with(&mut up, slot, &image)?)
    }

    /// The image of the adapter in a host-prepared one-slot stack (f32 or f16), read back and
    /// rounded to these slots' dtype.
    pub fn image_of_prepared(
        &self,
        prepared: &LoraStack,
    ) -> Result<GpuAdapterImage, GpuLoraLoadError> {
        let layers = prepared.read_slot(0)?;
        let pairs = layers.iter().map(peft_slots);
        Ok(GpuAdapterImage::build(&self.dims, self.dtype, pairs)?)
    }

    /// Puts `image` into `slot` through `up` (the adapter copy stream: see
    /// [`super::adapter_copies`]): a copy of its bits, projections it does not target cleared.
    pub fn load_image_with(
        &mut self,
        up: &mut impl Upload,
        slot: usize,
        image: &GpuAdapterImage,
    ) -> Result<(), LoraGpuError> {
        if image.layers.len() != self.layers.len() {
            return Err(LoraError::LengthMismatch {
                what: "adapter layers",
                expected: self.layers.len(),
                actual: image.layers.len(),
            }
            .into());
        }
        for (stores, images) in self.layers.iter_mut().zip(&image.layers) {
            for (store, image) in stores.iter_mut().zip(images) {
                match image {
                    Some(i) => store.load_image_with(up, slot, i)?,
                    None => store.clear_slot_with(up, slot)?,
                }
            }
        }
        Ok(())
    }

    /// The image of `adapter` for these slots.
    pub fn image_of(&self, adapter: &AdapterWeights) -> Result<GpuAdapterImage, LoraGpuError> {
        GpuAdapterImage::build(&self.dims, self.dtype, adapter_pairs(adapter))
    }

    /// The slots' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
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
