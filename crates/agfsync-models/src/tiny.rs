//! Tiny random-weight checkpoints in the real diffusers layout.
//!
//! They exercise exactly the loading and model code that real checkpoints go
//! through (configs, safetensors names and shapes, tokenizer files), but are
//! small enough to build, load and sample on a laptop CPU in seconds. Tests
//! and `agfsync run`'s embedded default use them.

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use crate::clip_text::{ClipTextConfig, ClipTextModel};
use crate::clip_tokenizer::write_tiny_clip_tokenizer;
use crate::error::{ModelError, Result};
use crate::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::weights::{save_safetensors, RandomWeights};

/// Which tiny pipeline to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyPreset {
    /// SD 1.x layout: conv projections, integer head count, quick_gelu text
    /// encoder, epsilon prediction.
    Sd15,
    /// SD 2.x layout: linear projections, per-block heads, upcast attention,
    /// gelu text encoder, `!` padding, v-prediction.
    Sd2,
    /// SDXL layout: two text encoders (the second with projection),
    /// micro-conditioning, per-block transformer depth, Euler scheduler.
    Sdxl,
}

impl TinyPreset {
    /// Name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sd2 => "sd2",
            Self::Sdxl => "sdxl",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "sd15" | "sd1" | "sd1.5" => Some(Self::Sd15),
            "sd2" | "sd2.1" => Some(Self::Sd2),
            "sdxl" | "xl" => Some(Self::Sdxl),
            _ => None,
        }
    }
}

/// The tiny UNet config of a preset.
pub fn tiny_unet_config(preset: TinyPreset) -> Value {
    if preset == TinyPreset::Sdxl {
        return json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.30.0",
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "transformer_layers_per_block": [1, 2],
            "act_fn": "silu",
            "norm_num_groups": 8,
            "norm_eps": 1e-5,
            "cross_attention_dim": 64,
            "attention_head_dim": [2, 4],
            "use_linear_projection": true,
            "upcast_attention": false,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        });
    }
    let sd2 = preset == TinyPreset::Sd2;
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.30.0",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "downsample_padding": 1,
        "act_fn": "silu",
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "cross_attention_dim": 32,
        "attention_head_dim": if sd2 { json!([2, 4]) } else { json!(4) },
        "use_linear_projection": sd2,
        "upcast_attention": sd2,
        "center_input_sample": false,
    })
}

/// The tiny VAE config.
pub fn tiny_vae_config(preset: TinyPreset) -> Value {
    let xl = preset == TinyPreset::Sdxl;
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
        "scaling_factor": if xl { 0.13025 } else { 0.18215 },
        "force_upcast": xl,
    })
}

/// The tiny text encoder config for a vocabulary of `vocab_size` tokens;
/// `projection` makes it a `CLIPTextModelWithProjection` (SDXL's second).
pub fn tiny_text_config(
    preset: TinyPreset,
    projection: bool,
    vocab_size: usize,
    eos: u32,
    bos: u32,
    pad: u32,
) -> Value {
    let arch = if projection {
        "CLIPTextModelWithProjection"
    } else {
        "CLIPTextModel"
    };
    let gelu = preset == TinyPreset::Sd2 || projection;
    json!({
        "architectures": [arch],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": if gelu { "gelu" } else { "quick_gelu" },
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    })
}

/// The scheduler config (SD's DDIM settings; SDXL's Euler settings).
pub fn tiny_scheduler_config(preset: TinyPreset) -> Value {
    if preset == TinyPreset::Sdxl {
        return json!({
            "_class_name": "EulerDiscreteScheduler",
            "_diffusers_version": "0.30.0",
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "interpolation_type": "linear",
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "use_karras_sigmas": false,
        });
    }
    json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.30.0",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "prediction_type": if preset == TinyPreset::Sd2 { "v_prediction" } else { "epsilon" },
        "timestep_spacing": "leading",
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|source| ModelError::Config {
        path: path.to_path_buf(),
        what: "JSON document",
        source,
    })?;
    std::fs::write(path, text + "\n").map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn config_error<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(serde_json::Error) -> ModelError + 'a {
    move |source| ModelError::Config {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn write_text_encoder(
    out: &Path,
    sub: &str,
    tok_sub: &str,
    pad: &str,
    preset: TinyPreset,
    projection: bool,
    seed: u64,
) -> Result<()> {
    let tok_dir = out.join(tok_sub);
    mkdir(&tok_dir)?;
    let tok = write_tiny_clip_tokenizer(&tok_dir, pad)?;
    let cfg = tiny_text_config(
        preset,
        projection,
        tok.vocab_size,
        tok.eos_id,
        tok.bos_id,
        tok.pad_id,
    );
    let dir = out.join(sub);
    mkdir(&dir)?;
    write_json(&dir.join("config.json"), &cfg)?;
    let cfg: ClipTextConfig =
        serde_json::from_value(cfg).map_err(config_error(&dir, "CLIP text config"))?;
    let rw = RandomWeights::new(seed);
    ClipTextModel::new(&cfg, projection, rw.var_builder(DType::F32, &Device::Cpu))?;
    save_safetensors(&rw.tensors(), &dir.join("model.safetensors"))
}

/// Writes a complete tiny diffusers Stable Diffusion pipeline folder to
/// `out` (created if needed), with random weights drawn from `seed`.
pub fn write_tiny_sd_pipeline(out: &Path, preset: TinyPreset, seed: u64) -> Result<()> {
    mkdir(out)?;
    let dev = Device::Cpu;
    let xl = preset == TinyPreset::Sdxl;
    let pad = if preset == TinyPreset::Sd2 {
        "!"
    } else {
        "<|endoftext|>"
    };
    write_text_encoder(
        out,
        "text_encoder",
        "tokenizer",
        pad,
        preset,
        false,
        seed.wrapping_add(2),
    )?;
    if xl {
        // SDXL's second tokenizer pads with "!", as stabilityai's does.
        write_text_encoder(
            out,
            "text_encoder_2",
            "tokenizer_2",
            "!",
            preset,
            true,
            seed.wrapping_add(3),
        )?;
    }

    let unet_cfg = tiny_unet_config(preset);
    let dir = out.join("unet");
    mkdir(&dir)?;
    write_json(&dir.join("config.json"), &unet_cfg)?;
    let cfg: UNet2DConditionConfig =
        serde_json::from_value(unet_cfg).map_err(config_error(&dir, "UNet config"))?;
    let rw = RandomWeights::new(seed);
    UNet2DConditionModel::new(&cfg, rw.var_builder(DType::F32, &dev))?;
    save_safetensors(
        &rw.tensors(),
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?;

    let vae_cfg = tiny_vae_config(preset);
    let dir = out.join("vae");
    mkdir(&dir)?;
    write_json(&dir.join("config.json"), &vae_cfg)?;
    let cfg: AutoencoderKlConfig =
        serde_json::from_value(vae_cfg).map_err(config_error(&dir, "VAE config"))?;
    let rw = RandomWeights::new(seed.wrapping_add(1));
    AutoencoderKl::new(&cfg, rw.var_builder(DType::F32, &dev))?;
    save_safetensors(
        &rw.tensors(),
        &dir.join("diffusion_pytorch_model.safetensors"),
    )?;

    let dir = out.join("scheduler");
    mkdir(&dir)?;
    write_json(
        &dir.join("scheduler_config.json"),
        &tiny_scheduler_config(preset),
    )?;

    let index = if xl {
        json!({
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.30.0",
            "feature_extractor": [null, null],
            "force_zeros_for_empty_prompt": true,
            "image_encoder": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    } else {
        json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })
    };
    write_json(&out.join("model_index.json"), &index)?;
    write_json(
        &out.join("agfsync_tiny.json"),
        &json!({
            "note": "tiny random-weight pipeline written by `agfsync tiny-models`; for tests and smoke runs only",
            "preset": preset.name(),
            "seed": seed,
        }),
    )
}
