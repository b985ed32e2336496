//! DDIM (Song et al. 2020), diffusers' `DDIMScheduler`.

use candle_core::Tensor;

use super::common::{
    check_step_index, f32, lincomb, reject_common_unsupported, spaced_timesteps, validate_steps,
    validate_timesteps,
};
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};
use crate::rng::Generator;

/// diffusers' `DDIMScheduler`, with a fixed `eta` (0 = deterministic DDIM, 1 = DDPM-like
/// ancestral noise drawn from the [`Generator`]). `use_clipped_model_output` is not supported
/// (diffusers' default, false, is what this implements).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    num_train_timesteps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
    eta: f64,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl DdimScheduler {
    /// Builds the scheduler; `eta` scales the ancestral noise (diffusers' `step(eta=...)`).
    pub fn new(config: &SchedulerConfig, eta: f64) -> Result<Self, SchedulerError> {
        reject_common_unsupported(config)?;
        if !eta.is_finite() || eta < 0.0 {
            return Err(SchedulerError::InvalidConfig(format!(
                "DDIM eta must be a finite non-negative number, got {eta}"
            )));
        }
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            num_train_timesteps: config.num_train_timesteps,
            spacing: config.timestep_spacing_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset,
            prediction_type: config.prediction_type,
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range),
            eta,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        })
    }

    /// The eta this scheduler was built with.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The training `alphas_cumprod` (widened float32 values).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    fn alpha_prev(&self, prev_timestep: i64) -> f64 {
        if prev_timestep >= 0 {
            self.alphas_cumprod[prev_timestep as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// One DDIM step with explicit variance noise (diffusers' `variance_noise`), used when
    /// `eta > 0`; `noise` is ignored when `eta == 0`. A step needing noise without any is an
    /// error.
    pub fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let model_output = f32(model_output)?;
        let sample = f32(sample)?;
        let timestep = self.timesteps[step_index] as i64;
        // diffusers steps back by num_train // num_inference_steps whatever the spacing.
        let prev_timestep = timestep - (self.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_prod_t = self.alphas_cumprod[timestep as usize];
        let alpha_prod_t_prev = self.alpha_prev(prev_timestep);
        let beta_prod_t = 1.0 - alpha_prod_t;

        let (pred_original, pred_epsilon) = match self.prediction_type {
            PredictionType::Epsilon => (
                (lincomb(&[(1.0, &sample), (-beta_prod_t.sqrt(), &model_output)])?
                    / alpha_prod_t.sqrt())?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                (lincomb(&[(1.0, &sample), (-alpha_prod_t.sqrt(), &model_output)])?
                    / beta_prod_t.sqrt())?,
            ),
            PredictionType::VPrediction => (
                lincomb(&[
                    (alpha_prod_t.sqrt(), &sample),
                    (-beta_prod_t.sqrt(), &model_output),
                ])?,
                lincomb(&[
                    (alpha_prod_t.sqrt(), &model_output),
                    (beta_prod_t.sqrt(), &sample),
                ])?,
            ),
        };
        let pred_original = match self.clip_sample {
            Some(r) => pred_original.clamp(-r, r)?,
            None => pred_original,
        };

        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction_coef = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let mut prev = lincomb(&[
            (alpha_prod_t_prev.sqrt(), &pred_original),
            (direction_coef, &pred_epsilon),
        ])?;
        if self.eta > 0.0 {
            let Some(noise) = noise else {
                candle_core::bail!("DDIM with eta > 0 needs variance noise");
            };
            prev = (prev + f32(noise)?.affine(std_dev_t, 0.0)?)?;
        }
        prev.to_dtype(out_dtype)
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        validate_steps(num_inference_steps, self.num_train_timesteps)?;
        let timesteps = spaced_timesteps(
            self.spacing,
            num_inference_steps,
            self.num_train_timesteps,
            self.steps_offset,
            true,
        );
        validate_timesteps(num_inference_steps, &timesteps, self.num_train_timesteps)?;
        self.num_inference_steps = num_inference_steps;
        self.timesteps = timesteps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(
        &self,
        sample: &Tensor,
        _step_index: usize,
    ) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut Generator,
    ) -> candle_core::Result<Tensor> {
        let noise = if self.eta > 0.0 {
            Some(rng.randn_like(model_output)?)
        } else {
            None
        };
        self.step_with_noise(model_output, step_index, sample, noise.as_ref())
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
}
