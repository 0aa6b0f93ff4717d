//! Caduceus scheduler: request state machine, KV block allocator, prefix cache and batching policy. Pure Rust, no tensors, no async (filled in by the continuous-batching issue).
