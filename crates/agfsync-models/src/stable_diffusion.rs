//! Loading a diffusers Stable Diffusion pipeline folder (`model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, and for SDXL
//! `text_encoder_2/`, `tokenizer_2/`) from a local folder or the hub cache.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device};
use serde::Deserialize;

use crate::autoencoder_kl::{AutoencoderKl, AutoencoderKlConfig};
use crate::clip_text::{ClipTextConfig, ClipTextModel};
use crate::clip_tokenizer::ClipTokenizer;
use crate::error::{read_json, read_to_string, ModelError, Result};
use crate::hub::{find_weights, ModelSource};
use crate::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::weights::open_safetensors;

/// The Stable Diffusion family of a pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SdFamily {
    /// SD 1.x: one CLIP ViT-L text encoder, 768-wide conditioning.
    V1,
    /// SD 2.x: one OpenCLIP ViT-H text encoder, 1024-wide conditioning.
    V2,
    /// SDXL: two text encoders and micro-conditioning.
    Xl,
}

/// `model_index.json`: the pipeline class and its components.
#[derive(Clone, Debug)]
pub struct ModelIndex {
    /// `_class_name`, e.g. `StableDiffusionPipeline`.
    pub class_name: String,
    /// Component name to `(library, class)`, e.g. `unet -> (diffusers, UNet2DConditionModel)`.
    pub components: BTreeMap<String, (Option<String>, Option<String>)>,
}

impl ModelIndex {
    /// Parses `model_index.json` text.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        let v: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)?;
        let mut class_name = String::new();
        let mut components = BTreeMap::new();
        for (k, val) in v {
            if k == "_class_name" {
                class_name = val.as_str().unwrap_or_default().to_string();
            } else if k.starts_with('_') {
                continue;
            } else if let Some(arr) = val.as_array() {
                let lib = arr.first().and_then(|x| x.as_str()).map(String::from);
                let class = arr.get(1).and_then(|x| x.as_str()).map(String::from);
                components.insert(k, (lib, class));
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }

    /// True when the component exists and is not null in the index.
    pub fn has(&self, name: &str) -> bool {
        matches!(self.components.get(name), Some((Some(_), Some(_))))
    }
}

/// How to load a pipeline.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Compute dtype of the networks.
    pub dtype: DType,
    /// Device to load onto.
    pub device: Device,
    /// Weights variant to prefer (`fp16`), falling back to the plain files.
    pub variant: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            variant: None,
        }
    }
}

/// A loaded Stable Diffusion pipeline: its networks, tokenizers and the raw
/// scheduler config (parsed by agfsync-diffusion).
#[derive(Debug)]
pub struct StableDiffusion {
    /// Which family the pipeline belongs to.
    pub family: SdFamily,
    /// The pipeline index.
    pub index: ModelIndex,
    /// The denoising UNet.
    pub unet: UNet2DConditionModel,
    /// The autoencoder.
    pub vae: AutoencoderKl,
    /// The (first) text encoder.
    pub text_encoder: ClipTextModel,
    /// The (first) tokenizer.
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder (with projection).
    pub text_encoder_2: Option<ClipTextModel>,
    /// SDXL's second tokenizer.
    pub tokenizer_2: Option<ClipTokenizer>,
    /// `scheduler/scheduler_config.json`, as text.
    pub scheduler_config: String,
    /// Where the pipeline came from, for records and messages.
    pub source: String,
    /// SDXL: an absent negative prompt means zero negative embeddings
    /// (`force_zeros_for_empty_prompt` in model_index.json, default true).
    pub force_zeros_for_empty_prompt: bool,
}

#[derive(Deserialize)]
struct ForceZeros {
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

impl StableDiffusion {
    /// Loads every component of the pipeline at `src`.
    pub fn load(src: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (index_path, index, force_zeros_for_empty_prompt) = read_index(src)?;
        for needed in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !index.has(needed) {
                return Err(ModelError::Unsupported(format!(
                    "{}: the pipeline has no `{needed}` component (pipeline class `{}`)",
                    index_path.display(),
                    index.class_name
                )));
            }
        }
        let variant = opts.variant.as_deref();
        let unet_cfg_path = src.file("unet/config.json")?;
        let unet_cfg: UNet2DConditionConfig = read_json(&unet_cfg_path, "UNet config")?;
        let unet_files = find_weights(src, "unet", "diffusion_pytorch_model", variant)?;
        let vb = open_safetensors(&unet_files, opts.dtype, &opts.device)?;
        let unet =
            UNet2DConditionModel::new(&unet_cfg, vb).map_err(|source| ModelError::Build {
                component: "unet".into(),
                dir: parent(&unet_cfg_path),
                source: Box::new(source),
            })?;

        let vae_cfg_path = src.file("vae/config.json")?;
        let vae_cfg: AutoencoderKlConfig = read_json(&vae_cfg_path, "VAE config")?;
        // diffusers runs VAEs flagged force_upcast (SDXL's) in f32: they
        // overflow in f16.
        let vae_dtype = if vae_cfg.force_upcast == Some(true) && opts.dtype == DType::F16 {
            DType::F32
        } else {
            opts.dtype
        };
        let vae_files = find_weights(src, "vae", "diffusion_pytorch_model", variant)?;
        let vb = open_safetensors(&vae_files, vae_dtype, &opts.device)?;
        let vae = AutoencoderKl::new(&vae_cfg, vb).map_err(|source| ModelError::Build {
            component: "vae".into(),
            dir: parent(&vae_cfg_path),
            source: Box::new(source),
        })?;

        let TextEncoders {
            family,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            ..
        } = TextEncoders::load_indexed(src, &index, force_zeros_for_empty_prompt, opts)?;
        let sched_path = src.file("scheduler/scheduler_config.json")?;
        let scheduler_config = read_to_string(&sched_path)?;

        // An SDXL UNet marks the pipeline as SDXL even without its second
        // text encoder (refused below, naming what is missing).
        let family = if unet_cfg.addition_embed_type.is_some() {
            SdFamily::Xl
        } else {
            family
        };
        if family == SdFamily::Xl && text_encoder_2.is_none() {
            return Err(ModelError::Unsupported(format!(
                "{}: an SDXL UNet needs text_encoder_2, which the pipeline lacks",
                src.describe("")
            )));
        }
        Ok(Self {
            family,
            index,
            unet,
            vae,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            scheduler_config,
            source: src.python_spec(),
            force_zeros_for_empty_prompt,
        })
    }
}

/// What encoding prompts needs from a pipeline: its family and its CLIP
/// tokenizer(s) and text encoder(s). Implemented by [`StableDiffusion`] and
/// by [`TextEncoders`], which loads only these (the Diffusion-DPO trainer
/// encodes its prompts without holding a second UNet and a VAE).
pub trait PromptEncoders {
    /// The pipeline's family (SDXL concatenates two encoders).
    fn family(&self) -> SdFamily;
    /// Tokenizer and text encoder `which` (0, or 1 for SDXL's second).
    fn encoder(&self, which: usize) -> Option<(&ClipTokenizer, &ClipTextModel)>;
    /// diffusers' `force_zeros_for_empty_prompt` (SDXL's empty negative).
    fn force_zeros_for_empty_prompt(&self) -> bool;
    /// Device and dtype the embeddings are returned in (the UNet's).
    fn device_dtype(&self) -> (Device, DType);
}

impl PromptEncoders for StableDiffusion {
    fn family(&self) -> SdFamily {
        self.family
    }

    fn encoder(&self, which: usize) -> Option<(&ClipTokenizer, &ClipTextModel)> {
        match which {
            0 => Some((&self.tokenizer, &self.text_encoder)),
            _ => self.tokenizer_2.as_ref().zip(self.text_encoder_2.as_ref()),
        }
    }

    fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    fn device_dtype(&self) -> (Device, DType) {
        (self.unet.device().clone(), self.unet.dtype())
    }
}

/// The text side of a pipeline alone: tokenizers and text encoders, as
/// [`StableDiffusion::load`] would load them, without the UNet and VAE.
#[derive(Debug)]
pub struct TextEncoders {
    /// Which family the pipeline belongs to.
    pub family: SdFamily,
    /// The CLIP text encoder.
    pub text_encoder: ClipTextModel,
    /// Its tokenizer.
    pub tokenizer: ClipTokenizer,
    /// SDXL's second text encoder (with projection).
    pub text_encoder_2: Option<ClipTextModel>,
    /// SDXL's second tokenizer.
    pub tokenizer_2: Option<ClipTokenizer>,
    /// diffusers' `force_zeros_for_empty_prompt` from model_index.json.
    pub force_zeros_for_empty_prompt: bool,
    device: Device,
    dtype: DType,
}

impl TextEncoders {
    /// Loads the tokenizers and text encoders of the pipeline at `src`.
    pub fn load(src: &ModelSource, opts: &LoadOptions) -> Result<Self> {
        let (_, index, force_zeros_for_empty_prompt) = read_index(src)?;
        Self::load_indexed(src, &index, force_zeros_for_empty_prompt, opts)
    }

    /// [`TextEncoders::load`] with the pipeline's index already read.
    fn load_indexed(
        src: &ModelSource,
        index: &ModelIndex,
        force_zeros_for_empty_prompt: bool,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let text_encoder = load_text_encoder(src, "text_encoder", false, opts)?;
        let tokenizer = load_tokenizer(src, "tokenizer")?;
        let (text_encoder_2, tokenizer_2) = if index.has("text_encoder_2") {
            (
                Some(load_text_encoder(src, "text_encoder_2", true, opts)?),
                Some(
                    load_tokenizer(src, "tokenizer_2")
                        .or_else(|_| load_tokenizer(src, "tokenizer"))?,
                ),
            )
        } else {
            (None, None)
        };
        let family = if text_encoder_2.is_some() {
            SdFamily::Xl
        } else if text_encoder.config().hidden_act == "gelu" {
            SdFamily::V2
        } else {
            SdFamily::V1
        };
        Ok(Self {
            family,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            force_zeros_for_empty_prompt,
            device: opts.device.clone(),
            dtype: opts.dtype,
        })
    }
}

impl PromptEncoders for TextEncoders {
    fn family(&self) -> SdFamily {
        self.family
    }

    fn encoder(&self, which: usize) -> Option<(&ClipTokenizer, &ClipTextModel)> {
        match which {
            0 => Some((&self.tokenizer, &self.text_encoder)),
            _ => self.tokenizer_2.as_ref().zip(self.text_encoder_2.as_ref()),
        }
    }

    fn force_zeros_for_empty_prompt(&self) -> bool {
        self.force_zeros_for_empty_prompt
    }

    fn device_dtype(&self) -> (Device, DType) {
        (self.device.clone(), self.dtype)
    }
}

impl StableDiffusion {
    /// Replaces the UNet with the one in a diffusers `unet/` folder
    /// (`config.json` and `diffusion_pytorch_model*.safetensors`), such as
    /// the result of `agfsync train --full`: the fine-tuned UNet with the
    /// pipeline's own text encoders, VAE and scheduler. The new UNet must
    /// take the same inputs (latent channels, text width, SDXL's added
    /// conditioning); what differs is named.
    pub fn replace_unet(&mut self, unet_dir: &std::path::Path, opts: &LoadOptions) -> Result<()> {
        let cfg_path = unet_dir.join("config.json");
        let cfg: UNet2DConditionConfig = read_json(&cfg_path, "UNet config")?;
        let (now, new) = (
            serde_json::to_value(self.unet.config()).unwrap_or_default(),
            serde_json::to_value(&cfg).unwrap_or_default(),
        );
        let differs: Vec<String> = [
            "in_channels",
            "out_channels",
            "cross_attention_dim",
            "addition_embed_type",
            "projection_class_embeddings_input_dim",
        ]
        .iter()
        .filter(|k| now.get(**k) != new.get(**k))
        .map(|k| {
            format!(
                "{k} is {} in the pipeline but {} in this UNet",
                now.get(*k).cloned().unwrap_or_default(),
                new.get(*k).cloned().unwrap_or_default()
            )
        })
        .collect();
        if !differs.is_empty() {
            return Err(ModelError::Unsupported(format!(
                "{}: this UNet does not fit the pipeline {}: {}",
                unet_dir.display(),
                self.source,
                differs.join("; ")
            )));
        }
        let files = find_weights(
            &ModelSource::local(unet_dir),
            "",
            "diffusion_pytorch_model",
            None,
        )?;
        let vb = open_safetensors(&files, opts.dtype, &opts.device)?;
        self.unet = UNet2DConditionModel::new(&cfg, vb).map_err(|source| ModelError::Build {
            component: "unet".into(),
            dir: unet_dir.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(())
    }
}

fn parent(p: &std::path::Path) -> PathBuf {
    p.parent().map(PathBuf::from).unwrap_or_default()
}

/// Reads a pipeline's `model_index.json`: its path, the index, and
/// `force_zeros_for_empty_prompt` (default true, as diffusers).
fn read_index(src: &ModelSource) -> Result<(PathBuf, ModelIndex, bool)> {
    let index_path = src.file("model_index.json").map_err(|e| {
        ModelError::Unsupported(format!(
            "{e}\n{} is not a diffusers pipeline folder: model_index.json is missing. Point --model at a folder saved by diffusers' save_pretrained (or a hub id of one)",
            src.describe("")
        ))
    })?;
    let index_text = read_to_string(&index_path)?;
    let force_zeros = serde_json::from_str::<ForceZeros>(&index_text)
        .ok()
        .and_then(|f| f.force_zeros_for_empty_prompt)
        .unwrap_or(true);
    let index = ModelIndex::from_json(&index_text).map_err(|source| ModelError::Config {
        path: index_path.clone(),
        what: "model_index.json",
        source,
    })?;
    Ok((index_path, index, force_zeros))
}

/// Loads the CLIP text encoder in `sub` of a pipeline.
pub(crate) fn load_text_encoder(
    src: &ModelSource,
    sub: &str,
    with_projection: bool,
    opts: &LoadOptions,
) -> Result<ClipTextModel> {
    let cfg_path = src.file(&format!("{sub}/config.json"))?;
    let cfg = ClipTextConfig::from_json(&read_to_string(&cfg_path)?).map_err(|source| {
        ModelError::Config {
            path: cfg_path.clone(),
            what: "CLIP text config",
            source,
        }
    })?;
    let files = find_weights(src, sub, "model", opts.variant.as_deref())?;
    let vb = open_safetensors(&files, opts.dtype, &opts.device)?;
    let proj = with_projection || cfg.has_projection();
    ClipTextModel::new(&cfg, proj, vb).map_err(|source| ModelError::Build {
        component: sub.to_string(),
        dir: parent(&cfg_path),
        source: Box::new(source),
    })
}

/// Loads the CLIP tokenizer in `sub` of a pipeline (fetching its files from
/// the hub when needed).
pub(crate) fn load_tokenizer(src: &ModelSource, sub: &str) -> Result<ClipTokenizer> {
    // Fetch whichever tokenizer files exist so hub sources have them locally.
    let mut dir = None;
    for f in [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        if let Some(p) = src.optional_file(&format!("{sub}/{f}"))? {
            dir = p.parent().map(PathBuf::from);
        }
    }
    let dir = dir.ok_or_else(|| {
        ModelError::Unsupported(format!(
            "{}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt)",
            src.describe(sub)
        ))
    })?;
    Ok(ClipTokenizer::from_dir(&dir)?)
}
