//! What the host tier keeps of an adapter for one engine: the form its backend's slots copy
//! from, built by the loader thread so that filling a slot on the engine thread is a copy.
//!
//! The CPU engine's slots take a one-slot [`LoraStack`] of their storage type. A GPU engine's
//! take a [`GpuAdapterImage`]: the bits its device slots hold (A's rows and B transposed, padded,
//! in the model's dtype). Preparing a GPU engine's adapters as a CPU stack instead left the
//! engine thread to read that stack back and transpose and round it for every slot it filled:
//! ~0.43 s for a Llama-3-8B rank-16 adapter on this machine's core, a stall of every running
//! stream per cold load.

use super::weights::AdapterTensors;
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
use crate::gpu::lora::GpuAdapterImage;
use crate::model::config::LlamaConfig;
use crate::model::lora::{LoraDtype, LoraStack, LoraStackError};
#[cfg(any(feature = "cuda", feature = "gpu-emu"))]
use caduceus_kernels::gpu::{lora::LoraGpuError, pinned_pool::PinnedPool, DType};

/// The form one engine's adapter slots are filled from (its backend decides).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotFormat {
    /// The CPU engine's slots, of this storage type (`adapters.dtype`).
    Host(LoraDtype),
    /// A GPU engine's device slots, in the model's dtype; images go into `pinned` pages where
    /// it has room (so a slot fill is a DMA from them), else into ordinary memory.
    #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
    Device {
        dtype: DType,
        pinned: Option<PinnedPool>,
    },
}

impl SlotFormat {
    /// A device's slots of `dtype`, images in ordinary memory.
    #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
    pub fn device(dtype: DType) -> Self {
        SlotFormat::Device {
            dtype,
            pinned: None,
        }
    }

    /// The CPU slots' storage type (`None`: a device's slots).
    pub fn host(&self) -> Option<LoraDtype> {
        match self {
            SlotFormat::Host(dtype) => Some(*dtype),
            #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
            SlotFormat::Device { .. } => None,
        }
    }
}

/// An adapter converted to a [`SlotFormat`].
pub enum PreparedAdapter {
    /// A one-slot stack of the CPU slots' storage type.
    Host(LoraStack),
    /// The device slots' bits.
    #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
    Device(GpuAdapterImage),
}

/// Why an adapter could not be converted for the slots.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Host(#[from] LoraStackError),
    #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
    #[error(transparent)]
    Device(#[from] LoraGpuError),
}

impl PreparedAdapter {
    /// `tensors` (validated for the model `base`) in `format`: a device image is built from the
    /// values where they lie; the CPU slots' stack from f32 weights.
    pub fn prepare(
        base: &LlamaConfig,
        tensors: &AdapterTensors<'_>,
        format: &SlotFormat,
    ) -> Result<PreparedAdapter, PrepareError> {
        Ok(match format {
            SlotFormat::Host(dtype) => {
                PreparedAdapter::Host(LoraStack::prepare(base, &tensors.to_weights(), *dtype)?)
            }
            #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
            SlotFormat::Device { dtype, pinned } => PreparedAdapter::Device(
                GpuAdapterImage::prepare(base, tensors, *dtype, pinned.as_ref())?,
            ),
        })
    }

    /// The CPU slots' stack (`None`: prepared for a device).
    pub fn host(&self) -> Option<&LoraStack> {
        match self {
            PreparedAdapter::Host(stack) => Some(stack),
            #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
            PreparedAdapter::Device(_) => None,
        }
    }

    /// Host bytes held.
    pub fn nbytes(&self) -> usize {
        match self {
            PreparedAdapter::Host(stack) => stack.nbytes(),
            #[cfg(any(feature = "cuda", feature = "gpu-emu"))]
            PreparedAdapter::Device(image) => image.nbytes(),
        }
    }
}

impl From<LoraStack> for PreparedAdapter {
    fn from(stack: LoraStack) -> Self {
        PreparedAdapter::Host(stack)
    }
}
