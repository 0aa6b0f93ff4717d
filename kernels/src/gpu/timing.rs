//! [`DeviceMark`]: a point in a device's stream of work, to time stretches of it (a timing event
//! on a GPU; the host clock in emulation, where every launch runs synchronously). For profiles
//! and benchmarks, not for the serving path: each mark costs an event.

use super::device::{Device, GpuError};

/// A point in the device's work, recorded by [`Device::mark`].
pub struct DeviceMark {
    imp: Imp,
}

enum Imp {
    #[cfg(feature = "cuda-emu")]
    Host(std::time::Instant),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaEvent),
}

impl DeviceMark {
    /// Milliseconds of device work between `earlier` and this mark (waits for this mark's work
    /// to finish on a GPU).
    pub fn ms_since(&self, earlier: &DeviceMark) -> Result<f64, GpuError> {
        match (&earlier.imp, &self.imp) {
            #[cfg(feature = "cuda-emu")]
            (Imp::Host(a), Imp::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64() * 1e3),
            #[cfg(feature = "cuda")]
            (Imp::Cuda(a), Imp::Cuda(b)) => super::cuda::event_ms(a, b),
            #[cfg(all(feature = "cuda", feature = "cuda-emu"))]
            _ => Err(GpuError::Shape(
                "timing marks of two different devices".into(),
            )),
        }
    }
}

impl Device {
    /// Marks the current end of the device's queued work (not allowed while capturing a graph).
    pub fn mark(&self) -> Result<DeviceMark, GpuError> {
        let imp = match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                e.capture.refuse("timing mark")?;
                Imp::Host(std::time::Instant::now())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Imp::Cuda(d.timing_event()?),
        };
        Ok(DeviceMark { imp })
    }
}
