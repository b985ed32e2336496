//! `agfsync.toml`: the run config reader (TOML, serde, our validation).
#![no_main]

use std::path::Path;

use agfsync_pipeline::config::RunConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = RunConfig::from_toml(text, Path::new("agfsync.toml")) else {
        return;
    };
    // A config that validated writes back to TOML that reads and validates
    // again, to the same value (NaN, unequal to itself, excepted).
    let Ok(again) = toml::to_string(&cfg) else {
        return;
    };
    let back = RunConfig::from_toml(&again, Path::new("agfsync.toml"))
        .expect("a written config reads back");
    if !format!("{cfg:?}").contains("NaN") {
        assert_eq!(back, cfg);
    }
    let _ = cfg.data_fingerprint();
});
