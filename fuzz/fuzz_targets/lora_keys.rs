//! LoRA key mapping: a tensor set (names and shapes, as a LoRA file would
//! hold) parsed into modules. The input is text, one tensor a line,
//! `name dim dim ...`; `@key=value` lines are header metadata.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use libfuzzer_sys::fuzz_target;

/// Keeps one input's tensors small.
const MAX_ELEMENTS: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut tensors = HashMap::new();
    let mut metadata = HashMap::new();
    let mut total = 0usize;
    for line in text.lines() {
        if let Some(kv) = line.strip_prefix('@') {
            if let Some((k, v)) = kv.split_once('=') {
                metadata.insert(k.to_string(), v.to_string());
            }
            continue;
        }
        let mut parts = line.split_whitespace();
        let Some(name) = parts.next() else { continue };
        let dims: Vec<usize> = parts.filter_map(|d| d.parse().ok()).take(4).collect();
        // Zeros count as ones: a zero-sized tensor with huge other
        // dimensions is refused by the safetensors readers (`check_shape`)
        // before it reaches the mapping.
        let n = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d.max(1)));
        match n {
            // checked: a single shape's size may be near usize::MAX (the
            // harness's own sum once overflowed on such an input).
            Some(n) if total.checked_add(n).is_some_and(|t| t <= MAX_ELEMENTS) => total += n,
            _ => return,
        }
        let Ok(t) = Tensor::ones(dims.as_slice(), DType::F32, &Device::Cpu) else {
            return;
        };
        tensors.insert(name.to_string(), t);
    }
    if let Ok(lora) = agfsync_models::lora::LoraFile::from_tensors(
        Path::new("fuzz.safetensors"),
        tensors,
        &metadata,
    ) {
        let _ = lora.format();
        let _ = lora.ranks();
        let _ = lora.rank();
        let _ = lora.ignored();
        for m in lora.modules() {
            let _ = (m.model.name(), m.rank(), m.base_scale());
        }
    }
});
