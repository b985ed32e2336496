//! Parity with HPSv2's own code: the fixtures under fixtures/parity/hps were
//! made by tools/parity/make_hps_fixtures.py, which runs the `hpsv2`
//! package's open_clip fork (model, `preprocess_val`, `tokenize`) on a tiny
//! random model. Our loader reads the same checkpoint (safetensors and the
//! torch `.pt` as HPSv2 ships it) and must reproduce pixels, token ids and
//! scores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use agfsync_feedback::hps::{
    hps_pixel_values, write_tiny_hps, HpsLoadOptions, HpsResize, HpsScorer,
};
use agfsync_feedback::image_input::{load_image, DecodeOptions, LoadedImage};
use agfsync_feedback::open_clip::{read_open_clip_config, OpenClipCheckpoint, OpenClipConfig};
use agfsync_feedback::scorer::{BatchCache, ScoreRequest, Scorer};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity/hps")
}

struct Fixture {
    refs: HashMap<String, Tensor>,
    /// (file, key)
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

    fn load_images(&self) -> Result<Vec<LoadedImage>> {
        self.images
            .iter()
            .map(|(file, _)| Ok(load_image(root().join(file), &DecodeOptions::default())?))
            .collect()
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .max_all()?
        .to_scalar()?)
}

fn scorer(checkpoint: &Path, resize: HpsResize) -> Result<HpsScorer> {
    Ok(HpsScorer::load(
        checkpoint,
        &HpsLoadOptions {
            resize,
            ..HpsLoadOptions::default()
        },
    )?)
}

/// HPSv2's preprocess_val (ToTensor, ResizeMaxSize with torchvision's float
/// bicubic, zero padding, CLIP normalisation) for every fixture image, with
/// torchvision's antialiased (>= 0.17) and plain (< 0.17) resize.
#[test]
fn pixels_match_hpsv2_preprocess_val() -> Result<()> {
    let f = fixture()?;
    let images = f.load_images()?;
    for (mode, tag) in [(HpsResize::Antialias, "aa"), (HpsResize::Legacy, "noaa")] {
        let mut worst = 0f32;
        for ((file, key), img) in f.images.iter().zip(&images) {
            let ours = hps_pixel_values(img, 56, mode)?;
            let ours = Tensor::from_vec(ours, (3, 56, 56), &Device::Cpu)?;
            let d = max_abs(&ours, f.get(&format!("pixels_{tag}.{key}"))?)?;
            assert!(d <= 1e-5, "{file} ({tag}): pixels differ by {d}");
            worst = worst.max(d);
        }
        println!("pixels {tag}: max |diff| {worst:e}");
    }
    Ok(())
}

/// open_clip's tokenize: sot, tokens, eot, zeros; the long prompt keeps 75
/// tokens and ends with eot; HTML entities and whitespace are cleaned.
#[test]
fn input_ids_match_hpsv2_tokenize() -> Result<()> {
    let f = fixture()?;
    let s = scorer(&root().join("tiny-hps.safetensors"), HpsResize::Antialias)?;
    let (ids, truncated) = s.input_ids(&f.prompts)?;
    let theirs: Vec<Vec<i64>> = f.get("input_ids")?.to_vec2()?;
    let ours: Vec<Vec<u32>> = ids.to_vec2()?;
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let b: Vec<u32> = b.iter().map(|&x| x as u32).collect();
        assert_eq!(
            a, &b,
            "prompt {i} ({:?}) tokenises differently",
            f.prompts[i]
        );
    }
    assert_eq!(truncated, vec![false, false, false, true]);
    Ok(())
}

/// Image and text features and HPS of the safetensors checkpoint (config
/// found beside it) against open_clip's, for both resize modes.
#[test]
fn scores_match_hpsv2_from_safetensors() -> Result<()> {
    let f = fixture()?;
    let images = f.load_images()?;
    let refs: Vec<&LoadedImage> = images.iter().collect();
    let s = scorer(&root().join("tiny-hps.safetensors"), HpsResize::Antialias)?;

    let s56 = 56;
    let mut px = Vec::new();
    for img in &refs {
        px.extend(s.pixel_values(img)?);
    }
    let px = Tensor::from_vec(px, (refs.len(), 3, s56, s56), &Device::Cpu)?;
    let d_img = max_abs(&s.model().encode_image(&px)?, f.get("image_features")?)?;
    let (ids, _) = s.input_ids(&f.prompts)?;
    let d_txt = max_abs(&s.model().encode_text(&ids)?, f.get("text_features")?)?;
    let hps = s.score_matrix(&refs, &f.prompts)?;
    let d_hps = max_abs(&hps, f.get("hps")?)?;
    println!("image features {d_img:e}, text features {d_txt:e}, hps {d_hps:e}");
    assert!(d_img < 1e-4, "image features differ by {d_img}");
    assert!(d_txt < 1e-4, "text features differ by {d_txt}");
    assert!(d_hps < 1e-3, "HPS differs by {d_hps}");

    let legacy = scorer(&root().join("tiny-hps.safetensors"), HpsResize::Legacy)?;
    let d_noaa = max_abs(&legacy.score_matrix(&refs, &f.prompts)?, f.get("hps_noaa")?)?;
    println!("hps (no antialias) {d_noaa:e}");
    assert!(d_noaa < 1e-3, "HPS (no antialias) differs by {d_noaa}");
    Ok(())
}

/// The torch `.pt` (`{'state_dict': ...}`, as HPSv2 ships its checkpoints)
/// loads through the safe pickle reader and scores like the safetensors
/// copy; the Scorer interface (batched, one prompt) gives the same values.
#[test]
fn torch_checkpoint_scores_match_through_the_scorer() -> Result<()> {
    let f = fixture()?;
    let images = f.load_images()?;
    let refs: Vec<&LoadedImage> = images.iter().collect();
    let s = HpsScorer::load(
        &root().join("tiny-hps.pt"),
        &HpsLoadOptions {
            batch_size: 4,
            version: Some("2.1".into()),
            ..HpsLoadOptions::default()
        },
    )?;
    assert!(s.version().contains("checkpoint=v2.1"), "{}", s.version());
    assert!(s.version().contains("tiny-hps.pt#"), "{}", s.version());
    let want: Vec<Vec<f32>> = f.get("hps")?.to_vec2()?;
    let mut worst = 0f64;
    for (j, prompt) in f.prompts.iter().enumerate() {
        let out = s.score_batch(&refs, &ScoreRequest::prompt(prompt), &mut BatchCache::new())?;
        assert_eq!(out.len(), refs.len());
        for (i, o) in out.into_iter().enumerate() {
            let r = o?;
            assert_eq!(r.metric, "hps");
            let d = (r.value - f64::from(want[i][j])).abs();
            worst = worst.max(d);
            assert!(
                d < 1e-3,
                "image {i} prompt {j}: {} vs {}",
                r.value,
                want[i][j]
            );
            assert!((r.details["cos"] * 100.0 - r.value).abs() < 1e-9);
            assert_eq!(r.notes.is_empty(), j != 3, "truncation note for prompt {j}");
        }
    }
    println!("scorer (.pt) max |hps diff| {worst:e}");
    Ok(())
}

/// Without a config the architecture is inferred from shapes: widths,
/// layers, image size, vocabulary and embedding width match the fixture's
/// config (head counts cannot be inferred and fall back to 64-wide heads).
#[test]
fn architecture_is_inferred_from_shapes() -> Result<()> {
    let cfg = read_open_clip_config(&root().join("open_clip_config.json"))?;
    let ckpt = OpenClipCheckpoint::open(&root().join("tiny-hps.pt"), DType::F32, &Device::Cpu)?;
    let inferred = OpenClipConfig::infer(&ckpt.shapes).map_err(anyhow::Error::msg)?;
    assert_eq!(inferred.embed_dim, cfg.embed_dim);
    assert_eq!(inferred.vision_cfg.width, cfg.vision_cfg.width);
    assert_eq!(inferred.vision_cfg.layers, cfg.vision_cfg.layers);
    assert_eq!(inferred.vision_cfg.image_size, cfg.vision_cfg.image_size);
    assert_eq!(inferred.vision_cfg.patch_size, cfg.vision_cfg.patch_size);
    assert_eq!(inferred.text_cfg.vocab_size, cfg.text_cfg.vocab_size);
    assert_eq!(inferred.text_cfg.layers, cfg.text_cfg.layers);
    assert_eq!(inferred.text_cfg.context_length, 77);
    // The model builds with the inferred architecture (1 head per tower here).
    ckpt.build(None)?;
    // ViT-H-14 defaults: 16 heads of 80 (vision) and 16 of 64 (text).
    let h = OpenClipConfig::vit_h_14();
    assert_eq!((h.vision_cfg.heads(), h.text_cfg.heads), (16, 16));
    Ok(())
}

/// The tiny random writer works offline, is deterministic, and its model
/// scores through the same loader.
#[test]
fn tiny_hps_writer_loads_and_scores() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = write_tiny_hps(&dir.path().join("a"), 7)?;
    let b = write_tiny_hps(&dir.path().join("b"), 7)?;
    assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?, "not deterministic");
    let s = HpsScorer::load(&a, &HpsLoadOptions::default())?;
    assert!(
        s.version().contains("checkpoint=unknown"),
        "{}",
        s.version()
    );
    let img = LoadedImage::from_rgb(
        "x.png",
        30,
        20,
        (0..30 * 20 * 3).map(|i| (i % 251) as u8).collect(),
    )?;
    let out = s.score_batch(
        &[&img],
        &ScoreRequest::prompt("a red cube"),
        &mut BatchCache::new(),
    )?;
    let v = out.into_iter().next().context("one outcome")??.value;
    assert!(v.is_finite() && v.abs() <= 100.0, "{v}");
    Ok(())
}
