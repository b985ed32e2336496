//! An OpenCLIP model (Cherti et al., "Reproducible scaling laws for
//! contrastive language-image learning", 2023; the CLIP architecture of
//! Radford et al., 2021) in open_clip's own checkpoint layout: the backbone
//! of HPSv2, whose checkpoints (`HPS_v2_compressed.pt`,
//! `HPS_v2.1_compressed.pt`) are fine-tuned OpenCLIP ViT-H/14 state dicts.
//!
//! Reference: open_clip 2.x `model.py` (`CLIP`, `encode_image`,
//! `encode_text`) and `transformer.py` (`VisionTransformer`,
//! `ResidualAttentionBlock`), as vendored by the `hpsv2` package
//! (`hpsv2/src/open_clip`). Tensor names are open_clip's:
//!
//! * vision: `visual.conv1.weight` (a bias-free stride = kernel = patch
//!   convolution), `visual.class_embedding`, `visual.positional_embedding`,
//!   `visual.ln_pre`, `visual.transformer.resblocks.N.*`, `visual.ln_post`,
//!   `visual.proj` (`[width, embed_dim]`, applied as `x @ proj`);
//! * text: `token_embedding.weight`, `positional_embedding`,
//!   `transformer.resblocks.N.*`, `ln_final`, `text_projection`
//!   (`[width, embed_dim]`, `x @ text_projection`), `logit_scale`;
//! * a residual block: `ln_1`, `attn.in_proj_weight` / `attn.in_proj_bias`
//!   (q, k and v fused, as `nn.MultiheadAttention` stores them),
//!   `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`.
//!
//! The image embedding is `ln_post` of the class token times `proj`; the
//! text embedding is `ln_final` of the hidden state at the *highest token
//! id* (open_clip's `text.argmax(dim=-1)`: the end-of-text token, id 49407,
//! is the largest id of CLIP's vocabulary) times `text_projection`, with a
//! causal mask in the text tower. Activation: exact (erf) GELU, unless the
//! config says `quick_gelu` (OpenAI-trained weights).
//!
//! The architecture comes from an open_clip model config (the JSON files of
//! `open_clip/model_configs/`, e.g. `ViT-H-14.json`) or, without one, from
//! the checkpoint's tensor shapes ([`OpenClipConfig::infer`]), so a tiny
//! random checkpoint loads through the same path as the real one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Deserializer, Serialize};

use agfsync_models::nn::{attention, merge_heads, split_heads, Activation, LayerNorm, Pass};
use agfsync_models::weights::open_safetensors;

use crate::error::{FeedbackError, Result};
use crate::pth::{looks_like_pth, read_pth_state_dict};

/// open_clip's `image_size`: an int or a square `[h, w]` pair.
fn square<'de, De: Deserializer<'de>>(d: De) -> std::result::Result<usize, De::Error> {
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
            "only square image sizes are supported, got {v:?}"
        ))),
    }
}

/// open_clip's `vision_cfg` (`CLIPVisionCfg`) for a ViT; defaults are
/// ViT-H-14's (`open_clip/model_configs/ViT-H-14.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenClipVisionConfig {
    /// Input resolution (square).
    #[serde(deserialize_with = "square")]
    pub image_size: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Transformer width.
    pub width: usize,
    /// Width of one attention head (heads = width / head_width).
    pub head_width: usize,
    /// MLP width = width * mlp_ratio.
    pub mlp_ratio: f64,
    /// Patch size (square).
    pub patch_size: usize,
}

impl Default for OpenClipVisionConfig {
    fn default() -> Self {
        Self {
            image_size: 224,
            layers: 32,
            width: 1280,
            head_width: 80,
            mlp_ratio: 4.0,
            patch_size: 14,
        }
    }
}

impl OpenClipVisionConfig {
    /// Attention heads.
    pub fn heads(&self) -> usize {
        self.width / self.head_width.max(1)
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }
}

/// open_clip's `text_cfg` (`CLIPTextCfg`); defaults are ViT-H-14's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenClipTextConfig {
    /// Token positions (77).
    pub context_length: usize,
    /// Vocabulary size (49408).
    pub vocab_size: usize,
    /// Transformer width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer layers.
    pub layers: usize,
    /// MLP width = width * mlp_ratio.
    pub mlp_ratio: f64,
}

impl Default for OpenClipTextConfig {
    fn default() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 1024,
            heads: 16,
            layers: 24,
            mlp_ratio: 4.0,
        }
    }
}

/// An open_clip model config (`model_configs/ViT-H-14.json` and the like);
/// defaults are ViT-H-14's, the HPSv2 backbone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OpenClipConfig {
    /// Width of both projections.
    pub embed_dim: usize,
    /// `x * sigmoid(1.702 x)` instead of GELU (OpenAI-trained weights).
    pub quick_gelu: bool,
    /// The vision tower.
    pub vision_cfg: OpenClipVisionConfig,
    /// The text tower.
    pub text_cfg: OpenClipTextConfig,
}

impl Default for OpenClipConfig {
    fn default() -> Self {
        Self::vit_h_14()
    }
}

/// The `N` of `{prefix}N.` keys, counted (the number of residual blocks).
fn count_blocks(shapes: &HashMap<String, Vec<usize>>, prefix: &str) -> usize {
    shapes
        .keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1)
}

impl OpenClipConfig {
    /// OpenCLIP ViT-H/14 (`ViT-H-14.json`): the HPSv2 backbone.
    pub fn vit_h_14() -> Self {
        Self {
            embed_dim: 1024,
            quick_gelu: false,
            vision_cfg: OpenClipVisionConfig::default(),
            text_cfg: OpenClipTextConfig::default(),
        }
    }

    /// Parses an open_clip model config. Only ViT vision towers with the
    /// built-in text transformer are supported (no timm or Hugging Face
    /// towers, no layer scale, no attentional pooling).
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        for (tower, keys) in [
            (
                "vision_cfg",
                &[
                    "timm_model_name",
                    "ls_init_value",
                    "attentional_pool",
                    "global_average_pool",
                    "input_patchnorm",
                ][..],
            ),
            ("text_cfg", &["hf_model_name", "ls_init_value"][..]),
        ] {
            for k in keys {
                match v.get(tower).and_then(|t| t.get(k)) {
                    None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {
                    }
                    Some(other) => {
                        return Err(format!(
                            "{tower}.{k} = {other} is not supported (agfsync builds ViT towers \
                             with open_clip's own text transformer, as HPSv2 uses)"
                        ))
                    }
                }
            }
        }
        if let Some(layers) = v.get("vision_cfg").and_then(|t| t.get("layers")) {
            if !layers.is_u64() {
                return Err(format!(
                    "vision_cfg.layers = {layers}: ResNet towers are not supported"
                ));
            }
        }
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    /// Infers the architecture from a state dict's tensor shapes (names
    /// without any `module.`/`state_dict.` prefix). Head counts cannot be
    /// read from shapes: heads of 64 channels are assumed (open_clip's
    /// default `head_width`), except for a 1280-wide vision tower, which is
    /// ViT-H-14's with 80-channel heads. Pass a config when that is wrong.
    pub fn infer(shapes: &HashMap<String, Vec<usize>>) -> std::result::Result<Self, String> {
        let get = |k: &str, n: usize| -> std::result::Result<&[usize], String> {
            match shapes.get(k) {
                Some(s) if s.len() == n => Ok(s.as_slice()),
                Some(s) => Err(format!("`{k}` has shape {s:?}, expected {n} dimensions")),
                None => Err(format!(
                    "missing `{k}`: not an open_clip CLIP state dict (ViT towers)"
                )),
            }
        };
        let conv = get("visual.conv1.weight", 4)?;
        let (vw, patch) = (conv[0], conv[2]);
        let vpos = get("visual.positional_embedding", 2)?[0];
        let grid = (((vpos.saturating_sub(1)) as f64).sqrt()).round() as usize;
        if grid * grid + 1 != vpos {
            return Err(format!(
                "`visual.positional_embedding` has {vpos} rows, not 1 + a square number of patches"
            ));
        }
        let embed_dim = get("visual.proj", 2)?[1];
        let v_mlp = get("visual.transformer.resblocks.0.mlp.c_fc.weight", 2)?[0];
        let tok = get("token_embedding.weight", 2)?;
        let (vocab, tw) = (tok[0], tok[1]);
        let ctx = get("positional_embedding", 2)?[0];
        let t_mlp = get("transformer.resblocks.0.mlp.c_fc.weight", 2)?[0];
        let head_width = if vw == 1280 { 80 } else { 64.min(vw) };
        let text_heads = (tw / 64).max(1);
        Ok(Self {
            embed_dim,
            quick_gelu: false,
            vision_cfg: OpenClipVisionConfig {
                image_size: grid * patch,
                layers: count_blocks(shapes, "visual.transformer.resblocks."),
                width: vw,
                head_width,
                mlp_ratio: v_mlp as f64 / vw.max(1) as f64,
                patch_size: patch,
            },
            text_cfg: OpenClipTextConfig {
                context_length: ctx,
                vocab_size: vocab,
                width: tw,
                heads: text_heads,
                layers: count_blocks(shapes, "transformer.resblocks."),
                mlp_ratio: t_mlp as f64 / tw.max(1) as f64,
            },
        })
    }

    fn activation(&self) -> Activation {
        if self.quick_gelu {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        }
    }

    fn check(&self) -> candle_core::Result<()> {
        let v = &self.vision_cfg;
        let t = &self.text_cfg;
        if v.head_width == 0 || v.width % v.head_width != 0 {
            candle_core::bail!(
                "vision_cfg: width {} is not a multiple of head_width {}",
                v.width,
                v.head_width
            );
        }
        if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
            candle_core::bail!(
                "vision_cfg: image_size {} is not a multiple of patch_size {}",
                v.image_size,
                v.patch_size
            );
        }
        if t.heads == 0 || t.width % t.heads != 0 {
            candle_core::bail!(
                "text_cfg: width {} is not a multiple of heads {}",
                t.width,
                t.heads
            );
        }
        Ok(())
    }
}

/// `x @ w^T + b` over the last dimension of `x` (`[..., in]`).
fn affine(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = dims[dims.len() - 1];
    let rows = x.elem_count() / inp.max(1);
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = w.dim(0)?;
    let y = x.reshape((rows, inp))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    y.reshape(out_dims.as_slice())
}

/// A `torch.nn.Linear` as open_clip names it (`weight`, `bias`).
#[derive(Clone, Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(inp: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(
                (out, inp),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_UNIFORM,
            )?,
            bias: vb.get_with_hints(out, "bias", Init::Uniform { lo: -0.1, up: 0.1 })?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        affine(x, &self.weight, Some(&self.bias))
    }
}

/// open_clip's `ResidualAttentionBlock`: pre-norm self-attention
/// (`nn.MultiheadAttention` with fused q/k/v) and a GELU MLP.
#[derive(Clone, Debug)]
struct ResidualBlock {
    ln_1: LayerNorm,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: Dense,
    ln_2: LayerNorm,
    c_fc: Dense,
    c_proj: Dense,
    heads: usize,
    act: Activation,
}

impl ResidualBlock {
    fn new(
        width: usize,
        mlp: usize,
        heads: usize,
        act: Activation,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let a = vb.pp("attn");
        Ok(Self {
            ln_1: LayerNorm::new(width, 1e-5, vb.pp("ln_1"))?,
            in_proj_weight: a.get_with_hints(
                (3 * width, width),
                "in_proj_weight",
                candle_nn::init::DEFAULT_KAIMING_UNIFORM,
            )?,
            in_proj_bias: a.get_with_hints(
                3 * width,
                "in_proj_bias",
                Init::Uniform { lo: -0.1, up: 0.1 },
            )?,
            out_proj: Dense::new(width, width, a.pp("out_proj"))?,
            ln_2: LayerNorm::new(width, 1e-5, vb.pp("ln_2"))?,
            c_fc: Dense::new(width, mlp, vb.pp("mlp.c_fc"))?,
            c_proj: Dense::new(mlp, width, vb.pp("mlp.c_proj"))?,
            heads,
            act,
        })
    }

    /// `[b, n, d]` -> `[b, n, d]`; `mask` is added to the attention scores.
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let pass = Pass::INFERENCE;
        let d = x.dim(D::Minus1)?;
        let h = self.ln_1.forward(x, pass)?;
        let qkv = affine(&h, &self.in_proj_weight, Some(&self.in_proj_bias))?;
        let q = split_heads(&qkv.narrow(D::Minus1, 0, d)?, self.heads)?;
        let k = split_heads(&qkv.narrow(D::Minus1, d, d)?, self.heads)?;
        let v = split_heads(&qkv.narrow(D::Minus1, 2 * d, d)?, self.heads)?;
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let o = attention(&q, &k, &v, scale, mask, false, pass)?;
        let x = (x + self.out_proj.forward(&merge_heads(&o, self.heads)?)?)?;
        let h = self.ln_2.forward(&x, pass)?;
        let h = self.act.forward(&self.c_fc.forward(&h)?)?;
        x + self.c_proj.forward(&h)?
    }
}

fn blocks(
    n: usize,
    width: usize,
    mlp: usize,
    heads: usize,
    act: Activation,
    vb: VarBuilder,
) -> candle_core::Result<Vec<ResidualBlock>> {
    (0..n)
        .map(|i| ResidualBlock::new(width, mlp, heads, act, vb.pp(i)))
        .collect()
}

/// open_clip's `VisionTransformer` (class-token pooling, no patch dropout).
#[derive(Clone, Debug)]
struct VisionTower {
    cfg: OpenClipVisionConfig,
    /// `[width, 3 * patch * patch]`: `conv1.weight` flattened.
    patch_weight: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResidualBlock>,
    ln_post: LayerNorm,
    proj: Tensor,
}

impl VisionTower {
    fn new(cfg: &OpenClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let v = &cfg.vision_cfg;
        let (w, p) = (v.width, v.patch_size);
        let conv = vb.get_with_hints(
            (w, 3, p, p),
            "conv1.weight",
            candle_nn::init::DEFAULT_KAIMING_UNIFORM,
        )?;
        let randn = |stdev| Init::Randn { mean: 0., stdev };
        let mlp = (w as f64 * v.mlp_ratio) as usize;
        Ok(Self {
            cfg: v.clone(),
            patch_weight: conv.reshape((w, 3 * p * p))?,
            class_embedding: vb.get_with_hints(w, "class_embedding", randn(0.5))?,
            positional_embedding: vb.get_with_hints(
                (v.grid() * v.grid() + 1, w),
                "positional_embedding",
                randn(0.1),
            )?,
            ln_pre: LayerNorm::new(w, 1e-5, vb.pp("ln_pre"))?,
            blocks: blocks(
                v.layers,
                w,
                mlp,
                v.heads(),
                cfg.activation(),
                vb.pp("transformer.resblocks"),
            )?,
            ln_post: LayerNorm::new(w, 1e-5, vb.pp("ln_post"))?,
            proj: vb.get_with_hints((w, cfg.embed_dim), "proj", randn(0.2))?,
        })
    }

    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let s = self.cfg.image_size;
        if c != 3 || h != s || w != s {
            candle_core::bail!(
                "the vision tower takes [b, 3, {s}, {s}] pixels, got [{b}, {c}, {h}, {w}]"
            );
        }
        let (p, g, d) = (self.cfg.patch_size, self.cfg.grid(), self.cfg.width);
        // The stride-p, kernel-p convolution as one product over flattened
        // patches (the same sums).
        let patches = pixels
            .to_dtype(self.patch_weight.dtype())?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * g * g, c * p * p))?;
        let x = patches
            .matmul(&self.patch_weight.t()?)?
            .reshape((b, g * g, d))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.positional_embedding)?;
        x = self.ln_pre.forward(&x, Pass::INFERENCE)?;
        for blk in &self.blocks {
            x = blk.forward(&x, None)?;
        }
        let pooled = self
            .ln_post
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?, Pass::INFERENCE)?;
        pooled.matmul(&self.proj)
    }
}

/// open_clip's text transformer (the `CLIP` class's own text tower).
#[derive(Clone, Debug)]
struct TextTower {
    cfg: OpenClipTextConfig,
    token_embedding: Tensor,
    positional_embedding: Tensor,
    blocks: Vec<ResidualBlock>,
    ln_final: LayerNorm,
    text_projection: Tensor,
    mask: Tensor,
}

impl TextTower {
    fn new(cfg: &OpenClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let t = &cfg.text_cfg;
        let w = t.width;
        let randn = |stdev| Init::Randn { mean: 0., stdev };
        let mlp = (w as f64 * t.mlp_ratio) as usize;
        let n = t.context_length;
        // open_clip's build_attention_mask: -inf above the diagonal.
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            cfg: t.clone(),
            token_embedding: vb.get_with_hints(
                (t.vocab_size, w),
                "token_embedding.weight",
                randn(0.5),
            )?,
            positional_embedding: vb.get_with_hints((n, w), "positional_embedding", randn(0.1))?,
            blocks: blocks(
                t.layers,
                w,
                mlp,
                t.heads,
                cfg.activation(),
                vb.pp("transformer.resblocks"),
            )?,
            ln_final: LayerNorm::new(w, 1e-5, vb.pp("ln_final"))?,
            text_projection: vb.get_with_hints(
                (w, cfg.embed_dim),
                "text_projection",
                randn(0.2),
            )?,
            mask: Tensor::from_vec(mask, (n, n), vb.device())?.to_dtype(vb.dtype())?,
        })
    }

    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n) = ids.dims2()?;
        if n != self.cfg.context_length {
            candle_core::bail!(
                "the text tower takes {} tokens per prompt, got {n}",
                self.cfg.context_length
            );
        }
        let ids = ids.to_dtype(DType::U32)?;
        let rows: Vec<Vec<u32>> = ids.to_device(&Device::Cpu)?.to_vec2()?;
        if let Some(&bad) = rows
            .iter()
            .flatten()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            candle_core::bail!(
                "token id {bad} is outside the text tower's vocabulary of {} (tokenizer and model do not match)",
                self.cfg.vocab_size
            );
        }
        let mut x = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, n, ()))?
            .broadcast_add(&self.positional_embedding)?;
        for blk in &self.blocks {
            x = blk.forward(&x, Some(&self.mask))?;
        }
        let x = self.ln_final.forward(&x, Pass::INFERENCE)?;
        // open_clip pools at text.argmax(-1): the first position of the
        // highest id, which is the end-of-text token.
        let picked = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut best = 0;
                for (j, &t) in r.iter().enumerate() {
                    if t > r[best] {
                        best = j;
                    }
                }
                x.get(i)?.get(best)?.unsqueeze(0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&picked, 0)?.matmul(&self.text_projection)
    }
}

/// An open_clip `CLIP` model (ViT vision tower, open_clip text tower).
#[derive(Clone, Debug)]
pub struct OpenClipModel {
    config: OpenClipConfig,
    visual: VisionTower,
    text: TextTower,
    logit_scale: f32,
    device: Device,
}

impl OpenClipModel {
    /// Builds the model from `vb`, whose names are open_clip's state-dict
    /// keys (`visual.conv1.weight`, ..., `logit_scale`).
    pub fn new(cfg: &OpenClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.check()?;
        let visual = VisionTower::new(cfg, vb.pp("visual"))?;
        let text = TextTower::new(cfg, vb.clone())?;
        // ln(1 / 0.07), open_clip's initial value, for random models.
        let logit_scale = vb
            .get_with_hints((), "logit_scale", Init::Const(2.659_260_036_932_778))?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        Ok(Self {
            config: cfg.clone(),
            visual,
            text,
            logit_scale,
            device: vb.device().clone(),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &OpenClipConfig {
        &self.config
    }

    /// `logit_scale` as stored (HPSv2 scores do not use it).
    pub fn logit_scale(&self) -> f32 {
        self.logit_scale
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `encode_image`: projected, unnormalised embeddings (`[b, embed_dim]`,
    /// f32) of preprocessed pixels (`[b, 3, image_size, image_size]`).
    pub fn encode_image(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        self.visual
            .forward(&pixels.to_device(&self.device)?)?
            .to_dtype(DType::F32)
    }

    /// `encode_text`: projected, unnormalised embeddings (`[b, embed_dim]`,
    /// f32) of token ids (`[b, context_length]`, padded with 0).
    pub fn encode_text(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.text
            .forward(&ids.to_device(&self.device)?)?
            .to_dtype(DType::F32)
    }
}

/// Prefixes open_clip checkpoints are found under: bare, a training
/// checkpoint's `state_dict`, a `DistributedDataParallel` `module.`.
const PREFIXES: [&str; 4] = ["", "module.", "state_dict.", "state_dict.module."];

/// Reads the tensor shapes of a safetensors file from its header (nothing
/// else is read).
fn safetensors_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    use std::io::Read;
    let err = |reason: String| FeedbackError::Weights {
        path: path.to_path_buf(),
        reason,
    };
    let io = |source| FeedbackError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        err(format!(
            "neither a torch checkpoint (zip) nor a safetensors file: {len} bytes"
        ))
    })?;
    let header_len = u64::from_le_bytes(n);
    if header_len > 100 << 20 || 8 + header_len > len {
        return Err(err(
            "neither a torch checkpoint (zip) nor a safetensors file (bad header length)".into(),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let v: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| err(format!("the safetensors header is not valid JSON: {e}")))?;
    let mut out = HashMap::new();
    if let Some(map) = v.as_object() {
        for (name, info) in map {
            if name == "__metadata__" {
                continue;
            }
            let shape = info
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|s| {
                    s.iter()
                        .filter_map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .ok_or_else(|| err(format!("tensor `{name}` has no shape in the header")))?;
            out.insert(name.clone(), shape);
        }
    }
    Ok(out)
}

/// An open_clip checkpoint opened for building: tensor shapes (prefix
/// removed) and a [`VarBuilder`] over the unprefixed names.
pub struct OpenClipCheckpoint {
    /// The file.
    pub path: PathBuf,
    /// Tensor shapes by open_clip name.
    pub shapes: HashMap<String, Vec<usize>>,
    /// Tensors by open_clip name (prefix removed).
    pub vb: VarBuilder<'static>,
    /// The prefix the names had in the file (`""`, `module.`, ...).
    pub prefix: &'static str,
}

impl std::fmt::Debug for OpenClipCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClipCheckpoint")
            .field("path", &self.path)
            .field("tensors", &self.shapes.len())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl OpenClipCheckpoint {
    /// Opens a `.safetensors` file (memory-mapped) or a torch `.pt`/`.pth`
    /// (read safely, see [`crate::pth`]; `{'state_dict': ...}` unwrapped),
    /// told apart by content. Keys may carry a `module.` or `state_dict.`
    /// prefix.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let err = |reason: String| FeedbackError::Weights {
            path: path.to_path_buf(),
            reason,
        };
        if let Err(source) = std::fs::metadata(path) {
            return Err(FeedbackError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        let pth = looks_like_pth(path);
        let (raw_shapes, tensors) = if pth {
            let tensors: HashMap<String, Tensor> = read_pth_state_dict(path)?.into_iter().collect();
            let shapes = tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            (shapes, Some(tensors))
        } else {
            (safetensors_shapes(path)?, None)
        };
        let prefix = PREFIXES
            .iter()
            .copied()
            .find(|p| raw_shapes.contains_key(&format!("{p}visual.conv1.weight")))
            .ok_or_else(|| {
                let mut keys: Vec<&String> = raw_shapes.keys().collect();
                keys.sort();
                keys.truncate(8);
                err(format!(
                    "missing `visual.conv1.weight`: not an open_clip CLIP checkpoint with a ViT \
                     vision tower (HPSv2's layout); first keys: {keys:?}"
                ))
            })?;
        let shapes: HashMap<String, Vec<usize>> = raw_shapes
            .into_iter()
            .filter_map(|(k, s)| Some((k.strip_prefix(prefix)?.to_string(), s)))
            .collect();
        let vb = match tensors {
            Some(t) => {
                let t = t
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v)))
                    .collect();
                VarBuilder::from_tensors(t, dtype, device)
            }
            None => {
                let mut vb = open_safetensors(&[path.to_path_buf()], dtype, device)?;
                for seg in prefix.split('.').filter(|s| !s.is_empty()) {
                    vb = vb.pp(seg);
                }
                vb
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            shapes,
            vb,
            prefix,
        })
    }

    /// Builds the model: with `config`, that architecture (every tensor's
    /// shape checked against it); without, the one the shapes imply.
    pub fn build(&self, config: Option<&OpenClipConfig>) -> Result<OpenClipModel> {
        let err = |reason: String| FeedbackError::Weights {
            path: self.path.clone(),
            reason,
        };
        let cfg = match config {
            Some(c) => c.clone(),
            None => OpenClipConfig::infer(&self.shapes).map_err(&err)?,
        };
        OpenClipModel::new(&cfg, self.vb.clone()).map_err(|e| {
            err(format!(
                "{e} (architecture: vision width {} x {} layers, patch {}, image {}; text width {} x {} layers; embed_dim {})",
                cfg.vision_cfg.width,
                cfg.vision_cfg.layers,
                cfg.vision_cfg.patch_size,
                cfg.vision_cfg.image_size,
                cfg.text_cfg.width,
                cfg.text_cfg.layers,
                cfg.embed_dim
            ))
        })
    }
}

/// Reads an open_clip model config file.
pub fn read_open_clip_config(path: &Path) -> Result<OpenClipConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| FeedbackError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    OpenClipConfig::from_json(&text).map_err(|reason| FeedbackError::Config {
        path: path.to_path_buf(),
        what: "open_clip model config",
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// open_clip's `model_configs/ViT-H-14.json`, verbatim.
    const VIT_H_14_JSON: &str = r#"{
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}
    }"#;

    /// The shapes infer() reads, as an open_clip state dict of `cfg` has them.
    fn shapes_of(cfg: &OpenClipConfig) -> HashMap<String, Vec<usize>> {
        let v = &cfg.vision_cfg;
        let t = &cfg.text_cfg;
        let vm = (v.width as f64 * v.mlp_ratio) as usize;
        let tm = (t.width as f64 * t.mlp_ratio) as usize;
        let mut s: HashMap<String, Vec<usize>> = [
            (
                "visual.conv1.weight",
                vec![v.width, 3, v.patch_size, v.patch_size],
            ),
            (
                "visual.positional_embedding",
                vec![v.grid() * v.grid() + 1, v.width],
            ),
            ("visual.proj", vec![v.width, cfg.embed_dim]),
            ("token_embedding.weight", vec![t.vocab_size, t.width]),
            ("positional_embedding", vec![t.context_length, t.width]),
        ]
        .into_iter()
        .map(|(k, s)| (k.to_string(), s))
        .collect();
        for i in 0..v.layers {
            s.insert(
                format!("visual.transformer.resblocks.{i}.mlp.c_fc.weight"),
                vec![vm, v.width],
            );
        }
        for i in 0..t.layers {
            s.insert(
                format!("transformer.resblocks.{i}.mlp.c_fc.weight"),
                vec![tm, t.width],
            );
        }
        s
    }

    #[test]
    fn vit_h_14_config_parses_and_is_inferred_from_shapes() -> std::result::Result<(), String> {
        let parsed = OpenClipConfig::from_json(VIT_H_14_JSON)?;
        assert_eq!(parsed, OpenClipConfig::vit_h_14());
        assert_eq!(parsed.vision_cfg.heads(), 16);
        assert_eq!(OpenClipConfig::infer(&shapes_of(&parsed))?, parsed);
        Ok(())
    }

    #[test]
    fn unsupported_towers_are_refused() {
        let e = OpenClipConfig::from_json(r#"{"vision_cfg": {"timm_model_name": "vit_base"}}"#);
        assert!(e.is_err_and(|m| m.contains("timm_model_name")));
        let e = OpenClipConfig::from_json(r#"{"vision_cfg": {"layers": [3, 4, 6, 3]}}"#);
        assert!(e.is_err_and(|m| m.contains("ResNet")));
        let e = OpenClipConfig::from_json(r#"{"vision_cfg": {"image_size": [224, 192]}}"#);
        assert!(e.is_err_and(|m| m.contains("square")));
    }
}
