//! The free list of the block pool: an intrusive doubly-linked LRU queue of block indices
//! (vLLM's `FreeKVCacheBlockQueue`). Freed blocks join the tail and allocation takes the head, so
//! the least recently freed block is evicted first; a prefix-cache hit on a free block unlinks it
//! from the middle in O(1). Links are plain `u32` indices in two vectors: no per-node allocation,
//! no `Rc<RefCell<_>>`.

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
}
