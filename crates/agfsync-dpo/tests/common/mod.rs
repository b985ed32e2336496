//! Shared helpers: a tiny SD 1.5-layout pipeline and synthetic pairs.
#![allow(dead_code)]

use std::path::Path;

use agfsync_dpo::data::PairDataset;
use agfsync_dpo::trainer::{ModelSpec, TrainConfig};
use agfsync_models::tiny::{write_tiny_sd_pipeline, TinyPreset};
use anyhow::Result;
use candle_core::{Device, Tensor};

/// Writes the tiny pipeline into `dir` and returns its spec.
pub fn tiny_spec(dir: &Path, preset: TinyPreset) -> Result<ModelSpec> {
    write_tiny_sd_pipeline(dir, preset, 11)?;
    Ok(ModelSpec::from_pipeline_dir(dir)?)
}

/// `n` random pairs of 4x8x8 latents with 8-token, 32-d embeddings;
/// winners get `shift` added to channel 0.
pub fn pairs(n: usize, seed: u64, shift: f64) -> Result<PairDataset> {
    let dev = Device::Cpu;
    let mut g = agfsync_diffusion::rng::Generator::new(seed);
    let w = g.randn((n, 4, 8, 8), candle_core::DType::F32, &dev)?;
    let l = g.randn((n, 4, 8, 8), candle_core::DType::F32, &dev)?;
    let mut bump = vec![0f32; 4 * 8 * 8];
    for v in bump.iter_mut().take(64) {
        *v = shift as f32;
    }
    let bump = Tensor::from_vec(bump, (1, 4, 8, 8), &dev)?;
    let w = w.broadcast_add(&bump)?;
    let e = g.randn((n, 8, 32), candle_core::DType::F32, &dev)?;
    Ok(PairDataset::new(w, l, e, None)?)
}

/// A small, fast LoRA config.
pub fn small_cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        steps,
        lr: 1e-3,
        batch_size: 2,
        grad_accum: 2,
        checkpoint_every: 2,
        seed: 3,
        ..TrainConfig::default()
    }
}
