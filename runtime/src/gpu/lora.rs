//! The adapter slots on the device: for every layer and each of the seven projections a
//! [`DeviceLoraSlots`] store, filled from a [`GpuAdapterImage`] of the same [`AdapterWeights`]
//! the CPU stack takes. The image is what the host tier keeps for a GPU engine: the adapter
//! loader's thread builds it, in pinned pages where the pool has room, so filling a slot on the
//! engine's thread is queueing DMAs of its bits (a copy into staging first otherwise).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use caduceus_kernels::gpu::copy_stream::Upload;
use caduceus_kernels::gpu::lora::{
    DeviceLoraSlots, LoraGpuError, PeftProjection, PinnedParts, SlotImage, SlotTable,
};
use caduceus_kernels::gpu::pinned_pool::{PinnedBytes, PinnedPool};
use caduceus_kernels::gpu::{DType, Device, GpuError};
use caduceus_kernels::lora::{LoraError, LoraShape, PeftSlot, Segment};
use caduceus_kernels::quant::Floats;

use crate::adapters::{AdapterTensors, AdapterWeights};
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

/// Pages of the pinned adapter pool: an image leases whole pages, so smaller pages waste less
/// on small adapters, larger ones split an 8B adapter's ~450 regions into fewer DMAs.
pub const ADAPTER_PAGE_BYTES: usize = 1 << 20;

/// The pinned pool a GPU engine's host tier keeps adapter images in, for a host cache of
/// `cache_bytes` ([`adapter_pool_bytes`]). Pinned once, here, before serving: pinning memory
/// later would synchronise the device (see [`PinnedPool`]).
pub fn adapter_pool(dev: &Device, cache_bytes: usize) -> Result<PinnedPool, GpuError> {
    PinnedPool::new(dev, adapter_pool_bytes(cache_bytes), ADAPTER_PAGE_BYTES)
}

/// The pinned bytes for a host cache of `cache_bytes`: a quarter more, for the pages' rounding
/// and for images that are built, or still being copied, while the cache evicts others.
pub fn adapter_pool_bytes(cache_bytes: usize) -> usize {
    cache_bytes.saturating_add(cache_bytes / 4)
}

/// Host bytes of the image of a rank-`rank` adapter on all seven projections of `config`'s
/// model (A's and B's padded rows of 2-byte values; what a pool is sized by).
pub fn image_bytes(config: &LlamaConfig, rank: usize) -> usize {
    let per_layer: usize = projection_dims(config)
        .iter()
        .map(|&(i, o)| SlotImage::bytes_for(i, o, rank))
        .sum();
    per_layer * config.num_layers
}

/// An adapter as the device slots of one dtype hold it: per layer and projection (`None`: not
/// targeted) the [`SlotImage`] of its A and B. Images are equal when their values are, pinned
/// or not.
#[derive(Clone, Debug)]
pub struct GpuAdapterImage {
    /// `[layer][Projection::index]`.
    layers: Vec<[Option<SlotImage>; 7]>,
    /// The pinned pages the values lie in ([`Self::new_pinned`]).
    lease: Option<Arc<PinnedBytes>>,
}

impl PartialEq for GpuAdapterImage {
    fn eq(&self, other: &Self) -> bool {
        self.layers == other.layers
    }
}

impl GpuAdapterImage {
    /// The image of `adapter` (validated for `config`'s model) for slots of `dtype`: rounded
    /// once, from the PEFT values where they lie.
    pub fn new(
        config: &LlamaConfig,
        adapter: &AdapterTensors<'_>,
        dtype: DType,
    ) -> Result<Self, LoraGpuError> {
        Self::build(&projection_dims(config), dtype, adapter_pairs(adapter))
    }

    /// [`Self::new`] written straight into pages of `pool` (no image in ordinary memory
    /// first); `Ok(None)` when the pool has too few free pages.
    pub fn new_pinned(
        config: &LlamaConfig,
        adapter: &AdapterTensors<'_>,
        dtype: DType,
        pool: &PinnedPool,
    ) -> Result<Option<Self>, LoraGpuError> {
        let dims = projection_dims(config);
        let layers = projections(&dims, dtype, adapter_pairs(adapter));
        let bytes = layers
            .iter()
            .flatten()
            .flatten()
            .map(PeftProjection::image_bytes)
            .sum();
        let Some(mut lease) = pool.lease(bytes) else {
            return Ok(None);
        };
        let mut parts = Vec::with_capacity(layers.len());
        for layer in &layers {
            let mut written: [Option<PinnedParts>; 7] = Default::default();
            for (slot, p) in written.iter_mut().zip(layer) {
                if let Some(p) = p {
                    crate::adapters::gate::checkpoint();
                    // The lease was sized for every projection's image.
                    let w = SlotImage::write_pinned(p, &mut lease)?;
                    *slot = Some(w.ok_or(GpuError::Shape("pinned image overflow".into()))?);
                }
            }
            parts.push(written);
        }
        let lease = Arc::new(lease);
        let layers = parts
            .into_iter()
            .map(|layer| layer.map(|p| p.map(|p| p.into_image(&lease))))
            .collect();
        Ok(Some(GpuAdapterImage {
            layers,
            lease: Some(lease),
        }))
    }

    /// The images of each layer's (a, b, rank, scale) per projection, whose (in, out) dims are
    /// `dims`.
    fn build<'a>(
        dims: &[(usize, usize); 7],
        dtype: DType,
        layers: impl Iterator<Item = [Option<PeftPair<'a>>; 7]>,
    ) -> Result<Self, LoraGpuError> {
        let layers = projections(dims, dtype, layers)
            .into_iter()
            .map(|layer| {
                let mut images: [Option<SlotImage>; 7] = Default::default();
                for (image, p) in images.iter_mut().zip(layer) {
                    if let Some(p) = p {
                        crate::adapters::gate::checkpoint();
                        *image = Some(SlotImage::of(&p)?);
                    }
                }
                Ok(images)
            })
            .collect::<Result<Vec<_>, LoraGpuError>>()?;
        Ok(GpuAdapterImage {
            layers,
            lease: None,
        })
    }

    /// Host bytes held: the whole pages leased once pinned.
    pub fn nbytes(&self) -> usize {
        match &self.lease {
            Some(lease) => lease.capacity(),
            None => self
                .layers
                .iter()
                .flatten()
                .flatten()
                .map(SlotImage::nbytes)
                .sum(),
        }
    }

    /// The image `PreparedAdapter::prepare` keeps for a GPU engine: written straight into
    /// pages of `pool` where it has room, so a slot fill is a DMA from them (no copy by the
    /// engine's thread); else in ordinary memory (filled through the copy stream's staging),
    /// counted in [`PinnedPool::refused`] and `caduceus_lora_unpinned_images_total` and logged
    /// once per process; in ordinary memory without a pool.
    pub fn prepare(
        config: &LlamaConfig,
        adapter: &AdapterTensors<'_>,
        dtype: DType,
        pool: Option<&PinnedPool>,
    ) -> Result<Self, LoraGpuError> {
        if let Some(pool) = pool {
            if let Some(image) = Self::new_pinned(config, adapter, dtype, pool)? {
                return Ok(image);
            }
            unpinned(pool);
        }
        Self::new(config, adapter, dtype)
    }

    /// Whether every projection's values lie in pinned pages.
    pub fn is_pinned(&self) -> bool {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .all(SlotImage::is_pinned)
    }
}

/// An image stays in ordinary memory because `pool` had no room: counted, and logged once per
/// process.
fn unpinned(pool: &PinnedPool) {
    crate::metrics::record_lora_unpinned();
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            pool_mib = pool.nbytes() >> 20,
            free_mib = (pool.free_pages() * pool.page_bytes()) >> 20,
            "the pinned adapter pool is full: this image (and others while it stays full) is \
             kept in ordinary memory, and its slot fills copy it through the staging ring on \
             the engine thread"
        );
    }
}

/// One projection's (a, b, rank, scale) in PEFT's layouts.
type PeftPair<'a> = (Floats<'a>, Floats<'a>, usize, f32);

/// Each layer's pairs as the projections their images are made from.
fn projections<'a>(
    dims: &[(usize, usize); 7],
    dtype: DType,
    layers: impl Iterator<Item = [Option<PeftPair<'a>>; 7]>,
) -> Vec<[Option<PeftProjection<'a>>; 7]> {
    layers
        .map(|pairs| {
            let mut out: [Option<PeftProjection<'a>>; 7] = Default::default();
            for ((o, pair), &(in_dim, out_dim)) in out.iter_mut().zip(pairs).zip(dims) {
                *o = pair.map(|(a, b, rank, scale)| PeftProjection {
                    dtype,
                    in_dim,
                    out_dim,
                    a,
                    b,
                    rank,
                    scale,
                });
            }
            out
        })
        .collect()
}

/// Each layer's projections of `adapter`.
fn adapter_pairs<'a>(
    adapter: &'a AdapterTensors<'_>,
) -> impl Iterator<Item = [Option<PeftPair<'a>>; 7]> {
    let (rank, scale) = (adapter.rank, adapter.scale);
    adapter.layers.iter().map(move |layer| {
        layer
            .each_ref()
            .map(|p| p.as_ref().map(|p| (p.a, p.b(), rank, scale)))
    })
}

/// A layer's projections read back from a host stack.
fn peft_slots(layer: &[Option<PeftSlot>; 7]) -> [Option<PeftPair<'_>>; 7] {
    layer.each_ref().map(|p| {
        p.as_ref()
            .map(|p| ((&p.a).into(), (&p.b).into(), p.rank, p.scale))
    })
}

/// `max_loras` device slots for every projection of every layer.
pub struct GpuLoraStack {
    /// Every store's ranks and scales (column `layer * 7 + projection`), so a fill uploads them
    /// as two rows. Declared first: the stores hold its addresses.
    table: SlotTable,
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
        let table = SlotTable::new(dev, num_slots, config.num_layers * dims.len())?;
        let layers = (0..config.num_layers)
            .map(|layer| {
                dims.iter()
                    .enumerate()
                    .map(|(p, &(in_dim, out_dim))| {
                        let shape = LoraShape {
                            num_slots,
                            in_dim,
                            out_dim,
                            max_rank,
                        };
                        let column = layer * dims.len() + p;
                        DeviceLoraSlots::new_in_table(dev, dtype, shape, &table, column)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GpuLoraStack {
            table,
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
        let stores: usize = self
            .layers
            .iter()
            .flatten()
            .map(DeviceLoraSlots::nbytes)
            .sum();
        stores + self.table.nbytes()
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
    /// [`super::adapter_copies`]): a copy of its bits, projections it does not target cleared,
    /// then the slot's row of ranks and scales.
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
        self.table
            .upload_row(up, slot, self.layers.iter().flatten())
    }

    /// The image of `adapter` for these slots.
    pub fn image_of(&self, adapter: &AdapterWeights) -> Result<GpuAdapterImage, LoraGpuError> {
        let tensors = adapter.tensors();
        GpuAdapterImage::build(&self.dims, self.dtype, adapter_pairs(&tensors))
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

#[cfg(test)]
mod tests {
    use caduceus_kernels::gpu::pinned_pool::PinnedPool;
    use caduceus_kernels::gpu::{DType, Device};

    use super::{image_bytes, GpuAdapterImage};
    use crate::adapters::make::write_synthetic_adapters;
    use crate::adapters::{load_adapter, with_adapter, AdapterError, AdapterLimits, Projection};
    use crate::gpu::model::tests::{adapter, CONFIG};
    use crate::model::config::LlamaConfig;

    #[test]
    fn an_image_built_from_the_files_bytes_is_the_image_of_its_f32_weights() {
        let scratch = tempfile::tempdir().unwrap();
        let limits = AdapterLimits {
            max_rank: 8,
            max_file_bytes: 1 << 30,
        };
        for rope_neox in [true, false] {
            // A GGUF llama base (`!rope_neox`) permutes q's and k's B rows as they are read.
            let c = LlamaConfig {
                rope_neox,
                ..LlamaConfig::from_hf_json(CONFIG).unwrap()
            };
            let targets = [
                Projection::Q,
                Projection::K,
                Projection::Up,
                Projection::Down,
            ];
            let dir =
                &write_synthetic_adapters(&c, scratch.path(), 1, 8, &targets, 9, 16.0).unwrap()[0];
            let weights = load_adapter(dir, &c, &limits).unwrap();
            let via_f32 = GpuAdapterImage::new(&c, &weights.tensors(), DType::Bf16).unwrap();
            let pool = PinnedPool::new(&Device::emulated(), 1 << 20, 1 << 16).unwrap();
            let (from_bytes, pinned) = with_adapter(dir, &c, &limits, |t| {
                assert_eq!((t.rank, t.generation), (weights.rank, weights.generation));
                let heap = GpuAdapterImage::new(&c, t, DType::Bf16).unwrap();
                let pinned = GpuAdapterImage::new_pinned(&c, t, DType::Bf16, &pool).unwrap();
                Ok::<_, AdapterError>((heap, pinned.expect("the pool has room")))
            })
            .unwrap();
            assert_eq!(from_bytes, via_f32, "rope_neox {rope_neox}");
            assert_eq!(pinned, via_f32, "rope_neox {rope_neox}");
        }
    }

    #[test]
    fn a_pinned_image_counts_its_whole_pages_and_a_full_pool_keeps_it_on_the_heap() {
        let c = LlamaConfig::from_hf_json(CONFIG).unwrap();
        let w = adapter(&c, 8, &[0, 1, 2, 3, 4, 5, 6], 5, DType::Bf16);
        let heap = GpuAdapterImage::new(&c, &w.tensors(), DType::Bf16).unwrap();
        // Every projection targeted: the sizing formula is exact.
        assert_eq!(heap.nbytes(), image_bytes(&c, 8));
        let pool = PinnedPool::new(&Device::emulated(), 3 << 20, 1 << 20).unwrap();
        // Written straight into the pages: the same values, in whole pages.
        let pinned = GpuAdapterImage::new_pinned(&c, &w.tensors(), DType::Bf16, &pool).unwrap();
        let pinned = pinned.expect("the pool has room");
        assert!(pinned.is_pinned() && !heap.is_pinned());
        assert_eq!(pinned, heap);
        let pages = heap.nbytes().div_ceil(1 << 20);
        assert_eq!(pinned.nbytes(), pages << 20, "whole pages");
        assert_eq!(pool.free_pages(), 3 - pages);
        drop(pinned);
        assert_eq!(pool.free_pages(), 3);
        // A pool without room gives no pinned image, and says so.
        let small = PinnedPool::new(&Device::emulated(), 1 << 10, 1 << 10).unwrap();
        let none = GpuAdapterImage::new_pinned(&c, &w.tensors(), DType::Bf16, &small).unwrap();
        assert!(none.is_none() && small.refused() == 1);
        // What `prepare` keeps: pinned where the pool has room, else on the heap (counted).
        let kept = GpuAdapterImage::prepare(&c, &w.tensors(), DType::Bf16, Some(&small)).unwrap();
        assert!(!kept.is_pinned() && kept == heap && small.refused() == 2);
        assert_eq!(kept.nbytes(), heap.nbytes());
        let kept = GpuAdapterImage::prepare(&c, &w.tensors(), DType::Bf16, Some(&pool)).unwrap();
        assert!(kept.is_pinned() && kept == heap);
        assert!(
            !GpuAdapterImage::prepare(&c, &w.tensors(), DType::Bf16, None)
                .unwrap()
                .is_pinned()
        );
    }
}
