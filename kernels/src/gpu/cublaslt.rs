//! cuBLASLt behind [`super::gemm`]: our own handle and workspace, descriptors built per call
//! (host-only work), and the algorithm taken from an [`AlgoCache`], so the heuristic query runs
//! once per [`GemmKey`] and a CUDA graph captured after warm-up issues none.

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublaslt::{result, sys};
use cudarc::driver::CudaStream;

use super::device::{DType, GpuError};
use super::gemm::GemmShape;
use super::gemm_cache::{AlgoCache, GemmCacheStats, GemmKey};

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
    algos: AlgoCache<sys::cublasLtMatmulAlgo_t>,
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
        })
    }

    pub(super) fn stats(&self) -> GemmCacheStats {
        self.algos.stats()
    }

    /// `y (+)= x · Wᵀ (+ bias)` row-major, as column-major `yᵀ = W · xᵀ`: A = W (`[n, k]`
    /// row-major is `k × n` column-major, transposed), B = xᵀ (`k × m` column-major as stored),
    /// C = D = yᵀ (`n × m`); the bias (`n` elements) is broadcast over C's columns, i.e. added to
    /// every row of y.
    ///
    /// # Safety
    /// `x`, `w`, `y` (and `bias`) must be live device ranges of the `[m, k]`, `[n, k]`, `[m, n]`
    /// (and `[n]`) elements of `s` in `dtype`, on `stream`'s context.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm(
        &self,
        stream: &CudaStream,
        dtype: DType,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        s: GemmShape,
    ) -> Result<(), GpuError> {
        let desc = Desc::new(bias)?;
        let a = Layout::new(dtype, s.k, s.n, s.k)?;
        let b = Layout::new(dtype, s.k, s.m, s.k)?;
        let c = Layout::new(dtype, s.n, s.m, s.n)?;
        let key = GemmKey::new(dtype, &s, bias.is_some());
        let algo = self.algos.get_or_choose(key, || {
            // Asked for the bucket's largest m, so the choice does not depend on which m of the
            // bucket came first.
            let b = Layout::new(dtype, s.k, key.m_bucket, s.k)?;
            let c = Layout::new(dtype, s.n, key.m_bucket, s.n)?;
            self.heuristic(&desc, &a, &b, &c)
        })?;
        let alpha = 1.0f32;
        let beta = if s.accumulate { 1.0f32 } else { 0.0 };
        let ptr = |p: u64| p as usize as *const c_void;
        let run = |algo: &sys::cublasLtMatmulAlgo_t| {
            // SAFETY: forwarded from the caller; the descriptors and the workspace are live.
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

    /// cuBLASLt's best algorithm for these descriptors within our workspace.
    fn heuristic(
        &self,
        desc: &Desc,
        a: &Layout,
        b: &Layout,
        c: &Layout,
    ) -> Result<sys::cublasLtMatmulAlgo_t, GpuError> {
        let pref = Pref(result::create_matmul_pref().map_err(blas_err)?);
        let bytes = WORKSPACE_BYTES;
        // SAFETY: live descriptors; the attribute is a usize.
        unsafe {
            result::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const usize).cast(),
                size_of::<usize>(),
            )
            .map_err(blas_err)?;
            result::get_matmul_algo_heuristic(self.handle, desc.0, a.0, b.0, c.0, c.0, pref.0)
        }
        .map(|h| h.algo)
        .map_err(blas_err)
    }
}
