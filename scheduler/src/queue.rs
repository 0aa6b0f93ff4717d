//! Orderings of the scheduler: the waiting queue (preempted requests in front, then everyone
//! else by priority and arrival) and the count of adapters among running requests.

use crate::ids::{AdapterKey, RequestId};
use std::collections::{BTreeSet, VecDeque};

/// Service order: lower priority value first, then earlier arrival; the id breaks exact ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct QueueKey {
    pub priority: i32,
    pub arrival_seq: u64,
    pub id: RequestId,
}

/// Requests without blocks. Preempted requests go to the front (they already spent compute and
/// their cached blocks are the likeliest to be evicted if they wait), in front of everything that
/// never ran; those are served in `QueueKey` order.
#[derive(Clone, Debug, Default)]
pub(crate) struct WaitingQueue {
    front: VecDeque<QueueKey>,
    queue: BTreeSet<QueueKey>,
}

impl WaitingQueue {
    pub fn len(&self) -> usize {
        self.front.len() + self.queue.len()
    }

    pub fn push(&mut self, key: QueueKey) {
        self.queue.insert(key);
    }

    pub fn push_front(&mut self, key: QueueKey) {
        self.front.push_front(key);
    }

    /// Moves everything in `other` here, each part keeping its place (front or ordered).
    pub fn append(&mut self, other: WaitingQueue) {
        for key in other.front.into_iter().rev() {
            self.front.push_front(key);
        }
        self.queue.extend(other.queue);
    }

    /// Removes `key` wherever it is; false if absent.
    pub fn remove(&mut self, key: &QueueKey) -> bool {
        if self.queue.remove(key) {
            return true;
        }
        match self.front.iter().position(|k| k == key) {
            Some(pos) => self.front.remove(pos).is_some(),
            None => false,
        }
    }

    /// Removes several keys at once (the ones admitted in one step).
    pub fn remove_all(&mut self, keys: &[QueueKey]) {
        if keys.is_empty() {
            return;
        }
        if !self.front.is_empty() {
            self.front.retain(|k| !keys.contains(k));
        }
        for key in keys {
            self.queue.remove(key);
        }
    }

    /// Service order.
    pub fn iter(&self) -> impl Iterator<Item = QueueKey> + '_ {
        self.front.iter().chain(self.queue.iter()).copied()
    }
}

/// Merges `admitted` into the sorted `running` in O(n + k log k) without allocating (admissions
/// are few; running may be thousands).
pub(crate) fn merge_sorted(running: &mut Vec<QueueKey>, admitted: &mut [QueueKey]) {
    let Some(&filler) = admitted.first() else {
        return;
    };
    admitted.sort_unstable();
    let (mut i, mut j) = (running.len(), admitted.len());
    running.resize(i + j, filler);
    let mut k = running.len();
    while j > 0 {
        k -= 1;
        if i > 0 && running[i - 1] > admitted[j - 1] {
            running[k] = running[i - 1];
            i -= 1;
        } else {
            running[k] = admitted[j - 1];
            j -= 1;
        }
    }
}

/// How many running requests use each adapter; its length is the number of distinct adapters
/// a step may see. A short vector: `max_loras` is small.
#[derive(Clone, Debug, Default)]
pub(crate) struct AdapterCounts(Vec<(AdapterKey, usize)>);

impl AdapterCounts {
    pub fn num_distinct(&self) -> usize {
        self.0.len()
    }

    pub fn contains(&self, adapter: AdapterKey) -> bool {
        self.0.iter().any(|(a, _)| *a == adapter)
    }

    pub fn add(&mut self, adapter: AdapterKey) {
        match self.0.iter_mut().find(|(a, _)| *a == adapter) {
            Some((_, n)) => *n += 1,
            None => self.0.push((adapter, 1)),
        }
    }

    pub fn remove(&mut self, adapter: AdapterKey) {
        if let Some(pos) = self.0.iter().position(|(a, _)| *a == adapter) {
            self.0[pos].1 -= 1;
            if self.0[pos].1 == 0 {
                self.0.swap_remove(pos);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(priority: i32, arrival_seq: u64) -> QueueKey {
        QueueKey {
            priority,
            arrival_seq,
            id: RequestId(arrival_seq),
        }
    }

    #[test]
    fn preempted_first_then_priority_then_arrival() {
        let mut q = WaitingQueue::default();
        q.push(key(1, 0));
        q.push(key(0, 5));
        q.push(key(0, 2));
        q.push_front(key(3, 9));
        q.push_front(key(2, 8));
        let order: Vec<_> = q.iter().map(|k| k.arrival_seq).collect();
        assert_eq!(order, [8, 9, 2, 5, 0]);
        assert!(q.remove(&key(3, 9)));
        assert!(!q.remove(&key(3, 9)));
        q.remove_all(&[key(2, 8), key(0, 5)]);
        let order: Vec<_> = q.iter().map(|k| k.arrival_seq).collect();
        assert_eq!(order, [2, 0]);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn merge_keeps_running_sorted() {
        let mut running: Vec<_> = [(0, 1), (0, 4), (2, 0)].map(|(p, a)| key(p, a)).to_vec();
        let mut admitted: Vec<_> = [(3, 9), (0, 2), (-1, 7)].map(|(p, a)| key(p, a)).to_vec();
        merge_sorted(&mut running, &mut admitted);
        let mut expected = running.clone();
        expected.sort();
        assert_eq!(running, expected);
        assert_eq!(running.len(), 6);
        assert_eq!(running[0], key(-1, 7));
        merge_sorted(&mut running, &mut []);
        assert_eq!(running.len(), 6);
    }

    #[test]
    fn adapter_counts_track_distinct_adapters() {
        let a = AdapterKey {
            id: 1,
            generation: 0,
        };
        let a2 = AdapterKey {
            id: 1,
            generation: 1,
        };
        let mut c = AdapterCounts::default();
        c.add(a);
        c.add(a);
        c.add(a2);
        assert_eq!(
            c.num_distinct(),
            2,
            "a new generation is a different adapter"
        );
        c.remove(a);
        assert!(c.contains(a));
        c.remove(a);
        assert!(!c.contains(a));
        assert_eq!(c.num_distinct(), 1);
    }
}
