//! Truncated and bit-flipped adapter files: the loader returns an error or a valid adapter, and
//! never panics.

use caduceus_runtime::adapters::peft::{load_adapter, probe};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::fixtures::*;

#[test]
fn truncated_and_bit_flipped_files_never_panic() {
    let base = tiny_llama();
    let source = shared("reference/tiny-llama/adapters/doctor-b");
    let weights = std::fs::read(source.join("adapter_model.safetensors")).unwrap();
    let config = std::fs::read(source.join("adapter_config.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let write = |c: &[u8], w: &[u8]| {
        std::fs::write(dir.join("adapter_config.json"), c).unwrap();
        std::fs::write(dir.join("adapter_model.safetensors"), w).unwrap();
    };
    let header_end = 8 + u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let mut outcomes = [0usize; 2];
    let mut record = |ok: bool| outcomes[usize::from(ok)] += 1;

    // Every truncation of the header, and a spread of truncations of the data.
    for len in (0..header_end + 16).chain((header_end..weights.len()).step_by(61)) {
        write(&config, &weights[..len]);
        let result = load_adapter(dir, &base, &LIMITS);
        assert!(result.is_err(), "truncated to {len} bytes but loaded");
        record(false);
    }
    // Bit flips, mostly in the header where they change meaning.
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for i in 0..600 {
        let mut w = weights.clone();
        let limit = if i % 4 == 0 { w.len() } else { header_end };
        let pos = rng.random_range(0..limit);
        w[pos] ^= 1 << rng.random_range(0..8);
        write(&config, &w);
        record(load_adapter(dir, &base, &LIMITS).is_ok());
    }
    // Config truncations and flips.
    for len in 0..config.len() {
        write(&config[..len], &weights);
        record(load_adapter(dir, &base, &LIMITS).is_ok());
        let _ = probe(dir);
    }
    for _ in 0..300 {
        let mut c = config.clone();
        let pos = rng.random_range(0..c.len());
        c[pos] ^= 1 << rng.random_range(0..8);
        write(&c, &weights);
        record(load_adapter(dir, &base, &LIMITS).is_ok());
        let _ = probe(dir);
    }
    eprintln!(
        "fuzz: {} rejected, {} still valid",
        outcomes[0], outcomes[1]
    );
    assert!(outcomes[0] > 500);
}
