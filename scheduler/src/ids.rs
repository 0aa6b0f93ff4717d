//! Newtype ids shared by the scheduler, the KV cache manager and the executor.

/// Identifies one request for its whole life; assigned by the engine, unique among live requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Index of one KV block in the paged cache pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    /// Block 0 is reserved (padding target for the executor); it is never handed to a request.
    pub const NULL: BlockId = BlockId(0);

    /// The block's index into pool-sized arrays.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One loaded LoRA adapter. `generation` changes whenever the adapter id is reloaded with new
/// weights, so KV computed under the old weights can never be reused (it is part of the block hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AdapterKey {
    pub id: u32,
    pub generation: u64,
}
