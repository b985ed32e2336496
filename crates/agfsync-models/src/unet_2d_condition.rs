//! The conditional UNet of Stable Diffusion (1.x, 2.x and the SDXL layout),
//! configured from a diffusers `unet/config.json`.
//!
//! References: Rombach et al., "High-Resolution Image Synthesis with Latent
//! Diffusion Models" (CVPR 2022); Podell et al., "SDXL" (2023); the layout and
//! tensor names are those of diffusers' `UNet2DConditionModel`, so checkpoints
//! saved by diffusers load as they are.
//!
//! Unlike candle-transformers' SD UNet, this one takes one timestep per sample,
//! has a differentiable training pass (see [`Pass`]), LoRA slots on every
//! attention projection (`to_q`, `to_k`, `to_v`, `to_out.0`) and SDXL's
//! micro-conditioning (`addition_embed_type = "text_time"`).

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::grad_checkpoint::{Direct, Exec, Tape};
use crate::nn::{
    attention, merge_heads, split_heads, upsample_nearest2d, Activation, Conv2d, GroupNorm,
    LayerNorm, Linear, LoraRegistry, Pass,
};

/// A config value that diffusers allows either as one number for every block
/// or as a list with one entry per block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block.
    List(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// Expands to one value per block; errors when a list has the wrong length.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v.clone(); n]),
            Self::List(v) if v.len() == n => Ok(v.clone()),
            Self::List(v) => candle_core::bail!(
                "unet config: `{field}` has {} entries but there are {n} down blocks",
                v.len()
            ),
        }
    }
}

fn default_sample_size() -> usize {
    64
}
fn default_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_one() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_cross_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "silu".into()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_one_usize() -> usize {
    1
}
fn default_down_blocks() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up_blocks() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}

/// `unet/config.json` as diffusers writes it. Defaults are diffusers' own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Latent height and width the model was trained at.
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
    /// Latent channels in.
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Channels out (epsilon or v prediction).
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    /// Computes `2 * sample - 1` first (unused by SD, kept for completeness).
    #[serde(default)]
    pub center_input_sample: bool,
    /// Swap sin and cos halves of the timestep embedding (true for SD).
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding (0 for SD).
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block types: `CrossAttnDownBlock2D` or `DownBlock2D`.
    #[serde(default = "default_down_blocks")]
    pub down_block_types: Vec<String>,
    /// Mid block type: `UNetMidBlock2DCrossAttn` or none.
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    /// Up block types: `CrossAttnUpBlock2D` or `UpBlock2D`.
    #[serde(default = "default_up_blocks")]
    pub up_block_types: Vec<String>,
    /// Output channels of each down block.
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    /// ResNet layers per down block (up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions.
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    /// Activation of the ResNet blocks and time embedding.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Groups of every GroupNorm.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Epsilon of the ResNet GroupNorms.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Width of the text conditioning.
    #[serde(default = "default_cross_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks inside each attention (SDXL uses 1, 2, 10).
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Per up block transformer depth, when not the reverse of the down blocks.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    /// Despite its name, diffusers uses this as the number of attention heads
    /// when `num_attention_heads` is absent (SD 1.x: 8; SD 2.x: [5, 10, 20, 20]).
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// Number of attention heads, when given explicitly.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Linear (true, SD 2.x/XL) or 1x1 convolution (false, SD 1.x) projections
    /// into and out of the transformer.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Compute attention scores in f32 (SD 2.1).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Only `default` is supported.
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    /// Only `positional` is supported.
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    /// `text_time` for SDXL's micro-conditioning, else none.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each SDXL time-id embedding (256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding` (SDXL: 2816 = 1280 + 6 * 256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Class conditioning: unsupported, must be null.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Unsupported when true.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Unsupported when true.
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
}

impl UNet2DConditionConfig {
    /// Reads `config.json` (any unknown fields are ignored).
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// Checks the options this implementation does not support.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            candle_core::bail!("unet config: block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            candle_core::bail!(
                "unet config: {} down blocks and {} up blocks, but {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                candle_core::bail!("unet config: unsupported down block type `{t}`");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                candle_core::bail!("unet config: unsupported up block type `{t}`");
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                candle_core::bail!("unet config: unsupported mid block type `{m}`");
            }
        }
        if self.class_embed_type.is_some() {
            candle_core::bail!("unet config: class_embed_type is not supported");
        }
        if self.dual_cross_attention || self.only_cross_attention == serde_json::Value::Bool(true) {
            candle_core::bail!(
                "unet config: dual_cross_attention / only_cross_attention are not supported"
            );
        }
        if let Some(s) = &self.resnet_time_scale_shift {
            if s != "default" {
                candle_core::bail!("unet config: resnet_time_scale_shift `{s}` is not supported");
            }
        }
        if let Some(t) = &self.time_embedding_type {
            if t != "positional" {
                candle_core::bail!("unet config: time_embedding_type `{t}` is not supported");
            }
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                candle_core::bail!(
                    "unet config: addition_embed_type `text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim"
                );
            }
            Some("text_time") => {}
            Some(t) => {
                candle_core::bail!("unet config: addition_embed_type `{t}` is not supported")
            }
        }
        if Activation::from_name(&self.act_fn).is_none() {
            candle_core::bail!("unet config: unknown act_fn `{}`", self.act_fn);
        }
        Ok(())
    }

    /// Downscaling factor between the input latent and the deepest feature map.
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }
}

/// Sinusoidal embedding of (possibly fractional) timesteps, as diffusers'
/// `get_timestep_embedding`: `[b] -> [b, dim]`, computed in f32.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
) -> Result<Tensor> {
    let device = timesteps.device();
    let half = dim / 2;
    let t = timesteps.to_dtype(DType::F32)?;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            // diffusers computes the exponent in f32: match it operation by operation.
            let exponent = (-(10000f64.ln()) as f32) * i as f32;
            (exponent / (half as f32 - downscale_freq_shift as f32)).exp()
        })
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), device)?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `TimestepEmbedding`: linear, activation, linear.
#[derive(Clone, Debug)]
struct TimestepMlp {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepMlp {
    fn new(in_dim: usize, dim: usize, act: Activation, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(in_dim, dim, true, vb.pp("linear_1"))?,
            linear_2: Linear::new(dim, dim, true, vb.pp("linear_2"))?,
            act,
        })
    }
    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let x = self.act.forward(&self.linear_1.forward(x, pass)?)?;
        self.linear_2.forward(&x, pass)
    }
}

/// diffusers' `ResnetBlock2D`.
#[derive(Clone, Debug)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
}

impl ResnetBlock2D {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        in_c: usize,
        out_c: usize,
        temb_c: Option<usize>,
        groups: usize,
        eps: f64,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        let time_emb_proj = match temb_c {
            Some(t) => Some(Linear::new(t, out_c, true, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if in_c != out_c {
            Some(Conv2d::new(in_c, out_c, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(groups, in_c, eps, vb.pp("norm1"))?,
            conv1: Conv2d::new(in_c, out_c, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: GroupNorm::new(groups, out_c, eps, vb.pp("norm2"))?,
            conv2: Conv2d::new(out_c, out_c, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, temb: Option<&Tensor>, pass: Pass) -> Result<Tensor> {
        let h = self.norm1.forward_act(x, self.act, pass)?;
        let mut h = self.conv1.forward(&h, pass)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&self.act.forward(temb)?, pass)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.norm2.forward_act(&h, self.act, pass)?;
        let h = self.conv2.forward(&h, pass)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x, pass)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// diffusers' `Attention` as used by the UNet's transformer blocks.
#[derive(Clone, Debug)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl CrossAttention {
    fn new(
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
        vb: VarBuilder,
        lora: &LoraRegistry,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::new_lora(query_dim, inner, false, vb.pp("to_q"), lora)?,
            to_k: Linear::new_lora(context_dim, inner, false, vb.pp("to_k"), lora)?,
            to_v: Linear::new_lora(context_dim, inner, false, vb.pp("to_v"), lora)?,
            to_out: Linear::new_lora(inner, query_dim, true, vb.pp("to_out.0"), lora)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            upcast,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>, pass: Pass) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = split_heads(&self.to_q.forward(x, pass)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(context, pass)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context, pass)?, self.heads)?;
        let o = attention(&q, &k, &v, self.scale, None, self.upcast, pass)?;
        self.to_out.forward(&merge_heads(&o, self.heads)?, pass)
    }
}

/// `BasicTransformerBlock`: self attention, cross attention, GEGLU feed-forward.
#[derive(Clone, Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl BasicTransformerBlock {
    #[allow(clippy::too_many_arguments)]
    fn new(
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
        upcast: bool,
        vb: VarBuilder,
        lora: &LoraRegistry,
    ) -> Result<Self> {
        let inner_ff = dim * 4;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, head_dim, upcast, vb.pp("attn1"), lora)?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(
                dim,
                context_dim,
                heads,
                head_dim,
                upcast,
                vb.pp("attn2"),
                lora,
            )?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff_proj: Linear::new_lora(dim, inner_ff * 2, true, vb.pp("ff.net.0.proj"), lora)?,
            ff_out: Linear::new_lora(inner_ff, dim, true, vb.pp("ff.net.2"), lora)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, pass: Pass) -> Result<Tensor> {
        let h = self
            .attn1
            .forward(&self.norm1.forward(x, pass)?, None, pass)?;
        let x = (x + h)?;
        let h = self
            .attn2
            .forward(&self.norm2.forward(&x, pass)?, Some(context), pass)?;
        let x = (x + h)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&x, pass)?, pass)?;
        let h = if crate::cpu_act::handles(&h) {
            crate::cpu_act::geglu(&h)?
        } else {
            let inner = h.dim(D::Minus1)? / 2;
            let (a, gate) = (
                h.narrow(D::Minus1, 0, inner)?,
                h.narrow(D::Minus1, inner, inner)?,
            );
            (a * gate.gelu_erf()?)?
        };
        x + self.ff_out.forward(&h, pass)?
    }
}

/// How `Transformer2DModel` projects into and out of token space.
#[derive(Clone, Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` with continuous input.
#[derive(Clone, Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    fn new(
        channels: usize,
        heads: usize,
        depth: usize,
        context_dim: usize,
        cfg: &UNet2DConditionConfig,
        vb: VarBuilder,
        lora: &LoraRegistry,
    ) -> Result<Self> {
        if heads == 0 || channels % heads != 0 {
            candle_core::bail!(
                "{}: {channels} channels cannot be split into {heads} attention heads",
                vb.prefix()
            );
        }
        let head_dim = channels / heads;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Projection::Linear(Linear::new_lora(
                    channels,
                    channels,
                    true,
                    vb.pp("proj_in"),
                    lora,
                )?),
                Projection::Linear(Linear::new_lora(
                    channels,
                    channels,
                    true,
                    vb.pp("proj_out"),
                    lora,
                )?),
            )
        } else {
            (
                Projection::Conv(Conv2d::new_lora(
                    channels,
                    channels,
                    1,
                    1,
                    0,
                    vb.pp("proj_in"),
                    lora,
                )?),
                Projection::Conv(Conv2d::new_lora(
                    channels,
                    channels,
                    1,
                    1,
                    0,
                    vb.pp("proj_out"),
                    lora,
                )?),
            )
        };
        let blocks = (0..depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    channels,
                    heads,
                    head_dim,
                    context_dim,
                    cfg.upcast_attention,
                    vb.pp(format!("transformer_blocks.{i}")),
                    lora,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::new(cfg.norm_num_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, pass: Pass) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x, pass)?;
        let to_tokens =
            |t: &Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let mut x = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&x, pass)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&x)?, pass)?,
        };
        for block in &self.blocks {
            x = block.forward(&x, context, pass)?;
        }
        let to_map = |t: &Tensor| -> Result<Tensor> {
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let x = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&x)?, pass)?,
            Projection::Linear(lin) => to_map(&lin.forward(&x, pass)?)?,
        };
        x + residual
    }
}

/// One down block: ResNets, optional attentions, optional downsampler.
#[derive(Clone, Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Conv2d>,
}

/// One up block: ResNets over concatenated skips, optional attentions and upsampler.
#[derive(Clone, Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Conv2d>,
}

/// `UNetMidBlock2DCrossAttn`.
#[derive(Clone, Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attentions: Vec<Transformer2D>,
    resnets: Vec<ResnetBlock2D>,
}

/// SDXL's extra conditioning: pooled text embedding and the six time ids.
#[derive(Clone, Debug)]
pub struct AddedCondition {
    /// Pooled, projected text embedding of the second text encoder, `[b, d]`.
    pub text_embeds: Tensor,
    /// `(original_h, original_w, crop_top, crop_left, target_h, target_w)`, `[b, 6]`.
    pub time_ids: Tensor,
}

/// diffusers' `UNet2DConditionModel`.
#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    add_embedding: Option<TimestepMlp>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    lora: LoraRegistry,
    dtype: DType,
    device: Device,
}

impl UNet2DConditionModel {
    /// Builds the model from `cfg`, reading tensors from `vb` under diffusers'
    /// names (`conv_in.weight`, `down_blocks.0.resnets.0.norm1.weight`, ...).
    pub fn new(cfg: &UNet2DConditionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.block_out_channels.len();
        let boc = &cfg.block_out_channels;
        let act = Activation::from_name(&cfg.act_fn).unwrap_or(Activation::Silu);
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        let depth = cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let cross = cfg.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let heads = cfg.heads()?;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let lora = LoraRegistry::new();

        let temb_dim = boc[0] * 4;
        let conv_in = Conv2d::new(cfg.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?;
        let time_embedding = TimestepMlp::new(boc[0], temb_dim, act, vb.pp("time_embedding"))?;
        let add_embedding = match (
            cfg.addition_embed_type.as_deref(),
            cfg.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(in_dim)) => Some(TimestepMlp::new(
                in_dim,
                temb_dim,
                act,
                vb.pp("add_embedding"),
            )?),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for i in 0..n {
            let in_c = out_c;
            out_c = boc[i];
            let is_final = i == n - 1;
            let has_attn = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let rin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    rin,
                    out_c,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    bvb.pp(format!("resnets.{j}")),
                )?);
                if has_attn {
                    attentions.push(Transformer2D::new(
                        out_c,
                        heads[i],
                        depth[i],
                        cross[i],
                        cfg,
                        bvb.pp(format!("attentions.{j}")),
                        &lora,
                    )?);
                }
            }
            let downsampler = if is_final {
                None
            } else {
                Some(Conv2d::new(
                    out_c,
                    out_c,
                    3,
                    2,
                    cfg.downsample_padding,
                    bvb.pp("downsamplers.0.conv"),
                )?)
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid_block = match cfg.mid_block_type {
            Some(_) => {
                let c = boc[n - 1];
                let mvb = vb.pp("mid_block");
                let resnet_0 = ResnetBlock2D::new(
                    c,
                    c,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    mvb.pp("resnets.0"),
                )?;
                let attentions = vec![Transformer2D::new(
                    c,
                    heads[n - 1],
                    depth[n - 1],
                    cross[n - 1],
                    cfg,
                    mvb.pp("attentions.0"),
                    &lora,
                )?];
                let resnets = vec![ResnetBlock2D::new(
                    c,
                    c,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    mvb.pp("resnets.1"),
                )?];
                Some(MidBlock {
                    resnet_0,
                    attentions,
                    resnets,
                })
            }
            None => None,
        };

        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = cross.iter().rev().copied().collect();
        let rev_depth: Vec<usize> = match &cfg.reverse_transformer_layers_per_block {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => candle_core::bail!(
                "unet config: reverse_transformer_layers_per_block has {} entries, expected {n}",
                v.len()
            ),
            None => depth.iter().rev().copied().collect(),
        };
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = rev_boc[0];
        for i in 0..n {
            let prev_out = out_c;
            out_c = rev_boc[i];
            let in_c = rev_boc[(i + 1).min(n - 1)];
            let is_final = i == n - 1;
            let has_attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let num_layers = rev_layers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let skip = if j == num_layers - 1 { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    rin + skip,
                    out_c,
                    Some(temb_dim),
                    groups,
                    eps,
                    act,
                    bvb.pp(format!("resnets.{j}")),
                )?);
                if has_attn {
                    attentions.push(Transformer2D::new(
                        out_c,
                        rev_heads[i],
                        rev_depth[i],
                        rev_cross[i],
                        cfg,
                        bvb.pp(format!("attentions.{j}")),
                        &lora,
                    )?);
                }
            }
            let upsampler = if is_final {
                None
            } else {
                Some(Conv2d::new(
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                    bvb.pp("upsamplers.0.conv"),
                )?)
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, boc[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(boc[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
            act,
            lora,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The LoRA slots: every attention projection (`to_q`, `to_k`, `to_v`,
    /// `to_out.0`), feed-forward (`ff.net.0.proj`, `ff.net.2`) and
    /// `proj_in`/`proj_out` (linear, or 1x1 convolutions in SD 1.x).
    pub fn lora(&self) -> &LoraRegistry {
        &self.lora
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Predicts noise (or v) for `sample` `[b, c, h, w]` at `timesteps` `[b]`
    /// (one per sample, integer or fractional) given the text conditioning
    /// `encoder_hidden_states` `[b, seq, d]`, and for SDXL the added condition.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCondition>,
        pass: Pass,
    ) -> Result<Tensor> {
        self.forward_with(
            &mut Direct,
            sample,
            timesteps,
            encoder_hidden_states,
            added,
            pass,
        )
    }

    /// [`UNet2DConditionModel::forward`] with activation checkpointing: every
    /// ResNet, transformer, resampling and embedding unit is recorded on
    /// `tape`, which keeps only the units' outputs. The returned prediction
    /// is detached; [`Tape::backward`] with the loss gradient of it yields the
    /// parameter gradients, re-running each unit once (about one extra
    /// forward of compute for most of the activation memory).
    pub fn forward_checkpointed<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCondition>,
        pass: Pass,
    ) -> Result<Tensor> {
        self.forward_with(tape, sample, timesteps, encoder_hidden_states, added, pass)
    }

    /// The forward pass, unit by unit through `exec`. Everything that depends
    /// on a parameter happens inside a unit, so a [`Tape`] sees every path a
    /// gradient takes.
    fn forward_with<'a, E: Exec<'a>>(
        &'a self,
        exec: &mut E,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCondition>,
        pass: Pass,
    ) -> Result<Tensor> {
        let (b, c, h, w) = sample.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!(
                "unet: sample has {c} channels, the model expects {}",
                self.config.in_channels
            );
        }
        let timesteps = match timesteps.rank() {
            0 => timesteps.broadcast_as(b)?.contiguous()?,
            1 if timesteps.dim(0)? == b => timesteps.clone(),
            1 if timesteps.dim(0)? == 1 => timesteps.broadcast_as(b)?.contiguous()?,
            _ => candle_core::bail!(
                "unet: timesteps of shape {:?} for a batch of {b}",
                timesteps.dims()
            ),
        };
        let ehs_b = encoder_hidden_states.dim(0)?;
        if ehs_b != b {
            candle_core::bail!("unet: batch of {b} samples but {ehs_b} text conditionings");
        }
        let boc0 = self.config.block_out_channels[0];
        let t_emb = timestep_embedding(
            &timesteps,
            boc0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(self.dtype)?;
        // The parameter-free inputs of the added embedding (SDXL), computed
        // outside the units.
        let add_in = match &self.add_embedding {
            Some(_) => {
                let Some(cond) = added else {
                    candle_core::bail!(
                        "unet: this is an SDXL-style UNet (addition_embed_type text_time); it needs text_embeds and time_ids"
                    );
                };
                let dim = self.config.addition_time_embed_dim.unwrap_or(256);
                let ids = cond.time_ids.flatten_all()?;
                let t = timestep_embedding(
                    &ids,
                    dim,
                    self.config.flip_sin_to_cos,
                    self.config.freq_shift,
                )?
                .reshape((b, ()))?
                .to_dtype(self.dtype)?;
                Some(Tensor::cat(
                    &[cond.text_embeds.to_dtype(self.dtype)?, t],
                    D::Minus1,
                )?)
            }
            None => None,
        };
        let emb = {
            let te = &self.time_embedding;
            match (&self.add_embedding, &add_in) {
                (Some(add), Some(add_in)) => exec.unit(
                    &[&t_emb, add_in],
                    Box::new(move |t| te.forward(&t[0], pass)? + add.forward(&t[1], pass)?),
                )?,
                _ => exec.unit(&[&t_emb], Box::new(move |t| te.forward(&t[0], pass)))?,
            }
        };
        let ehs = encoder_hidden_states.to_dtype(self.dtype)?;
        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let sample = sample.to_dtype(self.dtype)?;

        let conv_in = &self.conv_in;
        let mut x = exec.unit(&[&sample], Box::new(move |t| conv_in.forward(&t[0], pass)))?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = exec.unit(
                    &[&x, &emb],
                    Box::new(move |t| resnet.forward(&t[0], Some(&t[1]), pass)),
                )?;
                if let Some(attn) = block.attentions.get(j) {
                    x = exec.unit(
                        &[&x, &ehs],
                        Box::new(move |t| attn.forward(&t[0], &t[1], pass)),
                    )?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.downsampler {
                x = exec.unit(&[&x], Box::new(move |t| down.forward(&t[0], pass)))?;
                skips.push(x.clone());
            }
        }
        if let Some(mid) = &self.mid_block {
            let r0 = &mid.resnet_0;
            x = exec.unit(
                &[&x, &emb],
                Box::new(move |t| r0.forward(&t[0], Some(&t[1]), pass)),
            )?;
            for (attn, resnet) in mid.attentions.iter().zip(&mid.resnets) {
                x = exec.unit(
                    &[&x, &ehs],
                    Box::new(move |t| attn.forward(&t[0], &t[1], pass)),
                )?;
                x = exec.unit(
                    &[&x, &emb],
                    Box::new(move |t| resnet.forward(&t[0], Some(&t[1]), pass)),
                )?;
            }
        }
        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let Some(skip) = skips.pop() else {
                    candle_core::bail!("unet: skip connections exhausted (inconsistent config)");
                };
                x = exec.unit(
                    &[&x, &skip, &emb],
                    Box::new(move |t| {
                        let x = Tensor::cat(&[&t[0], &t[1]], 1)?;
                        resnet.forward(&x, Some(&t[2]), pass)
                    }),
                )?;
                if let Some(attn) = block.attentions.get(j) {
                    x = exec.unit(
                        &[&x, &ehs],
                        Box::new(move |t| attn.forward(&t[0], &t[1], pass)),
                    )?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the size of the next skip connection, which also
                // handles latents whose size is not a multiple of 2^depth.
                let (th, tw) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (x.dim(2)? * 2, x.dim(3)? * 2),
                };
                x = exec.unit(
                    &[&x],
                    Box::new(move |t| up.forward(&upsample_nearest2d(&t[0], th, tw)?, pass)),
                )?;
            }
        }
        let (norm, act, conv_out) = (&self.conv_norm_out, self.act, &self.conv_out);
        let out = exec.unit(
            &[&x],
            Box::new(move |t| {
                let x = norm.forward_act(&t[0], act, pass)?;
                conv_out.forward(&x, pass)
            }),
        )?;
        debug_assert_eq!(out.dims4()?, (b, self.config.out_channels, h, w));
        Ok(out)
    }
}
