//! [`Device`]: where kernels run (a CUDA GPU, or the host emulation) and the buffers they use.

#[cfg(feature = "cuda-emu")]
use super::gemm_cache::AlgoCache;
use super::gemm_cache::GemmCacheStats;
#[cfg(feature = "cuda-emu")]
use super::gemm_tune::GemmChoice;
use super::gemm_tune::{GemmPolicy, TuneRecord};
#[cfg(feature = "cuda-emu")]
use super::graph::{EmuCapture, TransferCounts};
use super::kernel::{KernelFn, KernelParams, LaunchDims};

/// Element type of activations, weights and KV cache on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bf16,
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        2
    }

    /// Kernel-name suffix (`cad_rms_norm_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

/// Why a device could not be opened or a kernel not run.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The caller says what to do instead (`serve`: which config key).
    #[error(
        "no NVIDIA driver found (libcuda.so.1 could not be loaded): this machine has no usable \
         NVIDIA GPU"
    )]
    NoDriver,
    #[error("CUDA library {0} not found: put the CUDA 13 libraries on LD_LIBRARY_PATH")]
    MissingLibrary(&'static str),
    #[error("no CUDA device {ordinal} ({count} found)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLASLt: {0}")]
    Blas(String),
    #[error("kernel {0} is not in this build")]
    UnknownKernel(&'static str),
    #[error("kernel {0}: its parameter struct differs between Rust and C (rebuild both)")]
    ParamsMismatch(&'static str),
    #[error("bad kernel arguments: {0}")]
    Shape(String),
    #[error("buffer of {bytes} bytes read as {elem}-byte elements")]
    Misaligned { bytes: usize, elem: usize },
    #[error("graph capture: {0}")]
    Capture(String),
    #[error("kernel {kernel}: a GPU refuses {what}")]
    Launch { kernel: &'static str, what: String },
}

/// Plain element types that can be copied to and from device buffers byte for byte.
///
/// # Safety
/// Every bit pattern of `size_of::<Self>()` bytes must be a valid value, with no padding.
pub unsafe trait DeviceElem: Copy + Default + 'static {}
// SAFETY: plain integer and float types without padding or invalid bit patterns.
unsafe impl DeviceElem for u8 {}
// SAFETY: as above.
unsafe impl DeviceElem for u16 {}
// SAFETY: as above.
unsafe impl DeviceElem for u32 {}
// SAFETY: as above.
unsafe impl DeviceElem for i32 {}
// SAFETY: as above.
unsafe impl DeviceElem for u64 {}
// SAFETY: as above.
unsafe impl DeviceElem for f32 {}
// SAFETY: `half::bf16` is a transparent u16.
unsafe impl DeviceElem for half::bf16 {}
// SAFETY: `half::f16` is a transparent u16.
unsafe impl DeviceElem for half::f16 {}

/// The bytes of `v`, as they are copied to the device.
pub fn as_bytes<T: DeviceElem>(v: &[T]) -> &[u8] {
    // SAFETY: DeviceElem types have no padding; the byte view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Device memory: an address kernels take (`u64`) and the allocation behind it.
pub struct DeviceBuffer {
    ptr: u64,
    bytes: usize,
    store: Store,
}

enum Store {
    /// Emulated device memory: 16-byte aligned host memory owned through a raw pointer, so
    /// kernels may write it while Rust holds `&DeviceBuffer`.
    #[cfg(feature = "cuda-emu")]
    Host { words: usize },
    #[cfg(feature = "cuda")]
    Cuda(#[allow(dead_code)] super::cuda::DeviceMemory),
    /// A range of another buffer ([`DeviceBuffer::view`]): owns nothing.
    View,
}

impl DeviceBuffer {
    /// The device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The device address `offset` bytes in (checked against the length).
    pub fn ptr_at(&self, offset: usize) -> Result<u64, GpuError> {
        self.check_range(offset, 0)?;
        Ok(self.ptr + offset as u64)
    }

    /// Refuses `bytes` bytes from `offset` unless they lie inside the buffer: the one range check
    /// behind views, writes and uploads.
    pub fn check_range(&self, offset: usize, bytes: usize) -> Result<(), GpuError> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(GpuError::Shape(format!(
                "{bytes} bytes at offset {offset} do not fit a buffer of {} bytes",
                self.bytes
            ))),
        }
    }

    pub fn len_bytes(&self) -> usize {
        self.bytes
    }

    /// Number of `T` elements the buffer holds.
    pub fn len_of<T>(&self) -> usize {
        self.bytes / std::mem::size_of::<T>()
    }

    /// `bytes` bytes of this buffer from `offset`, as a buffer kernels can take: how one fixed
    /// per-step upload buffer hands each kernel its sub-range at a fixed address (what a
    /// captured graph needs).
    pub fn view(&self, offset: usize, bytes: usize) -> Result<BufferView<'_>, GpuError> {
        self.check_range(offset, bytes)?;
        Ok(BufferView {
            buf: DeviceBuffer {
                ptr: self.ptr + offset as u64,
                bytes,
                store: Store::View,
            },
            _parent: std::marker::PhantomData,
        })
    }
}

/// A sub-range of a [`DeviceBuffer`], borrowed from it (so it cannot outlive the memory).
pub struct BufferView<'a> {
    buf: DeviceBuffer,
    _parent: std::marker::PhantomData<&'a DeviceBuffer>,
}

impl std::ops::Deref for BufferView<'_> {
    type Target = DeviceBuffer;
    fn deref(&self) -> &DeviceBuffer {
        &self.buf
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        match self.store {
            #[cfg(feature = "cuda-emu")]
            Store::Host { words } => {
                let p = self.ptr as usize as *mut u128;
                // SAFETY: allocated in `Device::alloc_zeroed` as a boxed slice of `words` u128s.
                drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, words)) });
            }
            #[cfg(feature = "cuda")]
            Store::Cuda(_) => {}
            Store::View => {}
        }
    }
}

/// What the emulated device reports as its memory (1 GiB), so memory planning runs there too.
pub const EMULATED_MEMORY_BYTES: usize = 1 << 30;

/// Where kernels run. Launches on one device are ordered; [`Device::download`] waits for them.
pub enum Device {
    /// The host emulation (`cuda/emu`): every kernel runs on CPU threads, synchronously.
    #[cfg(feature = "cuda-emu")]
    Emulated(Emulation),
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaDevice),
}

/// State of the emulated device.
#[cfg(feature = "cuda-emu")]
pub struct Emulation {
    /// GEMM implementations (the host loop, or the GEMV kernel under [`GemmPolicy::Gemv`]),
    /// cached and counted by the same keys as cuBLASLt's on a GPU, so tests see the cache at work.
    pub(crate) gemm_algos: AlgoCache<GemmChoice<()>>,
    gemm_policy: std::sync::Mutex<GemmPolicy>,
    /// What [`Device::set_programmatic_launch`] asked (launches are synchronous here: no effect).
    programmatic: std::sync::atomic::AtomicBool,
    /// Allocations and host->device writes so far (tests count them per step).
    pub(crate) counts: TransferCounts,
    /// The launches recorded while a graph is being captured (`super::graph`).
    pub(crate) capture: EmuCapture,
}

#[cfg(feature = "cuda-emu")]
impl Emulation {
    pub(crate) fn gemm_policy(&self) -> GemmPolicy {
        *self.gemm_policy.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Copies `bytes` into `buf` at `offset` (checked by the caller) and counts the copy.
    pub(crate) fn copy_in(
        &self,
        buf: &DeviceBuffer,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), GpuError> {
        self.capture.refuse("host->device copy")?;
        self.counts.count_write();
        // SAFETY: the caller checked the bounds; the buffer is host memory owned by `buf`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (buf.ptr as usize as *mut u8).add(offset),
                bytes.len(),
            )
        };
        Ok(())
    }
}

impl Device {
    /// The host emulation.
    #[cfg(feature = "cuda-emu")]
    pub fn emulated() -> Device {
        Device::Emulated(Emulation {
            gemm_algos: AlgoCache::new(),
            gemm_policy: std::sync::Mutex::new(GemmPolicy::default()),
            programmatic: std::sync::atomic::AtomicBool::new(false),
            counts: TransferCounts::default(),
            capture: EmuCapture::default(),
        })
    }

    /// Hits and misses of the GEMM algorithm cache since the device was opened: after warm-up
    /// (one GEMM per shape bucket) every call should be a hit, which is what lets a CUDA graph be
    /// captured without cuBLASLt heuristic queries.
    pub fn gemm_cache_stats(&self) -> GemmCacheStats {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => e.gemm_algos.stats(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.gemm_cache_stats(),
        }
    }

    /// How projections choose their implementation from now on ([`GemmPolicy`]); every choice
    /// made so far is forgotten (capture graphs again after changing it).
    pub fn set_gemm_policy(&self, policy: GemmPolicy) -> Result<(), GpuError> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                *e.gemm_policy.lock().unwrap_or_else(|e| e.into_inner()) = policy;
                e.gemm_algos.clear();
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.set_gemm_policy(policy),
        }
    }

    /// Launches every kernel as a programmatic dependent of the kernel before it from now on
    /// (`on`) or as a plain launch: its launch then overlaps the previous kernel's end, and its
    /// body waits for that kernel at entry (every kernel does, see `CAD_KERNEL`), which saves
    /// part of the gap between the hundreds of small dependent kernels of a decode step. Needs
    /// sm_90 (H100/H200); returns whether it is on. Graphs keep what they were captured with.
    /// The emulation, whose launches are synchronous, records the setting and runs as before.
    pub fn set_programmatic_launch(&self, on: bool) -> bool {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                e.programmatic
                    .store(on, std::sync::atomic::Ordering::Relaxed);
                on
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.set_programmatic_launch(on),
        }
    }

    /// Whether kernels launch as programmatic dependents ([`Self::set_programmatic_launch`]).
    pub fn programmatic_launch(&self) -> bool {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => e.programmatic.load(std::sync::atomic::Ordering::Relaxed),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.programmatic_launch(),
        }
    }

    /// The policy projections choose by now.
    pub fn gemm_policy(&self) -> GemmPolicy {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => e.gemm_policy(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.gemm_policy(),
        }
    }

    /// What the GEMM tuner measured, one record per shape bucket it tuned (empty in emulation,
    /// which does not tune).
    pub fn gemm_tuning(&self) -> Vec<TuneRecord> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(_) => Vec::new(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.gemm_tuning(),
        }
    }

    /// CUDA device `ordinal`. Fails cleanly (no panic) on a machine without a driver or GPU.
    #[cfg(feature = "cuda")]
    pub fn cuda(ordinal: usize) -> Result<Device, GpuError> {
        super::cuda::CudaDevice::open(ordinal).map(Device::Cuda)
    }

    /// What this device is, for logs and test names.
    pub fn describe(&self) -> String {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(_) => "cuda-emu (host emulation)".to_string(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.describe(),
        }
    }

    /// Whether this is the host emulation: no timing or tuning, and copies land when its copy
    /// queue runs them.
    pub fn is_emulated(&self) -> bool {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(_) => true,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => false,
        }
    }

    /// `(free, total)` bytes of device memory. The emulation reports a nominal
    /// [`EMULATED_MEMORY_BYTES`], all free (its buffers are host memory).
    pub fn memory_info(&self) -> Result<(usize, usize), GpuError> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(_) => Ok((EMULATED_MEMORY_BYTES, EMULATED_MEMORY_BYTES)),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.memory_info(),
        }
    }

    /// A zero-filled buffer of `bytes` bytes (at least one byte is allocated).
    pub fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceBuffer, GpuError> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                e.capture.refuse("allocation")?;
                e.counts.count_alloc();
                let words = bytes.div_ceil(16).max(1);
                let boxed: Box<[u128]> = vec![0u128; words].into_boxed_slice();
                let ptr = Box::into_raw(boxed) as *mut u128 as usize as u64;
                Ok(DeviceBuffer {
                    ptr,
                    bytes,
                    store: Store::Host { words },
                })
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let mem = d.alloc_zeroed(bytes)?;
                Ok(DeviceBuffer {
                    ptr: mem.ptr(),
                    bytes,
                    store: Store::Cuda(mem),
                })
            }
        }
    }

    /// A new buffer holding `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DeviceBuffer, GpuError> {
        let buf = self.alloc_zeroed(std::mem::size_of_val(host))?;
        self.write(&buf, 0, host)?;
        Ok(buf)
    }

    /// Copies `host` into `buf` starting `offset` bytes in.
    pub fn write<T: DeviceElem>(
        &self,
        buf: &DeviceBuffer,
        offset: usize,
        host: &[T],
    ) -> Result<(), GpuError> {
        let bytes = as_bytes(host);
        buf.check_range(offset, bytes.len())?;
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                // Pageable memory: on a GPU the host waits for the copy.
                e.counts.count_host_wait();
                e.copy_in(buf, offset, bytes)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.write(buf.ptr + offset as u64, bytes),
        }
    }

    /// The whole buffer as `T`s, after every launch before it has finished.
    pub fn download<T: DeviceElem>(&self, buf: &DeviceBuffer) -> Result<Vec<T>, GpuError> {
        let elem = std::mem::size_of::<T>();
        if !buf.bytes.is_multiple_of(elem) {
            return Err(GpuError::Misaligned {
                bytes: buf.bytes,
                elem,
            });
        }
        let mut out = vec![T::default(); buf.bytes / elem];
        // SAFETY: DeviceElem: any bytes form valid values; the view covers exactly `out`.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), buf.bytes) };
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                e.capture.refuse("device->host copy")?;
                e.counts.count_read();
                // SAFETY: `buf` owns `buf.bytes` bytes of host memory at `buf.ptr`.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf.ptr as usize as *const u8,
                        dst.as_mut_ptr(),
                        buf.bytes,
                    )
                };
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.read(buf.ptr, dst)?,
        }
        Ok(out)
    }

    /// Waits until every launch so far has finished.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                e.counts.count_host_wait();
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.synchronize(),
        }
    }

    /// Launches `kernel` with `params` (asynchronous on a GPU, synchronous in emulation).
    pub(crate) fn launch<P: KernelParams>(
        &self,
        kernel: &KernelFn,
        dims: LaunchDims,
        params: &P,
    ) -> Result<(), GpuError> {
        if dims.grid.0 == 0 || dims.grid.1 == 0 || dims.grid.2 == 0 {
            return Ok(());
        }
        dims.check(kernel.name)?;
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                let l = super::kernel::EmuLaunch {
                    grid: [dims.grid.0, dims.grid.1, dims.grid.2],
                    block: [dims.block.0, dims.block.1, dims.block.2],
                    shared_bytes: dims.shared_bytes,
                };
                if e.capture.record_launch(kernel, &l, params)? {
                    return Ok(());
                }
                let size = std::mem::size_of::<P>() as u32;
                // SAFETY: the entry point reads `size` bytes of `params` after checking that its
                // C struct has that size; pointers inside are emulated device addresses.
                let rc = unsafe { (kernel.emu)(&l, (params as *const P).cast(), size) };
                super::kernel::emu_result(kernel.name, &l, rc)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.launch(kernel.name, dims, params),
        }
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;

    #[test]
    fn views_writes_and_addresses_stay_inside_their_buffer() {
        let dev = Device::emulated();
        let buf = dev.alloc_zeroed(16).unwrap();
        assert!(buf.check_range(0, 16).is_ok() && buf.check_range(16, 0).is_ok());
        assert!(buf.check_range(9, 8).is_err() && buf.check_range(17, 0).is_err());
        assert!(buf.check_range(usize::MAX, 2).is_err(), "overflowing end");
        assert_eq!(buf.ptr_at(16).unwrap(), buf.ptr() + 16);
        assert!(buf.ptr_at(17).is_err());
        assert_eq!(buf.view(4, 12).unwrap().len_bytes(), 12);
        assert!(buf.view(4, 13).is_err());
        dev.write(&buf, 8, &[1u32, 2]).unwrap();
        let err = dev.write(&buf, 12, &[1u32, 2]).unwrap_err();
        assert!(
            err.to_string()
                .contains("8 bytes at offset 12 do not fit a buffer of 16 bytes"),
            "{err}"
        );
    }
}
