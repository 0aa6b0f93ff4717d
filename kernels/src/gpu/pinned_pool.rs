//! [`PinnedPool`]: page-locked host memory allocated once, at start, and leased out in pages, so
//! that what the host keeps for the device (adapter images) can be copied by DMA straight from
//! where it lies.
//!
//! Why a pool: allocating page-locked memory is one of CUDA's implicitly synchronising
//! operations (work queued before it must finish, work after it waits), and pinning ~80 MB takes
//! milliseconds; doing it per adapter while a batch runs would open a gap in the device's work
//! each time. So the memory is pinned before serving starts (in slabs of [`SLAB_PAGES`] pages)
//! and a lease ([`PinnedBytes`]) takes whole pages off a free list and gives them back when it
//! is dropped. Whoever queues a copy out of a lease keeps the lease alive until the copy has
//! completed ([`crate::gpu::copy_stream::CopyStream::write_pinned`] does), so a page is never
//! rewritten under a DMA.
//!
//! In emulation the pages are plain memory.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::device::{Device, GpuError};
use super::staging::HostStaging;

/// Pages per pinned allocation.
pub const SLAB_PAGES: usize = 32;

/// Page-locked host pages handed out as [`PinnedBytes`] leases (see the module docs). Cheap to
/// clone: clones share the pages.
#[derive(Clone)]
pub struct PinnedPool {
    pool: Arc<Pool>,
}

struct Pool {
    /// Where each page starts, inside `_slabs`.
    pages: Vec<NonNull<u8>>,
    page_bytes: usize,
    free: Mutex<Vec<u32>>,
    /// Leases refused for want of free pages.
    refused: AtomicU64,
    /// The allocations the pages lie in; freed last, after every lease (which holds the pool).
    _slabs: Vec<HostStaging>,
}

// SAFETY: the page pointers are only dereferenced through a lease, which owns its pages
// exclusively (a page index is on the free list or in exactly one lease); the slabs they point
// into live as long as the pool.
unsafe impl Send for Pool {}
// SAFETY: as for Send; shared access is the free list, behind its mutex.
unsafe impl Sync for Pool {}

impl std::fmt::Debug for PinnedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedPool({} pages of {} bytes, {} free)",
            self.num_pages(),
            self.page_bytes(),
            self.free_pages()
        )
    }
}

/// Two handles are equal when they share their pages.
impl PartialEq for PinnedPool {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.pool, &other.pool)
    }
}

impl Eq for PinnedPool {}

impl PinnedPool {
    /// At least `bytes` of page-locked memory on `dev`'s host (plain memory in emulation), in
    /// pages of `page_bytes` (rounded up to whole words).
    pub fn new(dev: &Device, bytes: usize, page_bytes: usize) -> Result<Self, GpuError> {
        if page_bytes == 0 {
            return Err(GpuError::Shape("pinned pool: pages of 0 bytes".into()));
        }
        let page_bytes = page_bytes.next_multiple_of(4);
        let num_pages = bytes.div_ceil(page_bytes);
        let num_pages_u32 = u32::try_from(num_pages)
            .map_err(|_| GpuError::Shape(format!("pinned pool: {num_pages} pages")))?;
        let mut slabs = Vec::new();
        let mut pages = Vec::with_capacity(num_pages);
        while pages.len() < num_pages {
            let n = SLAB_PAGES.min(num_pages - pages.len());
            let mut slab = dev.host_staging(n * page_bytes / 4)?;
            let base = slab.bytes_mut()?.as_mut_ptr();
            for i in 0..n {
                // SAFETY: page i of n lies inside the slab's n * page_bytes bytes.
                let page = unsafe { base.add(i * page_bytes) };
                pages.push(NonNull::new(page).ok_or_else(|| {
                    GpuError::Driver("pinned pool: a null host allocation".into())
                })?);
            }
            slabs.push(slab);
        }
        Ok(PinnedPool {
            pool: Arc::new(Pool {
                pages,
                page_bytes,
                free: Mutex::new((0..num_pages_u32).rev().collect()),
                refused: AtomicU64::new(0),
                _slabs: slabs,
            }),
        })
    }

    pub fn page_bytes(&self) -> usize {
        self.pool.page_bytes
    }

    pub fn num_pages(&self) -> usize {
        self.pool.pages.len()
    }

    /// Bytes of host memory the pool holds.
    pub fn nbytes(&self) -> usize {
        self.num_pages() * self.page_bytes()
    }

    /// Pages not leased.
    pub fn free_pages(&self) -> usize {
        self.pool.free_list().len()
    }

    /// Leases refused so far for want of free pages.
    pub fn refused(&self) -> u64 {
        self.pool.refused.load(Ordering::Relaxed)
    }

    /// A lease of enough pages for `bytes`, or `None` (counted) when too few are free.
    pub fn lease(&self, bytes: usize) -> Option<PinnedBytes> {
        let want = bytes.div_ceil(self.page_bytes());
        let mut free = self.pool.free_list();
        if free.len() < want {
            drop(free);
            self.pool.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let at = free.len() - want;
        let pages = free.split_off(at);
        drop(free);
        Some(PinnedBytes {
            pool: self.pool.clone(),
            pages,
            len: 0,
        })
    }
}

impl Pool {
    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // A panic while holding the lock cannot leave the list inconsistent (each operation
        // is one push, extend or split), so a poisoned lock is still usable.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A run of bytes appended to a [`PinnedBytes`], by its position in the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

/// Pages of a [`PinnedPool`], filled in order by [`Self::append`]; they go back to the pool when
/// this is dropped.
pub struct PinnedBytes {
    pool: Arc<Pool>,
    pages: Vec<u32>,
    /// Bytes appended so far.
    len: usize,
}

impl std::fmt::Debug for PinnedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedBytes({} of {} bytes)", self.len, self.capacity())
    }
}

impl PinnedBytes {
    /// Bytes the lease holds (whole pages).
    pub fn capacity(&self) -> usize {
        self.pages.len() * self.pool.page_bytes
    }

    /// Bytes appended so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` in after what was appended before; `None` when it does not fit.
    pub fn append(&mut self, data: &[u8]) -> Option<Span> {
        let span = Span {
            start: self.len,
            len: data.len(),
        };
        let end = span.start + span.len;
        if end > self.capacity() {
            return None;
        }
        let mut rest = data;
        for (page, off, n) in page_runs(self.pool.page_bytes, span.start, end) {
            let (head, tail) = rest.split_at(n);
            // SAFETY: this lease owns page `page` exclusively (taken off the free list, given
            // back only on drop), and `off + n` stays within it; `&mut self` rules out a
            // concurrent reader through this lease.
            let dst = unsafe { self.page_ptr(page).add(off) };
            unsafe { std::ptr::copy_nonoverlapping(head.as_ptr(), dst, n) };
            rest = tail;
        }
        self.len = end;
        Some(span)
    }

    /// The pieces of `span`, one per page it touches, in order (what a copy reads: one DMA
    /// each). Spans past what was appended give no pieces past it.
    pub fn pieces(&self, span: Span) -> impl Iterator<Item = &[u8]> + '_ {
        let end = (span.start + span.len).min(self.len);
        let start = span.start.min(end);
        page_runs(self.pool.page_bytes, start, end).map(move |(page, off, n)| {
            // SAFETY: inside this lease's page `page`, appended (initialised) bytes only; the
            // borrow of `self` keeps the lease, so the page, alive and unwritten (`append`
            // needs `&mut self`).
            unsafe { std::slice::from_raw_parts(self.page_ptr(page).add(off), n) }
        })
    }

    /// The bytes of `span` gathered into one vector.
    pub fn read(&self, span: Span) -> Vec<u8> {
        self.pieces(span).flatten().copied().collect()
    }

    fn page_ptr(&self, page: usize) -> *mut u8 {
        self.pool.pages[self.pages[page] as usize].as_ptr()
    }
}

/// The bytes `start..end` of a lease as (page, offset in it, length) runs, one per page.
fn page_runs(
    page_bytes: usize,
    start: usize,
    end: usize,
) -> impl Iterator<Item = (usize, usize, usize)> {
    let mut at = start;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let (page, off) = (at / page_bytes, at % page_bytes);
            let n = (end - at).min(page_bytes - off);
            at += n;
            (page, off, n)
        })
    })
}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        self.pool.free_list().append(&mut self.pages);
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;

    #[test]
    fn leases_take_whole_pages_and_give_them_back_when_dropped() {
        let pool = PinnedPool::new(&Device::emulated(), 100, 16).unwrap();
        assert_eq!(
            (pool.num_pages(), pool.page_bytes(), pool.nbytes()),
            (7, 16, 112)
        );
        let a = pool.lease(33).unwrap();
        assert_eq!((a.capacity(), pool.free_pages()), (48, 4));
        assert!(pool.lease(65).is_none(), "only 4 pages are free");
        assert_eq!(pool.refused(), 1);
        let b = pool.lease(64).unwrap();
        assert_eq!(pool.free_pages(), 0);
        drop(a);
        assert_eq!(pool.free_pages(), 3);
        drop(b);
        assert_eq!(pool.free_pages(), 7);
        assert_eq!(pool.lease(0).unwrap().capacity(), 0);
    }

    #[test]
    fn appended_bytes_read_back_across_pages_and_a_reused_page_holds_its_new_lease() {
        let pool = PinnedPool::new(&Device::emulated(), 64, 8).unwrap();
        let data: Vec<u8> = (0..40u8).collect();
        let mut l = pool.lease(40).unwrap();
        let first = l.append(&data[..3]).unwrap();
        let second = l.append(&data[3..]).unwrap();
        assert_eq!(
            (first, second),
            (Span { start: 0, len: 3 }, Span { start: 3, len: 37 })
        );
        assert!(l.append(&[1]).is_none(), "the lease is full");
        assert_eq!(l.read(first), &data[..3]);
        assert_eq!(l.read(second), &data[3..]);
        // One piece per page touched: bytes 3..8, then four whole pages of 8.
        let lens: Vec<usize> = l.pieces(second).map(<[u8]>::len).collect();
        assert_eq!(lens, [5, 8, 8, 8, 8]);
        drop(l);
        let mut again = pool.lease(64).unwrap();
        let s = again.append(&[7; 64]).unwrap();
        assert!(again.read(s).iter().all(|&b| b == 7));
    }

    #[test]
    fn handles_are_equal_when_they_share_pages() {
        let dev = Device::emulated();
        let p = PinnedPool::new(&dev, 8, 8).unwrap();
        assert_eq!(p, p.clone());
        assert_ne!(p, PinnedPool::new(&dev, 8, 8).unwrap());
        assert!(PinnedPool::new(&dev, 8, 0).is_err());
    }
}
