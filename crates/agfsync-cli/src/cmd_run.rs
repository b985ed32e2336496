//! `agfsync run`: the agfsync job.
//!
//! Today the job covers the stages that have landed: candidate generation
//! with Stable Diffusion. With no run directory it runs the embedded tiny
//! default: it writes a tiny random-weight SD pipeline into a fresh run
//! directory and generates candidates for a few built-in prompts on CPU.

use std::path::PathBuf;

use agfsync_models::tiny::{write_tiny_sd_pipeline, TinyPreset};
use anyhow::{Context, Result};
use clap::Args;

use crate::cmd_sample::{self, SampleArgs};

/// A few prompts from the AGFSync categories, for the embedded default.
const BUILTIN_PROMPTS: &[&str] = &[
    "a snowy mountain lake at sunrise, pine trees along the shore",
    "a red vintage bicycle leaning against a brick wall",
    "a bowl of ramen with a soft-boiled egg and green onions",
];

/// Arguments of `agfsync run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Run directory. Omit it to run the embedded tiny default in a fresh
    /// directory under ./runs.
    pub dir: Option<PathBuf>,
    /// Candidates per prompt.
    #[arg(long, default_value_t = 2)]
    pub candidates: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
}

/// Runs `agfsync run`.
pub fn run(a: &RunArgs) -> Result<()> {
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let d = PathBuf::from("runs").join(format!("tiny-{stamp}"));
            eprintln!(
                "agfsync run: no run directory given, so this is the embedded tiny default: \
                 random-weight models (the images are noise by design), built-in prompts, CPU.\n\
                 run directory: {}",
                d.display()
            );
            d
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let model = dir.join("models").join("tiny-sd15");
    if !model.join("model_index.json").exists() {
        write_tiny_sd_pipeline(&model, TinyPreset::Sd15, 0)?;
    }
    for (i, prompt) in BUILTIN_PROMPTS.iter().enumerate() {
        let out = dir.join("candidates").join(format!("prompt-{i:03}"));
        tracing::info!("prompt {i}: {prompt}");
        cmd_sample::run(&SampleArgs {
            model: model.display().to_string(),
            config: None,
            prediction_type: None,
            ema: false,
            prompt: prompt.to_string(),
            negative_prompt: None,
            original_size: None,
            crops_coords_top_left: None,
            target_size: None,
            steps: a.steps,
            guidance_scale: 7.5,
            scheduler: None,
            seed: (i as u64) * 1000,
            latents: None,
            height: Some(64),
            width: Some(64),
            num_images: a.candidates,
            batch_size: a.candidates,
            clip_skip: None,
            out: out.clone(),
            save_latents: Some(out.join("final_latents.safetensors")),
            device: "cpu".into(),
            dtype: "f32".into(),
            variant: None,
            lora: Vec::new(),
            lora_scale: Vec::new(),
            lora_mode: "merge".into(),
        })?;
    }
    eprintln!("done: {}", dir.display());
    Ok(())
}
