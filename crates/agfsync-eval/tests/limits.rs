//! Benchmark files over the size limit are refused before they are read.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use agfsync_eval::benchmarks::{read_hps_prompts_with, read_tifa_with};

#[test]
fn benchmark_file_over_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tifa.json");
    std::fs::write(
        &f,
        r#"[{"id":"1","caption":"a cat","question":"is there a cat?","choices":["yes","no"],"answer":"yes","element_type":"animal"}]"#,
    )
    .unwrap();
    assert_eq!(read_tifa_with(&f, 1 << 20).unwrap().len(), 1);
    let err = read_tifa_with(&f, 50).unwrap_err().to_string();
    assert!(err.contains("more than the 50 allowed"), "{err}");
    assert!(err.contains("max_input_file_bytes"), "{err}");
    let h = dir.path().join("hps.json");
    std::fs::write(&h, r#"{"photo": ["a lake"]}"#).unwrap();
    assert!(read_hps_prompts_with(&h, 1 << 20).is_ok());
    let err = read_hps_prompts_with(&h, 5).unwrap_err().to_string();
    assert!(err.contains("max_input_file_bytes"), "{err}");
}
