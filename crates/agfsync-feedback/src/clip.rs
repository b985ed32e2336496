//! A full CLIP model (Radford et al., "Learning Transferable Visual Models
//! From Natural Language Supervision", 2021) loaded from a transformers
//! `CLIPModel` folder: `config.json` (with `text_config` and
//! `vision_config`), `model.safetensors`, the tokenizer files and
//! `preprocessor_config.json`.
//!
//! Reference: transformers 5.24 `models/clip/modeling_clip.py` (`CLIPModel`,
//! `get_image_features`, `get_text_features`). Both projections are
//! `projection_dim` wide, read from the *top-level* `projection_dim` of the
//! config (the sub-configs' own `projection_dim` is ignored by `CLIPModel`).
//! `logit_scale` is read and exposed, but scores here use `100 * cos`
//! (torchmetrics' CLIP score), not `logit_scale.exp() * cos`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use serde_json::Value;

use agfsync_models::clip_text::{ClipTextConfig, ClipTextModel, TextLayer};
use agfsync_models::clip_tokenizer::ClipTokenizer;
use agfsync_models::hub::{find_weights, ModelSource};
use agfsync_models::nn::Pass;
use agfsync_models::weights::open_safetensors;

use crate::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::error::{FeedbackError, Result};
use crate::image_input::LoadedImage;
use crate::preprocess::{ClipImageProcessor, ImageProcessorConfig, ResizeBackend, ResizeTarget};
use crate::scorer::BatchCache;

/// transformers' `CLIPTextConfig.eos_token_id` default, used when a
/// config.json omits it (transformers 5 writes only non-default values).
const TRANSFORMERS_EOS_DEFAULT: u32 = 49407;

/// A transformers `CLIPConfig` (`config.json` of a `CLIPModel`).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    /// The text tower.
    pub text_config: ClipTextConfig,
    /// The vision tower.
    pub vision_config: ClipVisionConfig,
    /// Width of both projections (the embedding width).
    pub projection_dim: usize,
    /// Initial `logit_scale` (used only when the checkpoint lacks it).
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    /// Parses a `CLIPModel` config.json.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let (Some(tc), Some(vc)) = (v.get("text_config"), v.get("vision_config")) else {
            return Err(
                "a CLIPModel config needs both `text_config` and `vision_config` (is this a \
                 CLIPTextModel or CLIPVisionModel folder?)"
                    .into(),
            );
        };
        let projection_dim = match v.get("projection_dim") {
            None | Some(Value::Null) => 512,
            Some(p) => p
                .as_u64()
                .ok_or_else(|| format!("`projection_dim` must be an integer, got {p}"))?
                as usize,
        };
        let mut text_config: ClipTextConfig =
            serde_json::from_value(tc.clone()).map_err(|e| format!("text_config: {e}"))?;
        if tc.get("eos_token_id").is_none() {
            text_config.eos_token_id = TRANSFORMERS_EOS_DEFAULT;
        }
        text_config.projection_dim = Some(projection_dim);
        let vision_config: ClipVisionConfig =
            serde_json::from_value(vc.clone()).map_err(|e| format!("vision_config: {e}"))?;
        let logit_scale_init_value = v
            .get("logit_scale_init_value")
            .and_then(Value::as_f64)
            .unwrap_or(2.6592);
        Ok(Self {
            text_config,
            vision_config,
            projection_dim,
            logit_scale_init_value,
        })
    }

    /// openai/clip-vit-large-patch14 (ViT-L/14 at 224 px, 768-wide
    /// embeddings): the model of the CLIP and aesthetic scores.
    pub fn vit_large_patch14() -> Self {
        let text_config = ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: Some(768),
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            // What openai/clip-vit-large-patch14's config.json says (the
            // legacy end-of-text rule).
            eos_token_id: 2,
            architectures: None,
        };
        Self {
            text_config,
            vision_config: ClipVisionConfig::vit_large_patch14(),
            projection_dim: 768,
            logit_scale_init_value: 2.6592,
        }
    }
}

/// How to load a [`ClipModel`].
#[derive(Clone, Debug)]
pub struct ClipLoadOptions {
    /// Compute dtype (F32 reproduces the references; F16/BF16 on GPUs).
    pub dtype: DType,
    /// Where the model runs.
    pub device: Device,
    /// Which transformers image-processor backend to reproduce.
    pub resize_backend: ResizeBackend,
}

impl Default for ClipLoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            resize_backend: ResizeBackend::Pil,
        }
    }
}

/// Text embeddings of a batch of prompts.
#[derive(Clone, Debug)]
pub struct TextEmbeddings {
    /// Projected, not normalised: `[n, projection_dim]`, f32.
    pub embeds: Tensor,
    /// Whether each prompt was cut to the 77-token window.
    pub truncated: Vec<bool>,
}

/// A transformers `CLIPModel` with its tokenizer and image processor.
#[derive(Debug)]
pub struct ClipModel {
    config: ClipConfig,
    text: ClipTextModel,
    vision: ClipVisionModel,
    logit_scale: f32,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    identity: String,
    device: Device,
}

impl ClipModel {
    /// Loads a transformers CLIPModel folder (or hub repo) in f32 on the CPU,
    /// preprocessing as transformers' PIL backend does.
    pub fn load(src: &ModelSource, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(
            src,
            &ClipLoadOptions {
                dtype,
                device: device.clone(),
                ..ClipLoadOptions::default()
            },
        )
    }

    /// Loads a transformers CLIPModel folder (or hub repo).
    pub fn load_with(src: &ModelSource, options: &ClipLoadOptions) -> Result<Self> {
        let config_path = src.file("config.json")?;
        let text = std::fs::read_to_string(&config_path).map_err(|source| FeedbackError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = ClipConfig::from_json(&text).map_err(|reason| FeedbackError::Config {
            path: config_path.clone(),
            what: "CLIPModel config",
            reason,
        })?;
        let files = find_weights(src, "", "model", None)?;
        let vb = open_safetensors(&files, options.dtype, &options.device)?;
        let build_err = |e: candle_core::Error| {
            FeedbackError::Model(agfsync_models::ModelError::Build {
                component: "CLIP model".into(),
                dir: src.root().to_path_buf(),
                source: Box::new(e),
            })
        };
        let (text_model, vision, logit_scale) = build_towers(&config, vb).map_err(build_err)?;
        // Make sure every tokenizer file is local (hub sources download on demand).
        for name in [
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            src.optional_file(name)?;
        }
        let tokenizer = ClipTokenizer::from_dir(src.root())?;
        if tokenizer.vocab_size() > config.text_config.vocab_size {
            return Err(FeedbackError::Config {
                path: config_path,
                what: "CLIPModel config",
                reason: format!(
                    "the tokenizer has {} tokens but text_config.vocab_size is {}: tokenizer and model do not match",
                    tokenizer.vocab_size(),
                    config.text_config.vocab_size
                ),
            });
        }
        let processor = match src.optional_file("preprocessor_config.json")? {
            Some(p) => ClipImageProcessor::from_file(&p, options.resize_backend)?,
            None => {
                let n = config.vision_config.image_size;
                tracing::warn!(
                    model = %src,
                    "no preprocessor_config.json: using CLIPImageProcessor defaults at {n} px"
                );
                ClipImageProcessor::new(
                    ImageProcessorConfig {
                        size: ResizeTarget::ShortestEdge(n),
                        crop_size: (n, n),
                        ..ImageProcessorConfig::default()
                    },
                    options.resize_backend,
                )?
            }
        };
        let n = config.vision_config.image_size;
        let out = processor.config().crop_size;
        if !processor.config().do_center_crop || out != (n, n) {
            return Err(FeedbackError::Config {
                path: src.root().join("preprocessor_config.json"),
                what: "image processor config (preprocessor_config.json)",
                reason: format!(
                    "it must centre-crop to the model's {n}x{n} input (do_center_crop {}, crop_size {}x{})",
                    processor.config().do_center_crop,
                    out.0,
                    out.1
                ),
            });
        }
        let identity = model_identity(src, &files);
        Ok(Self {
            config,
            text: text_model,
            vision,
            logit_scale,
            tokenizer,
            processor,
            identity,
            device: options.device.clone(),
        })
    }

    /// Builds a model from a config and a [`VarBuilder`] (random weights for
    /// tests and benchmarks), with the given tokenizer and processor.
    pub fn from_parts(
        config: ClipConfig,
        vb: VarBuilder,
        tokenizer: ClipTokenizer,
        processor: ClipImageProcessor,
        identity: impl Into<String>,
    ) -> Result<Self> {
        let device = vb.device().clone();
        let (text, vision, logit_scale) = build_towers(&config, vb)?;
        Ok(Self {
            config,
            text,
            vision,
            logit_scale,
            tokenizer,
            processor,
            identity: identity.into(),
            device,
        })
    }

    /// The config.
    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Width of the image and text embeddings.
    pub fn projection_dim(&self) -> usize {
        self.config.projection_dim
    }

    /// `logit_scale` as stored (the temperature is its exponential, 100 for
    /// OpenAI's models).
    pub fn logit_scale(&self) -> f32 {
        self.logit_scale
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The image processor.
    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    /// The vision tower.
    pub fn vision(&self) -> &ClipVisionModel {
        &self.vision
    }

    /// The text tower.
    pub fn text(&self) -> &ClipTextModel {
        &self.text
    }

    /// Where the weights came from: `repo@commit` for hub models, else the
    /// folder's name and a fingerprint of the weight files (see
    /// [`model_identity`]).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `get_image_features`: projected, unnormalised image embeddings
    /// (`[b, projection_dim]`, f32) of `pixel_values` (`[b, 3, s, s]`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let out = self
            .vision
            .forward(&pixel_values.to_device(&self.device)?, Pass::INFERENCE)?;
        let embeds = out
            .image_embeds
            .ok_or_else(|| FeedbackError::Invalid("CLIP vision tower has no projection".into()))?;
        Ok(embeds.to_dtype(DType::F32)?)
    }

    /// `get_text_features`: projected, unnormalised text embeddings
    /// (`[b, projection_dim]`, f32) of `input_ids` (`[b, seq]`).
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let out = self.text.forward(
            &input_ids.to_device(&self.device)?,
            TextLayer::Last,
            Pass::INFERENCE,
        )?;
        let pooled = out.pooled.ok_or_else(|| {
            FeedbackError::Invalid("CLIP text tower returned no pooled output".into())
        })?;
        Ok(pooled.to_dtype(DType::F32)?)
    }

    /// Tokenises `texts` (`bos, tokens, eos`, truncated by tokens to the
    /// model's 77 positions, padded) and returns their embeddings.
    pub fn encode_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<TextEmbeddings> {
        let max_len = self
            .config
            .text_config
            .max_position_embeddings
            .min(self.tokenizer.model_max_length());
        let enc = self.tokenizer.encode_batch_padded(texts, max_len)?;
        let truncated: Vec<bool> = enc.iter().map(|e| e.truncated).collect();
        let ids: Vec<u32> = enc.iter().flat_map(|e| e.ids.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, (texts.len(), max_len), &self.device)?;
        Ok(TextEmbeddings {
            embeds: self.text_features(&ids)?,
            truncated,
        })
    }

    /// Preprocesses and encodes images. An image that cannot be
    /// preprocessed gets its own error; the others are encoded together.
    /// With a `cache`, embeddings already computed for this batch by this
    /// model (for another metric) are reused.
    pub fn encode_images(
        &self,
        images: &[&LoadedImage],
        cache: Option<&mut BatchCache>,
    ) -> Result<Vec<std::result::Result<Tensor, String>>> {
        let key = format!(
            "clip-image:{}:{}:{:?}",
            self.identity,
            self.processor.backend().name(),
            self.processor.config()
        );
        if let Some(c) = cache.as_ref() {
            if let Some(found) = c.image_features(&key) {
                if found.len() == images.len() {
                    return Ok(found.to_vec());
                }
            }
        }
        let mut rows: Vec<std::result::Result<Tensor, String>> = Vec::with_capacity(images.len());
        let mut pixels = Vec::new();
        let mut ok_index = Vec::new();
        let (h, w) = self.processor.config().crop_size;
        for (i, img) in images.iter().enumerate() {
            match self.processor.pixel_values(img) {
                Ok((px, _)) => {
                    pixels.extend_from_slice(&px);
                    ok_index.push(i);
                    rows.push(Err(String::new()));
                }
                Err(e) => rows.push(Err(e.to_string())),
            }
        }
        if !ok_index.is_empty() {
            let pv = Tensor::from_vec(pixels, (ok_index.len(), 3, h, w), &Device::Cpu)?;
            let feats = self.image_features(&pv)?.to_device(&Device::Cpu)?;
            for (row, &i) in ok_index.iter().enumerate() {
                rows[i] = Ok(feats.get(row)?);
            }
        }
        if let Some(c) = cache {
            c.insert_image_features(key, rows.clone());
        }
        Ok(rows)
    }
}

fn build_towers(
    config: &ClipConfig,
    vb: VarBuilder,
) -> candle_core::Result<(ClipTextModel, ClipVisionModel, f32)> {
    let text = ClipTextModel::new(&config.text_config, true, vb.clone())?;
    let vision = ClipVisionModel::new(
        &config.vision_config,
        Some(config.projection_dim),
        vb.clone(),
    )?;
    let logit_scale = vb
        .get_with_hints(
            (),
            "logit_scale",
            Init::Const(config.logit_scale_init_value),
        )?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok((text, vision, logit_scale))
}

/// `repo@commit` for hub sources; for local folders the folder's name plus
/// an FNV-1a fingerprint of each weight file's size and safetensors header
/// (cheap, identical for identical files on any machine, and changed whenever
/// tensors are renamed, reshaped or re-saved).
pub fn model_identity(src: &ModelSource, files: &[PathBuf]) -> String {
    if let (Some(repo), Some(commit)) = (src.repo(), src.commit()) {
        return format!("{}@{commit}", repo.repo_id);
    }
    let name = src
        .root()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| src.root().display().to_string());
    format!("{name}#{}", files_fingerprint(files))
}

/// An FNV-1a fingerprint of files' sizes and first bytes (the safetensors
/// header, or the first MiB of anything else).
pub fn files_fingerprint(files: &[PathBuf]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    };
    for f in files {
        feed(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        if let Ok(head) = read_head(f) {
            feed(&head);
        }
    }
    format!("{h:016x}")
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut out = len.to_le_bytes().to_vec();
    let mut n = [0u8; 8];
    let take = if f.read_exact(&mut n).is_ok() {
        out.extend_from_slice(&n);
        let header = u64::from_le_bytes(n);
        if header > 0 && 8 + header <= len && header < 100 << 20 {
            header
        } else {
            1 << 20
        }
    } else {
        0
    };
    let mut rest = Vec::new();
    f.take(take).read_to_end(&mut rest)?;
    out.extend_from_slice(&rest);
    Ok(out)
}
