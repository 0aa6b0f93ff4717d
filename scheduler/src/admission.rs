//! The one rule for whether a request can ever finish: the engine handle (before queueing), the
//! HTTP server (the default `max_tokens`) and `Scheduler::add_request` all ask this, so they can
//! never disagree at the boundary.

use crate::request::AddRequestError;

/// The limits a request's size is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Prompt plus output tokens.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks one request may hold (the pool minus the null block).
    pub usable_blocks: usize,
}

impl AdmissionLimits {
    /// Refuses a request that could never finish: no prompt, no output, longer than
    /// `max_model_len`, or needing more KV blocks at full length than the pool has (so a request
    /// running alone can always complete and preemption always makes progress). The last
    /// sampled token is never fed back, so it needs no KV slot.
    pub fn check(&self, prompt_tokens: usize, max_tokens: usize) -> Result<(), AddRequestError> {
        if prompt_tokens == 0 {
            return Err(AddRequestError::EmptyPrompt);
        }
        if max_tokens == 0 {
            return Err(AddRequestError::ZeroMaxTokens);
        }
        let max_model_len = self.max_model_len;
        if prompt_tokens.saturating_add(max_tokens) > max_model_len {
            return Err(AddRequestError::TooLong {
                prompt_tokens,
                max_tokens,
                max_model_len,
            });
        }
        let needed_blocks = (prompt_tokens + max_tokens - 1).div_ceil(self.block_size.max(1));
        if needed_blocks > self.usable_blocks {
            return Err(AddRequestError::ExceedsKvPool {
                needed_blocks,
                usable_blocks: self.usable_blocks,
            });
        }
        Ok(())
    }

    /// The largest `max_tokens` that [`Self::check`] accepts with this prompt (0: none), the
    /// value a request that names no `max_tokens` gets.
    pub fn max_output_tokens(&self, prompt_tokens: usize) -> usize {
        let by_length = self.max_model_len.saturating_sub(prompt_tokens);
        let slots = self.usable_blocks.saturating_mul(self.block_size);
        let by_pool = slots.saturating_add(1).saturating_sub(prompt_tokens);
        by_length.min(by_pool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boundary_is_exact_by_length_and_by_pool() {
        // 4 blocks of 4 = 16 slots: the pool binds before max_model_len 20 does.
        let pool = AdmissionLimits {
            max_model_len: 20,
            block_size: 4,
            usable_blocks: 4,
        };
        // 10 + 7 - 1 = 16 slots fit exactly; one more token needs a fifth block.
        assert_eq!(pool.check(10, 7), Ok(()));
        assert_eq!(
            pool.check(10, 8),
            Err(AddRequestError::ExceedsKvPool {
                needed_blocks: 5,
                usable_blocks: 4
            })
        );
        let length = AdmissionLimits {
            usable_blocks: 100,
            ..pool
        };
        assert_eq!(length.check(10, 10), Ok(()));
        assert!(matches!(
            length.check(10, 11),
            Err(AddRequestError::TooLong { .. })
        ));
        assert_eq!(length.check(0, 1), Err(AddRequestError::EmptyPrompt));
        assert_eq!(length.check(1, 0), Err(AddRequestError::ZeroMaxTokens));
        assert!(length.check(usize::MAX, 1).is_err());
    }

    #[test]
    fn max_output_tokens_is_the_largest_accepted_value() {
        for (max_model_len, block_size, usable_blocks) in [(20, 4, 4), (20, 4, 100), (7, 1, 3)] {
            let l = AdmissionLimits {
                max_model_len,
                block_size,
                usable_blocks,
            };
            for prompt in 1..=max_model_len + 2 {
                let room = l.max_output_tokens(prompt);
                if room > 0 {
                    assert_eq!(l.check(prompt, room), Ok(()), "{l:?} prompt {prompt}");
                }
                assert!(l.check(prompt, room + 1).is_err(), "{l:?} prompt {prompt}");
            }
        }
    }
}
