//! The copy stream in the host emulation: a queue of copies out of the staging chunks, run in
//! order when something waits for them (see the parent module).

use std::collections::VecDeque;

use crate::gpu::device::GpuError;
use crate::gpu::staging::HostStaging;

/// The emulated copy stream: a queue of copies run when something waits for them.
pub(super) struct Emulated {
    pub(super) queue: VecDeque<EmuOp>,
    /// The last event whose copies have landed.
    pub(super) completed: u64,
}

pub(super) enum EmuOp {
    Copy {
        chunk: usize,
        at: usize,
        len: usize,
        dst: u64,
    },
    /// `len` bytes from host address `src` (a pinned lease the stream holds until this has run).
    CopyFrom {
        src: usize,
        len: usize,
        dst: u64,
    },
    Record(u64),
}

impl Emulated {
    /// Queues a copy of `len` staged bytes of `chunk` from `at` to `dst`.
    pub(super) fn queue_copy(&mut self, chunk: usize, at: usize, len: usize, dst: u64) {
        self.queue.push_back(EmuOp::Copy {
            chunk,
            at,
            len,
            dst,
        });
    }

    /// Queues a copy of `len` bytes at host address `src` to `dst`.
    pub(super) fn queue_copy_from(&mut self, src: usize, len: usize, dst: u64) {
        self.queue.push_back(EmuOp::CopyFrom { src, len, dst });
    }

    /// Runs the queue in order through the record of `event`, copying out of `staging`.
    pub(super) fn run_until(
        &mut self,
        staging: &mut [HostStaging],
        event: u64,
    ) -> Result<(), GpuError> {
        while self.completed < event {
            match self.queue.pop_front() {
                Some(EmuOp::Copy {
                    chunk,
                    at,
                    len,
                    dst,
                }) => {
                    let src = &staging[chunk].bytes_mut()?[at..at + len];
                    // SAFETY: `write` checked `dst..dst + len` against a live emulated buffer,
                    // which its owner keeps until the copy completed (the `write` contract).
                    unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, len)
                    };
                }
                Some(EmuOp::CopyFrom { src, len, dst }) => {
                    // SAFETY: `src..src + len` lies in a pinned lease the stream holds until an
                    // event after this copy completed (`CopyStream::write_pinned`), and `dst` in
                    // a live buffer, as above.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src as *const u8,
                            dst as usize as *mut u8,
                            len,
                        )
                    };
                }
                Some(EmuOp::Record(id)) => self.completed = id,
                None => break,
            }
        }
        Ok(())
    }
}
