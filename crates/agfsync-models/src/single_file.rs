//! Loading single-file Stable Diffusion checkpoints: one `.safetensors` in the
//! original Stability layout (LDM for SD 1.x/2.x, sgm for SDXL), as community
//! sites distribute them.
//!
//! # Layout
//!
//! | part | prefix in the file |
//! | --- | --- |
//! | UNet | `model.diffusion_model.` (`input_blocks`, `middle_block`, `output_blocks`, `time_embed`, SDXL `label_emb`) |
//! | VAE | `first_stage_model.` (or `vae.`): `encoder`/`decoder` with `down`/`up`/`mid`, `mid.attn_1` q/k/v/proj_out as 1x1 convolutions |
//! | SD 1.x text encoder | `cond_stage_model.transformer.` (transformers CLIP layout, with or without `text_model.`) |
//! | SD 2.x text encoder | `cond_stage_model.model.` (OpenCLIP: fused `attn.in_proj_*`, `ln_1`, `mlp.c_fc`, `positional_embedding`, `ln_final`) |
//! | SDXL text encoders | `conditioner.embedders.0.transformer.` (CLIP-L, transformers layout) and `conditioner.embedders.1.model.` (OpenCLIP bigG, `text_projection` stored `[width, proj]`) |
//!
//! Nothing is converted up front. [`SingleFile`] memory-maps the file and hands
//! out candle [`VarBuilder`]s whose backend serves diffusers/transformers
//! tensor names by reading the original tensor, and slicing (OpenCLIP's fused
//! q/k/v), transposing (`text_projection`) or reshaping (1x1 convolution
//! weights into linear ones and back) it on demand. So the model constructors
//! ([`UNet2DConditionModel::new`], [`AutoencoderKl::new`],
//! [`ClipTextModel::new`]) load single files unchanged. After each component is
//! built, every UNet and VAE tensor of the file must have been used: a tensor
//! left over means the config does not describe the checkpoint.
//!
//! # Configs
//!
//! A single file carries no configs, tokenizers or scheduler settings. They
//! come from a diffusers pipeline folder or hub id of the same family, as in
//! diffusers' `from_single_file(path, config=...)`; without one, from the
//! canonical repo of the detected family ([`default_config_id`]). See
//! [`load_single_file_auto`].
//!
//! # Prediction type (SD 2.x)
//!
//! Whether an SD 2.x model predicts epsilon or v cannot be seen in its weights.
//! The scheduler config of the config source decides, and
//! [`SingleFileOptions::prediction_type`] overrides it. Without an explicit
//! config, an SD 2.x file gets `stabilityai/stable-diffusion-2-1`'s scheduler
//! (v-prediction, the 768-pixel models). Like diffusers' legacy heuristic, a
//! file whose `global_step` tensor is 875000 (SD 2.0/2.1 *base*, 512 pixels)
//! gets epsilon instead. SD 2.x-base derivatives rarely keep `global_step`:
//! pass `prediction_type = "epsilon"`, or a config whose scheduler says so.
//!
//! # EMA weights
//!
//! Training checkpoints may also hold EMA copies of the UNet under
//! `model_ema.` with the dots of the name removed
//! (`model_ema.diffusion_modelinput_blocks00weight`). Like diffusers, the
//! regular `model.diffusion_model.*` weights are used when present. EMA weights
//! are used when they are the only UNet weights in the file, or when
//! [`SingleFileOptions::prefer_ema`] asks for them.
//!
//! # Not supported
//!
//! Inpainting (9 input channels), instruct-pix2pix (8), the x4 upscaler and
//! other UNets that do not take 4 latent channels; the SDXL refiner (OpenCLIP
//! only, in `conditioner.embedders.0.model.`); pickle `.ckpt` files. Each is
//! refused with a message that says so.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use crate::clip_text::{ClipTextConfig, ClipTextModel};
use crate::clip_tokenizer::ClipTokenizer;
use crate::error::{read_json, read_to_string, ModelError};
use crate::hub::{find_weights, resolve_model, HubError, HubOptions, ModelSource};
use crate::stable_diffusion::{LoadOptions, ModelIndex, SdFamily, StableDiffusion};
use crate::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::weights::open_safetensors;

/// Prefix of the UNet weights.
const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of the flattened EMA UNet weights (`model_ema.` + name without dots).
const EMA_PREFIX: &str = "model_ema.";
/// Prefixes the VAE is found under.
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];

/// What went wrong while reading a single-file checkpoint. Every message names
/// the file and says how to fix the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SingleFileError {
    /// The file is unreadable (missing, truncated, not safetensors), or the
    /// config source is (missing files, bad configs, tokenizers).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The file holds no Stable Diffusion UNet.
    #[error("{}: not a single-file Stable Diffusion checkpoint: {reason}", show(.path))]
    NotACheckpoint {
        /// The file.
        path: PathBuf,
        /// What the file looks like instead, and what to do.
        reason: String,
    },
    /// A checkpoint kind agfsync does not support (inpainting, refiner, ...).
    #[error("{}: {what} is not supported: {hint}", show(.path))]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The kind of checkpoint.
        what: String,
        /// Why, and what to use instead.
        hint: String,
    },
    /// Neither the text encoders nor the UNet's context width tell the family.
    #[error(
        "{}: cannot tell whether this is an SD 1.x, SD 2.x or SDXL checkpoint ({detail}); \
         pass --config with the diffusers pipeline it belongs to",
        show(.path)
    )]
    UnknownFamily {
        /// The file.
        path: PathBuf,
        /// What was seen.
        detail: String,
    },
    /// The file and the config source belong to different families.
    #[error(
        "{}: this file is an {} checkpoint but --config points to an {} pipeline ({config}). \
         Pass the config of an {} pipeline (such as `{}`), or leave --config out to use that one",
        show(.path),
        family_name(*.file_family),
        family_name(*.config_family),
        family_name(*.file_family),
        default_config_id(*.file_family)
    )]
    FamilyMismatch {
        /// The file.
        path: PathBuf,
        /// The family of the file's weights.
        file_family: SdFamily,
        /// The family of the config source.
        config_family: SdFamily,
        /// The config source, described.
        config: String,
    },
    /// No config source was given and the default one cannot be resolved.
    #[error(
        "{}: a single file carries no configs or tokenizers; for an {} checkpoint they come from \
         `{repo_id}` when --config is not given, and that failed: {source}\n\
         Fix: pass --config with a diffusers pipeline folder (or hub id) of the same family, or \
         download the configs once while online, e.g. \
         `huggingface-cli download {repo_id} --include '*.json' '*.txt'`",
        show(.path),
        family_name(*.family)
    )]
    DefaultConfig {
        /// The file.
        path: PathBuf,
        /// The detected family.
        family: SdFamily,
        /// The canonical repo that was tried.
        repo_id: String,
        /// Why it could not be resolved.
        source: Box<HubError>,
    },
    /// A component could not be built from the file (a tensor is missing or
    /// has another shape than the config implies).
    #[error(
        "{}: cannot build the {component} from this single file: {source}. \
         Check that --config describes this checkpoint",
        show(.path)
    )]
    Build {
        /// The file.
        path: PathBuf,
        /// `unet`, `vae`, `text_encoder` or `text_encoder_2`.
        component: String,
        /// The cause, naming the tensor in both layouts.
        source: Box<candle_core::Error>,
    },
    /// Tensors of a component were left over: the config describes a smaller
    /// network than the file holds.
    #[error(
        "{}: {count} {component} tensors of the file are not used by the config (for example {}): \
         --config does not describe this checkpoint",
        show(.path),
        .examples.join(", ")
    )]
    UnusedTensors {
        /// The file.
        path: PathBuf,
        /// The component.
        component: String,
        /// How many tensors were not used.
        count: usize,
        /// A few of their names.
        examples: Vec<String>,
    },
    /// An unknown prediction type was asked for.
    #[error(
        "unknown prediction type `{0}`: expected `epsilon`, `v_prediction` (or `v`) or `sample`"
    )]
    PredictionType(String),
}

fn show(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "the checkpoint".into()
    } else {
        p.display().to_string()
    }
}

impl SingleFileError {
    /// Sets the file path of errors raised before it was known.
    fn at(mut self, file: &Path) -> Self {
        match &mut self {
            Self::NotACheckpoint { path, .. }
            | Self::Unsupported { path, .. }
            | Self::UnknownFamily { path, .. }
            | Self::FamilyMismatch { path, .. }
            | Self::DefaultConfig { path, .. }
            | Self::Build { path, .. }
            | Self::UnusedTensors { path, .. } => *path = file.to_path_buf(),
            Self::Model(_) | Self::PredictionType(_) => {}
        }
        self
    }
}

/// A human-readable name of a family: `SD 1.x`, `SD 2.x` or `SDXL`.
pub fn family_name(f: SdFamily) -> &'static str {
    match f {
        SdFamily::V1 => "SD 1.x",
        SdFamily::V2 => "SD 2.x",
        SdFamily::Xl => "SDXL",
    }
}

/// The hub repo whose configs, tokenizers and scheduler a single file of
/// `family` uses when no config source is given (diffusers' defaults).
pub fn default_config_id(family: SdFamily) -> &'static str {
    match family {
        SdFamily::V1 => "stable-diffusion-v1-5/stable-diffusion-v1-5",
        SdFamily::V2 => "stabilityai/stable-diffusion-2-1",
        SdFamily::Xl => "stabilityai/stable-diffusion-xl-base-1.0",
    }
}

/// How to read a single file, beyond [`LoadOptions`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SingleFileOptions {
    /// Overrides the scheduler's `prediction_type`: `epsilon`, `v_prediction`
    /// (or `v`) or `sample`. SD 2.x models differ here in a way their weights
    /// do not show (see the module docs).
    pub prediction_type: Option<String>,
    /// Use the EMA UNet weights (`model_ema.*`) when the file has both EMA and
    /// regular ones. EMA weights are always used when they are the only ones.
    pub prefer_ema: bool,
}

/// Which UNet weights a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnetWeights {
    /// Only `model.diffusion_model.*`.
    Regular,
    /// Only the flattened EMA copy, `model_ema.diffusion_model*`.
    EmaOnly,
    /// Both; the regular ones are used unless EMA is preferred.
    Both,
}

/// Where a text encoder lives in the file, and in which layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// transformers' CLIP layout under this prefix (ending in `transformer.`);
    /// `text_model.` may or may not follow.
    Clip(String),
    /// OpenCLIP's layout under this prefix (ending in `model.`).
    OpenClip(String),
}

impl TextEncoderLayout {
    /// The prefix of the encoder's tensors in the file.
    pub fn prefix(&self) -> &str {
        match self {
            Self::Clip(p) | Self::OpenClip(p) => p,
        }
    }
}

/// What [`SingleFile::open`] found in a file.
#[derive(Clone, Debug)]
pub struct SingleFileInfo {
    /// The file.
    pub path: PathBuf,
    /// The family, when the file shows it (text encoders or context width).
    pub family: Option<SdFamily>,
    /// Which UNet weights the file holds.
    pub unet_weights: UnetWeights,
    /// Width of the text conditioning (the `attn2.to_k` input), if seen.
    pub context_dim: Option<usize>,
    /// Where the VAE is (`first_stage_model.` or `vae.`), if the file has one.
    pub vae_prefix: Option<String>,
    /// The text encoders in the file, in pipeline order (`text_encoder`,
    /// `text_encoder_2`); `None` where the file lacks one.
    pub text_encoders: Vec<Option<TextEncoderLayout>>,
    /// The training step, when the file keeps a `global_step` tensor.
    pub global_step: Option<i64>,
    /// Number of tensors in the file.
    pub tensor_count: usize,
}

// ---------------------------------------------------------------------------
// Detection
// ---------------------------------------------------------------------------

fn has_prefix(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> bool {
    shapes
        .range(prefix.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix))
}

fn unet_weights(shapes: &BTreeMap<String, Vec<usize>>) -> Option<UnetWeights> {
    let regular = has_prefix(shapes, UNET_PREFIX);
    let ema = has_prefix(shapes, "model_ema.diffusion_model");
    match (regular, ema) {
        (true, false) => Some(UnetWeights::Regular),
        (false, true) => Some(UnetWeights::EmaOnly),
        (true, true) => Some(UnetWeights::Both),
        (false, false) => None,
    }
}

/// The file key of an LDM UNet name (`input_blocks.0.0.weight`).
fn unet_file_key(ldm: &str, ema: bool) -> String {
    if ema {
        format!("{EMA_PREFIX}diffusion_model{}", ldm.replace('.', ""))
    } else {
        format!("{UNET_PREFIX}{ldm}")
    }
}

fn not_a_checkpoint(shapes: &BTreeMap<String, Vec<usize>>) -> SingleFileError {
    let any = |f: &dyn Fn(&str) -> bool| shapes.keys().any(|k| f(k));
    let reason = if any(&|k| k.starts_with("lora_") || k.contains(".lora_")) {
        "it holds LoRA weights (lora_* tensors); load it as a LoRA on top of a base model".into()
    } else if shapes.contains_key("conv_in.weight") && has_prefix(shapes, "down_blocks.") {
        "it is a diffusers-format UNet (down_blocks.*); pass the diffusers pipeline folder it belongs to".into()
    } else if has_prefix(shapes, "encoder.down.") || has_prefix(shapes, "decoder.up.") {
        "it is a standalone VAE, without a UNet".into()
    } else if has_prefix(shapes, "model.diffusion_model.joint_blocks.")
        || has_prefix(shapes, "model.diffusion_model.double_blocks.")
    {
        "it is an SD3 / Flux transformer checkpoint; only SD 1.x, SD 2.x and SDXL are supported"
            .into()
    } else {
        let some: Vec<&str> = shapes.keys().take(3).map(String::as_str).collect();
        format!(
            "it has no model.diffusion_model.* (UNet) tensors; its first tensors are {}",
            if some.is_empty() {
                "none (empty file)".to_string()
            } else {
                some.join(", ")
            }
        )
    };
    SingleFileError::NotACheckpoint {
        path: PathBuf::new(),
        reason,
    }
}

fn context_dim(shapes: &BTreeMap<String, Vec<usize>>, ema: bool) -> Option<usize> {
    let (prefix, suffix) = if ema {
        ("model_ema.diffusion_model", "attn2to_kweight")
    } else {
        (UNET_PREFIX, ".attn2.to_k.weight")
    };
    shapes
        .iter()
        .find(|(k, s)| k.starts_with(prefix) && k.ends_with(suffix) && s.len() == 2)
        .map(|(_, s)| s[1])
}

fn text_encoder_at(shapes: &BTreeMap<String, Vec<usize>>, base: &str) -> Option<TextEncoderLayout> {
    let open = format!("{base}model.");
    if shapes.contains_key(&format!("{open}token_embedding.weight")) {
        return Some(TextEncoderLayout::OpenClip(open));
    }
    let clip = format!("{base}transformer.");
    if shapes.contains_key(&format!(
        "{clip}text_model.embeddings.token_embedding.weight"
    )) || shapes.contains_key(&format!("{clip}embeddings.token_embedding.weight"))
    {
        return Some(TextEncoderLayout::Clip(clip));
    }
    None
}

/// Tells SD 1.x, SD 2.x and SDXL apart from a file's tensor names and shapes.
///
/// In order: SDXL's second text encoder (`conditioner.embedders.1.`) or its
/// `label_emb` → SDXL; an OpenCLIP text encoder (`cond_stage_model.model.`) →
/// SD 2.x; a CLIP one (`cond_stage_model.transformer.`) → SD 1.x; else the
/// UNet's context width (768 → SD 1.x, 1024 → SD 2.x, 2048 → SDXL). Refuses
/// files without a UNet (naming what they look like: LoRA, diffusers UNet,
/// VAE, ...), UNets without 4 input channels (inpainting, instruct-pix2pix,
/// upscaler) and the SDXL refiner.
pub fn detect_family(shapes: &BTreeMap<String, Vec<usize>>) -> Result<SdFamily, SingleFileError> {
    let Some(weights) = unet_weights(shapes) else {
        return Err(not_a_checkpoint(shapes));
    };
    let ema = weights == UnetWeights::EmaOnly;
    let in_channels = shapes
        .get(&unet_file_key("input_blocks.0.0.weight", ema))
        .and_then(|s| s.get(1).copied());
    let unsupported = |what: &str, hint: &str| SingleFileError::Unsupported {
        path: PathBuf::new(),
        what: what.into(),
        hint: hint.into(),
    };
    match in_channels {
        Some(4) | None => {}
        Some(9) => {
            return Err(unsupported(
                "an inpainting checkpoint (UNet with 9 input channels: latents, mask, masked image)",
                "agfsync samples text-to-image with 4-channel UNets; use the base (non-inpainting) checkpoint",
            ))
        }
        Some(8) => {
            return Err(unsupported(
                "an instruct-pix2pix checkpoint (UNet with 8 input channels)",
                "agfsync samples text-to-image with 4-channel UNets",
            ))
        }
        Some(c) => {
            return Err(unsupported(
                &format!("a UNet with {c} input channels (upscaler, depth or other conditioned model)"),
                "agfsync samples text-to-image with 4-channel UNets",
            ))
        }
    }
    if has_prefix(shapes, "conditioner.embedders.1.") {
        return Ok(SdFamily::Xl);
    }
    if has_prefix(shapes, "conditioner.embedders.0.model.") {
        return Err(unsupported(
            "the SDXL refiner",
            "it refines SDXL base outputs and cannot sample from text alone; use an SDXL base checkpoint",
        ));
    }
    if shapes.contains_key(&unet_file_key("label_emb.0.0.weight", ema)) {
        return Ok(SdFamily::Xl);
    }
    if has_prefix(shapes, "cond_stage_model.model.") {
        return Ok(SdFamily::V2);
    }
    if has_prefix(shapes, "cond_stage_model.transformer.") {
        return Ok(SdFamily::V1);
    }
    match context_dim(shapes, ema) {
        Some(768) => Ok(SdFamily::V1),
        Some(1024) => Ok(SdFamily::V2),
        Some(2048) => Ok(SdFamily::Xl),
        Some(d) => Err(SingleFileError::UnknownFamily {
            path: PathBuf::new(),
            detail: format!("no text encoder in the file and a context width of {d}"),
        }),
        None => Err(SingleFileError::UnknownFamily {
            path: PathBuf::new(),
            detail: "no text encoder and no cross-attention in the file".into(),
        }),
    }
}

/// The family of a diffusers pipeline (the config source): SDXL when it has
/// `text_encoder_2` or a `text_time` UNet, SD 2.x when its text encoder uses
/// `gelu` (OpenCLIP), else SD 1.x (the same rule as the folder loader).
pub fn config_family(src: &ModelSource) -> Result<SdFamily, SingleFileError> {
    let index = read_index(src)?.0;
    if index.has("text_encoder_2") {
        return Ok(SdFamily::Xl);
    }
    let unet: UNet2DConditionConfig = read_json(
        &src.file("unet/config.json").map_err(ModelError::from)?,
        "UNet config",
    )?;
    if unet.addition_embed_type.as_deref() == Some("text_time") {
        return Ok(SdFamily::Xl);
    }
    let te = text_config(src, "text_encoder")?;
    Ok(if te.hidden_act == "gelu" {
        SdFamily::V2
    } else {
        SdFamily::V1
    })
}

fn read_index(src: &ModelSource) -> Result<(ModelIndex, bool), SingleFileError> {
    let path = src.file("model_index.json").map_err(|e| {
        ModelError::Unsupported(format!(
            "{e}\n{} is not a diffusers pipeline folder (model_index.json is missing): --config must \
             name a diffusers pipeline folder or hub id, whose configs, tokenizers and scheduler the \
             single file is loaded with",
            src.describe("")
        ))
    })?;
    let text = read_to_string(&path)?;
    let index = ModelIndex::from_json(&text).map_err(|source| ModelError::Config {
        path: path.clone(),
        what: "model_index.json",
        source,
    })?;
    let force_zeros = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("force_zeros_for_empty_prompt")
                .and_then(|b| b.as_bool())
        })
        .unwrap_or(true);
    Ok((index, force_zeros))
}

fn text_config(src: &ModelSource, sub: &str) -> Result<ClipTextConfig, SingleFileError> {
    let path = src
        .file(&format!("{sub}/config.json"))
        .map_err(ModelError::from)?;
    Ok(
        ClipTextConfig::from_json(&read_to_string(&path)?).map_err(|source| {
            ModelError::Config {
                path,
                what: "CLIP text config",
                source,
            }
        })?,
    )
}

// ---------------------------------------------------------------------------
// Name mapping: diffusers / transformers name -> original tensor
// ---------------------------------------------------------------------------

/// How a served tensor is derived from the file's tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// As stored (reshaped when only trailing 1-sized dims differ).
    Whole,
    /// Part `i` of 3 along dim 0 (OpenCLIP's fused q/k/v).
    Third(usize),
    /// Transposed 2-d tensor (OpenCLIP's `text_projection`).
    Transpose,
}

/// One candidate origin of a served tensor.
#[derive(Clone, Debug)]
struct Origin {
    key: String,
    op: Op,
}

impl Origin {
    fn whole(key: String) -> Self {
        Self { key, op: Op::Whole }
    }
}

/// Where diffusers' UNet blocks sit in the LDM block lists.
#[derive(Clone, Debug)]
struct UnetMap {
    layers: Vec<usize>,
    rev_layers: Vec<usize>,
    up_attn: Vec<bool>,
    ema: bool,
}

const RESNET_TO_LDM: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

const UNET_TOP: [(&str, &str); 7] = [
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
];

fn resnet_part(rest: &[&str], renames: &[(&str, &str)]) -> Option<String> {
    let (first, tail) = rest.split_first()?;
    let mapped = renames
        .iter()
        .find(|(d, _)| d == first)
        .map(|(_, o)| *o)
        .unwrap_or(first);
    Some(
        std::iter::once(mapped)
            .chain(tail.iter().copied())
            .collect::<Vec<_>>()
            .join("."),
    )
}

impl UnetMap {
    fn new(cfg: &UNet2DConditionConfig, ema: bool) -> candle_core::Result<Self> {
        let n = cfg.block_out_channels.len();
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        Ok(Self {
            rev_layers: layers.iter().rev().copied().collect(),
            layers,
            up_attn: cfg
                .up_block_types
                .iter()
                .map(|t| t == "CrossAttnUpBlock2D")
                .collect(),
            ema,
        })
    }

    /// `input_blocks.0` is conv_in; each down block then has one entry per
    /// ResNet (+ attention) and, except the last, one for its downsampler.
    fn input_index(&self, block: usize, layer: usize) -> usize {
        1 + self.layers[..block].iter().map(|l| l + 1).sum::<usize>() + layer
    }

    fn output_index(&self, block: usize, layer: usize) -> usize {
        self.rev_layers[..block]
            .iter()
            .map(|l| l + 1)
            .sum::<usize>()
            + layer
    }

    /// A block index of the name, if the config has that block.
    fn block(&self, b: &str) -> Option<usize> {
        b.parse().ok().filter(|&b| b < self.layers.len())
    }

    /// LDM names for a diffusers UNet name, most likely first (none when the
    /// name has no counterpart).
    fn ldm_names(&self, name: &str) -> Vec<String> {
        self.try_ldm_names(name).unwrap_or_default()
    }

    fn try_ldm_names(&self, name: &str) -> Option<Vec<String>> {
        for (d, o) in UNET_TOP {
            if let Some(rest) = name.strip_prefix(d).and_then(|r| r.strip_prefix('.')) {
                return Some(vec![format!("{o}.{rest}")]);
            }
        }
        let p: Vec<&str> = name.split('.').collect();
        let num = |s: &str| s.parse::<usize>().ok();
        let resnet = |rest: &[&str]| resnet_part(rest, &RESNET_TO_LDM);
        let one = |s: String| Some(vec![s]);
        match p.as_slice() {
            ["down_blocks", b, "resnets", j, rest @ ..] => one(format!(
                "input_blocks.{}.0.{}",
                self.input_index(self.block(b)?, num(j)?),
                resnet(rest)?
            )),
            ["down_blocks", b, "attentions", j, rest @ ..] => one(format!(
                "input_blocks.{}.1.{}",
                self.input_index(self.block(b)?, num(j)?),
                rest.join(".")
            )),
            ["down_blocks", b, "downsamplers", "0", "conv", leaf] => {
                let b = self.block(b)?;
                let idx = self.input_index(b, self.layers[b]);
                one(format!("input_blocks.{idx}.0.op.{leaf}"))
            }
            ["mid_block", "resnets", k, rest @ ..] => {
                one(format!("middle_block.{}.{}", 2 * num(k)?, resnet(rest)?))
            }
            ["mid_block", "attentions", "0", rest @ ..] => {
                one(format!("middle_block.1.{}", rest.join(".")))
            }
            ["up_blocks", b, "resnets", j, rest @ ..] => one(format!(
                "output_blocks.{}.0.{}",
                self.output_index(self.block(b)?, num(j)?),
                resnet(rest)?
            )),
            ["up_blocks", b, "attentions", j, rest @ ..] => one(format!(
                "output_blocks.{}.1.{}",
                self.output_index(self.block(b)?, num(j)?),
                rest.join(".")
            )),
            ["up_blocks", b, "upsamplers", "0", "conv", leaf] => {
                // The upsampler follows the block's last ResNet, and its
                // attention when the block has attentions.
                let b = self.block(b)?;
                let idx = self.output_index(b, self.rev_layers[b]);
                let with = format!("output_blocks.{idx}.2.conv.{leaf}");
                let without = format!("output_blocks.{idx}.1.conv.{leaf}");
                Some(if self.up_attn.get(b).copied().unwrap_or(false) {
                    vec![with, without]
                } else {
                    vec![without, with]
                })
            }
            _ => None,
        }
    }
}

/// The LDM VAE layout.
#[derive(Clone, Debug)]
struct VaeMap {
    prefix: String,
    levels: usize,
}

const VAE_RESNET: [(&str, &str); 1] = [("conv_shortcut", "nin_shortcut")];
const VAE_ATTN: [(&str, &str); 9] = [
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
    ("query", "q"),
    ("key", "k"),
    ("value", "v"),
    ("proj_attn", "proj_out"),
];

impl VaeMap {
    fn ldm_name(&self, name: &str) -> Option<String> {
        let p: Vec<&str> = name.split('.').collect();
        let num = |s: &str| s.parse::<usize>().ok();
        let resnet = |rest: &[&str]| resnet_part(rest, &VAE_RESNET);
        let ldm = match p.as_slice() {
            [side, "conv_norm_out", leaf] => format!("{side}.norm_out.{leaf}"),
            ["encoder" | "decoder", "conv_in" | "conv_out", _] => name.to_string(),
            ["quant_conv" | "post_quant_conv", _] => name.to_string(),
            [side, "mid_block", "resnets", k, rest @ ..] => {
                format!("{side}.mid.block_{}.{}", num(k)? + 1, resnet(rest)?)
            }
            [side, "mid_block", "attentions", "0", rest @ ..] => {
                let rest = rest.join(".");
                let (d, o) = VAE_ATTN
                    .iter()
                    .find(|(d, _)| rest.starts_with(&format!("{d}.")))?;
                format!("{side}.mid.attn_1.{o}{}", &rest[d.len()..])
            }
            ["encoder", "down_blocks", i, "resnets", j, rest @ ..] => {
                format!(
                    "encoder.down.{}.block.{}.{}",
                    num(i)?,
                    num(j)?,
                    resnet(rest)?
                )
            }
            ["encoder", "down_blocks", i, "downsamplers", "0", "conv", leaf] => {
                format!("encoder.down.{}.downsample.conv.{leaf}", num(i)?)
            }
            // The LDM decoder numbers its levels from the bottom.
            ["decoder", "up_blocks", i, "resnets", j, rest @ ..] => format!(
                "decoder.up.{}.block.{}.{}",
                self.levels.checked_sub(num(i)? + 1)?,
                num(j)?,
                resnet(rest)?
            ),
            ["decoder", "up_blocks", i, "upsamplers", "0", "conv", leaf] => format!(
                "decoder.up.{}.upsample.conv.{leaf}",
                self.levels.checked_sub(num(i)? + 1)?
            ),
            _ => return None,
        };
        Some(format!("{}{ldm}", self.prefix))
    }
}

const OPENCLIP_LAYER: [(&str, &str); 5] = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
];

fn open_clip_origin(prefix: &str, name: &str) -> Option<Origin> {
    if name == "text_projection.weight" {
        return Some(Origin {
            key: format!("{prefix}text_projection"),
            op: Op::Transpose,
        });
    }
    let n = name.strip_prefix("text_model.").unwrap_or(name);
    let whole = |k: String| Some(Origin::whole(format!("{prefix}{k}")));
    match n {
        "embeddings.token_embedding.weight" => return whole("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return whole("positional_embedding".into()),
        _ => {}
    }
    if let Some(leaf) = n.strip_prefix("final_layer_norm.") {
        return whole(format!("ln_final.{leaf}"));
    }
    let rest = n.strip_prefix("encoder.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let block = format!("transformer.resblocks.{i}");
    for (j, qkv) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        if let Some(leaf) = rest
            .strip_prefix("self_attn.")
            .and_then(|r| r.strip_prefix(qkv))
            .and_then(|r| r.strip_prefix('.'))
        {
            return Some(Origin {
                key: format!("{prefix}{block}.attn.in_proj_{leaf}"),
                op: Op::Third(j),
            });
        }
    }
    OPENCLIP_LAYER.iter().find_map(|(d, o)| {
        rest.strip_prefix(d)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|leaf| whole(format!("{block}.{o}.{leaf}")))
    })
}

/// The layout of one component in the file.
#[derive(Clone, Debug)]
enum Layout {
    Unet(UnetMap),
    Vae(VaeMap),
    Clip(String),
    OpenClip(String),
}

impl From<&TextEncoderLayout> for Layout {
    fn from(t: &TextEncoderLayout) -> Self {
        match t {
            TextEncoderLayout::Clip(p) => Self::Clip(p.clone()),
            TextEncoderLayout::OpenClip(p) => Self::OpenClip(p.clone()),
        }
    }
}

impl Layout {
    /// Candidate origins of a served tensor, most likely first.
    fn origins(&self, name: &str) -> Vec<Origin> {
        match self {
            Self::Unet(m) => m
                .ldm_names(name)
                .into_iter()
                .map(|n| Origin::whole(unet_file_key(&n, m.ema)))
                .collect(),
            Self::Vae(m) => m.ldm_name(name).map(Origin::whole).into_iter().collect(),
            Self::Clip(prefix) => {
                let mut v = vec![Origin::whole(format!("{prefix}{name}"))];
                if let Some(rest) = name.strip_prefix("text_model.") {
                    v.push(Origin::whole(format!("{prefix}{rest}")));
                } else if !name.starts_with("text_projection") {
                    v.push(Origin::whole(format!("{prefix}text_model.{name}")));
                }
                v
            }
            Self::OpenClip(prefix) => open_clip_origin(prefix, name).into_iter().collect(),
        }
    }

    /// The prefix of every file tensor this component should consume.
    fn file_prefix(&self) -> String {
        match self {
            Self::Unet(m) if m.ema => format!("{EMA_PREFIX}diffusion_model"),
            Self::Unet(_) => UNET_PREFIX.into(),
            Self::Vae(m) => m.prefix.clone(),
            Self::Clip(p) | Self::OpenClip(p) => p.clone(),
        }
    }
}

// ---------------------------------------------------------------------------
// The memory-mapped file and its VarBuilder backend
// ---------------------------------------------------------------------------

struct FileInner {
    st: MmapedSafetensors,
    shapes: BTreeMap<String, Vec<usize>>,
    used: Mutex<HashSet<String>>,
}

impl FileInner {
    fn mark_used(&self, key: &str) {
        let mut used = match self.used.lock() {
            Ok(u) => u,
            Err(p) => p.into_inner(),
        };
        used.insert(key.to_string());
    }

    fn unused_under(&self, prefix: &str) -> Vec<String> {
        let used = match self.used.lock() {
            Ok(u) => u.clone(),
            Err(p) => p.into_inner().clone(),
        };
        self.shapes
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| !used.contains(*k))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// A memory-mapped single-file checkpoint, handing out a [`VarBuilder`] per
/// component that serves diffusers / transformers tensor names.
#[derive(Clone)]
pub struct SingleFile {
    inner: Arc<FileInner>,
    info: SingleFileInfo,
}

impl fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleFile")
            .field("info", &self.info)
            .finish()
    }
}

/// What a single-file checkpoint holds, from its tensors' shapes; `load`
/// reads one tensor (only a scalar `global_step`).
fn inspect(
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    load: impl Fn(&str) -> candle_core::Result<Tensor>,
) -> Result<SingleFileInfo, SingleFileError> {
    let family = match detect_family(shapes) {
        Ok(f) => Some(f),
        Err(SingleFileError::UnknownFamily { .. }) => None,
        Err(e) => return Err(e.at(path)),
    };
    let unet_weights = unet_weights(shapes).unwrap_or(UnetWeights::Regular);
    let ctx = context_dim(shapes, unet_weights == UnetWeights::EmaOnly);
    let vae_prefix = VAE_PREFIXES
        .iter()
        .find(|p| {
            has_prefix(shapes, &format!("{p}encoder."))
                || has_prefix(shapes, &format!("{p}decoder."))
        })
        .map(|p| p.to_string());
    let text_encoders = match family {
        Some(SdFamily::Xl) => vec![
            text_encoder_at(shapes, "conditioner.embedders.0."),
            text_encoder_at(shapes, "conditioner.embedders.1."),
        ],
        _ => vec![text_encoder_at(shapes, "cond_stage_model.")],
    };
    let global_step = match shapes.get("global_step") {
        Some(s) if s.iter().product::<usize>() == 1 => load("global_step")
            .and_then(|t| t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>())
            .ok()
            .and_then(|v| v.first().copied()),
        _ => None,
    };
    let info = SingleFileInfo {
        path: path.to_path_buf(),
        family,
        unet_weights,
        context_dim: ctx,
        vae_prefix,
        text_encoders,
        global_step,
        tensor_count: shapes.len(),
    };
    Ok(info)
}

/// The checks and inspection of [`SingleFile::open`] on a safetensors file
/// held in memory (`path` only names it in errors): header and byte ranges
/// validated, tensors parsed by the safetensors crate, family, UNet weights,
/// VAE and text encoders detected.
pub fn inspect_safetensors_bytes(
    bytes: &[u8],
    path: &Path,
) -> Result<SingleFileInfo, SingleFileError> {
    crate::weights::check_safetensors_bytes(bytes, path)?;
    let st = candle_core::safetensors::SliceSafetensors::new(bytes).map_err(|source| {
        ModelError::Weights {
            path: path.to_path_buf(),
            source: Box::new(source),
        }
    })?;
    let shapes: BTreeMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec()))
        .collect();
    inspect(path, &shapes, |name| st.load(name, &Device::Cpu))
}

impl SingleFile {
    /// Validates and memory-maps `path`, and inspects its tensors (family,
    /// UNet weights, VAE and text encoders present). Unreadable files (missing,
    /// truncated, not safetensors) and unsupported checkpoints are refused
    /// here, naming the path.
    pub fn open(path: &Path) -> Result<Self, SingleFileError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
            return Err(SingleFileError::Unsupported {
                path: path.to_path_buf(),
                what: "a pickle checkpoint".into(),
                hint: "pickle files can run arbitrary code when loaded; use the .safetensors \
                       release of the model, or convert it once with Python (safetensors.torch.save_file \
                       of torch.load(path, weights_only=True)[\"state_dict\"])"
                    .into(),
            });
        }
        // Validates the header and that the file holds every byte it promises,
        // so a truncated download is reported with its path.
        drop(open_safetensors(
            &[path.to_path_buf()],
            DType::F32,
            &Device::Cpu,
        )?);
        // SAFETY: the file is memory-mapped read-only. Modifying a checkpoint
        // while agfsync reads it is unsupported (as in every safetensors
        // reader); its header and every tensor's byte range were validated
        // just above.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::new(path) }.map_err(|source| ModelError::Weights {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let shapes: BTreeMap<String, Vec<usize>> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.shape().to_vec()))
            .collect();
        let info = inspect(path, &shapes, |name| st.load(name, &Device::Cpu))?;
        Ok(Self {
            inner: Arc::new(FileInner {
                st,
                shapes,
                used: Mutex::default(),
            }),
            info,
        })
    }

    /// What the file holds.
    pub fn info(&self) -> &SingleFileInfo {
        &self.info
    }

    /// Every tensor of the file with its shape, by original name.
    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.inner.shapes
    }

    fn builder(
        &self,
        layout: Layout,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(Backend {
                file: self.inner.clone(),
                layout,
                component: component.to_string(),
            }),
            dtype,
            device.clone(),
        )
    }

    /// A [`VarBuilder`] serving the UNet under diffusers' names, laid out by
    /// `cfg` (blocks, layers per block). `ema` reads the flattened EMA copy.
    pub fn unet_var_builder(
        &self,
        cfg: &UNet2DConditionConfig,
        ema: bool,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<VarBuilder<'static>> {
        Ok(self.builder(Layout::Unet(UnetMap::new(cfg, ema)?), "unet", dtype, device))
    }

    /// A [`VarBuilder`] serving the VAE under diffusers' names, or `None` when
    /// the file has no VAE.
    pub fn vae_var_builder(
        &self,
        cfg: &AutoencoderKlConfig,
        dtype: DType,
        device: &Device,
    ) -> Option<VarBuilder<'static>> {
        let prefix = self.info.vae_prefix.clone()?;
        let layout = Layout::Vae(VaeMap {
            prefix,
            levels: cfg.block_out_channels.len(),
        });
        Some(self.builder(layout, "vae", dtype, device))
    }

    /// A [`VarBuilder`] serving text encoder `index` (0: `text_encoder`, 1:
    /// SDXL's `text_encoder_2`) under transformers' names, or `None` when the
    /// file lacks it.
    pub fn text_encoder_var_builder(
        &self,
        index: usize,
        dtype: DType,
        device: &Device,
    ) -> Option<VarBuilder<'static>> {
        let layout = Layout::from(self.info.text_encoders.get(index)?.as_ref()?);
        let name = if index == 0 {
            "text_encoder"
        } else {
            "text_encoder_2"
        };
        Some(self.builder(layout, name, dtype, device))
    }

    /// File tensors under `component`'s prefix that no served tensor used.
    fn unused(&self, layout: &Layout) -> Vec<String> {
        self.inner.unused_under(&layout.file_prefix())
    }
}

/// The [`SimpleBackend`] of one component of a [`SingleFile`].
struct Backend {
    file: Arc<FileInner>,
    layout: Layout,
    component: String,
}

fn strip_ones(d: &[usize]) -> &[usize] {
    let mut d = d;
    while let [rest @ .., 1] = d {
        d = rest;
    }
    d
}

impl Backend {
    fn find(&self, name: &str) -> candle_core::Result<Origin> {
        let origins = self.layout.origins(name);
        if let Some(o) = origins
            .iter()
            .find(|o| self.file.shapes.contains_key(&o.key))
        {
            return Ok(o.clone());
        }
        match origins.first() {
            Some(o) => candle_core::bail!(
                "the file has no tensor `{}` (the {} tensor `{name}`)",
                o.key,
                self.component
            ),
            None => candle_core::bail!(
                "the {} tensor `{name}` has no counterpart in the original layout",
                self.component
            ),
        }
    }

    fn load(&self, o: &Origin, dev: &Device) -> candle_core::Result<Tensor> {
        let st = &self.file.st;
        match o.op {
            Op::Whole => st.load(&o.key, dev),
            Op::Third(i) => {
                let t = st.load(&o.key, &Device::Cpu)?;
                let n = t.dim(0)?;
                if n % 3 != 0 {
                    candle_core::bail!(
                        "`{}` has {n} rows, which cannot be split into q, k and v",
                        o.key
                    );
                }
                t.narrow(0, i * n / 3, n / 3)?.contiguous()?.to_device(dev)
            }
            Op::Transpose => st
                .load(&o.key, &Device::Cpu)?
                .t()?
                .contiguous()?
                .to_device(dev),
        }
    }

    fn fetch(&self, name: &str, dev: &Device) -> candle_core::Result<(Origin, Tensor)> {
        let o = self.find(name)?;
        let t = self.load(&o, dev)?;
        self.file.mark_used(&o.key);
        Ok((o, t))
    }
}

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (o, t) = self.fetch(name, dev)?;
        let t = if t.dims() == s.dims() {
            t
        } else if t.elem_count() == s.elem_count() && strip_ones(t.dims()) == strip_ones(s.dims()) {
            // 1x1 convolution weights served as linear ones, and back.
            t.reshape(s.clone())?
        } else {
            candle_core::bail!(
                "the {} tensor `{name}` (`{}` in the file) has shape {:?} in the file but the config implies {:?}",
                self.component,
                o.key,
                t.dims(),
                s.dims()
            )
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dev)?.1.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.find(name).is_ok()
    }
}

// ---------------------------------------------------------------------------
// Loading a pipeline
// ---------------------------------------------------------------------------

/// Resolves the config source of a single file: `spec` (a diffusers pipeline
/// folder or hub id) when given, else [`default_config_id`] of `family`
/// through the hub cache (offline: only if it was downloaded before).
pub fn resolve_config(
    spec: Option<&str>,
    family: SdFamily,
    hub: &HubOptions,
) -> Result<ModelSource, SingleFileError> {
    match spec {
        Some(s) => Ok(resolve_model(s, hub).map_err(ModelError::from)?),
        None => {
            let repo_id = default_config_id(family);
            resolve_model(repo_id, hub).map_err(|source| SingleFileError::DefaultConfig {
                path: PathBuf::new(),
                family,
                repo_id: repo_id.into(),
                source: Box::new(source),
            })
        }
    }
}

/// Loads a single file like diffusers' `from_single_file(path, config=...)`:
/// `config` is a diffusers pipeline folder or hub id (`--config`); without
/// one, the canonical repo of the file's family is used (see
/// [`default_config_id`]), offline only if cached. For SD 2.x without a
/// config, diffusers' `global_step` heuristic picks the prediction type unless
/// `sf.prediction_type` is set (see the module docs).
pub fn load_single_file_auto(
    path: &Path,
    config: Option<&str>,
    hub: &HubOptions,
    opts: &LoadOptions,
    sf: &SingleFileOptions,
) -> Result<StableDiffusion, SingleFileError> {
    let file = SingleFile::open(path)?;
    let src = match (config, file.info.family) {
        (Some(spec), _) => resolve_model(spec, hub).map_err(ModelError::from)?,
        (None, Some(family)) => resolve_config(None, family, hub).map_err(|e| e.at(path))?,
        (None, None) => {
            return Err(SingleFileError::UnknownFamily {
                path: path.to_path_buf(),
                detail: "the file has no text encoder, and its UNet's context width is none of \
                         SD's (768, 1024, 2048), so no default config can be chosen"
                    .into(),
            })
        }
    };
    let family = file.info.family;
    let mut sf = sf.clone();
    if config.is_none() && family == Some(SdFamily::V2) && sf.prediction_type.is_none() {
        // diffusers' legacy rule: 875000 steps is SD 2.x-base (epsilon).
        sf.prediction_type = Some(
            if file.info.global_step == Some(875_000) {
                "epsilon"
            } else {
                "v_prediction"
            }
            .into(),
        );
    }
    load_from(&file, &src, opts, &sf)
}

/// Loads the single file at `path` with the configs, tokenizers and scheduler
/// of the diffusers pipeline `config`, into the same [`StableDiffusion`] the
/// folder loader returns. Default [`SingleFileOptions`].
pub fn load_single_file(
    path: &Path,
    config: &ModelSource,
    opts: &LoadOptions,
) -> Result<StableDiffusion, SingleFileError> {
    load_single_file_with(path, config, opts, &SingleFileOptions::default())
}

/// [`load_single_file`] with [`SingleFileOptions`] (prediction type, EMA).
pub fn load_single_file_with(
    path: &Path,
    config: &ModelSource,
    opts: &LoadOptions,
    sf: &SingleFileOptions,
) -> Result<StableDiffusion, SingleFileError> {
    let file = SingleFile::open(path)?;
    load_from(&file, config, opts, sf)
}

fn normalise_prediction_type(p: &str) -> Result<&'static str, SingleFileError> {
    match p {
        "epsilon" | "eps" => Ok("epsilon"),
        "v_prediction" | "v" => Ok("v_prediction"),
        "sample" => Ok("sample"),
        other => Err(SingleFileError::PredictionType(other.into())),
    }
}

fn load_from(
    file: &SingleFile,
    src: &ModelSource,
    opts: &LoadOptions,
    sf: &SingleFileOptions,
) -> Result<StableDiffusion, SingleFileError> {
    let path = file.info.path.clone();
    let prediction_type = sf
        .prediction_type
        .as_deref()
        .map(normalise_prediction_type)
        .transpose()?;
    let cfg_family = config_family(src)?;
    let family = match file.info.family {
        Some(f) if f != cfg_family => {
            return Err(SingleFileError::FamilyMismatch {
                path,
                file_family: f,
                config_family: cfg_family,
                config: src.describe(""),
            })
        }
        Some(f) => f,
        None => {
            tracing::warn!(
                "{}: the weights do not show the family; trusting the config ({})",
                path.display(),
                family_name(cfg_family)
            );
            cfg_family
        }
    };
    let (index, force_zeros_for_empty_prompt) = read_index(src)?;
    let build_err = |component: &str| {
        let path = path.clone();
        let component = component.to_string();
        move |source: candle_core::Error| SingleFileError::Build {
            path,
            component,
            source: Box::new(source),
        }
    };

    // UNet.
    let unet_cfg: UNet2DConditionConfig = read_json(
        &src.file("unet/config.json").map_err(ModelError::from)?,
        "UNet config",
    )?;
    let ema = match file.info.unet_weights {
        UnetWeights::Regular => false,
        UnetWeights::EmaOnly => {
            tracing::info!(
                "{}: using the EMA UNet weights (the only ones in the file)",
                path.display()
            );
            true
        }
        UnetWeights::Both => sf.prefer_ema,
    };
    let vb = file
        .unet_var_builder(&unet_cfg, ema, opts.dtype, &opts.device)
        .map_err(build_err("unet"))?;
    let unet = UNet2DConditionModel::new(&unet_cfg, vb).map_err(build_err("unet"))?;
    let layout = Layout::Unet(UnetMap::new(&unet_cfg, ema).map_err(build_err("unet"))?);
    check_unused(file, &layout, "unet")?;

    // VAE.
    let vae_cfg_path = src.file("vae/config.json").map_err(ModelError::from)?;
    let vae_cfg: AutoencoderKlConfig = read_json(&vae_cfg_path, "VAE config")?;
    let vae_dtype = if vae_cfg.force_upcast == Some(true) && opts.dtype == DType::F16 {
        DType::F32
    } else {
        opts.dtype
    };
    let vae = match file.vae_var_builder(&vae_cfg, vae_dtype, &opts.device) {
        Some(vb) => {
            let vae = AutoencoderKl::new(&vae_cfg, vb).map_err(build_err("vae"))?;
            let layout = Layout::Vae(VaeMap {
                prefix: file.info.vae_prefix.clone().unwrap_or_default(),
                levels: vae_cfg.block_out_channels.len(),
            });
            check_unused(file, &layout, "vae")?;
            vae
        }
        None => {
            tracing::info!(
                "{}: no VAE in the file; using the VAE of {}",
                path.display(),
                src.describe("vae")
            );
            let files = find_weights(
                src,
                "vae",
                "diffusion_pytorch_model",
                opts.variant.as_deref(),
            )
            .map_err(ModelError::from)?;
            let vb = open_safetensors(&files, vae_dtype, &opts.device)?;
            AutoencoderKl::new(&vae_cfg, vb).map_err(|source| ModelError::Build {
                component: "vae".into(),
                dir: vae_cfg_path.parent().map(PathBuf::from).unwrap_or_default(),
                source: Box::new(source),
            })?
        }
    };

    // Text encoders and tokenizers.
    let text_encoder = load_text_encoder(file, src, 0, "text_encoder", false, opts)?;
    let tokenizer = load_tokenizer(src, "tokenizer")?;
    let (text_encoder_2, tokenizer_2) = if family == SdFamily::Xl {
        (
            Some(load_text_encoder(
                file,
                src,
                1,
                "text_encoder_2",
                true,
                opts,
            )?),
            Some(load_tokenizer(src, "tokenizer_2").or_else(|_| load_tokenizer(src, "tokenizer"))?),
        )
    } else {
        (None, None)
    };

    let sched_path = src
        .file("scheduler/scheduler_config.json")
        .map_err(ModelError::from)?;
    let mut scheduler_config = read_to_string(&sched_path)?;
    if let Some(p) = prediction_type {
        let mut v: serde_json::Value =
            serde_json::from_str(&scheduler_config).map_err(|source| ModelError::Config {
                path: sched_path.clone(),
                what: "scheduler config",
                source,
            })?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("prediction_type".into(), p.into());
        }
        scheduler_config =
            serde_json::to_string_pretty(&v).map_err(|source| ModelError::Config {
                path: sched_path.clone(),
                what: "scheduler config",
                source,
            })?;
    }

    Ok(StableDiffusion {
        family,
        index,
        unet,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        scheduler_config,
        source: path.display().to_string(),
        force_zeros_for_empty_prompt,
    })
}

/// Errors when file tensors of a component were not read by the model: the
/// config describes a smaller network than the file holds.
fn check_unused(
    file: &SingleFile,
    layout: &Layout,
    component: &str,
) -> Result<(), SingleFileError> {
    let unused = file.unused(layout);
    if unused.is_empty() {
        return Ok(());
    }
    Err(SingleFileError::UnusedTensors {
        path: file.info.path.clone(),
        component: component.into(),
        count: unused.len(),
        examples: unused.iter().take(3).map(|k| format!("`{k}`")).collect(),
    })
}

/// Tensors real text encoders carry that the model does not use: position
/// ids, OpenCLIP's `logit_scale`/`attn_mask`, `text_projection` of encoders
/// used without it, and layers past the config's depth (SD 2.x files hold 24
/// OpenCLIP layers; diffusers' SD 2.x text encoder uses 23).
fn ignorable_text_tensor(key: &str, layers: usize) -> bool {
    const LEAVES: [&str; 4] = [
        "position_ids",
        "logit_scale",
        "attn_mask",
        "text_projection",
    ];
    if LEAVES.iter().any(|l| key.ends_with(l)) {
        return true;
    }
    for marker in ["resblocks.", "encoder.layers."] {
        if let Some((_, rest)) = key.split_once(marker) {
            if let Some(i) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) {
                return i >= layers;
            }
        }
    }
    false
}

fn load_text_encoder(
    file: &SingleFile,
    src: &ModelSource,
    index: usize,
    sub: &str,
    with_projection: bool,
    opts: &LoadOptions,
) -> Result<ClipTextModel, SingleFileError> {
    let cfg = text_config(src, sub)?;
    let proj = with_projection || cfg.has_projection();
    if let Some(vb) = file.text_encoder_var_builder(index, opts.dtype, &opts.device) {
        let model =
            ClipTextModel::new(&cfg, proj, vb).map_err(|source| SingleFileError::Build {
                path: file.info.path.clone(),
                component: sub.into(),
                source: Box::new(source),
            })?;
        if let Some(Some(layout)) = file.info.text_encoders.get(index) {
            let unused: Vec<String> = file
                .unused(&Layout::from(layout))
                .into_iter()
                .filter(|k| !ignorable_text_tensor(k, cfg.num_hidden_layers))
                .collect();
            if !unused.is_empty() {
                tracing::warn!(
                    "{}: {} {sub} tensors of the file are not used (for example {})",
                    file.info.path.display(),
                    unused.len(),
                    unused
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        return Ok(model);
    }
    tracing::info!(
        "{}: no {sub} in the file; using the one of {}",
        file.info.path.display(),
        src.describe(sub)
    );
    Ok(crate::stable_diffusion::load_text_encoder(
        src,
        sub,
        with_projection,
        opts,
    )?)
}

fn load_tokenizer(src: &ModelSource, sub: &str) -> Result<ClipTokenizer, SingleFileError> {
    Ok(crate::stable_diffusion::load_tokenizer(src, sub)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_like() -> UNet2DConditionConfig {
        UNet2DConditionConfig::from_json("{}").expect("defaults")
    }

    #[test]
    fn unet_names_follow_the_ldm_block_lists() {
        let m = UnetMap::new(&sd15_like(), false).expect("map");
        let one = |n: &str| m.ldm_names(n).into_iter().next().unwrap_or_default();
        assert_eq!(one("conv_in.weight"), "input_blocks.0.0.weight");
        assert_eq!(one("time_embedding.linear_2.bias"), "time_embed.2.bias");
        assert_eq!(
            one("down_blocks.0.resnets.1.norm1.weight"),
            "input_blocks.2.0.in_layers.0.weight"
        );
        assert_eq!(
            one("down_blocks.1.attentions.0.proj_in.weight"),
            "input_blocks.4.1.proj_in.weight"
        );
        assert_eq!(
            one("down_blocks.2.downsamplers.0.conv.weight"),
            "input_blocks.9.0.op.weight"
        );
        assert_eq!(
            one("mid_block.resnets.1.time_emb_proj.weight"),
            "middle_block.2.emb_layers.1.weight"
        );
        assert_eq!(
            one("up_blocks.0.upsamplers.0.conv.bias"),
            "output_blocks.2.1.conv.bias"
        );
        assert_eq!(
            one("up_blocks.1.upsamplers.0.conv.bias"),
            "output_blocks.5.2.conv.bias"
        );
        assert_eq!(
            one("up_blocks.3.resnets.2.conv_shortcut.weight"),
            "output_blocks.11.0.skip_connection.weight"
        );
        assert_eq!(
            unet_file_key("input_blocks.0.0.weight", true),
            "model_ema.diffusion_modelinput_blocks00weight"
        );
    }

    #[test]
    fn vae_and_open_clip_names() {
        let m = VaeMap {
            prefix: "first_stage_model.".into(),
            levels: 4,
        };
        assert_eq!(
            m.ldm_name("decoder.up_blocks.0.resnets.2.conv_shortcut.weight")
                .as_deref(),
            Some("first_stage_model.decoder.up.3.block.2.nin_shortcut.weight")
        );
        assert_eq!(
            m.ldm_name("encoder.mid_block.attentions.0.to_out.0.bias")
                .as_deref(),
            Some("first_stage_model.encoder.mid.attn_1.proj_out.bias")
        );
        let o = open_clip_origin("p.", "text_model.encoder.layers.3.self_attn.v_proj.bias")
            .expect("mapped");
        assert_eq!(o.key, "p.transformer.resblocks.3.attn.in_proj_bias");
        assert_eq!(o.op, Op::Third(2));
        let o = open_clip_origin("p.", "text_projection.weight").expect("mapped");
        assert_eq!((o.key.as_str(), o.op), ("p.text_projection", Op::Transpose));
        assert!(ignorable_text_tensor(
            "p.transformer.resblocks.23.ln_1.weight",
            23
        ));
        assert!(!ignorable_text_tensor(
            "p.transformer.resblocks.22.ln_1.weight",
            23
        ));
    }
}
