//! [`HostStaging`]: host memory that data is gathered in before it goes to the device: page-locked
//! (`cuMemHostAlloc` through cudarc) on a GPU, so a copy from it is a DMA the host need not wait
//! for; plain memory in emulation. The one pinned host type: a step's inputs, the sampler's
//! inputs and the adapter copy stream's ring chunks all live in one.
//!
//! [`Device::upload_staged`] queues its copy on the compute stream without waiting and records
//! an event behind it; [`HostStaging::words_mut`] and [`HostStaging::bytes_mut`] wait for that
//! event before handing the memory out again, and dropping the staging waits for it too, so the
//! DMA never reads memory that was rewritten or freed.

use super::device::{Device, DeviceBuffer, GpuError};

/// Host memory of u32 words (16-byte aligned in emulation, page-aligned when pinned).
pub struct HostStaging {
    inner: Inner,
    /// On a GPU: recorded behind each copy [`Device::upload_staged`] queues from this memory
    /// (one event, reused), and whether that copy may still be running.
    #[cfg(feature = "cuda")]
    copy_done: Option<(cudarc::driver::CudaEvent, bool)>,
}

enum Inner {
    #[cfg_attr(not(feature = "cuda-emu"), allow(dead_code))]
    Plain(Vec<u32>),
    #[cfg(feature = "cuda")]
    Pinned(cudarc::driver::PinnedHostSlice<u32>),
}

#[cfg(feature = "cuda")]
fn pinned_err(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("pinned staging: {e:?}"))
}

impl HostStaging {
    /// The words, to fill (after any copy still reading them has finished).
    pub fn words_mut(&mut self) -> Result<&mut [u32], GpuError> {
        self.wait_for_copy()?;
        match &mut self.inner {
            Inner::Plain(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Inner::Pinned(p) => p.as_mut_slice().map_err(pinned_err),
        }
    }

    /// The same memory as bytes.
    pub fn bytes_mut(&mut self) -> Result<&mut [u8], GpuError> {
        let words = self.words_mut()?;
        let len = std::mem::size_of_val(words);
        // SAFETY: u8 has no alignment or validity requirement; the view covers exactly `words`
        // and borrows it mutably for its lifetime.
        Ok(unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) })
    }

    /// Length in words.
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

    /// The words, for a copy that reads them (see [`Device::upload_staged`]).
    pub(crate) fn words(&self) -> Result<&[u32], GpuError> {
        match &self.inner {
            Inner::Plain(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Inner::Pinned(p) => p.as_slice().map_err(pinned_err),
        }
    }

    /// Waits on the host for the last queued copy from this memory.
    fn wait_for_copy(&mut self) -> Result<(), GpuError> {
        #[cfg(feature = "cuda")]
        if let Some((event, pending)) = &mut self.copy_done {
            if *pending {
                event.synchronize().map_err(pinned_err)?;
                *pending = false;
            }
        }
        Ok(())
    }
}

impl Drop for HostStaging {
    /// A queued copy may still read this memory: let it finish before the memory is freed.
    fn drop(&mut self) {
        let _ = self.wait_for_copy();
    }
}

impl Device {
    /// `words` zeroed words of staging memory (page-locked on a GPU).
    pub fn host_staging(&self, words: usize) -> Result<HostStaging, GpuError> {
        Ok(match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(_) => HostStaging {
                inner: Inner::Plain(vec![0; words]),
                #[cfg(feature = "cuda")]
                copy_done: None,
            },
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let mut p = d.alloc_pinned_words(words.max(1))?;
                p.as_mut_slice().map_err(pinned_err)?.fill(0);
                HostStaging {
                    inner: Inner::Pinned(p),
                    copy_done: Some((d.new_event()?, false)),
                }
            }
        })
    }

    /// Queues a copy of the first `words` words of `staging` to the start of `buf` on the
    /// compute stream, so the kernels launched after it read them; the host does not wait
    /// (the staging waits before its memory is handed out again).
    pub fn upload_staged(
        &self,
        buf: &DeviceBuffer,
        staging: &mut HostStaging,
        words: usize,
    ) -> Result<(), GpuError> {
        staging.wait_for_copy()?;
        let src = staging.words()?;
        let src = src.get(..words).ok_or_else(|| {
            GpuError::Shape(format!(
                "{words} words from a staging buffer of {}",
                src.len()
            ))
        })?;
        let bytes = super::device::as_bytes(src);
        buf.check_range(0, bytes.len())?;
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => e.copy_in(buf, 0, bytes),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let (Inner::Pinned(_), Some((done, _))) = (&staging.inner, &staging.copy_done)
                else {
                    return Err(GpuError::Shape("staging memory of another device".into()));
                };
                // SAFETY: `bytes` is page-locked and stays allocated and unwritten until `done`
                // completed (`wait_for_copy` before `words_mut`, `bytes_mut` and drop); `buf`
                // is checked above to hold the copy.
                unsafe { d.write_pinned(buf.ptr(), bytes, done) }?;
                if let Some((_, pending)) = &mut staging.copy_done {
                    *pending = true;
                }
                Ok(())
            }
        }
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;

    #[test]
    fn a_staged_upload_copies_the_prefix_without_a_host_wait() {
        let dev = Device::emulated();
        let mut st = dev.host_staging(4).unwrap();
        st.words_mut().unwrap().copy_from_slice(&[1, 2, 3, 4]);
        let buf = dev.upload(&[9u32; 4]).unwrap();
        let before = dev.transfers().unwrap();
        dev.upload_staged(&buf, &mut st, 3).unwrap();
        let after = dev.transfers().unwrap();
        assert_eq!(after.writes, before.writes + 1);
        assert_eq!(
            after.host_waits, before.host_waits,
            "a staged copy is queued"
        );
        assert_eq!(dev.download::<u32>(&buf).unwrap(), [1, 2, 3, 9]);
        // Byte access is the same memory.
        st.bytes_mut().unwrap()[..4].copy_from_slice(&7u32.to_ne_bytes());
        dev.upload_staged(&buf, &mut st, 1).unwrap();
        assert_eq!(dev.download::<u32>(&buf).unwrap(), [7, 2, 3, 9]);
    }

    #[test]
    fn a_staged_upload_past_either_end_is_refused() {
        let dev = Device::emulated();
        let mut st = dev.host_staging(4).unwrap();
        let small = dev.alloc_zeroed(8).unwrap();
        let err = dev.upload_staged(&small, &mut st, 5).unwrap_err();
        assert!(
            err.to_string()
                .contains("5 words from a staging buffer of 4"),
            "{err}"
        );
        let err = dev.upload_staged(&small, &mut st, 3).unwrap_err();
        assert!(
            err.to_string()
                .contains("12 bytes at offset 0 do not fit a buffer of 8 bytes"),
            "{err}"
        );
    }
}
