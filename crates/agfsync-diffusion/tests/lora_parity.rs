//! Sampling with LoRA adapters matches diffusers: the tiny SD 1.5 pipeline
//! with the adapters of fixtures/parity/lora (tools/parity/make_lora_fixtures.py)
//! attached or merged at diffusers' `set_adapters` weights, DDIM, 8 steps,
//! guidance 7.5, 32x32, from the same initial latents.

use std::collections::HashMap;
use std::path::PathBuf;

use agfsync_diffusion::pipeline::{
    decode_latents, denoise, encode_prompts, DenoiseOptions, Negative,
};
use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{build, SchedulerConfig, SchedulerKind};
use agfsync_models::hub::ModelSource;
use agfsync_models::lora::{apply_lora, remove_lora, LoraFile, LoraMode, LoraTargets};
use agfsync_models::stable_diffusion::{LoadOptions, StableDiffusion};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity")
}

fn load(rel: &str) -> Result<HashMap<String, Tensor>> {
    let p = fixtures().join(rel);
    candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| format!("{}", p.display()))
}

/// Peak signal-to-noise ratio of two images in [0, 1].
fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let mse: f32 = (a - b)?.sqr()?.mean_all()?.to_scalar()?;
    Ok(10.0 * (1.0 / (mse as f64).max(1e-20)).log10())
}

fn rel(ours: &Tensor, theirs: &Tensor) -> Result<f32> {
    let d: f32 = (ours - theirs)?.abs()?.max_all()?.to_scalar()?;
    let s: f32 = theirs.abs()?.max_all()?.to_scalar()?;
    Ok(d / s.max(1e-12))
}

/// Samples like diffusers' reference run; returns (prompt embeddings
/// `[negative; prompt]`, final latents, NHWC image).
fn sample(sd: &StableDiffusion, init: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let cfg = SchedulerConfig::from_json_str(&sd.scheduler_config)?;
    let mut sched = build(SchedulerKind::Ddim, &cfg)?;
    sched.set_timesteps(8)?;
    let prompts = vec!["a red cube on a blue table".to_string()];
    let negatives = vec!["blurry".to_string()];
    let (text, _) = encode_prompts(sd, &prompts, Negative::Prompts(&negatives), None, None)?;
    let embeds = Tensor::cat(&[text.uncond.as_ref().context("uncond")?, &text.cond], 0)?;
    let mut rng = Generator::new(0);
    let fin = denoise(
        sd,
        sched.as_mut(),
        init,
        &text,
        &DenoiseOptions {
            guidance_scale: 7.5,
        },
        &mut rng,
        &mut |_, _| {},
    )?;
    let image = decode_latents(sd, &fin)?.permute((0, 2, 3, 1))?;
    Ok((embeds, fin, image))
}

fn check(files: &[(&str, f64)], reference: &str) -> Result<()> {
    let init = load("ref-tiny-sd15-sample-ddim.safetensors")?
        .remove("init_latents")
        .context("init_latents")?;
    let base_image = load("ref-tiny-sd15-sample-ddim.safetensors")?
        .remove("image")
        .context("image")?;
    let r = load(&format!("lora/ref-{reference}.safetensors"))?;
    let get = |k: &str| r.get(k).with_context(|| format!("no tensor {k}"));
    for mode in [LoraMode::Attach, LoraMode::Merge] {
        let sd = StableDiffusion::load(
            &ModelSource::local(fixtures().join("tiny-sd15")),
            &LoadOptions::default(),
        )?;
        let targets = LoraTargets::of(&sd);
        for (i, (file, weight)) in files.iter().enumerate() {
            let f = LoraFile::load(&fixtures().join("lora").join(file))?;
            apply_lora(&f, &targets, &format!("a{i}"), *weight, mode)?;
        }
        let what = format!("{reference} {mode:?}");
        let (embeds, fin, image) = sample(&sd, &init)?;
        let d = rel(&embeds, get("prompt_embeds")?)?;
        assert!(
            d < 1e-4,
            "{what}: prompt embeddings differ by {d} (relative)"
        );
        let d = rel(&fin, get("final_latents")?)?;
        assert!(d < 1e-4, "{what}: final latents differ by {d} (relative)");
        let p = psnr(&image, &get("image")?.to_dtype(DType::F32)?)?;
        assert!(p > 40.0, "{what}: PSNR {p:.1} dB");
        // The adapter changes the image (so the comparison means something).
        let p_base = psnr(&image, &base_image)?;
        assert!(
            p_base < 35.0,
            "{what}: image barely differs from the base ({p_base:.1} dB)"
        );

        // Removing the adapters gives the base pipeline's image back.
        for i in 0..files.len() {
            remove_lora(&targets, &format!("a{i}"))?;
        }
        let (_, _, image) = sample(&sd, &init)?;
        let p = psnr(&image, &base_image)?;
        assert!(
            p > 40.0,
            "{what}: after removal, PSNR to the base image {p:.1} dB"
        );
    }
    Ok(())
}

#[test]
fn peft_lora_sampling_matches_diffusers() -> Result<()> {
    check(&[("sd15-peft.safetensors", 0.7)], "sd15-peft")
}

#[test]
fn kohya_lora_sampling_matches_diffusers() -> Result<()> {
    // The sd15-peft adapter in kohya's layout (expected outputs: ref-sd15-peft).
    check(&[("sd15-kohya.safetensors", 0.7)], "sd15-peft")
}

#[test]
fn kohya_conv_ff_lora_sampling_matches_diffusers() -> Result<()> {
    check(
        &[("sd15-kohya-conv-ff.safetensors", 0.7)],
        "sd15-kohya-conv-ff",
    )
}

#[test]
fn legacy_lora_sampling_matches_diffusers() -> Result<()> {
    check(&[("sd15-legacy.safetensors", 0.7)], "sd15-legacy")
}

#[test]
fn two_loras_sampling_matches_diffusers() -> Result<()> {
    check(
        &[
            ("sd15-peft.safetensors", 0.7),
            ("sd15-kohya-conv-ff.safetensors", 0.5),
        ],
        "two-adapters",
    )
}
