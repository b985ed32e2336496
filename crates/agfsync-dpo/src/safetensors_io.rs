//! Writing safetensors files with header metadata, durably.
//!
//! candle's writer takes no metadata (PEFT LoRA files carry their
//! `lora_adapter_metadata` there) and does not sync to disk, which atomic
//! checkpoints need; this writer does both. Reading uses candle's loader.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::DpoError;

/// Little-endian bytes and the safetensors dtype name of `t`. Half-precision
/// tensors are widened to F32 (the trainer keeps f32 master weights).
fn tensor_bytes(t: &Tensor) -> candle_core::Result<(&'static str, Vec<u8>)> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F64 => (
            "F64",
            t.to_vec1::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            "U32",
            t.to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            "I64",
            t.to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U8 => ("U8", t.to_vec1::<u8>()?),
        _ => (
            "F32",
            t.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    })
}

/// Writes `tensors` (sorted by name) and `metadata` to `path` and syncs the
/// file to disk. Not atomic by itself: callers write into a temporary
/// location and rename.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<(), DpoError> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let m: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut data: Vec<u8> = Vec::new();
    for name in names {
        let t = &tensors[name];
        let (dtype, bytes) = tensor_bytes(t)?;
        let start = data.len();
        data.extend_from_slice(&bytes);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype,
                "shape": t.dims(),
                "data_offsets": [start, data.len()],
            }),
        );
    }
    let mut head = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| DpoError::Export(format!("safetensors header: {e}")))?;
    // The data section starts 8-byte aligned, as the reference writer does.
    while (head.len() + 8) % 8 != 0 {
        head.push(b' ');
    }
    let io = |e| DpoError::io(path, e);
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    f.write_all(&head).map_err(io)?;
    f.write_all(&data).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Reads every tensor of a safetensors file onto `device`.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, DpoError> {
    if !path.exists() {
        return Err(DpoError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    Ok(candle_core::safetensors::load(path, device)?)
}
