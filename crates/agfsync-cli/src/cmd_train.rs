//! `agfsync train`: Diffusion-DPO fine-tuning of the UNet (LoRA or full).

use std::path::{Path, PathBuf};

use agfsync_dpo::checkpoint::ResumeFrom;
use agfsync_dpo::data::PairDataset;
use agfsync_dpo::optim::LrScheduler;
use agfsync_dpo::pickapic::{import_parquet, ImportOptions};
use agfsync_dpo::trainer::{train, ModelSpec, TrainConfig, TrainDtype};
use agfsync_feedback::preprocess::Resample;
use agfsync_models::hub::{resolve_model, HubOptions, ModelSource};
use agfsync_models::stable_diffusion::{LoadOptions, StableDiffusion};
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::common::{parse_device, progress};

/// Arguments of `agfsync train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// A run directory: train on its pairs with its `[train]` settings
    /// (then --model, --pairs and --out are not used).
    pub run: Option<PathBuf>,
    /// Base model: a diffusers pipeline folder or hub id (its unet/ and
    /// scheduler/ are used).
    #[arg(long)]
    pub model: Option<String>,
    /// Preference pairs: a safetensors file with `latents_w`, `latents_l`
    /// [N, C, H, W] and `prompt_embeds` [N, 77, D] (plus `add_text_embeds`,
    /// `add_time_ids` for SDXL), or a Pick-a-Pic-style `.parquet` file
    /// (columns caption, jpg_0, jpg_1, label_0) that is encoded with the
    /// base model first (see `agfsync import-pairs` to do that once).
    #[arg(long)]
    pub pairs: Option<PathBuf>,
    /// Parquet pairs: side of the square training images (default: the
    /// model's native size, UNet sample_size x VAE factor).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Parquet pairs: stop when more than this fraction of rows has an image
    /// that fails to decode (such rows are skipped and counted).
    #[arg(long, default_value_t = 0.05)]
    pub max_bad_fraction: f64,
    /// Parquet pairs: resize filter, bilinear (diffusers' DPO script),
    /// bicubic or lanczos.
    #[arg(long, default_value = "bilinear")]
    pub resize_filter: String,
    /// Parquet pairs: refuse images with more pixels than this (decompression
    /// bombs).
    #[arg(long, default_value_t = agfsync_feedback::image_input::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Parquet pairs: refuse rows (caption and both images) larger than this
    /// many bytes.
    #[arg(long, default_value_t = agfsync_dpo::pickapic::DEFAULT_MAX_ROW_BYTES)]
    pub max_row_bytes: u64,
    /// Output folder: metrics.jsonl, TensorBoard events, checkpoints/, and
    /// the result (pytorch_lora_weights.safetensors, or unet/ with --full).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Diffusion-DPO beta (the paper's 5000; 2500 in scripts that drop the 0.5).
    #[arg(long, default_value_t = 5000.0)]
    pub beta: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    pub lora_rank: usize,
    /// LoRA alpha (default: the rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Layers that get adapters, by module-name suffix.
    #[arg(long, value_delimiter = ',', default_value = "to_q,to_k,to_v,to_out.0")]
    pub lora_targets: Vec<String>,
    /// Train the whole UNet against a frozen reference copy instead of LoRA.
    #[arg(long)]
    pub full: bool,
    /// Baseline: plain denoising loss on the winners (no preference).
    #[arg(long)]
    pub sft: bool,
    /// Pairs per micro-batch.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// constant, constant_with_warmup or cosine.
    #[arg(long, default_value = "constant")]
    pub lr_scheduler: String,
    /// Warm-up steps of the LR schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Global gradient-norm clip.
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Seed of timesteps, noise, adapter init and data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every N steps.
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: usize,
    /// Resume: `latest` (in --out) or a checkpoint folder.
    #[arg(long)]
    pub resume: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute precision of the UNet: f32, bf16 or f16. Below f32, frozen
    /// weights are held in that precision while what is trained (adapters,
    /// or the full UNet's master weights), gradients and optimizer state
    /// stay f32. bf16 is meant for GPUs; on CPU it is slower than f32.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Recompute each UNet block's activations in the backward pass instead
    /// of keeping them: much less memory for about a third more compute.
    #[arg(long)]
    pub gradient_checkpointing: bool,
}

/// Runs `agfsync train`.
pub fn run(a: &TrainArgs, quiet: bool) -> Result<()> {
    if let Some(dir) = &a.run {
        if a.model.is_some() || a.pairs.is_some() || a.out.is_some() {
            bail!("with a run directory, training reads the run's model, pairs and [train] settings: drop --model, --pairs and --out");
        }
        let target = crate::cmd_pipeline::RunTarget {
            dir: dir.clone(),
            shard: None,
            json: false,
        };
        return crate::cmd_pipeline::stage(&target, agfsync_pipeline::Stage::Train, quiet);
    }
    let (Some(model), Some(pairs), Some(out)) = (&a.model, &a.pairs, &a.out) else {
        bail!("give a run directory (`agfsync train RUN`), or --model, --pairs and --out");
    };
    let dtype = TrainDtype::parse(&a.dtype).context("--dtype")?;
    let device = parse_device(&a.device)?;
    let lr_scheduler = match a.lr_scheduler.as_str() {
        "constant" => LrScheduler::Constant,
        "constant_with_warmup" => LrScheduler::ConstantWithWarmup,
        "cosine" => LrScheduler::Cosine,
        other => {
            bail!("unknown --lr-scheduler `{other}`: use constant, constant_with_warmup or cosine")
        }
    };
    let cfg = TrainConfig {
        steps: a.steps,
        lr: a.lr,
        beta: a.beta,
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha,
        lora_targets: a.lora_targets.clone(),
        full: a.full,
        sft: a.sft,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr_scheduler,
        warmup_steps: a.warmup_steps,
        max_grad_norm: a.max_grad_norm,
        weight_decay: a.weight_decay,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every,
        gradient_checkpointing: a.gradient_checkpointing,
        dtype,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let src = resolve_model(model, &HubOptions::from_env())?;
    let spec = ModelSpec::from_pipeline_dir(src.root())
        .with_context(|| format!("reading the base model {model}"))?;
    let is_parquet = pairs
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    let data = if is_parquet {
        let opts = ParquetOpts {
            resolution: a.resolution,
            max_bad_fraction: a.max_bad_fraction,
            resize_filter: a.resize_filter.clone(),
            max_pixels: a.max_pixels,
            max_row_bytes: a.max_row_bytes,
        };
        import(&src, pairs, &opts, &device)?
    } else {
        if a.resolution.is_some() {
            bail!("--resolution applies to Parquet pairs only: a safetensors pairs file holds latents already");
        }
        PairDataset::load(pairs, &device)?
    };
    let resume = a.resume.as_deref().map(ResumeFrom::parse);
    let pb = progress(a.steps as u64, "training");
    let summary = train(&spec, &data, &cfg, out, resume, &device, &mut |m| {
        pb.set_position(m.step as u64);
        pb.set_message(format!(
            "loss {:.4} acc {}",
            m.loss,
            m.implicit_acc.map_or("-".into(), |x| format!("{x:.2}"))
        ));
    })?;
    pb.finish_and_clear();
    println!("{}", summary.output.display());
    eprintln!(
        "trained {} steps; metrics in {}",
        summary.steps,
        summary.metrics_path.display()
    );
    Ok(())
}

/// Arguments of `agfsync import-pairs`.
#[derive(Args, Debug, Clone)]
pub struct ImportPairsArgs {
    /// Base model whose VAE and text encoder(s) encode the pairs.
    #[arg(long)]
    pub model: String,
    /// Pick-a-Pic-style Parquet file (columns caption, jpg_0, jpg_1, label_0).
    #[arg(long)]
    pub parquet: PathBuf,
    /// The pairs file to write (safetensors, what `agfsync train --pairs`
    /// reads).
    #[arg(long)]
    pub out: PathBuf,
    /// Side of the square training images (default: the model's native size).
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Stop when more than this fraction of rows has an image that fails to
    /// decode (such rows are skipped and counted).
    #[arg(long, default_value_t = 0.05)]
    pub max_bad_fraction: f64,
    /// Resize filter: bilinear (diffusers' DPO script), bicubic or lanczos.
    #[arg(long, default_value = "bilinear")]
    pub resize_filter: String,
    /// Refuse images with more pixels than this (decompression
    /// bombs).
    #[arg(long, default_value_t = agfsync_feedback::image_input::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Refuse rows (caption and both images) larger than this
    /// many bytes.
    #[arg(long, default_value_t = agfsync_dpo::pickapic::DEFAULT_MAX_ROW_BYTES)]
    pub max_row_bytes: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Runs `agfsync import-pairs`.
pub fn run_import(a: &ImportPairsArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let src = resolve_model(&a.model, &HubOptions::from_env())?;
    let opts = ParquetOpts {
        resolution: a.resolution,
        max_bad_fraction: a.max_bad_fraction,
        resize_filter: a.resize_filter.clone(),
        max_pixels: a.max_pixels,
        max_row_bytes: a.max_row_bytes,
    };
    let data = import(&src, &a.parquet, &opts, &device)?;
    data.save(&a.out)?;
    println!("{}", a.out.display());
    Ok(())
}

/// The Parquet import settings shared by `train` and `import-pairs`.
struct ParquetOpts {
    resolution: Option<usize>,
    max_bad_fraction: f64,
    resize_filter: String,
    max_pixels: u64,
    max_row_bytes: u64,
}

/// Loads the base model and encodes the Parquet pairs with it, logging the
/// import report.
fn import(
    src: &ModelSource,
    parquet: &Path,
    o: &ParquetOpts,
    device: &candle_core::Device,
) -> Result<PairDataset> {
    let filter = match o.resize_filter.as_str() {
        "bilinear" => Resample::Bilinear,
        "bicubic" => Resample::Bicubic,
        "lanczos" => Resample::Lanczos,
        other => bail!("unknown --resize-filter `{other}`: use bilinear, bicubic or lanczos"),
    };
    let load = LoadOptions {
        device: device.clone(),
        ..LoadOptions::default()
    };
    let sd = StableDiffusion::load(src, &load)
        .with_context(|| format!("loading {} to encode the pairs", src.describe("")))?;
    let resolution = o
        .resolution
        .unwrap_or_else(|| sd.unet.config().sample_size * sd.vae.config().scale_factor());
    let opts = ImportOptions {
        max_bad_fraction: o.max_bad_fraction,
        filter,
        max_pixels: o.max_pixels,
        max_row_bytes: o.max_row_bytes,
        ..ImportOptions::new(resolution)
    };
    tracing::info!("encoding the pairs of {}", parquet.display());
    let (data, report) = import_parquet(parquet, &sd, &opts)?;
    tracing::info!("imported {}: {report}", parquet.display());
    eprintln!(
        "imported {} at {resolution}x{resolution}: {report}",
        parquet.display()
    );
    for why in &report.bad_examples {
        tracing::warn!("skipped {why}");
    }
    Ok(data)
}
