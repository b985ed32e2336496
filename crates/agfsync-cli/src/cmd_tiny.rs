//! `agfsync tiny-models`: tiny random-weight checkpoints in the real layouts.

use std::path::PathBuf;

use agfsync_models::tiny::{write_tiny_sd_pipeline, TinyPreset};
use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `agfsync tiny-models`.
#[derive(Args, Debug, Clone)]
pub struct TinyArgs {
    /// Output folder. Each preset becomes a diffusers pipeline folder inside
    /// it: OUT/tiny-sd15, OUT/tiny-sd2, OUT/tiny-sdxl.
    pub out: PathBuf,
    /// Which presets to write (sd15: SD 1.x layout; sd2: SD 2.x layout with
    /// v-prediction; sdxl: SDXL layout with two text encoders). Repeat or separate with commas.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["sd15".to_string(), "sd2".to_string(), "sdxl".to_string()])]
    pub preset: Vec<String>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `agfsync tiny-models`.
pub fn run(a: &TinyArgs) -> Result<()> {
    let mut presets = Vec::new();
    for p in &a.preset {
        match TinyPreset::from_name(p) {
            Some(t) => presets.push(t),
            None => bail!("unknown preset `{p}`: use sd15, sd2 or sdxl"),
        }
    }
    for p in presets {
        let dir = a.out.join(format!("tiny-{}", p.name()));
        write_tiny_sd_pipeline(&dir, p, a.seed)?;
        println!("{}", dir.display());
    }
    Ok(())
}
