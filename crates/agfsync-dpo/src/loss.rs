//! The Diffusion-DPO objective (Wallace et al. 2023) exactly as
//! `shared/AGFSYNC.md` section 6 states it, and the SFT baseline.
//!
//! For a batch of pairs `(x_w, x_l)` with one timestep `t` and one noise `e`
//! shared by the winner and the loser of a pair:
//!
//! * `err = mean over C,H,W of (pred - target)^2`, for the trained model
//!   (`err_w`, `err_l`) and the frozen reference (`ref_w`, `ref_l`);
//! * `inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))`;
//! * `loss = -mean(log sigmoid(inside))`, computed as `mean(softplus(-inside))`
//!   in a form that neither overflows for large `|inside|` (beta is 5000) nor
//!   loses the gradient at `inside = 0` (where a LoRA run starts: its adapters
//!   begin at zero, so the model equals the reference);
//! * implicit accuracy `= mean(inside > 0)`, ties counting 0.5.
//!
//! The target is the noise for epsilon-prediction models and the velocity
//! `sqrt(abar_t) e - sqrt(1 - abar_t) x0` for v-prediction models
//! ([`Target`]).

use candle_core::{DType, Result, Tensor, D};

/// What the model regresses: diffusers' `prediction_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Target {
    /// The added noise `e`.
    #[serde(rename = "epsilon")]
    Epsilon,
    /// The velocity `sqrt(abar_t) e - sqrt(1 - abar_t) x0`.
    #[serde(rename = "v_prediction")]
    Velocity,
}

/// `(sqrt(abar_t), sqrt(1 - abar_t))` per sample, shaped `[b, 1, 1, 1]`.
fn coefficients(abar: &[f64], like: &Tensor) -> Result<(Tensor, Tensor)> {
    let b = abar.len();
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    let a: Vec<f64> = abar.iter().map(|a| a.sqrt()).collect();
    let s: Vec<f64> = abar.iter().map(|a| (1.0 - a).sqrt()).collect();
    let mk = |v: Vec<f64>| {
        Tensor::from_vec(v, shape.as_slice(), like.device()).and_then(|t| t.to_dtype(like.dtype()))
    };
    Ok((mk(a)?, mk(s)?))
}

/// The forward process `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e`, with
/// `abar[i]` the cumulative alpha of sample `i`'s timestep.
pub fn noisy_latents(x0: &Tensor, noise: &Tensor, abar: &[f64]) -> Result<Tensor> {
    let (sa, s1a) = coefficients(abar, x0)?;
    x0.broadcast_mul(&sa)? + noise.broadcast_mul(&s1a)?
}

/// The regression target of `target` for clean latents `x0` and `noise`.
pub fn training_target(
    target: Target,
    x0: &Tensor,
    noise: &Tensor,
    abar: &[f64],
) -> Result<Tensor> {
    match target {
        Target::Epsilon => Ok(noise.clone()),
        Target::Velocity => {
            let (sa, s1a) = coefficients(abar, x0)?;
            noise.broadcast_mul(&sa)? - x0.broadcast_mul(&s1a)?
        }
    }
}

/// Per-sample mean squared error over every dimension but the first:
/// `[b, c, h, w] -> [b]`, computed in at least f32.
pub fn per_sample_mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let dtype = match pred.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let d = (pred.to_dtype(dtype)? - target.to_dtype(dtype)?)?;
    let b = d.dim(0)?;
    d.sqr()?.reshape((b, ()))?.mean(D::Minus1)
}

/// `softplus(z) = log(1 + exp(z))`, stable for any `z` and differentiable
/// with the exact gradient `sigmoid(z)` everywhere, including `z = 0`.
///
/// With `a = max(z, 0)` and `b = min(z, 0)`,
/// `softplus(z) = softplus(b) + softplus(a) - log 2` where
/// `softplus(b) = log(1 + exp(b))` (no overflow: `b <= 0`) and
/// `softplus(a) = a + log(1 + exp(-a))`. At a tie candle splits the gradient
/// of `max`/`min` evenly, which gives `0.5 * 0.5 + 0.5 * 0.5 = sigmoid(0)`.
pub fn softplus(z: &Tensor) -> Result<Tensor> {
    let a = z.maximum(0.0)?;
    let b = z.minimum(0.0)?;
    let sp_b = (b.exp()? + 1.0)?.log()?;
    let sp_a = (&a + (a.neg()?.exp()? + 1.0)?.log()?)?;
    (sp_b + sp_a)? - std::f64::consts::LN_2
}

/// Everything the Diffusion-DPO loss computes for one batch of pairs.
#[derive(Clone, Debug)]
pub struct DpoLoss {
    /// `-mean(log sigmoid(inside))`, a differentiable scalar.
    pub loss: Tensor,
    /// `inside` per pair, `[b]` (detached).
    pub inside: Tensor,
    /// Implicit accuracy: the fraction of pairs with `inside > 0`, ties 0.5.
    pub implicit_acc: f64,
    /// Mean reward margin `mean(r_w - r_l)` with the DPO implicit reward
    /// `r = -0.5 * beta * (err_model - err_ref)`; equals `mean(inside)`.
    pub reward_margin: f64,
    /// Mean model denoising error over winners and losers,
    /// `0.5 * (mean(err_w) + mean(err_l))` (diffusers' `raw_model_loss`).
    pub model_loss: f64,
    /// The same for the reference model (`raw_ref_loss`).
    pub ref_loss: f64,
    /// Mean model error on winners.
    pub model_loss_w: f64,
    /// Mean model error on losers.
    pub model_loss_l: f64,
}

fn mean_f64(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()
}

/// The Diffusion-DPO loss of a batch of pairs from the model's and the
/// reference's predictions (`[b, c, h, w]` each) and the targets of the
/// winners and losers. The reference predictions should be detached (they
/// are detached here anyway). `beta` must be positive.
#[allow(clippy::too_many_arguments)]
pub fn dpo_loss(
    model_w: &Tensor,
    model_l: &Tensor,
    ref_w: &Tensor,
    ref_l: &Tensor,
    target_w: &Tensor,
    target_l: &Tensor,
    beta: f64,
) -> Result<DpoLoss> {
    let err_w = per_sample_mse(model_w, target_w)?;
    let err_l = per_sample_mse(model_l, target_l)?;
    let rerr_w = per_sample_mse(&ref_w.detach(), target_w)?;
    let rerr_l = per_sample_mse(&ref_l.detach(), target_l)?;
    dpo_loss_from_errors(&err_w, &err_l, &rerr_w, &rerr_l, beta)
}

/// [`dpo_loss`] from per-pair errors (`[b]` each).
pub fn dpo_loss_from_errors(
    err_w: &Tensor,
    err_l: &Tensor,
    ref_w: &Tensor,
    ref_l: &Tensor,
    beta: f64,
) -> Result<DpoLoss> {
    let model_diff = (err_w - err_l)?;
    let ref_diff = (ref_w.detach() - ref_l.detach())?;
    let inside = ((model_diff - ref_diff)? * (-0.5 * beta))?;
    let loss = softplus(&inside.neg()?)?.mean_all()?;
    let values: Vec<f64> = inside.to_dtype(DType::F64)?.to_vec1()?;
    let n = values.len().max(1) as f64;
    let acc = values
        .iter()
        .map(|&v| {
            if v > 0.0 {
                1.0
            } else if v == 0.0 {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / n;
    let margin = values.iter().sum::<f64>() / n;
    let mw = mean_f64(err_w)?;
    let ml = mean_f64(err_l)?;
    let rw = mean_f64(ref_w)?;
    let rl = mean_f64(ref_l)?;
    Ok(DpoLoss {
        loss,
        inside: inside.detach(),
        implicit_acc: acc,
        reward_margin: margin,
        model_loss: 0.5 * (mw + ml),
        ref_loss: 0.5 * (rw + rl),
        model_loss_w: mw,
        model_loss_l: ml,
    })
}

/// The SFT baseline: the plain denoising loss `mean((pred_w - target_w)^2)`
/// on the winners only (a differentiable scalar).
pub fn sft_loss(model_w: &Tensor, target_w: &Tensor) -> Result<Tensor> {
    per_sample_mse(model_w, target_w)?.mean_all()
}
