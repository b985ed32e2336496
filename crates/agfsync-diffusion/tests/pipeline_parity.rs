//! End-to-end sampling parity with diffusers' StableDiffusionPipeline, from
//! the same initial latents (fixtures/parity, see tools/parity/README.md).

use std::collections::HashMap;
use std::path::PathBuf;

use agfsync_diffusion::pipeline::{
    decode_latents, denoise, encode_prompts, DenoiseOptions, Negative, XlSizes,
};
use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{build, Scheduler, SchedulerConfig, SchedulerKind};
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

// ---------------------------------------------------------------------------
// SDXL (fixtures/parity/tiny-sdxl, tools/parity/README.md section 5)
// ---------------------------------------------------------------------------

fn sdxl() -> Result<StableDiffusion> {
    Ok(StableDiffusion::load(
        &ModelSource::local(fixtures().join("tiny-sdxl")),
        &LoadOptions::default(),
    )?)
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar()?)
}

#[test]
fn sdxl_prompt_encoding_matches_diffusers() -> Result<()> {
    let sd = sdxl()?;
    let refs = reference("ref-tiny-sdxl-text-encoders")?;
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("ref-tiny-sdxl.json"),
    )?)?;
    let prompts: Vec<String> = meta["text_encoders"]["prompts"]
        .as_array()
        .context("prompts")?
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect();
    let sizes = XlSizes::for_image(32, 32);
    let blurry = vec!["blurry".to_string(); prompts.len()];
    let (text, _) = encode_prompts(
        &sd,
        &prompts,
        Negative::Prompts(&blurry),
        None,
        Some(&sizes),
    )?;
    assert!(max_abs(&text.cond, &refs["prompt_embeds"])? < 1e-5);
    let (cond_added, uncond_added) = text.added.clone().context("added condition")?;
    assert!(max_abs(&cond_added.text_embeds, &refs["pooled_prompt_embeds"])? < 1e-5);
    let uncond = text.uncond.clone().context("uncond")?;
    assert!(max_abs(&uncond.narrow(0, 0, 1)?, &refs["negative_prompt_embeds"])? < 1e-5);
    assert!(
        max_abs(
            &uncond_added.text_embeds.narrow(0, 0, 1)?,
            &refs["negative_pooled_prompt_embeds"]
        )? < 1e-5
    );
    let ids: Vec<f32> = cond_added.time_ids.get(0)?.to_vec1()?;
    assert_eq!(ids, vec![32., 32., 0., 0., 32., 32.]);
    // No negative prompt: force_zeros_for_empty_prompt gives zero embeddings.
    let (text, _) = encode_prompts(&sd, &prompts, Negative::Default, None, Some(&sizes))?;
    let zero: f32 = text
        .uncond
        .context("uncond")?
        .abs()?
        .max_all()?
        .to_scalar()?;
    assert_eq!(zero, 0.0);
    // SDXL without sizes is refused rather than guessed.
    assert!(encode_prompts(&sd, &prompts, Negative::None, None, None).is_err());
    Ok(())
}

#[test]
fn sdxl_unet_with_micro_conditioning_matches_diffusers() -> Result<()> {
    let sd = sdxl()?;
    let r = reference("ref-tiny-sdxl-unet")?;
    let added = agfsync_models::unet_2d_condition::AddedCondition {
        text_embeds: r["text_embeds"].clone(),
        time_ids: r["time_ids"].clone(),
    };
    let out = sd.unet.forward(
        &r["sample"],
        &r["timestep"].to_dtype(DType::F32)?,
        &r["encoder_hidden_states"],
        Some(&added),
        agfsync_models::nn::Pass::INFERENCE,
    )?;
    let d = max_abs(&out, &r["out"])?;
    assert!(d < 1e-4, "SDXL UNet differs by {d}");
    Ok(())
}

fn check_sdxl(run: &str, kind: SchedulerKind, sizes: XlSizes) -> Result<()> {
    let sd = sdxl()?;
    let refs = reference(&format!("ref-tiny-sdxl-sample-{run}"))?;
    let cfg = SchedulerConfig::from_json_str(&sd.scheduler_config)?;
    let mut sched = build(kind, &cfg)?;
    sched.set_timesteps(8)?;
    let prompts = vec!["a red cube on a blue table".to_string()];
    let negatives = vec!["blurry".to_string()];
    let (text, _) = encode_prompts(
        &sd,
        &prompts,
        Negative::Prompts(&negatives),
        None,
        Some(&sizes),
    )?;
    let fin = denoise(
        &sd,
        sched.as_mut(),
        &refs["init_latents"],
        &text,
        &DenoiseOptions {
            guidance_scale: 5.0,
        },
        &mut Generator::new(0),
        &mut |_, _| {},
    )?;
    let want = &refs["final_latents"];
    let scale: f32 = want.abs()?.max_all()?.to_scalar()?;
    let d = max_abs(&fin, want)?;
    assert!(
        d / scale < 1e-4,
        "sdxl {run}: final latents differ by {d} (scale {scale})"
    );
    let image = decode_latents(&sd, &fin)?.permute((0, 2, 3, 1))?;
    let p = psnr(&image, &refs["image"])?;
    assert!(p > 40.0, "sdxl {run}: PSNR {p:.1} dB");
    Ok(())
}

#[test]
fn sdxl_ddim_matches_diffusers() -> Result<()> {
    check_sdxl("ddim", SchedulerKind::Ddim, XlSizes::for_image(32, 32))
}

#[test]
fn sdxl_euler_matches_diffusers() -> Result<()> {
    check_sdxl("euler", SchedulerKind::Euler, XlSizes::for_image(32, 32))
}

#[test]
fn sdxl_euler_with_micro_conditioning_matches_diffusers() -> Result<()> {
    let sizes = XlSizes {
        original_size: (64, 64),
        crops_coords_top_left: (4, 4),
        target_size: (32, 32),
    };
    check_sdxl("euler-microcond", SchedulerKind::Euler, sizes)
}

#[test]
fn sdxl_lcm_four_steps_matches_diffusers() -> Result<()> {
    // LCM draws noise between steps; the fixture recorded diffusers' draws
    // and we replay them, so the whole loop is compared step by step.
    let sd = sdxl()?;
    let refs = reference("ref-tiny-sdxl-sample-lcm")?;
    let cfg = SchedulerConfig::from_json_str(&sd.scheduler_config)?;
    let mut sched = agfsync_diffusion::schedulers::LcmScheduler::new(&cfg)?;
    sched.set_timesteps(4)?;
    assert_eq!(sched.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
    let prompts = vec!["a red cube on a blue table".to_string()];
    let (text, _) = encode_prompts(
        &sd,
        &prompts,
        Negative::None,
        None,
        Some(&XlSizes::for_image(32, 32)),
    )?;
    let (added, _) = text.added.clone().context("added")?;
    let noise = &refs["noise"];
    let mut x = (refs["init_latents"].clone() * sched.init_noise_sigma())?;
    for (i, &t) in sched.timesteps().to_vec().iter().enumerate() {
        let model_in = sched.scale_model_input(&x, i)?;
        let ts = Tensor::full(t as f32, 1, &Device::Cpu)?;
        let pred = sd.unet.forward(
            &model_in,
            &ts,
            &text.cond,
            Some(&added),
            agfsync_models::nn::Pass::INFERENCE,
        )?;
        let n = if i + 1 < 4 { Some(noise.get(i)?) } else { None };
        x = sched.step_with_noise(&pred, i, &x, n.as_ref())?;
        let d = max_abs(&x, &refs["step_latents"].get(i)?)?;
        assert!(d < 1e-3, "LCM step {i} differs by {d}");
    }
    let image = decode_latents(&sd, &x)?.permute((0, 2, 3, 1))?;
    let p = psnr(&image, &refs["image"])?;
    assert!(p > 40.0, "sdxl lcm: PSNR {p:.1} dB");
    Ok(())
}
