//! The copy stream on a GPU: a non-blocking stream, write-combined pinned chunks, events.

use std::sync::Arc;

use cudarc::driver::{result as drv, CudaEvent, CudaStream, PinnedHostSlice};

use super::CopyEvent;
use crate::gpu::cuda::CudaDevice;
use crate::gpu::device::GpuError;

fn driver_err(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("copy stream: {e:?}"))
}

pub(super) struct Copies {
    stream: Arc<CudaStream>,
    staging: Vec<PinnedHostSlice<u8>>,
}

impl Copies {
    pub(super) fn new(
        d: &CudaDevice,
        num_chunks: usize,
        chunk_bytes: usize,
    ) -> Result<Self, GpuError> {
        let (ctx, _) = d.context_and_stream();
        let stream = ctx.new_stream().map_err(driver_err)?;
        let staging = (0..num_chunks)
            // SAFETY: the bytes are uninitialised until `stage` writes them; nothing reads
            // a chunk before writing it.
            .map(|_| unsafe { ctx.alloc_pinned::<u8>(chunk_bytes) })
            .collect::<Result<Vec<_>, _>>()
            .map_err(driver_err)?;
        Ok(Copies { stream, staging })
    }

    pub(super) fn stage(
        &mut self,
        chunk: usize,
        at: usize,
        piece: &[u8],
        dst: u64,
    ) -> Result<(), GpuError> {
        let pinned = self.staging[chunk].as_mut_slice().map_err(driver_err)?;
        let staged = &mut pinned[at..at + piece.len()];
        staged.copy_from_slice(piece);
        self.stream.context().bind_to_thread().map_err(driver_err)?;
        // SAFETY: `dst..dst + len` lies in a live buffer (checked by the caller, kept alive
        // by its owner until the copy completed); the staged bytes are not rewritten before
        // the event recorded behind this copy completed (`CopyStream::advance`).
        unsafe { drv::memcpy_htod_async(dst, &*staged, self.stream.cu_stream()) }
            .map_err(driver_err)
    }

    pub(super) fn record(&mut self) -> Result<Arc<CudaEvent>, GpuError> {
        Ok(Arc::new(
            self.stream.record_event(None).map_err(driver_err)?,
        ))
    }

    pub(super) fn after_compute(&mut self, d: &CudaDevice) -> Result<(), GpuError> {
        let (_, compute) = d.context_and_stream();
        let done = compute.record_event(None).map_err(driver_err)?;
        self.stream.wait(&done).map_err(driver_err)
    }

    pub(super) fn synchronize(&mut self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(driver_err)
    }
}

impl Drop for Copies {
    /// Queued copies read the staging chunks freed after this: let them finish first.
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
    }
}

fn event(e: &CopyEvent) -> Result<&CudaEvent, GpuError> {
    e.cuda
        .as_deref()
        .ok_or_else(|| GpuError::Shape("copy event of another device".into()))
}

pub(super) fn compute_waits(d: &CudaDevice, e: &CopyEvent) -> Result<(), GpuError> {
    let (_, compute) = d.context_and_stream();
    compute.wait(event(e)?).map_err(driver_err)
}

pub(super) fn host_waits(e: &CopyEvent) -> Result<(), GpuError> {
    event(e)?.synchronize().map_err(driver_err)
}

pub(super) fn is_complete(e: &CopyEvent) -> Result<bool, GpuError> {
    event(e)?.try_is_complete().map_err(driver_err)
}
