//! `agfsync score-images --metrics vqa` end to end on the tiny random
//! LLaVA (written offline by `agfsync_feedback::llava::write_tiny_llava`),
//! and its input errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agfsync"));
    c.env("HF_HUB_OFFLINE", "1").env("RUST_BACKTRACE", "1");
    c
}

fn image() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/vqa/images/wide.png")
}

fn score(model: &Path, questions: Option<&Path>) -> Result<Output> {
    let mut c = bin();
    c.args(["score-images", "--metrics", "vqa", "--prompt", "a red cube"])
        .arg("--images")
        .arg(image())
        .arg("--vqa-model")
        .arg(model);
    if let Some(q) = questions {
        c.arg("--questions").arg(q);
    }
    c.output().context("running agfsync")
}

fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "expected `{n}` in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

#[test]
fn score_images_vqa_on_the_tiny_llava() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("tiny-llava");
    agfsync_feedback::llava::write_tiny_llava(&model, 0)?;
    let questions = tmp.path().join("questions.jsonl");
    std::fs::write(
        &questions,
        "{\"question\": \"is there a red cube ?\", \"choices\": [\"yes\", \"no\"], \"answer\": \"yes\"}\n\
         {\"question\": \"What color is the cube ?\", \"choices\": [\"red\", \"blue\", \"green\"], \"answer\": \"red\"}\n",
    )?;
    let out = score(&model, Some(&questions))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let line: serde_json::Value =
        serde_json::from_str(stdout.lines().next().context("no output")?)?;
    let v = line["scores"]["vqa"].as_f64().context("scores.vqa")?;
    assert!((0.0..=100.0).contains(&v), "{v}");
    // 2 questions: the score is 0, 50 or 100.
    assert!([0.0, 50.0, 100.0].contains(&v), "{v}");
    assert!(line["versions"]["vqa"]
        .as_str()
        .context("version")?
        .contains("vqa-score/1"));
    let d = &line["details"]["vqa"];
    assert_eq!(d["questions"].as_f64(), Some(2.0));
    for k in ["vqascore", "p_yes_mean", "q0.p_yes", "q1.answer", "correct"] {
        assert!(d[k].is_number(), "{k} in {d}");
    }
    Ok(())
}

#[test]
fn vqa_input_errors_are_clean() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = tmp.path().join("tiny-llava");
    agfsync_feedback::llava::write_tiny_llava(&model, 0)?;
    // A questions file that does not parse names its line.
    let bad = tmp.path().join("questions.jsonl");
    std::fs::write(&bad, "{\"question\": \"a ?\"}\n{\"question\": [1]}\n")?;
    assert_clean_error(&score(&model, Some(&bad))?, &["questions.jsonl", "line 2"]);
    // No model.
    let out = bin()
        .args([
            "score-images",
            "--metrics",
            "vqa",
            "--prompt",
            "x",
            "--images",
        ])
        .arg(image())
        .output()?;
    assert_clean_error(&out, &["--vqa-model"]);
    // A question template without its placeholder.
    let out = bin()
        .args(["score-images", "--metrics", "vqa", "--prompt", "x"])
        .args(["--vqa-question-template", "Answer:"])
        .arg("--images")
        .arg(image())
        .arg("--vqa-model")
        .arg(&model)
        .output()?;
    assert_clean_error(&out, &["{question}"]);
    // A model folder without its tokenizer names the file and the fix.
    std::fs::remove_file(model.join("tokenizer.json"))?;
    assert_clean_error(
        &score(&model, None)?,
        &["tokenizer.json", "save_pretrained"],
    );
    Ok(())
}
