//! `agfsync score-images --metrics hps` end to end, on the HPSv2 parity
//! fixture (a tiny random open_clip model run through HPSv2's own code by
//! tools/parity/make_hps_fixtures.py).

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, Result};
use candle_core::Device;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/hps")
}

fn run(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_agfsync"))
        .env("HF_HUB_OFFLINE", "1")
        .env("RUST_BACKTRACE", "1")
        .args(args)
        .output()
        .context("running agfsync")
}

fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

#[test]
fn score_images_hps_matches_hpsv2_and_records_the_version() -> Result<()> {
    let f = fixtures();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(f.join("ref.json"))?)?;
    let refs = candle_core::safetensors::load(f.join("ref.safetensors"), &Device::Cpu)?;
    let hps: Vec<Vec<f32>> = refs["hps"].to_vec2()?;
    let prompt = meta["prompts"][1].as_str().context("prompt")?;
    let images: Vec<String> = meta["images"]
        .as_array()
        .context("images")?
        .iter()
        .map(|i| {
            f.join(i["file"].as_str().unwrap_or_default())
                .display()
                .to_string()
        })
        .collect();
    for (model, version, expect) in [
        ("tiny-hps.pt", Some("v2.0"), "checkpoint=v2.0"),
        ("tiny-hps.safetensors", None, "checkpoint=unknown"),
    ] {
        let model = f.join(model);
        let mut args = vec![
            "score-images",
            "--prompt",
            prompt,
            "--metrics",
            "hps",
            "--hps-model",
            model.to_str().context("utf8")?,
            "--batch-size",
            "4",
        ];
        if let Some(v) = version {
            args.extend(["--hps-version", v]);
        }
        args.push("--images");
        args.extend(images.iter().map(String::as_str));
        let out = run(&args)?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines.len(), images.len());
        for (i, line) in lines.iter().enumerate() {
            let v = line["scores"]["hps"].as_f64().context("hps")?;
            assert!(
                (v - f64::from(hps[i][1])).abs() < 1e-3,
                "{}: hps {v} vs {}",
                images[i],
                hps[i][1]
            );
            let ver = line["versions"]["hps"].as_str().context("version")?;
            assert!(ver.contains(expect) && ver.contains("hpsv2/1"), "{ver}");
        }
    }
    Ok(())
}

#[test]
fn hps_without_a_model_or_with_a_bad_checkpoint_is_a_clean_error() -> Result<()> {
    let f = fixtures();
    let img = f.join("images/rgb_tall.png");
    let img = img.to_str().context("utf8")?;
    let out = run(&[
        "score-images",
        "--prompt",
        "x",
        "--metrics",
        "hps",
        "--images",
        img,
    ])?;
    assert_clean_error(&out, "--hps-model");
    let bad = f.join("bad-object.pt");
    let out = run(&[
        "score-images",
        "--prompt",
        "x",
        "--metrics",
        "hps",
        "--hps-model",
        bad.to_str().context("utf8")?,
        "--images",
        img,
    ])?;
    assert_clean_error(&out, "bad-object.pt");
    assert_clean_error(&out, "note");
    let out = run(&[
        "score-images",
        "--prompt",
        "x",
        "--metrics",
        "hps",
        "--hps-model",
        f.join("tiny-hps.pt").to_str().context("utf8")?,
        "--hps-version",
        "3",
        "--images",
        img,
    ])?;
    assert_clean_error(&out, "v2.0 and v2.1");
    Ok(())
}
