//! End-to-end sampling parity with diffusers' StableDiffusionPipeline, from
//! the same initial latents (fixtures/parity, see tools/parity/README.md).

use std::collections::HashMap;
use std::path::PathBuf;

use agfsync_diffusion::pipeline::{
    decode_latents, denoise, encode_prompts, DenoiseOptions, Negative,
};
use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{build, SchedulerConfig, SchedulerKind};
use agfsync_models::hub::ModelSource;
use agfsync_models::stable_diffusion::{LoadOptions, StableDiffusion};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/parity")
}

fn reference(name: &str) -> Result<HashMap<String, Tensor>> {
    let p = fixtures().join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| format!("{}", p.display()))
}

/// Peak signal-to-noise ratio of two images in [0, 1].
fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let mse: f32 = (a - b)?.sqr()?.mean_all()?.to_scalar()?;
    Ok(10.0 * (1.0 / (mse as f64).max(1e-20)).log10())
}

struct Run<'a> {
    pipeline: &'a str,
    run: &'a str,
    kind: SchedulerKind,
    guidance: f64,
    negative: bool,
    clip_skip: Option<usize>,
}

fn check(r: Run) -> Result<()> {
    let sd = StableDiffusion::load(
        &ModelSource::local(fixtures().join(r.pipeline)),
        &LoadOptions::default(),
    )?;
    let refs = reference(&format!("ref-{}-sample-{}", r.pipeline, r.run))?;
    let get = |k: &str| refs.get(k).with_context(|| format!("no tensor {k}"));
    let cfg = SchedulerConfig::from_json_str(&sd.scheduler_config)?;
    let mut sched = build(r.kind, &cfg)?;
    sched.set_timesteps(8)?;
    assert_eq!(
        sched.timesteps(),
        &[876.0, 751.0, 626.0, 501.0, 376.0, 251.0, 126.0, 1.0]
    );
    let prompts = vec!["a red cube on a blue table".to_string()];
    let negatives = vec!["blurry".to_string()];
    let (text, _) = encode_prompts(
        &sd,
        &prompts,
        if r.negative {
            Negative::Prompts(&negatives)
        } else {
            Negative::None
        },
        r.clip_skip,
        None,
    )?;
    // The embeddings the UNet saw: [negative, prompt] with guidance.
    let ours = match &text.uncond {
        Some(u) => Tensor::cat(&[u, &text.cond], 0)?,
        None => text.cond.clone(),
    };
    let d: f32 = (ours - get("prompt_embeds")?)?
        .abs()?
        .max_all()?
        .to_scalar()?;
    assert!(
        d < 1e-5,
        "{} {}: prompt embeddings differ by {d}",
        r.pipeline,
        r.run
    );

    let mut rng = Generator::new(0);
    let fin = denoise(
        &sd,
        sched.as_mut(),
        get("init_latents")?,
        &text,
        &DenoiseOptions {
            guidance_scale: r.guidance,
        },
        &mut rng,
        &mut |_, _| {},
    )?;
    let want = get("final_latents")?;
    let scale: f32 = want.abs()?.max_all()?.to_scalar()?;
    let d: f32 = (&fin - want)?.abs()?.max_all()?.to_scalar()?;
    assert!(
        d / scale < 1e-4,
        "{} {}: final latents differ by {d} (scale {scale})",
        r.pipeline,
        r.run
    );
    let image = decode_latents(&sd, &fin)?.permute((0, 2, 3, 1))?;
    let p = psnr(&image, &get("image")?.to_dtype(DType::F32)?)?;
    assert!(p > 40.0, "{} {}: PSNR {p:.1} dB", r.pipeline, r.run);
    Ok(())
}

#[test]
fn sd15_ddim_matches_diffusers() -> Result<()> {
    check(Run {
        pipeline: "tiny-sd15",
        run: "ddim",
        kind: SchedulerKind::Ddim,
        guidance: 7.5,
        negative: true,
        clip_skip: None,
    })
}

#[test]
fn sd15_euler_matches_diffusers() -> Result<()> {
    check(Run {
        pipeline: "tiny-sd15",
        run: "euler",
        kind: SchedulerKind::Euler,
        guidance: 7.5,
        negative: true,
        clip_skip: None,
    })
}

#[test]
fn sd15_ddim_without_guidance_matches_diffusers() -> Result<()> {
    check(Run {
        pipeline: "tiny-sd15",
        run: "ddim-cfg1",
        kind: SchedulerKind::Ddim,
        guidance: 1.0,
        negative: false,
        clip_skip: None,
    })
}

#[test]
fn sd15_euler_clip_skip_matches_diffusers() -> Result<()> {
    check(Run {
        pipeline: "tiny-sd15",
        run: "euler-clipskip1",
        kind: SchedulerKind::Euler,
        guidance: 7.5,
        negative: true,
        clip_skip: Some(1),
    })
}

#[test]
fn sd2_v_prediction_ddim_matches_diffusers() -> Result<()> {
    check(Run {
        pipeline: "tiny-sd2",
        run: "ddim",
        kind: SchedulerKind::Ddim,
        guidance: 7.5,
        negative: true,
        clip_skip: None,
    })
}

#[test]
fn sd2_v_prediction_euler_matches_diffusers() -> Result<()> {
    check(Run {
        pipeline: "tiny-sd2",
        run: "euler",
        kind: SchedulerKind::Euler,
        guidance: 7.5,
        negative: true,
        clip_skip: None,
    })
}
