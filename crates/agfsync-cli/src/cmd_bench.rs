//! `agfsync bench`: the timing workloads of `agfsync_pipeline::bench`, so a
//! machine with only the release binary (a GPU machine without a Rust
//! toolchain) can time them. The work itself lives in the library.

use agfsync_pipeline::bench::{self, BenchArch, BenchOptions, DpoWorkload};
use anyhow::{bail, Result};
use clap::Args;

use crate::common::{check_dtype_device, parse_device, parse_dtype};

/// Arguments of `agfsync bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workloads to run, in order (repeat or separate with commas):
    /// unet (one UNet forward), sample (one image end to end), vae (VAE
    /// decoding of one image), clip (CLIP score of a batch), vqa (LLaVA-1.5
    /// P(yes) for questions about one image), dpo (one Diffusion-DPO
    /// training step: LoRA, or the whole UNet with --full).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["unet".to_string()])]
    pub workload: Vec<String>,
    /// UNet architecture of the unet, sample, vae and dpo workloads: sd15 or sdxl.
    #[arg(long, default_value = "sd15")]
    pub arch: String,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations dtype: f32, f16 or bf16 (bf16 needs CUDA).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The tiny test models instead of the real sizes (a smoke run).
    #[arg(long)]
    pub tiny: bool,
    /// Timed repetitions of each workload (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Untimed repetitions before the timed ones.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// unet: batch size (2 = one guided step of one image).
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// unet, dpo: latent height and width (image size / 8).
    #[arg(long, default_value_t = 64)]
    pub latent: usize,
    /// sample, vae: image height and width in pixels.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// sample: denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// clip: images per batch.
    #[arg(long, default_value_t = 8)]
    pub clip_batch: usize,
    /// vqa: yes/no questions about the image.
    #[arg(long, default_value_t = 4)]
    pub questions: usize,
    /// vqa: decoder layers of the 7B language model (32 is the whole model,
    /// 28 GB in f32; fewer for a CPU).
    #[arg(long, default_value_t = 32)]
    pub vqa_layers: usize,
    /// dpo: preference pairs per step.
    #[arg(long, default_value_t = 1)]
    pub pairs: usize,
    /// dpo: train the whole UNet against a frozen copy instead of a LoRA
    /// (rank 4 on to_q, to_k, to_v, to_out.0).
    #[arg(long)]
    pub full: bool,
    /// dpo: gradient checkpointing (recompute activations in the backward).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `agfsync bench`: one JSON line per workload on stdout.
pub fn run(a: &BenchArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    check_dtype_device(dtype, &device)?;
    let o = BenchOptions {
        device,
        dtype,
        arch: BenchArch::from_name(&a.arch)?,
        tiny: a.tiny,
        iters: a.iters,
        warmup: a.warmup,
        seed: a.seed,
        work_dir: None,
    };
    for w in &a.workload {
        let line = match w.as_str() {
            "unet" => bench::unet_step(&o, a.batch, a.latent)?,
            "sample" => bench::sample(&o, a.size, a.steps)?,
            "vae" => bench::vae_decode(&o, a.size)?,
            "vqa" => bench::vqa(&o, a.questions, a.vqa_layers)?,
            "clip" => bench::clip_score(&o, a.clip_batch)?,
            "dpo" => bench::dpo_step(
                &o,
                &DpoWorkload {
                    pairs: a.pairs,
                    latent: a.latent,
                    full: a.full,
                    gradient_checkpointing: a.gradient_checkpointing,
                },
            )?,
            other => bail!("unknown workload `{other}`: use unet, sample, vae, clip, vqa or dpo"),
        };
        println!("{line}");
    }
    Ok(())
}
