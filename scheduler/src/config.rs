//! Scheduler limits and the checks that keep them meaningful.

use crate::admission::AdmissionLimits;
use crate::fairness::Fairness;
use thiserror::Error;

/// Limits of one scheduler instance. One struct, not positional arguments, so the engine can
/// log and compare it as a whole.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    /// Most requests in one step (the executor's batch size limit).
    pub max_num_seqs: usize,
    /// Token budget of one step, shared by decodes and prefill chunks.
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV pool size INCLUDING the null block 0.
    pub num_blocks: usize,
    /// Prompt + output limit of one request.
    pub max_model_len: usize,
    /// Reuse full KV blocks across requests with identical prefixes.
    pub enable_prefix_caching: bool,
    /// Distinct adapters per step; `None` = unlimited.
    pub max_loras: Option<usize>,
    /// A waiting request skipped this many steps because of `max_loras` becomes "aged": the next
    /// time the limit blocks it, admission stops for that step so running adapters drain.
    pub adapter_aging_steps: u32,
    /// Seed of the stable xxh3 block hash (change it to invalidate every cached block key).
    pub hash_seed: u64,
    /// Order of waiting requests of equal priority: least-served adapter first (VTC) or FCFS.
    pub fairness: Fairness,
    /// Under VTC, while an adapter with nothing waiting has a request running, adapters with
    /// requests waiting may fill at most this percent of a step's budget with prefill (1..=100;
    /// 100 = no limit). See `backlog.rs`.
    pub backlog_prefill_percent: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_blocks: 1024,
            max_model_len: 2048,
            enable_prefix_caching: true,
            max_loras: None,
            adapter_aging_steps: 8,
            hash_seed: 0,
            fairness: Fairness::Vtc,
            backlog_prefill_percent: 50,
        }
    }
}

/// A configuration value outside what the scheduler can honour; names the field, the value and
/// the accepted range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("scheduler config: {field} is {value}, expected at least {min}")]
    TooSmall {
        field: &'static str,
        value: u64,
        min: u64,
    },
    #[error("scheduler config: {field} is {value}, expected at most {max}")]
    TooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
}

fn at_least(field: &'static str, value: usize, min: u64) -> Result<(), ConfigError> {
    let value = value as u64;
    if value < min {
        return Err(ConfigError::TooSmall { field, value, min });
    }
    Ok(())
}

impl SchedulerConfig {
    /// Blocks requests can hold: all of `num_blocks` but the null block (what `/metrics`
    /// reports as `num_gpu_blocks`).
    pub fn num_usable_blocks(&self) -> usize {
        self.num_blocks.saturating_sub(1)
    }

    /// The size limits every request is admitted under.
    pub fn admission_limits(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_model_len: self.max_model_len,
            block_size: self.block_size,
            usable_blocks: self.num_blocks.saturating_sub(1),
        }
    }

    /// Rejects limits that would make the scheduler unable to run any request.
    pub fn validate(&self) -> Result<(), ConfigError> {
        at_least("max_num_seqs", self.max_num_seqs, 1)?;
        at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)?;
        at_least("block_size", self.block_size, 1)?;
        // The null block plus at least one usable block.
        at_least("num_blocks", self.num_blocks, 2)?;
        // Block ids are u32 and u32::MAX is the free list's "no link" marker.
        let max_blocks = u64::from(u32::MAX);
        if self.num_blocks as u64 > max_blocks {
            return Err(ConfigError::TooLarge {
                field: "num_blocks",
                value: self.num_blocks as u64,
                max: max_blocks,
            });
        }
        // One prompt token plus one output token.
        at_least("max_model_len", self.max_model_len, 2)?;
        if let Some(max_loras) = self.max_loras {
            // Zero would make every adapter request wait forever; use None for "unlimited".
            at_least("max_loras", max_loras, 1)?;
        }
        at_least("backlog_prefill_percent", self.backlog_prefill_percent, 1)?;
        if self.backlog_prefill_percent > 100 {
            return Err(ConfigError::TooLarge {
                field: "backlog_prefill_percent",
                value: self.backlog_prefill_percent as u64,
                max: 100,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_matches_documented_values() {
        let c = SchedulerConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            (c.max_num_seqs, c.max_num_batched_tokens, c.block_size),
            (256, 2048, 16)
        );
        assert_eq!((c.num_blocks, c.max_model_len), (1024, 2048));
        assert!(c.enable_prefix_caching);
        assert_eq!(
            (c.max_loras, c.adapter_aging_steps, c.hash_seed),
            (None, 8, 0)
        );
        assert_eq!(c.fairness, Fairness::Vtc);
        assert_eq!(c.backlog_prefill_percent, 50);
    }

    #[test]
    fn errors_name_field_value_and_expectation() {
        let c = SchedulerConfig {
            num_blocks: 1,
            ..Default::default()
        };
        let err = c.validate().unwrap_err();
        assert_eq!(
            err,
            ConfigError::TooSmall {
                field: "num_blocks",
                value: 1,
                min: 2
            }
        );
        assert_eq!(
            err.to_string(),
            "scheduler config: num_blocks is 1, expected at least 2"
        );
        let c = SchedulerConfig {
            max_loras: Some(0),
            ..Default::default()
        };
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooSmall {
                field: "max_loras",
                ..
            })
        ));
        for c in [
            SchedulerConfig {
                max_num_seqs: 0,
                ..Default::default()
            },
            SchedulerConfig {
                max_num_batched_tokens: 0,
                ..Default::default()
            },
            SchedulerConfig {
                block_size: 0,
                ..Default::default()
            },
            SchedulerConfig {
                max_model_len: 1,
                ..Default::default()
            },
            SchedulerConfig {
                backlog_prefill_percent: 0,
                ..Default::default()
            },
            SchedulerConfig {
                backlog_prefill_percent: 101,
                ..Default::default()
            },
        ] {
            assert!(c.validate().is_err(), "{c:?}");
        }
    }
}
