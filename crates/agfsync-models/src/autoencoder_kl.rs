//! The KL autoencoder of latent diffusion (Rombach et al., CVPR 2022), as
//! diffusers' `AutoencoderKL` stores it in `vae/`: encode images to latents,
//! decode latents to images.
//!
//! Both attention key layouts load: current diffusers names
//! (`to_q`, `to_k`, `to_v`, `to_out.0`) and the older ones (`query`, `key`,
//! `value`, `proj_attn`) that many SD 1.x checkpoints still carry.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::nn::{attention, Activation, Conv2d, GroupNorm, Linear, Pass};
use crate::unet_2d_condition::ResnetBlock2D;

fn default_c() -> usize {
    3
}
fn default_latent() -> usize {
    4
}
fn default_boc() -> Vec<usize> {
    vec![64]
}
fn default_one() -> usize {
    1
}
fn default_groups() -> usize {
    32
}
fn default_act() -> String {
    "silu".into()
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_sample() -> usize {
    32
}

/// `vae/config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKlConfig {
    /// Image channels in.
    #[serde(default = "default_c")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "default_c")]
    pub out_channels: usize,
    /// Encoder block types (only `DownEncoderBlock2D`).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Decoder block types (only `UpDecoderBlock2D`).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels per level.
    #[serde(default = "default_boc")]
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder level (decoder levels have one more).
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    /// Activation.
    #[serde(default = "default_act")]
    pub act_fn: String,
    /// Latent channels.
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    /// Image size the model was trained at.
    #[serde(default = "default_sample")]
    pub sample_size: usize,
    /// Latents are multiplied by this after encoding (SD 0.18215, SDXL 0.13025).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3/Flux), absent for SD.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// SDXL's VAE overflows in f16: diffusers upcasts it to f32.
    #[serde(default)]
    pub force_upcast: Option<bool>,
    /// Whether `quant_conv` exists.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have attention.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl AutoencoderKlConfig {
    /// Reads `vae/config.json`.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// Ratio between image and latent size.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Single-head self-attention over the spatial positions, with a residual.
#[derive(Clone, Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            group_norm: GroupNorm::new(groups, c, 1e-6, vb.pp("group_norm"))?,
            q: Linear::new(c, c, true, vb.pp(names[0]))?,
            k: Linear::new(c, c, true, vb.pp(names[1]))?,
            v: Linear::new(c, c, true, vb.pp(names[2]))?,
            out: Linear::new(c, c, true, vb.pp(names[3]))?,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x, pass)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q.forward(&t, pass)?;
        let k = self.k.forward(&t, pass)?;
        let v = self.v.forward(&t, pass)?;
        let o = attention(&q, &k, &v, 1.0 / (c as f64).sqrt(), None, true, pass)?;
        let o = self.out.forward(&o, pass)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

#[derive(Clone, Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn new(c: usize, cfg: &AutoencoderKlConfig, act: Activation, vb: VarBuilder) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Self {
            resnet_0: ResnetBlock2D::new(c, c, None, g, 1e-6, act, vb.pp("resnets.0"))?,
            attention: if cfg.mid_block_add_attention {
                Some(SpatialAttention::new(c, g, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet_1: ResnetBlock2D::new(c, c, None, g, 1e-6, act, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let mut x = self.resnet_0.forward(x, None, pass)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x, pass)?;
        }
        self.resnet_1.forward(&x, None, pass)
    }
}

#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Conv2d>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

/// The latent distribution an image encodes to.
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    /// Mean, `[b, latent_channels, h/f, w/f]`.
    pub mean: Tensor,
    /// Standard deviation, same shape.
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Draws `mean + std * noise` with the caller's noise.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise)?
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Clone, Debug)]
pub struct AutoencoderKl {
    config: AutoencoderKlConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    dtype: DType,
    device: Device,
}

impl AutoencoderKl {
    /// Builds the autoencoder from `cfg`, reading diffusers' tensor names.
    pub fn new(cfg: &AutoencoderKlConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.block_out_channels.len();
        if n == 0 {
            candle_core::bail!("vae config: block_out_channels is empty");
        }
        for t in &cfg.down_block_types {
            if t != "DownEncoderBlock2D" {
                candle_core::bail!("vae config: unsupported down block type `{t}`");
            }
        }
        for t in &cfg.up_block_types {
            if t != "UpDecoderBlock2D" {
                candle_core::bail!("vae config: unsupported up block type `{t}`");
            }
        }
        let act = Activation::from_name(&cfg.act_fn).ok_or_else(|| {
            candle_core::Error::Msg(format!("vae config: unknown act_fn `{}`", cfg.act_fn))
        })?;
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let lc = cfg.latent_channels;

        let e = vb.pp("encoder");
        let mut blocks = Vec::new();
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bvb = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let rin = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(
                        rin,
                        out_c,
                        None,
                        g,
                        1e-6,
                        act,
                        bvb.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n {
                Some(Conv2d::new(
                    out_c,
                    out_c,
                    3,
                    2,
                    0,
                    bvb.pp("downsamplers.0.conv"),
                )?)
            } else {
                None
            };
            blocks.push((resnets, down));
        }
        let top = boc[n - 1];
        let encoder = Encoder {
            conv_in: Conv2d::new(cfg.in_channels, boc[0], 3, 1, 1, e.pp("conv_in"))?,
            blocks,
            mid: MidBlock::new(top, cfg, act, e.pp("mid_block"))?,
            norm_out: GroupNorm::new(g, top, 1e-6, e.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(top, 2 * lc, 3, 1, 1, e.pp("conv_out"))?,
            act,
        };

        let d = vb.pp("decoder");
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let bvb = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let rin = if j == 0 { prev } else { out_c };
                    ResnetBlock2D::new(
                        rin,
                        out_c,
                        None,
                        g,
                        1e-6,
                        act,
                        bvb.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n {
                Some(Conv2d::new(
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                    bvb.pp("upsamplers.0.conv"),
                )?)
            } else {
                None
            };
            blocks.push((resnets, up));
        }
        let decoder = Decoder {
            conv_in: Conv2d::new(lc, top, 3, 1, 1, d.pp("conv_in"))?,
            mid: MidBlock::new(top, cfg, act, d.pp("mid_block"))?,
            blocks,
            norm_out: GroupNorm::new(g, boc[0], 1e-6, d.pp("conv_norm_out"))?,
            conv_out: Conv2d::new(boc[0], cfg.out_channels, 3, 1, 1, d.pp("conv_out"))?,
            act,
        };
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(2 * lc, 2 * lc, 1, 1, 0, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(lc, lc, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &AutoencoderKlConfig {
        &self.config
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encodes images in `[-1, 1]` (`[b, 3, h, w]`) to the latent distribution
    /// (unscaled: multiply by `scaling_factor` for the UNet's latent space).
    pub fn encode(&self, images: &Tensor, pass: Pass) -> Result<DiagonalGaussian> {
        let e = &self.encoder;
        let mut x = e.conv_in.forward(&images.to_dtype(self.dtype)?, pass)?;
        for (resnets, down) in &e.blocks {
            for r in resnets {
                x = r.forward(&x, None, pass)?;
            }
            if let Some(d) = down {
                // diffusers pads right and bottom by one before a padding-0 conv.
                let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                x = d.forward(&padded, pass)?;
            }
        }
        x = e.mid.forward(&x, pass)?;
        x = e.norm_out.forward_act(&x, e.act, pass)?;
        x = e.conv_out.forward(&x, pass)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x, pass)?;
        }
        let lc = self.config.latent_channels;
        let mean = x.narrow(1, 0, lc)?;
        let logvar = x.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(DiagonalGaussian { mean, std })
    }

    /// Decodes unscaled latents (divide by `scaling_factor` first) to images in
    /// roughly `[-1, 1]`.
    pub fn decode(&self, latents: &Tensor, pass: Pass) -> Result<Tensor> {
        let d = &self.decoder;
        let mut z = latents.to_dtype(self.dtype)?;
        if let Some(p) = &self.post_quant_conv {
            z = p.forward(&z, pass)?;
        }
        let mut x = d.conv_in.forward(&z, pass)?;
        x = d.mid.forward(&x, pass)?;
        for (resnets, up) in &d.blocks {
            for r in resnets {
                x = r.forward(&x, None, pass)?;
            }
            if let Some(u) = up {
                let (h, w) = (x.dim(2)?, x.dim(3)?);
                x = u.forward(&x.upsample_nearest2d(h * 2, w * 2)?, pass)?;
            }
        }
        x = d.norm_out.forward_act(&x, d.act, pass)?;
        d.conv_out.forward(&x, pass)
    }
}
