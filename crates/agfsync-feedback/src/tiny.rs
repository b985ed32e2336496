//! Tiny random-weight scorer models in the real layouts, for tests and the
//! embedded smoke run: a transformers `CLIPModel` folder (config.json,
//! model.safetensors, vocab.json/merges.txt, preprocessor_config.json) and a
//! LAION-layout aesthetic head whose input width matches it.
//!
//! They load through exactly the code paths the real models use
//! ([`crate::clip::ClipModel::load`], [`crate::aesthetic::AestheticHead::load`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::Init;
use serde_json::json;

use agfsync_models::clip_tokenizer::write_tiny_clip_tokenizer;
use agfsync_models::weights::{save_safetensors, RandomWeights};

use crate::clip::ClipConfig;
use crate::error::{FeedbackError, Result};

/// Embedding width of the tiny CLIP model (and input width of the tiny head).
pub const TINY_CLIP_PROJECTION: usize = 32;

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
    std::fs::write(path, text).map_err(|source| FeedbackError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a tiny random `CLIPModel` folder to `dir` (32 px images, patch 8,
/// two layers per tower, 32-wide embeddings), deterministic in `seed`.
pub fn write_tiny_clip(dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| FeedbackError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tok = write_tiny_clip_tokenizer(dir, "<|endoftext|>")?;
    let tower = |extra: serde_json::Value| {
        let mut v = json!({
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": TINY_CLIP_PROJECTION,
        });
        if let (Some(v), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                v.insert(k.clone(), x.clone());
            }
        }
        v
    };
    let config = json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": TINY_CLIP_PROJECTION,
        "logit_scale_init_value": 2.6592,
        "text_config": tower(json!({
            "vocab_size": tok.vocab_size,
            "max_position_embeddings": 77,
            "bos_token_id": tok.bos_id,
            "eos_token_id": tok.eos_id,
            "pad_token_id": tok.pad_id,
        })),
        "vision_config": tower(json!({
            "image_size": 32,
            "patch_size": 8,
            "num_channels": 3,
        })),
    });
    let config_path = dir.join("config.json");
    write_json(&config_path, &config)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "crop_size": {"height": 32, "width": 32},
            "do_center_crop": true,
            "do_convert_rgb": true,
            "do_normalize": true,
            "do_rescale": true,
            "do_resize": true,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "image_processor_type": "CLIPImageProcessor",
            "resample": 3,
            "rescale_factor": 1.0 / 255.0,
            "size": {"shortest_edge": 32},
        }),
    )?;
    let cfg =
        ClipConfig::from_json(&config.to_string()).map_err(|reason| FeedbackError::Config {
            path: config_path,
            what: "CLIPModel config",
            reason,
        })?;
    let rw = RandomWeights::new(seed);
    let vb = rw.var_builder(DType::F32, &Device::Cpu);
    let model_err = |e: candle_core::Error| FeedbackError::Invalid(format!("tiny CLIP: {e}"));
    agfsync_models::clip_text::ClipTextModel::new(&cfg.text_config, true, vb.clone())
        .map_err(model_err)?;
    crate::clip_vision::ClipVisionModel::new(
        &cfg.vision_config,
        Some(cfg.projection_dim),
        vb.clone(),
    )
    .map_err(model_err)?;
    let mut tensors = rw.tensors();
    tensors.insert(
        "logit_scale".into(),
        Tensor::new(cfg.logit_scale_init_value as f32, &Device::Cpu).map_err(model_err)?,
    );
    save_safetensors(&tensors, &dir.join("model.safetensors"))?;
    Ok(())
}

/// Writes a tiny LAION-layout aesthetic head (`layers.0/2/4/6/7`, input
/// width [`TINY_CLIP_PROJECTION`]) to `path` as safetensors and returns it.
pub fn write_tiny_aesthetic_head(path: &Path, seed: u64) -> Result<PathBuf> {
    let widths = [TINY_CLIP_PROJECTION, 16, 8, 8, 4, 1];
    let err = |e: candle_core::Error| FeedbackError::Invalid(format!("tiny aesthetic head: {e}"));
    let rw = RandomWeights::new(seed);
    let vb = rw.var_builder(DType::F32, &Device::Cpu);
    for (n, layer) in [0usize, 2, 4, 6, 7].iter().enumerate() {
        let (i, o) = (widths[n], widths[n + 1]);
        let stdev = (1.0 / i as f64).sqrt();
        vb.get_with_hints(
            (o, i),
            &format!("layers.{layer}.weight"),
            Init::Randn { mean: 0.0, stdev },
        )
        .map_err(err)?;
        vb.get_with_hints(
            o,
            &format!("layers.{layer}.bias"),
            Init::Randn {
                mean: 0.0,
                stdev: 0.1,
            },
        )
        .map_err(err)?;
    }
    let tensors: HashMap<String, Tensor> = rw.tensors();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| FeedbackError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    save_safetensors(&tensors, path)?;
    Ok(path.to_path_buf())
}
