//! Inputs the fuzz targets (fuzz/) found crashing, kept as regression
//! tests named for the bug.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use agfsync_models::lora::LoraFile;
use agfsync_models::weights::check_safetensors_bytes;

/// A safetensors file of one F32 tensor `name` with `shape` and no data.
fn safetensors(name: &str, shape: &[u64]) -> Vec<u8> {
    let header = serde_json::json!({
        name: {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    })
    .to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out
}

#[test]
fn zero_sized_tensor_with_overflowing_shape_does_not_panic() {
    // Found by `lora_keys`: a shape with a 0 needs no bytes, so the
    // safetensors crate accepts it, but candle's strides overflow (a panic
    // with debug assertions, a wrapped stride without).
    let bytes = safetensors(
        "unet.down.lora_A.weight",
        &[0, 322_222_222_222_222, 3_222_222, 32],
    );
    let err = check_safetensors_bytes(&bytes, Path::new("x.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("impossible shape"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("lora.safetensors");
    std::fs::write(&f, &bytes).unwrap();
    let err = LoraFile::load(&f).unwrap_err().to_string();
    assert!(err.contains("impossible shape"), "{err}");
    // An ordinary zero-sized tensor is still accepted.
    let ok = safetensors("empty", &[0, 4]);
    assert!(check_safetensors_bytes(&ok, Path::new("x.safetensors")).is_ok());
}
