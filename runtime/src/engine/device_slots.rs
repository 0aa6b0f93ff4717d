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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::LlamaConfig;
    use crate::model::lora::{LoraDtype, LoraStack};

    fn adapter(id: u32) -> LoadedAdapter {
        let c = LlamaConfig::from_hf_json(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 1, "vocab_size": 16, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 64}"#,
        )
        .unwrap();
        LoadedAdapter {
            name: format!("a{id}").into(),
            version: 1,
            key: AdapterKey { id, generation: 1 },
            rank: 2,
            prepared: LoraStack::new(&c, 1, 2, LoraDtype::F32).unwrap().into(),
        }
    }

    /// A slot whose adapter a running request reads is never reloaded, even when it is the
    /// least recently used one (the backend's copy stream relies on it).
    #[test]
    fn slots_of_running_requests_are_never_overwritten() {
        let (a, b, c, d) = (adapter(1), adapter(2), adapter(3), adapter(4));
        let mut slots = DeviceSlots::new(2);
        let none = HashSet::new();
        let ok = |_| Ok(());
        assert_eq!(slots.acquire(&a, &none, ok).unwrap(), (0, SlotFill::Loaded));
        assert_eq!(slots.acquire(&b, &none, ok).unwrap(), (1, SlotFill::Loaded));
        // `a` is the least recently used but running: `b`'s slot is taken.
        let running = HashSet::from([a.key]);
        let mut loaded = Vec::new();
        let fill = slots.acquire(&c, &running, |s| {
            loaded.push(s);
            Ok(())
        });
        assert_eq!(fill.unwrap(), (1, SlotFill::Evicted));
        assert_eq!(loaded, [1]);
        // Both residents running: no slot, and nothing is copied.
        let running = HashSet::from([a.key, c.key]);
        let full = slots.acquire(&d, &running, |_| panic!("a running slot was reloaded"));
        assert!(matches!(full, Err(SlotError::Full(2))));
        assert_eq!(slots.acquire(&a, &running, ok).unwrap(), (0, SlotFill::Hit));
    }
}
