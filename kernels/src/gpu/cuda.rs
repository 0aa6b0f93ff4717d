//! The CUDA side of [`super::Device`]: cudarc with the driver loaded at run time, the embedded
//! fatbins of `kernels/cuda/*.cu`, one compute stream of our own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result as drv, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::cublaslt::Blas;
use super::device::GpuError;
use super::gemm_cache::GemmCacheStats;
use super::gemm_tune::{GemmPolicy, TuneRecord};
use super::kernel::{KernelParams, LaunchDims};

include!(concat!(env!("OUT_DIR"), "/cuda_modules.rs"));

pub(super) fn driver_err(e: impl std::fmt::Debug) -> GpuError {
    GpuError::Driver(format!("{e:?}"))
}

/// A timing event recorded now on `stream` (timing marks and the GEMM tuner's clock).
pub(super) fn record_timing_event(
    stream: &Arc<CudaStream>,
) -> Result<cudarc::driver::CudaEvent, GpuError> {
    use cudarc::driver::sys::CUevent_flags;
    let e = stream
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(driver_err)?;
    e.record(stream).map_err(driver_err)?;
    Ok(e)
}

/// Milliseconds of device work between two timing events (waits for `end`).
pub(super) fn event_ms(
    start: &cudarc::driver::CudaEvent,
    end: &cudarc::driver::CudaEvent,
) -> Result<f64, GpuError> {
    start
        .elapsed_ms(end)
        .map(f64::from)
        .map_err(|e| GpuError::Driver(format!("timing event: {e:?}")))
}

/// Dynamic shared memory a kernel gets without opting in; a launch asking for more opts its
/// kernel in (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`, up to the limit
/// `LaunchDims::check` applies).
const MAX_DEFAULT_DYNAMIC_SHARED: u32 = 48 * 1024;

/// An opened GPU: context, the stream every launch and copy goes on, the loaded modules.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<Arc<CudaModule>>,
    /// Loaded kernels and the dynamic shared memory each has been opted into (0: the default).
    functions: Mutex<HashMap<&'static str, (CudaFunction, u32)>>,
    /// cuBLASLt (its handle is used by one thread at a time).
    blas: Mutex<Blas>,
    /// Launch kernels as programmatic dependents of the previous one (sm_90+; see
    /// [`super::Device::set_programmatic_launch`]).
    programmatic: std::sync::atomic::AtomicBool,
}

impl CudaDevice {
    pub(super) fn open(ordinal: usize) -> Result<CudaDevice, GpuError> {
        // SAFETY: only probes whether the shared library can be loaded (cudarc would panic on use).
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(driver_err)?.max(0) as usize;
        if ordinal >= count {
            return Err(GpuError::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver_err)?;
        // SAFETY: all launches go on one stream, so cudarc's cross-stream events are not needed;
        // buffers are only freed by their owner after the work that uses them. The one other
        // stream (`super::copy_stream`, adapter copies) orders itself with its own events.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the context's NULL stream: CUDA refuses to capture a graph on
        // the legacy default stream (`cuStreamBeginCapture`: "capture may not be initiated if
        // stream is CU_STREAM_LEGACY"), which every decode graph needs. Non-blocking, like the
        // copy stream, so neither synchronises implicitly with other work in the process.
        let stream = ctx.new_stream().map_err(driver_err)?;
        let modules = MODULES
            .iter()
            .map(|(name, bin)| {
                ctx.load_module(Ptx::from_binary(bin.to_vec()))
                    .map_err(|e| GpuError::Driver(format!("loading kernels {name}: {e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // cuBLASLt's handle and workspace now, not at the first GEMM: so the memory plan (made
        // after opening) sees them as used, and no GEMM can allocate them while a graph is being
        // captured.
        // SAFETY: only probes whether libcublasLt can be loaded.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(GpuError::MissingLibrary("libcublasLt.so.13"));
        }
        let blas = Blas::new(&stream)?;
        Ok(CudaDevice {
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            programmatic: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub(super) fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = self
            .ctx
            .compute_capability()
            .map(|(a, b)| format!("sm_{a}{b}"))
            .unwrap_or_default();
        format!("cuda:{} {name} {cc}", self.ctx.ordinal())
    }

    pub(super) fn memory_info(&self) -> Result<(usize, usize), GpuError> {
        self.ctx.mem_get_info().map_err(driver_err)
    }

    pub(super) fn alloc_zeroed(&self, bytes: usize) -> Result<DeviceMemory, GpuError> {
        DeviceMemory::zeroed(&self.stream, bytes)
    }

    pub(super) fn write(&self, dst: u64, bytes: &[u8]) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(driver_err)?;
        // SAFETY: the caller checked `dst..dst + len` lies in one live buffer; synchronising
        // right after keeps `bytes` alive for the whole copy.
        unsafe { drv::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }
            .map_err(driver_err)?;
        self.synchronize()
    }

    /// A timing event recorded now on the compute stream (`super::timing`).
    pub(super) fn timing_event(&self) -> Result<cudarc::driver::CudaEvent, GpuError> {
        record_timing_event(&self.stream)
    }

    /// An event to record copies into ([`Self::write_pinned`]).
    pub(super) fn new_event(&self) -> Result<cudarc::driver::CudaEvent, GpuError> {
        self.ctx.new_event(None).map_err(driver_err)
    }

    /// Queues a copy of page-locked `bytes` to `dst` on the compute stream and records `done`
    /// behind it; the host does not wait.
    ///
    /// # Safety
    /// `bytes` must be page-locked, and stay allocated and unwritten until `done` completed;
    /// `dst..dst + len` must lie in one live buffer.
    pub(super) unsafe fn write_pinned(
        &self,
        dst: u64,
        bytes: &[u8],
        done: &cudarc::driver::CudaEvent,
    ) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(driver_err)?;
        // SAFETY: the caller's contract above.
        unsafe { drv::memcpy_htod_async(dst, bytes, self.stream.cu_stream()) }
            .map_err(driver_err)?;
        done.record(&self.stream).map_err(driver_err)
    }

    pub(super) fn read(&self, src: u64, out: &mut [u8]) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(driver_err)?;
        // SAFETY: as in `write`, for a device-to-host copy into `out`.
        unsafe { drv::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }.map_err(driver_err)?;
        self.synchronize()
    }

    pub(super) fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(driver_err)
    }

    /// The context and the compute stream, for the adapter copy stream (`super::copy_stream`).
    pub(super) fn context_and_stream(&self) -> (&Arc<CudaContext>, &Arc<CudaStream>) {
        (&self.ctx, &self.stream)
    }

    /// Page-locked host memory of `words` u32s (`cuMemHostAlloc`), for staging uploads.
    pub(super) fn alloc_pinned_words(
        &self,
        words: usize,
    ) -> Result<cudarc::driver::PinnedHostSlice<u32>, GpuError> {
        // SAFETY: the contents start uninitialised; the caller zeroes them before any read.
        unsafe { self.ctx.alloc_pinned::<u32>(words) }.map_err(driver_err)
    }

    /// Starts capturing this thread's launches on the stream into a graph (`super::graph`).
    pub(super) fn begin_capture(&self) -> Result<(), GpuError> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err)
    }

    /// Ends the capture and instantiates the graph (`None`: nothing was captured).
    pub(super) fn end_capture(&self) -> Result<Option<cudarc::driver::CudaGraph>, GpuError> {
        use cudarc::driver::sys::CUgraphInstantiate_flags;
        self.stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(driver_err)
    }

    /// Kernel `name`, opted into `shared_bytes` of dynamic shared memory where that passes the
    /// default (once per kernel and size; a launch asking for no more reuses it).
    fn function(&self, name: &'static str, shared_bytes: u32) -> Result<CudaFunction, GpuError> {
        use cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYN;
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| GpuError::Driver("kernel cache poisoned".into()))?;
        let (f, opted) = match cache.get(name) {
            Some(entry) => entry.clone(),
            None => {
                let f = self
                    .modules
                    .iter()
                    .find_map(|m| m.load_function(name).ok())
                    .ok_or(GpuError::UnknownKernel(name))?;
                (f, 0)
            }
        };
        let opted = if shared_bytes > MAX_DEFAULT_DYNAMIC_SHARED && shared_bytes > opted {
            f.set_attribute(MAX_DYN, shared_bytes as i32).map_err(|e| {
                GpuError::Driver(format!(
                    "{name}: opting into {shared_bytes} bytes of dynamic shared memory: {e:?}"
                ))
            })?;
            shared_bytes
        } else {
            opted
        };
        cache.insert(name, (f.clone(), opted));
        Ok(f)
    }

    pub(super) fn launch<P: KernelParams>(
        &self,
        name: &'static str,
        dims: LaunchDims,
        params: &P,
    ) -> Result<(), GpuError> {
        let f = self.function(name, dims.shared_bytes)?;
        if self.programmatic_launch() {
            return self.launch_programmatic(&f, dims, params);
        }
        let cfg = LaunchConfig {
            grid_dim: dims.grid,
            block_dim: dims.block,
            shared_mem_bytes: dims.shared_bytes,
        };
        let mut builder = self.stream.launch_builder(&f);
        builder.arg(params);
        // SAFETY: `params` has its C twin's layout (KernelParams) and holds live device
        // addresses checked by the launcher that built it.
        unsafe { builder.launch(cfg) }.map_err(driver_err)?;
        Ok(())
    }
}

impl CudaDevice {
    /// Launches kernels as programmatic dependents from now on (`on`), where the GPU has them
    /// (sm_90 and later); returns whether they are on.
    pub(super) fn set_programmatic_launch(&self, on: bool) -> bool {
        let supported = self
            .ctx
            .compute_capability()
            .is_ok_and(|(major, _)| major >= 9);
        let on = on && supported;
        self.programmatic
            .store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    pub(super) fn programmatic_launch(&self) -> bool {
        self.programmatic.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Self::launch`] through `cuLaunchKernelEx` with programmatic stream serialization: the
    /// kernel's launch may overlap the previous kernel's end, and its body waits for that
    /// kernel's completion (`CAD_WAIT_FOR_PREVIOUS_GRID` at every kernel's entry). Captured into
    /// a graph, it becomes a programmatic edge.
    fn launch_programmatic<P: KernelParams>(
        &self,
        f: &CudaFunction,
        dims: LaunchDims,
        params: &P,
    ) -> Result<(), GpuError> {
        use cudarc::driver::sys;
        self.ctx.bind_to_thread().map_err(driver_err)?;
        // SAFETY: a plain C struct for which all-zero bytes are a valid value.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: dims.grid.0,
            gridDimY: dims.grid.1,
            gridDimZ: dims.grid.2,
            blockDimX: dims.block.0,
            blockDimY: dims.block.1,
            blockDimZ: dims.block.2,
            sharedMemBytes: dims.shared_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        let mut args = [(params as *const P).cast_mut().cast::<core::ffi::c_void>()];
        // SAFETY: `params` has its C twin's layout (KernelParams), holds live device addresses
        // checked by the launcher that built it, and outlives the call (the driver copies the
        // arguments before returning); `cfg` and `attr` live across the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &cfg,
                f.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(driver_err)
    }

    /// `y (+)= x · Wᵀ (+ bias)`; see [`Blas::gemm`]. `gemv` runs our GEMV kernel on these
    /// operands (`None` where it does not apply).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        &self,
        dtype: super::DType,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        s: super::gemm::GemmShape,
        gemv: super::cublaslt::GemvRun<'_>,
    ) -> Result<(), GpuError> {
        // cuBLASLt works on the thread's current context: the engine thread may not have made
        // ours current yet (launches and copies through cudarc do).
        self.ctx.bind_to_thread().map_err(driver_err)?;
        let mut blas = self.blas()?;
        // SAFETY: the launcher checked every buffer against the shape; they live on this device.
        unsafe { blas.gemm(&self.stream, dtype, x, w, bias, y, s, gemv) }
    }

    fn blas(&self) -> Result<std::sync::MutexGuard<'_, Blas>, GpuError> {
        self.blas
            .lock()
            .map_err(|_| GpuError::Blas("handle poisoned".into()))
    }

    /// Hits and misses of the cuBLASLt algorithm cache (zeros before the first GEMM).
    pub(super) fn gemm_cache_stats(&self) -> GemmCacheStats {
        self.blas.lock().map(|b| b.stats()).unwrap_or_default()
    }

    pub(super) fn set_gemm_policy(&self, policy: GemmPolicy) -> Result<(), GpuError> {
        self.blas()?.set_policy(policy);
        Ok(())
    }

    pub(super) fn gemm_policy(&self) -> GemmPolicy {
        self.blas.lock().map(|b| b.policy()).unwrap_or_default()
    }

    pub(super) fn gemm_tuning(&self) -> Vec<TuneRecord> {
        self.blas.lock().map(|b| b.records()).unwrap_or_default()
    }
}

/// Device memory from `cuMemAlloc`, zeroed on the stream it belongs to and freed with `cuMemFree`
/// once that stream has drained.
///
/// Not cudarc's `CudaSlice`: that allocates stream-ordered (`cuMemAllocAsync`) wherever the device
/// reports memory pools, with no way to opt out, and pools are missing or refused on some
/// virtualised GPUs. Every buffer here is made at start and lives for the server's life, so
/// stream-ordered allocation would buy nothing; plain `cuMemAlloc` is what PyTorch's allocator
/// uses too.
pub(super) struct DeviceMemory {
    ptr: u64,
    stream: Arc<CudaStream>,
}

impl DeviceMemory {
    /// `bytes` (at least 1) of zeroed device memory; the zeroing is queued on `stream`.
    pub(super) fn zeroed(stream: &Arc<CudaStream>, bytes: usize) -> Result<DeviceMemory, GpuError> {
        let bytes = bytes.max(1);
        stream.context().bind_to_thread().map_err(driver_err)?;
        // SAFETY: a plain allocation in the bound context; freed once, in `Drop`.
        let ptr = unsafe { drv::malloc_sync(bytes) }.map_err(driver_err)?;
        let mem = DeviceMemory {
            ptr,
            stream: stream.clone(),
        };
        // SAFETY: `ptr..ptr + bytes` was just allocated and is owned by `mem`.
        unsafe { drv::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }.map_err(driver_err)?;
        Ok(mem)
    }

    /// The device address of the first byte.
    pub(super) fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // Work queued on the stream may still use the memory: wait for it, then free. Errors
        // cannot be returned from a drop, and a failed free only leaks.
        let _ = self.stream.context().bind_to_thread();
        let _ = self.stream.synchronize();
        // SAFETY: allocated by `cuMemAlloc` in `zeroed`, freed only here.
        let _ = unsafe { drv::free_sync(self.ptr) };
    }
}
