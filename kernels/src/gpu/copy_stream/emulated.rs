//! The copy stream in the host emulation: staging chunks in ordinary host memory and a queue
//! of copies run in order when something waits for them (see the parent module).

use std::collections::VecDeque;

/// The emulated copy stream: staging chunks in ordinary host memory and a queue of copies run
/// when something waits for them.
pub(super) struct Emulated {
    pub(super) staging: Vec<Vec<u8>>,
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
    Record(u64),
}

impl Emulated {
    pub(super) fn stage(&mut self, chunk: usize, at: usize, piece: &[u8], dst: u64) {
        self.staging[chunk][at..at + piece.len()].copy_from_slice(piece);
        self.queue.push_back(EmuOp::Copy {
            chunk,
            at,
            len: piece.len(),
            dst,
        });
    }

    /// Runs the queue in order through the record of `event`.
    pub(super) fn run_until(&mut self, event: u64) {
        while self.completed < event {
            match self.queue.pop_front() {
                Some(EmuOp::Copy {
                    chunk,
                    at,
                    len,
                    dst,
                }) => {
                    let src = &self.staging[chunk][at..at + len];
                    // SAFETY: `write` checked `dst..dst + len` against a live emulated buffer,
                    // which its owner keeps until the copy completed (the `write` contract).
                    unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst as usize as *mut u8, len)
                    };
                }
                Some(EmuOp::Record(id)) => self.completed = id,
                None => break,
            }
        }
    }
}
