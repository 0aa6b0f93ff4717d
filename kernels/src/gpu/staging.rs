//! [`HostStaging`]: the host buffer a step's inputs are gathered in before their one copy to
//! the device: page-locked (`cuMemHostAlloc` through cudarc) on a GPU, so the copy is a DMA
//! without a bounce through a driver buffer; plain memory in emulation. Never run on a GPU.

use super::device::{Device, DeviceBuffer, GpuError};

/// Host memory of u32 words, uploaded with [`Device::upload_staged`].
pub struct HostStaging {
    inner: Inner,
}

enum Inner {
    #[cfg_attr(not(feature = "cuda-emu"), allow(dead_code))]
    Plain(Vec<u32>),
    #[cfg(feature = "cuda")]
    Pinned(cudarc::driver::PinnedHostSlice<u32>),
}

impl HostStaging {
    /// The words, to fill before [`Device::upload_staged`].
    pub fn words_mut(&mut self) -> Result<&mut [u32], GpuError> {
        match &mut self.inner {
            Inner::Plain(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Inner::Pinned(p) => p
                .as_mut_slice()
                .map_err(|e| GpuError::Driver(format!("pinned staging: {e:?}"))),
        }
    }

    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Plain(v) => v.len(),
            #[cfg(feature = "cuda")]
            Inner::Pinned(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn words(&self) -> Result<&[u32], GpuError> {
        match &self.inner {
            Inner::Plain(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Inner::Pinned(p) => p
                .as_slice()
                .map_err(|e| GpuError::Driver(format!("pinned staging: {e:?}"))),
        }
    }
}

impl Device {
    /// `words` zeroed words of staging memory (page-locked on a GPU).
    pub fn host_staging(&self, words: usize) -> Result<HostStaging, GpuError> {
        let inner = match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(_) => Inner::Plain(vec![0; words]),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let mut p = d.alloc_pinned_words(words.max(1))?;
                p.as_mut_slice()
                    .map_err(|e| GpuError::Driver(format!("pinned staging: {e:?}")))?
                    .fill(0);
                Inner::Pinned(p)
            }
        };
        Ok(HostStaging { inner })
    }

    /// Copies the first `words` words of `staging` to the start of `buf` (one copy).
    pub fn upload_staged(
        &self,
        buf: &DeviceBuffer,
        staging: &HostStaging,
        words: usize,
    ) -> Result<(), GpuError> {
        let src = staging.words()?;
        let src = src.get(..words).ok_or_else(|| {
            GpuError::Shape(format!(
                "{words} words from a staging buffer of {}",
                src.len()
            ))
        })?;
        self.write(buf, 0, src)
    }
}
