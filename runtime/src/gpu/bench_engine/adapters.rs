//! The engine part's adapters: the power-law mix of requests over them, and their folders on
//! disk (a few generated, the rest hard-linked).

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{fail, EngineBenchError, EngineBenchOptions};
use crate::adapters::make::write_synthetic_adapters;
use crate::adapters::Projection;

/// Adapter index of each request: Zipf(s) over `n` adapters, seeded.
pub fn power_law_mix(requests: usize, n: usize, s: f64, seed: u64) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let weights: Vec<f64> = (0..n).map(|k| 1.0 / ((k + 1) as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..requests)
        .map(|_| {
            let mut u = rng.random_range(0.0..total);
            weights
                .iter()
                .position(|&w| {
                    u -= w;
                    u < 0.0
                })
                .unwrap_or(n - 1)
        })
        .collect()
}

/// The registry name of adapter `i` (its folder's name).
pub(super) fn adapter_name(i: usize) -> String {
    format!("doctor-{i:04}")
}

/// Writes `count` adapter folders (`doctor-0000`...) under `dir`, `distinct` of them generated.
pub(super) fn write_adapters(
    config: &crate::model::config::LlamaConfig,
    dir: &Path,
    o: &EngineBenchOptions,
) -> Result<(), EngineBenchError> {
    let src = dir.join("sources");
    let distinct = o.distinct_files.clamp(1, o.adapters);
    let written = write_synthetic_adapters(
        config,
        &src,
        distinct,
        o.rank,
        &Projection::ALL,
        o.seed,
        2.0 * o.rank as f32,
    )
    .map_err(|e| fail("writing adapters")(&e))?;
    let root = dir.join("adapters");
    for i in 0..o.adapters {
        let from = &written[i % written.len()];
        let to = root.join(adapter_name(i));
        std::fs::create_dir_all(&to).map_err(|e| fail("adapter folder")(&e))?;
        for entry in std::fs::read_dir(from).map_err(|e| fail("adapter folder")(&e))? {
            let entry = entry.map_err(|e| fail("adapter folder")(&e))?;
            let target = to.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &target).is_err() {
                std::fs::copy(entry.path(), &target).map_err(|e| fail("adapter copy")(&e))?;
            }
        }
    }
    Ok(())
}
