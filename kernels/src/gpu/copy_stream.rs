//! [`CopyStream`]: host → device copies on a stream of their own, so loading an adapter into a
//! device slot never makes the batch running on the compute stream wait for it (issue 17); the
//! host waits only while the staging ring is full.
//!
//! Host data is first copied into a bounded ring of pinned (page-locked) staging chunks, so the
//! device copy is truly asynchronous and the caller's memory may be freed at once; a chunk is
//! reused only after the event recorded behind its copies has completed. The compute stream
//! orders itself after a copy with [`CopyStream::compute_waits`] (`cuStreamWaitEvent`, no host
//! wait), and [`CopyStream::after_compute`] orders the next copies after the work launched so
//! far (the previous reader of a slot).
//!
//! In the host emulation the copy stream is a queue run lazily: a copy lands in device memory
//! only when the compute stream waits for its event, a chunk is reused, or [`Self::synchronize`]
//! runs. So a missing wait leaves stale data that a test sees, as a race would on a GPU; and an
//! optional [`StreamOp`] log records every copy, record and wait in order.
//!
//! The CUDA path (`cudarc` 0.19: a non-blocking `CudaStream`, `CudaEvent`, `cuMemHostAlloc`) runs
//! under `scripts/gpu-check` on a GPU; CI tests the emulation.

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda-emu")]
mod emulated;

#[cfg(feature = "cuda-emu")]
use emulated::{EmuOp, Emulated};

use std::sync::Arc;

use super::device::{as_bytes, Device, DeviceBuffer, DeviceElem, GpuError};
use super::pinned_pool::{PinnedBytes, Span};
use super::staging::HostStaging;

/// Which stream an operation went on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// Where every kernel launch goes.
    Compute,
    /// Adapter copies.
    Copy,
}

/// An event recorded on the copy stream: every copy queued before it.
#[derive(Clone)]
pub struct CopyEvent {
    id: u64,
    #[cfg(feature = "cuda")]
    cuda: Option<std::sync::Arc<cudarc::driver::CudaEvent>>,
}

impl CopyEvent {
    /// Events of one stream are numbered from 1 in recording order.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl std::fmt::Debug for CopyEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CopyEvent({})", self.id)
    }
}

/// One operation of a [`CopyStream`], in the order issued (the op log for tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamOp {
    /// `bytes` copied host → device through the staging ring.
    Copy { stream: StreamKind, bytes: usize },
    /// `bytes` copied host → device straight from a pinned lease ([`CopyStream::write_pinned`]).
    CopyPinned { stream: StreamKind, bytes: usize },
    /// `event` recorded on `stream`.
    Record { stream: StreamKind, event: u64 },
    /// `stream` waits (on the device) for the copy-stream `event`.
    Wait { stream: StreamKind, event: u64 },
    /// The copy stream waits for everything launched on the compute stream so far.
    WaitCompute { stream: StreamKind },
}

/// One staging chunk: bytes used since it was last emptied, whether copies from it are not yet
/// covered by an event, and the last event that covers them.
struct Chunk {
    fill: usize,
    dirty: bool,
    event: Option<CopyEvent>,
}

/// A pinned lease that queued copies read, and the event recorded behind them (`None`: not
/// recorded yet).
struct Held {
    bytes: Arc<PinnedBytes>,
    event: Option<CopyEvent>,
}

/// Adapter copies on their own stream through a pinned staging ring (see the module docs).
pub struct CopyStream {
    /// Declared before `staging` and `held`, so dropping it (which waits for queued copies on a
    /// GPU) happens before the memory they read is freed or handed out again.
    imp: Imp,
    /// Leases [`Self::write_pinned`] copies out of, kept until their copies have completed.
    held: Vec<Held>,
    /// The ring's chunks, `chunk_bytes` each (rounded up to whole words).
    staging: Vec<HostStaging>,
    chunk_bytes: usize,
    chunks: Vec<Chunk>,
    current: usize,
    next_event: u64,
    log: Option<Vec<StreamOp>>,
}

enum Imp {
    #[cfg(feature = "cuda-emu")]
    Emulated(Emulated),
    #[cfg(feature = "cuda")]
    Cuda(cuda::Copies),
}

impl CopyStream {
    /// A copy stream on `dev` with `num_chunks` pinned staging chunks of `chunk_bytes` each (the
    /// host memory it pins: [`Self::staging_bytes`]).
    pub fn new(dev: &Device, num_chunks: usize, chunk_bytes: usize) -> Result<Self, GpuError> {
        if num_chunks < 2 || chunk_bytes == 0 {
            return Err(GpuError::Shape(format!(
                "copy stream: {num_chunks} staging chunks of {chunk_bytes} bytes (need 2+ of 1+)"
            )));
        }
        let imp = match dev {
            #[cfg(feature = "cuda-emu")]
            Device::Emulated(_) => Imp::Emulated(Emulated {
                queue: std::collections::VecDeque::new(),
                completed: 0,
            }),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Imp::Cuda(cuda::Copies::new(d)?),
        };
        let staging = (0..num_chunks)
            .map(|_| dev.host_staging(chunk_bytes.div_ceil(4)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CopyStream {
            imp,
            held: Vec::new(),
            staging,
            chunk_bytes,
            chunks: (0..num_chunks)
                .map(|_| Chunk {
                    fill: 0,
                    dirty: false,
                    event: None,
                })
                .collect(),
            current: 0,
            next_event: 1,
            log: None,
        })
    }

    /// Keeps a log of every operation from now on ([`Self::ops`]); for tests.
    pub fn record_ops(&mut self) {
        self.log.get_or_insert_with(Vec::new);
    }

    /// The operations logged since [`Self::record_ops`].
    pub fn ops(&self) -> &[StreamOp] {
        self.log.as_deref().unwrap_or(&[])
    }

    /// Pinned host memory held for staging.
    pub fn staging_bytes(&self) -> usize {
        self.chunk_bytes * self.chunks.len()
    }

    fn note(&mut self, op: StreamOp) {
        if let Some(log) = &mut self.log {
            log.push(op);
        }
    }

    /// Queues a copy of `host` into `buf` at byte `offset` on the copy stream. `host` is staged
    /// before this returns; `buf` must stay alive until the copy completed (an event recorded
    /// after it completed, or [`Self::synchronize`]), and its allocation (compute-stream work)
    /// must be ordered before the copy ([`Self::after_compute`] since it was allocated). Blocks
    /// the host while the staging ring is full, until the copy stream frees a chunk, and so also
    /// for compute work the copy stream was ordered after.
    pub fn write<T: DeviceElem>(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        host: &[T],
    ) -> Result<(), GpuError> {
        let bytes = as_bytes(host);
        buf.check_range(offset, bytes.len())?;
        let mut dst = buf.ptr_at(offset)?;
        for piece in bytes.chunks(self.chunk_bytes) {
            if self.chunks[self.current].fill + piece.len() > self.chunk_bytes {
                self.advance()?;
            }
            let (index, at) = (self.current, self.chunks[self.current].fill);
            let staged = &mut self.staging[index].bytes_mut()?[at..at + piece.len()];
            staged.copy_from_slice(piece);
            match &mut self.imp {
                #[cfg(feature = "cuda-emu")]
                Imp::Emulated(e) => e.queue_copy(index, at, piece.len(), dst),
                // SAFETY: `buf` was checked to hold the copy and its owner keeps it until the
                // copy completed (this method's contract); the staged bytes are not rewritten
                // before the event recorded behind this copy completed (`Self::advance`), and
                // dropping `imp` waits for the copy before the chunk is freed.
                #[cfg(feature = "cuda")]
                Imp::Cuda(c) => unsafe { c.copy(staged, dst) }?,
            }
            let chunk = &mut self.chunks[index];
            chunk.fill += piece.len();
            chunk.dirty = true;
            dst += piece.len() as u64;
        }
        self.note(StreamOp::Copy {
            stream: StreamKind::Copy,
            bytes: bytes.len(),
        });
        Ok(())
    }

    /// Queues a copy of `span` of the pinned lease `src` into `buf` at byte `offset`, straight
    /// from where it lies (one DMA per page it touches; no staging, so the host copies nothing
    /// and never waits). The stream keeps `src` until an event recorded after the copy has
    /// completed, so its pages are not handed out again under the DMA; `buf` must stay alive as
    /// long, and its allocation be ordered before the copy (as for [`Self::write`]).
    pub fn write_pinned(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        src: &Arc<PinnedBytes>,
        span: Span,
    ) -> Result<(), GpuError> {
        check_span(src, span)?;
        buf.check_range(offset, span.len)?;
        let mut dst = buf.ptr_at(offset)?;
        for piece in src.pieces(span) {
            match &mut self.imp {
                #[cfg(feature = "cuda-emu")]
                Imp::Emulated(e) => e.queue_copy_from(piece.as_ptr() as usize, piece.len(), dst),
                // SAFETY: `piece` is page-locked (a pool page) and `self.held` keeps its lease,
                // so the page stays allocated and unleased (unwritten), until an event recorded
                // after this copy has completed; `buf` holds the copy (checked above) and its
                // owner keeps it that long (this method's contract).
                #[cfg(feature = "cuda")]
                Imp::Cuda(c) => unsafe { c.copy(piece, dst) }?,
            }
            dst += piece.len() as u64;
        }
        let same =
            matches!(self.held.last(), Some(h) if h.event.is_none() && Arc::ptr_eq(&h.bytes, src));
        if !same {
            self.held.push(Held {
                bytes: src.clone(),
                event: None,
            });
        }
        self.note(StreamOp::CopyPinned {
            stream: StreamKind::Copy,
            bytes: span.len,
        });
        Ok(())
    }

    /// Pinned leases the stream still holds for copies not known to have completed.
    pub fn held_leases(&self) -> usize {
        self.held.len()
    }

    /// Lets go of the leases whose copies have completed (their pages go back to their pool
    /// unless someone else still holds them): one event query per lease held, so call it once
    /// per fill or step, not per copy.
    pub fn release_completed(&mut self) -> Result<(), GpuError> {
        let mut done = Vec::with_capacity(self.held.len());
        for h in &self.held {
            done.push(match &h.event {
                Some(e) => self.is_complete(e)?,
                None => false,
            });
        }
        let mut done = done.into_iter();
        self.held.retain(|_| !done.next().unwrap_or(false));
        Ok(())
    }

    /// Records an event after every copy queued so far.
    pub fn record(&mut self) -> Result<CopyEvent, GpuError> {
        let id = self.next_event;
        self.next_event += 1;
        let event = match &mut self.imp {
            #[cfg(feature = "cuda-emu")]
            Imp::Emulated(e) => {
                e.queue.push_back(EmuOp::Record(id));
                CopyEvent {
                    id,
                    #[cfg(feature = "cuda")]
                    cuda: None,
                }
            }
            #[cfg(feature = "cuda")]
            Imp::Cuda(c) => CopyEvent {
                id,
                cuda: Some(c.record()?),
            },
        };
        for chunk in self.chunks.iter_mut().filter(|c| c.dirty) {
            chunk.dirty = false;
            chunk.event = Some(event.clone());
        }
        for h in self.held.iter_mut().filter(|h| h.event.is_none()) {
            h.event = Some(event.clone());
        }
        self.note(StreamOp::Record {
            stream: StreamKind::Copy,
            event: id,
        });
        Ok(event)
    }

    /// Makes the compute stream of `dev` wait for `event` before its next launch (on the device:
    /// the host does not wait).
    pub fn compute_waits(&mut self, dev: &Device, event: &CopyEvent) -> Result<(), GpuError> {
        match (&mut self.imp, dev) {
            #[cfg(feature = "cuda-emu")]
            (Imp::Emulated(e), Device::Emulated(_)) => e.run_until(&mut self.staging, event.id)?,
            #[cfg(feature = "cuda")]
            (Imp::Cuda(_), Device::Cuda(d)) => cuda::compute_waits(d, event)?,
            #[allow(unreachable_patterns)]
            _ => return Err(other_device()),
        }
        self.note(StreamOp::Wait {
            stream: StreamKind::Compute,
            event: event.id,
        });
        Ok(())
    }

    /// Orders the next copies after every launch on `dev`'s compute stream so far, so a slot
    /// the last step read is not overwritten under it.
    pub fn after_compute(&mut self, dev: &Device) -> Result<(), GpuError> {
        match (&mut self.imp, dev) {
            // Emulated launches finish before they return.
            #[cfg(feature = "cuda-emu")]
            (Imp::Emulated(_), Device::Emulated(_)) => {}
            #[cfg(feature = "cuda")]
            (Imp::Cuda(c), Device::Cuda(d)) => c.after_compute(d)?,
            #[allow(unreachable_patterns)]
            _ => return Err(other_device()),
        }
        self.note(StreamOp::WaitCompute {
            stream: StreamKind::Copy,
        });
        Ok(())
    }

    /// Whether every copy before `event` has landed.
    pub fn is_complete(&self, event: &CopyEvent) -> Result<bool, GpuError> {
        match &self.imp {
            #[cfg(feature = "cuda-emu")]
            Imp::Emulated(e) => Ok(e.completed >= event.id),
            #[cfg(feature = "cuda")]
            Imp::Cuda(_) => cuda::is_complete(event),
        }
    }

    /// Waits on the host until every queued copy has landed.
    pub fn synchronize(&mut self) -> Result<(), GpuError> {
        match &mut self.imp {
            #[cfg(feature = "cuda-emu")]
            Imp::Emulated(e) => e.run_until(&mut self.staging, u64::MAX)?,
            #[cfg(feature = "cuda")]
            Imp::Cuda(c) => c.synchronize()?,
        }
        self.release_completed()
    }

    /// Closes the current chunk (an event behind its copies) and moves to the next, waiting on
    /// the host for the copies that last used it.
    fn advance(&mut self) -> Result<(), GpuError> {
        if self.chunks[self.current].dirty {
            self.record()?;
        }
        self.current = (self.current + 1) % self.chunks.len();
        if let Some(event) = self.chunks[self.current].event.take() {
            match &mut self.imp {
                #[cfg(feature = "cuda-emu")]
                Imp::Emulated(e) => e.run_until(&mut self.staging, event.id)?,
                #[cfg(feature = "cuda")]
                Imp::Cuda(_) => cuda::host_waits(&event)?,
            }
        }
        self.chunks[self.current].fill = 0;
        Ok(())
    }
}

/// `span` must lie in what `src` holds.
fn check_span(src: &PinnedBytes, span: Span) -> Result<(), GpuError> {
    if span.start + span.len > src.len() {
        return Err(GpuError::Shape(format!(
            "{span:?} of a pinned lease holding {} bytes",
            src.len()
        )));
    }
    Ok(())
}

fn other_device() -> GpuError {
    GpuError::Shape("copy stream used with another device".into())
}

/// Where host data goes to the device: [`Device`] writes on the compute stream and waits (a
/// plain, synchronous upload); [`CopyStream`] queues it on the copy stream.
pub trait Upload {
    fn upload<T: DeviceElem>(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        host: &[T],
    ) -> Result<(), GpuError>;

    /// The same for `span` of a pinned lease (see [`CopyStream::write_pinned`]).
    fn upload_pinned(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        src: &Arc<PinnedBytes>,
        span: Span,
    ) -> Result<(), GpuError>;
}

impl Upload for &Device {
    fn upload<T: DeviceElem>(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        host: &[T],
    ) -> Result<(), GpuError> {
        self.write(buf, offset, host)
    }

    /// Gathers the span and writes it (a plain, synchronous upload: tools and tests; the
    /// engine's slot fills go through the copy stream).
    fn upload_pinned(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        src: &Arc<PinnedBytes>,
        span: Span,
    ) -> Result<(), GpuError> {
        check_span(src, span)?;
        self.write(buf, offset, &src.read(span))
    }
}

impl Upload for CopyStream {
    fn upload<T: DeviceElem>(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        host: &[T],
    ) -> Result<(), GpuError> {
        self.write(buf, offset, host)
    }

    fn upload_pinned(
        &mut self,
        buf: &DeviceBuffer,
        offset: usize,
        src: &Arc<PinnedBytes>,
        span: Span,
    ) -> Result<(), GpuError> {
        self.write_pinned(buf, offset, src, span)
    }
}
