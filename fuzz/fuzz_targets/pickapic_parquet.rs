//! Pick-a-Pic Parquet pairs: the store's reader and the DPO import's row
//! checks (columns, labels, image decoding and preprocessing, size limits).
#![no_main]

use std::path::Path;

use agfsync_dpo::pickapic::{check_parquet_bytes, ImportOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts on every panic, even one caught: the readers
    // catch the parquet crate's decoder assertions on corrupt pages
    // (`GuardedRows`) and return an error, which is the behaviour under
    // test. The default hook is restored so only a panic that escapes the
    // readers reaches libfuzzer-sys's own handler and counts as a crash.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let path = Path::new("fuzz.parquet");
    if let Ok(rows) = agfsync_store::pickapic::read_pickapic_bytes(data.to_vec(), path, 1 << 20) {
        for r in &rows {
            assert!(r.label_0.is_finite());
        }
    }
    let opts = ImportOptions {
        max_pixels: 1 << 16,
        max_row_bytes: 1 << 20,
        max_bad_fraction: 1.0,
        ..ImportOptions::new(8)
    };
    if let Ok(report) = check_parquet_bytes(data.to_vec(), path, &opts) {
        assert!(
            report.pairs + report.ties_dropped + report.unlabelled + report.bad_images
                <= report.rows
        );
    }
});
