//! Euler ancestral sampling, diffusers' `EulerAncestralDiscreteScheduler`.

use candle_core::Tensor;

use super::common::{
    check_step_index, div_f32, euler_scale_input, euler_x0, f32, mul_f32, np_interp,
    reject_common_unsupported, spaced_timesteps, train_sigmas_f32, validate_steps,
    validate_timesteps,
};
use super::{PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing};
use crate::rng::Generator;

/// diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to `sigma_down`, plus fresh
/// Gaussian noise of scale `sigma_up` from the [`Generator`]. Supports epsilon and v-prediction
/// (diffusers does not implement `sample` prediction here either).
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    train_sigmas: Vec<f64>,
    num_train_timesteps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler from a diffusers config.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        reject_common_unsupported(config)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(SchedulerError::Unsupported {
                option: "prediction_type = sample".to_string(),
                reason: "Euler ancestral supports epsilon and v_prediction only (as diffusers)"
                    .to_string(),
            });
        }
        let mut alphas_cumprod = config.alphas_cumprod_f32()?;
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        Ok(Self {
            train_sigmas: train_sigmas_f32(&alphas_cumprod)
                .into_iter()
                .map(f64::from)
                .collect(),
            num_train_timesteps: config.num_train_timesteps,
            spacing: config.timestep_spacing_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset,
            prediction_type: config.prediction_type,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// One ancestral step with explicit noise (same shape as the sample; diffusers draws it with
    /// `randn_tensor`).
    pub fn step_with_noise(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &Tensor,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let model_output = f32(model_output)?;
        let sample = f32(sample)?;
        // float32 scalars and diffusers' operation order
        let sigma = self.sigmas[step_index] as f32;
        if self.prediction_type == PredictionType::Sample {
            candle_core::bail!("Euler ancestral does not support sample prediction");
        }
        let pred_original = euler_x0(self.prediction_type, &model_output, &sample, sigma)?;
        let sigma_from = sigma;
        let sigma_to = self.sigmas[step_index + 1] as f32;
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .max(0.0)
            .sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = div_f32(&(&sample - &pred_original)?, sigma)?;
        let prev = (&sample + mul_f32(&derivative, sigma_down - sigma)?)?;
        let prev = (prev + mul_f32(&f32(noise)?, sigma_up)?)?;
        prev.to_dtype(out_dtype)
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        validate_steps(num_inference_steps, self.num_train_timesteps)?;
        let timesteps: Vec<f64> = spaced_timesteps(
            self.spacing,
            num_inference_steps,
            self.num_train_timesteps,
            self.steps_offset,
            false,
        )
        .into_iter()
        .map(|t| f64::from(t as f32))
        .collect();
        validate_timesteps(num_inference_steps, &timesteps, self.num_train_timesteps)?;
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| np_interp(t, &self.train_sigmas))
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas.into_iter().map(|s| f64::from(s as f32)).collect();
        self.timesteps = timesteps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = if self.sigmas.is_empty() {
            self.train_sigmas.iter().copied().fold(0.0, f64::max)
        } else {
            self.sigmas.iter().copied().fold(0.0, f64::max)
        };
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => {
                let m = max as f32;
                f64::from((m * m + 1.0).sqrt())
            }
        }
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        euler_scale_input(sample, self.sigmas[step_index] as f32)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut Generator,
    ) -> candle_core::Result<Tensor> {
        let noise = rng.randn(
            model_output.shape(),
            model_output.dtype(),
            model_output.device(),
        )?;
        self.step_with_noise(model_output, step_index, sample, &noise)
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
