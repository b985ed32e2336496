//! Parity with transformers (and Pillow, torchvision, LAION's code): the
//! fixtures under fixtures/parity/feedback were made by
//! tools/parity/make_feedback_fixtures.py from a tiny random CLIPModel saved
//! by transformers, a tiny random aesthetic head and images written by
//! Pillow. Our code loads the same files and must reproduce the references.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use agfsync_feedback::aesthetic::{AestheticHead, AestheticScorer};
use agfsync_feedback::clip::{ClipLoadOptions, ClipModel};
use agfsync_feedback::clip_score::ClipScorer;
use agfsync_feedback::image_input::{load_image, DecodeOptions, LoadedImage};
use agfsync_feedback::preprocess::ResizeBackend;
use agfsync_feedback::scorer::{BatchCache, ScoreRequest, Scorer};
use agfsync_models::hub::ModelSource;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/feedback")
}

struct Fixture {
    refs: HashMap<String, Tensor>,
    /// (file, key in the refs)
    images: Vec<(String, String)>,
    prompts: Vec<String>,
}

fn fixture() -> Result<Fixture> {
    let refs = candle_core::safetensors::load(root().join("ref.safetensors"), &Device::Cpu)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("ref.json"))?)?;
    let images = meta["images"]
        .as_array()
        .context("ref.json: images")?
        .iter()
        .map(|im| {
            let file = im["file"].as_str().unwrap_or_default().to_string();
            let key = file.trim_start_matches("images/").replace('.', "_");
            (file, key)
        })
        .collect();
    let prompts = meta["prompts"]
        .as_array()
        .context("ref.json: prompts")?
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect();
    Ok(Fixture {
        refs,
        images,
        prompts,
    })
}

impl Fixture {
    fn get(&self, k: &str) -> Result<&Tensor> {
        self.refs
            .get(k)
            .with_context(|| format!("fixture has no tensor `{k}`"))
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar()?)
}

fn clip(backend: ResizeBackend) -> Result<ClipModel> {
    Ok(ClipModel::load_with(
        &ModelSource::local(root().join("tiny-clip")),
        &ClipLoadOptions {
            resize_backend: backend,
            ..ClipLoadOptions::default()
        },
    )?)
}

fn load_all(f: &Fixture) -> Result<Vec<LoadedImage>> {
    f.images
        .iter()
        .map(|(file, _)| Ok(load_image(root().join(file), &DecodeOptions::default())?))
        .collect()
}

/// Decoding gives exactly the RGB bytes of Pillow + transformers'
/// convert_to_rgb for every fixture: alpha, grey, grey+alpha, 1-bit,
/// palette with transparency, 16-bit grey and RGB PNGs; baseline,
/// progressive, 4:4:4/4:2:2/4:2:0, restart-marker, grey and CMYK JPEGs;
/// lossless and lossy WebP.
#[test]
fn decoded_rgb_matches_pillow() -> Result<()> {
    let f = fixture()?;
    for ((file, key), img) in f.images.iter().zip(load_all(&f)?) {
        let theirs: Vec<u8> = f.get(&format!("rgb.{key}"))?.flatten_all()?.to_vec1()?;
        assert_eq!(img.rgb.len(), theirs.len(), "{file}: size differs");
        let worst = img
            .rgb
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
            .max()
            .unwrap_or(0);
        assert_eq!(worst, 0, "{file}: decoded RGB differs by {worst} levels");
    }
    Ok(())
}

/// Pixel values of both transformers backends (PIL under Pillow 13 and
/// Pillow 12, and torchvision) are bit-identical for every fixture image.
#[test]
fn pixel_values_match_both_transformers_backends() -> Result<()> {
    let f = fixture()?;
    let images = load_all(&f)?;
    for (backend, tag) in [
        (ResizeBackend::Pil, "pil"),
        (ResizeBackend::Torchvision, "tv"),
    ] {
        let model = clip(backend)?;
        for ((file, key), img) in f.images.iter().zip(&images) {
            let name = format!("pixel_values_{tag}.{key}");
            let Some(theirs) = f.refs.get(&name) else {
                assert_eq!(tag, "tv", "missing {name}");
                continue; // made without torchvision
            };
            let (px, (h, w)) = model.processor().pixel_values(img)?;
            let ours = Tensor::from_vec(px, (3, h, w), &Device::Cpu)?;
            let d = max_abs(&ours, theirs)?;
            assert!(d == 0.0, "{tag} {file}: pixel values differ by {d}");
        }
    }
    // Pillow <= 12 always resamples horizontally first: the references hold
    // its pixels where they differ from Pillow 13's (the very tall image,
    // where a third of the values move).
    let old = clip(ResizeBackend::Pil12)?;
    let mut differing = 0;
    for ((file, key), img) in f.images.iter().zip(&images) {
        let theirs = match f.refs.get(&format!("pixel_values_pil12.{key}")) {
            Some(t) => {
                differing += 1;
                t
            }
            None => f.get(&format!("pixel_values_pil.{key}"))?,
        };
        let (px, (h, w)) = old.processor().pixel_values(img)?;
        let d = max_abs(&Tensor::from_vec(px, (3, h, w), &Device::Cpu)?, theirs)?;
        assert!(d == 0.0, "pil12 {file}: pixel values differ by {d}");
    }
    assert!(differing > 0, "fixtures made without --pillow12");
    Ok(())
}

#[test]
fn embeddings_match_transformers() -> Result<()> {
    let f = fixture()?;
    let model = clip(ResizeBackend::Pil)?;
    let images = load_all(&f)?;
    // Image tower on exactly the reference pixels.
    let pv: Vec<Tensor> = f
        .images
        .iter()
        .map(|(_, key)| f.get(&format!("pixel_values_pil.{key}")).cloned())
        .collect::<Result<_>>()?;
    let ours = model.image_features(&Tensor::stack(&pv, 0)?)?;
    let d = max_abs(&ours, f.get("image_embeds")?)?;
    assert!(d < 1e-4, "image_embeds differ by {d}");
    // End to end from the files.
    let refs: Vec<&LoadedImage> = images.iter().collect();
    let rows = model.encode_images(&refs, None)?;
    for (i, ((file, _), row)) in f.images.iter().zip(rows).enumerate() {
        let row = row.map_err(anyhow::Error::msg)?;
        let d = max_abs(&row, &f.get("image_embeds")?.get(i)?)?;
        assert!(d < 1e-4, "{file}: image embedding differs by {d}");
    }
    // Text tower, including a prompt over 77 tokens (truncated by tokens).
    let enc = model.encode_texts(&f.prompts)?;
    assert_eq!(enc.truncated, vec![false, false, false, true]);
    let ids: Vec<Vec<i64>> = f.get("input_ids")?.to_vec2()?;
    for (p, want) in f.prompts.iter().zip(&ids) {
        let got = model.tokenizer().encode_padded(p, 77)?;
        let got: Vec<i64> = got.ids.iter().map(|&x| i64::from(x)).collect();
        assert_eq!(&got, want, "token ids of {p:?}");
    }
    let d = max_abs(&enc.embeds, f.get("text_embeds")?)?;
    assert!(d < 1e-4, "text_embeds differ by {d}");
    Ok(())
}

#[test]
fn clip_scores_match_reference() -> Result<()> {
    let f = fixture()?;
    let scorer = ClipScorer::new(Arc::new(clip(ResizeBackend::Pil)?));
    let images = load_all(&f)?;
    let refs: Vec<&LoadedImage> = images.iter().collect();
    let want: Vec<Vec<f32>> = f.get("clip_score")?.to_vec2()?;
    let want_cos: Vec<Vec<f32>> = f.get("cos")?.to_vec2()?;
    let mut worst: f64 = 0.0;
    for (j, prompt) in f.prompts.iter().enumerate() {
        let out =
            scorer.score_batch(&refs, &ScoreRequest::prompt(prompt), &mut BatchCache::new())?;
        for (i, o) in out.into_iter().enumerate() {
            let r = o?;
            let d = (r.value - f64::from(want[i][j])).abs();
            worst = worst.max(d);
            assert!(
                d < 0.05,
                "{} / prompt {j}: CLIP score {} vs {}",
                f.images[i].0,
                r.value,
                want[i][j]
            );
            let dc = (r.details["cos"] - f64::from(want_cos[i][j])).abs();
            assert!(dc < 5e-4, "{}: cos differs by {dc}", f.images[i].0);
            assert!(r.version.starts_with("clip-score/1"), "{}", r.version);
            assert_eq!(r.notes.is_empty(), j != 3, "truncation note for prompt {j}");
        }
    }
    eprintln!("worst CLIP score difference: {worst:.6}");
    // The cosine matrix API agrees too.
    let m: Vec<Vec<f32>> = scorer
        .cosine_matrix(
            &refs,
            &f.prompts.iter().map(String::as_str).collect::<Vec<_>>(),
        )?
        .to_vec2()?;
    for (a, b) in m.iter().flatten().zip(want_cos.iter().flatten()) {
        assert!((a - b).abs() < 5e-4);
    }
    Ok(())
}

#[test]
fn aesthetic_scores_match_reference_from_safetensors_and_pth() -> Result<()> {
    let f = fixture()?;
    let model = Arc::new(clip(ResizeBackend::Pil)?);
    let images = load_all(&f)?;
    let refs: Vec<&LoadedImage> = images.iter().collect();
    let want: Vec<f32> = f.get("aesthetic")?.to_vec1()?;
    let mut results = Vec::new();
    for file in ["aesthetic-head.safetensors", "aesthetic-head.pth"] {
        let head = AestheticHead::load(&root().join(file), &Device::Cpu)?;
        assert_eq!(head.input_width(), 32);
        let scorer = AestheticScorer::new(model.clone(), head)?;
        let out = scorer.score_batch(&refs, &ScoreRequest::prompt(""), &mut BatchCache::new())?;
        let values: Vec<f64> = out
            .into_iter()
            .map(|o| o.map(|r| r.value))
            .collect::<Result<_, _>>()?;
        let mut worst: f64 = 0.0;
        for (i, v) in values.iter().enumerate() {
            let d = (v - f64::from(want[i])).abs();
            worst = worst.max(d);
            assert!(
                d < 1e-3,
                "{file} {}: aesthetic {v} vs {}",
                f.images[i].0,
                want[i]
            );
        }
        eprintln!("{file}: worst aesthetic difference {worst:.2e}");
        results.push(values);
    }
    assert_eq!(
        results[0], results[1],
        "safetensors and .pth heads disagree"
    );
    // The head alone on the reference embeddings.
    let head = AestheticHead::load(&root().join("aesthetic-head.pth"), &Device::Cpu)?;
    let ours: Vec<f32> = head.score_embeddings(f.get("image_embeds")?)?.to_vec1()?;
    for (a, b) in ours.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4, "head: {a} vs {b}");
    }
    Ok(())
}
