//! Parity with diffusers and transformers: the fixtures under
//! fixtures/parity were made by tools/parity/make_fixtures.py from tiny
//! pipelines that diffusers itself saved; our networks load those folders and
//! must reproduce the reference outputs (see tools/parity/README.md).

use std::collections::HashMap;
use std::path::PathBuf;

use agfsync_models::clip_text::TextLayer;
use agfsync_models::hub::ModelSource;
use agfsync_models::nn::Pass;
use agfsync_models::stable_diffusion::{LoadOptions, StableDiffusion};
use agfsync_models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use agfsync_models::weights::open_safetensors;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity")
}

fn reference(name: &str) -> Result<HashMap<String, Tensor>> {
    let p = fixtures().join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| format!("{}", p.display()))
}

fn pipeline(name: &str) -> Result<StableDiffusion> {
    Ok(StableDiffusion::load(
        &ModelSource::local(fixtures().join(name)),
        &LoadOptions::default(),
    )?)
}

/// Largest absolute difference, and largest difference relative to the
/// reference's largest magnitude.
fn compare(ours: &Tensor, theirs: &Tensor) -> Result<(f32, f32)> {
    assert_eq!(ours.dims(), theirs.dims(), "shapes differ");
    let ours = ours.to_dtype(DType::F32)?;
    let theirs = theirs.to_dtype(DType::F32)?;
    let abs: f32 = (&ours - &theirs)?.abs()?.max_all()?.to_scalar()?;
    let scale: f32 = theirs.abs()?.max_all()?.to_scalar()?;
    Ok((abs, abs / scale.max(1e-12)))
}

fn get<'a>(m: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    m.get(k)
        .unwrap_or_else(|| panic!("fixture has no tensor `{k}`"))
}

#[test]
fn text_encoder_matches_transformers() -> Result<()> {
    for p in ["tiny-sd15", "tiny-sd2"] {
        let sd = pipeline(p)?;
        let r = reference(&format!("ref-{p}-text-encoder"))?;
        let ids = get(&r, "input_ids").to_dtype(DType::U32)?;
        let last = sd
            .text_encoder
            .forward(&ids, TextLayer::Last, Pass::INFERENCE)?;
        let (abs, _) = compare(&last.hidden, get(&r, "last_hidden_state"))?;
        assert!(abs < 1e-5, "{p} last_hidden_state differs by {abs}");
        let pooled = last.pooled.expect("pooled");
        let (abs, _) = compare(&pooled, get(&r, "pooled"))?;
        assert!(abs < 1e-5, "{p} pooled differs by {abs}");
        let skip = sd
            .text_encoder
            .forward(&ids, TextLayer::Skip(1), Pass::INFERENCE)?;
        let (abs, _) = compare(&skip.hidden, get(&r, "penultimate"))?;
        assert!(abs < 1e-5, "{p} clip-skip-1 differs by {abs}");
        let raw = sd
            .text_encoder
            .forward(&ids, TextLayer::PenultimateRaw, Pass::INFERENCE)?;
        let (abs, _) = compare(&raw.hidden, get(&r, "hidden_states_minus2"))?;
        assert!(abs < 1e-5, "{p} raw penultimate differs by {abs}");
    }
    Ok(())
}

#[test]
fn tokenizers_match_transformers() -> Result<()> {
    for p in ["tiny-sd15", "tiny-sd2"] {
        let sd = pipeline(p)?;
        let r = reference(&format!("ref-{p}-tokenizer"))?;
        let want: Vec<Vec<i64>> = get(&r, "input_ids").to_vec2()?;
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            fixtures().join(format!("ref-{p}.json")),
        )?)?;
        let prompts = meta["tokenizer"]["prompts"].as_array().context("prompts")?;
        for (i, prompt) in prompts.iter().enumerate() {
            let enc = sd
                .tokenizer
                .encode_padded(prompt.as_str().context("str")?, 77)?;
            let got: Vec<i64> = enc.ids.iter().map(|&x| x as i64).collect();
            assert_eq!(got, want[i], "{p} prompt {i}");
            assert_eq!(enc.truncated, i == 2, "{p} prompt {i} truncation flag");
        }
    }
    Ok(())
}

fn check_unet(unet: &UNet2DConditionModel, r: &HashMap<String, Tensor>, what: &str) -> Result<()> {
    let sample = get(r, "sample");
    let ehs = get(r, "encoder_hidden_states");
    for (t, out) in [("timestep", "out"), ("timestep_float", "out_float")] {
        let Some(ts) = r.get(t) else { continue };
        let y = unet.forward(
            sample,
            &ts.to_dtype(DType::F32)?,
            ehs,
            None,
            Pass::INFERENCE,
        )?;
        let (abs, rel) = compare(&y, get(r, out))?;
        assert!(rel < 1e-4, "{what} {out}: abs {abs}, rel {rel}");
        let y = unet.forward(sample, &ts.to_dtype(DType::F32)?, ehs, None, Pass::TRAIN)?;
        let (abs, rel) = compare(&y, get(r, out))?;
        assert!(
            rel < 1e-4,
            "{what} {out} (training pass): abs {abs}, rel {rel}"
        );
    }
    Ok(())
}

#[test]
fn unet_matches_diffusers() -> Result<()> {
    for p in ["tiny-sd15", "tiny-sd2"] {
        let sd = pipeline(p)?;
        check_unet(&sd.unet, &reference(&format!("ref-{p}-unet"))?, p)?;
    }
    Ok(())
}

#[test]
fn fp16_variant_unet_matches_diffusers() -> Result<()> {
    let src = ModelSource::local(fixtures().join("tiny-sd15-fp16"));
    let files =
        agfsync_models::hub::find_weights(&src, "unet", "diffusion_pytorch_model", Some("fp16"))?;
    assert!(files[0]
        .to_string_lossy()
        .ends_with("diffusion_pytorch_model.fp16.safetensors"));
    let cfg: UNet2DConditionConfig = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("tiny-sd15-fp16/unet/config.json"),
    )?)?;
    let unet =
        UNet2DConditionModel::new(&cfg, open_safetensors(&files, DType::F32, &Device::Cpu)?)?;
    check_unet(
        &unet,
        &reference("ref-tiny-sd15-fp16-unet")?,
        "fp16 variant",
    )
}

#[test]
fn vae_matches_diffusers() -> Result<()> {
    for p in ["tiny-sd15", "tiny-sd2"] {
        let sd = pipeline(p)?;
        let r = reference(&format!("ref-{p}-vae"))?;
        let dec = sd.vae.decode(get(&r, "latents"), Pass::INFERENCE)?;
        let (abs, _) = compare(&dec, get(&r, "decoded"))?;
        assert!(abs < 1e-4, "{p} decode differs by {abs}");
        let enc = sd.vae.encode(get(&r, "image"), Pass::INFERENCE)?;
        let (abs, _) = compare(&enc.mean, get(&r, "enc_mean"))?;
        assert!(abs < 1e-4, "{p} encode mean differs by {abs}");
        let (abs, _) = compare(&enc.std, get(&r, "enc_std"))?;
        assert!(abs < 1e-4, "{p} encode std differs by {abs}");
    }
    Ok(())
}

#[test]
fn f16_unet_stays_close_to_f32() -> Result<()> {
    let r = reference("ref-tiny-sd15-unet")?;
    // candle's CPU backend has no bf16 matmul; bf16 is for CUDA devices.
    let dtype = DType::F16;
    let sd = StableDiffusion::load(
        &ModelSource::local(fixtures().join("tiny-sd15")),
        &LoadOptions {
            dtype,
            ..LoadOptions::default()
        },
    )?;
    let y = sd.unet.forward(
        get(&r, "sample"),
        &get(&r, "timestep").to_dtype(DType::F32)?,
        get(&r, "encoder_hidden_states"),
        None,
        Pass::INFERENCE,
    )?;
    assert_eq!(y.dtype(), dtype);
    let (_, rel) = compare(&y, get(&r, "out"))?;
    assert!(rel < 1e-2, "{dtype:?} relative error {rel}");
    Ok(())
}
