//! Captured launch sequences ("CUDA graphs") and the emulation's transfer counters.
//!
//! A decode step launches a few hundred small kernels; replaying them as one captured graph
//! removes the per-launch host cost. Everything a graph reads must sit at fixed addresses, and
//! nothing may allocate, copy or synchronise while it is captured.
//!
//! On a GPU (`cuda`): `cuStreamBeginCapture` / `cuStreamEndCapture` + `cuGraphInstantiate` /
//! `cuGraphLaunch` through cudarc, on the device's one stream (run on the H200 by
//! `scripts/gpu-check`).
//! In emulation (`cuda-emu`): capture records each launch (entry point, parameter bytes, grid)
//! and each GEMM (addresses and shape) instead of running it, and refuses allocations and copies
//! (as capture does on a GPU); replay re-runs the record. That tests the index arithmetic and
//! that a graph reads only fixed addresses, not the driver's behaviour.

#[cfg(feature = "cuda-emu")]
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "cuda-emu")]
use std::sync::Mutex;

#[cfg(feature = "cuda-emu")]
use super::device::{DType, DeviceBuffer};
use super::device::{Device, GpuError};
#[cfg(feature = "cuda-emu")]
use super::gemm::GemmShape;
#[cfg(feature = "cuda-emu")]
use super::kernel::{EmuEntry, EmuLaunch, KernelFn, KernelParams};

/// Allocations, copies and host waits the emulated device has performed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    pub allocs: usize,
    /// Host -> device copies (pageable or staged).
    pub writes: usize,
    /// Device -> host copies.
    pub reads: usize,
    /// Calls that make the host wait for the device on a GPU: pageable writes, reads and
    /// synchronisations (a staged upload does not wait).
    pub host_waits: usize,
}

#[cfg(feature = "cuda-emu")]
#[derive(Default)]
pub(crate) struct TransferCounts {
    allocs: AtomicUsize,
    writes: AtomicUsize,
    reads: AtomicUsize,
    host_waits: AtomicUsize,
}

#[cfg(feature = "cuda-emu")]
impl TransferCounts {
    pub fn count_alloc(&self) {
        self.allocs.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
    /// A read also waits.
    pub fn count_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.count_host_wait();
    }
    pub fn count_host_wait(&self) {
        self.host_waits.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> Transfers {
        Transfers {
            allocs: self.allocs.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            host_waits: self.host_waits.load(Ordering::Relaxed),
        }
    }
}

/// One recorded operation of an emulated graph.
#[cfg(feature = "cuda-emu")]
enum EmuOp {
    Kernel {
        name: &'static str,
        entry: EmuEntry,
        launch: EmuLaunch,
        /// The parameter struct's bytes, in u64 words so the C side reads it aligned.
        params: Vec<u64>,
        size: u32,
    },
    Gemm {
        dtype: DType,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        shape: GemmShape,
    },
}

/// The emulated device's capture state: `Some` while capturing.
#[cfg(feature = "cuda-emu")]
#[derive(Default)]
pub(crate) struct EmuCapture {
    ops: Mutex<Option<Vec<EmuOp>>>,
}

#[cfg(feature = "cuda-emu")]
impl EmuCapture {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Vec<EmuOp>>>, GpuError> {
        self.ops
            .lock()
            .map_err(|_| GpuError::Capture("capture state poisoned".into()))
    }

    /// Fails while capturing: `what` (an allocation, a copy) cannot be part of a graph.
    pub fn refuse(&self, what: &str) -> Result<(), GpuError> {
        match self.lock()?.is_some() {
            true => Err(GpuError::Capture(format!("{what} while capturing a graph"))),
            false => Ok(()),
        }
    }

    /// Records the launch when capturing (returns true: do not run it now).
    pub fn record_launch<P: KernelParams>(
        &self,
        kernel: &KernelFn,
        launch: &EmuLaunch,
        params: &P,
    ) -> Result<bool, GpuError> {
        let mut guard = self.lock()?;
        let Some(ops) = guard.as_mut() else {
            return Ok(false);
        };
        let size = std::mem::size_of::<P>();
        let mut words = vec![0u64; size.div_ceil(8)];
        // SAFETY: KernelParams are plain data of `size` bytes; `words` holds at least that many.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (params as *const P).cast::<u8>(),
                words.as_mut_ptr().cast::<u8>(),
                size,
            )
        };
        ops.push(EmuOp::Kernel {
            name: kernel.name,
            entry: kernel.emu,
            launch: *launch,
            params: words,
            size: size as u32,
        });
        Ok(true)
    }

    /// Records a GEMM when capturing (returns true: do not run it now).
    pub fn record_gemm(
        &self,
        dtype: DType,
        bufs: [&DeviceBuffer; 3],
        bias: Option<&DeviceBuffer>,
        shape: GemmShape,
    ) -> Result<bool, GpuError> {
        let mut guard = self.lock()?;
        let Some(ops) = guard.as_mut() else {
            return Ok(false);
        };
        let [x, w, y] = bufs.map(DeviceBuffer::ptr);
        ops.push(EmuOp::Gemm {
            dtype,
            x,
            w,
            bias: bias.map(DeviceBuffer::ptr),
            y,
            shape,
        });
        Ok(true)
    }
}

/// A captured launch sequence, replayed with [`Device::replay`] on the device that captured it.
pub struct DeviceGraph {
    inner: Inner,
    nodes: usize,
}

enum Inner {
    #[cfg(feature = "cuda-emu")]
    Emulated(Vec<EmuOp>),
    #[cfg(feature = "cuda")]
    Cuda(CudaGraphSend),
    /// Nothing was launched while capturing.
    #[allow(dead_code)]
    Empty,
}

/// A captured CUDA graph that may move to another thread (the engine runs on its own).
#[cfg(feature = "cuda")]
struct CudaGraphSend(cudarc::driver::CudaGraph);

// SAFETY: CUDA graph handles may be used from any thread as long as calls on one graph are not
// concurrent (driver docs, "Graph object thread safety"); `DeviceGraph` is not `Sync`, so its
// one owner serialises every use.
#[cfg(feature = "cuda")]
unsafe impl Send for CudaGraphSend {}

impl DeviceGraph {
    /// Kernel launches and GEMMs in the graph (emulation; 0 on a GPU, where the driver owns it).
    pub fn num_nodes(&self) -> usize {
        self.nodes
    }
}

impl Device {
    /// Allocations and host->device writes so far (emulation only: `None` on a GPU), so tests
    /// can assert that a step allocates nothing and uploads once.
    pub fn transfers(&self) -> Option<Transfers> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => Some(e.counts.get()),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => None,
        }
    }

    /// Runs `body` under capture and returns what it launched as a graph. Capture always ends,
    /// also when `body` fails. The GEMM algorithm cache must already hold every shape `body`
    /// uses: a miss while capturing is an error (a cuBLASLt heuristic query cannot be captured).
    pub fn capture<E: From<GpuError>>(
        &self,
        body: impl FnOnce() -> Result<(), E>,
    ) -> Result<DeviceGraph, E> {
        let misses = self.gemm_cache_stats().misses;
        self.begin_capture()?;
        let result = body();
        let graph = self.end_capture();
        result?;
        let graph = graph?;
        if self.gemm_cache_stats().misses != misses {
            return Err(GpuError::Capture(
                "a GEMM shape was not warmed up before capture (its algorithm was chosen while \
                 capturing)"
                    .into(),
            )
            .into());
        }
        Ok(graph)
    }

    fn begin_capture(&self) -> Result<(), GpuError> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                let mut guard = e.capture.lock()?;
                if guard.is_some() {
                    return Err(GpuError::Capture("already capturing".into()));
                }
                *guard = Some(Vec::new());
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => d.begin_capture(),
        }
    }

    fn end_capture(&self) -> Result<DeviceGraph, GpuError> {
        match self {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(e) => {
                let ops = e
                    .capture
                    .lock()?
                    .take()
                    .ok_or_else(|| GpuError::Capture("not capturing".into()))?;
                Ok(DeviceGraph {
                    nodes: ops.len(),
                    inner: Inner::Emulated(ops),
                })
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(DeviceGraph {
                nodes: 0,
                inner: d
                    .end_capture()?
                    .map_or(Inner::Empty, |g| Inner::Cuda(CudaGraphSend(g))),
            }),
        }
    }

    /// Launches `graph` (asynchronous on a GPU, synchronous in emulation).
    pub fn replay(&self, graph: &DeviceGraph) -> Result<(), GpuError> {
        match (self, &graph.inner) {
            #[cfg(feature = "cuda-emu")]
            (Device::Emulated(e), Inner::Emulated(ops)) => {
                e.capture.refuse("graph replay")?;
                for op in ops {
                    replay_op(op)?;
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Device::Cuda(_), Inner::Cuda(g)) => {
                g.0.launch()
                    .map_err(|e| GpuError::Driver(format!("graph launch: {e:?}")))
            }
            (_, Inner::Empty) => Ok(()),
            #[allow(unreachable_patterns)]
            _ => Err(GpuError::Capture(
                "graph replayed on another kind of device".into(),
            )),
        }
    }
}

#[cfg(feature = "cuda-emu")]
fn replay_op(op: &EmuOp) -> Result<(), GpuError> {
    match op {
        EmuOp::Kernel {
            name,
            entry,
            launch,
            params,
            size,
        } => {
            // SAFETY: the parameter bytes were copied from the launch's KernelParams struct at
            // capture; the addresses in them are the (still live, fixed) buffers it named.
            let rc = unsafe { entry(launch, params.as_ptr().cast(), *size) };
            super::kernel::emu_result(name, launch, rc)
        }
        EmuOp::Gemm {
            dtype,
            x,
            w,
            bias,
            y,
            shape,
        } => {
            super::gemm::host_gemm(*dtype, *x, *w, *bias, *y, *shape);
            Ok(())
        }
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use half::f16;

    use super::*;
    use crate::gpu::gemm::gemm;
    use crate::gpu::ops::to_f32;

    fn f16s(v: &[f32]) -> Vec<f16> {
        v.iter().map(|&x| f16::from_f32(x)).collect()
    }

    /// `y = x · Wᵀ` then `out = f32(y)`, x `[2, 3]`, W `[2, 3]`.
    fn step(
        dev: &Device,
        x: &DeviceBuffer,
        w: &DeviceBuffer,
        y: &DeviceBuffer,
        out: &DeviceBuffer,
    ) {
        let s = GemmShape {
            m: 2,
            n: 2,
            k: 3,
            accumulate: false,
        };
        gemm(dev, DType::F16, x, w, y, s).unwrap();
        to_f32(dev, DType::F16, y, 4, out).unwrap();
    }

    #[test]
    fn a_replay_reruns_the_captured_launches_on_the_current_contents() {
        let dev = Device::emulated();
        let x = dev.upload(&f16s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])).unwrap();
        let w = dev.upload(&f16s(&[1.0, 0.0, 1.0, 0.0, 1.0, 0.0])).unwrap();
        let y = dev.alloc_zeroed(8).unwrap();
        let out = dev.alloc_zeroed(16).unwrap();
        // Capturing before the GEMM shape was ever run would choose its algorithm mid-capture.
        let cold = dev.capture(|| -> Result<(), GpuError> {
            step(&dev, &x, &w, &y, &out);
            Ok(())
        });
        assert!(
            matches!(cold, Err(GpuError::Capture(_))),
            "cold GEMM captured"
        );
        step(&dev, &x, &w, &y, &out);
        assert_eq!(dev.download::<f32>(&out).unwrap(), [4.0, 2.0, 10.0, 5.0]);
        let graph = dev
            .capture(|| -> Result<(), GpuError> {
                step(&dev, &x, &w, &y, &out);
                Ok(())
            })
            .unwrap();
        assert_eq!(graph.num_nodes(), 2, "one GEMM, one conversion");
        // New inputs at the same address: the replay computes with them.
        dev.write(&x, 0, &f16s(&[2.0, 0.0, 1.0, 1.0, 1.0, -1.0]))
            .unwrap();
        dev.write(&out, 0, &[0f32; 4]).unwrap();
        let before = dev.transfers().unwrap();
        dev.replay(&graph).unwrap();
        assert_eq!(dev.transfers(), Some(before), "a replay copies nothing");
        assert_eq!(dev.download::<f32>(&out).unwrap(), [3.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn capture_refuses_allocations_and_copies_and_always_ends() {
        let dev = Device::emulated();
        let buf = dev.alloc_zeroed(16).unwrap();
        let alloc = dev.capture(|| dev.alloc_zeroed(4).map(drop));
        assert!(matches!(alloc, Err(GpuError::Capture(_))));
        let write = dev.capture(|| dev.write(&buf, 0, &[1u32]));
        assert!(matches!(write, Err(GpuError::Capture(_))));
        let read = dev.capture(|| dev.download::<u32>(&buf).map(drop));
        assert!(matches!(read, Err(GpuError::Capture(_))));
        // Capture ended after each failure: the device works as before.
        dev.write(&buf, 0, &[7u32]).unwrap();
        assert_eq!(dev.download::<u32>(&buf).unwrap()[0], 7);
        let empty = dev.capture(|| Ok::<_, GpuError>(())).unwrap();
        assert_eq!(empty.num_nodes(), 0);
        dev.replay(&empty).unwrap();
    }
}
