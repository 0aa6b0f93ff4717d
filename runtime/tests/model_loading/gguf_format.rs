//! GGUF container format: value round trips, typed getters, and damaged files.

use caduceus_kernels::quant::{GgmlType, Matrix};
use caduceus_runtime::model::error::ModelError;
use caduceus_runtime::model::gguf::{GgufFile, GgufValue};
use caduceus_runtime::model::gguf_writer::GgufWriter;
use caduceus_runtime::model::weights::TensorStore;

use super::scratch_dir;

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
        .collect()
}

fn all_value_types() -> Vec<(&'static str, GgufValue)> {
    use GgufValue::*;
    vec![
        ("v.u8", U8(250)),
        ("v.i8", I8(-7)),
        ("v.u16", U16(65_000)),
        ("v.i16", I16(-32_000)),
        ("v.u32", U32(4_000_000_000)),
        ("v.i32", I32(-2_000_000_000)),
        ("v.u64", U64(u64::MAX)),
        ("v.i64", I64(i64::MIN)),
        ("v.f32", F32(1.5e-5)),
        ("v.f64", F64(-2.25e100)),
        ("v.true", Bool(true)),
        ("v.false", Bool(false)),
        ("v.string", String("héllo ✓ <|im_start|>".into())),
        ("v.empty_string", String(std::string::String::new())),
        (
            "v.strings",
            Array(vec![String("a".into()), String("Ġthe".into())]),
        ),
        ("v.i32s", Array(vec![I32(1), I32(-2), I32(3)])),
        ("v.f32s", Array(vec![F32(0.5), F32(-0.25)])),
        ("v.empty", Array(vec![])),
        (
            "v.nested",
            Array(vec![Array(vec![U8(1), U8(2)]), Array(vec![U8(3)])]),
        ),
    ]
}

/// Metadata of every type plus F32 (2-D), F16 (1-D) and Q8_0 (2-D) tensors whose odd-length
/// names force padding before the data section.
fn sample_writer(version: u32) -> (GgufWriter, Vec<f32>, Vec<f32>, Matrix) {
    let mut w = GgufWriter::new().version(version);
    w.add_metadata("general.architecture", GgufValue::String("llama".into()));
    for (k, v) in all_value_types() {
        w.add_metadata(k, v);
    }
    let f32_values = ramp(3 * 5, 0.01);
    let f16_values: Vec<f32> = vec![1.0, -0.5, 0.25, 65504.0, -2.0, 0.0, 3.0];
    let f16_bytes = f16_values
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let q8 = Matrix::quantize_q8_0(2, 64, &ramp(128, 0.003));
    w.add_f32("a.f32", &[5, 3], &f32_values);
    w.add_tensor("bb.f16", &[7], 1, f16_bytes);
    w.add_matrix("ccc.q8_0", &q8);
    (w, f32_values, f16_values, q8)
}

#[test]
fn gguf_round_trip_preserves_metadata_and_tensors() {
    for (version, alignment) in [(3, None), (2, None), (3, Some(64u32))] {
        let (mut w, f32_values, f16_values, q8) = sample_writer(version);
        if let Some(a) = alignment {
            w = w.alignment(a);
        }
        let f = GgufFile::from_bytes(w.to_bytes(), "sample.gguf").unwrap();
        assert_eq!(f.version, version);
        for (k, v) in all_value_types() {
            assert_eq!(f.get(k), Some(&v), "{k}");
        }
        assert_eq!(f.architecture().unwrap(), "llama");
        let names: Vec<&str> = f.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.f32", "bb.f16", "ccc.q8_0"]);
        let align = u64::from(alignment.unwrap_or(32));
        for t in &f.tensors {
            assert_eq!(t.offset % align, 0, "{} offset {}", t.name, t.offset);
        }
        let q8_info = f.tensor("ccc.q8_0").unwrap();
        assert_eq!(
            (q8_info.dims.as_slice(), q8_info.ggml_type),
            (&[64u64, 2][..], 8)
        );
        assert_eq!(f.tensor_data(q8_info).unwrap(), &*q8.data());

        let mut store = TensorStore::from_gguf(&f).unwrap();
        let summary: Vec<_> = store.type_summary().into_iter().collect();
        assert_eq!(
            summary,
            [("F16".into(), 1), ("F32".into(), 1), ("Q8_0".into(), 1)]
        );
        let m = store.take_matrix("a.f32", 3, 5).unwrap();
        assert_eq!((m.ty(), m.to_f32()), (GgmlType::F32, f32_values));
        assert_eq!(store.take_vector("bb.f16", 7).unwrap(), f16_values);
        let m = store.take_matrix("ccc.q8_0", 2, 64).unwrap();
        assert_eq!(m.ty(), GgmlType::Q8_0);
        assert_eq!(m.data(), q8.data());
        assert!(store.names().is_empty());
    }
}

#[test]
fn gguf_open_reads_a_file_from_disk() {
    let dir = scratch_dir("gguf-open");
    let path = dir.join("m.gguf");
    let (w, ..) = sample_writer(3);
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.path(), path);
    assert_eq!(f.get_str("v.string"), Some("héllo ✓ <|im_start|>"));
    let missing = GgufFile::open(&dir.join("absent.gguf")).unwrap_err();
    assert!(matches!(missing, ModelError::NotFound { .. }), "{missing}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn typed_getters_convert_only_when_lossless() {
    let (w, ..) = sample_writer(3);
    let f = GgufFile::from_bytes(w.to_bytes(), "sample.gguf").unwrap();
    assert_eq!(f.get_u64("v.u8"), Some(250));
    assert_eq!(f.get_u64("v.u64"), Some(u64::MAX));
    assert_eq!(f.get_u64("v.i8"), None, "negative");
    assert_eq!(f.get_u64("v.f32"), None, "float");
    assert_eq!(f.get_f32("v.u16"), Some(65_000.0));
    assert_eq!(f.get_f32("v.f64"), Some(-2.25e100_f64 as f32));
    assert_eq!(f.get_bool("v.true"), Some(true));
    assert_eq!(f.get_bool("v.u8"), None);
    assert_eq!(f.get_str("v.u8"), None);
    assert_eq!(f.get_str_array("v.strings"), Some(vec!["a", "Ġthe"]));
    assert_eq!(f.get_str_array("v.i32s"), None);
    assert_eq!(f.get_str_array("v.empty"), Some(vec![]));
    assert_eq!(f.get_i64_array("v.i32s"), Some(vec![1, -2, 3]));
    assert_eq!(f.get_i64_array("v.strings"), None);
    assert_eq!(f.get("no.such.key"), None);
}

fn expect_corrupt(bytes: Vec<u8>, needle: &str) {
    match GgufFile::from_bytes(bytes, "bad.gguf") {
        Err(e @ ModelError::Corrupt { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("bad.gguf") && msg.contains(needle), "{msg}");
        }
        other => panic!("expected Corrupt mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn every_truncation_is_an_error() {
    let (w, ..) = sample_writer(3);
    let bytes = w.to_bytes();
    for cut in 0..bytes.len() {
        let result = GgufFile::from_bytes(bytes[..cut].to_vec(), "cut.gguf");
        assert!(
            matches!(result, Err(ModelError::Corrupt { .. })),
            "cut at {cut}: {result:?}"
        );
    }
}

/// Header offsets of the first metadata key's length, for hand-made corruption.
const TENSOR_COUNT_AT: usize = 8;
const KV_COUNT_AT: usize = 16;
const FIRST_KEY_LEN_AT: usize = 24;

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn bad_headers_are_clear_errors() {
    let (w, ..) = sample_writer(3);
    let good = w.to_bytes();

    let mut b = good.clone();
    b[0] = b'X';
    expect_corrupt(b, "magic");
    for version in [1u32, 4, 0x0300_0000] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&version.to_le_bytes());
        let err = GgufFile::from_bytes(b, "v.gguf").unwrap_err();
        assert!(
            matches!(err, ModelError::UnsupportedGgufVersion(v) if v == version),
            "{err}"
        );
    }
    for (at, needle) in [
        (TENSOR_COUNT_AT, "tensor count"),
        (KV_COUNT_AT, "metadata count"),
        (FIRST_KEY_LEN_AT, "metadata key"),
    ] {
        for absurd in [u64::MAX, 1 << 40, good.len() as u64] {
            let mut b = good.clone();
            put_u64(&mut b, at, absurd);
            expect_corrupt(b, needle);
        }
    }
}

#[test]
fn bad_values_and_tensor_entries_are_clear_errors() {
    let one = |key: &str, value: GgufValue| {
        let mut w = GgufWriter::new();
        w.add_metadata(key, value);
        w.to_bytes()
    };
    // Array count field sits after key (8 + len), value type (4) and element type (4).
    let mut b = one("arr", GgufValue::Array(vec![GgufValue::U32(1)]));
    put_u64(&mut b, FIRST_KEY_LEN_AT + 8 + 3 + 8, u64::MAX / 2);
    expect_corrupt(b, "arr");
    let mut b = one("s", GgufValue::String("x".into()));
    put_u64(&mut b, FIRST_KEY_LEN_AT + 8 + 1 + 4, 1 << 50);
    expect_corrupt(b, "s");
    let mut b = one("t", GgufValue::U8(1));
    b[FIRST_KEY_LEN_AT + 8 + 1] = 13;
    expect_corrupt(b, "unknown value type 13");
    let mut b = one("s", GgufValue::String("ab".into()));
    let end = b.len();
    b[end - 1] = 0xff;
    expect_corrupt(b, "UTF-8");

    let mut deep = GgufValue::U8(0);
    for _ in 0..20 {
        deep = GgufValue::Array(vec![deep]);
    }
    expect_corrupt(one("deep", deep), "nested");

    let mut w = GgufWriter::new();
    w.add_metadata("k", GgufValue::U8(1));
    w.add_metadata("k", GgufValue::U8(2));
    expect_corrupt(w.to_bytes(), "duplicate metadata key k");
    let mut w = GgufWriter::new();
    w.add_metadata("general.alignment", GgufValue::U32(24));
    expect_corrupt(w.to_bytes(), "general.alignment");

    let tensor = |dims: &[u64], ty: u32, data: Vec<u8>| {
        let mut w = GgufWriter::new();
        w.add_tensor("t.weight", dims, ty, data);
        w.add_tensor("u.weight", &[4], 0, vec![0; 16]);
        w
    };
    expect_corrupt(tensor(&[0, 4], 0, vec![]).to_bytes(), "zero dimension");
    expect_corrupt(tensor(&[2; 5], 0, vec![0; 128]).to_bytes(), "rank 5");
    expect_corrupt(
        tensor(&[33, 1], 8, vec![0; 34]).to_bytes(),
        "multiple of 32",
    );
    let mut w = tensor(&[4, 4], 0, vec![0; 64]);
    w.add_tensor("t.weight", &[4], 0, vec![0; 16]);
    expect_corrupt(w.to_bytes(), "duplicate tensor name t.weight");

    // Directory entries claiming more data than the file has.
    let mut b = tensor(&[4, 4], 0, vec![0; 64]).to_bytes();
    b.truncate(b.len() - 1);
    expect_corrupt(b, "u.weight");
    let huge = tensor(&[1 << 31, 1 << 31], 0, vec![0; 64]).to_bytes();
    expect_corrupt(huge, "t.weight");
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap()
}

#[test]
fn tensor_offsets_are_checked() {
    let mut w = GgufWriter::new();
    w.add_f32("t.weight", &[8], &[1.0; 8]);
    let good = w.to_bytes();
    // The offset field follows name, rank (4), one dim (8) and type (4).
    let at = find(&good, b"t.weight") + 8 + 4 + 8 + 4;
    for (offset, needle) in [
        (16u64, "alignment"),
        (1 << 20, "past the end"),
        (u64::MAX - 31, "past the end"),
    ] {
        let mut b = good.clone();
        put_u64(&mut b, at, offset);
        expect_corrupt(b, needle);
    }
}

#[test]
fn random_byte_damage_never_panics() {
    let (w, ..) = sample_writer(3);
    let good = w.to_bytes();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..3000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = good.clone();
        let at = (state % good.len() as u64) as usize;
        b[at] = (state >> 32) as u8;
        if let Ok(f) = GgufFile::from_bytes(b, "fuzz.gguf") {
            let _ = TensorStore::from_gguf(&f);
        }
    }
}

#[test]
fn unknown_tensor_types_fail_on_use_not_on_open() {
    let mut w = GgufWriter::new();
    w.add_tensor("odd.weight", &[4, 2], 99, vec![0; 32]);
    w.add_tensor("iq.weight", &[256, 1], 19, vec![0; 50]);
    let f = GgufFile::from_bytes(w.to_bytes(), "odd.gguf").unwrap();
    let err = f.tensor_data(&f.tensors[0]).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedType { tensor, .. } if tensor == "odd.weight"),
        "{err}"
    );
    assert_eq!(f.tensor_data(&f.tensors[1]).unwrap().len(), 50);
    let err = TensorStore::from_gguf(&f).unwrap_err().to_string();
    assert!(
        err.contains("odd.weight") && err.contains("ggml type id 99"),
        "{err}"
    );
}
