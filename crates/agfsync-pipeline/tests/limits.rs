//! `[limits]`: prompts, captions and input files beyond their bounds are
//! refused with an error that names the limit and the key that raises it.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::path::Path;

use agfsync_pipeline::config::{template, Preset, RunConfig};
use agfsync_pipeline::prompts::{
    read_prompt_file_with, read_tifa_questions_with, InputLimits, DEFAULT_MAX_PROMPT_CHARS,
};

#[test]
fn prompt_longer_than_max_prompt_chars_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = InputLimits {
        max_prompt_chars: 20,
        ..InputLimits::default()
    };
    for (name, text) in [
        ("p.txt", format!("a cat\n{}\n", "long ".repeat(10))),
        (
            "p.jsonl",
            format!("{{\"prompt\": \"{}\"}}\n", "y".repeat(21)),
        ),
        ("p.csv", format!("prompt\n{}\n", "z".repeat(21))),
    ] {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        let err = read_prompt_file_with(&f, &limits).unwrap_err().to_string();
        assert!(err.contains("longer than 20 characters"), "{name}: {err}");
        assert!(err.contains("[limits] max_prompt_chars"), "{name}: {err}");
    }
    // Exactly at the limit is accepted.
    let f = dir.path().join("ok.txt");
    std::fs::write(&f, format!("{}\n", "w".repeat(20))).unwrap();
    assert_eq!(read_prompt_file_with(&f, &limits).unwrap().len(), 1);
}

#[test]
fn tifa_question_longer_than_max_prompt_chars_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("tifa.json");
    let q = "why ".repeat(30);
    std::fs::write(&f, format!(r#"[{{"caption":"a cat","question":"{q}"}}]"#)).unwrap();
    let limits = InputLimits {
        max_prompt_chars: 100,
        ..InputLimits::default()
    };
    let err = read_tifa_questions_with(&f, &limits)
        .unwrap_err()
        .to_string();
    assert!(err.contains("entry 0: the question"), "{err}");
    assert!(err.contains("max_prompt_chars"), "{err}");
}

#[test]
fn prompt_file_over_max_input_file_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.txt");
    std::fs::write(&f, "a cat\n".repeat(100)).unwrap();
    let limits = InputLimits {
        max_file_bytes: 100,
        ..InputLimits::default()
    };
    let err = read_prompt_file_with(&f, &limits).unwrap_err().to_string();
    assert!(
        err.contains("600 bytes, more than the 100 allowed"),
        "{err}"
    );
    assert!(err.contains("[limits] max_input_file_bytes"), "{err}");
}

#[test]
fn limits_section_reads_and_defaults() {
    let cfg = RunConfig::from_toml(&template(Preset::Tiny), Path::new("agfsync.toml")).unwrap();
    assert_eq!(cfg.limits.max_prompt_chars, DEFAULT_MAX_PROMPT_CHARS);
    assert_eq!(cfg.limits.max_image_pixels, 178_956_970);
    let text = format!(
        "{}\n[limits]\nmax_image_pixels = 4096\nmax_prompt_chars = 10\n",
        template(Preset::Tiny)
    );
    let cfg = RunConfig::from_toml(&text, Path::new("agfsync.toml")).unwrap();
    assert_eq!(cfg.limits.decode_options().max_pixels, 4096);
    assert_eq!(cfg.limits.input().max_prompt_chars, 10);
    let bad = format!(
        "{}\n[limits]\nmax_prompt_chars = 0\n",
        template(Preset::Tiny)
    );
    let err = RunConfig::from_toml(&bad, Path::new("agfsync.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits"), "{err}");
}
