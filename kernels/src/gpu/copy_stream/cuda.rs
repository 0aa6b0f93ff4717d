//! The copy stream on a GPU: a non-blocking stream and its events (the pinned chunks are the
//! parent's [`crate::gpu::HostStaging`]s).

use std::sync::Arc;

use cudarc::driver::{result as drv, CudaEvent, CudaStream};

use super::CopyEvent;
use crate::gpu::cuda::CudaDevice;
use crate::gpu::device::GpuError;

fn driver_err(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("copy stream: {e:?}"))
}

pub(super) struct Copies {
    stream: Arc<CudaStream>,
}

impl Copies {
    pub(super) fn new(d: &CudaDevice) -> Result<Self, GpuError> {
        let (ctx, _) = d.context_and_stream();
        let stream = ctx.new_stream().map_err(driver_err)?;
        Ok(Copies { stream })
    }

    /// Queues a copy of `staged` to `dst` on the copy stream.
    ///
    /// # Safety
    /// `staged` is page-locked and stays allocated and unwritten until an event recorded after
    /// this copy completed; `dst..dst + len` lies in a buffer kept alive as long.
    pub(super) unsafe fn copy(&mut self, staged: &[u8], dst: u64) -> Result<(), GpuError> {
        self.stream.context().bind_to_thread().map_err(driver_err)?;
        // SAFETY: the caller's contract above.
        unsafe { drv::memcpy_htod_async(dst, staged, self.stream.cu_stream()) }.map_err(driver_err)
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
    /// Queued copies read the staging chunks, freed after this: let them finish first.
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
