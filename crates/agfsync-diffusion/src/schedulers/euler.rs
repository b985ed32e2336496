//! Euler (Karras et al. 2022, algorithm 2 without churn), diffusers'
//! `EulerDiscreteScheduler`.

use candle_core::Tensor;

use super::common::{
    check_step_index, div_f32, euler_scale_input, euler_x0, f32, final_sigma, karras_sigmas,
    mul_f32, np_interp, reject_common_unsupported, reject_unsupported_sigmas, sigma_to_t,
    spaced_timesteps, train_sigmas_f32, validate_steps, validate_timesteps,
};
use super::{
    FinalSigmasType, PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing,
    TimestepType,
};
use crate::rng::Generator;

/// diffusers' `EulerDiscreteScheduler` with `s_churn = 0` (deterministic): linear sigma
/// interpolation, optional Karras sigmas, `final_sigmas_type` zero/sigma_min, discrete or
/// continuous (v-prediction) timesteps.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    num_train_timesteps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
    prediction_type: PredictionType,
    use_karras_sigmas: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    continuous_timesteps: bool,
    final_sigmas_type: FinalSigmasType,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler from a diffusers config.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        reject_common_unsupported(config)?;
        reject_unsupported_sigmas(config)?;
        let mut alphas_cumprod = config.alphas_cumprod_f32()?;
        if config.rescale_betas_zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let sigmas_f32 = train_sigmas_f32(&alphas_cumprod);
        Ok(Self {
            train_sigmas: sigmas_f32.iter().map(|&s| f64::from(s)).collect(),
            log_sigmas: sigmas_f32.iter().map(|&s| f64::from(s.ln())).collect(),
            alphas_cumprod,
            num_train_timesteps: config.num_train_timesteps,
            spacing: config.timestep_spacing_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset,
            prediction_type: config.prediction_type,
            use_karras_sigmas: config.use_karras_sigmas,
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            continuous_timesteps: config.timestep_type == TimestepType::Continuous
                && config.prediction_type == PredictionType::VPrediction,
            final_sigmas_type: config.final_sigmas_type,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<(), SchedulerError> {
        validate_steps(num_inference_steps, self.num_train_timesteps)?;
        // float32 timesteps, as numpy computes them
        let mut timesteps: Vec<f64> = spaced_timesteps(
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
        if self.use_karras_sigmas {
            let sigma_min = self.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = self.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &self.log_sigmas))
                .collect();
        }
        sigmas.push(final_sigma(self.final_sigmas_type, &self.alphas_cumprod));
        let sigmas_f32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        self.timesteps = if self.continuous_timesteps {
            sigmas_f32[..sigmas_f32.len() - 1]
                .iter()
                .map(|&s| f64::from(0.25f32 * s.ln()))
                .collect()
        } else {
            timesteps.iter().map(|&t| f64::from(t as f32)).collect()
        };
        self.sigmas = sigmas_f32.into_iter().map(f64::from).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self
            .sigmas
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        let max = if self.sigmas.is_empty() {
            // before set_timesteps: diffusers' full training schedule
            self.train_sigmas.iter().copied().fold(0.0, f64::max)
        } else {
            max
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
        _rng: &mut Generator,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let out_dtype = model_output.dtype();
        let model_output = f32(model_output)?;
        let sample = f32(sample)?;
        // float32 scalars and diffusers' operation order (s_churn = 0, so sigma_hat = sigma)
        let sigma = self.sigmas[step_index] as f32;
        let sigma_next = self.sigmas[step_index + 1] as f32;
        let pred_original = euler_x0(self.prediction_type, &model_output, &sample, sigma)?;
        let derivative = div_f32(&(&sample - &pred_original)?, sigma)?;
        let prev = (&sample + mul_f32(&derivative, sigma_next - sigma)?)?;
        prev.to_dtype(out_dtype)
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
