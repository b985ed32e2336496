//! Bad inputs give clear errors that name the file, and never stop the
//! other images from being scored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agfsync_feedback::aesthetic::{AestheticHead, AestheticScorer};
use agfsync_feedback::clip::ClipModel;
use agfsync_feedback::image_input::{load_image, DecodeOptions, Grey16};
use agfsync_feedback::score_images::{
    load_scorers, score_images, Metric, ScoreImagesOptions, ScorerSpec,
};
use agfsync_feedback::scorer::ScoreRequest;
use agfsync_feedback::FeedbackError;
use agfsync_models::hub::ModelSource;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/feedback")
}

fn clip() -> Result<Arc<ClipModel>> {
    Ok(Arc::new(ClipModel::load(
        &ModelSource::local(root().join("tiny-clip")),
        DType::F32,
        &Device::Cpu,
    )?))
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, bytes)?;
    Ok(p)
}

fn assert_mentions(e: &impl std::fmt::Display, needles: &[&str]) {
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

#[test]
fn unreadable_images_are_clear_errors() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let png = std::fs::read(root().join("images/rgb_wide.png"))?;
    let jpg = std::fs::read(root().join("images/photo.jpg"))?;
    let prog = std::fs::read(root().join("images/photo_progressive.jpg"))?;
    let opts = DecodeOptions::default();
    let cases: Vec<(PathBuf, Vec<&str>)> = vec![
        (
            write(tmp.path(), "half.png", &png[..png.len() / 2])?,
            vec!["half.png", "truncated or damaged"],
        ),
        (
            write(tmp.path(), "half.jpg", &jpg[..jpg.len() / 2])?,
            vec!["half.jpg", "truncated"],
        ),
        (
            write(tmp.path(), "cut.jpg", &prog[..prog.len() - 40])?,
            vec!["cut.jpg", "truncated"],
        ),
        (
            write(tmp.path(), "noeoi.jpg", &jpg[..jpg.len() - 2])?,
            vec!["noeoi.jpg", "truncated"],
        ),
        (
            write(
                tmp.path(),
                "notes.png",
                b"these are my notes, not a picture",
            )?,
            vec!["notes.png", "not an image"],
        ),
        (
            write(tmp.path(), "empty.jpg", b"")?,
            vec!["empty.jpg", "empty"],
        ),
        (
            write(tmp.path(), "header.png", &png[..20])?,
            vec!["header.png"],
        ),
        (
            write(
                tmp.path(),
                "pic.gif",
                b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
            )?,
            vec!["pic.gif", "not supported"],
        ),
    ];
    for (path, needles) in cases {
        let e = load_image(&path, &opts).expect_err("must fail");
        assert!(matches!(e, FeedbackError::Image { .. }), "{e}");
        assert_mentions(&e, &needles);
    }
    let e = load_image(tmp.path().join("missing.png"), &opts).expect_err("missing");
    assert!(matches!(e, FeedbackError::Io { .. }));
    assert_mentions(&e, &["missing.png"]);
    Ok(())
}

#[test]
fn grey16_policy_is_selectable() -> Result<()> {
    let p = root().join("images/grey16.png");
    let pil = load_image(&p, &DecodeOptions::default())?;
    let scaled = load_image(
        &p,
        &DecodeOptions {
            grey16: Grey16::Scale,
            ..DecodeOptions::default()
        },
    )?;
    // Pillow clips: nearly everything is white. Scaling keeps the gradient.
    let white = |v: &[u8]| v.iter().filter(|&&x| x == 255).count() as f64 / v.len() as f64;
    assert!(white(&pil.rgb) > 0.9, "{}", white(&pil.rgb));
    assert!(white(&scaled.rgb) < 0.1, "{}", white(&scaled.rgb));
    Ok(())
}

fn head_tensors(widths: &[usize]) -> Result<HashMap<String, Tensor>> {
    let mut t = HashMap::new();
    for (n, i) in [0, 2, 4, 6, 7].iter().enumerate() {
        let (inp, out) = (widths[n], widths[n + 1]);
        t.insert(
            format!("layers.{i}.weight"),
            Tensor::ones((out, inp), DType::F32, &Device::Cpu)?,
        );
        t.insert(
            format!("layers.{i}.bias"),
            Tensor::zeros(out, DType::F32, &Device::Cpu)?,
        );
    }
    Ok(t)
}

#[test]
fn aesthetic_head_errors_name_the_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let model = clip()?;

    // A head for 64-wide embeddings on a 32-wide CLIP.
    let wide = tmp.path().join("wide-head.safetensors");
    candle_core::safetensors::save(&head_tensors(&[64, 16, 8, 8, 4, 1])?, &wide)?;
    let head = AestheticHead::load(&wide, &Device::Cpu)?;
    let e = AestheticScorer::new(model.clone(), head).expect_err("width mismatch");
    assert!(
        matches!(
            e,
            FeedbackError::WidthMismatch {
                head_width: 64,
                clip_width: 32,
                ..
            }
        ),
        "{e}"
    );
    assert_mentions(&e, &["wide-head.safetensors", "64", "32"]);

    // load_scorers fails before loading CLIP when the head is bad.
    let spec = ScorerSpec {
        metrics: vec![Metric::Aesthetic],
        clip_model: Some(ModelSource::local(root().join("tiny-clip"))),
        aesthetic_model: Some(wide.clone()),
        ..ScorerSpec::default()
    };
    let e = load_scorers(&spec)
        .err()
        .expect("width mismatch through load_scorers");
    assert_mentions(&e, &["wide-head.safetensors", "64", "32"]);

    // Missing layer, broken chain, wrong output width.
    let mut t = head_tensors(&[32, 16, 8, 8, 4, 1])?;
    t.remove("layers.7.weight");
    let p = tmp.path().join("partial.safetensors");
    candle_core::safetensors::save(&t, &p)?;
    let e = AestheticHead::load(&p, &Device::Cpu).expect_err("missing key");
    assert_mentions(&e, &["partial.safetensors", "layers.7.weight"]);
    let mut t = head_tensors(&[32, 16, 8, 8, 4, 1])?;
    t.insert(
        "layers.4.weight".into(),
        Tensor::ones((8, 9), DType::F32, &Device::Cpu)?,
    );
    let p = tmp.path().join("chain.safetensors");
    candle_core::safetensors::save(&t, &p)?;
    let e = AestheticHead::load(&p, &Device::Cpu).expect_err("broken chain");
    assert_mentions(
        &e,
        &[
            "chain.safetensors",
            "layers.4.weight",
            "9 inputs",
            "gives 8",
        ],
    );
    let p = tmp.path().join("two.safetensors");
    candle_core::safetensors::save(&head_tensors(&[32, 16, 8, 8, 4, 2])?, &p)?;
    let e = AestheticHead::load(&p, &Device::Cpu).expect_err("two outputs");
    assert_mentions(&e, &["two.safetensors", "expected 1"]);

    // Not a weights file at all, and a truncated safetensors file.
    let p = write(
        tmp.path(),
        "junk.bin",
        b"\x07\x00\x00\x00\x00\x00\x00\x00garbage",
    )?;
    let e = AestheticHead::load(&p, &Device::Cpu).expect_err("junk");
    assert_mentions(&e, &["junk.bin", "safetensors"]);
    let st = std::fs::read(root().join("aesthetic-head.safetensors"))?;
    let p = write(tmp.path(), "cut.safetensors", &st[..st.len() - 100])?;
    let e = AestheticHead::load(&p, &Device::Cpu).expect_err("truncated safetensors");
    assert_mentions(&e, &["cut.safetensors"]);
    let e = AestheticHead::load(&tmp.path().join("nope.pth"), &Device::Cpu).expect_err("missing");
    assert_mentions(&e, &["nope.pth"]);

    // A .pth saved under another extension still loads (told apart by content).
    let p = tmp.path().join("head.bin");
    std::fs::copy(root().join("aesthetic-head.pth"), &p)?;
    AestheticScorer::new(model, AestheticHead::load(&p, &Device::Cpu)?)?;
    Ok(())
}

#[test]
fn unsafe_or_odd_pth_files_are_refused() -> Result<()> {
    let e = AestheticHead::load(&root().join("bad-global.pth"), &Device::Cpu).expect_err("global");
    assert!(matches!(e, FeedbackError::Weights { .. }), "{e}");
    assert_mentions(
        &e,
        &["bad-global.pth", "layers.7.bias", "print`", "weights_only"],
    );
    let e = AestheticHead::load(&root().join("bad-object.pth"), &Device::Cpu).expect_err("object");
    assert_mentions(&e, &["bad-object.pth", "`note`", "string"]);

    let tmp = tempfile::tempdir()?;
    let pth = std::fs::read(root().join("aesthetic-head.pth"))?;
    let p = write(tmp.path(), "cut.pth", &pth[..pth.len() / 2])?;
    let e = AestheticHead::load(&p, &Device::Cpu).expect_err("truncated pth");
    assert_mentions(&e, &["cut.pth"]);
    Ok(())
}

#[test]
fn preprocessor_config_must_fit_the_model() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("clip");
    std::fs::create_dir(&dir)?;
    for e in std::fs::read_dir(root().join("tiny-clip"))? {
        let p = e?.path();
        if let Some(name) = p.file_name() {
            std::fs::copy(&p, dir.join(name))?;
        }
    }
    let cfg_path = dir.join("preprocessor_config.json");
    let cfg = std::fs::read_to_string(&cfg_path)?;
    std::fs::write(&cfg_path, cfg.replace("\"height\": 32", "\"height\": 48"))?;
    let e = ClipModel::load(&ModelSource::local(&dir), DType::F32, &Device::Cpu).expect_err("crop");
    assert_mentions(&e, &["preprocessor_config.json", "32x32", "48x32"]);
    std::fs::write(&cfg_path, "{\"size\": \"big\"}")?;
    let e = ClipModel::load(&ModelSource::local(&dir), DType::F32, &Device::Cpu).expect_err("size");
    assert_mentions(&e, &["preprocessor_config.json", "size"]);
    // Without a preprocessor config, CLIPImageProcessor's defaults at the
    // model's size are used: here the same as the fixture's config.
    std::fs::remove_file(&cfg_path)?;
    let m = ClipModel::load(&ModelSource::local(&dir), DType::F32, &Device::Cpu)?;
    let original = clip()?;
    assert_eq!(m.processor().config(), original.processor().config());
    Ok(())
}

#[test]
fn score_images_reports_every_image_and_scores_the_good_ones() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let png = std::fs::read(root().join("images/rgb_wide.png"))?;
    let good_png = root().join("images/rgb_wide.png");
    let good_jpg = root().join("images/photo.jpg");
    let half = write(tmp.path(), "half.png", &png[..png.len() / 2])?;
    let text = write(tmp.path(), "readme.png", b"not an image")?;
    let missing = tmp.path().join("missing.png");
    let paths = vec![good_png.clone(), half, missing, text, good_jpg.clone()];

    let spec = ScorerSpec {
        metrics: Metric::parse_list("clip, aesthetic")?,
        clip_model: Some(ModelSource::local(root().join("tiny-clip"))),
        aesthetic_model: Some(root().join("aesthetic-head.pth")),
        batch_size: 3,
        ..ScorerSpec::default()
    };
    let scorers = load_scorers(&spec)?;
    let mut reports = Vec::new();
    let summary = score_images(
        &paths,
        &ScoreRequest::prompt("a red cube on a wooden table"),
        &scorers,
        &ScoreImagesOptions {
            batch_size: 3,
            ..ScoreImagesOptions::default()
        },
        |r| {
            reports.push(r);
            Ok(())
        },
    )?;
    assert_eq!(
        (summary.images, summary.complete, summary.failed),
        (5, 2, 3)
    );
    assert_eq!(
        reports.iter().map(|r| r.image.clone()).collect::<Vec<_>>(),
        paths,
        "reports come in input order"
    );
    let refs = candle_core::safetensors::load(root().join("ref.safetensors"), &Device::Cpu)?;
    let clip_ref: Vec<Vec<f32>> = refs["clip_score"].to_vec2()?;
    let aes_ref: Vec<f32> = refs["aesthetic"].to_vec1()?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("ref.json"))?)?;
    let index = |file: &str| {
        meta["images"]
            .as_array()
            .and_then(|a| a.iter().position(|i| i["file"] == file))
            .expect("image in ref.json")
    };
    for (r, file) in [
        (&reports[0], "images/rgb_wide.png"),
        (&reports[4], "images/photo.jpg"),
    ] {
        let i = index(file);
        assert!(r.is_complete(), "{r:?}");
        assert!((r.scores["clip"] - f64::from(clip_ref[i][0])).abs() < 0.05);
        assert!((r.scores["aesthetic"] - f64::from(aes_ref[i])).abs() < 1e-3);
        assert!(r.versions["clip"].starts_with("clip-score/1"));
        assert!(r.versions["aesthetic"].starts_with("laion-aesthetic/1"));
        let line: serde_json::Value = serde_json::from_str(&r.to_json_line())?;
        assert!(line["scores"]["clip"].is_number() && line.get("errors").is_none());
    }
    for (r, needle) in [
        (&reports[1], "truncated"),
        (&reports[2], "missing.png"),
        (&reports[3], "not an image"),
    ] {
        assert!(r.scores.is_empty());
        assert!(r.errors["image"].contains(needle), "{:?}", r.errors);
        let line: serde_json::Value = serde_json::from_str(&r.to_json_line())?;
        assert!(line["errors"]["image"].is_string());
    }
    // Unimplemented metrics and missing models are clear errors.
    let e = Metric::parse_list("clip,beauty").expect_err("unknown");
    assert_mentions(&e, &["beauty"]);
    let e = load_scorers(&ScorerSpec {
        metrics: vec![Metric::Aesthetic],
        aesthetic_model: Some(root().join("aesthetic-head.pth")),
        ..ScorerSpec::default()
    })
    .err()
    .expect("no clip model");
    assert_mentions(&e, &["--clip-model"]);
    Ok(())
}
