//! PyTorch `.pth` checkpoints (zip + pickle): only tensors and plain
//! containers may be accepted, and nothing is ever run.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(tensors) = agfsync_feedback::pth::read_pth_bytes(data, Path::new("fuzz.pth")) {
        for (_, t) in tensors {
            // Each tensor's data is really there.
            let _ = t
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32));
        }
    }
});
