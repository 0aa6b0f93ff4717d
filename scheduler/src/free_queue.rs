//! The free list of the block pool: an intrusive doubly-linked LRU queue of block indices
//! (vLLM's `FreeKVCacheBlockQueue`). Freed blocks join the tail and allocation takes the head, so
//! the least recently freed block is evicted first; a prefix-cache hit on a free block unlinks it
//! from the middle in O(1). Links are plain `u32` indices in two vectors: no per-node allocation,
//! no `Rc<RefCell<_>>`. [`SegmentedFreeList`] puts two of them together so reused prefixes
//! outlive one-off blocks.

use crate::ids::BlockId;

/// "No neighbour" marker; block ids stay below it (the config caps `num_blocks`).
const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
pub struct FreeBlockQueue {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeBlockQueue {
    /// An empty queue able to hold blocks `0..num_blocks`.
    pub fn new(num_blocks: usize) -> Self {
        FreeBlockQueue {
            prev: vec![NIL; num_blocks],
            next: vec![NIL; num_blocks],
            linked: vec![false; num_blocks],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, block: BlockId) -> bool {
        self.linked.get(block.index()).copied().unwrap_or(false)
    }

    /// Appends `block` at the tail (most recently freed). Returns false if it is already queued.
    pub fn push_back(&mut self, block: BlockId) -> bool {
        if self.contains(block) || block.index() >= self.linked.len() {
            return false;
        }
        let b = block.0;
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.linked[b as usize] = true;
        self.len += 1;
        true
    }

    /// Takes the head (least recently freed) block.
    pub fn pop_front(&mut self) -> Option<BlockId> {
        if self.head == NIL {
            return None;
        }
        let block = BlockId(self.head);
        self.remove(block);
        Some(block)
    }

    /// Unlinks `block` wherever it is in O(1). Returns false if it was not queued.
    pub fn remove(&mut self, block: BlockId) -> bool {
        if !self.contains(block) {
            return false;
        }
        let b = block.index();
        let (prev, next) = (self.prev[b], self.next[b]);
        if prev == NIL {
            self.head = next;
        } else {
            self.next[prev as usize] = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.prev[next as usize] = prev;
        }
        self.prev[b] = NIL;
        self.next[b] = NIL;
        self.linked[b] = false;
        self.len -= 1;
        true
    }

    /// Blocks from head (next to be evicted) to tail.
    pub fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cursor = self.head;
        std::iter::from_fn(move || {
            if cursor == NIL {
                return None;
            }
            let block = BlockId(cursor);
            cursor = self.next[cursor as usize];
            Some(block)
        })
    }
}

/// Which half of a [`SegmentedFreeList`] a free block waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    /// Blocks nobody reused since they were allocated: evicted first.
    Probation,
    /// Blocks whose cached content was reused (a prefix-cache hit): evicted last.
    Protected,
}

/// The pool's free list in two LRU segments (segmented LRU): allocation evicts the head of
/// probation first and takes from protected only when probation is empty. Which segment a block
/// joins, and how large protected may grow, is the pool's policy (`BlockPool`); this is the
/// data structure, O(1) everywhere.
#[derive(Clone, Debug)]
pub struct SegmentedFreeList {
    probation: FreeBlockQueue,
    protected: FreeBlockQueue,
}

impl SegmentedFreeList {
    /// An empty list for blocks `0..num_blocks`.
    pub fn new(num_blocks: usize) -> Self {
        SegmentedFreeList {
            probation: FreeBlockQueue::new(num_blocks),
            protected: FreeBlockQueue::new(num_blocks),
        }
    }

    pub fn len(&self) -> usize {
        self.probation.len() + self.protected.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks waiting in `segment`.
    pub fn len_of(&self, segment: Segment) -> usize {
        self.queue(segment).len()
    }

    /// The segment `block` waits in, if it is free.
    pub fn segment_of(&self, block: BlockId) -> Option<Segment> {
        if self.probation.contains(block) {
            Some(Segment::Probation)
        } else if self.protected.contains(block) {
            Some(Segment::Protected)
        } else {
            None
        }
    }

    /// Appends `block` at the tail of `segment`. Returns false if it is already queued.
    pub fn push_back(&mut self, block: BlockId, segment: Segment) -> bool {
        if self.segment_of(block).is_some() {
            return false;
        }
        match segment {
            Segment::Probation => self.probation.push_back(block),
            Segment::Protected => self.protected.push_back(block),
        }
    }

    /// Takes the next block to evict, and the segment it came from: the head of probation, else
    /// the head of protected.
    pub fn pop_front(&mut self) -> Option<(BlockId, Segment)> {
        match self.probation.pop_front() {
            Some(block) => Some((block, Segment::Probation)),
            None => self
                .protected
                .pop_front()
                .map(|block| (block, Segment::Protected)),
        }
    }

    /// Moves the least recently freed protected block to the probation tail (the youngest of
    /// the ordinary blocks) and returns it.
    pub fn demote_oldest(&mut self) -> Option<BlockId> {
        let block = self.protected.pop_front()?;
        self.probation.push_back(block);
        Some(block)
    }

    /// Unlinks `block` from whichever segment holds it, in O(1), and says which.
    pub fn remove(&mut self, block: BlockId) -> Option<Segment> {
        let segment = self.segment_of(block)?;
        match segment {
            Segment::Probation => self.probation.remove(block),
            Segment::Protected => self.protected.remove(block),
        };
        Some(segment)
    }

    /// Blocks in eviction order: probation head to tail, then protected head to tail.
    pub fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.probation.iter().chain(self.protected.iter())
    }

    fn queue(&self, segment: Segment) -> &FreeBlockQueue {
        match segment {
            Segment::Probation => &self.probation,
            Segment::Protected => &self.protected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn ids(q: &FreeBlockQueue) -> Vec<u32> {
        q.iter().map(|b| b.0).collect()
    }

    #[test]
    fn fifo_order_and_middle_removal() {
        let mut q = FreeBlockQueue::new(8);
        for b in [3, 1, 4, 5, 2] {
            assert!(q.push_back(BlockId(b)));
        }
        assert!(!q.push_back(BlockId(4)), "already queued");
        assert!(!q.push_back(BlockId(8)), "out of range");
        assert_eq!(ids(&q), [3, 1, 4, 5, 2]);
        assert!(q.remove(BlockId(4)));
        assert!(!q.remove(BlockId(4)));
        assert!(q.remove(BlockId(2))); // tail
        assert!(q.remove(BlockId(3))); // head
        assert_eq!(ids(&q), [1, 5]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop_front(), Some(BlockId(1)));
        assert!(q.push_back(BlockId(3)));
        assert_eq!(ids(&q), [5, 3]);
        assert_eq!(q.pop_front(), Some(BlockId(5)));
        assert_eq!(q.pop_front(), Some(BlockId(3)));
        assert_eq!(q.pop_front(), None);
        assert!(q.is_empty());
    }

    #[test]
    fn matches_a_vecdeque_model_under_random_operations() {
        let n = 32u32;
        let mut q = FreeBlockQueue::new(n as usize);
        let mut model: VecDeque<u32> = VecDeque::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5_000 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let block = ((state >> 33) % u64::from(n)) as u32;
            match (state >> 60) % 3 {
                0 => {
                    let fresh = !model.contains(&block);
                    assert_eq!(q.push_back(BlockId(block)), fresh);
                    if fresh {
                        model.push_back(block);
                    }
                }
                1 => {
                    let pos = model.iter().position(|&b| b == block);
                    assert_eq!(q.remove(BlockId(block)), pos.is_some());
                    if let Some(pos) = pos {
                        model.remove(pos);
                    }
                }
                _ => assert_eq!(q.pop_front().map(|b| b.0), model.pop_front()),
            }
            assert_eq!(q.len(), model.len());
        }
        assert_eq!(ids(&q), Vec::from(model));
    }

    #[test]
    fn probation_is_evicted_before_protected_and_demotion_joins_its_tail() {
        use Segment::{Probation, Protected};
        let mut q = SegmentedFreeList::new(8);
        assert!(q.push_back(BlockId(1), Protected));
        assert!(q.push_back(BlockId(2), Probation));
        assert!(q.push_back(BlockId(3), Protected));
        assert!(!q.push_back(BlockId(3), Probation), "already queued");
        assert!(q.push_back(BlockId(4), Probation));
        let order = |q: &SegmentedFreeList| q.iter().map(|b| b.0).collect::<Vec<_>>();
        assert_eq!(order(&q), [2, 4, 1, 3]);
        assert_eq!((q.len_of(Probation), q.len_of(Protected)), (2, 2));
        assert_eq!(q.demote_oldest(), Some(BlockId(1)));
        assert_eq!(order(&q), [2, 4, 1, 3]);
        assert_eq!(q.segment_of(BlockId(1)), Some(Probation));
        assert_eq!(q.remove(BlockId(4)), Some(Probation));
        assert_eq!(q.remove(BlockId(3)), Some(Protected));
        assert_eq!(q.remove(BlockId(3)), None);
        assert!(q.push_back(BlockId(5), Protected));
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop_front(), Some((BlockId(2), Probation)));
        assert_eq!(q.pop_front(), Some((BlockId(1), Probation)));
        assert_eq!(q.pop_front(), Some((BlockId(5), Protected)));
        assert_eq!(q.pop_front(), None);
        assert_eq!(q.demote_oldest(), None);
        assert!(q.is_empty());
    }
}
