//! `agfsync sample`: text-to-image generation.

use std::path::{Path, PathBuf};

use agfsync_diffusion::pipeline::{
    decode_latents, denoise, encode_prompts, latent_shape, random_latents, to_rgb8, DenoiseOptions,
    Negative, XlSizes,
};
use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{build, SchedulerConfig, SchedulerKind};
use agfsync_models::hub::{resolve_model, HubOptions};
use agfsync_models::lora::{apply_lora, LoraFile, LoraMode, LoraTargets};
use agfsync_models::single_file::{load_single_file_auto, SingleFileOptions};
use agfsync_models::stable_diffusion::{LoadOptions, SdFamily, StableDiffusion};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;

use crate::common::{check_dtype_device, parse_device, parse_dtype, progress};
use crate::images::{read_latents, write_latents, write_png};

/// Arguments of `agfsync sample`.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// Model: a diffusers pipeline folder, a hub id (`org/name[@revision]`)
    /// read through the Hugging Face cache, or a single-file checkpoint
    /// (`.safetensors` in the original Stability layout).
    #[arg(long)]
    pub model: String,
    /// For single-file checkpoints: the diffusers pipeline (folder or hub id)
    /// that supplies configs, tokenizers and scheduler. Default: the
    /// canonical SD 1.5 / SD 2.1 / SDXL base repo for the file's family.
    #[arg(long)]
    pub config: Option<String>,
    /// For single-file checkpoints: override the prediction type
    /// (epsilon or v_prediction; SD 2.x files do not show it in their weights).
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// For single-file checkpoints holding both: use the EMA UNet weights.
    #[arg(long)]
    pub ema: bool,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// What the image should not show (used with guidance > 1). Without it,
    /// SD 1.x/2.x use "" and SDXL uses zero embeddings, as diffusers does.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// Scheduler: ddim, euler, euler-ancestral, dpm++2m, dpm++2m-karras, lcm
    /// (for LCM-distilled models or LCM-LoRA: 4-8 steps, guidance 1-2), ddpm.
    /// Default: the model's own (scheduler/scheduler_config.json).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Seed of image 0; image i uses seed + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Initial latents: a safetensors file whose tensor `latents` has shape
    /// [num-images, 4, height/8, width/8] (what diffusers' `latents=` takes).
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Images denoised together.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Use the text encoder's output this many layers before the last
    /// (diffusers' clip_skip).
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// SDXL micro-conditioning: original image size HEIGHT,WIDTH (default:
    /// the output size).
    #[arg(long, value_parser = parse_pair)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL micro-conditioning: crop corner TOP,LEFT (default 0,0).
    #[arg(long, value_parser = parse_pair)]
    pub crops_coords_top_left: Option<(usize, usize)>,
    /// SDXL micro-conditioning: target size HEIGHT,WIDTH (default: the
    /// output size).
    #[arg(long, value_parser = parse_pair)]
    pub target_size: Option<(usize, usize)>,
    /// Output: a .png file (numbered when several images) or a folder.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Also write the final latents (before VAE decoding), tensor `latents`.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// LoRA adapter file (diffusers/PEFT or kohya safetensors). Repeat for
    /// several adapters.
    #[arg(long)]
    pub lora: Vec<PathBuf>,
    /// Weight of each --lora, in the same order (one value applies to all).
    #[arg(long)]
    pub lora_scale: Vec<f64>,
    /// merge: fold adapters into the weights (fastest); attach: keep them
    /// separate, applied at every forward.
    #[arg(long, default_value = "merge", value_parser = ["merge", "attach"])]
    pub lora_mode: String,
    /// Weights variant to prefer (e.g. fp16), falling back to the plain files.
    #[arg(long)]
    pub variant: Option<String>,
}

/// Parses `A,B` (or `AxB`) into a pair of integers.
fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    let parts: Vec<&str> = s.split([',', 'x']).map(str::trim).collect();
    match parts.as_slice() {
        [a, b] => match (a.parse(), b.parse()) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            _ => Err(format!("`{s}` is not two integers like 1024,1024")),
        },
        _ => Err(format!("`{s}` is not two integers like 1024,1024")),
    }
}

fn output_paths(out: &Path, n: usize) -> Result<Vec<PathBuf>> {
    let is_png = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        if n == 1 {
            return Ok(vec![out.to_path_buf()]);
        }
        let stem = out.file_stem().unwrap_or_default().to_string_lossy();
        return Ok((0..n)
            .map(|i| out.with_file_name(format!("{stem}-{i}.png")))
            .collect());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok((0..n).map(|i| out.join(format!("{i:05}.png"))).collect())
}

/// Runs `agfsync sample`.
pub fn run(a: &SampleArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.num_images == 0 || a.batch_size == 0 {
        bail!("--num-images and --batch-size must be at least 1");
    }
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    check_dtype_device(dtype, &device)?;
    // Check what can be checked before the (slow) model load.
    let kind_override = match &a.scheduler {
        Some(s) => Some(s.parse::<SchedulerKind>()?),
        None => None,
    };
    let init = match &a.latents {
        Some(p) => Some(read_latents(p)?),
        None => None,
    };

    let load = LoadOptions {
        dtype,
        device: device.clone(),
        variant: a.variant.clone(),
    };
    let model_path = Path::new(&a.model);
    let sd = if model_path.is_file() {
        if model_path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ckpt") || e.eq_ignore_ascii_case("pt"))
        {
            bail!("{}: pickle checkpoints can run arbitrary code and are not loaded; convert it to .safetensors first", a.model);
        }
        tracing::info!("loading single-file checkpoint {}", a.model);
        load_single_file_auto(
            model_path,
            a.config.as_deref(),
            &HubOptions::from_env(),
            &load,
            &SingleFileOptions {
                prediction_type: a.prediction_type.clone(),
                prefer_ema: a.ema,
            },
        )?
    } else {
        if a.config.is_some() || a.prediction_type.is_some() || a.ema {
            bail!("--config, --prediction-type and --ema apply to single-file checkpoints; {} is not a file", a.model);
        }
        let src = resolve_model(&a.model, &HubOptions::from_env())?;
        tracing::info!("loading {}", src.describe(""));
        StableDiffusion::load(&src, &load)?
    };
    if a.lora_scale.len() > 1 && a.lora_scale.len() != a.lora.len() {
        bail!(
            "{} --lora-scale values for {} --lora files: give one value for all, or one per file",
            a.lora_scale.len(),
            a.lora.len()
        );
    }
    let mode = if a.lora_mode == "attach" {
        LoraMode::Attach
    } else {
        LoraMode::Merge
    };
    for (i, path) in a.lora.iter().enumerate() {
        let weight = match a.lora_scale.as_slice() {
            [] => 1.0,
            [one] => *one,
            many => many[i],
        };
        let file = LoraFile::load(path)?;
        let report = apply_lora(
            &file,
            &LoraTargets::of(&sd),
            &format!("lora{i}"),
            weight,
            mode,
        )
        .with_context(|| format!("applying LoRA {}", path.display()))?;
        tracing::info!(
            "LoRA {} ({:?}): {} of {} modules applied at weight {weight}",
            path.display(),
            report.format,
            report.matched,
            report.total
        );
    }
    let native = sd.unet.config().sample_size * sd.vae.config().scale_factor();
    let height = a.height.unwrap_or(native);
    let width = a.width.unwrap_or(native);
    let shape = latent_shape(&sd, a.num_images, height, width)?;
    if let Some(l) = &init {
        let (n, c, h, w) = shape;
        if l.dims() != [n, c, h, w] {
            bail!(
                "--latents {}: tensor `latents` has shape {:?}, expected [{n}, {c}, {h}, {w}] for --num-images {n} at {height}x{width}",
                a.latents.as_deref().unwrap_or(Path::new("")).display(),
                l.dims()
            );
        }
    }

    let sched_cfg = SchedulerConfig::from_json_str(&sd.scheduler_config)
        .context("reading the model's scheduler/scheduler_config.json")?;
    let kind = match kind_override {
        Some(k) => k,
        None => SchedulerKind::from_class_name(&sched_cfg.class_name)?,
    };
    let paths = output_paths(&a.out, a.num_images)?;
    let is_xl = sd.family == SdFamily::Xl;
    if !is_xl
        && (a.original_size.is_some()
            || a.crops_coords_top_left.is_some()
            || a.target_size.is_some())
    {
        bail!("--original-size, --crops-coords-top-left and --target-size are SDXL options; {} is not an SDXL pipeline", a.model);
    }
    let xl = XlSizes {
        original_size: a.original_size.unwrap_or((height, width)),
        crops_coords_top_left: a.crops_coords_top_left.unwrap_or((0, 0)),
        target_size: a.target_size.unwrap_or((height, width)),
    };
    // The prompt is the same for every image: encode it once, for a full batch.
    let full = a.batch_size.min(a.num_images);
    let prompts = vec![a.prompt.clone(); full];
    let negatives = a.negative_prompt.clone().map(|n| vec![n; full]);
    let neg = match (&negatives, a.guidance_scale > 1.0) {
        (_, false) => Negative::None,
        (Some(n), true) => Negative::Prompts(n),
        (None, true) => Negative::Default,
    };
    let (full_text, report) = encode_prompts(&sd, &prompts, neg, a.clip_skip, Some(&xl))?;
    if !report.truncated.is_empty() {
        tracing::warn!(
            "the prompt is longer than the text encoder's 77 tokens: the rest was truncated (as diffusers does)"
        );
    }
    let mut finals = Vec::with_capacity(a.num_images);
    let pb = progress((a.num_images * a.steps) as u64, "sampling");
    let mut start = 0;
    while start < a.num_images {
        let b = a.batch_size.min(a.num_images - start);
        let mut scheduler = build(kind, &sched_cfg)?;
        scheduler.set_timesteps(a.steps)?;
        let latents = match &init {
            Some(l) => l.narrow(0, start, b)?.to_device(&device)?,
            None => {
                let rows = (start..start + b)
                    .map(|i| {
                        let mut g = Generator::new(a.seed.wrapping_add(i as u64));
                        random_latents(&mut g, (1, shape.1, shape.2, shape.3), &device)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
        };
        let text = full_text.first_rows(b)?;
        // Noise drawn during sampling (ancestral schedulers, DDIM eta > 0)
        // comes from a generator of the batch's first seed.
        let mut rng = Generator::new(a.seed.wrapping_add(start as u64) ^ 0x5eed);
        let done_before = (start * a.steps) as u64;
        let fin = denoise(
            &sd,
            scheduler.as_mut(),
            &latents,
            &text,
            &DenoiseOptions {
                guidance_scale: a.guidance_scale,
            },
            &mut rng,
            &mut |i, _| pb.set_position(done_before + (i * b) as u64),
        )?;
        let images = decode_latents(&sd, &fin)?;
        for (j, (w, h, rgb)) in to_rgb8(&images)?.into_iter().enumerate() {
            let i = start + j;
            let params = serde_json::json!({
                "prompt": a.prompt,
                "negative_prompt": a.negative_prompt,
                "original_size": is_xl.then_some(xl.original_size),
                "crops_coords_top_left": is_xl.then_some(xl.crops_coords_top_left),
                "target_size": is_xl.then_some(xl.target_size),
                "model": sd.source,
                "scheduler": kind.to_string(),
                "steps": a.steps,
                "guidance_scale": a.guidance_scale,
                "seed": if init.is_some() { serde_json::Value::Null } else { (a.seed.wrapping_add(i as u64)).into() },
                "latents_file": a.latents.as_ref().map(|p| p.display().to_string()),
                "height": height,
                "width": width,
                "clip_skip": a.clip_skip,
                "dtype": a.dtype,
                "lora": a.lora.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "lora_scale": a.lora_scale,
                "agfsync_version": env!("CARGO_PKG_VERSION"),
            });
            let a1111 = format!(
                "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
                a.prompt,
                a.negative_prompt.as_deref().unwrap_or(""),
                a.steps,
                kind,
                a.guidance_scale,
                a.seed.wrapping_add(i as u64),
                width,
                height,
                sd.source
            );
            write_png(
                &paths[i],
                w,
                h,
                &rgb,
                &[("parameters", a1111), ("agfsync", params.to_string())],
            )?;
        }
        finals.push(
            fin.to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?,
        );
        start += b;
    }
    pb.finish_and_clear();
    if let Some(p) = &a.save_latents {
        let all = Tensor::cat(&finals, 0)?;
        write_latents(p, &all)?;
    }
    for p in &paths {
        println!("{}", p.display());
    }
    Ok(())
}
