//! The Stable Diffusion text-to-image sampling loop, written out plainly:
//! encode the prompt, prepare latents, denoise with classifier-free guidance,
//! decode with the VAE.
//!
//! It mirrors diffusers' `StableDiffusionPipeline.__call__`, so the same
//! initial latents, scheduler and settings give the same images.

use agfsync_models::clip_text::TextLayer;
use agfsync_models::nn::Pass;
use agfsync_models::stable_diffusion::{PromptEncoders, SdFamily, StableDiffusion};
use agfsync_models::unet_2d_condition::AddedCondition;
use candle_core::{DType, Device, Result, Tensor, D};

use crate::rng::Generator;
use crate::schedulers::Scheduler;

/// Text conditioning for a batch: one row per image.
#[derive(Clone, Debug)]
pub struct TextConditioning {
    /// Prompt embeddings, `[b, 77, d]`.
    pub cond: Tensor,
    /// Negative-prompt embeddings for classifier-free guidance, `[b, 77, d]`.
    pub uncond: Option<Tensor>,
    /// SDXL's added condition for the prompt and for the negative prompt.
    pub added: Option<(AddedCondition, AddedCondition)>,
}

impl TextConditioning {
    /// The first `n` rows of every tensor (a smaller last batch reuses the
    /// conditioning encoded for a full one).
    pub fn first_rows(&self, n: usize) -> Result<Self> {
        let rows = |t: &Tensor| t.narrow(0, 0, n);
        let added_rows = |a: &AddedCondition| -> Result<AddedCondition> {
            Ok(AddedCondition {
                text_embeds: rows(&a.text_embeds)?,
                time_ids: rows(&a.time_ids)?,
            })
        };
        Ok(Self {
            cond: rows(&self.cond)?,
            uncond: self.uncond.as_ref().map(rows).transpose()?,
            added: match &self.added {
                Some((c, u)) => Some((added_rows(c)?, added_rows(u)?)),
                None => None,
            },
        })
    }
}

/// What [`encode_prompts`] found worth telling the user.
#[derive(Clone, Debug, Default)]
pub struct EncodeReport {
    /// Prompts (by index) whose tokens past the 77th were dropped.
    pub truncated: Vec<usize>,
}

/// The negative side of classifier-free guidance.
#[derive(Clone, Copy, Debug)]
pub enum Negative<'a> {
    /// No guidance: only the prompts are encoded.
    None,
    /// Guidance without a negative prompt: `""` for SD 1.x/2.x; for SDXL,
    /// zero embeddings when the pipeline sets `force_zeros_for_empty_prompt`.
    Default,
    /// Guidance with one negative prompt per prompt.
    Prompts(&'a [String]),
}

/// SDXL's micro-conditioning, as `(height, width)` and `(top, left)` pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XlSizes {
    /// Size of the original training image the output should look like it came from.
    pub original_size: (usize, usize),
    /// Top-left corner of the crop the output should look like.
    pub crops_coords_top_left: (usize, usize),
    /// Size of the output image.
    pub target_size: (usize, usize),
}

impl XlSizes {
    /// diffusers' defaults for an image of `height` x `width`.
    pub fn for_image(height: usize, width: usize) -> Self {
        Self {
            original_size: (height, width),
            crops_coords_top_left: (0, 0),
            target_size: (height, width),
        }
    }

    fn time_ids(&self, batch: usize, device: &Device) -> Result<Tensor> {
        let v = [
            self.original_size.0,
            self.original_size.1,
            self.crops_coords_top_left.0,
            self.crops_coords_top_left.1,
            self.target_size.0,
            self.target_size.1,
        ]
        .map(|x| x as f32);
        Tensor::new(&v, device)?.unsqueeze(0)?.repeat((batch, 1))
    }
}

/// Tokenizes and encodes prompts (and negative prompts for guidance) as
/// diffusers' `encode_prompt` does for the pipeline's family: one CLIP
/// encoder for SD 1.x/2.x; for SDXL both encoders' raw penultimate states
/// concatenated, the second encoder's pooled projection and the time ids of
/// `xl` (required for SDXL).
///
/// As in diffusers, `clip_skip` applies to the prompts only; negative prompts
/// always use the default layer.
pub fn encode_prompts(
    sd: &(impl PromptEncoders + ?Sized),
    prompts: &[String],
    negative: Negative,
    clip_skip: Option<usize>,
    xl: Option<&XlSizes>,
) -> Result<(TextConditioning, EncodeReport)> {
    let mut report = EncodeReport::default();
    let n = prompts.len();
    let negatives: Option<Vec<String>> = match negative {
        Negative::None => None,
        Negative::Default => Some(vec![String::new(); n]),
        Negative::Prompts(p) => {
            if p.len() != n {
                candle_core::bail!("{} negative prompts for {} prompts", p.len(), n);
            }
            Some(p.to_vec())
        }
    };
    let skip = clip_skip.filter(|&k| k > 0);
    if sd.family() != SdFamily::Xl {
        let layer = skip.map_or(TextLayer::Last, TextLayer::Skip);
        let (cond, _) = encode_with(sd, 0, prompts, layer, Some(&mut report))?;
        let uncond = match &negatives {
            Some(neg) => Some(encode_with(sd, 0, neg, TextLayer::Last, None)?.0),
            None => None,
        };
        let text = TextConditioning {
            cond,
            uncond,
            added: None,
        };
        return Ok((text, report));
    }

    let Some(xl) = xl else {
        candle_core::bail!(
            "SDXL pipelines need the micro-conditioning sizes (original size, crop, target size)"
        );
    };
    let layer = TextLayer::RawSkip(skip.map_or(1, |k| k + 1));
    let (cond, pooled) = encode_xl(sd, prompts, layer, Some(&mut report))?;
    let device = cond.device().clone();
    let time_ids = xl.time_ids(n, &device)?.to_dtype(cond.dtype())?;
    let cond_added = AddedCondition {
        text_embeds: pooled.clone(),
        time_ids: time_ids.clone(),
    };
    let (uncond, uncond_added) = match (&negatives, negative) {
        (None, _) => (None, cond_added.clone()),
        (Some(_), Negative::Default) if sd.force_zeros_for_empty_prompt() => (
            Some(cond.zeros_like()?),
            AddedCondition {
                text_embeds: pooled.zeros_like()?,
                time_ids,
            },
        ),
        (Some(neg), _) => {
            let (u, up) = encode_xl(sd, neg, TextLayer::PenultimateRaw, None)?;
            (
                Some(u),
                AddedCondition {
                    text_embeds: up,
                    time_ids,
                },
            )
        }
    };
    let text = TextConditioning {
        cond,
        uncond,
        added: Some((cond_added, uncond_added)),
    };
    Ok((text, report))
}

/// Both SDXL encoders: concatenated hidden states and the pooled projection
/// of the second.
fn encode_xl(
    sd: &(impl PromptEncoders + ?Sized),
    texts: &[String],
    layer: TextLayer,
    report: Option<&mut EncodeReport>,
) -> Result<(Tensor, Tensor)> {
    let (h1, _) = encode_with(sd, 0, texts, layer, report)?;
    let (h2, pooled) = encode_with(sd, 1, texts, layer, None)?;
    let Some(pooled) = pooled else {
        candle_core::bail!("SDXL's text_encoder_2 gave no pooled output");
    };
    Ok((Tensor::cat(&[h1, h2], D::Minus1)?, pooled))
}

/// Runs text encoder `which` (0 or 1) on `texts`; returns its hidden states
/// in the UNet's dtype and its pooled output.
fn encode_with(
    sd: &(impl PromptEncoders + ?Sized),
    which: usize,
    texts: &[String],
    layer: TextLayer,
    mut report: Option<&mut EncodeReport>,
) -> Result<(Tensor, Option<Tensor>)> {
    let Some((tokenizer, encoder)) = sd.encoder(which) else {
        candle_core::bail!("this pipeline has no second text encoder");
    };
    let (device, dtype) = sd.device_dtype();
    let max_len = encoder.config().max_position_embeddings.min(77);
    let mut rows = Vec::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        let enc = tokenizer
            .encode_padded(t, max_len)
            .map_err(|e| candle_core::Error::Msg(format!("tokenizing prompt {i}: {e}")))?;
        if enc.truncated {
            if let Some(r) = report.as_deref_mut() {
                r.truncated.push(i);
            }
        }
        rows.push(Tensor::new(enc.ids.as_slice(), &device)?.unsqueeze(0)?);
    }
    let ids = Tensor::cat(&rows, 0)?;
    let out = encoder.forward(&ids, layer, Pass::INFERENCE)?;
    let pooled = match out.pooled {
        Some(p) => Some(p.to_dtype(dtype)?),
        None => None,
    };
    Ok((out.hidden.to_dtype(dtype)?, pooled))
}

/// Everything the denoising loop needs besides the models.
#[derive(Clone, Debug)]
pub struct DenoiseOptions {
    /// Classifier-free guidance scale; guidance is off at 1.0 or below.
    pub guidance_scale: f64,
}

/// Shape of the initial latents for images of `height` x `width`.
pub fn latent_shape(
    sd: &StableDiffusion,
    batch: usize,
    height: usize,
    width: usize,
) -> Result<(usize, usize, usize, usize)> {
    let f = sd.vae.config().scale_factor();
    if height % f != 0 || width % f != 0 || height == 0 || width == 0 {
        candle_core::bail!(
            "height and width must be positive multiples of {f} for this model (got {height}x{width})"
        );
    }
    Ok((batch, sd.unet.config().in_channels, height / f, width / f))
}

/// Draws initial latents from `rng` (unscaled, standard normal).
pub fn random_latents(
    rng: &mut Generator,
    shape: (usize, usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    rng.randn(shape, DType::F32, device)
}

/// Runs the denoising loop from standard-normal `latents` (scaled here by
/// the scheduler's `init_noise_sigma`, as diffusers does) and returns the
/// final latents. `on_step(i, n)` is called after every step.
pub fn denoise(
    sd: &StableDiffusion,
    scheduler: &mut dyn Scheduler,
    latents: &Tensor,
    text: &TextConditioning,
    opts: &DenoiseOptions,
    rng: &mut Generator,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let unet = &sd.unet;
    let dtype = unet.dtype();
    let b = latents.dim(0)?;
    if text.cond.dim(0)? != b {
        candle_core::bail!("{} latents but {} prompt embeddings", b, text.cond.dim(0)?);
    }
    let cfg = opts.guidance_scale > 1.0 && text.uncond.is_some();
    // diffusers keeps latents in the UNet's dtype; the scheduler maths runs
    // in f32 here for stability and is cast back.
    let mut x = (latents.to_dtype(DType::F32)? * scheduler.init_noise_sigma())?;
    let context = match (&text.uncond, cfg) {
        (Some(u), true) => Tensor::cat(&[u, &text.cond], 0)?,
        _ => text.cond.clone(),
    };
    let added = match (&text.added, cfg) {
        (Some((c, u)), true) => Some(AddedCondition {
            text_embeds: Tensor::cat(&[&u.text_embeds, &c.text_embeds], 0)?,
            time_ids: Tensor::cat(&[&u.time_ids, &c.time_ids], 0)?,
        }),
        (Some((c, _)), false) => Some(c.clone()),
        _ => None,
    };
    let timesteps = scheduler.timesteps().to_vec();
    let n = timesteps.len();
    for (i, &t) in timesteps.iter().enumerate() {
        let model_in = if cfg {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x.clone()
        };
        let model_in = scheduler.scale_model_input(&model_in, i)?;
        let ts = Tensor::full(t as f32, model_in.dim(0)?, x.device())?;
        let pred = unet
            .forward(
                &model_in.to_dtype(dtype)?,
                &ts,
                &context,
                added.as_ref(),
                Pass::INFERENCE,
            )?
            .to_dtype(DType::F32)?;
        let pred = if cfg {
            let uncond = pred.narrow(0, 0, b)?;
            let cond = pred.narrow(0, b, b)?;
            (&uncond + ((cond - &uncond)? * opts.guidance_scale)?)?
        } else {
            pred
        };
        x = scheduler.step(&pred, i, &x, rng)?;
        on_step(i + 1, n);
    }
    Ok(x)
}

/// Decodes final latents to images in `[0, 1]`, `[b, 3, h, w]` f32.
pub fn decode_latents(sd: &StableDiffusion, latents: &Tensor) -> Result<Tensor> {
    let cfg = sd.vae.config();
    let mut z = (latents.to_dtype(DType::F32)? / cfg.scaling_factor)?;
    if let Some(shift) = cfg.shift_factor {
        z = (z + shift)?;
    }
    let img = sd.vae.decode(&z, Pass::INFERENCE)?.to_dtype(DType::F32)?;
    ((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)
}

/// Converts `[b, 3, h, w]` images in `[0, 1]` to 8-bit RGB rows per image,
/// rounding as diffusers' `numpy_to_pil` does (`(x * 255).round()`).
pub fn to_rgb8(images: &Tensor) -> Result<Vec<(usize, usize, Vec<u8>)>> {
    let (b, _, h, w) = images.dims4()?;
    let hwc = images.permute((0, 2, 3, 1))?.contiguous()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let px: Vec<f32> = hwc.get(i)?.flatten_all()?.to_vec1()?;
        let bytes = px
            .iter()
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        out.push((w, h, bytes));
    }
    Ok(out)
}

/// Adds Gaussian noise to prompt embeddings: `e + ratio * N(0, I)`, the
/// AGFSync diversity trick for candidates 1..N-1.
pub fn perturb_embeddings(e: &Tensor, ratio: f64, rng: &mut Generator) -> Result<Tensor> {
    let noise = rng.randn(e.dims(), DType::F32, e.device())?;
    (e.to_dtype(DType::F32)? + (noise * ratio)?)?.to_dtype(e.dtype())
}
