//! The tiny preset's models: random weights in the real layouts, written
//! into a run by `agfsync init --preset tiny` (and by `agfsync run` with no
//! run directory), so the whole loop runs on a CPU in minutes without any
//! download.

use std::path::{Path, PathBuf};

use agfsync_models::tiny::{write_tiny_sd_pipeline, TinyPreset};

use crate::error::Result;

/// Writes `tiny-sd15/`, `tiny-clip/`, `tiny-aesthetic.safetensors`,
/// `tiny-llava/` (VQA), `tiny-hps/` (HPSv2), `tiny-bert/` (sentence
/// embeddings) and `tiny-qwen2/` (an in-process authoring LLM) into
/// `models_dir` and returns their paths.
pub fn write_tiny_models(models_dir: &Path) -> Result<Vec<PathBuf>> {
    let sd = models_dir.join("tiny-sd15");
    write_tiny_sd_pipeline(&sd, TinyPreset::Sd15, 0)?;
    let clip = models_dir.join("tiny-clip");
    agfsync_feedback::tiny::write_tiny_clip(&clip, 7)?;
    let head = agfsync_feedback::tiny::write_tiny_aesthetic_head(
        &models_dir.join("tiny-aesthetic.safetensors"),
        11,
    )?;
    let llava = models_dir.join("tiny-llava");
    agfsync_feedback::llava::write_tiny_llava(&llava, 13)?;
    let hps = agfsync_feedback::hps::write_tiny_hps(&models_dir.join("tiny-hps"), 17)?;
    let bert = models_dir.join("tiny-bert");
    agfsync_author::write_tiny_bert(&bert, 19)?;
    let qwen = models_dir.join("tiny-qwen2");
    agfsync_author::write_tiny_qwen2(&qwen, 23)?;
    Ok(vec![sd, clip, head, llava, hps, bert, qwen])
}
