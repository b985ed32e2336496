//! `agfsync train`: Diffusion-DPO fine-tuning of the UNet (LoRA or full).

use std::path::PathBuf;

use agfsync_dpo::checkpoint::ResumeFrom;
use agfsync_dpo::data::PairDataset;
use agfsync_dpo::optim::LrScheduler;
use agfsync_dpo::trainer::{train, ModelSpec, TrainConfig};
use agfsync_models::hub::{resolve_model, HubOptions};
use anyhow::{bail, Context, Result};
use clap::Args;

use crate::common::{parse_device, progress};

/// Arguments of `agfsync train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Base model: a diffusers pipeline folder or hub id (its unet/ and
    /// scheduler/ are used).
    #[arg(long)]
    pub model: String,
    /// Preference pairs: a safetensors file with `latents_w`, `latents_l`
    /// [N, C, H, W] and `prompt_embeds` [N, 77, D] (plus `add_text_embeds`,
    /// `add_time_ids` for SDXL).
    #[arg(long)]
    pub pairs: PathBuf,
    /// Output folder: metrics.jsonl, TensorBoard events, checkpoints/, and
    /// the result (pytorch_lora_weights.safetensors, or unet/ with --full).
    #[arg(long)]
    pub out: PathBuf,
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
    /// Training dtype: f32 only for now (f32 master weights).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Runs `agfsync train`.
pub fn run(a: &TrainArgs) -> Result<()> {
    if a.dtype != "f32" {
        bail!("--dtype {}: training runs in f32 for now", a.dtype);
    }
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
        ..TrainConfig::default()
    };
    cfg.validate()?;
    let src = resolve_model(&a.model, &HubOptions::from_env())?;
    let spec = ModelSpec::from_pipeline_dir(src.root())
        .with_context(|| format!("reading the base model {}", a.model))?;
    let data = PairDataset::load(&a.pairs, &device)?;
    let resume = a.resume.as_deref().map(ResumeFrom::parse);
    let pb = progress(a.steps as u64, "training");
    let summary = train(&spec, &data, &cfg, &a.out, resume, &device, &mut |m| {
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
