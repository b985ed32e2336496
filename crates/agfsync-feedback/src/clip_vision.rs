//! The CLIP vision transformer (Radford et al., "Learning Transferable Visual
//! Models From Natural Language Supervision", 2021), as transformers'
//! `CLIPVisionModel` / `CLIPVisionModelWithProjection` and the vision half
//! of `CLIPModel` store it.
//!
//! Reference: transformers 5.24 `models/clip/modeling_clip.py`
//! (`CLIPVisionEmbeddings`, `CLIPEncoderLayer`, `CLIPVisionModel`).
//! Tensor names follow the checkpoints:
//! `vision_model.embeddings.patch_embedding.weight` (a bias-free convolution
//! with stride = kernel = patch size), `vision_model.embeddings.class_embedding`,
//! `vision_model.embeddings.position_embedding.weight`,
//! `vision_model.pre_layrnorm` (sic), `vision_model.encoder.layers.N.*`,
//! `vision_model.post_layernorm`, and `visual_projection.weight`.
//! transformers 5 saves a bare `CLIPVisionModel` without the
//! `vision_model.` prefix; both layouts load.
//!
//! The pooled output is `post_layernorm` of the class token; the image
//! embedding is that, projected by `visual_projection`.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Deserializer, Serialize};

use agfsync_models::clip_text::EncoderLayer;
use agfsync_models::nn::{Activation, LayerNorm, Linear, LoraRegistry, Pass};

fn default_hidden() -> usize {
    768
}
fn default_intermediate() -> usize {
    3072
}
fn default_projection() -> usize {
    512
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    32
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

/// transformers 5 allows `image_size` / `patch_size` as an int or a pair;
/// CLIP's embeddings are square, so a pair must hold two equal values.
fn square_size<'de, De: Deserializer<'de>>(d: De) -> std::result::Result<usize, De::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrPair {
        Int(usize),
        Pair(Vec<usize>),
    }
    match IntOrPair::deserialize(d)? {
        IntOrPair::Int(n) => Ok(n),
        IntOrPair::Pair(v) if v.len() == 2 && v[0] == v[1] => Ok(v[0]),
        IntOrPair::Pair(v) => Err(serde::de::Error::custom(format!(
            "CLIP vision models need square sizes, got {v:?}"
        ))),
    }
}

/// The `vision_config` of a CLIP `config.json` (a transformers
/// `CLIPVisionConfig`); defaults are transformers'.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    /// Width of the transformer.
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    /// Width of the MLPs.
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    /// Output width of `visual_projection` for `CLIPVisionModelWithProjection`
    /// (a full `CLIPModel` uses its top-level `projection_dim` instead).
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
    /// Number of transformer layers.
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Input channels (3).
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    /// Input resolution (square).
    #[serde(default = "default_image_size", deserialize_with = "square_size")]
    pub image_size: usize,
    /// Patch size (square).
    #[serde(default = "default_patch", deserialize_with = "square_size")]
    pub patch_size: usize,
    /// `quick_gelu` (OpenAI CLIP) or `gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Epsilon of the layer norms.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        // An empty object takes every serde default.
        Self {
            hidden_size: default_hidden(),
            intermediate_size: default_intermediate(),
            projection_dim: default_projection(),
            num_hidden_layers: default_layers(),
            num_attention_heads: default_heads(),
            num_channels: default_channels(),
            image_size: default_image_size(),
            patch_size: default_patch(),
            hidden_act: default_act(),
            layer_norm_eps: default_eps(),
        }
    }
}

impl ClipVisionConfig {
    /// Reads a config.json; the nested `vision_config` of a full
    /// `CLIPConfig` is accepted too.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        match v.get("vision_config") {
            Some(vc) => serde_json::from_value(vc.clone()),
            None => serde_json::from_value(v),
        }
    }

    /// CLIP ViT-L/14 at 224 px (openai/clip-vit-large-patch14), the model
    /// of the CLIP and aesthetic scores.
    pub fn vit_large_patch14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 768,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            ..Self::default()
        }
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// Output of [`ClipVisionModel::forward`].
#[derive(Clone, Debug)]
pub struct ClipVisionOutput {
    /// Encoder output (no final layer norm): `[b, 1 + patches, hidden]`.
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the class token: `[b, hidden]`.
    pub pooled: Tensor,
    /// `pooled` projected by `visual_projection` (when the model has one):
    /// `[b, projection_dim]`, not normalised.
    pub image_embeds: Option<Tensor>,
}

/// transformers' `CLIPVisionModel` (optionally `WithProjection`).
#[derive(Clone, Debug)]
pub struct ClipVisionModel {
    config: ClipVisionConfig,
    class_embedding: Tensor,
    /// `[hidden, channels * patch * patch]`: the convolution kernel flattened.
    patch_weight: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
    projection_dim: Option<usize>,
    dtype: DType,
}

impl ClipVisionModel {
    /// Builds the model from `vb`, reading `vision_model.*` (or the
    /// unprefixed names of a transformers 5 `CLIPVisionModel`) and, with
    /// `projection = Some(dim)`, `visual_projection.weight` (`[dim, hidden]`).
    pub fn new(cfg: &ClipVisionConfig, projection: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let act = Activation::from_name(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "vision config: unknown hidden_act `{}`",
                cfg.hidden_act
            ))
        })?;
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            candle_core::bail!(
                "vision config: hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        if cfg.patch_size == 0 || cfg.image_size % cfg.patch_size != 0 {
            candle_core::bail!(
                "vision config: image_size {} is not a multiple of patch_size {}",
                cfg.image_size,
                cfg.patch_size
            );
        }
        let vm = if !vb.contains_tensor("vision_model.embeddings.class_embedding")
            && vb.contains_tensor("embeddings.class_embedding")
        {
            vb.clone()
        } else {
            vb.pp("vision_model")
        };
        let d = cfg.hidden_size;
        let p = cfg.patch_size;
        let emb = vm.pp("embeddings");
        let class_embedding = emb.get_with_hints(
            d,
            "class_embedding",
            Init::Randn {
                mean: 0.,
                stdev: 1.,
            },
        )?;
        let patch = emb.pp("patch_embedding").get_with_hints(
            (d, cfg.num_channels, p, p),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let patch_weight = patch.reshape((d, cfg.num_channels * p * p))?;
        let positions = cfg.grid() * cfg.grid() + 1;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (positions, d),
            "weight",
            Init::Randn {
                mean: 0.,
                stdev: 0.1,
            },
        )?;
        // The vision tower takes no adapters; its slots stay empty.
        let lora = LoraRegistry::new();
        let layers = EncoderLayer::stack(
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.layer_norm_eps,
            act,
            vm.pp("encoder.layers"),
            &lora,
        )?;
        let visual_projection = match projection {
            Some(dim) => Some(Linear::new(d, dim, false, vb.pp("visual_projection"))?),
            None => None,
        };
        Ok(Self {
            config: cfg.clone(),
            class_embedding,
            patch_weight,
            position_embedding,
            pre_layrnorm: LayerNorm::new(d, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: LayerNorm::new(d, cfg.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection,
            projection_dim: projection,
            dtype: vb.dtype(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Width of `image_embeds` (`None` without a projection).
    pub fn projection_dim(&self) -> Option<usize> {
        self.projection_dim
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// transformers' `hidden_states[index]` of `pixel_values`: index 0 is
    /// the embeddings after `pre_layrnorm`, index k the output of layer k
    /// (`[b, 1 + patches, hidden]`, class token first). Only the first
    /// `index` layers run: LLaVA reads the second-to-last layer and never
    /// needs the last.
    pub fn hidden_state(&self, pixel_values: &Tensor, index: usize, pass: Pass) -> Result<Tensor> {
        if index > self.layers.len() {
            candle_core::bail!(
                "vision tower: hidden state {index} asked of a {}-layer encoder",
                self.layers.len()
            );
        }
        let (b, c, h, w) = pixel_values.dims4()?;
        let cfg = &self.config;
        if h != cfg.image_size || w != cfg.image_size || c != cfg.num_channels {
            candle_core::bail!(
                "input image size ({c}x{h}x{w}) doesn't match the model ({}x{}x{}): check \
                 preprocessor_config.json (crop_size) against the vision config (image_size)",
                cfg.num_channels,
                cfg.image_size,
                cfg.image_size
            );
        }
        let p = cfg.patch_size;
        let g = cfg.grid();
        let x = pixel_values.to_dtype(self.dtype)?;
        // The stride-p, kernel-p convolution as one matrix product over
        // flattened patches (same sums as the convolution).
        let patches = x
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * g * g, c * p * p))?;
        let patch_embeds = patches
            .matmul(&pass.weight(&self.patch_weight).t()?)?
            .reshape((b, g * g, cfg.hidden_size))?;
        let cls = pass
            .weight(&self.class_embedding)
            .reshape((1, 1, cfg.hidden_size))?
            .broadcast_as((b, 1, cfg.hidden_size))?;
        let x = Tensor::cat(&[&cls, &patch_embeds], 1)?;
        let mut x = x.broadcast_add(&pass.weight(&self.position_embedding))?;
        x = self.pre_layrnorm.forward(&x, pass)?;
        for layer in &self.layers[..index] {
            x = layer.forward(&x, None, pass)?;
        }
        Ok(x)
    }

    /// Encodes `pixel_values` (`[b, channels, image_size, image_size]`, as
    /// `CLIPImageProcessor` makes them).
    pub fn forward(&self, pixel_values: &Tensor, pass: Pass) -> Result<ClipVisionOutput> {
        let x = self.hidden_state(pixel_values, self.layers.len(), pass)?;
        let pooled = self
            .post_layernorm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?, pass)?;
        let image_embeds = match &self.visual_projection {
            Some(proj) => Some(proj.forward(&pooled, pass)?),
            None => None,
        };
        Ok(ClipVisionOutput {
            last_hidden_state: x,
            pooled,
            image_embeds,
        })
    }
}
