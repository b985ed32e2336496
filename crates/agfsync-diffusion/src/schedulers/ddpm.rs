//! DDPM (Ho et al. 2020), diffusers' `DDPMScheduler`: the forward (noising) process used in
//! training, and ancestral sampling.

use candle_core::{DType, Device, Tensor};

use super::common::{
    check_step_index, f32, lincomb, reject_common_unsupported, spaced_timesteps, validate_steps,
    validate_timesteps,
};
use super::{
    PredictionType, Scheduler, SchedulerConfig, SchedulerError, TimestepSpacing, VarianceType,
};
use crate::rng::Generator;

/// diffusers' `DDPMScheduler`.
///
/// Training utilities: [`DdpmScheduler::add_noise`], [`DdpmScheduler::get_velocity`],
/// [`DdpmScheduler::training_target`], [`DdpmScheduler::sample_timesteps`],
/// [`DdpmScheduler::alphas_cumprod_tensor`]. As a [`Scheduler`] it samples ancestrally with
/// `variance_type` fixed_small (default), fixed_small_log or fixed_large, drawing noise from the
/// [`Generator`].
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    alphas_cumprod: Vec<f32>,
    num_train_timesteps: usize,
    spacing: TimestepSpacing,
    steps_offset: usize,
    prediction_type: PredictionType,
    clip_sample: Option<f64>,
    variance_type: VarianceType,
    timesteps: Vec<f64>,
}

impl DdpmScheduler {
    /// Builds the scheduler from a diffusers config.
    pub fn new(config: &SchedulerConfig) -> Result<Self, SchedulerError> {
        reject_common_unsupported(config)?;
        let variance_type = config.variance_type.unwrap_or(VarianceType::FixedSmall);
        if !matches!(
            variance_type,
            VarianceType::FixedSmall | VarianceType::FixedSmallLog | VarianceType::FixedLarge
        ) {
            return Err(SchedulerError::Unsupported {
                option: format!("variance_type = {variance_type:?}"),
                reason: "DDPM sampling supports fixed_small, fixed_small_log and fixed_large"
                    .to_string(),
            });
        }
        Ok(Self {
            alphas_cumprod: config.alphas_cumprod_f32()?,
            num_train_timesteps: config.num_train_timesteps,
            spacing: config.timestep_spacing_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset,
            prediction_type: config.prediction_type,
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range),
            variance_type,
            timesteps: Vec::new(),
        })
    }

    /// Number of training timesteps (valid timesteps are `0..num_train_timesteps`).
    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    /// `alphas_cumprod[t]` (a float32 value, widened).
    pub fn alpha_cumprod(&self, t: usize) -> f64 {
        f64::from(self.alphas_cumprod[t])
    }

    /// The signal-to-noise ratio `alphas_cumprod[t] / (1 - alphas_cumprod[t])` (for min-SNR
    /// loss weighting).
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alpha_cumprod(t);
        a / (1.0 - a)
    }

    /// All `alphas_cumprod` as an `F32` tensor of shape `[num_train_timesteps]`.
    pub fn alphas_cumprod_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.alphas_cumprod, self.alphas_cumprod.len(), device)
    }

    /// Uniform training timesteps in `0..num_train_timesteps`, a `U32` tensor of shape
    /// `[batch]` (like `torch.randint(0, T, (batch,))`).
    pub fn sample_timesteps(
        &self,
        batch: usize,
        rng: &mut Generator,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        rng.randint(0, self.num_train_timesteps as u32, batch, device)
    }

    /// `(sqrt(alphas_cumprod[t]), sqrt(1 - alphas_cumprod[t]))` per sample, shaped
    /// `[B, 1, ..., 1]` to broadcast against `like`, computed in `like`'s dtype as diffusers does.
    fn coefficients(
        &self,
        timesteps: &Tensor,
        like: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let ts = timesteps
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let batch = like.dims().first().copied().unwrap_or(1);
        if ts.len() != 1 && ts.len() != batch {
            candle_core::bail!(
                "DDPM: {} timesteps for a batch of {batch} samples (expected 1 or {batch})",
                ts.len()
            );
        }
        let mut values = Vec::with_capacity(ts.len());
        for &t in &ts {
            if t.fract() != 0.0 || t < 0.0 || t >= self.num_train_timesteps as f64 {
                candle_core::bail!(
                    "DDPM: timestep {t} is not an integer in 0..{}",
                    self.num_train_timesteps
                );
            }
            values.push(self.alphas_cumprod[t as usize]);
        }
        let mut shape = vec![ts.len()];
        shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
        let a = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(like.dtype())?
            .to_device(like.device())?;
        let sqrt_a = a.sqrt()?;
        let sqrt_one_minus_a = a.affine(-1.0, 1.0)?.sqrt()?;
        Ok((sqrt_a, sqrt_one_minus_a))
    }

    /// The forward process `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`, with one timestep per
    /// sample (`timesteps`: shape `[B]` or a single value, any integer or float dtype holding
    /// integers).
    pub fn add_noise(
        &self,
        original_samples: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (sqrt_a, sqrt_1ma) = self.coefficients(timesteps, original_samples)?;
        original_samples.broadcast_mul(&sqrt_a)? + noise.broadcast_mul(&sqrt_1ma)?
    }

    /// The v-prediction target `sqrt(a_t) * noise - sqrt(1 - a_t) * sample`.
    pub fn get_velocity(
        &self,
        sample: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (sqrt_a, sqrt_1ma) = self.coefficients(timesteps, sample)?;
        noise.broadcast_mul(&sqrt_a)? - sample.broadcast_mul(&sqrt_1ma)?
    }

    /// The regression target for the configured prediction type: `noise` (epsilon),
    /// [`DdpmScheduler::get_velocity`] (v_prediction) or `x0` (sample).
    pub fn training_target(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.get_velocity(x0, noise, timesteps),
            PredictionType::Sample => Ok(x0.clone()),
        }
    }

    /// One ancestral step with explicit noise (required for every step but the last one, whose
    /// timestep is 0 when the schedule reaches it).
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
        let t = self.timesteps[step_index] as usize;
        let alpha_prod_t = f64::from(self.alphas_cumprod[t]);
        let alpha_prod_t_prev = match self.timesteps.get(step_index + 1) {
            Some(&prev) => f64::from(self.alphas_cumprod[prev as usize]),
            None => 1.0,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        let pred_original = match self.prediction_type {
            PredictionType::Epsilon => {
                (lincomb(&[(1.0, &sample), (-beta_prod_t.sqrt(), &model_output)])?
                    / alpha_prod_t.sqrt())?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => lincomb(&[
                (alpha_prod_t.sqrt(), &sample),
                (-beta_prod_t.sqrt(), &model_output),
            ])?,
        };
        let pred_original = match self.clip_sample {
            Some(r) => pred_original.clamp(-r, r)?,
            None => pred_original,
        };
        let x0_coef = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coef = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev = lincomb(&[(x0_coef, &pred_original), (sample_coef, &sample)])?;
        if t > 0 {
            let Some(noise) = noise else {
                candle_core::bail!("DDPM step at timestep {t} needs noise");
            };
            let variance =
                ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
            let std = match self.variance_type {
                VarianceType::FixedLarge => current_beta_t.sqrt(),
                // fixed_small, and fixed_small_log (exp(0.5 * ln(var)))
                _ => variance.sqrt(),
            };
            prev = (prev + f32(noise)?.affine(std, 0.0)?)?;
        }
        prev.to_dtype(out_dtype)
    }
}

impl Scheduler for DdpmScheduler {
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
        check_step_index(step_index, self.timesteps.len())?;
        let noise = if self.timesteps[step_index] > 0.0 {
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
