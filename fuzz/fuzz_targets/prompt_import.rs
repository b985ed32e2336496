//! Prompt and benchmark importers: prompt files (.txt, .jsonl, .csv), TIFA
//! question files (run and benchmark readers) and HPSv2 prompt files. The
//! first byte picks the reader.
#![no_main]

use std::path::Path;

use agfsync_pipeline::prompts::{parse_prompt_text, parse_tifa_questions, InputLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let limits = InputLimits {
        max_prompt_chars: 200,
        ..InputLimits::default()
    };
    match which % 6 {
        0 | 1 | 2 => {
            let name = ["p.txt", "p.jsonl", "p.csv"][usize::from(which % 6)];
            if let Ok(prompts) = parse_prompt_text(text, Path::new(name), &limits) {
                assert!(!prompts.is_empty());
                for (i, p) in prompts.iter().enumerate() {
                    assert_eq!(p.ord, i as i64);
                    assert!(!p.text.is_empty());
                    assert!(p.text.chars().count() <= limits.max_prompt_chars);
                }
            }
        }
        3 => {
            let _ = parse_tifa_questions(text, Path::new("tifa.json"), &limits);
        }
        4 => {
            if let Ok(caps) = agfsync_eval::benchmarks::parse_tifa(text, Path::new("tifa.json")) {
                assert!(!caps.is_empty());
                // Scoring every caption with its correct answers is 100%.
                let answers: Vec<Vec<String>> = caps
                    .iter()
                    .map(|c| c.questions.iter().map(|q| q.answer.clone()).collect())
                    .collect();
                let _ = agfsync_eval::benchmarks::tifa_score(&caps, &answers);
            }
        }
        _ => {
            let _ = agfsync_eval::benchmarks::parse_hps_prompts_text(text, Path::new("hps.json"));
        }
    }
});
