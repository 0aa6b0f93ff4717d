//! Every way an adapter directory can be wrong, each with an error that names the problem.

use caduceus_runtime::adapters::peft::{load_adapter, probe, AdapterLimits};
use caduceus_runtime::adapters::Projection;
use safetensors::tensor::Dtype;
use serde_json::{json, Value};

use super::fixtures::*;

const QV: [Projection; 2] = [Projection::Q, Projection::V];

/// A temp dir holding a valid q/v adapter (rank 2) named `name`, with `edit` applied to its
/// config and `tensors` (or the valid ones) as weights.
fn adapter_with(
    tmp: &tempfile::TempDir,
    name: &str,
    edit: impl FnOnce(&mut Value),
    tensors: Option<Vec<RawTensor>>,
) -> std::path::PathBuf {
    let mut config = peft_config(2, 4.0, &["q_proj", "v_proj"]);
    edit(&mut config);
    let tensors = tensors.unwrap_or_else(|| small_tensors(2, &QV));
    write_adapter(tmp.path(), name, &config, &tensors)
}

#[test]
fn a_valid_small_adapter_loads_and_its_siblings_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_with(&tmp, "ok", |_| {}, None);
    let w = load_small(&dir, true);
    assert_eq!((w.rank, w.scale, w.targets()), (2, 2.0, QV.to_vec()));
    let q = w.layers[1][0].as_ref().unwrap();
    assert_eq!(q.a, pair_values(1, Projection::Q, 16, "A"));
    assert_eq!(q.b, pair_values(1, Projection::Q, 16, "B"));
}

#[test]
fn missing_files_bad_json_and_oversized_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_with(&tmp, "no-config", |_| {}, None);
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    assert_names(&load_err(&dir), &dir, &["adapter_config.json is missing"]);
    let err = probe(&dir).unwrap_err().to_string();
    assert_names(&err, &dir, &["adapter_config.json is missing"]);

    let dir = adapter_with(&tmp, "no-weights", |_| {}, None);
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    assert_names(
        &load_err(&dir),
        &dir,
        &["adapter_model.safetensors is missing"],
    );
    assert!(probe(&dir).is_ok(), "probe reads only the config");

    let missing = tmp.path().join("nowhere");
    assert_names(
        &load_err(&missing),
        &missing,
        &["adapter_config.json is missing"],
    );

    let dir = adapter_with(&tmp, "bad-json", |_| {}, None);
    std::fs::write(
        dir.join("adapter_config.json"),
        "{\"r\": 8, \"peft_type\": ",
    )
    .unwrap();
    assert_names(&load_err(&dir), &dir, &["adapter_config.json:", "EOF"]);
    let dir = adapter_with(&tmp, "wrong-type", |c| c["r"] = json!("eight"), None);
    assert_names(
        &load_err(&dir),
        &dir,
        &["adapter_config.json:", "invalid type"],
    );

    let dir = adapter_with(&tmp, "oversized", |_| {}, None);
    let limits = AdapterLimits {
        max_rank: 64,
        max_file_bytes: 100,
    };
    let size = std::fs::metadata(dir.join("adapter_model.safetensors"))
        .unwrap()
        .len();
    let err = load_err_with(&dir, &limits);
    assert_names(
        &err,
        &dir,
        &[
            "adapter_model.safetensors",
            &format!("{size} bytes"),
            "limit of 100 bytes",
        ],
    );
}

#[test]
fn rank_must_be_positive_and_within_the_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_with(&tmp, "r0", |c| c["r"] = json!(0), None);
    assert_names(&load_err(&dir), &dir, &["r = 0"]);
    assert!(probe(&dir).is_err());

    let tensors = small_tensors(32, &QV);
    let dir = adapter_with(&tmp, "r32", |c| c["r"] = json!(32), Some(tensors));
    let limits = AdapterLimits {
        max_rank: 16,
        max_file_bytes: 1 << 30,
    };
    let err = load_err_with(&dir, &limits);
    assert_names(&err, &dir, &["rank r = 32", "max_lora_rank = 16"]);
    assert!(load_adapter(&dir, &small_base(true), &LIMITS).is_ok());
}

/// A config edit and a phrase its error must contain.
type Case = (&'static str, fn(&mut Value), &'static str);

#[test]
fn unsupported_peft_features_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [Case; 10] = [
        (
            "prefix",
            |c| c["peft_type"] = json!("PREFIX_TUNING"),
            "peft_type \"PREFIX_TUNING\"",
        ),
        (
            "no-type",
            |c| c["peft_type"] = Value::Null,
            "peft_type is missing",
        ),
        ("dora", |c| c["use_dora"] = json!(true), "DoRA"),
        (
            "bias",
            |c| c["bias"] = json!("lora_only"),
            "bias \"lora_only\"",
        ),
        ("lora-bias", |c| c["lora_bias"] = json!(true), "lora_bias"),
        (
            "rank-pattern",
            |c| c["rank_pattern"] = json!({"q_proj": 4}),
            "rank_pattern",
        ),
        (
            "alpha-pattern",
            |c| c["alpha_pattern"] = json!({"q_proj": 4}),
            "alpha_pattern",
        ),
        (
            "layers",
            |c| c["layers_to_transform"] = json!([0]),
            "layers_to_transform",
        ),
        (
            "save",
            |c| c["modules_to_save"] = json!(["lm_head"]),
            "modules_to_save",
        ),
        (
            "no-targets",
            |c| c["target_modules"] = Value::Null,
            "target_modules is missing",
        ),
    ];
    for (name, edit, needle) in cases {
        let dir = adapter_with(&tmp, name, edit, None);
        assert_names(&load_err(&dir), &dir, &[needle]);
        assert!(probe(&dir).is_err(), "{name}: probe must reject it too");
    }
    // Harmless fields take PEFT's meaning: fan_in_fan_out is reset for Linear layers.
    let dir = adapter_with(&tmp, "fifo", |c| c["fan_in_fan_out"] = json!(true), None);
    let plain = adapter_with(&tmp, "plain", |_| {}, None);
    assert_eq!(
        load_small(&dir, true).layers,
        load_small(&plain, true).layers
    );
}

#[test]
fn targets_outside_the_seven_projections_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    for module in ["lm_head", "embed_tokens", "c_attn"] {
        let dir = adapter_with(
            &tmp,
            module,
            |c| c["target_modules"] = json!(["q_proj", module]),
            None,
        );
        assert_names(
            &load_err(&dir),
            &dir,
            &[&format!("target module {module:?}"), "q_proj"],
        );
    }
    let dir = adapter_with(&tmp, "empty", |c| c["target_modules"] = json!([]), None);
    assert_names(&load_err(&dir), &dir, &["target_modules is empty"]);
    // A full module path past the base's last layer matches nothing.
    let dir = adapter_with(
        &tmp,
        "deep",
        |c| c["target_modules"] = json!(["q_proj", "v_proj", "model.layers.7.self_attn.k_proj"]),
        None,
    );
    assert_names(
        &load_err(&dir),
        &dir,
        &["model.layers.7.self_attn.k_proj", "2 layers"],
    );
}

#[test]
fn target_modules_may_be_a_regex() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_with(
        &tmp,
        "re",
        |c| c["target_modules"] = json!(r".*\.(q_proj|v_proj)"),
        None,
    );
    assert_eq!(load_small(&dir, true).targets(), QV.to_vec());
    let info = probe(&dir).unwrap();
    assert_eq!(info.targets, QV.to_vec());

    // Only layer 1 targeted: layer 0's tensors are then unexpected.
    let dir = adapter_with(
        &tmp,
        "re-layer",
        |c| c["target_modules"] = json!(r"model\.layers\.1\..*(q_proj|v_proj)"),
        None,
    );
    let err = load_err(&dir);
    assert_names(&err, &dir, &["layers.0.", "not in target_modules"]);

    let dir = adapter_with(
        &tmp,
        "re-head",
        |c| c["target_modules"] = json!("lm_head|.*q_proj"),
        None,
    );
    assert_names(&load_err(&dir), &dir, &["matches lm_head"]);
    let dir = adapter_with(
        &tmp,
        "re-look",
        |c| c["target_modules"] = json!("(?=q).*"),
        None,
    );
    assert_names(&load_err(&dir), &dir, &["pattern", "not supported"]);
    let dir = adapter_with(
        &tmp,
        "re-none",
        |c| c["target_modules"] = json!("nothing"),
        None,
    );
    assert_names(&load_err(&dir), &dir, &["\"nothing\"", "matches no module"]);
}

#[test]
fn tensors_must_fit_the_base_and_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let with = |extra: RawTensor| {
        let mut t = small_tensors(2, &QV);
        t.push(extra);
        Some(t)
    };
    let replaced = |name: &str, new: RawTensor| {
        let mut t = small_tensors(2, &QV);
        let i = t.iter().position(|t| t.name == name).unwrap();
        t[i] = new;
        Some(t)
    };
    let q_a = tensor_name(0, Projection::Q, "A");
    let q_b = tensor_name(0, Projection::Q, "B");

    let dir = adapter_with(
        &tmp,
        "shape-a",
        |_| {},
        replaced(&q_a, RawTensor::f32(&q_a, vec![2, 9], &[0.0; 18])),
    );
    assert_names(&load_err(&dir), &dir, &[&q_a, "[2, 9]", "expected [2, 8]"]);
    let dir = adapter_with(
        &tmp,
        "shape-b",
        |_| {},
        replaced(&q_b, RawTensor::f32(&q_b, vec![4, 2], &[0.0; 8])),
    );
    assert_names(&load_err(&dir), &dir, &[&q_b, "[4, 2]", "expected [8, 2]"]);
    let dir = adapter_with(
        &tmp,
        "shape-3d",
        |_| {},
        replaced(&q_b, RawTensor::f32(&q_b, vec![8, 2, 1], &[0.0; 16])),
    );
    assert_names(&load_err(&dir), &dir, &[&q_b, "expected [8, 2]"]);

    let deep = tensor_name(5, Projection::Q, "A");
    let dir = adapter_with(
        &tmp,
        "layer",
        |_| {},
        with(RawTensor::f32(&deep, vec![2, 8], &[0.0; 16])),
    );
    assert_names(
        &load_err(&dir),
        &dir,
        &[&deep, "layer 5 is out of range", "2 layers"],
    );

    let k_a = tensor_name(0, Projection::K, "A");
    let dir = adapter_with(
        &tmp,
        "untargeted",
        |_| {},
        with(RawTensor::f32(&k_a, vec![2, 8], &[0.0; 16])),
    );
    assert_names(&load_err(&dir), &dir, &[&k_a, "not in target_modules"]);

    let embed = "base_model.model.model.embed_tokens.weight";
    let dir = adapter_with(
        &tmp,
        "embed",
        |_| {},
        with(RawTensor::f32(embed, vec![16, 8], &[0.0; 128])),
    );
    assert_names(&load_err(&dir), &dir, &[embed, "unexpected tensor"]);
    let save = "base_model.model.lm_head.modules_to_save.default.weight";
    let dir = adapter_with(
        &tmp,
        "save",
        |_| {},
        with(RawTensor::f32(save, vec![16, 8], &[0.0; 128])),
    );
    assert_names(&load_err(&dir), &dir, &[save, "unexpected tensor"]);
    let dup = q_a.trim_end_matches(".weight").to_string();
    let dir = adapter_with(
        &tmp,
        "dup",
        |_| {},
        with(RawTensor::f32(&dup, vec![2, 8], &[0.0; 16])),
    );
    assert_names(&load_err(&dir), &dir, &["appears twice"]);

    // A listed target with no tensors at all, and an A without its B.
    let dir = adapter_with(
        &tmp,
        "no-k",
        |c| c["target_modules"] = json!(["q_proj", "k_proj", "v_proj"]),
        None,
    );
    assert_names(
        &load_err(&dir),
        &dir,
        &["target module k_proj has no lora_A/lora_B tensors"],
    );
    let mut tensors = small_tensors(2, &QV);
    tensors.retain(|t| t.name != tensor_name(1, Projection::V, "B"));
    let dir = adapter_with(&tmp, "a-only", |_| {}, Some(tensors));
    assert_names(
        &load_err(&dir),
        &dir,
        &[&tensor_name(1, Projection::V, "B"), "missing"],
    );
}

#[test]
fn dtypes_convert_or_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let q_a = tensor_name(0, Projection::Q, "A");
    let values: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 2.0).collect(); // exact in f16 and bf16
    let encoded = |dtype: Dtype| -> Vec<u8> {
        match dtype {
            Dtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::F64 => values
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect(),
            Dtype::I32 => values
                .iter()
                .flat_map(|v| (*v as i32).to_le_bytes())
                .collect(),
            _ => unreachable!(),
        }
    };
    for dtype in [Dtype::F16, Dtype::BF16, Dtype::F64, Dtype::I32] {
        let mut tensors = small_tensors(2, &QV);
        let i = tensors.iter().position(|t| t.name == q_a).unwrap();
        tensors[i] = RawTensor {
            name: q_a.clone(),
            dtype,
            shape: vec![2, 8],
            data: encoded(dtype),
        };
        let dir = adapter_with(&tmp, &format!("{dtype:?}"), |_| {}, Some(tensors));
        if matches!(dtype, Dtype::F16 | Dtype::BF16) {
            let w = load_small(&dir, true);
            assert_eq!(w.layers[0][0].as_ref().unwrap().a, values, "{dtype:?}");
        } else {
            assert_names(&load_err(&dir), &dir, &[&q_a, &format!("dtype {dtype:?}")]);
        }
    }
}

#[test]
fn truncated_weights_are_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = adapter_with(&tmp, "cut", |_| {}, None);
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for len in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        assert_names(&load_err(&dir), &dir, &["not a valid safetensors file"]);
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    std::fs::write(&path, &longer).unwrap();
    assert_names(&load_err(&dir), &dir, &["not a valid safetensors file"]);
}

#[test]
fn generation_follows_the_content() {
    let tmp = tempfile::tempdir().unwrap();
    let a = adapter_with(&tmp, "a", |_| {}, None);
    let b = adapter_with(&tmp, "b", |_| {}, None);
    let alpha = adapter_with(&tmp, "alpha", |c| c["lora_alpha"] = json!(8), None);
    let (wa, wb, wc) = (
        load_small(&a, true),
        load_small(&b, true),
        load_small(&alpha, true),
    );
    assert_eq!(wa.generation, wb.generation, "same bytes, same generation");
    assert_ne!(
        wa.generation, wc.generation,
        "a config change is a new generation"
    );
    assert_eq!(wc.scale, 4.0);
}
