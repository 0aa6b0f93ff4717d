//! The device tier of adapter residency: which adapter (id + generation) sits in which of the
//! backend's adapter slots, filled from the host tier on first use and reused least recently
//! used first. Bookkeeping only: the backend does the copies.

use std::collections::HashSet;

use caduceus_scheduler::AdapterKey;

use super::backend::BackendError;
use crate::adapters::LoadedAdapter;

/// What finding a slot for an adapter took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotFill {
    /// It was already resident.
    Hit,
    /// It was copied from host memory into an empty slot.
    Loaded,
    /// It was copied into a slot whose previous adapter was evicted.
    Evicted,
}

/// Slot assignment over a backend's adapter slots.
pub struct DeviceSlots {
    keys: Vec<Option<AdapterKey>>,
    last_used: Vec<u64>,
    tick: u64,
}

/// No slot could be freed: more distinct adapters are running than there are slots (the
/// scheduler's `max_loras` must equal the slot count).
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("all {0} adapter slots are in use by running requests")]
    Full(usize),
    #[error("adapter could not be copied into its slot: {0}")]
    Load(#[from] BackendError),
}

impl DeviceSlots {
    /// `n` empty slots.
    pub fn new(n: usize) -> Self {
        DeviceSlots {
            keys: vec![None; n],
            last_used: vec![0; n],
            tick: 0,
        }
    }

    /// Adapters resident now.
    pub fn num_resident(&self) -> usize {
        self.keys.iter().flatten().count()
    }

    /// The slot holding `adapter`, filling one with `load(slot)` if needed. Slots whose adapter
    /// a request in `pinned` uses are never taken.
    pub fn acquire(
        &mut self,
        adapter: &LoadedAdapter,
        pinned: &HashSet<AdapterKey>,
        load: impl FnOnce(u32) -> Result<(), BackendError>,
    ) -> Result<(u32, SlotFill), SlotError> {
        self.tick += 1;
        if let Some(slot) = self.keys.iter().position(|k| *k == Some(adapter.key)) {
            self.last_used[slot] = self.tick;
            return Ok((slot as u32, SlotFill::Hit));
        }
        let empty = self.keys.iter().position(Option::is_none);
        let slot = match empty {
            Some(s) => s,
            None => (0..self.keys.len())
                .filter(|&s| self.keys[s].is_none_or(|k| !pinned.contains(&k)))
                .min_by_key(|&s| self.last_used[s])
                .ok_or(SlotError::Full(self.keys.len()))?,
        };
        // Mark the slot empty first: a failed copy must not leave a stale key on mixed weights.
        let fill = if self.keys[slot].is_some() {
            SlotFill::Evicted
        } else {
            SlotFill::Loaded
        };
        self.keys[slot] = None;
        load(slot as u32)?;
        self.keys[slot] = Some(adapter.key);
        self.last_used[slot] = self.tick;
        Ok((slot as u32, fill))
    }
}
