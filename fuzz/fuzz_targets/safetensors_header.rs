//! safetensors files: our header and byte-range checks, the safetensors
//! crate's parse, and single-file checkpoint inspection (family, UNet
//! weights, VAE, text encoders).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.safetensors");
    let checked = agfsync_models::weights::check_safetensors_bytes(data, path).is_ok();
    if let Ok(info) = agfsync_models::single_file::inspect_safetensors_bytes(data, path) {
        assert!(
            checked,
            "inspection accepted a file the header check refuses"
        );
        let _ = format!("{info:?}");
        // Every tensor the header lists can be read.
        if let Ok(st) = candle_core::safetensors::SliceSafetensors::new(data) {
            for (name, _) in st.tensors() {
                let _ = st.load(&name, &candle_core::Device::Cpu);
            }
        }
    }
});
