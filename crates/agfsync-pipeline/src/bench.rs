//! Timing workloads behind `agfsync bench`: the hot paths of the AGFSync loop
//! with the real architectures (SD 1.5 / SDXL UNet, VAE and text encoders,
//! CLIP ViT-L/14) and random weights, so they run on any machine, a GPU
//! machine without model downloads included.
//!
//! Each workload returns one JSON object (`"impl": "agfsync"`) whose keys
//! match tools/bench/*.py, which time the same work in PyTorch. Timings wait
//! for the device ([`Device::synchronize`]) so they measure the GPU's work,
//! not the launch queue.
//!
//! Random weights are drawn on the target device ([`DeviceRandom`]), not on
//! the CPU: SDXL's 2.6 B parameters would take longer to draw than to
//! benchmark.
//! With `tiny` set, each workload uses the tiny test presets instead, which
//! is how the tests exercise this module on CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use agfsync_diffusion::pipeline::{
    decode_latents, denoise, encode_prompts, latent_shape, random_latents, DenoiseOptions,
    Negative, XlSizes,
};
use agfsync_diffusion::rng::Generator;
use agfsync_diffusion::schedulers::{build, SchedulerConfig, SchedulerKind};
use agfsync_dpo::data::{AddedCond, PairDataset};
use agfsync_dpo::trainer::{ModelSpec, TrainConfig, TrainDtype, Trainer};
use agfsync_feedback::clip::{ClipConfig, ClipModel};
use agfsync_feedback::clip_score::ClipScorer;
use agfsync_feedback::image_input::LoadedImage;
use agfsync_feedback::llava::{load_tokenizer, Llava, LlavaConfig, LlavaLoadOptions};
use agfsync_feedback::preprocess::{
    ClipImageProcessor, ImageProcessorConfig, ResizeBackend, ResizeTarget,
};
use agfsync_feedback::scorer::{BatchCache, Question, ScoreRequest, Scorer};
use agfsync_feedback::vqa::{VqaOptions, VqaScorer};
use agfsync_models::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use agfsync_models::clip_text::{ClipTextConfig, ClipTextModel};
use agfsync_models::clip_tokenizer::ClipTokenizer;
use agfsync_models::hub::ModelSource;
use agfsync_models::nn::Pass;
use agfsync_models::stable_diffusion::{LoadOptions, StableDiffusion};
use agfsync_models::tiny::{
    tiny_scheduler_config, tiny_unet_config, write_tiny_sd_pipeline, TinyPreset,
};
use agfsync_models::unet_2d_condition::{
    AddedCondition, PerBlock, UNet2DConditionConfig, UNet2DConditionModel,
};
use candle_core::{DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use serde_json::{json, Map, Value};

/// Which Stable Diffusion architecture a workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchArch {
    /// SD 1.5: 860 M-parameter UNet, one CLIP ViT-L text encoder.
    Sd15,
    /// SDXL: 2.6 B-parameter UNet, CLIP ViT-L + OpenCLIP bigG text encoders.
    Sdxl,
}

impl BenchArch {
    /// Parses `sd15` or `sdxl`.
    pub fn from_name(s: &str) -> Result<Self> {
        match s {
            "sd15" | "sd1.5" => Ok(Self::Sd15),
            "sdxl" | "xl" => Ok(Self::Sdxl),
            _ => Err(Error::Msg(format!("unknown arch `{s}`: use sd15 or sdxl"))),
        }
    }

    /// The name used in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sdxl => "sdxl",
        }
    }

    fn preset(self) -> TinyPreset {
        match self {
            Self::Sd15 => TinyPreset::Sd15,
            Self::Sdxl => TinyPreset::Sdxl,
        }
    }
}

/// Settings shared by the workloads.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Where everything runs.
    pub device: Device,
    /// Weights and activations dtype.
    pub dtype: DType,
    /// The architecture (UNet, sampling, DPO workloads).
    pub arch: BenchArch,
    /// Use the tiny test presets instead of the real sizes (smoke tests).
    pub tiny: bool,
    /// Timed repetitions (the median is reported).
    pub iters: usize,
    /// Untimed repetitions first (kernel compilation, cuBLAS heuristics).
    pub warmup: usize,
    /// Seed of the random weights and inputs.
    pub seed: u64,
    /// A folder for the small files some workloads write (tokenizers and
    /// configs of a tiny pipeline); a fresh one under the system temp folder
    /// when `None`.
    pub work_dir: Option<PathBuf>,
}

impl BenchOptions {
    fn base_json(&self, bench: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("bench".into(), json!(bench));
        m.insert("impl".into(), json!("agfsync"));
        m.insert("device".into(), json!(device_name(&self.device)));
        m.insert("dtype".into(), json!(dtype_name(self.dtype)));
        m.insert("tiny".into(), json!(self.tiny));
        m
    }

    fn work_dir(&self, what: &str) -> Result<WorkDir> {
        let (dir, remove) = match &self.work_dir {
            Some(d) => (d.join(what), false),
            None => (
                std::env::temp_dir().join(format!("agfsync-bench-{}-{what}", std::process::id())),
                true,
            ),
        };
        std::fs::create_dir_all(&dir).map_err(Error::wrap)?;
        Ok(WorkDir { dir, remove })
    }
}

/// A scratch folder, removed on drop when the bench made it up.
struct WorkDir {
    dir: PathBuf,
    remove: bool,
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `cpu` or `cuda:N`, as the output names the device.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        _ => "other",
    }
}

/// Median, minimum and maximum seconds of the timed runs.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Median seconds.
    pub median_s: f64,
    /// Fastest run.
    pub min_s: f64,
    /// Slowest run.
    pub max_s: f64,
    /// Timed runs.
    pub iters: usize,
}

impl Timing {
    fn insert(&self, m: &mut Map<String, Value>) {
        m.insert("median_s".into(), json!(self.median_s));
        m.insert("min_s".into(), json!(self.min_s));
        m.insert("max_s".into(), json!(self.max_s));
        m.insert("iters".into(), json!(self.iters));
    }
}

/// Runs `f` `warmup` times, then `iters` (at least one) timed times, each
/// followed by a device synchronisation.
pub fn time_runs(
    device: &Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut times = Vec::new();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(Timing {
        median_s: times[times.len() / 2],
        min_s: times[0],
        max_s: times[times.len() - 1],
        iters: times.len(),
    })
}

/// The real UNet config of `arch` (diffusers' unet/config.json of
/// runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0),
/// or the tiny preset's.
pub fn unet_config(arch: BenchArch, tiny: bool) -> Result<UNet2DConditionConfig> {
    serde_json::from_value(unet_config_json(arch, tiny)).map_err(Error::wrap)
}

/// [`unet_config`] as the JSON of a diffusers `unet/config.json`.
pub fn unet_config_json(arch: BenchArch, tiny: bool) -> Value {
    if tiny {
        tiny_unet_config(arch.preset())
    } else {
        match arch {
            BenchArch::Sd15 => json!({
                "sample_size": 64,
                "block_out_channels": [320, 640, 1280, 1280],
                "layers_per_block": 2,
                "cross_attention_dim": 768,
                "attention_head_dim": 8,
                "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                "norm_num_groups": 32,
            }),
            BenchArch::Sdxl => json!({
                "sample_size": 128,
                "block_out_channels": [320, 640, 1280],
                "layers_per_block": 2,
                "transformer_layers_per_block": [1, 2, 10],
                "attention_head_dim": [5, 10, 20],
                "cross_attention_dim": 2048,
                "use_linear_projection": true,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "norm_num_groups": 32,
            }),
        }
    }
}

/// Inputs of one UNet call: latents, timesteps, text context, SDXL's added
/// conditioning.
struct UNetInputs {
    x: Tensor,
    t: Tensor,
    ctx: Tensor,
    added: Option<AddedCondition>,
}

fn unet_inputs(
    cfg: &UNet2DConditionConfig,
    batch: usize,
    latent: usize,
    dtype: DType,
    device: &Device,
) -> Result<UNetInputs> {
    let x = Tensor::randn(0f32, 1.0, (batch, cfg.in_channels, latent, latent), device)?
        .to_dtype(dtype)?;
    // Per-sample timesteps, as in a DPO batch; sampling uses one for all.
    let t: Vec<f32> = (0..batch)
        .map(|i| 999.0 - (i as f32 * 998.0 / batch.max(2).saturating_sub(1) as f32))
        .collect();
    let t = Tensor::new(t.as_slice(), device)?;
    // One context width for every block (all the real configs have one).
    let ctx_dim = match &cfg.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::List(v) => v.first().copied().unwrap_or(768),
    };
    let ctx = Tensor::randn(0f32, 1.0, (batch, 77, ctx_dim), device)?.to_dtype(dtype)?;
    let added = match cfg.projection_class_embeddings_input_dim {
        Some(proj) if cfg.addition_embed_type.as_deref() == Some("text_time") => {
            let time_dim = cfg.addition_time_embed_dim.unwrap_or(256);
            let text_dim = proj.saturating_sub(6 * time_dim);
            let px = (latent * 8) as f32;
            let ids: Vec<f32> = (0..batch)
                .flat_map(|_| [px, px, 0.0, 0.0, px, px])
                .collect();
            Some(AddedCondition {
                text_embeds: Tensor::randn(0f32, 1.0, (batch, text_dim), device)?
                    .to_dtype(dtype)?,
                time_ids: Tensor::from_vec(ids, (batch, 6), device)?.to_dtype(dtype)?,
            })
        }
        _ => None,
    };
    Ok(UNetInputs { x, t, ctx, added })
}

/// A [`VarBuilder`] backend that draws every weight on the device, from
/// the layer's init hint, in f32 and casts it to the requested dtype:
/// candle's CUDA backend has no f16/bf16 `randn`/`rand` (curand makes f32),
/// so a `VarMap` in f16 fails there while it works on the CPU. Every tensor
/// drawn is kept by name (the trainer takes the UNet's weights that way).
#[derive(Clone, Default)]
struct DeviceRandom {
    named: Arc<Mutex<HashMap<String, Tensor>>>,
    params: Arc<AtomicUsize>,
}

impl DeviceRandom {
    fn new() -> Self {
        Self::default()
    }

    fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn params(&self) -> usize {
        self.params.load(Ordering::Relaxed)
    }

    /// Every tensor drawn, by its checkpoint name.
    fn named(&self) -> HashMap<String, Tensor> {
        match self.named.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

impl SimpleBackend for DeviceRandom {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.params.fetch_add(s.elem_count(), Ordering::Relaxed);
        // Detached: `Init::var` makes a variable, and a weight that is one
        // would record gradients wherever it is used.
        let t = h
            .var(s, DType::F32, dev)?
            .as_tensor()
            .to_dtype(dtype)?
            .detach();
        match self.named.lock() {
            Ok(mut m) => m.insert(name.to_string(), t.clone()),
            Err(p) => p.into_inner().insert(name.to_string(), t.clone()),
        };
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// One UNet forward (inference) of `batch` latents of `latent` x `latent`
/// (batch 2 = one classifier-free-guidance step of one image).
pub fn unet_step(o: &BenchOptions, batch: usize, latent: usize) -> Result<Value> {
    let cfg = unet_config(o.arch, o.tiny)?;
    let t0 = Instant::now();
    let weights = DeviceRandom::new();
    let unet = UNet2DConditionModel::new(&cfg, weights.var_builder(o.dtype, &o.device))?;
    o.device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let inp = unet_inputs(&cfg, batch, latent, o.dtype, &o.device)?;
    let mut finite = true;
    reset_peak_rss();
    let timing = time_runs(&o.device, o.warmup, o.iters, || {
        let y = unet.forward(
            &inp.x,
            &inp.t,
            &inp.ctx,
            inp.added.as_ref(),
            Pass::INFERENCE,
        )?;
        finite = y
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?
            .is_finite();
        Ok(())
    })?;
    let mut m = o.base_json("unet_step");
    m.insert("arch".into(), json!(o.arch.name()));
    m.insert("batch".into(), json!(batch));
    m.insert("latent_hw".into(), json!(latent));
    m.insert("params_m".into(), json!(weights.params() as f64 / 1e6));
    m.insert("build_s".into(), json!(build_s));
    m.insert("finite".into(), json!(finite));
    timing.insert(&mut m);
    insert_peak_rss(&mut m);
    Ok(Value::Object(m))
}

/// Reads a JSON file of the tiny pipeline and overrides some keys.
fn json_with(path: &Path, overrides: Value) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(Error::wrap)?;
    let mut v: Value = serde_json::from_str(&text).map_err(Error::wrap)?;
    if let (Some(obj), Value::Object(o)) = (v.as_object_mut(), overrides) {
        obj.extend(o);
    }
    Ok(v)
}

/// Swaps the tiny pipeline's networks for real-size ones with random weights
/// drawn on the device; the tiny tokenizers (whose ids all fall inside the
/// real vocabulary) and the scheduler config stay.
fn make_full_size(sd: &mut StableDiffusion, dir: &Path, o: &BenchOptions) -> Result<usize> {
    let weights = DeviceRandom::new();
    let vb = weights.var_builder(o.dtype, &o.device);
    sd.unet = UNet2DConditionModel::new(&unet_config(o.arch, false)?, vb.pp("unet"))?;
    let xl = o.arch == BenchArch::Sdxl;
    sd.vae = AutoencoderKl::new(&full_vae_config(o.arch, dir)?, vb.pp("vae"))?;
    // CLIP ViT-L/14's text tower (SD 1.5, SDXL's first encoder).
    let te: ClipTextConfig = serde_json::from_value(json_with(
        &dir.join("text_encoder/config.json"),
        json!({
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "projection_dim": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        }),
    )?)
    .map_err(Error::wrap)?;
    sd.text_encoder = ClipTextModel::new(&te, false, vb.pp("te"))?;
    if xl {
        // OpenCLIP ViT-bigG/14's text tower with its projection.
        let te2: ClipTextConfig = serde_json::from_value(json_with(
            &dir.join("text_encoder_2/config.json"),
            json!({
                "vocab_size": 49408,
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "projection_dim": 1280,
                "num_hidden_layers": 32,
                "num_attention_heads": 20,
            }),
        )?)
        .map_err(Error::wrap)?;
        sd.text_encoder_2 = Some(ClipTextModel::new(&te2, true, vb.pp("te2"))?);
    }
    Ok(weights.params())
}

/// The real SD VAE (SD 1.5's and SDXL's share the architecture) over the
/// tiny pipeline's VAE config in `dir` (scaling factor and the rest).
fn full_vae_config(arch: BenchArch, dir: &Path) -> Result<AutoencoderKlConfig> {
    serde_json::from_value(json_with(
        &dir.join("vae/config.json"),
        json!({
            "down_block_types": vec!["DownEncoderBlock2D"; 4],
            "up_block_types": vec!["UpDecoderBlock2D"; 4],
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "norm_num_groups": 32,
            "sample_size": if arch == BenchArch::Sdxl { 1024 } else { 512 },
        }),
    )?)
    .map_err(Error::wrap)
}

/// VAE decoding of one `size` x `size` image from its latents, the last
/// stage of every sample: the real SD VAE with random weights (the tiny one
/// with `tiny`), the same call as the pipeline's `decode_latents`.
pub fn vae_decode(o: &BenchOptions, size: usize) -> Result<Value> {
    let work = o.work_dir("vae")?;
    let dir = work.dir.join(format!("tiny-{}", o.arch.name()));
    write_tiny_sd_pipeline(&dir, o.arch.preset(), o.seed).map_err(Error::wrap)?;
    let t0 = Instant::now();
    let weights = DeviceRandom::new();
    let cfg = if o.tiny {
        AutoencoderKlConfig::from_json(
            &std::fs::read_to_string(dir.join("vae/config.json")).map_err(Error::wrap)?,
        )
        .map_err(Error::wrap)?
    } else {
        full_vae_config(o.arch, &dir)?
    };
    let vae = AutoencoderKl::new(&cfg, weights.var_builder(o.dtype, &o.device))?;
    o.device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let f = cfg.scale_factor();
    let side = (size / f).max(1);
    let z = Tensor::randn(0f32, 1.0, (1, cfg.latent_channels, side, side), &o.device)?
        .to_dtype(o.dtype)?;
    let mut finite = true;
    reset_peak_rss();
    let timing = time_runs(&o.device, o.warmup, o.iters, || {
        let img = vae.decode(&z, Pass::INFERENCE)?;
        finite = img
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?
            .is_finite();
        Ok(())
    })?;
    let mut m = o.base_json("vae_decode");
    m.insert("arch".into(), json!(o.arch.name()));
    m.insert("size".into(), json!(side * f));
    m.insert("params_m".into(), json!(weights.params() as f64 / 1e6));
    m.insert("build_s".into(), json!(build_s));
    m.insert("finite".into(), json!(finite));
    timing.insert(&mut m);
    insert_peak_rss(&mut m);
    Ok(Value::Object(m))
}

/// Generates one image of `size` x `size` end to end: prompt encoding,
/// `steps` denoising steps with classifier-free guidance (the pipeline's
/// scheduler: DDIM for SD 1.5, Euler for SDXL) and VAE decoding, the same
/// library calls as `agfsync sample`.
pub fn sample(o: &BenchOptions, size: usize, steps: usize) -> Result<Value> {
    let work = o.work_dir("sample")?;
    let dir = work.dir.join(format!("tiny-{}", o.arch.name()));
    write_tiny_sd_pipeline(&dir, o.arch.preset(), o.seed).map_err(Error::wrap)?;
    let t0 = Instant::now();
    let mut sd = StableDiffusion::load(
        &ModelSource::local(&dir),
        &LoadOptions {
            dtype: o.dtype,
            device: o.device.clone(),
            variant: None,
        },
    )
    .map_err(Error::wrap)?;
    let params = if o.tiny {
        0
    } else {
        make_full_size(&mut sd, &dir, o)?
    };
    o.device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let sched_cfg = SchedulerConfig::from_json_str(&sd.scheduler_config).map_err(Error::wrap)?;
    let kind = SchedulerKind::from_config(&sched_cfg).map_err(Error::wrap)?;
    let prompts = vec!["a lighthouse at dusk, oil painting".to_string()];
    let xl = XlSizes::for_image(size, size);
    let shape = latent_shape(&sd, 1, size, size)?;
    let mut finite = true;
    reset_peak_rss();
    let timing = time_runs(&o.device, o.warmup, o.iters, || {
        let (text, _) = encode_prompts(&sd, &prompts, Negative::Default, None, Some(&xl))?;
        let mut scheduler = build(kind, &sched_cfg).map_err(Error::wrap)?;
        scheduler.set_timesteps(steps).map_err(Error::wrap)?;
        let mut g = Generator::new(o.seed);
        let latents = random_latents(&mut g, shape, &o.device)?;
        let fin = denoise(
            &sd,
            scheduler.as_mut(),
            &latents,
            &text,
            &DenoiseOptions {
                guidance_scale: 7.5,
            },
            &mut g,
            &mut |_, _| {},
        )?;
        let images = decode_latents(&sd, &fin)?;
        finite = images.sum_all()?.to_scalar::<f32>()?.is_finite();
        Ok(())
    })?;
    let mut m = o.base_json("sample");
    m.insert("arch".into(), json!(o.arch.name()));
    m.insert("size".into(), json!(size));
    m.insert("steps".into(), json!(steps));
    m.insert("scheduler".into(), json!(kind.to_string()));
    m.insert("guidance".into(), json!(7.5));
    m.insert("params_m".into(), json!(params as f64 / 1e6));
    m.insert("build_s".into(), json!(build_s));
    m.insert("finite".into(), json!(finite));
    timing.insert(&mut m);
    insert_peak_rss(&mut m);
    m.insert(
        "step_s".into(),
        json!(timing.median_s / steps.max(1) as f64),
    );
    Ok(Value::Object(m))
}

/// CLIP score of `batch` 512x512 images with CLIP ViT-L/14 (or the tiny
/// CLIP): the vision tower alone on a ready batch, and `ClipScorer`'s
/// `score_batch` end to end (CPU preprocessing, vision tower, cosine with
/// the cached prompt embedding).
pub fn clip_score(o: &BenchOptions, batch: usize) -> Result<Value> {
    let work = o.work_dir("clip")?;
    let dir = work.dir.join("tiny-clip");
    agfsync_feedback::tiny::write_tiny_clip(&dir, o.seed).map_err(Error::wrap)?;
    let t0 = Instant::now();
    let model = if o.tiny {
        ClipModel::load(&ModelSource::local(&dir), o.dtype, &o.device).map_err(Error::wrap)?
    } else {
        // Any CLIP BPE tokenizer does for timing: the prompt is encoded once.
        let tokenizer = ClipTokenizer::from_dir(&dir).map_err(Error::wrap)?;
        let processor =
            ClipImageProcessor::new(ImageProcessorConfig::default(), ResizeBackend::Pil)
                .map_err(Error::wrap)?;
        ClipModel::from_parts(
            ClipConfig::vit_large_patch14(),
            DeviceRandom::new().var_builder(o.dtype, &o.device),
            tokenizer,
            processor,
            "random ViT-L/14",
        )
        .map_err(Error::wrap)?
    };
    let model = Arc::new(model);
    o.device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let images: Vec<LoadedImage> = (0..batch)
        .map(|i| {
            let rgb = (0..512 * 512 * 3)
                .map(|j| ((j * 7 + i * 131 + (j / 1536) * 3) % 251) as u8)
                .collect();
            LoadedImage::from_rgb(format!("img{i}.png"), 512, 512, rgb)
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::wrap)?;
    let refs: Vec<&LoadedImage> = images.iter().collect();
    let side = model.processor().config().crop_size.0;
    let pv = Tensor::randn(0f32, 1.0, (batch, 3, side, side), &o.device)?;
    // Preprocessing alone (resize, crop, normalise on the CPU).
    let preprocess = time_runs(&Device::Cpu, o.warmup, o.iters, || {
        for im in &refs {
            model.processor().pixel_values(im).map_err(Error::wrap)?;
        }
        Ok(())
    })?;
    reset_peak_rss();
    let vision = time_runs(&o.device, o.warmup, o.iters, || {
        model.image_features(&pv).map_err(Error::wrap)?;
        Ok(())
    })?;
    let scorer = ClipScorer::new(model.clone()).with_batch_size(batch);
    let request = ScoreRequest::prompt("a lighthouse at dusk, oil painting");
    let score = time_runs(&o.device, o.warmup, o.iters, || {
        scorer
            .score_batch(&refs, &request, &mut BatchCache::new())
            .map_err(Error::wrap)?;
        Ok(())
    })?;
    let mut m = o.base_json("clip_score");
    m.insert(
        "arch".into(),
        json!(if o.tiny {
            "tiny-clip"
        } else {
            "clip-vit-large-patch14"
        }),
    );
    m.insert("batch".into(), json!(batch));
    m.insert("build_s".into(), json!(build_s));
    m.insert(
        "preprocess_images_per_s".into(),
        json!(batch as f64 / preprocess.median_s),
    );
    m.insert("vision_batch_s".into(), json!(vision.median_s));
    m.insert(
        "vision_images_per_s".into(),
        json!(batch as f64 / vision.median_s),
    );
    m.insert("score_batch_s".into(), json!(score.median_s));
    m.insert(
        "score_images_per_s".into(),
        json!(batch as f64 / score.median_s),
    );
    // The table's time column: the end-to-end score of one batch.
    score.insert(&mut m);
    insert_peak_rss(&mut m);
    Ok(Value::Object(m))
}

/// The questions of the VQA workload: TIFA-style yes/no questions about the
/// prompt `a red cube on a blue sphere`, in the tiny tokenizer's words (so
/// both the tiny and the real-size model read them as words, not unknowns).
const VQA_QUESTIONS: [&str; 4] = [
    "Is there a red cube ?",
    "Is there a blue sphere ?",
    "Is the cube on the sphere ?",
    "Is the cube red ?",
];

/// VQA scoring of one image with LLaVA-1.5 ([`VqaScorer`]): the image
/// encoded once, the shared prompt prefix run once into a KV cache, then
/// `questions` yes/no questions as one batch, each giving P(yes) at its
/// first answer position (`max_new_tokens` 1). The real size is
/// llava-1.5-7b (CLIP ViT-L/14 at 336 px, a 4096-wide Llama) with
/// `lm_layers` of its 32 decoder layers (a CPU cannot hold the whole 7B
/// model in f32: 28 GB); the tiny model with `tiny`.
pub fn vqa(o: &BenchOptions, questions: usize, lm_layers: usize) -> Result<Value> {
    let work = o.work_dir("vqa")?;
    let dir = work.dir.join("tiny-llava");
    agfsync_feedback::llava::write_tiny_llava(&dir, o.seed).map_err(Error::wrap)?;
    let t0 = Instant::now();
    let weights = DeviceRandom::new();
    let model = if o.tiny {
        Llava::load(
            &ModelSource::local(&dir),
            &LlavaLoadOptions {
                dtype: o.dtype,
                device: o.device.clone(),
                resize_backend: ResizeBackend::Pil,
            },
        )
        .map_err(Error::wrap)?
    } else {
        // The tiny word-level tokenizer: its ids fall inside the real
        // vocabulary, and `<image>` is its last id.
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json")).map_err(Error::wrap)?;
        let image_id = tokenizer.get_vocab_size(true).saturating_sub(1);
        let config = json!({
            "model_type": "llava",
            "image_token_index": image_id,
            "projector_hidden_act": "gelu",
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "text_config": {
                "model_type": "llama", "vocab_size": 32064, "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": lm_layers,
                "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
                "tie_word_embeddings": false
            },
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": 1024,
                "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
                "projection_dim": 768, "layer_norm_eps": 1e-5
            }
        });
        let config = LlavaConfig::from_json(&config.to_string()).map_err(Error::Msg)?;
        let processor = ClipImageProcessor::new(
            ImageProcessorConfig {
                size: ResizeTarget::ShortestEdge(336),
                crop_size: (336, 336),
                ..ImageProcessorConfig::default()
            },
            ResizeBackend::Pil,
        )
        .map_err(Error::wrap)?;
        Llava::from_parts(
            config,
            weights.var_builder(o.dtype, &o.device),
            tokenizer,
            processor,
            "random llava-1.5-7b",
        )
        .map_err(Error::wrap)?
    };
    o.device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let scorer = VqaScorer::new(
        Arc::new(model),
        VqaOptions {
            max_new_tokens: 1,
            vqascore_template: String::new(),
            ..VqaOptions::default()
        },
    )
    .map_err(Error::wrap)?;
    let qs: Vec<Question> = (0..questions)
        .map(|i| Question {
            question: VQA_QUESTIONS[i % VQA_QUESTIONS.len()].to_string(),
            ..Question::default()
        })
        .collect();
    let rgb = (0..512 * 512 * 3)
        .map(|j| ((j * 7 + (j / 1536) * 3) % 251) as u8)
        .collect();
    let image = LoadedImage::from_rgb("img.png".to_string(), 512, 512, rgb).map_err(Error::wrap)?;
    let prompt = "a red cube on a blue sphere";
    let mut finite = true;
    reset_peak_rss();
    let timing = time_runs(&o.device, o.warmup, o.iters, || {
        let out = scorer.answer(&[&image], prompt, &qs).map_err(Error::wrap)?;
        for answers in out {
            let answers = answers.map_err(Error::wrap)?;
            finite = answers
                .answers
                .iter()
                .all(|a| a.p_yes.is_some_and(f64::is_finite));
        }
        Ok(())
    })?;
    let model = scorer.model();
    let mut m = o.base_json("vqa");
    m.insert(
        "arch".into(),
        json!(if o.tiny { "tiny-llava" } else { "llava-1.5-7b" }),
    );
    m.insert("questions".into(), json!(questions));
    m.insert(
        "lm_layers".into(),
        json!(model.lm().config().num_hidden_layers),
    );
    m.insert("image_tokens".into(), json!(model.image_tokens()));
    m.insert(
        "question_tokens".into(),
        json!(model
            .encode_text(&scorer.chat_prompt(&scorer.question_text(&qs[0])))
            .map_err(Error::wrap)?
            .len()),
    );
    m.insert("params_m".into(), json!(weights.params() as f64 / 1e6));
    m.insert("build_s".into(), json!(build_s));
    m.insert("finite".into(), json!(finite));
    m.insert(
        "question_s".into(),
        json!(timing.median_s / questions.max(1) as f64),
    );
    timing.insert(&mut m);
    insert_peak_rss(&mut m);
    Ok(Value::Object(m))
}

/// What one Diffusion-DPO step trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DpoWorkload {
    /// Preference pairs per step.
    pub pairs: usize,
    /// Latent height and width.
    pub latent: usize,
    /// The whole UNet against a frozen copy instead of LoRA (rank 4 on
    /// to_q/to_k/to_v/to_out.0, the reference is the UNet with adapters off).
    pub full: bool,
    /// Recompute activations in the backward pass instead of keeping them.
    pub gradient_checkpointing: bool,
}

/// One Diffusion-DPO optimizer step of the trainer itself
/// ([`agfsync_dpo::trainer::Trainer::train_step`]): the trained model's
/// differentiable forward on winners and losers, the reference forward, the
/// loss, the backward pass, clipping and AdamW, on random weights drawn on
/// the device and random latents and text embeddings. `o.dtype` is the
/// training compute dtype (f32 master weights below f32).
pub fn dpo_step(o: &BenchOptions, w: &DpoWorkload) -> Result<Value> {
    let cfg_json = unet_config_json(o.arch, o.tiny);
    let cfg: UNet2DConditionConfig =
        serde_json::from_value(cfg_json.clone()).map_err(Error::wrap)?;
    let t0 = Instant::now();
    let weights = DeviceRandom::new();
    // The model is built only to draw its weights, in the compute dtype.
    drop(UNet2DConditionModel::new(
        &cfg,
        weights.var_builder(o.dtype, &o.device),
    )?);
    let scheduler =
        SchedulerConfig::from_json_str(&tiny_scheduler_config(o.arch.preset()).to_string())
            .map_err(Error::wrap)?;
    let spec = ModelSpec::from_tensors(&cfg_json.to_string(), weights.named(), &scheduler)
        .map_err(Error::wrap)?;
    let train = TrainConfig {
        steps: o.warmup + o.iters.max(1),
        lr: 1e-5,
        full: w.full,
        gradient_checkpointing: w.gradient_checkpointing,
        batch_size: w.pairs,
        grad_accum: 1,
        dtype: match o.dtype {
            DType::BF16 => TrainDtype::Bf16,
            DType::F16 => TrainDtype::F16,
            _ => TrainDtype::F32,
        },
        seed: o.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(&spec, &train, &o.device).map_err(Error::wrap)?;
    drop(spec);
    let data = dpo_pairs(&cfg, w, &o.device)?;
    o.device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let mut last_loss = f64::NAN;
    reset_peak_rss();
    let timing = time_runs(&o.device, o.warmup, o.iters, || {
        last_loss = trainer.train_step(&data).map_err(Error::wrap)?.loss;
        Ok(())
    })?;
    let mut m = o.base_json("dpo_step");
    m.insert("arch".into(), json!(o.arch.name()));
    m.insert("mode".into(), json!(if w.full { "full" } else { "lora" }));
    m.insert(
        "gradient_checkpointing".into(),
        json!(w.gradient_checkpointing),
    );
    m.insert("pairs".into(), json!(w.pairs));
    m.insert("latent_hw".into(), json!(w.latent));
    m.insert("params_m".into(), json!(weights.params() as f64 / 1e6));
    m.insert(
        "trainable_params".into(),
        json!(trainer
            .trainables()
            .iter()
            .map(|t| t.var.elem_count())
            .sum::<usize>()),
    );
    m.insert("build_s".into(), json!(build_s));
    m.insert("finite".into(), json!(last_loss.is_finite()));
    timing.insert(&mut m);
    insert_peak_rss(&mut m);
    Ok(Value::Object(m))
}

/// Random preference pairs for [`dpo_step`]: winner and loser latents, text
/// embeddings of the UNet's cross-attention width, SDXL's added
/// conditioning when the UNet takes it.
fn dpo_pairs(cfg: &UNet2DConditionConfig, w: &DpoWorkload, device: &Device) -> Result<PairDataset> {
    let n = cfg.block_out_channels.len();
    let cross = cfg
        .cross_attention_dim
        .expand(n, "cross_attention_dim")
        .map_err(Error::wrap)?[0];
    let shape = (w.pairs, cfg.in_channels, w.latent, w.latent);
    let added = match cfg.projection_class_embeddings_input_dim {
        Some(dim) if cfg.addition_embed_type.as_deref() == Some("text_time") => {
            // text_time: the pooled text embedding plus six time ids, each
            // embedded to addition_time_embed_dim.
            let time_dim = cfg.addition_time_embed_dim.unwrap_or(256);
            Some(AddedCond {
                text_embeds: Tensor::randn(0f32, 1.0, (w.pairs, dim - 6 * time_dim), device)?,
                time_ids: Tensor::new(&[512f32, 512., 0., 0., 512., 512.], device)?
                    .unsqueeze(0)?
                    .repeat((w.pairs, 1))?,
            })
        }
        _ => None,
    };
    PairDataset::new(
        Tensor::randn(0f32, 1.0, shape, device)?,
        Tensor::randn(0f32, 1.0, shape, device)?,
        Tensor::randn(0f32, 1.0, (w.pairs, 77, cross), device)?,
        added,
    )
    .map_err(Error::wrap)
}

/// Resets the process's peak resident memory (`VmHWM`), so the next
/// [`insert_peak_rss`] reports one workload's peak (Linux; elsewhere a no-op).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Adds `peak_rss_mib` (host memory, since the last [`reset_peak_rss`]) when
/// the system reports it.
fn insert_peak_rss(m: &mut Map<String, Value>) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok());
    if let Some(kib) = kib {
        m.insert("peak_rss_mib".into(), json!(kib / 1024.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(arch: BenchArch, dir: &Path) -> BenchOptions {
        BenchOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            arch,
            tiny: true,
            iters: 1,
            warmup: 0,
            seed: 0,
            work_dir: Some(dir.to_path_buf()),
        }
    }

    fn check(v: &Value, bench: &str) {
        assert_eq!(v["bench"], bench, "{v}");
        assert_eq!(v["impl"], "agfsync");
        assert_eq!(v["device"], "cpu");
        assert!(v["median_s"].as_f64().is_some_and(|s| s > 0.0), "{v}");
    }

    // The tiny presets run every workload end to end on CPU: the code paths
    // `agfsync bench` takes on a GPU, at sizes CI can afford.
    #[test]
    fn every_workload_runs_with_the_tiny_models() {
        let tmp = tempfile::tempdir().expect("tempdir");
        for arch in [BenchArch::Sd15, BenchArch::Sdxl] {
            let o = tiny(arch, tmp.path());
            let v = unet_step(&o, 2, 8).expect("unet");
            check(&v, "unet_step");
            assert_eq!(v["arch"], arch.name());
            assert_eq!(v["finite"], true);
            let v = sample(&o, 64, 2).expect("sample");
            check(&v, "sample");
            assert_eq!(v["steps"], 2);
            assert_eq!(v["finite"], true);
            let v = vae_decode(&o, 64).expect("vae");
            check(&v, "vae_decode");
            assert_eq!(v["size"], 64);
            assert_eq!(v["finite"], true);
            for (full, gradient_checkpointing) in [(false, false), (true, true)] {
                let w = DpoWorkload {
                    pairs: 1,
                    latent: 8,
                    full,
                    gradient_checkpointing,
                };
                let v = dpo_step(&o, &w).expect("dpo");
                check(&v, "dpo_step");
                assert_eq!(v["finite"], true);
                assert_eq!(v["mode"], if full { "full" } else { "lora" });
                assert!(v["trainable_params"].as_u64() > Some(0), "{v}");
            }
        }
        let v = vqa(&tiny(BenchArch::Sd15, tmp.path()), 3, 0).expect("vqa");
        check(&v, "vqa");
        assert_eq!(v["finite"], true);
        assert_eq!(v["questions"], 3);
        assert!(v["question_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
        let v = clip_score(&tiny(BenchArch::Sd15, tmp.path()), 2).expect("clip");
        check(&v, "clip_score");
        assert!(v["score_images_per_s"].as_f64().is_some_and(|x| x > 0.0));
    }

    // The drawn weights once stayed candle variables, so the LoRA DPO
    // workload computed (and kept) gradients for every frozen weight.
    #[test]
    fn drawn_weights_record_no_gradient() {
        let cfg = unet_config(BenchArch::Sd15, true).expect("config");
        let weights = DeviceRandom::new();
        UNet2DConditionModel::new(&cfg, weights.var_builder(DType::F32, &Device::Cpu))
            .expect("unet");
        let named = weights.named();
        assert!(!named.is_empty());
        for (name, t) in named {
            assert!(!t.track_op(), "{name} records gradients");
        }
    }

    #[test]
    fn the_real_configs_parse() {
        for arch in [BenchArch::Sd15, BenchArch::Sdxl] {
            let cfg = unet_config(arch, false).expect("config");
            assert_eq!(cfg.in_channels, 4);
        }
        assert!(BenchArch::from_name("sd3").is_err());
    }
}
