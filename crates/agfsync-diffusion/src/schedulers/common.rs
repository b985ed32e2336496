//! Helpers shared by the schedulers: numpy-exact timestep spacing, sigma interpolation, Karras
//! sigmas, validation and tensor arithmetic.

use candle_core::{DType, Tensor};

use super::{
    FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, SchedulerError,
    TimestepSpacing,
};

/// `np.linspace(start, stop, num)` (endpoint included), bit-exact with numpy's algorithm.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (stop - start) / (num - 1) as f64;
            let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
            y[num - 1] = stop;
            y
        }
    }
}

/// `np.arange(start, stop, step)` for floats: numpy fills `start + i * delta` where
/// `delta = (start + step) - start`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy's `round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn np_interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return fp[0];
    }
    let last = (n - 1) as f64;
    if x >= last {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    let y = slope * (x - j as f64) + fp[j];
    if y.is_nan() {
        // numpy's fallback for infinite slopes
        let y2 = slope * (x - (j + 1) as f64) + fp[j + 1];
        if y2.is_nan() && fp[j] == fp[j + 1] {
            return fp[j];
        }
        return y2;
    }
    y
}

/// Checks `1 <= steps <= num_train_timesteps`.
pub(crate) fn validate_steps(steps: usize, num_train: usize) -> Result<(), SchedulerError> {
    if steps == 0 {
        return Err(SchedulerError::InvalidSteps {
            steps,
            reason: "at least one step is required".to_string(),
        });
    }
    if steps > num_train {
        return Err(SchedulerError::InvalidSteps {
            steps,
            reason: format!(
                "cannot exceed num_train_timesteps ({num_train}) of the scheduler config"
            ),
        });
    }
    Ok(())
}

/// Checks that every timestep indexes the training schedule (a large `steps_offset` can push
/// `leading` timesteps past it).
pub(crate) fn validate_timesteps(
    steps: usize,
    timesteps: &[f64],
    num_train: usize,
) -> Result<(), SchedulerError> {
    if let Some(t) = timesteps
        .iter()
        .find(|&&t| !(0.0..=(num_train - 1) as f64).contains(&t))
    {
        return Err(SchedulerError::InvalidSteps {
            steps,
            reason: format!(
                "timestep {t} is outside the training range 0..{num_train} (check steps_offset)"
            ),
        });
    }
    Ok(())
}

/// The `leading`/`trailing`/`linspace` timesteps shared by DDIM, DDPM, Euler and Euler
/// ancestral (before any dtype conversion). `linspace` values are rounded only when
/// `round_linspace` (DDIM, DDPM); Euler keeps them fractional.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    steps: usize,
    num_train: usize,
    steps_offset: usize,
    round_linspace: bool,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|t| if round_linspace { np_round(t) } else { t })
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            np_arange(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) - 1.0)
                .collect()
        }
    }
}

/// The training sigmas `sqrt((1 - a) / a)`, computed in float32 like diffusers' torch code.
pub(crate) fn train_sigmas_f32(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose (log-linearly interpolated)
/// sigma is `sigma`. `log_sigmas` are the float32 logs of the training sigmas.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // index of the last log_sigma <= log_sigma (0 when none), clipped to n - 2
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. (2022) sigmas, rho = 7, from `sigma_max` down to `sigma_min`.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// The final sigma appended to a sigma schedule.
pub(crate) fn final_sigma(kind: FinalSigmasType, alphas_cumprod: &[f32]) -> f64 {
    match kind {
        FinalSigmasType::Zero => 0.0,
        FinalSigmasType::SigmaMin => {
            let a = alphas_cumprod[0];
            f64::from(((1.0 - a) / a).sqrt())
        }
    }
}

/// Rejects config options no scheduler here implements.
pub(crate) fn reject_common_unsupported(config: &SchedulerConfig) -> Result<(), SchedulerError> {
    if config.thresholding {
        return Err(SchedulerError::Unsupported {
            option: "thresholding = true".to_string(),
            reason: "dynamic thresholding (for pixel-space models) is not implemented; \
                     set \"thresholding\": false in the scheduler config"
                .to_string(),
        });
    }
    Ok(())
}

/// Rejects the sigma-schedule options Euler and DPM-Solver do not implement.
pub(crate) fn reject_unsupported_sigmas(config: &SchedulerConfig) -> Result<(), SchedulerError> {
    let flags = [
        ("use_exponential_sigmas", config.use_exponential_sigmas),
        ("use_beta_sigmas", config.use_beta_sigmas),
        ("use_flow_sigmas", config.use_flow_sigmas),
        ("use_lu_lambdas", config.use_lu_lambdas),
    ];
    if let Some((name, _)) = flags.iter().find(|(_, on)| *on) {
        return Err(SchedulerError::Unsupported {
            option: format!("{name} = true"),
            reason: "only the default and Karras (use_karras_sigmas) sigma schedules are \
                     implemented"
                .to_string(),
        });
    }
    if config.interpolation_type != InterpolationType::Linear {
        return Err(SchedulerError::Unsupported {
            option: "interpolation_type = log_linear".to_string(),
            reason: "only linear sigma interpolation is implemented".to_string(),
        });
    }
    Ok(())
}

/// Errors with a clear message when `step_index` is not a valid step.
pub(crate) fn check_step_index(step_index: usize, len: usize) -> candle_core::Result<()> {
    if len == 0 {
        candle_core::bail!("scheduler: set_timesteps must be called before stepping");
    }
    if step_index >= len {
        candle_core::bail!("scheduler: step index {step_index} out of range (0..{len})");
    }
    Ok(())
}

/// `sum(coef * tensor)` over f32 tensors.
pub(crate) fn lincomb(terms: &[(f64, &Tensor)]) -> candle_core::Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for &(c, t) in terms {
        let term = t.affine(c, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    match acc {
        Some(a) => Ok(a),
        None => candle_core::bail!("lincomb of no terms"),
    }
}

/// The tensor as f32 (no copy when it already is).
pub(crate) fn f32(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// Converts `(alpha, sigma)` model output to an x0 prediction, for samples
/// `x_t = alpha * x0 + sigma * noise`.
pub(crate) fn predict_x0(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha: f64,
    sigma: f64,
) -> candle_core::Result<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => {
            lincomb(&[(1.0 / alpha, sample), (-sigma / alpha, model_output)])
        }
        PredictionType::VPrediction => lincomb(&[(alpha, sample), (-sigma, model_output)]),
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// `t * s` with an f32 scalar, as torch multiplies a float32 tensor by a 0-d float32 tensor.
pub(crate) fn mul_f32(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.affine(f64::from(s), 0.0)
}

/// `t / s` with an f32 scalar: a true division (candle's `Tensor / f64` multiplies by the
/// reciprocal, which rounds differently).
pub(crate) fn div_f32(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&s)
}

/// Euler-family x0 prediction for sigma-parameterised samples, with diffusers' float32
/// operation order (these samples can be large: sigma_max reaches 2e4 for squaredcos_cap_v2,
/// so the order of roundings shows in the result).
pub(crate) fn euler_x0(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> candle_core::Result<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => sample - mul_f32(model_output, sigma)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            mul_f32(model_output, -sigma / s2.sqrt())? + div_f32(sample, s2)?
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// diffusers' Euler `scale_model_input`: `sample / (sigma**2 + 1) ** 0.5` in float32.
pub(crate) fn euler_scale_input(sample: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    div_f32(sample, (sigma * sigma + 1.0).sqrt())
}
