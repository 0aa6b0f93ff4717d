//! cuBLASLt behind [`super::gemm`]: our own handle and workspace, descriptors built per call
//! (host-only work), and the implementation taken from an [`AlgoCache`], so the heuristic query
//! (and, under [`GemmPolicy::Tuned`], the timing of its candidates against our GEMV kernel: see
//! [`super::gemm_tune`]) runs once per [`GemmKey`] and a CUDA graph captured after warm-up issues
//! none.

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::CudaStream;

use super::cuda::driver_err;
use super::device::{DType, GpuError};
use super::gemm::GemmShape;
use super::gemm_cache::{AlgoCache, GemmCacheStats, GemmKey};
use super::gemm_tune::{
    best_of, fastest, time_candidates, CandidateTime, GemmChoice, GemmPolicy, TuneClock, TuneRecord,
};
use super::gemv::GemvKernel;

type Algo = sys::cublasLtMatmulAlgo_t;
type Choice = GemmChoice<Algo>;

/// One of our GEMV kernels on the call's operands, writing the output at the address it is given
/// (the real output, or a scratch one while tuning); `None` where they do not apply.
pub(super) type GemvRun<'a> = Option<&'a dyn Fn(GemvKernel, u64) -> Result<(), GpuError>>;

/// Heuristic candidates the tuner times.
const TUNE_CANDIDATES: usize = 8;

/// Timing events on the compute stream.
struct StreamClock<'a>(&'a std::sync::Arc<CudaStream>);

impl TuneClock for StreamClock<'_> {
    type Mark = cudarc::driver::CudaEvent;

    fn mark(&self) -> Result<Self::Mark, GpuError> {
        super::cuda::record_timing_event(self.0)
    }

    fn ms_between(&self, start: &Self::Mark, end: &Self::Mark) -> Result<f64, GpuError> {
        super::cuda::event_ms(start, end)
    }
}

/// The largest m bucket tuned: decode batches, whose skinny shapes are where the heuristic's first
/// choice strays furthest from the roofline and which graphs replay millions of times. Prefill's
/// larger buckets keep the heuristic's choice: tuning them would stall the first prompts of
/// each length for tenths of a second.
pub(super) const TUNE_MAX_BUCKET: usize = 512;

/// Workspace for split-K and stream-K algorithms (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

fn blas_err(e: result::CublasError) -> GpuError {
    GpuError::Blas(format!("{e:?}"))
}

/// A cuBLASLt handle with its workspace and chosen algorithms.
pub(super) struct Blas {
    handle: sys::cublasLtHandle_t,
    /// Owns the workspace memory at `workspace_ptr`.
    _workspace: super::cuda::DeviceMemory,
    workspace_ptr: u64,
    algos: AlgoCache<Choice>,
    policy: GemmPolicy,
    /// What tuning measured, one record per key tuned.
    records: Vec<TuneRecord>,
}

// SAFETY: a cuBLASLt handle is not tied to a thread; the device serialises its use with a mutex.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here. A failure cannot be reported from drop.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// Descriptors, destroyed when dropped (errors on destroy are ignored: nothing to do about them).
struct Desc(sys::cublasLtMatmulDesc_t);
struct Layout(sys::cublasLtMatrixLayout_t);
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `Desc::new`, destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `Layout::new`, destroyed once.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `Pref::new`, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

impl Desc {
    /// f32 compute and scale, A transposed, and the bias epilogue when `bias` is given.
    fn new(bias: Option<u64>) -> Result<Desc, GpuError> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        let d = Desc(
            result::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(blas_err)?,
        );
        let set = |attr, buf: *const c_void, len| {
            // SAFETY: `d` is live; `buf` points at `len` bytes of the attribute's type.
            unsafe { result::set_matmul_desc_attribute(d.0, attr, buf, len) }.map_err(blas_err)
        };
        let transpose: i32 = 1; // CUBLAS_OP_T
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            (&transpose as *const i32).cast(),
            size_of::<i32>(),
        )?;
        if let Some(ptr) = bias {
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                A::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epilogue as *const sys::cublasLtEpilogue_t).cast(),
                size_of::<sys::cublasLtEpilogue_t>(),
            )?;
            set(
                A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                (&ptr as *const u64).cast(),
                size_of::<u64>(),
            )?;
        }
        Ok(d)
    }
}

impl Layout {
    /// A column-major `rows x cols` matrix with leading dimension `ld`.
    fn new(dtype: DType, rows: usize, cols: usize, ld: usize) -> Result<Layout, GpuError> {
        let ty = match dtype {
            DType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        };
        result::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64)
            .map(Layout)
            .map_err(blas_err)
    }
}

impl Blas {
    pub(super) fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Blas, GpuError> {
        let workspace = super::cuda::DeviceMemory::zeroed(stream, WORKSPACE_BYTES)
            .map_err(|e| GpuError::Driver(format!("cuBLASLt workspace: {e}")))?;
        let workspace_ptr = workspace.ptr();
        let handle = result::create_handle().map_err(blas_err)?;
        Ok(Blas {
            handle,
            _workspace: workspace,
            workspace_ptr,
            algos: AlgoCache::new(),
            policy: GemmPolicy::default(),
            records: Vec::new(),
        })
    }

    pub(super) fn stats(&self) -> GemmCacheStats {
        self.algos.stats()
    }

    /// Switches policy, forgetting every choice made under the old one.
    pub(super) fn set_policy(&mut self, policy: GemmPolicy) {
        self.policy = policy;
        self.algos.clear();
        self.records.clear();
    }

    pub(super) fn policy(&self) -> GemmPolicy {
        self.policy
    }

    pub(super) fn records(&self) -> Vec<TuneRecord> {
        self.records.clone()
    }

    /// `y (+)= x · Wᵀ (+ bias)` row-major, as column-major `yᵀ = W · xᵀ`: A = W (`[n, k]`
    /// row-major is `k × n` column-major, transposed), B = xᵀ (`k × m` column-major as stored),
    /// C = D = yᵀ (`n × m`); the bias (`n` elements) is broadcast over C's columns, i.e. added to
    /// every row of y. Runs the key's chosen implementation: a cuBLASLt algorithm, or one of our
    /// GEMV kernels.
    ///
    /// # Safety
    /// `x`, `w`, `y` (and `bias`) must be live device ranges of the `[m, k]`, `[n, k]`, `[m, n]`
    /// (and `[n]`) elements of `s` in `dtype`, on `stream`'s context.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        &mut self,
        stream: &std::sync::Arc<CudaStream>,
        dtype: DType,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        s: GemmShape,
        gemv: GemvRun<'_>,
    ) -> Result<(), GpuError> {
        let desc = Desc::new(bias)?;
        let a = Layout::new(dtype, s.k, s.n, s.k)?;
        let b = Layout::new(dtype, s.k, s.m, s.k)?;
        let c = Layout::new(dtype, s.n, s.m, s.n)?;
        let key = GemmKey::new(dtype, &s, bias.is_some());
        let mut record = None;
        let choice = self.algos.get_or_choose(key, || {
            // Asked for the bucket's largest m, so the choice does not depend on which m of the
            // bucket came first.
            let bb = Layout::new(dtype, s.k, key.m_bucket, s.k)?;
            let cb = Layout::new(dtype, s.n, key.m_bucket, s.n)?;
            let (choice, rec) = self.choose(
                stream,
                key,
                s,
                (&desc, &a, &b, &c),
                (&desc, &a, &bb, &cb),
                x,
                w,
                y,
                gemv,
            )?;
            record = rec;
            Ok::<_, GpuError>(choice)
        })?;
        self.records.extend(record);
        let algo = match (choice, gemv) {
            (GemmChoice::Gemv(kernel), Some(run)) => return run(kernel, y),
            (GemmChoice::Library(algo), _) => algo,
            // The bucket chose GEMV at an m (or alignment) where it applied; this call's does
            // not: the library's choice for this exact shape (not cached).
            (GemmChoice::Gemv(_), None) => self.heuristic(&desc, &a, &b, &c)?,
        };
        let run = |algo: &Algo| {
            // SAFETY: forwarded from the caller; the descriptors and the workspace are live.
            unsafe { self.matmul(stream, (&desc, &a, &b, &c), s.accumulate, x, w, y, algo) }
        };
        use sys::cublasStatus_t as St;
        match run(&algo) {
            // cuBLASLt validates the algorithm on the host before launching: should the bucket's
            // choice not fit this m, ask for this exact shape (not cached) rather than fail.
            Err(result::CublasError(
                St::CUBLAS_STATUS_NOT_SUPPORTED | St::CUBLAS_STATUS_INVALID_VALUE,
            )) => run(&self.heuristic(&desc, &a, &b, &c)?).map_err(blas_err),
            r => r.map_err(blas_err),
        }
    }

    /// One cuBLASLt matmul writing `y`.
    ///
    /// # Safety
    /// As [`Self::gemm`], with descriptors made for these operands.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(
        &self,
        stream: &CudaStream,
        (desc, a, b, c): (&Desc, &Layout, &Layout, &Layout),
        accumulate: bool,
        x: u64,
        w: u64,
        y: u64,
        algo: &Algo,
    ) -> Result<(), result::CublasError> {
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let ptr = |p: u64| p as usize as *const c_void;
        // SAFETY: forwarded from the caller; the workspace is live.
        unsafe {
            result::matmul(
                self.handle,
                desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                ptr(w),
                a.0,
                ptr(x),
                b.0,
                ptr(y),
                c.0,
                y as usize as *mut c_void,
                c.0,
                algo,
                self.workspace_ptr as usize as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as *mut _,
            )
        }
    }

    /// The implementation for `key` under the policy, and what tuning measured (under
    /// [`GemmPolicy::Tuned`]). `bucket` holds the descriptors at the bucket's m (what the
    /// heuristic is asked about); the candidates run at the call's own m (`call`).
    #[allow(clippy::too_many_arguments)]
    fn choose(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        key: GemmKey,
        s: GemmShape,
        call: (&Desc, &Layout, &Layout, &Layout),
        bucket: (&Desc, &Layout, &Layout, &Layout),
        x: u64,
        w: u64,
        y: u64,
        gemv: GemvRun<'_>,
    ) -> Result<(Choice, Option<TuneRecord>), GpuError> {
        let (desc, a, bb, cb) = bucket;
        if self.policy == GemmPolicy::Gemv && gemv.is_some() {
            return Ok((GemmChoice::Gemv(GemvKernel::Ring), None));
        }
        if self.policy != GemmPolicy::Tuned || key.m_bucket > TUNE_MAX_BUCKET {
            return Ok((GemmChoice::Library(self.heuristic(desc, a, bb, cb)?), None));
        }
        let candidates = self.heuristics(desc, a, bb, cb, TUNE_CANDIDATES)?;
        let fallback = |why: String| {
            let record = TuneRecord {
                key,
                m: s.m,
                candidates: Vec::new(),
                chosen: "cublaslt#0".into(),
                fallback: Some(why),
            };
            (GemmChoice::Library(candidates[0]), Some(record))
        };
        match self.time_on_operands(stream, key.dtype, s, call, &candidates, x, w, y, gemv) {
            Ok(samples) => {
                // In the order time_on_operands ran them.
                let gemvs = gemv.map_or(&[][..], |_| &GemvKernel::ALL[..]);
                let (names, choices): (Vec<String>, Vec<Choice>) = candidates
                    .iter()
                    .enumerate()
                    .map(|(i, algo)| (format!("cublaslt#{i}"), GemmChoice::Library(*algo)))
                    .chain(
                        gemvs
                            .iter()
                            .map(|g| (g.name().to_string(), GemmChoice::Gemv(*g))),
                    )
                    .unzip();
                let picked = fastest(&samples).and_then(|b| choices.get(b).map(|c| (b, *c)));
                let Some((best, choice)) = picked else {
                    return Ok(fallback("no candidate ran".into()));
                };
                let record = TuneRecord {
                    key,
                    m: s.m,
                    candidates: names
                        .iter()
                        .zip(&samples)
                        .map(|(name, t)| CandidateTime {
                            name: name.clone(),
                            us: best_of(t),
                        })
                        .collect(),
                    chosen: names[best].clone(),
                    fallback: None,
                };
                Ok((choice, Some(record)))
            }
            Err(e) => Ok(fallback(e.to_string())),
        }
    }

    /// Timings ([`time_candidates`]: microseconds per launch) of every heuristic candidate, then
    /// each GEMV kernel ([`GemvKernel::ALL`]), on the call's operands, with timing events on the
    /// compute stream. Output goes to `y` (every candidate overwrites it, and the real call that
    /// follows writes it again) unless the projection accumulates into `y`: then to a scratch
    /// buffer. Refused while the stream is
    /// being captured (events would join the graph).
    #[allow(clippy::too_many_arguments)]
    fn time_on_operands(
        &self,
        stream: &std::sync::Arc<CudaStream>,
        dtype: DType,
        s: GemmShape,
        call: (&Desc, &Layout, &Layout, &Layout),
        candidates: &[Algo],
        x: u64,
        w: u64,
        y: u64,
        gemv: GemvRun<'_>,
    ) -> Result<Vec<Vec<f64>>, GpuError> {
        use cudarc::driver::sys::CUstreamCaptureStatus;
        if stream.capture_status().map_err(driver_err)?
            != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        {
            return Err(GpuError::Capture("a graph is being captured".into()));
        }
        let scratch = match s.accumulate {
            true => Some(super::cuda::DeviceMemory::zeroed(
                stream,
                s.m * s.n * dtype.size(),
            )?),
            false => None,
        };
        let out = scratch.as_ref().map_or(y, |m| m.ptr());
        let mut runs: Vec<Box<dyn Fn() -> bool + '_>> = candidates
            .iter()
            .map(|algo| -> Box<dyn Fn() -> bool + '_> {
                // SAFETY: the operands are the caller's (checked against `s`, described by
                // `call`); `out` is `y` or a scratch buffer of `[m, n]`.
                Box::new(move || {
                    unsafe { self.matmul(stream, call, s.accumulate, x, w, out, algo) }.is_ok()
                })
            })
            .collect();
        if let Some(g) = gemv {
            for kernel in GemvKernel::ALL {
                runs.push(Box::new(move || g(kernel, out).is_ok()));
            }
        }
        let runs: Vec<&dyn Fn() -> bool> = runs.iter().map(|r| r.as_ref()).collect();
        let samples = time_candidates(&StreamClock(stream), &runs)?;
        stream.synchronize().map_err(driver_err)?;
        Ok(samples)
    }

    /// cuBLASLt's best algorithm for these descriptors within our workspace.
    fn heuristic(&self, desc: &Desc, a: &Layout, b: &Layout, c: &Layout) -> Result<Algo, GpuError> {
        Ok(self.heuristics(desc, a, b, c, 1)?[0])
    }

    /// cuBLASLt's `count` best algorithms (at least one, best first) within our workspace.
    fn heuristics(
        &self,
        desc: &Desc,
        a: &Layout,
        b: &Layout,
        c: &Layout,
        count: usize,
    ) -> Result<Vec<Algo>, GpuError> {
        let pref = Pref(result::create_matmul_pref().map_err(blas_err)?);
        let bytes = WORKSPACE_BYTES;
        // SAFETY: a plain-data C struct; every field is written by the heuristic before use.
        let blank: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        let mut results = vec![blank; count.max(1)];
        let mut found: std::ffi::c_int = 0;
        // SAFETY: live descriptors; the attribute is a usize; `results` has room for the
        // requested count.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const usize).cast(),
                size_of::<usize>(),
            )
            .map_err(blas_err)?;
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc.0,
                a.0,
                b.0,
                c.0,
                c.0,
                pref.0,
                results.len() as std::ffi::c_int,
                results.as_mut_ptr(),
                &mut found,
            )
            .result()
            .map_err(blas_err)?;
        }
        let algos: Vec<Algo> = results
            .iter()
            .take(usize::try_from(found).unwrap_or(0))
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if algos.is_empty() {
            return Err(blas_err(result::CublasError(
                sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            )));
        }
        Ok(algos)
    }
}
