//! `make-adapters`: synthetic adapters load back, are deterministic, differ between doctors and
//! move the base projections by a sizable fraction.

use std::path::Path;
use std::process::Command;

use caduceus_runtime::adapters::make::{write_synthetic_adapters, MakeError, DELTA_RMS};
use caduceus_runtime::adapters::peft::{load_adapter, probe};
use caduceus_runtime::adapters::Projection;

use super::fixtures::*;

fn read_all(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join("adapter_config.json")).unwrap(),
        std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
    )
}

#[test]
fn synthetic_adapters_round_trip_deterministically() {
    let base = tiny_llama();
    let tmp = tempfile::tempdir().unwrap();
    let first =
        write_synthetic_adapters(&base, &tmp.path().join("a"), 3, 4, &Projection::ALL, 7, 8.0)
            .unwrap();
    let again =
        write_synthetic_adapters(&base, &tmp.path().join("b"), 3, 4, &Projection::ALL, 7, 8.0)
            .unwrap();
    let other_seed =
        write_synthetic_adapters(&base, &tmp.path().join("c"), 1, 4, &Projection::ALL, 8, 8.0)
            .unwrap();
    let names: Vec<_> = first
        .iter()
        .map(|d| d.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["doctor-0000", "doctor-0001", "doctor-0002"]);

    let dims = caduceus_runtime::model::lora::projection_dims(&base);
    let mut generations = Vec::new();
    for (dir, same) in first.iter().zip(&again) {
        assert_eq!(read_all(dir), read_all(same), "same seed, same bytes");
        let w = load_adapter(dir, &base, &LIMITS).unwrap();
        assert_eq!(
            (w.rank, w.scale, w.targets()),
            (4, 2.0, Projection::ALL.to_vec())
        );
        for pairs in &w.layers {
            for p in Projection::ALL {
                let pair = pairs[p.index()].as_ref().unwrap();
                let (i, o) = dims[p.index()];
                assert_eq!((pair.a.len(), pair.b.len()), (4 * i, o * 4));
            }
        }
        assert_eq!(
            w.generation,
            load_adapter(same, &base, &LIMITS).unwrap().generation
        );
        generations.push(w.generation);
        let info = probe(dir).unwrap();
        assert_eq!(
            (info.rank, info.lora_alpha, info.use_rslora),
            (4, 8.0, false)
        );
    }
    generations.sort_unstable();
    generations.dedup();
    assert_eq!(generations.len(), 3, "every doctor is different");
    assert_ne!(read_all(&first[0]).1, read_all(&other_seed[0]).1);
}

#[test]
fn synthetic_adapters_honour_targets_and_reject_bad_arguments() {
    let base = tiny_llama();
    let tmp = tempfile::tempdir().unwrap();
    let dirs = write_synthetic_adapters(
        &base,
        tmp.path(),
        1,
        2,
        &[Projection::V, Projection::Q],
        1,
        16.0,
    )
    .unwrap();
    let w = load_adapter(&dirs[0], &base, &LIMITS).unwrap();
    assert_eq!(
        (w.scale, w.targets()),
        (8.0, vec![Projection::Q, Projection::V])
    );
    for (count, rank, alpha, needle) in [
        (0, 2, 4.0, "count"),
        (1, 0, 4.0, "rank"),
        (1, 2, 0.0, "alpha"),
    ] {
        let err =
            write_synthetic_adapters(&base, tmp.path(), count, rank, &Projection::ALL, 1, alpha)
                .unwrap_err();
        assert!(
            matches!(err, MakeError::Invalid(_)) && err.to_string().contains(needle),
            "{err}"
        );
    }
    let err = write_synthetic_adapters(&base, tmp.path(), 1, 2, &[], 1, 4.0).unwrap_err();
    assert!(err.to_string().contains("target"), "{err}");
}

/// The delta's RMS against tiny-llama's real q_proj output, for random unit inputs.
#[test]
fn synthetic_delta_is_a_sizable_fraction_of_the_base_output() {
    let base = tiny_llama();
    let tmp = tempfile::tempdir().unwrap();
    let dirs =
        write_synthetic_adapters(&base, tmp.path(), 1, 8, &[Projection::Q], 3, 16.0).unwrap();
    let w = load_adapter(&dirs[0], &base, &LIMITS).unwrap();
    let (shape, weight) = raw_f32(
        &shared("reference/tiny-llama/model/model.safetensors"),
        "model.layers.0.self_attn.q_proj.weight",
    );
    let (out, inp) = (shape[0], shape[1]);
    let pair = w.layers[0][0].as_ref().unwrap();
    let x: Vec<f32> = (0..inp)
        .map(|i| ((i * 7919) % 13) as f32 / 6.0 - 1.0)
        .collect();
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let mat = |m: &[f32], v: &[f32], rows: usize| -> Vec<f32> {
        let cols = v.len();
        (0..rows)
            .map(|r| (0..cols).map(|c| m[r * cols + c] * v[c]).sum())
            .collect()
    };
    let base_out = mat(&weight, &x, out);
    let ax = mat(&pair.a, &x, 8);
    let delta: Vec<f32> = mat(&pair.b, &ax, out).iter().map(|d| d * w.scale).collect();
    let (to_input, to_base) = (rms(&delta) / rms(&x), rms(&delta) / rms(&base_out));
    eprintln!(
        "synthetic delta RMS: {to_input:.2}x the input's, {to_base:.2}x the base q_proj output's"
    );
    assert!(
        (0.5 * DELTA_RMS..1.5 * DELTA_RMS).contains(&to_input),
        "{to_input}"
    );
    assert!((0.15..2.0).contains(&to_base), "{to_base}");
}

#[test]
fn the_make_adapters_command_writes_loadable_adapters() {
    let model = shared("reference/tiny-llama/model");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("doctors");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_caduceus"))
            .args(["make-adapters", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(&out)
            .args(["--count", "2", "--rank", "4", "--seed", "3"])
            .args(extra)
            .output()
            .unwrap()
    };
    let done = run(&["--targets", "q_proj,v_proj"]);
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        stdout.contains("wrote 2 adapters") && stdout.contains("rank 4"),
        "{stdout}"
    );
    let base = tiny_llama();
    let w = load_adapter(&out.join("doctor-0001"), &base, &LIMITS).unwrap();
    assert_eq!(
        (w.rank, w.scale, w.targets()),
        (4, 2.0, vec![Projection::Q, Projection::V])
    );
    let info = probe(&out.join("doctor-0000")).unwrap();
    assert_eq!(info.base_model_name_or_path.as_deref(), Some("model"));

    let bad = run(&["--targets", "q_proj,lm_head"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("lm_head"));
}

#[test]
fn one_thread_loading_files_of_every_size_in_turn_reads_each_file_alone() {
    // The loader keeps its file buffer between loads: a big file, a failed read, then a small
    // file must give the small file's weights and generation exactly, as a fresh thread does.
    let base = tiny_llama();
    let tmp = tempfile::tempdir().unwrap();
    let big = write_synthetic_adapters(
        &base,
        &tmp.path().join("big"),
        1,
        8,
        &Projection::ALL,
        1,
        8.0,
    )
    .unwrap();
    let small = write_synthetic_adapters(
        &base,
        &tmp.path().join("small"),
        1,
        2,
        &[Projection::Q],
        2,
        8.0,
    )
    .unwrap();
    let fresh = std::thread::spawn({
        let (dir, base) = (small[0].clone(), base.clone());
        move || load_adapter(&dir, &base, &LIMITS).unwrap()
    })
    .join()
    .unwrap();
    let big_weights = load_adapter(&big[0], &base, &LIMITS).unwrap();
    let tight = caduceus_runtime::adapters::AdapterLimits {
        max_file_bytes: 16,
        ..LIMITS
    };
    assert!(load_adapter(&big[0], &base, &tight).is_err());
    let again = load_adapter(&small[0], &base, &LIMITS).unwrap();
    assert_eq!(again.generation, fresh.generation);
    assert_eq!(again.layers, fresh.layers);
    assert_ne!(again.generation, big_weights.generation);
}
